"""SPIN with ``algorithm.sft_weight``: the loss is L_SPIN + w x the token-mean NLL of every gold response,
both recomputed in NumPy from the logged batch and the checkpointed params (as the plain SPIN test)."""
import numpy as np
import pytest

from jalign.checkpoint import load_params
from jalign.config import load_config

from test_gentrain_runs import metrics, np_token_logps, rollouts, run, start_dir  # noqa: F401 (a fixture)
from test_seam import TINY_MODEL


def test_spin_with_an_nll_term_is_spin_plus_the_gold_nll(tmp_path, start_dir):  # noqa: F811
    w = 0.7
    out = run("spin_tiny.yaml", tmp_path / "spin", *TINY_MODEL, f"model.init_from={start_dir}", "train.steps=2",
              "algorithm.spin_iterations=1", "train.checkpoint_every=1", "algorithm.lam=0.5",
              f"algorithm.sft_weight={w}", "data.train=builtin:addition:train:64")
    r, m = rollouts(out)[2], metrics(out)[2]
    tr, cfg = r["train"], load_config(out / "config.yaml")
    policy, opponent = load_params(out, step=1), load_params(start_dir)
    mask = np.asarray(tr["loss_mask"])
    lp = np_token_logps(policy, cfg.model, tr) * mask
    pi, op = lp.sum(-1).reshape(-1, 2), (np_token_logps(opponent, cfg.model, tr) * mask).sum(-1).reshape(-1, 2)
    v = np.asarray(tr["valid"]).reshape(-1)
    z = 0.5 * ((pi[:, 0] - op[:, 0]) - (pi[:, 1] - op[:, 1]))
    spin = np.sum(v * np.logaddexp(0.0, -z)) / v.sum()
    gold_lp, gold_mask = lp.reshape(-1, 2, lp.shape[-1])[:, 0], mask.reshape(-1, 2, mask.shape[-1])[:, 0]
    nll = -np.sum(gold_lp) / np.sum(gold_mask)  # every gold response, identical pairs too
    assert m["spin_loss"] == pytest.approx(spin, rel=1e-4, abs=1e-5)
    assert m["sft_loss"] == pytest.approx(nll, rel=1e-4, abs=1e-5)
    assert m["loss"] == pytest.approx(spin + w * nll, rel=1e-4, abs=1e-5)
    assert nll > 0.1 and v.sum() > 0
