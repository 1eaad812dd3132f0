"""gencli: queue-backed text generation for small GPT models."""

from importlib import metadata

__version__ = metadata.version("gencli")  # pyproject.toml's, as installed: its one home
