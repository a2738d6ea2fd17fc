"""Generate-then-train through ``jalign train configs/<x>_tiny.yaml`` (the CLI's own entry point, in process):
each run logs its samples and training batches (``algorithm.log_rollouts``), and the test re-derives what the
algorithm must have done from them, independently: the rule's scores from the decoded texts, selection and
pairing from those scores, and the losses from the checkpointed params with NumPy log-softmax."""
import json
from pathlib import Path

import jax
import numpy as np
import pytest

from jalign import cli
from jalign.checkpoint import load_params
from jalign.config import load_config
from jalign.data.tokenizer import load_tokenizer
from jalign.metrics import read_metrics
from jalign.models import transformer as tfm
from jalign.rollout.experience import decode_responses

from gentrain_rules import char_score
from test_gentrain import make_lm_run
from test_seam import QUIET, TINY_MODEL

ROOT = Path(__file__).parent.parent
P = 8  # prompts per step: the rows divide over the 8 simulated devices
RULE = "algorithm.reward_fn=tests/gentrain_rules.py:char_score"
COMMON = [*QUIET, "data.eval=null", "eval.prompts=0", "train.eval_every=0", "algorithm.log_rollouts=true",
          f"train.global_batch={P}", "algorithm.max_new_tokens=3", "optim.warmup_steps=0", "optim.lr=1e-2",
          "optim.schedule=constant", "train.keep_checkpoints=10"]


def run(config: str, out: Path, *overrides) -> Path:
    """``jalign train configs/CONFIG train.out_dir=OUT ...``; it must exit 0."""
    argv = ["train", str(ROOT / "configs" / config), *COMMON, *overrides, f"train.out_dir={out}",
            "--no-compile-cache"]  # keep the tests' own compile cache
    assert cli.main(argv) == 0
    return out


def rollouts(out: Path) -> dict:
    return {r["step"]: r for r in map(json.loads, (out / "rollouts.jsonl").read_text().splitlines())}


def metrics(out: Path) -> dict:
    return {r["step"]: r for r in read_metrics(out) if "loss" in r}


def texts_and_scores(out: Path, r: dict):
    """The decoded responses of a logged step and char_score of each, recomputed from the token ids."""
    cfg = load_config(out / "config.yaml")
    tok = load_tokenizer(cfg.model.tokenizer)
    lengths = [len(t) for t in r["responses"]]
    padded = np.zeros((len(lengths), max(lengths)), np.int64)
    for i, t in enumerate(r["responses"]):
        padded[i, :len(t)] = t
    texts = decode_responses(tok, padded, np.asarray(lengths), np.asarray(r["ended_with_eos"]))
    return texts, np.asarray([char_score(None, t, None) for t in texts]), cfg


def trained_responses(train: dict, mask_key: str) -> list:
    """The response tokens of every training row (the targets where the loss mask is on), flattened over
    [accum, micro] (and the pair side when present)."""
    t, m = np.asarray(train["targets"]), np.asarray(train[mask_key])
    t, m = t.reshape(-1, t.shape[-1]), m.reshape(-1, m.shape[-1])
    return [row[mask > 0].tolist() for row, mask in zip(t, m)]


def np_token_logps(params, cfg, rows: dict) -> np.ndarray:
    """log softmax(h W)[target] in float64 NumPy, from jalign's final hidden states (the model itself is checked
    against transformers in test_hf_io)."""
    shape = np.asarray(rows["tokens"]).shape
    flat = {k: np.asarray(rows[k]).reshape(-1, shape[-1]) for k in ("tokens", "positions", "segment_ids", "targets")}
    h = np.asarray(tfm.forward(params, flat["tokens"], flat["positions"], flat["segment_ids"], cfg), np.float64)
    z = h @ np.asarray(tfm.unembed_matrix(params, cfg), np.float64)
    z = z - z.max(-1, keepdims=True)
    logp = z - np.log(np.exp(z).sum(-1, keepdims=True))
    return np.take_along_axis(logp, flat["targets"][..., None], -1)[..., 0].reshape(shape)


def log_sigmoid(x):
    return -np.logaddexp(0.0, -x)


@pytest.fixture(scope="module")
def start_dir(tmp_path_factory):
    """A run dir of random tiny weights (1 layer): the policy's start and the reference, read back exactly."""
    return make_lm_run(tmp_path_factory.mktemp("start"), 11, model=TINY_MODEL[:-1])


