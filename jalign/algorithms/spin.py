"""SPIN, Self-Play fIne-tuNing: the policy learns to tell the SFT data's gold responses from its opponent's.

Chen et al. 2024, "Self-Play Fine-Tuning Converts Weak Language Models to Strong Language Models" (Sec. 4,
Algorithm 1); NeMo-Aligner's ``spin``. Iteration t (``spin_iterations`` rounds over ``train.steps``): the
opponent, the policy as it was at the end of iteration t-1 (round 0: the starting policy), is a frozen role
rebuilt from the policy when the round begins (``jalign.roles.snapshot``: bit-identical, never trained); for
each step's P SFT prompts it generates a response y', and the loss is :func:`jalign.losses.spin_loss`

    L = mean_i l( lam log[pi(y_i|x_i) / pi_t(y_i|x_i)] - lam log[pi(y'_i|x_i) / pi_t(y'_i|x_i)] ),  l(z) = log(1+e^-z)

with y the gold response and pi_t the opponent (whose log-probs of both sides are computed when the pairs are
built). Gold and generation are one pair [P, 2, T] built on device in the rollout layout (side 0 gold, 1 the
opponent's). A generation identical to the gold response carries nothing to contrast and is masked out of
L_SPIN (``identical_fraction``). ``sft_weight`` > 0 adds ``sft_weight`` x the token-mean NLL of every gold
response, those of identical pairs too: SFT on the same data plus L_SPIN, so a comparison with SFT on that
data isolates the SPIN term. That is an extension (the NLL anchor of RPO, Pang et al. 2024, "Iterative
Reasoning Preference Optimization"); neither the SPIN paper nor NeMo-Aligner has it. ``data.train`` is SFT
data (``{"prompt","response"}`` or conversations); the response block holds the longest gold response (and
``max_new_tokens`` for the generation). Under ``model.lora`` the opponent is the frozen base with a snapshot
of the previous iterate's adapters (``jalign.algorithms.gentrain``).
"""
from __future__ import annotations

from dataclasses import dataclass

import jax
import jax.numpy as jnp
import numpy as np

from jalign.algorithms.dpo import pair_sequence_logps
from jalign.algorithms.gentrain import ROW_KEYS, GenTrainAlgorithm, GenTrainConfig, place_rows
from jalign.algorithms.online_dpo import pair_normalizers
from jalign.algorithms.registry import register
from jalign.algorithms.reward import pair_valid, unstack_pairs
from jalign.config import ConfigError
from jalign.config_values import VALUE_RANGES, _AT_LEAST_1, _NON_NEGATIVE, _POSITIVE
from jalign.data import fields
from jalign.losses import dpo_sft_term, spin_loss
from jalign.rollout import experience as xp

SPIN_FIELDS = {**{k: fields.PAIR_ROW for k in ROW_KEYS + ("loss_mask",)}, "valid": fields.PER_ROW,
               "ref_logps": fields.PER_PAIR_SIDE}


@dataclass
class SPINConfig(GenTrainConfig):
    name: str = "spin"
    spin_iterations: int = 1  # rounds over train.steps; each rebuilds the opponent from the previous iterate
    lam: float = 0.1  # lambda of L_SPIN (NeMo-Aligner's ref_policy_kl_penalty)
    # + sft_weight x token-mean NLL of every gold response (not in the paper or NeMo-Aligner:
    # the NLL anchor of RPO / TRL's rpo_alpha, which keeps the gold answers' likelihood from falling with the
    # generations' -- what pure L_SPIN did on the tiny task)
    sft_weight: float = 0.0


VALUE_RANGES.setdefault("SPINConfig", {"spin_iterations": _AT_LEAST_1, "lam": _POSITIVE, "sft_weight": _NON_NEGATIVE})


def stack_sides(gold: dict, generated: dict) -> dict:
    """Two sets of rows [P, S] -> pairs [P, 2, S] (side 0 gold, 1 generated), ``mask`` as ``loss_mask``."""
    pairs = {k: jnp.stack([gold[k], generated[k]], axis=1) for k in ROW_KEYS}
    pairs["loss_mask"] = jnp.stack([gold["mask"], generated["mask"]], axis=1)
    return pairs


def identical_sides(pairs: dict):
    """[P] 1 where both sides are the same tokens at the same places."""
    t, s = pairs["tokens"], pairs["segment_ids"]
    return jnp.all((t[:, 0] == t[:, 1]) & (s[:, 0] == s[:, 1]), axis=-1).astype(jnp.float32)


