"""Generate-then-train (rejection sampling, online DPO, SPIN, on-policy distillation): selection and pairing on
hand-checked batches, rounds rebuilding frozen roles bit-identically from the policy, sharded == unsharded,
resume == uninterrupted (bitwise, also in the middle of a round), and the errors raised before any compile."""
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jalign.algorithms import base
from jalign.algorithms.online_dpo import OnlineDPO, best_and_worst, build_pairs
from jalign.algorithms.opd import OnPolicyDistillation
from jalign.algorithms.rs import RejectionSampling, select_samples
from jalign.algorithms.spin import SPIN, identical_sides, stack_sides
from jalign.checkpoint import Checkpointer
from jalign.config import ConfigError, dump_config, load_config
from jalign.models import params as params_lib
from jalign.models import transformer as tfm
from jalign.rewards import REWARDS, register_reward
from jalign.trainer import train
from sharding import make_mesh, make_rules, use_rules

from helpers import assert_trees_close, roles_for
from test_seam import QUIET, TINY_MODEL, _assert_bitwise, _resume_pair

MODEL = ["model.vocab_size=288", "model.hidden=32", "model.mlp=64", "model.layers=2", "model.heads=4",
         "model.kv_heads=2"]
OPTIM = ["optim.lr=1e-2", "optim.warmup_steps=0", "optim.schedule=constant", "optim.weight_decay=0.0"]
PROMPTS = ["data.train=builtin:addition_prompts:train", "data.eval=null", "train.global_batch=8",
           "algorithm.max_new_tokens=3"]

if "starts_with_one" not in REWARDS:
    @register_reward("starts_with_one")
    def starts_with_one(prompt, response, reference):
        """A reward a random model earns on some samples and not on others (so pairs and selection exist)."""
        return float(response[:1] in "1\x11!1Aa")


def runtime(overrides, mesh=None, run_dir="/tmp/unused"):
    cfg = load_config(None, [*MODEL, *OPTIM, *overrides])
    mesh = mesh or make_mesh(1, 1, 1, 1, devices=jax.devices()[:1])
    return base.Runtime(cfg=cfg, mesh=mesh, rules=make_rules(), run_dir=Path(run_dir), log=lambda *_: None)


def make_lm_run(directory: Path, seed: int, lm_head=True, score_outputs=0, algorithm="sft", sharpen=1.0,
                model=MODEL) -> str:
    """A run dir (config.yaml + one checkpoint) holding random weights of the tiny model (a teacher / RM);
    ``sharpen`` scales the unembedding (a peaked teacher, far from a random student)."""
    cfg = load_config(None, [f"algorithm.name={algorithm}", *model, f"train.out_dir={directory}"])
    directory.mkdir(parents=True, exist_ok=True)
    dump_config(cfg, directory / "config.yaml")
    params = params_lib.init_params(tfm.declare_params(cfg.model, lm_head=lm_head, score_outputs=score_outputs), seed)
    if "lm_head" in params:
        params["lm_head"] = params["lm_head"] * sharpen
    ck = Checkpointer(directory / "checkpoints", async_save=False)
    ck.save(1, {"step": jnp.int32(1), "params": params}, force=True)
    ck.close()
    return str(directory)


# ---- pure pieces on hand-checked batches --------------------------------------------------------
NEG = -np.inf
KEYS = np.array([[0.1, 0.9, 0.5, NEG],      # best: 1, then 2
                 [0.2, 0.2, 0.7, 0.7],      # ties: the lower index first (2 then 3)
                 [NEG, NEG, NEG, 0.3],      # one finished sample
                 [NEG, NEG, NEG, NEG]], np.float32)  # nothing finished: nothing kept


