"""The docs stay true: docs/configuration.md is what the config dataclasses generate, every resolved config key is
in it, `jalign config --list` prints it, and the code of docs/python_api.md runs as written."""
import os
import re
from pathlib import Path

import numpy as np
import pytest
import yaml

from jalign import docs_gen
from jalign.cli import main
from jalign.config import load_config, to_dict

ROOT = Path(__file__).resolve().parent.parent
DOCS = ROOT / "docs"
REGENERATE = "python -m jalign.docs_gen > docs/configuration.md"


def test_configuration_md_is_up_to_date():
    current = (DOCS / "configuration.md").read_text() if (DOCS / "configuration.md").is_file() else ""
    assert current == docs_gen.markdown(), f"docs/configuration.md is out of date: regenerate it with `{REGENERATE}`"


def test_a_union_type_reads_the_same_whichever_order_typing_cached():
    """typing caches Optional[X] by X, and a Union equals another with the same members in any order, so
    Optional[Union[str, list[str]]] comes back with the members in the order of the first spelling built in
    the process (docs/configuration.md changed with the order the tests ran in)."""
    import subprocess
    import sys

    code = ("from typing import Optional, Union\nfrom jalign.docs_gen import type_name\n"
            "Optional[Union[{first}]]\nprint(type_name(Optional[Union[str, list[str]]]))")
    got = {subprocess.run([sys.executable, "-c", code.format(first=f)], capture_output=True, text=True,
                          check=True).stdout.strip() for f in ("list[str], str", "str, list[str]")}
    assert got == {"str or list of str or null"}


def test_every_documented_key_has_a_type_and_a_meaning():
    for title, _, rows in docs_gen.sections():
        for key, tp, default, meaning in rows:
            assert tp and default, (title, key)
            assert meaning.strip(), (f"{key} ({title}) has no meaning: write a comment next to the field, or an "
                                     f"entry in jalign.docs_gen.MEANINGS; then `{REGENERATE}`")


def _flat_keys(d, prefix=""):
    for k, v in d.items():
        key = f"{prefix}{k}"
        if key == "roles":  # roles.NAME.field, documented once as roles.NAME.*
            for role in v.values():
                yield from _flat_keys(role, "roles.NAME.")
        elif isinstance(v, dict) and key not in ("mesh.rules", "data.fields", "data.eval"):  # user-named maps
            yield from _flat_keys(v, key + ".")
        else:
            yield key


@pytest.mark.parametrize("path", sorted((ROOT / "configs").glob("*.yaml")), ids=lambda p: p.name)
def test_every_key_of_a_resolved_config_is_documented(path):
    """Independent of the generator's walk over the dataclasses: the keys of each shipped config as the loader
    resolves and dumps it (RUN_DIR/config.yaml) are all in the reference, under their algorithm's table."""
    data = to_dict(load_config(path))
    data.pop("source", None)
    text = (DOCS / "configuration.md").read_text()
    algo = data["algorithm"]["name"]
    algo_table = text.split(f"## algorithm: {algo}\n", 1)[1].split("\n## ", 1)[0]
    for key in _flat_keys(data):
        where = algo_table if key.startswith("algorithm.") else text
        assert f"| `{key}` |" in where, f"{path.name}: {key} is not in docs/configuration.md"


def test_config_list_prints_a_section_and_rejects_an_unknown_one(capsys):
    assert main(["config", "--list", "train.wandb"]) == 0
    out = capsys.readouterr().out
    assert "train.wandb.mode" in out and "train.steps" not in out and "offline" in out
    assert main(["config", "--list", "dpo"]) == 0
    out = capsys.readouterr().out
    assert "algorithm.beta (float, default 0.1)" in out and "algorithm.loss" in out
    assert main(["config", "--list", "no_such_section"]) == 2
    err = capsys.readouterr().err
    assert "no such section" in err and "train" in err and "Traceback" not in err


def test_config_prints_the_resolved_config(capsys):
    assert main(["config", str(ROOT / "configs/dpo_tiny.yaml"), "algorithm.beta=0.3"]) == 0
    data = yaml.safe_load(capsys.readouterr().out)
    assert data["algorithm"]["beta"] == 0.3 and data["algorithm"]["name"] == "dpo"
    assert data["train"]["steps"] == load_config(ROOT / "configs/dpo_tiny.yaml").train.steps


def python_blocks(markdown: str) -> list[str]:
    return re.findall(r"^```python\n(.*?)^```", markdown, re.S | re.M)


