"""Checkpoint formats other than npllama's own training state."""
