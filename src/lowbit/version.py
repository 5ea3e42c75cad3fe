"""lowbit's version: recorded in the files it writes (imports nothing)."""

__version__ = "0.1.0"
