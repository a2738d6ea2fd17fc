"""Allowed ranges of the config's numeric keys, and the checks that apply them (no JAX import).

``validate_values(section, path, where)`` walks a schema instance and refuses any float that is not
finite and any number outside its key's range in ``VALUE_RANGES`` (keyed by schema class *name*, so
algorithm configs defined in other modules can be listed, and a subclass inherits its base's
entries). Optional keys are only checked when set. ``where(path)`` names the file:line or override.
"""
from __future__ import annotations

import dataclasses
import difflib
import math
from dataclasses import dataclass
from typing import Callable, Optional

from jalign.errors import ConfigError

Where = Callable[[tuple], str]


@dataclass(frozen=True)
class _Range:
    """An interval of allowed values for a numeric key (``None`` ends are unbounded)."""

    lo: Optional[float] = None
    hi: Optional[float] = None
    lo_open: bool = False
    hi_open: bool = False
    hint: str = ""

    def holds(self, v) -> bool:
        if self.lo is not None and (v <= self.lo if self.lo_open else v < self.lo):
            return False
        return self.hi is None or (v < self.hi if self.hi_open else v <= self.hi)

    def describe(self) -> str:
        def num(x):
            return str(int(x)) if float(x).is_integer() else f"{x:g}"

        if self.hi is None:
            return f"{'>' if self.lo_open else '>='} {num(self.lo)}"
        return f"in {'(' if self.lo_open else '['}{num(self.lo)}, {num(self.hi)}{')' if self.hi_open else ']'}"

    def with_hint(self, hint: str) -> "_Range":
        return dataclasses.replace(self, hint=hint)


_POSITIVE = _Range(0, lo_open=True)
_NON_NEGATIVE = _Range(0)
_AT_LEAST_1 = _Range(1)
_FRACTION = _Range(0, 1)
_BETA = _Range(0, 1, hi_open=True)
_PROBABILITY = _Range(0, 1, lo_open=True)
_SEED = _Range(0, 2**32 - 1, hint="numpy and grain take seeds in [0, 2**32)")

VALUE_RANGES: dict[str, dict[str, _Range]] = {
    "RopeScalingConfig": {"factor": _POSITIVE, "low_freq_factor": _POSITIVE, "high_freq_factor": _POSITIVE,
                          "original_max_position_embeddings": _AT_LEAST_1},
    "ModelConfig": {"vocab_size": _AT_LEAST_1, "hidden": _AT_LEAST_1, "mlp": _AT_LEAST_1, "layers": _AT_LEAST_1,
                    "heads": _AT_LEAST_1, "kv_heads": _AT_LEAST_1, "head_dim": _AT_LEAST_1,
                    "rope_theta": _POSITIVE, "norm_eps": _POSITIVE, "init_std": _POSITIVE,
                    "max_seq_len": _AT_LEAST_1},
    "DataConfig": {"seq_len": _Range(2), "seed": _SEED, "max_examples": _AT_LEAST_1},
    "OptimConfig": {"lr": _POSITIVE, "warmup_steps": _NON_NEGATIVE, "min_lr_ratio": _FRACTION,
                    "weight_decay": _NON_NEGATIVE, "b1": _BETA, "b2": _BETA, "eps": _POSITIVE,
                    "grad_clip": _POSITIVE.with_hint("null turns clipping off")},
    "TrainConfig": {"steps": _AT_LEAST_1, "global_batch": _AT_LEAST_1, "micro_batch": _AT_LEAST_1,
                    "eval_every": _NON_NEGATIVE.with_hint("0 turns evaluation off"), "eval_batches": _AT_LEAST_1,
                    "log_every": _AT_LEAST_1,
                    "checkpoint_every": _NON_NEGATIVE.with_hint("0 checkpoints only at the end"),
                    "keep_checkpoints": _AT_LEAST_1, "max_nonfinite": _AT_LEAST_1,
                    "stop_after_steps": _AT_LEAST_1},
    "DistributedConfig": {"num_processes": _AT_LEAST_1, "process_id": _NON_NEGATIVE,
                          "local_device_ids": _NON_NEGATIVE, "initialization_timeout": _AT_LEAST_1,
                          "heartbeat_timeout": _AT_LEAST_1, "shutdown_timeout": _AT_LEAST_1},
    "RolloutConfig": {"slots": _AT_LEAST_1, "page_size": _AT_LEAST_1, "steps_per_call": _AT_LEAST_1},
    "EvalConfig": {"prompts": _NON_NEGATIVE.with_hint("0 turns generation-based evaluation off"),
                   "max_new_tokens": _AT_LEAST_1, "temperature": _POSITIVE, "log_samples": _NON_NEGATIVE},
    "RewardConfig": {"num_attributes": _AT_LEAST_1, "margin_scale": _NON_NEGATIVE},
    "DPOConfig": {"beta": _POSITIVE, "label_smoothing": _Range(0, 0.5, hi_open=True), "eta": _POSITIVE,
                  "sft_weight": _NON_NEGATIVE},
    "RLConfig": {"reward_attribute": _NON_NEGATIVE, "num_rollouts_per_prompt": _AT_LEAST_1,
                  "max_new_tokens": _AT_LEAST_1, "temperature": _POSITIVE, "top_k": _NON_NEGATIVE.with_hint("0 = off"),
                  "top_p": _PROBABILITY, "ppo_epochs": _AT_LEAST_1, "minibatch_size": _AT_LEAST_1,
                  "micro_batch_size": _AT_LEAST_1, "clip_eps": _POSITIVE, "entropy_coef": _NON_NEGATIVE,
                  "kl_coef": _NON_NEGATIVE, "reward_scale": _POSITIVE,
                  "reward_clip": _POSITIVE.with_hint("null turns clipping off")},
    "PPOConfig": {"critic_lr": _POSITIVE, "kl_target": _POSITIVE, "kl_horizon": _POSITIVE, "gamma": _FRACTION,
                  "lam": _FRACTION, "value_clip": _POSITIVE},
}
MESH_AXES = ("data", "fsdp", "tensor", "sequence")


