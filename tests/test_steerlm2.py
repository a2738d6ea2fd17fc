"""SteerLM 2.0: its weights and loss against a NumPy transcription (masks, a degenerate group, extreme
log-weights, micro-batch splits, finite gradients); one step's gradient against the gradient of the NumPy-
weighted log-likelihood computed on an independent row layout; the conditioned prompts and targets from the
data; configuration errors naming the key."""
import json
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jalign.losses as L
from jalign.algorithms import base
from jalign.algorithms.steerlm2 import SteerLM2
from jalign.checkpoint import Checkpointer
from jalign.config import ConfigError, dump_config, load_config
from jalign.models import params as params_lib
from jalign.models import transformer as tfm
from jalign.models.heads import sequence_scores
from sharding import make_mesh, make_rules, use_rules

from helpers import assert_trees_close, roles_for
from test_losses import _split_sum, close, finite_tree

MODEL = ["model.vocab_size=288", "model.hidden=32", "model.mlp=64", "model.layers=2", "model.heads=4",
         "model.kv_heads=2"]
OPTIM = ["optim.lr=1e-2", "optim.warmup_steps=0", "optim.schedule=constant", "optim.weight_decay=0.0"]
TARGETS = 'algorithm.target_attributes=["correctness=4,verbosity=0","verbosity=4"]'
# jitted once each: eager op-by-op dispatch compiles every small op separately (slow on CPU)
WEIGHTS, LOSS, MEAN_LENGTH = (jax.jit(f) for f in (L.steerlm2_weights, L.steerlm2_loss, L.group_mean_length))


# ---- the pure functions against NumPy -----------------------------------------------------------
def np_softmax(z, valid):
    out = np.zeros_like(z, np.float64)
    for g in range(z.shape[0]):
        v = valid[g] > 0
        if v.any():
            e = np.exp(z[g][v] - z[g][v].max())
            out[g][v] = e / e.sum()
    return out


def np_steerlm2(attr, prior, prop, pol, valid, tlp, mask):
    """HelpSteer2's SteerLM 2.0 weights and NeMo-Aligner's length-scaled loss, transcribed."""
    G, n = attr.shape
    w, b = np_softmax(attr + prior - prop, valid), np_softmax(pol - prop, valid)
    lengths = mask.sum(-1).reshape(G, n)
    nv = valid.sum(-1)
    lbar = np.where(nv > 0, (lengths * valid).sum(-1) / np.maximum(nv, 1), 0.0)
    groups = [g for g in range(G) if nv[g] > 0]
    loss = 0.0
    for g in groups:
        for i in range(n):
            r = g * n + i
            loss -= (w[g, i] - b[g, i]) * (tlp[r] * mask[r]).sum() / lbar[g]
    ess = np.mean([1.0 / (w[g] ** 2).sum() for g in groups])
    frac = np.mean([1.0 / (w[g] ** 2).sum() / nv[g] for g in groups])
    eps = 1e-8
    dist = np.mean([sum((w[g, i] + eps) * np.log((w[g, i] + eps) / (b[g, i] + eps)) for i in range(n) if valid[g, i])
                    for g in groups])
    return w, b, np.repeat(lbar, n), loss / len(groups), {"ess": ess, "ess_fraction": frac, "baseline_distance": dist}


def test_weights_and_loss_match_numpy_with_masks_and_micro_batches():
    rng = np.random.default_rng(0)
    G, n, T = 5, 4, 6
    attr, prior, prop, pol = (rng.normal(size=(G, n)) * 3 for _ in range(4))
    valid = (rng.random((G, n)) > 0.3).astype(np.float64)
    valid[0], valid[3] = 1.0, 0.0  # a full group and a group with no valid sample
    tlp = -np.abs(rng.normal(size=(G * n, T)))
    mask = (rng.random((G * n, T)) > 0.3).astype(np.float64)
    mask[5] = 0.0  # an empty response
    w_np, b_np, lbar_np, loss_np, m_np = np_steerlm2(attr, prior, prop, pol, valid, tlp, mask)

    f32 = lambda x: jnp.asarray(x, jnp.float32)  # noqa: E731
    w, b, m = WEIGHTS(f32(attr), f32(prior), f32(prop), f32(pol), f32(valid))
    close(w, w_np), close(b, b_np)
    for k, v in m_np.items():
        close(m[k], v)
    lbar = MEAN_LENGTH(f32(mask).reshape(G, n, T), f32(valid))
    close(lbar.reshape(-1), lbar_np)
    groups = float((valid.sum(-1) > 0).sum())
    args = [f32(tlp), f32(mask), w.reshape(-1), b.reshape(-1), lbar.reshape(-1)]
    loss, metrics = LOSS(*args, num_groups=groups)
    close(loss, loss_np)
    split, split_m = _split_sum(LOSS, args, "num_groups", groups)  # micro-batches add up
    close(split, loss), close(split_m["loss"], metrics["loss"])
    # gradient wrt the token log-probs: -(w - b) / Lbar / G on the response tokens, 0 elsewhere
    g = jax.grad(lambda t: LOSS(t, *args[1:], num_groups=groups)[0])(args[0])
    coef = np.where(lbar_np > 0, (w_np - b_np).reshape(-1) / np.where(lbar_np > 0, lbar_np, 1), 0.0)
    close(g, -coef[:, None] * mask / groups)