@register("spin", config=SPINConfig)
class SPIN(GenTrainAlgorithm):
    rounds_key = "spin_iterations"
    prompt_kind = "sft"
    fields = SPIN_FIELDS

    def __init__(self, rt):
        if rt.cfg.algorithm.num_rollouts_per_prompt != 1:
            raise ConfigError(f"{rt.cfg.source or '<config>'}: algorithm.num_rollouts_per_prompt="
                              f"{rt.cfg.algorithm.num_rollouts_per_prompt}: SPIN pairs each gold response with one "
                              "generation of the opponent; leave it at 1")
        super().__init__(rt)
        self._prepare = jax.jit(self._prepare_impl)
        self.generation_eval = self.generation_eval_for(reward=False)

    def response_block(self) -> int:
        from jalign.data.chat import encode_pair

        d, prompts = self.cfg.data, self.train_prompts
        self.gold = []
        for i, ex in enumerate(prompts.examples):
            p_ids, r_ids = encode_pair(ex.prompt, ex.answer, d.chat_template, self.tokenizer)
            if list(p_ids) != list(prompts.ids[i]):
                raise ConfigError(f"data.train={d.train}: {ex.source}: the chat template renders the prompt of an "
                                  "SFT example differently from its generation prompt; SPIN needs them equal")
            self.gold.append(np.asarray(r_ids, np.int32))
        longest = max(map(len, self.gold))
        if prompts.longest + longest > d.seq_len:
            raise ConfigError(f"data.seq_len={d.seq_len}: the longest prompt ({prompts.longest} tokens) and the "
                              f"longest gold response ({longest}) do not fit; raise data.seq_len")
        return max(self.a.max_new_tokens, longest)

    def iterate_roles(self):
        return ("opponent",)

    def generator(self, state, roles):
        return roles["opponent"], self.gen_cfg

    def gold_responses(self, batch) -> tuple[np.ndarray, np.ndarray]:
        """The step's gold responses in the response block: tokens [P, N] (pad after the end), lengths [P]."""
        idx = np.asarray(batch["prompt_index"])
        tokens = np.full((len(idx), self.N), self.tokenizer.pad_id, np.int32)
        lengths = np.zeros(len(idx), np.int32)
        for row, i in enumerate(idx):
            g = self.gold[i]
            tokens[row, :len(g)] = g
            lengths[row] = len(g)
        return tokens, lengths

    def learn(self, state, roles, batch, out):
        tokens, lengths = self.gold_responses(batch)
        mesh, rules = self.rt.mesh, self.rt.rules
        train, metrics = self._prepare(roles["opponent"], out, place_rows(tokens, mesh, rules),
                                       place_rows(lengths, mesh, rules))
        self.log_rollouts(batch, out, train)
        state, m = self.update(state, roles, train)
        return state, {**metrics, **m}

    def _prepare_impl(self, opponent, out, gold_tokens, gold_lengths):
        pad = self.tokenizer.pad_id
        generated = xp.rollout_rows(out, pad)
        gold = xp.rollout_rows(dict(out, tokens=gold_tokens, lengths=gold_lengths,
                                    ended_with_eos=jnp.ones_like(out["ended_with_eos"]),
                                    logprobs_tempered=jnp.zeros_like(out["logprobs_tempered"])), pad)
        pairs = stack_sides(gold, generated)
        same = identical_sides(pairs)
        ref, _, _ = pair_sequence_logps(opponent, pairs, self.cfg.model)
        pairs.update(valid=1.0 - same, ref_logps=jax.lax.stop_gradient(ref))
        metrics = {"identical_fraction": jnp.mean(same), "ended_with_eos": jnp.mean(generated["ended"]),
                   "response_length": jnp.mean(generated["lengths"].astype(jnp.float32)),
                   "opponent_logp_gold": jnp.mean(ref[:, 0]), "opponent_logp_generated": jnp.mean(ref[:, 1])}
        return self.to_train_batch(pairs), metrics

    def loss(self, params, mb, norms, roles):
        sums, lp, mask = pair_sequence_logps(params, mb, self.cfg.model)
        v = pair_valid(mb)
        loss, m = spin_loss(sums[:, 0], sums[:, 1], mb["ref_logps"][:, 0], mb["ref_logps"][:, 1], v,
                            norms["num_pairs"], lam=self.a.lam)
        pair_tokens = jnp.sum(mb["loss_mask"], axis=-1)  # [b, 2]
        m = dict(m, num_tokens=jnp.sum(v * jnp.sum(pair_tokens, -1)))
        if self.a.sft_weight:  # SFT on every gold response (an identical pair still has a gold answer to learn)
            (lp_gold, _), (mask_gold, _) = unstack_pairs(lp), unstack_pairs(mask)
            sft, _ = dpo_sft_term(lp_gold, mask_gold, norms["num_gold_tokens"])
            loss = loss + self.a.sft_weight * sft
            m.update(loss=loss, spin_loss=m["loss"], sft_loss=sft,
                     num_tokens=m["num_tokens"] + jnp.sum((1.0 - v) * pair_tokens[:, 0]))
        return loss, m

    @staticmethod
    def normalizers(batch):
        return dict(pair_normalizers(batch), num_gold_tokens=jnp.sum(batch["loss_mask"][..., 0, :]))

    def empty_reason(self, metrics):
        return ("every opponent generation equals its gold response, so no pair has two sides (identical_fraction "
                f"{float(metrics.get('identical_fraction', 1)):.2f}): sample at a higher algorithm.temperature")
