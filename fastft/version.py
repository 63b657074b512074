"""fastft's version: one place, read by the package build (pyproject.toml), the CLI and every saved bundle."""

__version__ = "0.1.0"