def test_degenerate_and_extreme_groups_stay_finite():
    f32 = lambda x: jnp.asarray(x, jnp.float32)  # noqa: E731
    same = f32(np.full((2, 4), -7.0))
    w, b, m = WEIGHTS(same, same, same, same, f32(np.ones((2, 4))))
    close(w, 0.25), close(b, 0.25), close(m["ess"], 4.0), close(m["ess_fraction"], 1.0)
    close(m["baseline_distance"], 0.0, atol=1e-6)
    tlp, mask = f32(-np.ones((8, 3))), f32(np.ones((8, 3)))
    lbar = MEAN_LENGTH(mask.reshape(2, 4, 3), f32(np.ones((2, 4))))
    loss_fn = lambda t: LOSS(t, mask, w.reshape(-1), b.reshape(-1), lbar.reshape(-1), 2.0)[0]  # noqa
    close(loss_fn(tlp), 0.0), close(jax.grad(loss_fn)(tlp), 0.0)  # all weights equal: nothing to learn

    # extreme log-weights: one sample dominates, -inf samples weigh nothing, a group of -inf weighs nothing
    attr = f32([[1e4, -1e4, 0.0, 50.0], [-np.inf] * 4])
    zero = f32(np.zeros((2, 4)))
    pol = f32([[3e4, -3e4, -np.inf, 0.0], [0.0] * 4])
    w, b, m = WEIGHTS(attr, zero, zero, pol, f32(np.ones((2, 4))))
    close(w, [[1, 0, 0, 0], [0, 0, 0, 0]]), close(b, [[1, 0, 0, 0], [0.25] * 4])
    assert finite_tree(m) and finite_tree((w, b))

    def through_weights(x):  # no gradient reaches the log-weights (the weights are constants of the step)
        w, b, _ = WEIGHTS(x, zero, zero, pol, f32(np.ones((2, 4))))
        return LOSS(tlp, mask, w.reshape(-1), b.reshape(-1), lbar.reshape(-1), 2.0)[0]

    g = jax.grad(through_weights)(f32([[1e4, -1e4, 0.0, 50.0], [1.0, 2.0, 3.0, 4.0]]))
    assert finite_tree(g) and float(jnp.abs(g).max()) == 0.0
    # nothing valid anywhere: zero loss, zero metrics, no NaN
    w, b, m = WEIGHTS(attr, zero, zero, pol, zero)
    assert finite_tree(m) and float(jnp.abs(w).sum() + jnp.abs(b).sum()) == 0.0
    loss, _ = LOSS(tlp, mask, w.reshape(-1), b.reshape(-1), jnp.zeros(8), 0.0)
    assert float(loss) == 0.0


def test_gaussian_attribute_likelihood():
    rng = np.random.default_rng(1)
    pred, target = rng.normal(size=(6, 3)) * 2, rng.integers(0, 5, size=(6, 3)).astype(np.float64)
    m = (rng.random((6, 3)) > 0.4).astype(np.float64)
    got = L.gaussian_attribute_logps(jnp.asarray(pred, jnp.float32), jnp.asarray(target, jnp.float32),
                                     jnp.asarray(m, jnp.float32), sigma=0.5)
    close(got, -(((target - pred) * m) ** 2).sum(-1) / (2 * 0.25))


