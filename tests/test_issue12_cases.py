"""Issue 12, "Tracebacks instead of messages", through the CLI a user runs: every malformed input is one
``jalign CMD: error: ...`` line naming the file (and key, tensor or line), a non-zero exit, no traceback.
The readers' own tests (test_hf_io, test_data, test_load) check the messages function by function; these
check that each one reaches the user from ``jalign train`` / ``convert`` / ``generate`` and that nothing
is written for a failed start. Every case fails before any compilation, so the file stays fast."""
import json
import struct
from pathlib import Path

import pytest

from test_errors import TINY_RUN, assert_one_line_error, copy, hf_model, run_cli  # noqa: F401 (fixture)

ROOT = Path(__file__).parent.parent
SFT = str(ROOT / "configs/sft_tiny.yaml")


def _edit_json(path: Path, **changes):
    c = json.loads(path.read_text())
    for k, v in changes.items():
        if v is None:
            c.pop(k, None)
        else:
            c[k] = v
    path.write_text(json.dumps(c))


def _safetensors(path: Path):
    raw = path.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    return json.loads(raw[8:8 + n]), raw[8 + n:]


def _write_safetensors(path: Path, header: dict, data: bytes):
    blob = json.dumps(header).encode()
    blob += b" " * (-len(blob) % 8)
    path.write_bytes(struct.pack("<Q", len(blob)) + blob + data)


def _drop_tensor(path: Path, name: str):
    header, data = _safetensors(path)
    b, e = header.pop(name)["data_offsets"]
    for v in header.values():  # close the gap so the rest of the file stays valid
        if isinstance(v, dict) and "data_offsets" in v and v["data_offsets"][0] >= e:
            v["data_offsets"] = [v["data_offsets"][0] - (e - b), v["data_offsets"][1] - (e - b)]
    _write_safetensors(path, header, data[:b] + data[e:])


def _past_end(path: Path):
    header, data = _safetensors(path)
    last = max((k for k in header if k != "__metadata__"), key=lambda k: header[k]["data_offsets"][1])
    header[last]["data_offsets"][1] += 4096
    _write_safetensors(path, header, data)
    return last


# ---- Hugging Face directories, through `jalign convert --hf DIR --out OUT` --------------------------
def _no_config(d):
    (d / "config.json").unlink()
    return [f"{d}/config.json: missing config.json (not a Hugging Face model directory)"]


def _unknown_arch(d):
    _edit_json(d / "config.json", architectures=["GPT2LMHeadModel"], model_type="gpt2")
    return [f"{d}/config.json: unsupported architecture ['GPT2LMHeadModel']"]


def _invalid_json(d):
    (d / "config.json").write_text('{"architectures": ["LlamaForCausalLM"],')
    return [f"{d}/config.json: invalid JSON ("]


def _missing_key(d):
    _edit_json(d / "config.json", hidden_size=None)
    return [f"{d}/config.json: missing key 'hidden_size'"]


def _truncated(d):
    st = d / "model.safetensors"
    st.write_bytes(st.read_bytes()[:1000])
    return [f"{st}: not a valid safetensors file"]


def _empty(d):
    st = d / "model.safetensors"
    st.write_bytes(b"")
    return [f"{st}: not a valid safetensors file: the file is empty (0 bytes)"]


def _huge_header(d):
    st = d / "model.safetensors"
    raw = st.read_bytes()
    st.write_bytes(struct.pack("<Q", 2**40) + raw[8:])
    return [f"{st}: not a valid safetensors file", "over the format's 100,000,000-byte cap"]


def _offsets_past_end(d):
    st = d / "model.safetensors"
    name = _past_end(st)
    return [f"{st}: not a valid safetensors file: tensor {name} ends at byte", "but the file holds only"]


def _wrong_shape(d):
    _edit_json(d / "config.json", intermediate_size=128)
    return [f"{d}: model.safetensors: tensor model.layers.0.mlp.gate_proj.weight has shape [64, 32], expected "
            "[128, 32] from config.json", "down_proj.weight has shape [32, 64]"]


def _missing_tensor(d):
    _drop_tensor(d / "model.safetensors", "model.layers.0.mlp.up_proj.weight")
    return ["model.layers.0.mlp.up_proj.weight", "missing"]


def _pickle_only(d):
    (d / "model.safetensors").unlink()
    (d / "pytorch_model.bin").write_bytes(b"\x80\x04not really")
    return [f"{d}: only pickle weights (pytorch_model.bin)", "never unpickles"]


