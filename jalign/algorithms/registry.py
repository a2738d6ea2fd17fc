"""One registry of algorithms: built-in names, and import paths for algorithms outside the package.

An algorithm is a class with a ``config_class`` (the dataclass of its ``algorithm:`` section, defined next to
it) registered under a name::

    @register("kto", config=KTOConfig)
    class KTO(SupervisedAlgorithm): ...

``algorithm.name`` in a config is a built-in name (``dpo``) or an import path ``package.module:Class``; the
class must carry a ``config_class`` (``register`` sets it). Built-in modules are imported on first use, so
reading a config imports only the algorithm it names. This module itself imports nothing heavy.
"""
from __future__ import annotations

import dataclasses
import difflib
import importlib

# name -> module that registers it on import
BUILTIN = {
    "sft": "jalign.algorithms.sft",
    "reward": "jalign.algorithms.reward",
    "dpo": "jalign.algorithms.dpo",
    "ppo": "jalign.algorithms.ppo",
    "grpo": "jalign.algorithms.grpo",
    "rloo": "jalign.algorithms.rloo",
    "dapo": "jalign.algorithms.dapo",
    "gspo": "jalign.algorithms.gspo",
    "reinforce_pp": "jalign.algorithms.reinforce_pp",
    "rs": "jalign.algorithms.rs",
    "online_dpo": "jalign.algorithms.online_dpo",
    "spin": "jalign.algorithms.spin",
    "cai_sl": "jalign.algorithms.cai",
    "cai_rlaif": "jalign.algorithms.cai",
    "opd": "jalign.algorithms.opd",
    "kto": "jalign.algorithms.kto",
    "steerlm": "jalign.algorithms.steerlm",
    "steerlm2": "jalign.algorithms.steerlm2",
    "distill": "jalign.algorithms.distill",
}
_REGISTERED: dict[str, type] = {}


class UnknownAlgorithm(LookupError):
    """``algorithm.name`` names nothing importable; the message says what was tried."""


def register(name: str, *, config: type):
    """Class decorator: ``cls.name = name``, ``cls.config_class = config``, selectable as ``algorithm.name``."""
    if not dataclasses.is_dataclass(config):
        raise TypeError(f"register({name!r}): config must be a dataclass, got {config!r}")

    def deco(cls):
        cls.name, cls.config_class = name, config
        _REGISTERED[name] = cls
        return cls

    return deco


def _edits(a: str, b: str) -> int:
    """Optimal-string-alignment distance: insertions, deletions, substitutions, adjacent transpositions."""
    d = [[i + j if i * j == 0 else 0 for j in range(len(b) + 1)] for i in range(len(a) + 1)]
    for i in range(1, len(a) + 1):
        for j in range(1, len(b) + 1):
            d[i][j] = min(d[i - 1][j] + 1, d[i][j - 1] + 1, d[i - 1][j - 1] + (a[i - 1] != b[j - 1]))
            if i > 1 and j > 1 and a[i - 1] == b[j - 2] and a[i - 2] == b[j - 1]:
                d[i][j] = min(d[i][j], d[i - 2][j - 2] + 1)
    return d[-1][-1]


def resolve(name: str) -> type:
    """The algorithm class for ``algorithm.name``: a built-in name or ``package.module:Class``."""
    if not isinstance(name, str) or not name:
        raise UnknownAlgorithm(f"expected a name such as 'dpo' or an import path 'pkg.mod:Class', got {name!r}")
    if ":" in name:
        return _from_import_path(name)
    if name not in _REGISTERED and name in BUILTIN:
        importlib.import_module(BUILTIN[name])
    if name in _REGISTERED:
        return _REGISTERED[name]
    # among difflib's close names the fewest edits first (a swap of neighbours is one: "dop" -> "dpo", not "opd")
    close = sorted(difflib.get_close_matches(name, list(BUILTIN), n=3), key=lambda c: _edits(name, c))
    hint = f"; did you mean {close[0]!r}?" if close else ""
    raise UnknownAlgorithm(f"unknown algorithm {name!r}{hint} (known: {', '.join(sorted(BUILTIN))}; or an import "
                           "path package.module:Class)")


def _from_import_path(path: str) -> type:
    module_name, _, attr = path.partition(":")
    try:
        module = importlib.import_module(module_name)
    except ImportError as e:
        raise UnknownAlgorithm(f"cannot import module {module_name!r} of {path!r}: {e}") from None
    cls = getattr(module, attr, None)
    if cls is None:
        raise UnknownAlgorithm(f"module {module_name!r} has no attribute {attr!r}")
    if not dataclasses.is_dataclass(getattr(cls, "config_class", None)):
        raise UnknownAlgorithm(f"{path}: not an algorithm (no config_class dataclass; decorate it with "
                               "jalign.algorithms.registry.register(name, config=...))")
    if not getattr(cls, "name", None):
        cls.name = path
    return cls


def builtin_names() -> list[str]:
    return sorted(BUILTIN)
