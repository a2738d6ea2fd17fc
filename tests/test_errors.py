"""Bad input through the CLI: one line naming the file (and line, key or tensor), a non-zero exit, no
traceback unless --debug, nothing already written lost; the compilation cache the CLI turns on."""
import errno
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from jalign import cli
from jalign import generate as gen

ROOT = Path(__file__).parent.parent
transformers = pytest.importorskip("transformers")
torch = pytest.importorskip("torch")
tokenizers = pytest.importorskip("tokenizers")

VOCAB = 256
CHATML = ("{% for m in messages %}<|im_start|>{{ m.role }} {{ m.content }}<|im_end|>{% endfor %}"
          "{% if add_generation_prompt %}<|im_start|>assistant {% endif %}")
TINY_RUN = ["model.hidden=32", "model.mlp=64", "model.layers=1", "model.heads=4", "model.kv_heads=2",
            "data.seq_len=32", "train.global_batch=8", "train.log_every=1", "train.eval_every=0",
            "train.progress=false", "train.tensorboard=false", "train.async_checkpointing=false",
            "eval.prompts=0"]


def save_tokenizer(d: Path, template=CHATML):
    """A word-level tokenizer over w0..w249 plus ChatML specials (ids < VOCAB), with its configs."""
    vocab = {f"w{i}": i for i in range(250)}
    tok = tokenizers.Tokenizer(tokenizers.models.WordLevel(vocab, unk_token="w0"))
    tok.pre_tokenizer = tokenizers.pre_tokenizers.WhitespaceSplit()
    tok.decoder = tokenizers.decoders.WordPiece()
    tok.add_special_tokens(["<|im_start|>", "<|im_end|>", "<|endoftext|>"])  # ids 250, 251, 252
    tok.save(str(d / "tokenizer.json"))
    config = {"eos_token": "<|im_end|>", "pad_token": "<|endoftext|>"}
    if template:
        config["chat_template"] = template
    (d / "tokenizer_config.json").write_text(json.dumps(config))


@pytest.fixture(scope="module")
def hf_model(tmp_path_factory):
    d = tmp_path_factory.mktemp("hf")
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                                   eos_token_id=251)
    model = transformers.LlamaForCausalLM(cfg).eval()
    with torch.no_grad():
        model.lm_head.weight.mul_(30.0)
    model.save_pretrained(d, safe_serialization=True)
    save_tokenizer(d)
    return d


