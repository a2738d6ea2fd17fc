"""The rollout of one RL step: K samples of each of P prompts, their rule rewards, and DAPO's dynamic sampling.

Dynamic sampling (Yu et al. 2025, "DAPO", Sec. 3.2; ``algorithm.dynamic_sampling: true``): a group whose K
rewards all agree has zero group advantage; it is dropped and the batch is refilled with the groups of new
prompts (drawn from the same checkpointed prompt stream), rolled out in extra rounds until P groups carry a
signal or ``max_resample_rounds`` extra rounds were spent. Slots still empty then hold dropped groups with a
zero loss weight (``row_valid``), so shapes never change and a group with identical rewards never reaches the
loss. Round r of step s samples with ``fold_in(fold_in(key(seed), s), r)``: a resumed run draws the same rollouts.

Rows of the chosen groups are gathered on device into a buffer laid out like the first round's rollout
(one small jitted program, compiled once); only the per-group keep flags [P] come to the host.
"""
from __future__ import annotations

import dataclasses
from typing import Optional

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec

from jalign.algorithms.rl_rewards import model_components, rule_components, shape_rewards
from jalign.losses import dynamic_sampling_keep
from jalign.rollout import experience as xp


@dataclasses.dataclass
class Rollout:
    out: dict  # the sampler's device output (rows = groups of K samples, group g at rows g*K .. g*K+K-1)
    row_prompts: np.ndarray  # prompt index of every row [N]
    given: dict  # reward components already scored: rule terms (and, with dynamic sampling, model terms)
    row_valid: Optional[jax.Array] = None  # [N] 1/0 loss weight of the rows (None: all rows train)
    metrics: dict = dataclasses.field(default_factory=dict)


def merge_rows(buf: dict, new: dict, src, take):
    """``buf`` with row i replaced by ``new[src[i]]`` where ``take[i]`` (every leaf [B, ...]; scalars kept)."""
    def one(b, n):
        if jnp.ndim(b) == 0:
            return b
        t = take.reshape((-1,) + (1,) * (b.ndim - 1))
        return jnp.where(t, jnp.take(n, src, axis=0), b)

    return jax.tree.map(one, buf, new)


def _host(x) -> np.ndarray:
    """A replicated (or fully addressable) device array on the host."""
    if isinstance(x, jax.Array) and not x.is_fully_addressable:
        return np.asarray(x.addressable_data(0))
    return np.asarray(jax.device_get(x))


class Sampler:
    """Rollouts of one step for an :class:`jalign.algorithms.rl.RLAlgorithm` (``algo``)."""

    def __init__(self, algo):
        self.algo = algo
        self._merge = jax.jit(merge_rows)
        self._round = jax.jit(self._round_impl)

    def _key(self, step: int, rnd: int):
        key = jax.random.fold_in(jax.random.key(self.algo.cfg.train.seed), step)
        return key if rnd == 0 else jax.random.fold_in(key, rnd)

    def _one(self, params, prompts: np.ndarray, step: int, rnd: int):
        algo = self.algo
        idx = np.repeat(prompts, algo.sizes.per_prompt)
        out = algo.sample(params, [algo.train_prompts.ids[i] for i in idx], self._key(step, rnd))
        given = rule_components(algo.terms, algo.tokenizer, out, idx, algo.train_prompts)
        return idx, out, given

    def __call__(self, params, roles, prompts: np.ndarray, step: int) -> Rollout:
        if not self.algo.a.dynamic_sampling:
            idx, out, given = self._one(params, prompts, step, 0)
            return Rollout(out, idx, given)
        return self._dynamic(params, roles, prompts, step)

    # ---- dynamic sampling ---------------------------------------------------------------------------
    def _round_impl(self, rm_params, out, given):
        """Reward-model scores of a round and its per-group keep flags [P] (replicated)."""
        algo = self.algo
        rows = xp.rollout_rows(out, algo.tokenizer.pad_id)
        rm = model_components(algo.terms, rm_params, algo.rm_cfgs, rows, given)
        _, total, _ = shape_rewards(algo.terms, algo.a, {**given, **rm}, rows["lengths"], rows["ended"] > 0)
        s = algo.sizes
        keep = dynamic_sampling_keep(total.reshape(s.prompts, s.per_prompt))
        replicated = NamedSharding(algo.rt.mesh, PartitionSpec())
        return rm, jax.lax.with_sharding_constraint(keep, replicated), jax.lax.with_sharding_constraint(
            jnp.mean(total), replicated)

    def _dynamic(self, params, roles, first: np.ndarray, step: int) -> Rollout:
        algo, a, s = self.algo, self.algo.a, self.algo.sizes
        P, K = s.prompts, s.per_prompt
        rm_roles = algo.reward_roles(roles)
        buf, row_prompts, filled = None, None, 0
        drawn = dropped = rounds = 0
        reward_sum = 0.0
        for rnd in range(1 + a.max_resample_rounds):
            prompts = first if rnd == 0 else np.asarray(next(algo.train_iter)["prompt_index"])
            idx, out, given = self._one(params, prompts, step, rnd)
            rm, keep, mean = self._round(rm_roles, out, given)
            given = {**given, **rm}
            keep = _host(keep).astype(bool)
            rounds, drawn, dropped = rounds + 1, drawn + P, dropped + int((~keep).sum())
            reward_sum += float(_host(mean))
            if buf is None:
                buf, row_prompts = {"out": out, "given": given}, idx.copy()
            groups = np.flatnonzero(keep)[:P - filled]
            if rnd == 0 and len(groups) == P:  # nothing dropped: the rollout as it is
                break
            src = np.zeros(P * K, np.int32)
            take = np.zeros(P * K, bool)
            for j, g in enumerate(groups):
                slot = filled + j
                src[slot * K:(slot + 1) * K] = np.arange(g * K, (g + 1) * K)
                take[slot * K:(slot + 1) * K] = True
                row_prompts[slot * K:(slot + 1) * K] = idx[g * K:(g + 1) * K]
            if len(groups):
                buf = self._merge(buf, {"out": out, "given": given}, jnp.asarray(src), jnp.asarray(take))
            filled += len(groups)
            if filled == P:
                break
        valid = np.repeat(np.arange(P) < filled, K).astype(np.float32)
        metrics = {"dynamic_sampling/rounds": float(rounds), "dynamic_sampling/drawn_groups": float(drawn),
                   "dynamic_sampling/dropped_groups": float(dropped),
                   "dynamic_sampling/short_groups": float(P - filled),
                   "dynamic_sampling/extra_rollouts": float((rounds - 1) * P * K),
                   "dynamic_sampling/drawn_reward_mean": reward_sum / rounds}
        row_valid = None
        if filled < P:
            row_valid = jax.device_put(valid, NamedSharding(algo.rt.mesh, PartitionSpec()))
        return Rollout(buf["out"], row_prompts, buf["given"], row_valid, metrics)
