"""Frozen models ("roles": reference, reward, teacher, judge, opponent, ...) built from config by one builder.

An algorithm declares the roles it uses (``role_specs()``: name -> :class:`RoleSpec`); ``roles.NAME`` in the
config may name each one's weights (``policy-init``, ``run:DIR[@STEP]``, ``hf:DIR``) and ``offload`` it.
:func:`build_roles` loads them with the one loader (``jalign.models.load``) straight onto their shardings;
the result, :class:`Roles`, is what ``step(state, roles, batch)`` receives. Roles are never in an optimizer,
never donated and never checkpointed: on resume the same builder builds them again from the same sources,
which is deterministic (``policy-init`` with random init uses the policy's own init seed).
"""
from __future__ import annotations

import dataclasses
from typing import Optional

import jax

from jalign.config import Config, ConfigError, ModelConfig, RoleConfig
from jalign.models import load
from jalign.models import params as params_lib
from jalign.models import transformer as tfm
from jalign.models.architecture import weights_spec

POLICY_INIT = "policy-init"


@dataclasses.dataclass(frozen=True)
class RoleSpec:
    """What an algorithm needs of one frozen model.

    ``source``: the default weights when the config's ``roles.NAME`` does not say (``policy-init`` or a
    spec string); ``lm_head`` / ``score_outputs``: the heads it is declared with (``score_outputs=-1``: as
    many as the source's score head has); ``allow_fresh``: parameter paths that may start fresh.
    """

    source: Optional[str] = POLICY_INIT
    lm_head: bool = True
    score_outputs: int = 0
    allow_fresh: tuple = ()
    what: str = ""  # for messages, e.g. "reward model"
    quantize: Optional[str] = None  # store the frozen weights quantised (int8 / nf4 / nf4_dq: jalign.models.quant)


@dataclasses.dataclass
class Roles:
    """The frozen models of a run: ``params[name]`` (pytrees on their shardings) and ``configs[name]``."""

    params: dict
    configs: dict
    offloaded: frozenset = frozenset()

    def __contains__(self, name: str) -> bool:
        return name in self.params

    def __getitem__(self, name: str):
        return self.params[name]

    def config(self, name: str) -> ModelConfig:
        return self.configs[name]

    def on_device(self, names=None) -> dict:
        """{name: params} with offloaded roles copied to device memory for one use (the parked copy stays)."""
        names = list(self.params) if names is None else names
        return {n: (to_memory(self.params[n], "device") if n in self.offloaded else self.params[n]) for n in names}

    def drop(self, name: str) -> None:
        """Release a role that is no longer needed (e.g. a reference whose log-probs were precomputed)."""
        self.params.pop(name, None)

    def set(self, name: str, params, config: ModelConfig) -> None:
        """Put (or replace) a role built by the algorithm rather than from config: e.g. SPIN's opponent,
        rebuilt from the policy between iterations with :func:`snapshot`. The previous buffers are released."""
        self.params[name] = params
        self.configs[name] = config
        self.offloaded = self.offloaded - {name}


def snapshot(params):
    """A frozen copy of (trained) params: bit-identical, on the same shardings, in buffers of its own, so
    donating the train state in the next update never invalidates it (``may_alias=False`` forces the copy)."""
    return jax.tree.map(lambda x: jax.device_put(x, x.sharding, may_alias=False), params)


def to_memory(tree, kind: str):
    """The same arrays, same shardings, in another memory space of their devices ("device", "pinned_host")."""
    return jax.tree.map(lambda x: jax.device_put(x, x.sharding.with_memory_kind(kind)), tree)


def policy_init_seed(train_seed: int) -> int:
    """The integer seed of the policy's random init (also the reference's under ``policy-init``)."""
    import numpy as np

    key = jax.random.split(jax.random.key(train_seed))[0]
    return int(np.asarray(jax.random.key_data(key)).reshape(-1)[-1])


