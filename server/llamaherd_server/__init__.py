"""llamaherd server: continuous batching on llama.cpp behind a priority queue."""

__version__ = "0.1.0"