def copy(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def run_cli(capsys, *args) -> tuple[int, str]:
    rc = cli.main(list(args))
    err = capsys.readouterr().err
    return rc, err


def assert_one_line_error(err: str, cmd: str, *fragments: str) -> str:
    assert "Traceback" not in err, err
    lines = [line for line in err.splitlines() if line.startswith(f"jalign {cmd}: error: ")]
    assert len(lines) == 1, err
    for f in fragments:
        assert f in lines[0], (f, lines[0])
    return lines[0]


# ---- jalign train ---------------------------------------------------------------------------------
def test_train_config_errors(capsys, tmp_path):
    rc, err = run_cli(capsys, "train", str(ROOT / "configs/sft_tiny.yaml"), "train.steps=-5")
    assert rc == 2
    assert_one_line_error(err, "train", "override 'train.steps=-5': train.steps: must be >= 1, got -5")
    rc, err = run_cli(capsys, "train", str(ROOT / "configs/sft_tiny.yaml"), "modle.hidden=8")
    assert rc == 2
    assert_one_line_error(err, "train", "override 'modle.hidden=8': modle: unknown section")
    p = tmp_path / "dup.yaml"
    p.write_text("train:\n  steps: 10\n  steps: 20\n")
    rc, err = run_cli(capsys, "train", str(p))
    assert rc == 2
    assert_one_line_error(err, "train", f"{p}:3: train.steps: duplicate key (already set at line 2)")


def test_train_hf_path_errors(capsys, tmp_path, hf_model):
    out = f"train.out_dir={tmp_path / 'run'}"
    rc, err = run_cli(capsys, "train", str(ROOT / "configs/sft_tiny.yaml"), f"model.hf_path={tmp_path}", out)
    assert rc == 2
    assert_one_line_error(err, "train", f"model.hf_path=hf:{tmp_path}", "is not a Hugging Face directory "
                          "(needs config.json + safetensors)")
    bad = copy(hf_model, tmp_path / "bad")
    st = bad / "model.safetensors"
    st.write_bytes(st.read_bytes()[:1000])
    # the architecture keys of the run agree with the HF model (a contradiction is its own error)
    rc, err = run_cli(capsys, "train", str(ROOT / "configs/sft_tiny.yaml"), *TINY_RUN, "model.vocab_size=256",
                      f"model.hf_path={bad}", f"model.tokenizer={bad}",
                      "model.init_from=null", "data.chat_template=none", out)
    assert rc == 2
    assert_one_line_error(err, "train", f"{st}: not a valid safetensors file")


def test_train_tokenizer_template_and_seq_len_errors(capsys, tmp_path, hf_model):
    cfg = [str(ROOT / "configs/sft_tiny.yaml"), *TINY_RUN, f"train.out_dir={tmp_path / 'run'}"]
    tok = tmp_path / "tok"
    tok.mkdir()
    (tok / "tokenizer.json").write_text("{ this is not json")
    rc, err = run_cli(capsys, "train", *cfg, f"model.tokenizer={tok}")
    assert rc == 2
    assert_one_line_error(err, "train", f"{tok}/tokenizer.json: not a valid tokenizer.json")
    rc, err = run_cli(capsys, "train", *cfg, f"model.tokenizer={tmp_path / 'nowhere'}")
    assert rc == 2
    assert_one_line_error(err, "train", f"tokenizer: {tmp_path / 'nowhere'} does not exist")
    tpl = tmp_path / "t.jinja"
    tpl.write_text("{% for m in messages %}\n{{ m.content }\n{% endfor %}")
    rc, err = run_cli(capsys, "train", *cfg, f"data.chat_template={tpl}")
    assert rc == 2
    assert_one_line_error(err, "train", f"chat template {tpl}: line 2: syntax error")
    rc, err = run_cli(capsys, "train", *cfg, "data.seq_len=4", "data.overlong=drop")
    assert rc == 2
    assert_one_line_error(err, "train", "data.train=builtin:addition_sloppy:train", "fits data.seq_len=4")


def test_debug_flag_and_env_show_the_traceback(capsys, monkeypatch):
    rc, err = run_cli(capsys, "train", str(ROOT / "configs/sft_tiny.yaml"), "optim.lr=.nan", "--debug")
    assert rc == 2 and "Traceback" in err and "ConfigError" in err
    assert err.rstrip().splitlines()[-1] == ("jalign train: error: override 'optim.lr=.nan': optim.lr: must be a "
                                             "finite number, got nan")
    monkeypatch.setenv("JALIGN_DEBUG", "1")
    rc, err = run_cli(capsys, "train", str(ROOT / "configs/sft_tiny.yaml"), "optim.lr=.nan")
    assert rc == 2 and "Traceback" in err
    monkeypatch.setenv("JALIGN_DEBUG", "0")
    rc, err = run_cli(capsys, "train", str(ROOT / "configs/sft_tiny.yaml"), "optim.lr=.nan")
    assert rc == 2 and "Traceback" not in err


def test_exit_statuses(capsys):
    from jalign.trainer import TrainingDiverged

    def raiser(exc):
        def fn(argv):
            raise exc
        return fn

    assert cli.run_command("train", raiser(TrainingDiverged("5 non-finite steps")), []) == 3
    assert cli.run_command("x", raiser(OSError(errno.ENOSPC, "No space left on device", "/full/ckpt")), []) == 1
    assert cli.run_command("x", raiser(FileNotFoundError(errno.ENOENT, "No such file or directory", "/a")), []) == 2
    err = capsys.readouterr().err
    assert "jalign train: error: 5 non-finite steps" in err
    assert "jalign x: error: /full/ckpt: No space left on device" in err and "jalign x: error: /a: No such file" in err
    with pytest.raises(ZeroDivisionError):  # a bug, not the input: the traceback stays
        cli.run_command("x", raiser(ZeroDivisionError("bug")), [])


# ---- jalign convert -------------------------------------------------------------------------------
def test_convert_errors(capsys, tmp_path, hf_model):
    rc, err = run_cli(capsys, "convert", "--hf", str(tmp_path / "nope"), "--out", str(tmp_path / "ck"))
    assert rc == 2
    assert_one_line_error(err, "convert", f"{tmp_path / 'nope'}: no such directory")
    d = copy(hf_model, tmp_path / "m")
    c = json.loads((d / "config.json").read_text())
    c["architectures"] = ["GPT2LMHeadModel"]
    (d / "config.json").write_text(json.dumps(c))
    rc, err = run_cli(capsys, "convert", "--hf", str(d), "--out", str(tmp_path / "ck"))
    assert rc == 2
    assert_one_line_error(err, "convert", f"{d}/config.json: unsupported architecture ['GPT2LMHeadModel']")
    p = copy(hf_model, tmp_path / "pickled")
    (p / "model.safetensors").unlink()
    (p / "pytorch_model.bin").write_bytes(b"\x80\x04not really")
    rc, err = run_cli(capsys, "convert", "--hf", str(p), "--out", str(tmp_path / "ck"))
    assert rc == 2
    assert_one_line_error(err, "convert", f"{p}: only pickle weights (pytorch_model.bin)", "never unpickles")
    assert not (tmp_path / "ck").exists()  # nothing written for a failed conversion
    rc, err = run_cli(capsys, "convert", "--from-checkpoint", str(tmp_path / "none"), "--to-hf", str(tmp_path / "o"),
                      "--config", str(ROOT / "configs/sft_tiny.yaml"))
    assert rc == 2
    assert_one_line_error(err, "convert", f"{tmp_path / 'none'}: no such checkpoint directory")


# ---- jalign generate ------------------------------------------------------------------------------
def generate_rows(path: Path) -> list:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_generate_missing_model_and_prompt_files(capsys, tmp_path):
    rc, err = run_cli(capsys, "generate", "--model", str(tmp_path / "nope"), "--prompt", "hi")
    assert rc == 2
    assert_one_line_error(err, "generate", f"--model {tmp_path / 'nope'}: no such file or directory")
    (tmp_path / "empty").mkdir()
    rc, err = run_cli(capsys, "generate", "--model", str(tmp_path / "empty"), "--prompt", "hi")
    assert rc == 2
    assert_one_line_error(err, "generate", "a directory with neither config.json (Hugging Face) nor config.yaml")
    rc, err = run_cli(capsys, "generate", "--model", str(ROOT / "configs/sft_tiny.yaml"), "--prompts",
                      str(tmp_path / "p.jsonl"))
    assert rc == 2
    assert_one_line_error(err, "generate", f"{tmp_path / 'p.jsonl'}: No such file or directory")
    (tmp_path / "p.jsonl").write_text('{"prompt": "a"}\n{"prompt" "b"}\n')
    rc, err = run_cli(capsys, "generate", "--model", str(ROOT / "configs/sft_tiny.yaml"), "--prompts",
                      str(tmp_path / "p.jsonl"))
    assert rc == 2
    assert_one_line_error(err, "generate", f"{tmp_path / 'p.jsonl'}:2: expected a JSON object with \"prompt\"")


def test_generate_out_is_replaced_only_on_success(capsys, tmp_path, hf_model, monkeypatch):
    out = tmp_path / "out.jsonl"
    out.write_text("precious\n")
    args = ["generate", "--model", str(hf_model), "--prompt", "w5 w6", "--prompt", "w7", "--batch-size", "1",
            "--max-new-tokens", "4", "--temperature", "0", "--out", str(out)]
    real, calls = gen.generate, []

    def second_batch_fails(*a, **kw):
        calls.append(1)
        if len(calls) == 2:
            raise OSError(errno.ENOSPC, "No space left on device", str(out))
        return real(*a, **kw)

    monkeypatch.setattr(gen, "generate", second_batch_fails)
    rc, err = run_cli(capsys, *args)
    assert rc == 1 and len(calls) == 2  # failed after the first batch was written
    assert_one_line_error(err, "generate", "No space left on device")
    assert out.read_text() == "precious\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.jsonl"]  # no temp file left behind
    monkeypatch.setattr(gen, "generate", real)
    rc, err = run_cli(capsys, *args)
    assert rc == 0 and [r["prompt"] for r in generate_rows(out)] == ["w5 w6", "w7"]
    rc, err = run_cli(capsys, *args[:-1], str(tmp_path / "no_dir" / "o.jsonl"))
    assert rc == 2
    assert_one_line_error(err, "generate", f"{tmp_path / 'no_dir'}: no such directory for --out")


