"""The programs of a generate-then-train run (``jalign.algorithms.gentrain``: rs, online_dpo, spin, opd,
steerlm2) for ``jalign plan``, built from the algorithm's own jitted functions and abstract arguments:

    rollout     the generator (the policy, the round's snapshot of it, or a teacher) samples K answers to each of
                the P prompts (``rollout.experience.sample``; under ``rollout.engine`` the plan expands it into
                the engine's refill and decode, ``abstract.engine_programs``)
    prepare     the algorithm's jitted preparation: rollout rows, scores by its roles (reward model, reference,
                opponent, teacher), selection or pairs, split into the update's [accum, micro, ...] batch
    train_step  one optimizer update on that batch (plus its host-offload phase, if any)
    eval_*      the generation-based evaluation

The rounds' iterate roles (the generator, SPIN's opponent, online DPO's previous-iterate reference) are
snapshots of the policy held on the devices for the whole round: planned as resident copies of its params.
Constitutional AI (cai_sl, cai_rlaif) is refused with one message: its critic and judge read prompts built from
the generated texts, whose lengths no config key bounds.
"""
from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp


def covers(algo) -> bool:
    from jalign.algorithms.gentrain import GenTrainAlgorithm

    return isinstance(algo, GenTrainAlgorithm)


def iterate_roles(algo, state) -> dict:
    """{role: abstract params} of the snapshots of the policy the algorithm keeps through a round (none for the
    other algorithms): the policy's shapes and shardings (``roles.snapshot`` copies them buffer for buffer)."""
    if not covers(algo):
        return {}
    return {name: jax.tree.map(lambda x: x, state.params) for name in algo.iterate_roles()}  # trees of their own


def notes(algo) -> list:
    out = []
    names = algo.iterate_roles()
    if names:
        out.append(f"the round's {', '.join(names)}: a snapshot of the policy, planned as a resident copy of its "
                   "params")
    if getattr(algo, "rule", None) is not None:
        out.append(f"algorithm.reward_fn={algo.a.reward_fn}: scored on the host between the rollout and the "
                   "preparation (no device program)")
    return out


def _refuse(algo, why: str):
    from jalign.algorithms.base import NotPlanned

    raise NotPlanned(f"{algo.cfg.source or '<config>'}: algorithm.name={algo.a.name}: {why}; jalign plan cannot "
                     "size this run (plan the policy's part with algorithm.name=online_dpo or rs and the same model, "
                     "batch and lengths)")


def _row_vector(out: dict, dtype=jnp.float32):
    """A per-row host result placed like the rollout's rows (a rule's scores)."""
    n = out["lengths"].shape[0]
    return jax.ShapeDtypeStruct((n,), dtype, sharding=out["lengths"].sharding)


def _prepare_args(algo, roles: dict):
    """(args(out) of ``algo._prepare`` for a rollout layout ``out``, the persistent buffers they read)."""
    from jalign.algorithms.base import field_sharding
    from jalign.algorithms.cai import CAIFeedback, CAISupervised
    from jalign.algorithms.online_dpo import OnlineDPO
    from jalign.algorithms.opd import OnPolicyDistillation
    from jalign.algorithms.rs import RejectionSampling
    from jalign.algorithms.spin import SPIN
    from jalign.algorithms.steerlm2 import SteerLM2

    rule = getattr(algo, "rule", None)
    if isinstance(algo, CAISupervised):
        _refuse(algo, "the critic's critique and revision rounds read prompts built from the generated answers, "
                      "whose lengths no config key bounds")
    if isinstance(algo, CAIFeedback):
        _refuse(algo, "the judge compares prompts built from the generated answers, whose lengths no config key "
                      "bounds")
    if isinstance(algo, RejectionSampling):
        names = [n for n in ("reference", "reward") if n in roles]
        key = jax.eval_shape(lambda: jax.random.key(0))
        return (lambda out: ({n: roles[n] for n in names}, out, _row_vector(out) if rule is not None else None, key),
                names)
    if isinstance(algo, OnlineDPO):
        names = [n for n in ("reference",) + tuple(algo.ranking_roles()) if n in roles]
        return (lambda out: ({n: roles[n] for n in names}, out,
                             {"rule_score": _row_vector(out)} if rule is not None else {}), names)
    if isinstance(algo, SPIN):
        mesh, rules, P, N = algo.rt.mesh, algo.rt.rules, algo.sizes.prompts, algo.N
        gold = lambda shape: jax.ShapeDtypeStruct(shape, jnp.int32, sharding=field_sharding(  # noqa: E731
            mesh, rules, ("batch",) + (None,) * (len(shape) - 1), leading_accum=False))
        return (lambda out: (roles["opponent"], out, gold((P, N)), gold((P,)))), ["opponent"]
    if isinstance(algo, SteerLM2):  # plain-prompt blocks and targets beside the rollout
        return algo.plan_prepare_args(roles)
    if isinstance(algo, OnPolicyDistillation):
        teacher = algo.a.loss == "reverse_kl"
        return (lambda out: (roles["teacher"] if teacher else None, out)), (["teacher"] if teacher else [])
    _refuse(algo, f"{type(algo).__name__}: its preparation program is not known to jalign.plan_gentrain")


