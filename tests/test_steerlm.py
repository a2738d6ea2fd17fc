"""SteerLM: the attribute string and the conditioned prompt token for token (tiny template, and an HF template
against transformers), annotation writes every line once with its attributes (raw values recomputed with
transformers from the HF export), the conditioned SFT sharded == unsharded with accumulation, resume ==
uninterrupted, the steered evals and ``jalign generate --attributes``."""
import json
from pathlib import Path

import jax
import numpy as np
import pytest

from jalign import cli
from jalign.algorithms import base
from jalign.algorithms.steerlm import SteerLM
from jalign.annotate import annotate_file, quantize
from jalign.config import ConfigError, load_config
from jalign.data.chat import encode_pair
from jalign.data.formats import DataError
from jalign.data.steer import attribute_string, condition_prompt, parse_attribute_values, steered_prompt_ids
from jalign.data.tokenizer import load_tokenizer
from jalign.data.tiny_steer import answer_correct, final_answer, true_attributes, working
from jalign.metrics import read_metrics
from jalign.trainer import train
from sharding import make_mesh, make_rules, use_rules
from helpers import assert_trees_close
from test_data import LLAMA3_TEMPLATE, make_hf_dir
from test_seam import _assert_bitwise, _resume_pair

ROOT = Path(__file__).parent.parent
MODEL = ["model.hidden=32", "model.mlp=64", "model.layers=1", "model.heads=4", "model.kv_heads=2",
         "model.init_from=null"]
QUIET = ["train.progress=false", "train.tensorboard=false", "train.async_checkpointing=false", "train.log_every=1"]
TINY = MODEL + QUIET + [
    "data.train=builtin:addition_steer_rm:train:8", "data.eval=builtin:addition_steer:eval:8", "data.seq_len=64",
    "train.global_batch=8", "train.steps=4", "train.eval_batches=2", "eval.prompts=4", "eval.max_new_tokens=4",
    "optim.lr=1e-2", "optim.warmup_steps=0", "optim.schedule=constant", "optim.eps=1e-4",
]


# ---- the attribute string and the rendered prompt ----------------------------------------------------
def test_attribute_string_order_and_errors():
    values = parse_attribute_values("verbosity=0, correctness:4")
    assert values == {"verbosity": 0, "correctness": 4}
    assert attribute_string(values, ["quality", "correctness", "verbosity"]) == "correctness:4,verbosity:0"
    assert attribute_string({"correctness": 4.0, "verbosity": None}, ["correctness", "verbosity"]) == "correctness:4"
    with pytest.raises(ConfigError, match=r"unknown attribute\(s\) \['humor'\]"):
        attribute_string({"humor": 1}, ["correctness"])
    with pytest.raises(ConfigError, match=r"correctness=5 is not an integer in \[0, 4\]"):
        attribute_string({"correctness": 5}, ["correctness"])
    with pytest.raises(ConfigError, match=r"correctness=2.5 is not an integer"):
        attribute_string({"correctness": 2.5}, ["correctness"])
    for bad, msg in (("correctness", "not name=value"), ("correctness=high", "are integers"),
                     ("a=1,a=2", "given twice")):
        with pytest.raises(ConfigError, match=msg):
            parse_attribute_values(bad)


