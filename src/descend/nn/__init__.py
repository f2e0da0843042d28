"""descend.nn."""
