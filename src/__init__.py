"""gridserve: a distributed model-serving cluster for HuggingFace models."""

__version__ = "0.1.0"
