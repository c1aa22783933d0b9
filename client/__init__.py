"""fedrec: client."""