# ---- the algorithm --------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def rm_dir(tmp_path_factory):
    """A regression reward-model run (two outputs; its data names them correctness, verbosity) of random weights."""
    d = tmp_path_factory.mktemp("steer_rm")
    cfg = load_config(None, ["algorithm.name=reward", "algorithm.loss=regression", "algorithm.num_attributes=2",
                             "data.train=builtin:addition_steer_rm:feedback:8", *MODEL, f"train.out_dir={d}"])
    dump_config(cfg, d / "config.yaml")
    params = params_lib.init_params(tfm.declare_params(cfg.model, lm_head=False, score_outputs=2), 5)
    params["score"] = params["score"] * 50.0  # predictions spread over a few units: uneven weights
    ck = Checkpointer(d / "checkpoints", async_save=False)
    ck.save(1, {"step": jnp.int32(1), "params": params}, force=True)
    ck.close()
    return str(d)


def runtime(overrides, mesh=None, run_dir="/tmp/unused"):
    cfg = load_config(None, ["algorithm.name=steerlm2", *MODEL, *OPTIM, "data.train=builtin:addition_prompts:train:8",
                             "data.eval=null", "data.seq_len=48", "algorithm.max_new_tokens=3", *overrides])
    mesh = mesh or make_mesh(1, 1, 1, 1, devices=jax.devices()[:1])
    return base.Runtime(cfg=cfg, mesh=mesh, rules=make_rules(), run_dir=Path(run_dir), log=lambda *_: None)


def right_padded(pairs):
    """Rows of their own for (prompt ids, response ids): right-padded, positions from 0 (not the rollout
    layout); ``resp`` marks the positions that predict a response token."""
    L_ = max(len(p) + len(r) for p, r in pairs)
    tokens = np.zeros((len(pairs), L_), np.int32)
    seg, resp = np.zeros_like(tokens), np.zeros((len(pairs), L_), np.float32)
    for i, (p, r) in enumerate(pairs):
        tokens[i, :len(p) + len(r)] = list(p) + list(r)
        seg[i, :len(p) + len(r)] = 1
        resp[i, len(p) - 1:len(p) + len(r) - 1] = 1.0  # position t predicts token t + 1
    pos = np.tile(np.arange(L_, dtype=np.int32), (len(pairs), 1)) * seg
    return tokens, pos, seg, resp


def right_padded_logps(cfg, pairs):
    """A jitted ``params -> sum of log Q(response | prompt)`` per pair on :func:`right_padded` rows, by a full
    log-softmax."""
    tokens, pos, seg, resp = right_padded(pairs)
    nxt = np.concatenate([tokens[:, 1:], np.zeros((len(pairs), 1), np.int32)], 1)

    def fn(params):
        hidden = tfm.forward(params, tokens, pos, seg, cfg)
        logp = jax.nn.log_softmax(hidden @ tfm.unembed_matrix(params, cfg), axis=-1)
        return jnp.sum(jnp.take_along_axis(logp, nxt[..., None], -1)[..., 0] * resp, -1)

    return jax.jit(fn)