def test_generate_prompt_too_long_is_one_message(capsys, hf_model):
    rc, err = run_cli(capsys, "generate", "--model", str(hf_model), "--prompt", "w1 " * 10, "--max-new-tokens", "250",
                      "--chat-template", "none")
    assert rc == 2
    assert_one_line_error(err, "generate", "--max-new-tokens 250: the longest prompt (10 tokens)",
                          "max_seq_len=256")


def test_generate_uses_the_same_template_rule_for_hf_and_run_dirs(capsys, tmp_path, hf_model):
    """Default (auto): the tokenizer's own template for an HF directory and for a jalign directory made
    from it, stated on stderr; the output is the one of an explicit --chat-template hf."""
    common = ["--prompt", "w5 w6 w7", "--max-new-tokens", "6", "--temperature", "0"]
    rc, err = run_cli(capsys, "generate", "--model", str(hf_model), *common, "--out", str(tmp_path / "auto.jsonl"))
    assert rc == 0 and "jalign generate: chat template: hf (chat_template in" in err
    assert "[data.chat_template=auto: the tokenizer has one]" in err
    rc, _ = run_cli(capsys, "generate", "--model", str(hf_model), *common, "--chat-template", "hf",
                    "--out", str(tmp_path / "hf.jsonl"))
    assert rc == 0 and generate_rows(tmp_path / "auto.jsonl") == generate_rows(tmp_path / "hf.jsonl")
    ck = tmp_path / "ck"
    assert run_cli(capsys, "convert", "--hf", str(hf_model), "--out", str(ck))[0] == 0
    rc, err = run_cli(capsys, "generate", "--model", str(ck), *common, "--out", str(tmp_path / "ck.jsonl"))
    assert rc == 0 and "chat template: hf (chat_template in" in err
    assert generate_rows(tmp_path / "ck.jsonl") == generate_rows(tmp_path / "hf.jsonl")
    # without a template in the tokenizer: none, said so
    bare = copy(hf_model, tmp_path / "bare")
    save_tokenizer(bare, template=None)
    rc, err = run_cli(capsys, "generate", "--model", str(bare), *common, "--out", str(tmp_path / "bare.jsonl"))
    assert rc == 0 and "chat template: none (contents concatenated" in err