# ---- rejection sampling ---------------------------------------------------------------------------
def test_rs_keeps_the_best_sample_by_the_recomputed_reward(tmp_path):
    out = run("rs_tiny.yaml", tmp_path / "top1", *TINY_MODEL, RULE, "roles.reward=null", "train.steps=2",
              "algorithm.rs_iterations=1", "algorithm.num_rollouts_per_prompt=4", "algorithm.top_n=1",
              "algorithm.truncated_response=keep")
    logged, m = rollouts(out), metrics(out)
    assert sorted(logged) == [1, 2]
    for step, r in logged.items():
        texts, score, _ = texts_and_scores(out, r)
        np.testing.assert_allclose(r["rule_score"], score, rtol=1e-6)
        grouped = score.reshape(P, 4)
        best = np.argmax(grouped, axis=1)  # ties: the lower index, as np.argmax
        expected = [r["responses"][4 * p + k] for p, k in enumerate(best)]
        assert trained_responses(r["train"], "weight") == expected, step
        assert m[step]["kept_fraction"] == pytest.approx(0.25)
        assert m[step]["reward_kept_mean"] == pytest.approx(grouped.max(1).mean(), rel=1e-5)
        assert m[step]["reward_mean"] == pytest.approx(score.mean(), rel=1e-5)
        assert m[step]["reward_kept_mean"] >= m[step]["reward_mean"]


def test_rs_threshold_keeps_exactly_the_samples_above_it(tmp_path):
    out = run("rs_tiny.yaml", tmp_path / "thr", *TINY_MODEL, RULE, "roles.reward=null", "train.steps=1",
              "algorithm.rs_iterations=1", "algorithm.num_rollouts_per_prompt=4", "algorithm.top_n=4",
              "algorithm.threshold=0.5", "algorithm.truncated_response=keep")
    r = rollouts(out)[1]
    _, score, _ = texts_and_scores(out, r)
    kept = sorted(map(tuple, (t for t in trained_responses(r["train"], "weight") if t)))
    assert kept == sorted(tuple(r["responses"][i]) for i in np.flatnonzero(score >= 0.5))
    assert 0 < len(kept) < 4 * P  # the case tests something: some kept, some not
    assert metrics(out)[1]["kept_fraction"] == pytest.approx(len(kept) / (4 * P))


# ---- online DPO -----------------------------------------------------------------------------------
def test_online_dpo_pairs_best_against_worst_and_its_loss_is_dpo(tmp_path, start_dir):
    out = run("online_dpo_tiny.yaml", tmp_path / "odpo", *TINY_MODEL, f"model.init_from={start_dir}",
              f"roles.reference=run:{start_dir}", RULE, "roles.reward=null", "train.steps=2",
              "train.checkpoint_every=1", "algorithm.num_rollouts_per_prompt=3", "algorithm.sft_weight=0.0",
              "algorithm.beta=0.5", "algorithm.truncated_response=keep")
    logged, m = rollouts(out), metrics(out)
    start, after1 = load_params(start_dir), load_params(out, step=1)
    for step, r in logged.items():
        _, score, cfg = texts_and_scores(out, r)
        grouped = score.reshape(P, 3)
        c, j = np.argmax(grouped, 1), np.argmin(grouped, 1)
        expected = [r["responses"][3 * p + k] for p in range(P) for k in (c[p], j[p])]
        tr = r["train"]
        assert trained_responses(tr, "loss_mask") == expected, step
        valid = np.asarray(tr["valid"]).reshape(-1)
        np.testing.assert_array_equal(valid, grouped.max(1) > grouped.min(1))
        # the loss from NumPy log-probs of the logged pairs under the step's policy and the start (reference)
        policy = start if step == 1 else after1
        mask = np.asarray(tr["loss_mask"])
        pi = (np_token_logps(policy, cfg.model, tr) * mask).sum(-1).reshape(-1, 2)
        ref = (np_token_logps(start, cfg.model, tr) * mask).sum(-1).reshape(-1, 2)
        np.testing.assert_allclose(np.asarray(tr["ref_logps"]).reshape(-1, 2), ref, rtol=1e-4, atol=1e-4)
        delta = (pi[:, 0] - ref[:, 0]) - (pi[:, 1] - ref[:, 1])
        expected_loss = np.sum(valid * -log_sigmoid(0.5 * delta)) / valid.sum()
        assert m[step]["preference_loss"] == pytest.approx(expected_loss, rel=1e-4, abs=1e-5), step
    assert m[2]["preference_loss"] != pytest.approx(np.log(2), abs=1e-4)  # step 2's policy has moved


