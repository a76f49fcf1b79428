"""The package version: the one source of truth (pyproject.toml reads it statically)."""
__version__ = "0.1.0"