def test_generate_from_a_training_run_uses_its_template(capsys, tmp_path):
    from jalign.config import load_config
    from jalign.trainer import train

    run = tmp_path / "run"
    train(load_config(ROOT / "configs/sft_tiny.yaml", [*TINY_RUN, "train.steps=1", f"train.out_dir={run}"]))
    assert load_config(run / "config.yaml").data.chat_template == "tiny"  # sft_tiny.yaml names it
    rc, err = run_cli(capsys, "generate", "--model", str(run), "--prompt", "12+34=", "--max-new-tokens", "3")
    assert rc == 0 and "chat template: tiny (built in" in err
    run2 = tmp_path / "run2"  # a config that leaves the template out: auto, i.e. tiny for the byte tokenizer
    train(load_config(None, [*TINY_RUN, "train.steps=1", "data.eval=null", f"train.out_dir={run2}"]))
    rc, err = run_cli(capsys, "generate", "--model", str(run2), "--prompt", "12+34=", "--max-new-tokens", "3")
    assert rc == 0 and "chat template: tiny (built in: <|role|>content turns) [data.chat_template=auto" in err


# ---- the persistent compilation cache -------------------------------------------------------------
def test_compilation_cache_choice(tmp_path, monkeypatch):
    calls = []
    monkeypatch.setattr(cli, "_set_jax_option", lambda name, value: calls.append((name, value)))
    monkeypatch.setattr(cli, "_configured_jax_cache_dir", lambda env: env.get("JAX_COMPILATION_CACHE_DIR"))

    def choice(enabled=True, **env):
        calls.clear()
        return cli.setup_compilation_cache(enabled, env), list(calls)

    want = f"{tmp_path}/jalign/xla"
    assert choice(XDG_CACHE_HOME=str(tmp_path)) == (want, [("jax_compilation_cache_dir", want)])
    home = os.path.expanduser("~")
    assert choice()[0] == f"{home}/.cache/jalign/xla"
    assert choice(JALIGN_COMPILATION_CACHE=str(tmp_path / "mine"))[0] == f"{tmp_path}/mine"
    assert choice(JALIGN_COMPILATION_CACHE="~/c")[0] == f"{home}/c"
    off = (None, [("jax_enable_compilation_cache", False)])
    assert choice(JALIGN_COMPILATION_CACHE="off") == off and choice(JALIGN_COMPILATION_CACHE="0") == off
    assert choice(False, XDG_CACHE_HOME=str(tmp_path)) == off
    assert choice(JAX_COMPILATION_CACHE_DIR="/jax/own") == ("/jax/own", [])  # a directory given to jax is kept
    assert choice(JAX_COMPILATION_CACHE_DIR="/jax/own", JALIGN_COMPILATION_CACHE="/ours")[0] == "/ours"


