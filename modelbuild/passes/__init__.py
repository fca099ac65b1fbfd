"""Built-in passes, one module each; registered as entry points in pyproject.toml."""