HF_CASES = {"missing config.json": _no_config, "unknown architecture": _unknown_arch, "invalid JSON": _invalid_json,
            "missing key": _missing_key, "truncated safetensors": _truncated, "0-byte safetensors": _empty,
            "header length 2**40": _huge_header, "offsets past the end": _offsets_past_end,
            "wrong shapes": _wrong_shape, "missing tensor": _missing_tensor, "pickle-only": _pickle_only}


@pytest.mark.parametrize("case", list(HF_CASES))
def test_broken_hf_directory_through_convert(capsys, tmp_path, hf_model, case):
    d = copy(hf_model, tmp_path / "m")
    fragments = HF_CASES[case](d)
    out = tmp_path / "ck"
    rc, err = run_cli(capsys, "convert", "--hf", str(d), "--out", str(out))
    assert rc == 2
    assert_one_line_error(err, "convert", *fragments)
    assert not (out / "params").exists()  # nothing written for a failed conversion


@pytest.mark.parametrize("case", ["missing tensor", "offsets past the end"])
def test_broken_hf_directory_through_train(capsys, tmp_path, hf_model, case):
    """The same files as the policy's weights of `jalign train` (the loader, not convert's reader path)."""
    d = copy(hf_model, tmp_path / "m")
    fragments = HF_CASES[case](d)
    run = tmp_path / "run"
    rc, err = run_cli(capsys, "train", SFT, *TINY_RUN, "model.vocab_size=256", f"model.hf_path={d}",
                      f"model.tokenizer={d}", "model.init_from=null", "data.chat_template=none",
                      f"train.out_dir={run}")
    assert rc == 2
    assert_one_line_error(err, "train", *fragments)
    assert not (run / "config.yaml").exists()


# ---- model.init_from ---------------------------------------------------------------------------
def test_missing_and_invalid_init_from(capsys, tmp_path):
    run = tmp_path / "run"
    rc, err = run_cli(capsys, "train", SFT, *TINY_RUN, f"model.init_from={tmp_path / 'nope'}", f"train.out_dir={run}")
    assert rc == 2
    assert_one_line_error(err, "train", f"model.init_from={tmp_path / 'nope'}", "does not exist")
    junk = tmp_path / "junk"
    junk.mkdir()
    (junk / "notes.txt").write_text("not a model")
    rc, err = run_cli(capsys, "train", SFT, *TINY_RUN, f"model.init_from={junk}", f"train.out_dir={run}")
    assert rc == 2
    assert_one_line_error(err, "train", f"model.init_from={junk}", "neither a Hugging Face directory")
    rc, err = run_cli(capsys, "train", SFT, *TINY_RUN, f"model.init_from=run:{junk}", f"train.out_dir={run}")
    assert rc == 2
    assert_one_line_error(err, "train", f"model.init_from=run:{junk}", "not a jalign directory")
    assert not run.exists() or not (run / "config.yaml").exists()


# ---- tokenizer files and chat templates, through `jalign train` ---------------------------------
def _train(capsys, tmp_path, *overrides):
    run = tmp_path / "run"
    rc, err = run_cli(capsys, "train", SFT, *TINY_RUN, *overrides, f"train.out_dir={run}")
    assert not (run / "config.yaml").exists(), "a failed start wrote the run's config"
    return rc, err


def test_corrupt_tokenizer_config_json(capsys, tmp_path, hf_model):
    d = copy(hf_model, tmp_path / "tok")
    (d / "tokenizer_config.json").write_text('{"eos_token": ')
    rc, err = _train(capsys, tmp_path, f"model.tokenizer={d}")
    assert rc == 2
    assert_one_line_error(err, "train", f"{d}/tokenizer_config.json: invalid JSON (")


def test_missing_chat_template_file(capsys, tmp_path):
    rc, err = _train(capsys, tmp_path, f"data.chat_template={tmp_path / 'nope.jinja'}")
    assert rc == 2
    assert_one_line_error(err, "train", f"'{tmp_path / 'nope.jinja'}' is neither 'auto', 'tiny', 'none', 'hf' nor an "
                                        "existing jinja file")


def test_template_that_raises_on_a_role(capsys, tmp_path):
    tpl = tmp_path / "t.jinja"
    tpl.write_text("{% for m in messages %}\n{% if m.role == 'assistant' %}"
                   "{{ raise_exception('no assistant turns here') }}{% endif %}{{ m.content }}{% endfor %}")
    rc, err = _train(capsys, tmp_path, f"data.chat_template={tpl}")
    assert rc == 2
    assert_one_line_error(err, "train", f"chat template {tpl}: line 2: refuses the conversation",
                          "no assistant turns here")


