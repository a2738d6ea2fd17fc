"""The errors a user can cause, one family: the CLI prints their message (one line) and exits non-zero.

Every subclass's message names where the problem is (``file:line: key``, ``file: tensor NAME``, ...);
the traceback is only shown with ``--debug`` / ``JALIGN_DEBUG=1``. Each class also derives from
``ValueError`` so code that caught ``ValueError`` before keeps working.

This module imports nothing (it is imported by ``jalign.config``, which must stay free of JAX).
The classes are re-exported where they were first defined: ``jalign.config.ConfigError``,
``jalign.models.hf_io.HFCheckpointError``, ``jalign.data.chat.ChatTemplateError``,
``jalign.data.tokenizer.TokenizerError``.
"""
from __future__ import annotations


class JalignError(Exception):
    """Bad input (config, data, checkpoint, tokenizer, template); ``exit_code`` is the CLI's status."""

    exit_code = 2


class ConfigError(JalignError, ValueError):
    """A configuration problem; the message names the file:line (or override) and the key."""


class HFCheckpointError(JalignError, ValueError):
    """A Hugging Face directory we cannot read; the message names the file / tensor and the problem."""


class ChatTemplateError(JalignError, ValueError):
    """The template cannot be loaded or rendered, or does not render conversations prefix-stably."""


class TokenizerError(JalignError, ValueError):
    """A tokenizer that cannot be loaded or does not fit the model; the message names the file."""


class NothingToTrain(JalignError, RuntimeError):
    """A generate-then-train run whose filter (a threshold, margin, judge confidence, ...) masked out every
    training row for several steps in a row: the message names the key; the checkpoints written are kept."""
