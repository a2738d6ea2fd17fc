"""Llama-family transformer as pure functions over a declared params pytree."""