def test_rejection_sampling_keeps_exactly_what_its_rule_says():
    idx, keep = jax.device_get(select_samples(jnp.asarray(KEYS), 1))
    np.testing.assert_array_equal(idx[:, 0], [1, 2, 3, 0])
    np.testing.assert_array_equal(keep[:, 0], [True, True, True, False])
    idx, keep = jax.device_get(select_samples(jnp.asarray(KEYS), 2))
    np.testing.assert_array_equal(idx, [[1, 2], [2, 3], [3, 0], [0, 1]])
    np.testing.assert_array_equal(keep, [[True, True], [True, True], [True, False], [False, False]])
    # all above a threshold: top_n = K with threshold 0.5 keeps 0.9 and 0.5, 0.7 twice, nothing of 0.3
    idx, keep = jax.device_get(select_samples(jnp.asarray(KEYS), 4, threshold=0.5))
    kept = [sorted(int(i) for i, k in zip(idx[p], keep[p]) if k) for p in range(4)]
    assert kept == [[1, 2], [2, 3], [], []]
    # random: distinct samples, never an unfinished one
    for seed in range(5):
        idx, keep = jax.device_get(select_samples(jnp.asarray(KEYS), 2, select="random", rng=jax.random.key(seed)))
        assert all(len(set(r)) == 2 for r in idx.tolist())
        np.testing.assert_array_equal(keep, np.isfinite(np.take_along_axis(KEYS, idx, 1)))


def test_best_and_worst_pairs_and_their_rows():
    c, r, v = jax.device_get(best_and_worst(jnp.asarray(KEYS)))
    np.testing.assert_array_equal(c, [1, 2, 3, 0])
    np.testing.assert_array_equal(r, [3, 0, 0, 0])
    np.testing.assert_array_equal(v, [1, 1, 1, 0])  # all equal (-inf) keys: no preference
    _, _, v = jax.device_get(best_and_worst(jnp.asarray(KEYS[:2]), min_margin=0.6))
    np.testing.assert_array_equal(v, [1, 0])  # 0.9 - (-inf) > 0.6, 0.7 - 0.2 is not
    P, K, S = 2, 3, 5
    rows = {k: jnp.arange(P * K * S).reshape(P * K, S) + o for o, k in
            enumerate(("tokens", "targets", "positions", "segment_ids", "mask"))}
    pairs = jax.device_get(build_pairs(rows, jnp.asarray([2, 0]), jnp.asarray([1, 2]), K))
    assert pairs["tokens"].shape == (P, 2, S)
    np.testing.assert_array_equal(pairs["tokens"][0], np.asarray(rows["tokens"])[[2, 1]])
    np.testing.assert_array_equal(pairs["tokens"][1], np.asarray(rows["tokens"])[[3, 5]])
    np.testing.assert_array_equal(pairs["loss_mask"][1], np.asarray(rows["mask"])[[3, 5]])


def test_spin_pairs_gold_against_generation_and_masks_identical_ones():
    gold = {k: jnp.asarray([[1, 2, 3, 0], [1, 5, 6, 7]]) for k in ("tokens", "targets", "positions", "mask")}
    gen = {k: jnp.asarray([[1, 2, 3, 0], [1, 5, 9, 0]]) for k in gold}
    gold["segment_ids"] = jnp.asarray([[1, 1, 1, 0], [1, 1, 1, 1]])
    gen["segment_ids"] = jnp.asarray([[1, 1, 1, 0], [1, 1, 1, 0]])
    pairs = stack_sides(gold, gen)
    np.testing.assert_array_equal(np.asarray(pairs["tokens"][:, 0]), np.asarray(gold["tokens"]))
    np.testing.assert_array_equal(np.asarray(pairs["loss_mask"][:, 1]), np.asarray(gen["mask"]))
    np.testing.assert_array_equal(np.asarray(identical_sides(pairs)), [1.0, 0.0])


def fake_rollout(prompt_ids, responses, pad=0, P=None, N=None):
    """A sampler output (``generate(return_device=True)`` layout) for given responses, with EOS (2) at the end
    of responses listed as tuples ending in 2; no model involved."""
    from jalign.generate import prepare_prompts

    P = P or max(map(len, prompt_ids))
    N = N or max(map(len, responses))
    tokens, positions, seg, lens = prepare_prompts(prompt_ids, pad_id=pad, length=P)
    out = np.full((len(responses), N), pad, np.int32)
    for i, r in enumerate(responses):
        out[i, :len(r)] = r
    return {"tokens": jnp.asarray(out), "lengths": jnp.asarray([len(r) for r in responses], jnp.int32),
            "ended_with_eos": jnp.asarray([r[-1] == 2 for r in responses]),
            "logprobs": jnp.zeros(out.shape), "logprobs_tempered": jnp.zeros(out.shape),
            "prompt_tokens": jnp.asarray(tokens), "prompt_positions": jnp.asarray(positions),
            "prompt_segment_ids": jnp.asarray(seg), "prompt_lengths": jnp.asarray(lens)}


