"""SteerLM 2.0 (Wang et al. 2024, "HelpSteer2", Sec. SteerLM 2.0; NeMo-Aligner's ``train_steerlm2.py``):
attribute-conditioned policy optimisation on the generate-then-train machinery (``gentrain``).

The policy Q_theta(y | a, x) starts from a SteerLM (1) run (``model.init_from``) and is trained towards
P(y | a, x) ~ P(a | x, y) P(y | x) with the weighted log-likelihood of ``jalign.losses.steer``. Per step, for
each of the P = ``train.global_batch`` (prompt, target attributes) pairs:

1. the round's generator Q' (the policy as it was when the round began; every step its own round unless
   ``steerlm2_iterations`` is set) samples K = ``num_rollouts_per_prompt`` answers to the prompt conditioned on
   the target attribute string (rendered as SteerLM 1 renders it: ``jalign.data.steer``);
2. on device: the attribute model (``roles.reward``, a regression reward-model run) scores each answer after
   the *plain* prompt (as it was trained), giving log P(a | x, y) by
   :func:`jalign.losses.gaussian_attribute_logps` (independent Gaussians of spread ``attribute_sigma``
   around its predictions, the likelihood its squared-error training implies); ``roles.prior`` gives
   log P(y | x) on the plain prompt (default: the starting SteerLM model without the attribute string; NeMo-
   Aligner uses the SFT model: ``roles.prior=run:SFT_RUN``); log Q'(y | a, x) is the sampler's own log-prob
   (at the sampling temperature: the proposal the samples were drawn from); log Q_theta(y | a, x) the current
   policy's (no gradient); the weights w', b' of :func:`jalign.losses.steerlm2_weights` per group;
3. one update on :func:`jalign.losses.steerlm2_loss` over all P x K samples.

Target attributes: ``algorithm.target_attributes`` (a list such as ``["correctness=4,verbosity=0", ...]``:
every prompt is trained under every setting), or, when it is empty, each prompt line's own ``"attributes"``
(``{"prompt": ..., "attributes": {"correctness": 4}}``; the annotated SteerLM data reads as such). Attributes a
target leaves out are not rendered and not scored. The attribute order of the string is the starting run's
(``RUN/steerlm.json``) unless ``algorithm.attributes`` says; the reward model's output names are its training
data's (sorted, as ``jalign annotate`` reads them) or ``algorithm.reward_attributes``.

Responses that did not end within ``max_new_tokens`` are left out of their group's weights
(``truncated_response: drop``; ``keep`` weighs them like the others).

Metrics: ``ess`` / ``ess_fraction`` (the weights' effective sample size per group, and as a fraction of the
group's samples), ``baseline_distance`` (KL(w' || b'), NeMo-Aligner's ``distance``), ``attribute_error``
(mean |predicted - target| of the samples over the target's attributes; ``attribute_error_<name>`` each) and
``attribute_error_weighted`` (the same under the weights w': what the target distribution expects),
``kl_to_start`` (per-sequence KL of the samples to the starting policy ``roles.reference``), ``valid_fraction``,
``ended_with_eos``, ``response_length``, ``loss``. Generation eval: ``data.eval`` prompts conditioned on each
target setting (``eval/steer_<setting>/...``), exact match, ``algorithm.eval_reward`` and the KL to the start.
"""
from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal, Optional

import jax
import jax.numpy as jnp
import numpy as np

from jalign.algorithms.base import policy_token_logps
from jalign.algorithms.gentrain import ROW_KEYS, GenTrainAlgorithm, GenTrainConfig, check_role_vocab, place_rows
from jalign.algorithms.registry import register
from jalign.config import ConfigError
from jalign.config_values import VALUE_RANGES, _AT_LEAST_1, _POSITIVE
from jalign.data.fields import PER_ROW, ROW
from jalign.data.steer import attribute_string, condition_prompt, parse_attribute_values
from jalign.losses import (gaussian_attribute_logps, group_mean_length, kl_k1, steerlm2_loss, steerlm2_weights)
from jalign.losses.ops import safe_divide
from jalign.models.heads import sequence_scores, token_logps
from jalign.roles import POLICY_INIT, RoleSpec, role_source
from jalign.rollout import experience as xp

PLAIN_KEYS = ("prompt_tokens", "prompt_positions", "prompt_segment_ids", "prompt_lengths")


