"""What the RL algorithms (PPO, GRPO, RLOO) share besides the loop: prompt data, size checks, reward
sources (rule-based or a trained reward model), the rollout -> token-array layout and log-probs.

Rollout layout. Row r of a rollout batch holds prompt ``r // K`` (K = samples per prompt) followed by
its sampled response, right-padded to a fixed length S:

    tokens     p0 p1 p2 y0 y1 y2 <eos> pad ...       segment_ids 1 ... 1 0 ...   positions 0 1 2 ...
    targets    p1 p2 y0 y1 y2 <eos> pad ...
    mask        0  0  1  1  1   1    0  ...          (1 where the *target* is a response token)

so log-probs, values, KL and advantages all live on the positions whose target is a response token,
and the sequence reward sits on the last of them (``token_rewards``).
"""
from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Optional

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding

from jalign.config import ConfigError, Config
from jalign.losses import chunked_token_logps
from jalign.models import params as params_lib
from jalign.models import transformer as tfm
from sharding.rules import logical_to_spec

LOGPROB_CHUNK = 512


# ---- sizes --------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class Sizes:
    prompts: int  # P prompts per step (train.global_batch)
    per_prompt: int  # K samples per prompt
    rollout: int  # N = P * K rows per step
    minibatch: int  # M rows per optimizer update
    micro: int  # rows per accumulation step
    data_parallel: int

    @property
    def minibatches(self) -> int:
        return self.rollout // self.minibatch

    @property
    def accum(self) -> int:
        return self.minibatch // self.micro


def check_sizes(cfg: Config, mesh, min_per_prompt: int = 1) -> Sizes:
    """Every divisibility the RL step relies on, checked before any compile; errors name the keys."""
    a, src = cfg.algorithm, cfg.source or "<config>"
    P, K = cfg.train.global_batch, a.num_rollouts_per_prompt
    dp = mesh.shape["data"] * mesh.shape["fsdp"]
    if K < min_per_prompt:
        raise ConfigError(f"{src}: algorithm.num_rollouts_per_prompt={K}: {a.name} needs at least "
                          f"{min_per_prompt} samples per prompt (its baseline compares samples of one prompt)")
    N = P * K
    M = a.minibatch_size or N
    mu = a.micro_batch_size or M
    if cfg.train.micro_batch is not None:
        raise ConfigError(f"{src}: train.micro_batch is not used by {a.name}; set algorithm.minibatch_size "
                          "(rows per update) and algorithm.micro_batch_size (rows per accumulation step)")
    if M <= 0 or mu <= 0 or N % M:
        raise ConfigError(f"{src}: algorithm.minibatch_size={M} does not divide the rollout batch of "
                          f"train.global_batch x algorithm.num_rollouts_per_prompt = {P} x {K} = {N} samples")
    if M % mu:
        raise ConfigError(f"{src}: algorithm.micro_batch_size={mu} does not divide algorithm.minibatch_size={M}")
    if mu % dp:
        raise ConfigError(f"{src}: algorithm.micro_batch_size={mu} (rows per accumulation step; default the "
                          f"minibatch size) is not divisible by the data-parallel size mesh.data*mesh.fsdp = {dp}")
    if a.ppo_epochs < 1:
        raise ConfigError(f"{src}: algorithm.ppo_epochs must be >= 1, got {a.ppo_epochs}")
    if a.max_new_tokens < 1:
        raise ConfigError(f"{src}: algorithm.max_new_tokens must be >= 1, got {a.max_new_tokens}")
    if (a.reward_model is None) == (a.reward_fn is None):
        raise ConfigError(f"{src}: set exactly one of algorithm.reward_model (a reward-model run dir) and "
                          f"algorithm.reward_fn (a rule-based reward, e.g. exact_match)")
    if a.temperature <= 0:
        raise ConfigError(f"{src}: algorithm.temperature must be > 0 for RL sampling, got {a.temperature}")
    if a.reward_scale <= 0 or (a.reward_clip is not None and a.reward_clip <= 0):
        raise ConfigError(f"{src}: algorithm.reward_scale and algorithm.reward_clip must be > 0, got "
                          f"{a.reward_scale} and {a.reward_clip}")
    return Sizes(P, K, N, M, mu, dp)


def standardize_reward(score, offset: float, scale: float, clip: Optional[float]):
    """``clip((score - offset) / scale, -clip, clip)`` (no clipping when ``clip`` is None)."""
    score = (score - offset) / scale
    return score if clip is None else jnp.clip(score, -clip, clip)