class _Roles(dict):
    """The abstract roles as the algorithm's methods read them (``roles[name]``, ``roles.on_device(names)``)."""

    def on_device(self, names) -> dict:
        return {n: self[n] for n in names}


def programs(algo) -> dict:
    """rollout, prepare, train_step (+ its update phase) and the generation-based evaluation of ``algo``.

    Under LoRA (``algo.trainable``) the roles that are the starting policy are the base's own buffers
    (``base_aliases``) and an iterate is its adapter snapshot applied over the base (``forward_params``)."""
    from jalign.abstract import Program, generate_program, generation_eval_programs, sampler_output, state_uses

    a, s, rt = algo.a, algo.sizes, algo.rt
    roles, configs, _ = algo.abstract_roles()
    roles, state = _Roles(roles), algo.abstract_state()
    for alias in getattr(algo, "base_aliases", tuple)():
        roles[alias], configs[alias] = roles["base"], configs.get("base", algo.cfg.model)
    forward = getattr(algo, "forward_params", None)
    iterates = {n: forward(t, roles) if forward else t for n, t in iterate_roles(algo, state).items()}
    roles.update(iterates)
    configs = {**configs, **{n: algo.cfg.model for n in iterates}}
    trainable = tuple(getattr(getattr(algo, "trainable", None), "role_specs", dict)())  # LoRA: the base
    prepare_args, prepare_roles = _prepare_args(algo, roles)
    gen_params, gen_cfg = algo.generator(state, roles)
    gen_use = next((f"role:{n}" for n, t in roles.items() if t is gen_params), "params")
    gen_uses = (gen_use,) + tuple(f"role:{n}" for n in trainable if f"role:{n}" != gen_use)  # LoRA: + the base
    progs = {"rollout": generate_program(
        gen_params, gen_cfg, rt.mesh, rt.rules, batch=s.rollout, prompt_len=algo.P, new_len=algo.N, top_k=a.top_k,
        top_p=a.top_p, num_end_ids=len(algo.tokenizer.eos_ids) or 1, uses=gen_uses, max_new_tokens=a.max_new_tokens,
        num_samples=s.per_prompt, note=f"{s.prompts} prompts x {s.per_prompt} samples, {algo.P} + {algo.N} slots")}
    progs["prepare"] = Program(algo._prepare,
                               lambda outs: prepare_args(sampler_output(outs, "rollout", progs["rollout"])),
                               uses=tuple(f"role:{n}" for n in prepare_roles),
                               note=f"{s.rollout} sampled rows -> {s.rows} training rows")
    step_roles = {n: roles[n] for n in (*algo.step_roles, *trainable) if n in roles}  # as ``update``
    progs["train_step"] = Program(algo._train_step, lambda outs: (state, step_roles, outs["prepare"][0]),
                                  uses=state_uses(state) + tuple(f"role:{n}" for n in step_roles),
                                  note=f"{s.accum} x {s.micro} rows x {algo.P + algo.N}")
    progs.update(algo.trained.update_phase_programs("train_step/update"))
    if algo.generation_eval is not None:
        params, mcfg = algo.policy(state, roles)  # under LoRA: the base with the adapters applied
        for name, prog in generation_eval_programs(algo.generation_eval, params, mcfg, roles, configs).items():
            progs[name] = dataclasses.replace(prog, uses=tuple(prog.uses) + tuple(f"role:{n}" for n in trainable))
    return progs