@dataclass
class SteerLM2Config(GenTrainConfig):
    name: str = "steerlm2"
    # rounds over train.steps, each sampling from the policy as it was when it began (None: every step)
    steerlm2_iterations: Optional[int] = None
    num_rollouts_per_prompt: int = 4
    # settings every prompt is trained under ("correctness=4,verbosity=0"); empty: each prompt's "attributes"
    target_attributes: list[str] = field(default_factory=list)
    attributes: Optional[list[str]] = None  # order of the attribute string (None: the starting run's steerlm.json)
    reward_attributes: Optional[list[str]] = None  # names of the reward model's outputs (None: its run's data)
    attribute_sigma: float = 1.0  # spread of P(a | x, y) around the reward model's predictions
    max_value: int = 4  # attribute values are integers in [0, max_value]
    truncated_response: Literal["drop", "keep"] = "drop"  # a response without EOS: out of its group (drop) or weighed
    eval_reward: Optional[str] = None  # a rule scored on every generated eval answer (an import path)


VALUE_RANGES["SteerLM2Config"] = {"steerlm2_iterations": _AT_LEAST_1, "attribute_sigma": _POSITIVE,
                                  "max_value": _AT_LEAST_1}


def weight_source_dir(spec: str, where: str) -> Optional[Path]:
    """The directory of a ``run:`` / ``hf:`` source (None for random or policy-init)."""
    from jalign.models import load

    if not spec or spec == POLICY_INIT:
        return None
    source = load.parse_source(spec, where=where)
    return Path(source.path) if source.kind in ("run", "hf") and source.path else None


def reward_attribute_names(spec: str, where: str) -> Optional[list[str]]:
    """The output names of a regression reward model: an export's ``reward_head.json``, or a run's training
    data's attribute names, sorted (what the run and ``jalign annotate`` use)."""
    d = weight_source_dir(spec, where)
    if d is None:
        return None
    head = d / "reward_head.json"
    if head.is_file():
        return list(json.loads(head.read_text()).get("attributes") or []) or None
    if (d / "config.yaml").is_file():
        from jalign.annotate import _run_attribute_names
        from jalign.config import load_config

        run = load_config(d / "config.yaml")
        if getattr(run.algorithm, "name", None) == "reward" and getattr(run.algorithm, "loss", None) == "regression":
            return _run_attribute_names(run)
    return None


def policy_attribute_order(cfg) -> Optional[list[str]]:
    """The attribute order the starting SteerLM run recorded (``steerlm.json``), if any."""
    spec = cfg.model.init_from or cfg.model.hf_path
    d = weight_source_dir(spec, "model.init_from") if spec else None
    record = d / "steerlm.json" if d is not None else None
    return list(json.loads(record.read_text())["attributes"]) if record is not None and record.is_file() else None


