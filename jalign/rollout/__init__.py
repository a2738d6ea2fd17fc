"""Rollouts: the decode engine (continuous batching over a paged KV cache with shared prompt prefixes) and the
on-device Experience of generate-then-train algorithms (``jalign.rollout.experience``).

    from jalign.rollout import Engine, Request, generate
"""
from jalign.rollout.adapter import device_rows, generate, global_rows, served_rows
from jalign.rollout.engine import Engine, Request, Result
from jalign.rollout.programs import compiled_cache_size

__all__ = ["Engine", "Request", "Result", "generate", "device_rows", "served_rows", "global_rows", "compiled_cache_size"]
