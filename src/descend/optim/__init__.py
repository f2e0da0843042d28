"""descend.optim."""