def test_conditioned_prompt_is_the_templates_rendering_token_for_token(tmp_path):
    tok = load_tokenizer("byte")
    ids = steered_prompt_ids("37+48=", {"verbosity": 0, "correctness": 4}, tok, "tiny", ["correctness", "verbosity"])
    assert ids == [tok.bos_id] + tok.encode("<|system|>correctness:4,verbosity:0<|user|>37+48=<|assistant|>")
    # an existing system message keeps its text, the attributes follow on a new line
    msgs = condition_prompt([{"role": "system", "content": "Be brief."}, {"role": "user", "content": "hi"}], "q:1")
    assert msgs == [{"role": "system", "content": "Be brief.\nq:1"}, {"role": "user", "content": "hi"}]
    # a Hugging Face chat template: what transformers' apply_chat_template renders and tokenizes
    transformers = pytest.importorskip("transformers")
    d = make_hf_dir(tmp_path / "m", LLAMA3_TEMPLATE)
    ref = transformers.PreTrainedTokenizerFast.from_pretrained(str(d))
    hf = load_tokenizer(str(d))
    got = steered_prompt_ids("What is 2+2?", {"correctness": 4}, hf, "hf", ["correctness", "verbosity"])
    want = ref.apply_chat_template([{"role": "system", "content": "correctness:4"},
                                    {"role": "user", "content": "What is 2+2?"}], tokenize=True,
                                   add_generation_prompt=True, return_dict=False)
    assert got == list(want)


def test_training_rows_condition_the_prompt_and_train_the_response_only(tmp_path):
    algo = make_algo(tmp_path)
    tok = algo.tokenizer
    ex = algo.data.train_examples[0]
    text = attribute_string(ex.attributes, ["correctness", "verbosity"])
    p, r = encode_pair([{"role": "system", "content": text}, {"role": "user", "content": ex.prompt}], ex.response,
                       "tiny", tok)
    rec = algo.data.train_records[0]
    assert rec["tokens"].tolist() + rec["targets"].tolist()[-1:] == p + r
    assert rec["loss_mask"].tolist() == [0] * (len(p) - 1) + [1] * len(r)
    assert tok.decode(p, skip_special=False).startswith(f"<|bos|><|system|>{text}<|user|>")


def test_tiny_task_attributes_have_a_ground_truth():
    assert working(37, 48) == "7+8=15, carry 1, 3+4+1=8 -> 85"
    assert working(37, 48, carry=False) == "7+8=15, 3+4=7 -> 75"
    assert final_answer(working(57, 68)) == "125" and final_answer("85") == "85"
    assert true_attributes("37+48=", "75") == {"correctness": 0.0, "verbosity": 0.0}
    assert true_attributes("37+48=", working(37, 48)) == {"correctness": 4.0, "verbosity": 4.0}
    assert answer_correct("37+48=", working(37, 48), "85") == 1.0 and answer_correct("37+48=", "75", "85") == 0.0
    from jalign.data.sources import load_source

    for spec, kind in (("builtin:addition_steer_rm:feedback:20", "reward"), ("builtin:addition_steer:eval:5", "steer")):
        for ex in load_source(spec, kind)[0]:
            assert ex.attributes == true_attributes(ex.prompt, ex.response)
    sloppy, _ = load_source("builtin:addition_steer_sloppy:train:40", "sft")
    truth = [true_attributes(e.prompt, e.response) for e in sloppy]
    assert 0.3 < np.mean([t["verbosity"] > 0 for t in truth]) < 0.7 and any(t["correctness"] == 0 for t in truth)


def test_labelled_worked_answers_are_their_own_working():
    """The regression RM's labelled data: a worked answer is its working carried out (right, or with the carry
    error in its steps), never a wrong final number after right working -- the tiny RM cannot check a sum, so
    those made every right worked answer ambiguous (benchmarks/demos.py, issue 14). Per prompt: right and carry
    error, terse and worked, and one terse wrong digit."""
    from collections import Counter

    from jalign.data.tiny import has_carry
    from jalign.data.tiny_steer import addition_steer_rm

    examples = addition_steer_rm("feedback", 30, seed=1)
    per_prompt = Counter(ex.prompt for ex in examples)
    assert len(per_prompt) == 30 and set(per_prompt.values()) == {5}
    for ex in examples:
        a, b = (int(x) for x in ex.prompt[:-1].split("+"))
        if ex.attributes["verbosity"] > 0:
            assert ex.response in (working(a, b), working(a, b, carry=not has_carry(a, b)))
    forms = Counter((ex.attributes["correctness"], ex.attributes["verbosity"]) for ex in examples)
    assert forms == {(4.0, 0.0): 30, (4.0, 4.0): 30, (0.0, 4.0): 30, (0.0, 0.0): 60}


