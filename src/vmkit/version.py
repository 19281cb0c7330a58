"""vmkit's version (its own module: everything can import it without importing the public face)."""

__version__ = "0.1.0"
