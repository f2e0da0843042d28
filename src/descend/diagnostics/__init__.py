"""descend.diagnostics."""
