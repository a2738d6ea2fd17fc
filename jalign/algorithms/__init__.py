"""Algorithms, registered by name for ``algorithm.name`` in the config (imported on demand)."""
