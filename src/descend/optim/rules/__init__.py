"""The update rules: what one optimizer step computes."""
