"""The package version, in one place (read by hatchling too)."""

__version__ = "0.1.0"