def test_rejection_sampling_trains_on_exactly_the_kept_rows_of_a_rollout():
    rt = runtime([*PROMPTS, "algorithm.name=rs", "algorithm.reward_fn=exact_match", "train.global_batch=2",
                  "algorithm.num_rollouts_per_prompt=3", "algorithm.top_n=1"])
    with use_rules(rt.mesh, rt.rules):
        algo = RejectionSampling(rt)
        roles = roles_for(algo)
        b = algo.tokenizer.encode
        batch = {"prompt_index": np.asarray([0, 1], np.int32)}
        right = [algo.train_prompts.answers[i] for i in (0, 1)]
        responses = [tuple(b("7")) + (2,), tuple(b(right[0])) + (2,), tuple(b(right[0])),  # right but unfinished
                     tuple(b("1")) + (2,), tuple(b("2")) + (2,), tuple(b("3")) + (2,)]  # nothing right: first
        ids = [algo.train_prompts.ids[i] for i in algo.row_prompts(batch)]
        out = fake_rollout(ids, responses, P=algo.P, N=algo.N)
        rule = algo.rule_scores(out, batch)
        np.testing.assert_array_equal(np.asarray(rule), [0, 1, 1, 0, 0, 0])  # the rule does not see the EOS
        train, m = algo._prepare(roles.on_device(["reference"]), out, rule, jax.random.key(0))
        train = jax.device_get(train)
        kept = train["tokens"][0]  # accum 1: [2 rows, S]
        np.testing.assert_array_equal(kept[0, algo.P:algo.P + 3], list(b(right[0])) + [2])  # prompt 0: row 1
        np.testing.assert_array_equal(kept[1, algo.P:algo.P + 2], list(b("1")) + [2])  # prompt 1: a tie -> row 3
        assert train["weight"][0].sum(-1).tolist() == [len(b(right[0])) + 1, 2]
        assert float(m["reward_kept_mean"]) == 0.5 and float(m["kept_fraction"]) == pytest.approx(2 / 6)
        assert float(m["reward_mean"]) == pytest.approx(2 / 6)
    algo2 = RejectionSampling(runtime([*PROMPTS, "algorithm.name=rs", "algorithm.reward_fn=exact_match",
                                       "train.global_batch=2", "algorithm.num_rollouts_per_prompt=3",
                                       "algorithm.top_n=3", "algorithm.threshold=0.5"]))
    with use_rules(rt.mesh, rt.rules):
        train, m = algo2._prepare({}, out, rule, jax.random.key(0))
    assert jax.device_get(train["weight"])[0].sum(-1).tolist() == [len(b(right[0])) + 1, 0, 0, 0, 0, 0]


def test_rollouts_go_through_the_runs_rollout_config():
    """The engine with the Gumbel sampler draws what the static sampler draws; its inverse-CDF sampler draws
    otherwise: so the samples follow the run's ``rollout`` section rather than a default."""
    def samples(*rollout):
        rt = runtime([*PROMPTS, "algorithm.name=rs", "algorithm.reward_fn=exact_match", "algorithm.max_new_tokens=4",
                      *rollout])
        with use_rules(rt.mesh, rt.rules):
            algo = RejectionSampling(rt)
            roles = roles_for(algo)
            state = algo.init_state(roles)
            algo.start(state, roles)
            return np.asarray(jax.device_get(algo.rollout(state, roles, next(algo.train_batches()))["tokens"]))

    static = samples("rollout.engine=false")
    np.testing.assert_array_equal(samples("rollout.engine=true", "rollout.sampler=gumbel"), static)
    assert (samples("rollout.engine=true", "rollout.sampler=inverse_cdf") != static).any()


# ---- rounds: frozen roles rebuilt from the policy, bit-identical, never trained -----------------
def _run_steps(algo, roles, n):
    state = algo.init_state(roles)
    algo.start(state, roles)
    it = algo.train_batches()
    seen = []
    for _ in range(n):
        before = jax.device_get(state.params)
        state, m = algo.step(state, roles, next(it))
        jax.block_until_ready(m)
        seen.append((before, jax.device_get(roles.params)))
    return state, seen


