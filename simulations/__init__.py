"""fedrec: simulations."""