def policy_source(cfg: Config) -> tuple[str, load.WeightSource]:
    """(config key, source) of the weights the policy starts from."""
    key, spec = weights_spec(cfg.model, cfg.source or "model")
    return key or "model", load.parse_source(spec or None, where=key or "model")


def role_source(cfg: Config, name: str, spec: RoleSpec) -> tuple[str, Optional[str]]:
    """(config key for messages, source string) of a role: the config's ``roles.NAME`` or the spec's default."""
    rc: Optional[RoleConfig] = cfg.roles.get(name)
    if rc is not None:
        return f"roles.{name}", rc.source
    return f"roles.{name} (default)", spec.source


def role_architecture(cfg: Config, source: load.WeightSource, key: str) -> ModelConfig:
    """The architecture of a role: the policy's for policy-init / random, else the source's own, run by the
    policy's dtypes and remat policy."""
    from jalign.models.architecture import source_with_tokenizer

    arch = load.source_architecture(source, where=key)
    if arch is None:
        return cfg.model
    arch = source_with_tokenizer(arch, source)
    m = cfg.model
    return dataclasses.replace(arch, dtype=m.dtype, param_dtype=m.param_dtype, remat=m.remat,
                               attention=m.attention, hf_path=None, init_from=None)


def build_roles(cfg: Config, specs: dict, mesh, rules, log=print) -> Roles:
    """Load every role of ``specs`` whose source is set (a role with source None and no config entry is
    skipped: optional roles such as a reward model under a rule reward)."""
    params, configs, offloaded = {}, {}, set()
    for name, spec in specs.items():
        key, spec_str = role_source(cfg, name, spec)
        if spec_str is None:
            continue
        what = spec.what or name
        if spec_str == POLICY_INIT:
            key, source = policy_source(cfg)
            mcfg = cfg.model
            seed = policy_init_seed(cfg.train.seed)
        else:
            source = load.parse_source(spec_str, where=key)
            if source.kind == "random":
                raise ConfigError(f"{key}: a frozen {what} needs weights (policy-init, run:DIR or hf:DIR)")
            mcfg = role_architecture(cfg, source, key)
            seed = 0
        outputs = spec.score_outputs
        if outputs < 0:
            outputs = _source_score_outputs(source, key, what)
        decls = tfm.declare_params(mcfg, lm_head=spec.lm_head, score_outputs=outputs)
        params[name] = load.load_params(source, decls, mesh=mesh, rules=rules,
                                        dtype=params_lib.DTYPES[mcfg.param_dtype], seed=seed,
                                        allow_fresh=spec.allow_fresh, role=what, where=key, log=log)
        if spec.quantize:
            from jalign.models import quant

            params[name] = quant.quantize_params(params[name], decls, spec.quantize,
                                                 shardings=quant.quantized_shardings(decls, spec.quantize, mesh, rules))
        configs[name] = mcfg
        if name in cfg.roles and cfg.roles[name].offload:
            params[name] = to_memory(params[name], "pinned_host")
            offloaded.add(name)
    return Roles(params, configs, frozenset(offloaded))


def _source_score_outputs(source: load.WeightSource, key: str, what: str) -> int:
    """How many outputs the score head of a run source has (a reward model's attributes)."""
    import json

    if source.kind == "hf":
        from pathlib import Path

        head = Path(source.path) / "reward_head.json"
        if head.is_file():
            return int(json.loads(head.read_text())["num_attributes"])
        c = json.loads((Path(source.path) / "config.json").read_text())
        if any("ForSequenceClassification" in a for a in c.get("architectures", [])):
            return int(c.get("num_labels", 1))
        raise ConfigError(f"{key}={source}: a {what} needs a score head; this is a language model")
    from jalign.config import load_config
    from pathlib import Path

    run_cfg = load_config(Path(source.path) / "config.yaml")
    a = run_cfg.algorithm
    if getattr(a, "name", None) != "reward":
        raise ConfigError(f"{key}={source}: not a reward-model run (its algorithm is {getattr(a, 'name', None)!r}); "
                          f"a {what} needs a score head")
    return int(getattr(a, "num_attributes", 1))
