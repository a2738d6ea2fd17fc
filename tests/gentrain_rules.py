"""Rule rewards for the generate-then-train tests, loaded by import path (``algorithm.reward_fn=FILE:NAME``)."""


def char_score(prompt, response, reference, **_):
    """A reward with few ties on a random model's samples: the response's characters hashed into [0, 1)."""
    return (sum(ord(c) * (i + 1) for i, c in enumerate(response)) % 997) / 997.0

