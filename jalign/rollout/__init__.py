"""Rollouts: the decode engine and the on-device Experience of generate-then-train algorithms."""
