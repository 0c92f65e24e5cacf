"""The package version (its own module so that no module has to import the package root)."""
__version__ = "0.2.0"
