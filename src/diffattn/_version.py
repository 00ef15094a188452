"""The package version (a leaf module: everything that records it imports it from here, not from the package)."""

__version__ = "0.1.0"  # keep equal to pyproject.toml [project] version (tests/test_cli_startup.py)
