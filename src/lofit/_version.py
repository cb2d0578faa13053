"""The package version, in a module of its own so that modules inside lofit can read it
without importing the package that imports them (pyproject.toml reads it too)."""

__version__ = "0.1.0"