# ---- prompts ------------------------------------------------------------------------------------
def prompt_text(prompt) -> str:
    """The text a rule-based reward sees: the prompt string, or the last user message's content."""
    if isinstance(prompt, str):
        return prompt
    users = [m["content"] for m in prompt if m.get("role") == "user"]
    return users[-1] if users else ""


class PromptSet:
    """Encoded prompts (ids, text, reference answer) of one split."""

    def __init__(self, examples, tokenizer, template, max_prompt_len: int, log=print, spec: str = ""):
        from jalign.data.chat import encode_prompt

        self.ids, self.texts, self.answers = [], [], []
        dropped = 0
        for ex in examples:
            ids = encode_prompt(ex.prompt, template, tokenizer)
            if len(ids) > max_prompt_len:
                dropped += 1
                continue
            self.ids.append(ids)
            self.texts.append(prompt_text(ex.prompt))
            self.answers.append(ex.answer)
        if dropped:
            log(f"data: {spec}: dropped {dropped} prompts longer than {max_prompt_len} tokens "
                "(data.seq_len - algorithm.max_new_tokens)")
        if not self.ids:
            raise ConfigError(f"data: {spec}: no prompt fits in {max_prompt_len} tokens")

    def __len__(self):
        return len(self.ids)

    @property
    def longest(self) -> int:
        return max(map(len, self.ids))


class PromptIterator:
    """Checkpointable stream of global prompt indices: ``next() -> {"prompt_index": int32[P]}``.

    Every process gets the same indices (generation runs on the same prompts everywhere); the order is
    a fresh permutation per epoch from ``(seed, epoch)``. State ``{"epoch", "pos"}`` is JSON.
    """

    def __init__(self, n: int, batch: int, seed: int, shuffle: bool = True):
        self.n, self.batch, self.seed, self.shuffle = n, batch, seed, shuffle
        self.epoch, self.pos = 0, 0

    def _order(self, epoch):
        return np.random.default_rng([self.seed, epoch]).permutation(self.n) if self.shuffle else np.arange(self.n)

    def __iter__(self):
        return self

    def __next__(self):
        out = []
        while len(out) < self.batch:
            order = self._order(self.epoch)
            take = order[self.pos:self.pos + self.batch - len(out)]
            out.extend(int(i) for i in take)
            self.pos += len(take)
            if self.pos >= self.n:
                self.epoch, self.pos = self.epoch + 1, 0
        return {"prompt_index": np.asarray(out, np.int32)}

    def get_state(self) -> dict:
        return {"epoch": self.epoch, "pos": self.pos}

    def set_state(self, state: dict) -> None:
        self.epoch, self.pos = int(state["epoch"]), int(state["pos"])


