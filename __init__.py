"""gencli: queue-backed text generation for small GPT models."""

from importlib import metadata

__version__ = metadata.version("gencli")  # one home: pyproject.toml's (it said 0.1.0 here beside 0.2.0 there)
