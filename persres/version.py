"""The version of persres (one place: the package, the CLI's --version and every PNG's metadata read it here)."""

__version__ = "0.9.0"