@pytest.mark.slow
def test_python_api_example_runs(tmp_path, monkeypatch):
    """Every python block of docs/python_api.md, in order, in one namespace, from a directory holding configs/;
    then what the page promises: the callback saw steps 1..3 and stopped the run, its eval metric was logged,
    the export loads in transformers and greedy-generates the same tokens as jalign."""
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    (tmp_path / "configs").symlink_to(ROOT / "configs")
    monkeypatch.chdir(tmp_path)
    ns = {}
    blocks = python_blocks((DOCS / "python_api.md").read_text())
    assert len(blocks) >= 5
    for i, code in enumerate(blocks):
        exec(compile(code, f"docs/python_api.md (python block {i + 1})", "exec"), ns)

    assert ns["metrics"]["step"] == 20 and np.isfinite(ns["metrics"]["loss"])
    assert sorted(ns["watch"].losses) == [1, 2, 3] and ns["dpo_metrics"]["step"] == 3
    assert (tmp_path / "runs/api_example/dpo/checkpoints/3").is_dir()
    assert ns["dpo_metrics"]["eval/answer_length"] >= 1
    assert '"eval/answer_length"' in (tmp_path / "runs/api_example/dpo/metrics.jsonl").read_text()
    assert {"loss", "exact_match"} <= set(ns["ev"])
    assert len(ns["texts"]) == 2 and all(isinstance(t, str) for t in ns["texts"])

    from jalign.data.chat import encode_prompt
    from jalign.generate import generate

    model = ns["model"]
    ids = encode_prompt("37+48=", model.chat_template, model.tokenizer)
    ours = generate(model.params, model.config, [ids], max_new_tokens=4, greedy=True)["tokens"][0]
    hf = transformers.AutoModelForCausalLM.from_pretrained(ns["out"]).eval()
    with torch.no_grad():
        theirs = hf.generate(torch.tensor([ids]), max_new_tokens=4, do_sample=False, eos_token_id=None,
                             pad_token_id=0)[0, len(ids):].numpy()
    np.testing.assert_array_equal(ours, theirs)


def bash_blocks(markdown: str) -> list[str]:
    return re.findall(r"^```bash\n(.*?)^```", markdown, re.S | re.M)


def _jalign_on_path(tmp_path) -> dict:
    """`jalign` on PATH runs this checkout (python -m jalign), as the installed console script would."""
    import sys

    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "jalign").write_text(f'#!/bin/sh\nexec "{sys.executable}" -m jalign "$@"\n')
    (bin_dir / "jalign").chmod(0o755)
    env = dict(os.environ, PATH=f"{bin_dir}:{Path(sys.executable).parent}:{os.environ['PATH']}",
               PYTHONPATH=f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}")
    env.pop("XLA_FLAGS", None)  # one CPU device, as a user has
    return env


@pytest.mark.slow
def test_your_own_model_walkthrough_runs(tmp_path):
    """Every bash block of docs/your_own_model.md, in order, from a directory holding tests/ (the model builder):
    SFT with LoRA on the HF directory, DPO with LoRA from its export, transformers + PEFT load the result (the
    last block asserts merged export == base + adapter). Then: both runs trained every step with finite losses
    and the DPO adapter moved off its zero init."""
    import json
    import subprocess

    pytest.importorskip("peft")
    from safetensors.numpy import load_file

    (tmp_path / "tests").symlink_to(ROOT / "tests")
    env = _jalign_on_path(tmp_path)
    for i, code in enumerate(bash_blocks((DOCS / "your_own_model.md").read_text())):
        r = subprocess.run(["bash", "-euo", "pipefail", "-c", code], cwd=tmp_path, env=env, capture_output=True,
                           text=True, timeout=900)
        assert r.returncode == 0, f"docs/your_own_model.md bash block {i + 1} failed:\n{code}\n{r.stdout[-2000:]}" \
                                  f"\n{r.stderr[-4000:]}"
    for run, steps in (("my_sft", 12), ("my_dpo", 6)):
        rows = [json.loads(line) for line in (tmp_path / "runs" / run / "metrics.jsonl").read_text().splitlines()]
        losses = {r["step"]: r["loss"] for r in rows if "loss" in r}
        assert max(losses) == steps and all(np.isfinite(v) for v in losses.values()), (run, losses)
    adapter = load_file(str(tmp_path / "runs/my_dpo_hf/adapter/adapter_model.safetensors"))
    lora_b = [v for k, v in adapter.items() if "lora_B" in k]
    assert lora_b and max(float(np.abs(v).max()) for v in lora_b) > 0
    assert "max |logit difference|" in r.stdout