def test_spin_opponent_is_the_previous_iterate_bit_for_bit_and_never_trained(tmp_path):
    rt = runtime(["algorithm.name=spin", "data.train=builtin:addition:train:64", "data.eval=null",
                  "train.global_batch=8", "algorithm.max_new_tokens=4", "algorithm.spin_iterations=2",
                  "train.steps=4"], run_dir=tmp_path)
    with use_rules(rt.mesh, rt.rules):
        algo = SPIN(rt)
        roles = roles_for(algo)
        assert "opponent" not in algo.role_specs()  # built from the policy, not from config
        state, seen = _run_steps(algo, roles, 4)
        initial = seen[0][0]
        for step in (0, 1):  # round 0: the starting policy
            jax.tree.map(np.testing.assert_array_equal, seen[step][1]["opponent"], initial)
        for step in (2, 3):  # round 1: the policy as it was after step 2, unchanged by steps 3 and 4
            jax.tree.map(np.testing.assert_array_equal, seen[step][1]["opponent"], seen[2][0])
        after = jax.device_get(roles.params["opponent"])
        jax.tree.map(np.testing.assert_array_equal, after, seen[2][0])
        moved = jax.tree.map(lambda a, b: float(np.abs(a - b).max()), jax.device_get(state.params), seen[2][0])
        assert max(jax.tree.leaves(moved)) > 0  # the policy did move on while the opponent stayed put
        # the stored iterate (what a resume inside round 1 loads) is the same bits
        jax.tree.map(np.testing.assert_array_equal, jax.device_get(algo.store.load(1)), seen[2][0])
    assert (tmp_path / "iterates" / "config.yaml").is_file()


def test_rejection_sampling_rounds_sample_from_the_policy_at_their_start(tmp_path):
    rt = runtime([*PROMPTS, "algorithm.name=rs", "algorithm.reward_fn=starts_with_one", "algorithm.rs_iterations=2",
                  "train.steps=4", "algorithm.num_rollouts_per_prompt=2"], run_dir=tmp_path)
    with use_rules(rt.mesh, rt.rules):
        algo = RejectionSampling(rt)
        roles = roles_for(algo)
        _, seen = _run_steps(algo, roles, 4)
    jax.tree.map(np.testing.assert_array_equal, seen[1][1]["generator"], seen[0][0])
    jax.tree.map(np.testing.assert_array_equal, seen[3][1]["generator"], seen[2][0])
    jax.tree.map(np.testing.assert_array_equal, seen[3][1]["reference"], seen[0][0])  # the KL's start: fixed


# ---- sharded == unsharded -----------------------------------------------------------------------
def on_mesh(out, mesh, rules):
    def put(x):
        axes = (("batch",) + (None,) * (np.ndim(x) - 1)) if np.ndim(x) else ()
        return jax.device_put(np.asarray(x), base.field_sharding(mesh, rules, axes, leading_accum=False))

    return {k: put(v) for k, v in out.items()}


def one_learn(cls, overrides, mesh, out=None):
    rt = runtime(overrides, mesh)
    with use_rules(rt.mesh, rt.rules):
        algo = cls(rt)
        roles = roles_for(algo)
        state = algo.init_state(roles)
        algo.start(state, roles)
        batch = next(algo.train_batches())
        out = algo.rollout(state, roles, batch) if out is None else on_mesh(out, rt.mesh, rt.rules)
        state, m = algo.learn(state, roles, batch, out)
        return jax.device_get(out), jax.device_get(m), jax.device_get(state.params)


@pytest.fixture(scope="module")
def rm_dir(tmp_path_factory):
    return make_lm_run(tmp_path_factory.mktemp("rm"), 3, lm_head=False, score_outputs=1, algorithm="reward")


# Adam's first update is lr * g / (|g| + eps): a gradient entry at float32 noise level (~1e-9, reduction order
# differs across meshes) moves its parameter by up to lr * 1e-9 / eps. With eps = 1e-8 that is 1e-3 of lr, far
# above the comparison's tolerance, though the gradients agree to 1e-7; eps = 1e-4 keeps that bound at 1e-7
# of lr while every other entry still moves by ~lr.
SHARDED = {
    "rs": (RejectionSampling, ["algorithm.name=rs", "algorithm.reward_fn=starts_with_one", "algorithm.top_n=2",
                               "algorithm.num_rollouts_per_prompt=4", "algorithm.micro_batch_size=8",
                               "algorithm.truncated_response=keep"]),  # a random model never ends
    "online_dpo": (OnlineDPO, ["algorithm.name=online_dpo", "algorithm.num_rollouts_per_prompt=3",
                               "algorithm.sft_weight=0.5", "algorithm.micro_batch_size=8",
                               "algorithm.truncated_response=keep"]),
}