def test_no_compile_cache_flag_reaches_the_setup(monkeypatch):
    seen = []
    monkeypatch.setattr(cli, "setup_compilation_cache", lambda enabled=True: seen.append(enabled))
    monkeypatch.setitem(cli.COMMANDS, "train", lambda argv: 0 if argv == ["c.yaml", "a=1"] else 1)
    assert cli.main(["train", "c.yaml", "--no-compile-cache", "a=1"]) == 0
    assert cli.main(["--no-compile-cache", "train", "c.yaml", "a=1"]) == 0
    assert cli.main(["train", "c.yaml", "a=1"]) == 0
    assert seen == [False, False, True]


def test_cli_process_fills_the_cache_dir(tmp_path, hf_model):
    """A real `python -m jalign generate`: the setting reaches jax (through its environment variable,
    before jax is imported) and compiled programs land in the per-user directory."""
    clean = {k: v for k, v in os.environ.items() if not k.startswith(("JAX_", "JALIGN_"))}
    env = {**clean, "XDG_CACHE_HOME": str(tmp_path / "cache"), "JAX_PLATFORMS": "cpu",
           "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0", "XLA_FLAGS": ""}
    subprocess.run([sys.executable, "-m", "jalign", "generate", "--model", str(hf_model), "--prompt", "w1",
                    "--max-new-tokens", "2", "--out", str(tmp_path / "o.jsonl")],
                   env=env, cwd=ROOT, check=True, capture_output=True)
    assert any((tmp_path / "cache" / "jalign" / "xla").iterdir())


def test_generate_refuses_a_tokenizer_larger_than_the_model(capsys, tmp_path, hf_model):
    d = copy(hf_model, tmp_path / "m")
    cfg = transformers.LlamaConfig(vocab_size=200, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                   num_attention_heads=4, num_key_value_heads=2, eos_token_id=100)
    transformers.LlamaForCausalLM(cfg).save_pretrained(d, safe_serialization=True)  # the tokenizer reaches id 252
    rc, err = run_cli(capsys, "generate", "--model", str(d), "--prompt", "w1")
    assert rc == 2
    assert_one_line_error(err, "generate", f"--model {d}: the model's vocab_size: 200 is smaller than the tokenizer's "
                                           "id range (253 ids")