# ---- SPIN -----------------------------------------------------------------------------------------
def test_spin_opponent_is_the_previous_iterate_and_its_loss_is_spin(tmp_path, start_dir):
    out = run("spin_tiny.yaml", tmp_path / "spin", *TINY_MODEL, f"model.init_from={start_dir}", "train.steps=4",
              "algorithm.spin_iterations=2", "train.checkpoint_every=1", "algorithm.lam=0.5", "algorithm.sft_weight=0",
              "data.train=builtin:addition:train:64")
    logged, m = rollouts(out), metrics(out)
    iterate = load_params(out / "iterates", step=1)
    jax.tree.map(np.testing.assert_array_equal, iterate, load_params(out, step=2))  # the end of round 0
    start = load_params(start_dir)
    for step in (2, 4):  # the second step of each round: the policy has moved away from the opponent
        r = logged[step]
        tr, cfg = r["train"], load_config(out / "config.yaml")
        opponent = start if step == 2 else iterate
        policy = load_params(out, step=step - 1)
        gen = trained_responses({k: np.asarray(tr[k])[:, :, 1] for k in ("targets", "loss_mask")}, "loss_mask")
        assert gen == r["responses"]  # side 1: the opponent's samples of this step
        mask = np.asarray(tr["loss_mask"])
        pi = (np_token_logps(policy, cfg.model, tr) * mask).sum(-1).reshape(-1, 2)
        op = (np_token_logps(opponent, cfg.model, tr) * mask).sum(-1).reshape(-1, 2)
        np.testing.assert_allclose(np.asarray(tr["ref_logps"]).reshape(-1, 2), op, rtol=1e-4, atol=1e-4)
        v = np.asarray(tr["valid"]).reshape(-1)
        z = 0.5 * ((pi[:, 0] - op[:, 0]) - (pi[:, 1] - op[:, 1]))
        expected = np.sum(v * np.logaddexp(0.0, -z)) / v.sum()  # L_SPIN, Chen et al. 2024 Sec. 4, l(z) = log(1+e^-z)
        assert m[step]["loss"] == pytest.approx(expected, rel=1e-4, abs=1e-5), step
        assert abs(expected - np.log(2)) > 1e-4


# ---- on-policy distillation -----------------------------------------------------------------------
def test_opd_reverse_kl_to_the_teacher_on_the_students_samples(tmp_path, start_dir, tmp_path_factory):
    teacher = make_lm_run(tmp_path_factory.mktemp("teacher1"), 7, model=TINY_MODEL[:-1], sharpen=8.0)
    out = run("opd_tiny.yaml", tmp_path / "opd", *TINY_MODEL, f"model.init_from={start_dir}",
              f"roles.teacher=run:{teacher}", "train.steps=2", "train.checkpoint_every=1",
              "algorithm.num_rollouts_per_prompt=2")
    logged, m = rollouts(out), metrics(out)
    t_params, cfg = load_params(teacher), load_config(out / "config.yaml")
    for step, r in logged.items():
        tr = r["train"]
        assert trained_responses(tr, "mask") == r["responses"]  # every sample of the student, all its tokens
        student = load_params(start_dir) if step == 1 else load_params(out, step=1)
        s, t = np_token_logps(student, cfg.model, tr), np_token_logps(t_params, cfg.model, tr)
        mask = np.asarray(tr["mask"])
        np.testing.assert_allclose(np.asarray(tr["teacher_logps"]) * mask, t * mask, rtol=1e-4, atol=1e-4)
        expected = np.sum(mask * (s - t)) / mask.sum()  # k1 estimate of KL(student || teacher) per token
        assert m[step]["reverse_kl"] == pytest.approx(expected, rel=1e-4, abs=1e-5), step
        assert expected > 0.1  # a peaked teacher, away from the student


# ---- Constitutional AI ----------------------------------------------------------------------------
CONSTITUTION = """\
- name: odd
  critique_request: Odd?
  revision_request: Redo.
  judge_question: Which is odd?
- name: even
  critique_request: Even?
  revision_request: Again.
  judge_question: Which is even?
"""


@pytest.fixture(scope="module")
def constitution(tmp_path_factory):
    path = tmp_path_factory.mktemp("constitution") / "constitution.yaml"
    path.write_text(CONSTITUTION)
    return str(path), {p["name"]: p for p in __import__("yaml").safe_load(CONSTITUTION)}