def test_template_sandbox_violation(capsys, tmp_path):
    tpl = tmp_path / "t.jinja"
    tpl.write_text("{{ messages.__class__.__mro__[1].__subclasses__() }}")
    rc, err = _train(capsys, tmp_path, f"data.chat_template={tpl}")
    assert rc == 2
    assert_one_line_error(err, "train", f"chat template {tpl}: line 1: was stopped by the sandbox",
                          "'__class__'")


# ---- the reward function by import path, from the config ----------------------------------------
def test_reward_fn_file_path_from_the_config_reaches_the_algorithm(capsys, tmp_path):
    """`algorithm.reward_fn: FILE.py:fn` in a GRPO config is the function GRPO scores with (no launcher
    script); a misspelt function through `jalign train` is one message naming the key and the file."""
    from jalign.algorithms.grpo import GRPO
    from sharding import use_rules
    from test_ppo import runtime, single

    f = tmp_path / "my_rewards.py"
    f.write_text("def short_answer(prompt, response, reference):\n    return float(len(response) < 4)\n")
    rt = runtime(["algorithm.name=grpo", f"algorithm.reward_fn={f}:short_answer", "train.global_batch=4",
                  "algorithm.num_rollouts_per_prompt=2", "algorithm.max_new_tokens=4"], single())
    with use_rules(rt.mesh, rt.rules):
        algo = GRPO(rt)
    score = next(t.rule for t in algo.terms if t.rule is not None)  # the rule term the config named
    assert score("p", "ab", None, None) == 1.0 and score("p", "abcdef", None, None) == 0.0
    rc, err = run_cli(capsys, "train", str(ROOT / "configs/grpo_tiny.yaml"), f"algorithm.reward_fn={f}:short_answr",
                      "model.init_from=null", f"train.out_dir={tmp_path / 'run'}")
    assert rc == 2
    assert_one_line_error(err, "train", "algorithm.reward_fn", str(f), "has no attribute 'short_answr'")
    assert not (tmp_path / "run" / "config.yaml").exists()


# ---- RL exports carry the tokenizer (issue 12, silent case 6) ----------------------------------------
@pytest.mark.parametrize("name,source", [("ppo", "tokenizer only"), ("grpo", "tokenizer only"),
                                         ("rloo", "tokenizer only"), ("grpo", "model dir")])
def test_rl_export_carries_the_tokenizer_and_its_special_ids(tmp_path, hf_model, name, source):
    """An export of a PPO/GRPO/RLOO policy loads with AutoTokenizer and its config.json holds the tokenizer's
    eos/pad ids (wave 1 wrote neither: algorithms/ppo.py did not pass the tokenizer directory). "tokenizer
    only": a directory with just tokenizer.json + tokenizer_config.json (a user's own trained tokenizer),
    whose ids only the tokenizer itself knows; "model dir": the HF model's directory, config.json and all."""
    import jax
    import transformers

    from helpers import roles_for
    from jalign.algorithms.grpo import GRPO
    from jalign.algorithms.ppo import PPO
    from jalign.algorithms.rloo import RLOO
    from sharding import use_rules
    from test_ppo import make_reward_run, ppo_overrides, runtime, single

    mesh = single()
    if name == "ppo":
        extra = ppo_overrides(make_reward_run(tmp_path / "rm"))
    else:
        extra = [f"algorithm.name={name}", "algorithm.reward_fn=exact_match", "train.global_batch=4",
                 "algorithm.num_rollouts_per_prompt=2", "algorithm.max_new_tokens=4"]
    tok_dir = hf_model
    if source == "tokenizer only":
        tok_dir = tmp_path / "tok"
        tok_dir.mkdir()
        for f in ("tokenizer.json", "tokenizer_config.json"):
            (tok_dir / f).write_bytes((hf_model / f).read_bytes())
    rt = runtime([*extra, f"model.tokenizer={tok_dir}", "data.chat_template=none"], mesh)
    cls = {"ppo": PPO, "grpo": GRPO, "rloo": RLOO}[name]
    out = tmp_path / "hf"
    with use_rules(rt.mesh, rt.rules):
        algo = cls(rt)
        roles = roles_for(algo)
        algo.export(algo.init_state(roles), roles, str(out))
    for f in ("tokenizer.json", "tokenizer_config.json"):
        assert (out / f).is_file(), f
    tok = transformers.AutoTokenizer.from_pretrained(out)
    assert tok.eos_token == "<|im_end|>" and tok.pad_token == "<|endoftext|>"
    config = json.loads((out / "config.json").read_text())
    assert config["eos_token_id"] == 251 and config["pad_token_id"] == 252
    model = transformers.AutoModelForCausalLM.from_pretrained(out)
    assert model.config.vocab_size == 288 and model.config.eos_token_id == 251 and jax is not None