# ---- rollout arrays -----------------------------------------------------------------------------
def round_up(n: int, m: int) -> int:
    return -(-n // m) * m


def build_rows(prompts: list, responses: np.ndarray, lengths: np.ndarray, gen_logps: np.ndarray, S: int,
               pad_id: int) -> dict:
    """Prompt + response rows [N, S] in the layout of the module docstring (numpy, host)."""
    N = len(prompts)
    tokens = np.full((N, S), pad_id, np.int32)
    targets = np.full((N, S), pad_id, np.int32)
    positions = np.zeros((N, S), np.int32)
    seg = np.zeros((N, S), np.int32)
    mask = np.zeros((N, S), np.float32)
    glp = np.zeros((N, S), np.float32)
    for r in range(N):
        p, L = prompts[r], int(lengths[r])
        seq = np.concatenate([np.asarray(p, np.int32), responses[r, :L].astype(np.int32)])
        n = len(seq)
        if n > S:
            raise ValueError(f"rollout row {r}: {n} tokens exceed the row length {S}")
        tokens[r, :n] = seq
        targets[r, :n - 1] = seq[1:]
        positions[r, :n] = np.arange(n)
        seg[r, :n] = 1
        mask[r, len(p) - 1:len(p) - 1 + L] = 1.0
        glp[r, len(p) - 1:len(p) - 1 + L] = gen_logps[r, :L]
    return {"tokens": tokens, "targets": targets, "positions": positions, "segment_ids": seg, "mask": mask,
            "gen_logps": glp}


def rows_sharding(mesh, rules, ndim: int) -> NamedSharding:
    """[N, S, ...] rows over the data-parallel axes, S over "sequence"."""
    axes = ("batch", "seq", None, None)[:ndim]
    return NamedSharding(mesh, logical_to_spec(axes, rules))


def put_rows(host: dict, mesh, rules) -> dict:
    """Host numpy arrays holding the *global* rows (identical on every process) -> global jax arrays."""
    out = {}
    for k, v in host.items():
        v = np.asarray(v)
        out[k] = jax.make_array_from_callback(v.shape, rows_sharding(mesh, rules, v.ndim), lambda i, v=v: v[i])
    return out


# ---- model pieces -------------------------------------------------------------------------------
def token_logps_entropy(params, rows, cfg, temperature: float):
    """(log softmax(z/T)[target], entropy of softmax(z/T)) at every position: [B, S] each."""
    hidden = tfm.forward(params, rows["tokens"], rows["positions"], rows["segment_ids"], cfg)
    return chunked_token_logps(hidden, tfm.unembed_matrix(params, cfg), rows["targets"], LOGPROB_CHUNK,
                               temperature, return_entropy=True)


def token_logps(params, rows, cfg, temperature: float):
    """log softmax(z/T)[target] at every position [B, S] (no entropy)."""
    hidden = tfm.forward(params, rows["tokens"], rows["positions"], rows["segment_ids"], cfg)
    return chunked_token_logps(hidden, tfm.unembed_matrix(params, cfg), rows["targets"], LOGPROB_CHUNK, temperature)


def critic_values(params, rows, cfg):
    """V(s_t) [B, S]: the value head on the hidden state of position t (which predicts target t)."""
    hidden = tfm.forward(params, rows["tokens"], rows["positions"], rows["segment_ids"], cfg)
    return tfm.score_head(params, hidden)[..., 0]


def _local_reward_scores(params, tokens, positions, segment_ids, cfg):
    """[B, A] reward-model scores read at each row's last valid token (segment_ids > 0)."""
    hidden = tfm.forward(params, tokens, positions, segment_ids, cfg)
    scores = tfm.score_head(params, hidden)  # [B, T, A]
    idx = jnp.arange(tokens.shape[1])
    last = jnp.max(jnp.where(segment_ids > 0, idx, -1), axis=-1)
    return jnp.take_along_axis(scores, jnp.maximum(last, 0)[:, None, None], axis=1)[:, 0]


try:  # the reward-model algorithm's own scorer, when present
    from jalign.algorithms.reward import reward_scores
except ImportError:  # pragma: no cover - depends on the concurrent reward.py
    reward_scores = _local_reward_scores


def run_model_config(run_dir: str):
    """The ``model`` section of a jalign run directory's resolved ``config.yaml``."""
    from jalign.config import load_config

    path = Path(run_dir) / "config.yaml"
    if not path.is_file():
        raise ConfigError(f"{run_dir}: not a jalign run directory (no config.yaml)")
    return load_config(path).model


def load_scored_model(run_dir: str, rt, rng, log=print, fallback_cfg=None, what: str = "reward model"):
    """(params, model cfg) of a trunk + score head from a run dir; the head must exist for a reward model."""
    from jalign.algorithms.base import merge_params
    from jalign.checkpoint import load_params

    cfg = fallback_cfg if fallback_cfg is not None and not (Path(run_dir) / "config.yaml").is_file() \
        else run_model_config(run_dir)
    source = load_params(run_dir)
    if what == "reward model" and "score" not in source:
        raise ConfigError(f"{run_dir}: has no score head: not a reward-model run (algorithm.reward_model)")
    outputs = int(source["score"].shape[-1]) if what == "reward model" else 1
    decls = tfm.declare_params(cfg, lm_head=False, score_outputs=outputs)
    return merge_params(decls, source, rng, rt.mesh, rt.rules, params_lib.DTYPES[cfg.param_dtype], log), cfg


def decode_responses(tokenizer, responses: np.ndarray, lengths: np.ndarray, ended: np.ndarray) -> list[str]:
    """Response texts without the end token. Ids the tokenizer does not know (a model's vocabulary is
    often padded beyond the tokenizer's) are dropped rather than failing the rollout."""
    out, V = [], getattr(tokenizer, "vocab_size", None)
    for row, n, e in zip(responses, lengths, ended):
        n = int(n) - int(bool(e))
        out.append(tokenizer.decode([int(t) for t in row[:n] if V is None or 0 <= int(t) < V]))
    return out


class RuleReward:
    """Host-side rule-based reward over decoded responses (``jalign.rewards``)."""

    def __init__(self, name: str, tokenizer):
        from jalign.rewards import get_reward

        self.fn, self.tokenizer = get_reward(name), tokenizer

    def __call__(self, texts: list[str], answers: list, responses: list[str]) -> np.ndarray:
        return np.asarray([self.fn(p, r, a) for p, a, r in zip(texts, answers, responses)], np.float32)
