"""The release of tfkl: read by pyproject.toml (setuptools' dynamic version) and exported as tfkl.__version__."""

__version__ = "0.2.0"
