"""llamaherd operator: turns InferenceServices into server Deployments and keeps their status."""

__version__ = "0.1.0"