@pytest.mark.parametrize("name", sorted(SHARDED))
def test_sharded_step_equals_unsharded(name, rm_dir):
    cls, extra = SHARDED[name]
    extra = [*PROMPTS, *extra, "optim.eps=1e-4"] + ([f"roles.reward=run:{rm_dir}"] if name == "online_dpo" else [])
    out, ref_m, ref_p = one_learn(cls, extra, make_mesh(1, 1, 1, 1, devices=jax.devices()[:1]))
    assert ref_m["skipped"] == 0 and ref_m["num_tokens"] > 0
    for shape in [(8, 1, 1, 1), (2, 2, 2, 1)]:
        _, m, p = one_learn(cls, extra, make_mesh(*shape), out)
        for k in ref_m:
            np.testing.assert_allclose(m[k], ref_m[k], rtol=2e-5, atol=1e-6, err_msg=f"{shape} {k}")
        assert_trees_close(p, ref_p)


# ---- resume == uninterrupted (bitwise) ----------------------------------------------------------
RESUME = ["data.train=builtin:addition_prompts:train", "data.eval=null", "train.global_batch=4",
          "algorithm.max_new_tokens=3", "optim.lr=1e-2", "optim.warmup_steps=0", "train.eval_every=0",
          "algorithm.truncated_response=keep"]


@pytest.mark.parametrize("config,extra", [
    ("configs/rs_tiny.yaml", ["algorithm.reward_fn=starts_with_one", "roles.reward=null", "algorithm.rs_iterations=2",
                              "algorithm.num_rollouts_per_prompt=4", "algorithm.top_n=2", "algorithm.threshold=null"]),
    ("configs/online_dpo_tiny.yaml", ["algorithm.reward_fn=starts_with_one", "roles.reward=null",
                                      "algorithm.iterations=2", "algorithm.reference=previous",
                                      "algorithm.num_rollouts_per_prompt=2",
                                      "mesh.data=4", "mesh.tensor=2"]),  # 4 pairs a step over 4 data shards
])
def test_resume_inside_a_round_equals_uninterrupted(tmp_path, config, extra):
    # 4 steps in 2 rounds, stopped after step 3: the resumed run rebuilds round 1's iterate from RUN_DIR/iterates
    straight, sliced = _resume_pair(tmp_path, config, [*RESUME, *extra, "algorithm.log_rollouts=true"], steps=4, at=3)
    _assert_bitwise(straight, sliced, 4)
    # the same samples and training batches, step 4 logged once (the resumed run dropped nothing it needed)
    assert (sliced / "rollouts.jsonl").read_text() == (straight / "rollouts.jsonl").read_text()
    assert sorted(p.name for p in (sliced / "iterates" / "checkpoints").iterdir() if p.name.isdigit()) == ["1"]


# ---- on-policy distillation ---------------------------------------------------------------------
@pytest.fixture(scope="module")
def teacher_dir(tmp_path_factory):
    return make_lm_run(tmp_path_factory.mktemp("teacher"), 7, sharpen=8.0)  # peaked: far from the student


def exact_reverse_kl(student, teacher, cfg, rows) -> float:
    """Token mean over the response positions of KL(student || teacher) over the whole vocabulary (NumPy)."""
    def logp(params):
        h = np.asarray(tfm.forward(params, rows["tokens"], rows["positions"], rows["segment_ids"], cfg), np.float64)
        z = h @ np.asarray(tfm.unembed_matrix(params, cfg), np.float64)
        z -= z.max(-1, keepdims=True)
        return z - np.log(np.exp(z).sum(-1, keepdims=True))

    ls, lt = logp(student), logp(teacher)
    kl = (np.exp(ls) * (ls - lt)).sum(-1)
    m = np.asarray(rows["mask"])
    return float((kl * m).sum() / m.sum())