@register("steerlm2", config=SteerLM2Config)
class SteerLM2(GenTrainAlgorithm):
    rounds_key = "steerlm2_iterations"
    role_names = ("reward", "prior", "reference")
    fields = {**{k: ROW for k in ROW_KEYS + ("mask",)},
              **{k: PER_ROW for k in ("w", "b", "group_length", "group_share")}}

    def __init__(self, rt):
        cfg, a = rt.cfg, rt.cfg.algorithm
        src = cfg.source or "<config>"
        if cfg.roles.get("reward") is None or cfg.roles["reward"].source is None:
            raise ConfigError(f"{src}: steerlm2 needs an attribute model: set roles.reward (a regression "
                              "reward-model run: roles.reward=run:DIR, algorithm.name: reward, loss: regression)")
        if a.top_k or a.top_p < 1.0:
            raise ConfigError(f"{src}: algorithm.top_k / algorithm.top_p truncate the proposal, whose exact "
                              "log-probs the importance weights need: leave them off (top_k: 0, top_p: 1.0)")
        self.rows_per_prompt = a.num_rollouts_per_prompt
        super().__init__(rt)  # reads the attributes (load_data -> _setup_attributes) before any weights load
        check_role_vocab(cfg, "reward")
        self.prior_cfg = self._role_cfg("prior")
        self.rule = None
        self._prepare = jax.jit(self._prepare_impl)
        self.generation_eval = self._generation_evals()

    # ---- attributes -----------------------------------------------------------------------------
    def _setup_attributes(self):
        from jalign.models import load
        from jalign.roles import _source_score_outputs

        cfg, a = self.cfg, self.a
        src = cfg.source or "<config>"
        spec = cfg.roles["reward"].source
        names = list(a.reward_attributes) if a.reward_attributes else reward_attribute_names(spec, "roles.reward")
        if not names:
            raise ConfigError(f"{src}: roles.reward={spec}: cannot tell the names of its outputs; set "
                              "algorithm.reward_attributes (e.g. [correctness, verbosity])")
        outputs = _source_score_outputs(load.parse_source(spec, where="roles.reward"), "roles.reward", "reward model")
        # (jalign plan stands in a 1-output head for a reward model that is not on the machine: not checked there)
        if outputs != len(names) and not self.rt.abstract:
            told = "algorithm.reward_attributes" if a.reward_attributes else "the reward model's training data"
            raise ConfigError(f"{src}: {told} {names} names {len(names)} attributes but roles.reward={spec} has "
                              f"num_attributes={outputs} outputs (set algorithm.reward_attributes to its "
                              f"{outputs} names, in order)")
        self.rm_names = names
        self.order = list(a.attributes) if a.attributes else (policy_attribute_order(cfg) or names)
        self.settings = [parse_attribute_values(s, where=f"{src}: algorithm.target_attributes[{i}]")
                         for i, s in enumerate(a.target_attributes)]
        for i, values in enumerate(self.settings):
            self._check_target(values, f"{src}: algorithm.target_attributes[{i}]")

    def _check_target(self, values: dict, where: str) -> str:
        """The attribute string of a target (its names known to the policy and to the reward model)."""
        missing = [k for k in values if k not in self.rm_names]
        if missing:
            raise ConfigError(f"{where}: attribute(s) {missing} are not outputs of roles.reward "
                              f"(its attributes: {self.rm_names})")
        return attribute_string(values, self.order, max_value=self.a.max_value, where=where)

    @staticmethod
    def targets(examples, spec: str, settings: list) -> list:
        """[(example, target values)]: every example under every setting, or (no settings) under its own labels."""
        if settings:
            return [(ex, s) for ex in examples for s in settings]
        out = []
        for ex in examples:
            attrs = (getattr(ex, "fields", None) or {}).get("attributes")
            if not isinstance(attrs, dict) or not attrs:
                raise ConfigError(f"{ex.source or spec}: this prompt has no \"attributes\" object (the target "
                                  "attributes); add them to the data or set algorithm.target_attributes")
            out.append((ex, {k: v for k, v in attrs.items() if v is not None}))
        return out

    def target_arrays(self, pairs, where: str) -> tuple[np.ndarray, np.ndarray]:
        """Targets [N, A] and their mask [N, A] in the reward model's output order."""
        values = np.zeros((len(pairs), len(self.rm_names)), np.float32)
        mask = np.zeros_like(values)
        for i, (ex, t) in enumerate(pairs):
            self._check_target(t, ex.source or where)
            for k, v in t.items():
                j = self.rm_names.index(k)
                values[i, j], mask[i, j] = float(v), 1.0
        return values, mask

    # ---- data -----------------------------------------------------------------------------------
    def conditioned_sets(self, spec: str, limit, settings: list):
        """(conditioned PromptSet, plain PromptSet, targets [N, A], mask [N, A]) of one split under ``settings``
        (see :meth:`targets`): the same examples in the same order (a prompt too long conditioned leaves both)."""
        from jalign.data.chat import encode_prompt
        from jalign.data.prompts import PromptSet
        from jalign.data.sources import load_source

        d = self.cfg.data
        max_prompt = d.seq_len - self.a.max_new_tokens
        if max_prompt < 1:
            raise ConfigError(f"{self.cfg.source or '<config>'}: data.seq_len={d.seq_len} leaves no room for a "
                              f"prompt before algorithm.max_new_tokens={self.a.max_new_tokens}")
        examples, skipped = load_source(spec, "prompt", d.skip_bad_lines, seed=d.seed, max_examples=limit)
        if skipped:
            self.rt.log(f"data: {spec}: skipped {len(skipped)} bad lines")
        pairs, cond, dropped = [], [], 0
        for ex, t in self.targets(examples, spec, settings):
            c = dataclasses.replace(ex, prompt=condition_prompt(ex.prompt, self._check_target(t, ex.source or spec)))
            if len(encode_prompt(c.prompt, d.chat_template, self.tokenizer)) > max_prompt:
                dropped += 1
                continue
            pairs.append((ex, t))
            cond.append(c)
        if dropped:
            self.rt.log(f"data: {spec}: dropped {dropped} conditioned prompts longer than {max_prompt} tokens")
        if not pairs:
            raise ConfigError(f"data: {spec}: no conditioned prompt fits in {max_prompt} tokens")
        values, mask = self.target_arrays(pairs, spec)
        conditioned = PromptSet(cond, self.tokenizer, d.chat_template, max_prompt, self.rt.log, spec)
        plain = PromptSet([ex for ex, _ in pairs], self.tokenizer, d.chat_template, max_prompt, self.rt.log, spec)
        if len(plain) != len(conditioned):  # a plain prompt is never longer than its conditioned form
            raise ConfigError(f"data: {spec}: a plain prompt is longer than its conditioned form")
        return conditioned, plain, values, mask

    def load_data(self):
        from jalign.data.prompts import PromptIterator

        d = self.cfg.data
        self._setup_attributes()
        self.train_prompts, self.plain_prompts, self.target_values, self.target_mask = \
            self.conditioned_sets(d.train, d.max_examples, self.settings)
        self.eval_set = None
        longest = max(self.train_prompts.longest, self.plain_prompts.longest)
        self.P, self.N = xp.rollout_shape(longest, self.response_block(), self.rt.mesh.shape["sequence"])
        if self.P + self.N > self.cfg.model.max_seq_len:
            raise ConfigError(f"prompt ({self.P}) + response block ({self.N}) exceeds model.max_seq_len="
                              f"{self.cfg.model.max_seq_len}")
        self.train_iter = PromptIterator(len(self.train_prompts), self.sizes.prompts, d.seed, d.shuffle)

    def _role_cfg(self, name: str):
        """The architecture a role runs with (the policy's under policy-init); it must share the vocabulary."""
        key, spec = role_source(self.cfg, name, self.frozen_roles()[name])
        if spec == POLICY_INIT:
            return self.cfg.model
        return check_role_vocab(self.cfg, name)

    # ---- roles ----------------------------------------------------------------------------------
    def frozen_roles(self):
        return {"reward": RoleSpec(source=None, lm_head=False, score_outputs=-1, what="attribute model"),
                "prior": RoleSpec(what="unconditioned response model P(y|x)"),
                "reference": RoleSpec(what="starting policy (the KL to the start)")}

    # ---- one step -------------------------------------------------------------------------------
    def plain_block(self, row_prompts) -> dict:
        """The plain (unconditioned) prompts of the rollout's rows, left-padded into its prompt block, on device."""
        from jalign.generate import prepare_prompts

        ids = [self.plain_prompts.ids[i] for i in row_prompts]
        arrays = prepare_prompts(ids, pad_id=self.tokenizer.pad_id, batch=len(ids), length=self.P)
        return {k: place_rows(v, self.rt.mesh, self.rt.rules) for k, v in zip(PLAIN_KEYS, arrays)}

    def prepare(self, state, roles, batch, out) -> tuple:
        """(the update's batch [accum, micro, ...], metrics) of a rollout: the weights of every sample."""
        idx = self.row_prompts(batch)
        plain = self.plain_block(idx)
        mesh, rules = self.rt.mesh, self.rt.rules
        target, tmask = (place_rows(x[idx], mesh, rules) for x in (self.target_values, self.target_mask))
        names = [n for n in ("reward", "prior", "reference") if n in roles]
        policy = self.forward_params(state.params, roles)
        return self._prepare(roles.on_device(names), policy, out, plain, target, tmask)

    def learn(self, state, roles, batch, out):
        train, metrics = self.prepare(state, roles, batch, out)
        self.log_rollouts(batch, out, train)
        state, m = self.update(state, roles, train)
        return state, {**metrics, **m}

    def _prepare_impl(self, roles, policy, out, plain, target, tmask):
        a, s, pad = self.a, self.sizes, self.tokenizer.pad_id
        rows = xp.rollout_rows(out, pad)  # the conditioned prompt + the sample: what the policy sees
        prows = xp.rollout_rows({**out, **plain}, pad)  # the plain prompt + the same sample

        def seq(lp, r):
            return jnp.sum(jnp.where(r["mask"] > 0, lp, 0.0), -1)

        pred = sequence_scores(roles["reward"], prows["tokens"], prows["positions"], prows["segment_ids"],
                               self.rm_cfg).astype(jnp.float32)
        log_attr = gaussian_attribute_logps(pred, target, tmask, a.attribute_sigma)
        prior = seq(token_logps(roles["prior"], prows, self.prior_cfg), prows)
        proposal = seq(rows["sampler_logps"], rows)
        current = seq(token_logps(policy, rows, self.cfg.model), rows)
        valid = rows["ended"] if a.truncated_response == "drop" else jnp.ones_like(rows["ended"])
        group = lambda x: x.reshape((s.prompts, s.per_prompt) + x.shape[1:])  # noqa: E731
        w, b, metrics = steerlm2_weights(group(log_attr), group(prior), group(proposal), group(current), group(valid))
        glen = group_mean_length(group(rows["mask"]), group(valid))
        share = safe_divide(group(valid), jnp.sum(group(valid), -1, keepdims=True))
        train = {k: rows[k] for k in ROW_KEYS + ("mask",)}
        train.update(w=w.reshape(-1), b=b.reshape(-1), group_length=glen.reshape(-1), group_share=share.reshape(-1))

        err = jnp.abs(pred - target) * tmask  # [B, A]
        row_err = safe_divide(jnp.sum(err, -1), jnp.sum(tmask, -1))
        n_valid, n_groups = jnp.sum(valid), jnp.sum(share)
        metrics.update(attribute_error=safe_divide(jnp.sum(row_err * valid), n_valid),
                       attribute_error_weighted=safe_divide(jnp.sum(row_err * w.reshape(-1)), n_groups),
                       valid_fraction=n_valid / s.rollout, ended_with_eos=jnp.mean(rows["ended"]),
                       response_length=jnp.mean(rows["lengths"].astype(jnp.float32)))
        for j, name in enumerate(self.rm_names):
            if self.target_mask[:, j].any():
                metrics[f"attribute_error_{name}"] = safe_divide(jnp.sum(err[:, j] * valid),
                                                                 jnp.sum(tmask[:, j] * valid))
        if "reference" in roles:
            ref = token_logps(roles["reference"], rows, self.cfg.model, a.temperature)
            metrics["kl_to_start"] = jnp.mean(jnp.sum(kl_k1(rows["sampler_logps"], ref, rows["mask"]), -1))
        return self.to_train_batch(train), metrics

    def loss(self, params, mb, norms, roles):
        logps = policy_token_logps(params, mb, self.cfg.model)
        loss, m = steerlm2_loss(logps, mb["mask"], mb["w"], mb["b"], mb["group_length"], norms["num_groups"])
        return loss, {**m, "num_tokens": jnp.sum(mb["mask"])}  # summed over micro-batches: the step's tokens

    @staticmethod
    def normalizers(batch):
        return {"num_groups": jnp.sum(batch["group_share"])}

    # ---- the attribute record (``jalign generate --attributes`` renders the string as training did) -----
    def record(self) -> dict:
        return {"attributes": list(self.order), "max_value": self.a.max_value,
                "chat_template": self.cfg.data.chat_template}

    def _write_record(self, directory) -> None:
        from jalign.algorithms.steerlm import RECORD

        if jax.process_index() == 0:
            Path(directory).mkdir(parents=True, exist_ok=True)
            (Path(directory) / RECORD).write_text(json.dumps(self.record()))

    def start(self, state, roles):
        super().start(state, roles)
        self._write_record(self.rt.run_dir)

    def export(self, state, roles, out_dir):
        super().export(state, roles, out_dir)
        self._write_record(out_dir)

    # ---- evaluation and plan --------------------------------------------------------------------
    def _generation_evals(self):
        from jalign.algorithms.steerlm import SteeredEvals, eval_reward_fn, setting_name
        from jalign.evaluation import GenerationEval

        d, e = self.cfg.data, self.cfg.eval
        if not d.eval or e.prompts <= 0:
            return None
        reward_fn = eval_reward_fn(self.cfg, self.a)
        settings = self.settings or [None]  # None: the eval prompts under their own labels
        evals = []
        for values in settings[:1] if self.rt.abstract else settings:
            cond = self.conditioned_sets(d.eval, e.prompts, [values] if values is not None else [])[0]
            evals.append((setting_name(values) if values is not None else "",
                          GenerationEval(self.rt, self.tokenizer, cond, reward_fn=reward_fn, kl_role="reference")))
        return evals[0][1] if self.rt.abstract else SteeredEvals(evals)

    def plan_prepare_args(self, roles: dict):
        """For ``jalign plan``: (out -> abstract arguments of the preparation, the roles it reads)."""
        from jalign.algorithms.base import field_sharding

        names = [n for n in ("reward", "prior", "reference") if n in roles]
        policy = self.forward_params(self.abstract_state().params, roles)
        B, A = self.sizes.rollout, len(self.rm_names)

        def rows(shape, dtype):
            return jax.ShapeDtypeStruct(shape, dtype, sharding=field_sharding(
                self.rt.mesh, self.rt.rules, ("batch",) + (None,) * (len(shape) - 1), leading_accum=False))

        plain = {k: rows((B, self.P) if k != "prompt_lengths" else (B,), jnp.int32) for k in PLAIN_KEYS}
        return (lambda out: ({n: roles[n] for n in names}, policy, out, plain, rows((B, A), jnp.float32),
                             rows((B, A), jnp.float32))), names