def test_cai_sl_trains_on_revisions_of_critiques_built_from_the_constitution(tmp_path, start_dir, constitution,
                                                                             tmp_path_factory):
    path, principles = constitution
    critic = make_lm_run(tmp_path_factory.mktemp("critic"), 5, model=TINY_MODEL[:-1])
    out = run("cai_sl_tiny.yaml", tmp_path / "cai_sl", *TINY_MODEL, f"model.init_from={start_dir}",
              f"roles.critic=run:{critic}", f"algorithm.constitution={path}", "train.steps=1",
              "algorithm.critique_max_new_tokens=4", "algorithm.revision_max_new_tokens=3",
              "algorithm.truncated_revision=keep")  # a random critic never ends
    r = rollouts(out)[1]
    texts, _, cfg = texts_and_scores(out, r)
    assert r["answers"] == texts  # the policy's own samples are what gets critiqued
    assert set(r["principles"]) <= set(principles) and len(set(r["principles"])) == 2  # both drawn
    for i, name in enumerate(r["principles"]):
        p, prompt, answer = principles[name], r["prompts"][i], r["answers"][i]
        assert r["critique_prompts"][i] == f"{prompt}{answer}\n{p['critique_request']}"
        assert r["revision_prompts"][i] == (f"{prompt}{answer}\n{p['critique_request']}\n{r['critiques'][i]}\n"
                                            f"{p['revision_request']}")
    # SFT on the final revisions, not on the answers
    tok = load_tokenizer(cfg.model.tokenizer)
    trained = trained_responses(r["train"], "loss_mask")
    kept = [i for i, t in enumerate(trained) if t]
    assert kept, "no revision was trained on"
    for i in kept:
        ids = [t for t in trained[i] if t not in tok.eos_ids]
        assert tok.decode(ids) == r["revisions"][i]


def test_cai_rlaif_pairs_follow_the_judges_both_orders_preference(tmp_path, start_dir, constitution, tmp_path_factory):
    from jalign.data.chat import encode_prompt

    path, principles = constitution
    judge = make_lm_run(tmp_path_factory.mktemp("judge"), 9, model=TINY_MODEL[:-1], sharpen=4.0)
    out = run("cai_rlaif_tiny.yaml", tmp_path / "rlaif", *TINY_MODEL, f"model.init_from={start_dir}",
              f"roles.judge=run:{judge}", f"algorithm.constitution={path}", "train.steps=1",
              "algorithm.min_confidence=0.0", "algorithm.sft_weight=0.0")
    r = rollouts(out)[1]
    texts, _, cfg = texts_and_scores(out, r)
    tok = load_tokenizer(cfg.model.tokenizer)
    first, second = texts[0::2], texts[1::2]
    q = [principles[n]["judge_question"] for n in r["principles"]]
    shown = [f"{t}\n{qq}\nA: {a}\nB: {b}" for t, qq, a, b in zip(r["prompts"], q, first, second)]
    assert r["judge_prompts"] == shown
    swapped = [f"{t}\n{qq}\nA: {b}\nB: {a}" for t, qq, a, b in zip(r["prompts"], q, first, second)]
    # the judge's choice-token log-probs after each prompt, in NumPy (right padding: causal, so harmless)
    ids = [encode_prompt(x, cfg.data.chat_template, tok) for x in shown + swapped]
    L = max(map(len, ids))
    rows = {"tokens": np.zeros((len(ids), L), np.int32), "segment_ids": np.zeros((len(ids), L), np.int32),
            "positions": np.tile(np.arange(L, dtype=np.int32), (len(ids), 1))}
    for i, x in enumerate(ids):
        rows["tokens"][i, :len(x)], rows["segment_ids"][i, :len(x)] = x, 1
    params = load_params(judge)
    h = np.asarray(tfm.forward(params, rows["tokens"], rows["positions"], rows["segment_ids"], cfg.model), np.float64)
    last = h[np.arange(len(ids)), [len(x) - 1 for x in ids]] @ np.asarray(tfm.unembed_matrix(params, cfg.model),
                                                                           np.float64)
    a_id, b_id = tok.encode("A")[0], tok.encode("B")[0]
    n = len(shown)
    p1 = 1 / (1 + np.exp(-(last[:n, a_id] - last[:n, b_id])))  # response 1 shown first as A
    p2 = 1 / (1 + np.exp(-(last[n:, b_id] - last[n:, a_id])))  # response 1 shown second, as B
    p = (p1 + p2) / 2
    np.testing.assert_allclose(r["prob_first"], p, rtol=1e-4, atol=1e-5)
    label = p > 0.5
    assert 0 < label.sum() < n  # the judge prefers first answers sometimes, second ones other times
    expected = [r["responses"][2 * i + (0 if label[i] else 1)] for i in range(n)]
    pairs = trained_responses({k: np.asarray(r["train"][k])[:, :, 0] for k in ("targets", "loss_mask")}, "loss_mask")
    valid = np.asarray(r["train"]["valid"]).reshape(-1) > 0
    np.testing.assert_array_equal(valid, np.asarray([a != b for a, b in zip(first, second)]) & (np.abs(2 * p - 1) > 0))
    assert [c for c, v in zip(pairs, valid) if v] == [e for e, v in zip(expected, valid) if v]