# ---- annotation -------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def reward_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("rm")
    train(load_config(ROOT / "configs/rm_tiny.yaml", MODEL + QUIET + [
        f"train.out_dir={out / 'run'}", "algorithm.loss=regression", "algorithm.num_attributes=2",
        "data.train=builtin:addition_steer_rm:train:4", "data.eval=null", "data.seq_len=48", "train.steps=3",
        "train.global_batch=8", "train.eval_every=0", "optim.lr=1e-2", "optim.warmup_steps=0",
        f"train.export_hf={out / 'hf'}"]))
    return out


def test_quantize_clamps_then_rounds():
    assert [quantize(v) for v in (-0.7, 0.49, 0.51, 2.5, 3.5, 3.6, 9.0)] == [0, 0, 1, 2, 4, 4, 4]
    assert quantize(7.2, max_value=9) == 7


def test_annotate_writes_every_line_once_with_its_attributes(reward_run, tmp_path):
    transformers = pytest.importorskip("transformers")
    torch = pytest.importorskip("torch")
    lines = [{"prompt": "37+48=", "response": "85", "id": 1, "extra": {"k": [1, 2]}},
             {"messages": [{"role": "user", "content": "12+13="}, {"role": "assistant", "content": "25"}], "id": 2},
             {"prompt": "37+48=", "response": working(37, 48, carry=False), "id": 3},
             {"prompt": "37+48=", "response": "85", "id": 4, "attributes": {"old": 1}}]
    src = tmp_path / "sft.jsonl"
    src.write_text("\n".join(json.dumps(o) for o in lines[:2]) + "\n\n" + "\n".join(json.dumps(o) for o in lines[2:])
                   + "\n")
    out = tmp_path / "out.jsonl"
    counts = annotate_file(str(reward_run / "run"), str(src), str(out), log=lambda *_: None)
    got = [json.loads(x) for x in out.read_text().splitlines()]
    assert counts["lines"] == 4 and counts["attributes"] == ["correctness", "verbosity"] and len(got) == 4
    for want, row in zip(lines, got):
        assert {k: v for k, v in row.items() if k not in ("attributes", "attributes_raw")} == \
            {k: v for k, v in want.items() if k != "attributes"}  # every other field kept, in order
        assert set(row["attributes"]) == set(row["attributes_raw"]) == {"correctness", "verbosity"}
        assert row["attributes"] == {k: quantize(v) for k, v in row["attributes_raw"].items()}
    # the raw values are what transformers computes with the exported sequence classifier
    hf = reward_run / "hf"
    head = json.loads((hf / "reward_head.json").read_text())
    model = transformers.AutoModelForSequenceClassification.from_pretrained(hf, dtype=torch.float32).eval()
    tok = load_tokenizer("byte")
    for want, row in zip(lines, got):
        prompt = want.get("prompt", want.get("messages", [None])[:1])
        response = want.get("response") or want["messages"][-1]["content"]
        p, r = encode_pair(prompt, response, "tiny", tok)
        with torch.no_grad():
            logits = model(torch.tensor([p + r])).logits[0].numpy() + np.asarray(head["score_bias"])
        np.testing.assert_allclose([row["attributes_raw"][n] for n in head["attributes"]], logits, rtol=1e-4,
                                   atol=1e-5)
    # a bad line: file:line, and nothing written
    src.write_text(json.dumps(lines[0]) + "\n" + '{"prompt": "1+1="}\n')
    with pytest.raises(DataError, match=r"sft.jsonl:2: missing field \"response\""):
        annotate_file(str(reward_run / "run"), str(src), str(tmp_path / "never.jsonl"), log=lambda *_: None)
    assert not (tmp_path / "never.jsonl").exists()
    rc = cli.main(["annotate", "--model", str(tmp_path), "--input", str(src), "--output", str(tmp_path / "x")])
    assert rc == 2  # not a reward model: one line, exit 2