def _ranges_for(cls) -> dict[str, _Range]:
    out: dict[str, _Range] = {}
    for klass in reversed(cls.__mro__):  # a subclass's entries override its base's
        out.update(VALUE_RANGES.get(klass.__name__, {}))
    return out


def _check_number(value, rng: Optional[_Range], path: tuple, where: Where) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return
    if isinstance(value, float) and not math.isfinite(value):
        raise ConfigError(f"{where(path)}: must be a finite number, got {value}")
    if rng is not None and not rng.holds(value):
        hint = f" ({rng.hint})" if rng.hint else ""
        raise ConfigError(f"{where(path)}: must be {rng.describe()}, got {value!r}{hint}")


def validate_values(obj, path: tuple, where: Where) -> None:
    """Every numeric key of a schema instance (recursively) against ``VALUE_RANGES``; floats finite."""
    ranges = _ranges_for(type(obj))
    for f in dataclasses.fields(obj):
        value, sub = getattr(obj, f.name), path + (f.name,)
        if dataclasses.is_dataclass(value):
            validate_values(value, sub, where)
        elif isinstance(value, list):
            for i, v in enumerate(value):
                _check_number(v, ranges.get(f.name), sub + (i,), where)
        elif value is not None:
            _check_number(value, ranges.get(f.name), sub, where)


def validate_rules(rules: dict, where: Where) -> None:
    for name, axes in rules.items():
        flat = [] if axes is None else (list(axes) if isinstance(axes, list) else [axes])
        for a in flat:
            if a not in MESH_AXES:
                close = difflib.get_close_matches(str(a), MESH_AXES, n=1)
                hint = f"; did you mean {close[0]!r}?" if close else ""
                raise ConfigError(f"{where(('mesh', 'rules', name))}: unknown mesh axis {a!r}{hint} "
                                  f"(mesh axes: {', '.join(MESH_AXES)}, or null)")
        if len(set(flat)) != len(flat):
            raise ConfigError(f"{where(('mesh', 'rules', name))}: a mesh axis is listed twice in {axes!r}")
