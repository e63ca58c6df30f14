"""The version, in one place: fastconv.__version__, `fastconv --version`, the build."""

__version__ = "0.1.0"