@pytest.mark.parametrize("loss", ["reverse_kl", "jsd"])
def test_on_policy_distillation_moves_the_student_toward_the_teacher(teacher_dir, loss):
    from jalign.rollout import experience as xp

    rt = runtime([*PROMPTS, "algorithm.name=opd", f"roles.teacher=run:{teacher_dir}", f"algorithm.loss={loss}",
                  "algorithm.beta=1.0", "train.steps=12",
                  # the sampled-token policy gradient is unbiased (cosine ~0.6 with the exact gradient at 512
                  # samples) but noisy: with a few samples a step Adam random-walks instead of descending
                  f"algorithm.num_rollouts_per_prompt={16 if loss == 'reverse_kl' else 2}"])
    with use_rules(rt.mesh, rt.rules):
        algo = OnPolicyDistillation(rt)
        roles = roles_for(algo)
        teacher = jax.device_get(roles.params["teacher"])
        state = algo.init_state(roles)
        start = jax.device_get(state.params)
        algo.start(state, roles)
        # held fixed: the first step's samples, on which the exact KL is compared before and after training
        rows = jax.device_get(xp.rollout_rows(algo.rollout(state, roles, next(algo.train_batches())), 0))
        it = algo.train_batches()
        for _ in range(12):
            state, m = algo.step(state, roles, next(it))
        end = jax.device_get(state.params)
    before, after = (exact_reverse_kl(p, teacher, algo.cfg.model, rows) for p in (start, end))
    assert after < 0.8 * before, (before, after)
    jax.tree.map(np.testing.assert_array_equal, jax.device_get(roles.params["teacher"]), teacher)


# ---- errors before any compile ------------------------------------------------------------------
def test_configuration_errors_name_the_key(teacher_dir):
    mesh = make_mesh(8, 1, 1, 1)
    cases = [
        (RejectionSampling, ["algorithm.name=rs", "algorithm.reward_fn=exact_match", "algorithm.top_n=5"],
         "algorithm.top_n=5 exceeds algorithm.num_rollouts_per_prompt=4"),
        (RejectionSampling, ["algorithm.name=rs", "algorithm.reward_fn=exact_match", "algorithm.select=random",
                             "algorithm.threshold=0.5"], "select: random keeps samples regardless"),
        (RejectionSampling, ["algorithm.name=rs"], "exactly one of roles.reward"),
        (RejectionSampling, ["algorithm.name=rs", "algorithm.reward_fn=exact_match", "algorithm.rs_iterations=3",
                             "train.steps=10"], "rs_iterations=3 must be >= 1 and divide train.steps=10"),
        (RejectionSampling, ["algorithm.name=rs", "algorithm.reward_fn=exact_match", "algorithm.micro_batch_size=12"],
         "micro_batch_size=12 does not divide the 8 training rows"),
        (OnlineDPO, ["algorithm.name=online_dpo", "algorithm.reward_fn=exact_match",
                     "algorithm.num_rollouts_per_prompt=1"], "a pair needs at least 2 samples"),
        (OnlineDPO, ["algorithm.name=online_dpo", "algorithm.reward_fn=exact_match", "algorithm.reference=previous",
                     f"roles.reference=run:{teacher_dir}"], "roles.reference is set but algorithm.reference=previous"),
        (SPIN, ["algorithm.name=spin", "data.train=builtin:addition:train:64", "algorithm.num_rollouts_per_prompt=2"],
         "SPIN pairs each gold response with one generation"),
        (OnPolicyDistillation, ["algorithm.name=opd"], "needs a teacher: set roles.teacher"),
        (SPIN, ["algorithm.name=spin", "data.train=builtin:addition:train:64", "model.quantize_base=nf4"],
         "model.quantize_base stores a frozen base quantised: it needs model.lora"),
        (OnPolicyDistillation, ["algorithm.name=opd", f"roles.teacher=run:{teacher_dir}", "algorithm.sampler=teacher"],
         "with algorithm.sampler=teacher use loss: jsd"),
    ]
    for cls, extra, text in cases:
        with pytest.raises(ConfigError, match=text):
            cls(runtime([*PROMPTS, *extra], mesh))
    with pytest.raises(ConfigError, match="algorithm.top_n: must be >= 1, got 0"):
        load_config(None, ["algorithm.name=rs", "algorithm.top_n=0"])
    with pytest.raises(ConfigError, match="roles.critic: unknown role for algorithm 'rs'"):
        load_config(None, ["algorithm.name=rs", "roles.critic=policy-init"])


def test_tiny_configs_load():
    root = Path(__file__).parent.parent / "configs"
    for name in ("rs_tiny", "online_dpo_tiny", "spin_tiny", "opd_tiny", "cai_sl_tiny", "cai_rlaif_tiny",
                 "cai_critic_tiny"):
        cfg = load_config(root / f"{name}.yaml")
        assert cfg.source.endswith(f"{name}.yaml")
