"""effnet."""
