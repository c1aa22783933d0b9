"""fedrec: privacy."""
