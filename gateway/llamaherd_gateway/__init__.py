"""llamaherd gateway: one OpenAI endpoint in front of every InferenceService."""

__version__ = "0.1.0"