def test_one_step_gradient_is_the_numpy_weighted_log_likelihood(rm_dir, tmp_path):
    from jalign.data.chat import encode_prompt

    rt = runtime([f"roles.reward=run:{rm_dir}", TARGETS, "train.global_batch=2",
                  "algorithm.num_rollouts_per_prompt=3", "algorithm.truncated_response=keep",
                  "rollout.engine=false"], run_dir=tmp_path)  # the static sampler: its log-probs are the proposal too
    with use_rules(rt.mesh, rt.rules):
        algo = SteerLM2(rt)
        roles = roles_for(algo)
        state = algo.init_state(roles)
        algo.start(state, roles)
        batch = next(algo.train_batches())
        out = algo.rollout(state, roles, batch)
        train, metrics = algo.prepare(state, roles, batch, out)
        train, metrics = jax.device_get(train), jax.device_get(metrics)
        mb = jax.tree.map(lambda x: x[0], train)
        norms = algo.normalizers(train)
        # (batch as arguments, not constants baked into the program: the compile cache can hold it)
        got = jax.jit(jax.grad(lambda p, mb, norms: algo.loss(p, mb, norms, {})[0]))(state.params, mb, norms)
        params, rm_params = jax.device_get(state.params), jax.device_get(roles.params["reward"])
        _, step_m = jax.device_get(algo.update(state, roles, train))  # the jitted train step itself

    tok, cfg = algo.tokenizer, algo.cfg.model
    host = jax.device_get(out)
    idx = algo.row_prompts(batch)
    responses = [host["tokens"][r, :host["lengths"][r]].tolist() for r in range(len(idx))]
    # every group is a prompt under one setting, rendered by the template as SteerLM renders it
    prompts = [algo.train_prompts.examples[i].prompt for i in idx]
    strings = ["correctness:4,verbosity:0" if i % 2 == 0 else "verbosity:4" for i in idx]  # prompt x setting order
    cond = [[tok.bos_id] + tok.encode(f"<|system|>{s}<|user|>{p[-1]['content']}<|assistant|>")
            for p, s in zip(prompts, strings)]
    assert cond == [algo.train_prompts.ids[i] for i in idx]
    plain = [encode_prompt(p[-1]["content"], "tiny", tok) for p in prompts]
    target = np.asarray([[4.0, 0.0] if i % 2 == 0 else [0.0, 4.0] for i in idx])
    tmask = np.asarray([[1.0, 1.0] if i % 2 == 0 else [0.0, 1.0] for i in idx])

    prior = right_padded_logps(cfg, list(zip(plain, responses)))(params)  # prior = policy-init = the start
    current_fn = right_padded_logps(cfg, list(zip(cond, responses)))
    current = current_fn(params)
    tokens, pos, seg, _ = right_padded(list(zip(plain, responses)))
    pred = np.asarray(jax.jit(lambda p: sequence_scores(p, tokens, pos, seg, algo.rm_cfg))(rm_params))
    attr = -(((target - pred) * tmask) ** 2).sum(-1) / 2.0
    proposal = np.asarray([host["logprobs_tempered"][r, :host["lengths"][r]].sum() for r in range(len(idx))])
    G, K = 2, 3
    rs = lambda x: np.asarray(x, np.float64).reshape(G, K)  # noqa: E731
    w = np_softmax(rs(attr) + rs(prior) - rs(proposal), np.ones((G, K)))
    b = np_softmax(rs(current) - rs(proposal), np.ones((G, K)))
    np.testing.assert_allclose(mb["w"], w.reshape(-1), atol=2e-5)
    np.testing.assert_allclose(mb["b"], b.reshape(-1), atol=2e-5)
    assert abs(w - b).max() > 1e-2  # the step has something to learn
    lbar = np.repeat(rs([len(r) for r in responses]).mean(-1), K)
    coef = ((w - b).reshape(-1) / lbar).astype(np.float32)
    want = jax.jit(jax.grad(lambda p: -jnp.sum(coef * current_fn(p)) / G))(params)
    assert_trees_close(got, want, rtol=1e-4)
    want_loss = -float((coef * np.asarray(current)).sum()) / G
    np.testing.assert_allclose(step_m["loss"], want_loss, rtol=1e-4, atol=1e-6)
    norm = np.sqrt(sum(float((np.asarray(x, np.float64) ** 2).sum()) for x in jax.tree.leaves(want)))
    np.testing.assert_allclose(step_m["grad_norm"], norm, rtol=1e-4)
    assert step_m["skipped"] == 0
    for k in ("ess", "ess_fraction", "baseline_distance", "attribute_error", "attribute_error_weighted",
              "attribute_error_correctness", "attribute_error_verbosity", "kl_to_start"):
        assert np.isfinite(metrics[k]), k
    err = (np.abs(pred - target) * tmask).sum(-1) / tmask.sum(-1)
    np.testing.assert_allclose(metrics["attribute_error"], err.mean(), rtol=1e-4)
    np.testing.assert_allclose(metrics["ess"], np.mean(1 / (w ** 2).sum(-1)), rtol=1e-4)
    np.testing.assert_allclose(metrics["kl_to_start"], 0.0, atol=1e-4)  # the generator is the start policy
    # what `jalign generate --attributes` reads to render the string as training did
    assert json.loads((tmp_path / "steerlm.json").read_text())["attributes"] == ["correctness", "verbosity"]


