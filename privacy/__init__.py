"""fedrec: privacy (user-level DP-SGD, accounting, the privacy ledger, client privacy policies,
secure aggregation).

``PRIVACY_DECLINED`` is the error code of a client's train reply when its privacy policy declined
the server's request (or its budget is spent): the server counts it apart from failures.
``SECAGG_FAILED`` is the error code of a client's reply when it cannot take part in a stage of
secure aggregation (its update is outside the quantization bound, or the protocol refused the
request): the server counts that client as dropped at that stage.
``RECEIPT_RECORD`` is the name of the ConfigRecord in which a client's train reply carries the
receipt of the ledger entry it wrote for the round (``privacy.ledger.Receipt``); an error reply
carries it at the end of its reason instead (``privacy.ledger.split_receipt``).
"""

PRIVACY_DECLINED = 4101
SECAGG_FAILED = 4102
RECEIPT_RECORD = "ledger-receipt"
