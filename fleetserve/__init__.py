"""fleetserve: an open-weights LLM from a model id to an OpenAI-compatible endpoint."""

__version__ = "0.1.0"