# ---- the algorithm ----------------------------------------------------------------------------------
def make_algo(tmp_path, shape=None, *extra):
    mesh = make_mesh(*shape) if shape else make_mesh(1, 1, 1, 1, devices=jax.devices()[:1])
    cfg = load_config(ROOT / "configs/steerlm_tiny.yaml", TINY + [f"train.out_dir={tmp_path}", *extra])
    rt = base.Runtime(cfg=cfg, mesh=mesh, rules=make_rules(), run_dir=Path(tmp_path), log=lambda *a: None)
    return SteerLM(rt)


def run(algo, batches):
    with use_rules(algo.rt.mesh, algo.rt.rules):
        state = algo.init_state(None)
        out = []
        for b in batches:
            state, m = algo.step(state, None, b)
            out.append({k: float(v) for k, v in jax.device_get(m).items()})
    return out, jax.device_get(state.params)


def test_sharded_and_accumulated_equal_one_device(tmp_path):
    single = make_algo(tmp_path / "one")
    assert single.role_specs() == {}  # SteerLM is SFT: no frozen model to keep unchanged
    batch = next(single.train_batches())
    want, want_params = run(single, [batch])
    for shape, accum in (((2, 2, 2, 1), 2), ((1, 2, 2, 2), 1)):
        got, params = run(make_algo(tmp_path / f"{shape}", shape, f"train.micro_batch={8 // accum}"), [batch])
        for k in ("loss", "grad_norm", "num_tokens"):
            np.testing.assert_allclose(got[0][k], want[0][k], rtol=1e-5, err_msg=f"{shape} {k}")
        assert_trees_close(params, want_params)


def test_resume_equals_uninterrupted(tmp_path):
    straight, sliced = _resume_pair(tmp_path, "configs/steerlm_tiny.yaml", [
        "data.train=builtin:addition_steer_rm:train:8", "data.eval=null", "data.seq_len=64", "train.global_batch=8",
        "train.eval_every=0", "optim.lr=1e-2", "optim.warmup_steps=0"])
    _assert_bitwise(straight, sliced, 4)


def test_train_steered_evals_and_generate_with_attributes(tmp_path, capsys):
    out = tmp_path / "steer"
    last = train(load_config(ROOT / "configs/steerlm_tiny.yaml", TINY + [f"train.out_dir={out}",
                                                                            "train.eval_every=4"]))
    assert "eval/exact_match" in last and "eval/greedy_reward" in last  # the data's own attributes
    for setting in ("steer_correctness4_verbosity0", "steer_correctness0_verbosity0", "steer_correctness4_verbosity4"):
        assert f"eval/{setting}/exact_match" in last and f"eval/{setting}/greedy_response_length" in last
    losses = [r["loss"] for r in read_metrics(out) if "loss" in r]
    assert losses[-1] < losses[0]
    assert json.loads((out / "steerlm.json").read_text())["attributes"] == ["correctness", "verbosity"]
    with pytest.raises(ConfigError, match=r"algorithm.eval_attributes\[0\]: unknown attribute\(s\) \['humor'\]"):
        make_algo(tmp_path / "bad", None, "algorithm.eval_attributes=[humor=1]")
    from jalign.generate import _steered

    tok = load_tokenizer("byte")
    assert _steered(str(out), "verbosity=4,correctness=0", ["37+48="], tok, "tiny") == [
        [tok.bos_id] + tok.encode("<|system|>correctness:0,verbosity:4<|user|>37+48=<|assistant|>")]
    rc = cli.main(["generate", "--model", str(out), "--prompt", "37+48=", "--attributes", "correctness=4,verbosity=0",
                   "--max-new-tokens", "4", "--temperature", "0"])
    assert rc == 0 and json.loads(capsys.readouterr().out.splitlines()[-1])["prompt"] == "37+48="
    assert cli.main(["generate", "--model", str(out), "--prompt", "1+1=", "--attributes", "humor=2"]) == 2
