"""fedrec: server."""
