"""On-policy distillation (GKD / OPD): the student samples, a frozen teacher scores the student's tokens.

Agarwal et al. 2024, "On-Policy Distillation of Language Models: Learning from Self-Generated Mistakes" (GKD);
Gu et al. 2024, "MiniLLM" (reverse-KL policy gradient); Lu et al. 2025, "On-Policy Distillation" (Thinking
Machines; per-token reverse KL as the advantage). Per step each of the P prompts is answered
``num_rollouts_per_prompt`` times by the student (the policy), and on the positions whose target is a sampled
response token the student minimises, token mean over the step's response tokens:

* ``loss: reverse_kl`` -- the sampled per-token reverse KL in its policy-gradient form,
  :func:`jalign.losses.reverse_kl_distill_loss` (only the teacher's log-probs of the sampled tokens are needed:
  computed once per step, when the rows are built);
* ``loss: jsd`` -- the generalised Jensen-Shannon divergence over the whole vocabulary,
  :func:`jalign.losses.generalized_jsd_loss` (``beta`` 0: forward KL(teacher || student), 1: reverse KL); the
  teacher's forward pass runs inside the loss, chunked, its vocabulary never gathered.

``sampler: teacher`` samples from the teacher instead (sequence-level KD, "SeqKD", the off-policy baseline of
GKD with the same compute; only ``loss: jsd`` is a valid objective on the teacher's samples). The teacher
(``roles.teacher``: ``run:DIR`` or ``hf:DIR``) may be of another size but must share the tokenizer. The eval KL
(``eval/kl``) is the student's to the teacher on held-out prompts.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Literal

import jax
import jax.numpy as jnp

from jalign.algorithms.base import policy_token_logps
from jalign.algorithms.gentrain import ROW_KEYS, GenTrainAlgorithm, GenTrainConfig, check_role_vocab
from jalign.algorithms.registry import register
from jalign.config import ConfigError
from jalign.config_values import VALUE_RANGES, _POSITIVE, _Range
from jalign.data.fields import ROW
from jalign.losses import generalized_jsd_loss, reverse_kl_distill_loss
from jalign.models import transformer as tfm
from jalign.models.heads import token_logps
from jalign.roles import RoleSpec
from jalign.rollout import experience as xp


@dataclass
class OPDConfig(GenTrainConfig):
    name: str = "opd"
    loss: Literal["reverse_kl", "jsd"] = "reverse_kl"
    beta: float = 0.5  # jsd: the mixture weight (0 forward KL, 1 reverse KL)
    distill_temperature: float = 1.0  # jsd: both distributions at this temperature
    sampler: Literal["student", "teacher"] = "student"  # teacher: sequence-level KD (the off-policy baseline)


VALUE_RANGES.setdefault("OPDConfig", {"beta": _Range(0, 1), "distill_temperature": _POSITIVE})


@register("opd", config=OPDConfig)
class OnPolicyDistillation(GenTrainAlgorithm):
    role_names = ("teacher",)

    def __init__(self, rt):
        cfg, a, src = rt.cfg, rt.cfg.algorithm, rt.cfg.source or "<config>"
        if "teacher" not in cfg.roles:
            raise ConfigError(f"{src}: on-policy distillation needs a teacher: set roles.teacher (run:DIR or hf:DIR)")
        if a.sampler == "teacher" and a.loss == "reverse_kl":
            raise ConfigError(f"{src}: algorithm.loss=reverse_kl is a policy gradient on the student's own samples; "
                              "with algorithm.sampler=teacher use loss: jsd")
        self.teacher_cfg = check_role_vocab(cfg, "teacher")
        self.step_roles = ("teacher",) if a.loss == "jsd" else ()
        self.fields = {k: ROW for k in ROW_KEYS + ("mask",) + (("teacher_logps",) if a.loss == "reverse_kl" else ())}
        super().__init__(rt)
        self._prepare = jax.jit(self._prepare_impl)
        self.generation_eval = self.generation_eval_for(reward=False, kl_role="teacher")

    def frozen_roles(self):
        return {"teacher": RoleSpec(source=None, what="teacher")}

    def generator(self, state, roles):
        if self.a.sampler == "teacher":
            return roles["teacher"], dataclasses.replace(self.teacher_cfg, init_from=None, hf_path=None)
        return super().generator(state, roles)

    def learn(self, state, roles, batch, out):
        teacher = roles.on_device(["teacher"])["teacher"] if self.a.loss == "reverse_kl" else None
        train, metrics = self._prepare(teacher, out)
        self.log_rollouts(batch, out, train)
        state, m = self.update(state, roles, train)
        return state, {**metrics, **m}

    def _prepare_impl(self, teacher, out):
        rows = xp.rollout_rows(out, self.tokenizer.pad_id)
        train = {k: rows[k] for k in ROW_KEYS + ("mask",)}
        if teacher is not None:
            train["teacher_logps"] = jax.lax.stop_gradient(token_logps(teacher, rows, self.teacher_cfg))
        metrics = {"ended_with_eos": jnp.mean(rows["ended"]),
                   "response_length": jnp.mean(rows["lengths"].astype(jnp.float32))}
        return self.to_train_batch(train), metrics

    def loss(self, params, mb, norms, roles):
        a, cfg = self.a, self.cfg.model
        if a.loss == "reverse_kl":
            logps = policy_token_logps(params, mb, cfg)
            loss, m = reverse_kl_distill_loss(logps, mb["teacher_logps"], mb["mask"], norms["num_tokens"])
            return loss, {"loss": loss, "reverse_kl": m["reverse_kl"], "num_tokens": m["num_tokens"]}
        teacher, tcfg = roles["teacher"], self.teacher_cfg
        hs = tfm.forward(params, mb["tokens"], mb["positions"], mb["segment_ids"], cfg)
        ht = tfm.forward(teacher, mb["tokens"], mb["positions"], mb["segment_ids"], tcfg)
        loss, m = generalized_jsd_loss(hs, tfm.unembed_matrix(params, cfg), ht, tfm.unembed_matrix(teacher, tcfg),
                                       mb["mask"], norms["num_tokens"], beta=a.beta,
                                       temperature=a.distill_temperature)
        return loss, {"loss": loss, "jsd": m["jsd"], "num_tokens": m["num_tokens"]}

    @staticmethod
    def normalizers(batch):
        return {"num_tokens": jnp.sum(batch["mask"])}
