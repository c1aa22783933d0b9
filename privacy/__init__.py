"""fedrec: privacy (user-level DP-SGD, accounting, the privacy ledger, client privacy policies).

``PRIVACY_DECLINED`` is the error code of a client's train reply when its privacy policy declined
the server's request (or its budget is spent): the server counts it apart from failures.
"""

PRIVACY_DECLINED = 4101
