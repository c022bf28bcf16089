"""The built-in demo recipe (`kdistill demo`)."""
