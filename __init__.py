"""gencli: queue-backed text generation for small GPT models."""

__version__ = "0.1.0"
