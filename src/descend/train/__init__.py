"""descend.train."""
