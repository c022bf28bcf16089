"""Small built-in examples that run offline in seconds."""