def test_targets_and_conditioned_prompts_from_the_data(rm_dir, tmp_path):
    from jalign.data.chat import encode_prompt

    lines = [{"prompt": "37+48=", "attributes": {"verbosity": 0, "correctness": 4}},
             {"prompt": "12+30=", "attributes": {"verbosity": 4, "correctness": None}}]
    path = tmp_path / "prompts.jsonl"
    path.write_text("".join(json.dumps(x) + "\n" for x in lines))
    algo = SteerLM2(runtime([f"roles.reward=run:{rm_dir}", f"data.train={path}", "train.global_batch=2"]))
    tok = algo.tokenizer
    assert algo.train_prompts.ids == [
        [tok.bos_id] + tok.encode("<|system|>correctness:4,verbosity:0<|user|>37+48=<|assistant|>"),
        [tok.bos_id] + tok.encode("<|system|>verbosity:4<|user|>12+30=<|assistant|>")]
    assert algo.plain_prompts.ids == [encode_prompt(x["prompt"], "tiny", tok) for x in lines]
    np.testing.assert_array_equal(algo.target_values, [[4, 0], [0, 4]])
    np.testing.assert_array_equal(algo.target_mask, [[1, 1], [0, 1]])
    path.write_text(json.dumps(lines[0]) + "\n" + json.dumps({"prompt": "1+2="}) + "\n")
    with pytest.raises(ConfigError, match=f'{path}:2: this prompt has no "attributes"'):
        SteerLM2(runtime([f"roles.reward=run:{rm_dir}", f"data.train={path}", "train.global_batch=2"]))


def test_configuration_errors_name_the_key(rm_dir):
    rm = f"roles.reward=run:{rm_dir}"
    cases = [
        ([TARGETS], "steerlm2 needs an attribute model: set roles.reward"),
        ([rm, TARGETS, "algorithm.reward_attributes=[correctness,verbosity,humor]"],
         r"algorithm.reward_attributes \['correctness', 'verbosity', 'humor'\] names 3 attributes but "
         r"roles.reward=run:.* has num_attributes=2 outputs"),
        ([rm, 'algorithm.target_attributes=["helpfulness=4"]'],
         r"algorithm.target_attributes\[0\]: attribute\(s\) \['helpfulness'\] are not outputs of roles.reward"),
        ([rm, 'algorithm.target_attributes=["correctness=7"]'], r"correctness=7 is not an integer in \[0, 4\]"),
        ([rm, TARGETS, "algorithm.top_k=5"], "algorithm.top_k / algorithm.top_p truncate the proposal"),
        ([rm], 'builtin:addition_prompts:train.*has no "attributes".*set algorithm.target_attributes'),
        ([rm, TARGETS, "algorithm.steerlm2_iterations=3", "train.steps=10"],
         "steerlm2_iterations=3 must be >= 1 and divide train.steps=10"),
    ]
    for extra, text in cases:
        with pytest.raises(ConfigError, match=text):
            SteerLM2(runtime(extra))
    with pytest.raises(ConfigError, match="algorithm.attribute_sigma"):
        load_config(None, ["algorithm.name=steerlm2", "algorithm.attribute_sigma=0"])
    with pytest.raises(ConfigError, match="roles.critic: unknown role for algorithm 'steerlm2'"):
        load_config(None, ["algorithm.name=steerlm2", "roles.critic=policy-init"])


def test_tiny_config_loads():
    cfg = load_config(Path(__file__).parent.parent / "configs" / "steerlm2_tiny.yaml")
    assert cfg.algorithm.name == "steerlm2" and cfg.roles["reward"].source == "run:runs/steer_rm"


def test_resume_inside_a_round_equals_uninterrupted(rm_dir, tmp_path):
    from test_seam import _assert_bitwise, _resume_pair

    extra = [f"roles.reward=run:{rm_dir}", "roles.prior=policy-init", "algorithm.reward_attributes=null",
             "data.train=builtin:addition_prompts:train:8",
             "data.eval=null", "data.seq_len=48", "train.global_batch=4", "algorithm.num_rollouts_per_prompt=2",
             "algorithm.max_new_tokens=3", "algorithm.truncated_response=keep", "algorithm.steerlm2_iterations=2",
             "optim.lr=1e-2", "optim.warmup_steps=0", "train.eval_every=0",
             "algorithm.log_rollouts=true"]
    straight, sliced = _resume_pair(tmp_path, "configs/steerlm2_tiny.yaml", extra, steps=4, at=3)
    _assert_bitwise(straight, sliced, 4)
    assert (sliced / "rollouts.jsonl").read_text() == (straight / "rollouts.jsonl").read_text()
