"""jalign: align language models with human preferences in JAX."""
__version__ = "0.1.0"
