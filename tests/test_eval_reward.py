"""``eval.reward``: a rule scored on every generated eval answer by the algorithms without a reward of their
own, seeing each held-out example's own prompt text (checked with a rule that reads only the prompt, against
the eval data's prompts); refused with one ConfigError where the algorithm scores with its own reward."""
from pathlib import Path

import numpy as np
import pytest

from jalign.config import ConfigError, load_config
from jalign.data.tiny import load_builtin
from jalign.metrics import read_metrics
from jalign.trainer import setup, train

ROOT = Path(__file__).parent.parent
RULE = "eval.reward=tests/test_eval_reward.py:first_operand"
TINY = ["model.hidden=32", "model.mlp=64", "model.layers=1", "model.heads=4", "model.kv_heads=2",
        "model.init_from=null", "train.progress=false", "train.tensorboard=false",
        "train.async_checkpointing=false", "train.steps=1", "train.global_batch=8", "train.eval_batches=1",
        "eval.max_new_tokens=4"]


def first_operand(prompt, response, reference, **_):
    """A rule that reads only the prompt ("37+48=" -> 37): the eval's mean is then the prompts' mean."""
    return float(prompt.split("+")[0])


def _eval_prompts(spec: str, kind: str) -> list:
    """The eval data's prompts with a text reference, each once, in order (independently of jalign's data)."""
    prompts = []
    for ex in load_builtin(spec, kind):
        if (kind != "unpaired" or ex.label) and ex.prompt not in prompts:
            prompts.append(ex.prompt)
    return prompts


def test_eval_reward_scores_each_eval_prompts_own_text(tmp_path):
    spec = "builtin:addition:eval:12"
    train(load_config(ROOT / "configs/sft_tiny.yaml", TINY + [
        "data.train=builtin:addition:train:16", f"data.eval={spec}", "eval.prompts=12", RULE,
        f"train.out_dir={tmp_path / 'run'}"]))
    row = next(r for r in read_metrics(tmp_path / "run") if r.get("step") == 0 and "eval/greedy_reward" in r)
    want = np.mean([first_operand(p, "", None) for p in _eval_prompts(spec, "sft")])
    assert row["eval/greedy_reward"] == pytest.approx(want, rel=1e-6)


def test_eval_reward_texts_follow_the_unpaired_eval_selection(tmp_path):
    """KTO's eval set keeps each (prompt, desirable completion) once: the texts must follow that selection."""
    spec = "builtin:addition_unpaired:eval:12"
    cfg = load_config(ROOT / "configs/kto_tiny.yaml", TINY + [
        "data.train=builtin:addition_unpaired:train:16", f"data.eval={spec}", "eval.prompts=24",
        "roles.reference=null", RULE, f"train.out_dir={tmp_path / 'run'}"])
    _, algo = setup(cfg)
    assert algo.generation_eval.prompts.texts == _eval_prompts(spec, "unpaired")
    assert algo.generation_eval.terms[0].rule("12+30=", "", None, None) == 12.0


def test_eval_reward_is_refused_where_the_algorithm_has_its_own_reward(tmp_path):
    with pytest.raises(ConfigError, match=r"eval.reward=.* is not used: grpo scores its evaluation"):
        train(load_config(ROOT / "configs/grpo_tiny.yaml", TINY + [RULE, f"train.out_dir={tmp_path / 'run'}"]))
