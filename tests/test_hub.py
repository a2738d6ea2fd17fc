"""Hub names (org/name[@revision]) through huggingface_hub's cache, offline: a cache laid out like the library's own
(tests/hub_cache.py, checked with huggingface_hub.scan_cache_dir), the policy, roles and tokenizer resolved from it,
and one clear error for a name that is not cached while offline."""
import dataclasses
import json
from pathlib import Path

import jax
import numpy as np
import pytest

from hub_cache import populate
from tiny_hf import make_model_dir

huggingface_hub = pytest.importorskip("huggingface_hub")
pytest.importorskip("transformers")

ROOT = Path(__file__).parent.parent


@pytest.fixture(scope="module")
def model_dirs(tmp_path_factory):
    main = make_model_dir(tmp_path_factory.mktemp("tiny-main"))
    other = tmp_path_factory.mktemp("tiny-v1")
    from tiny_hf import make_llama, make_tokenizer

    make_tokenizer(other)
    make_llama(other, vocab_size=json.loads((main / "config.json").read_text())["vocab_size"], seed=1)
    return main, other


@pytest.fixture
def offline_cache(tmp_path, model_dirs, monkeypatch):
    """HF_HUB_CACHE -> a fresh cache holding org/tiny at main and v1, and offline mode on."""
    from huggingface_hub import constants

    cache = tmp_path / "hub"
    main, other = model_dirs
    commits = {"main": populate(cache, "org/tiny", main), "v1": populate(cache, "org/tiny", other, revision="v1")}
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    return cache, commits


def test_the_cache_is_what_huggingface_hub_sees(offline_cache):
    cache, commits = offline_cache
    (repo,) = huggingface_hub.scan_cache_dir(cache).repos
    assert repo.repo_id == "org/tiny" and repo.repo_type == "model"
    revisions = {r.commit_hash: r for r in repo.revisions}
    assert set(revisions) == set(commits.values())
    assert revisions[commits["main"]].refs == frozenset({"main"})
    assert "model.safetensors" in {f.file_name for f in revisions[commits["main"]].files}


def test_parse_source_resolves_hub_names_to_their_snapshots(offline_cache):
    from jalign.models.load import parse_source

    cache, commits = offline_cache
    for spec, rev in (("org/tiny", "main"), ("hf:org/tiny", "main"), ("org/tiny@v1", "v1"),
                      (f"hf:org/tiny@{commits['v1']}", "v1")):
        src = parse_source(spec, where="roles.reference")
        assert src.kind == "hf" and Path(src.path).parent.name == "snapshots", spec
        assert Path(src.path).name == commits[rev], spec
        assert str(src) == "hf:" + spec.removeprefix("hf:")


def test_only_data_files_are_fetched():
    """The download patterns, applied by huggingface_hub's own filter to a repository's listing."""
    from huggingface_hub.utils import filter_repo_objects

    from jalign import hub

    repo = ["config.json", "model-00001-of-00002.safetensors", "model.safetensors.index.json", "tokenizer.json",
            "chat_template.jinja", "pytorch_model.bin", "modeling_custom.py", "tf_model.h5", "flax_model.msgpack",
            "generation_config.json"]
    got = set(filter_repo_objects(repo, allow_patterns=list(hub.MODEL_FILES)))
    assert got == {"config.json", "model-00001-of-00002.safetensors", "model.safetensors.index.json",
                   "tokenizer.json", "chat_template.jinja", "generation_config.json"}
    assert set(filter_repo_objects(repo, allow_patterns=list(hub.TOKENIZER_FILES))) == {
        "config.json", "tokenizer.json", "chat_template.jinja", "generation_config.json"}


def test_hub_weights_and_tokenizer_equal_the_local_directory(offline_cache, model_dirs):
    from jalign.data.tokenizer import load_tokenizer
    from jalign.models import transformer as tfm
    from jalign.models.load import load_params, parse_source, source_architecture
    from sharding import make_mesh, make_rules

    main, _ = model_dirs
    local, hub = parse_source(f"hf:{main}", where="model.hf_path"), parse_source("org/tiny", where="model.hf_path")
    cfg = source_architecture(local)
    assert dataclasses.replace(source_architecture(hub), hf_path=None) == dataclasses.replace(cfg, hf_path=None)
    mesh = make_mesh(2, 2, 2, 1)
    decls = tfm.declare_params(cfg)
    kw = dict(mesh=mesh, rules=make_rules(), log=lambda *_: None)
    jax.tree.map(np.testing.assert_array_equal, jax.device_get(load_params(hub, decls, **kw)),
                 jax.device_get(load_params(local, decls, **kw)))
    text = "what is the capital of france?"
    for spec in ("org/tiny", "hf:org/tiny@v1"):
        tok = load_tokenizer(spec)
        assert tok.encode(text) == load_tokenizer(str(main)).encode(text) and tok.chat_template


def test_train_from_a_hub_name_offline(offline_cache, tmp_path):
    """`model.hf_path: org/name` end to end: architecture, tokenizer and weights from the cache, a role too."""
    from jalign.config import load_config
    from jalign.metrics import read_metrics
    from jalign.trainer import train

    cache, commits = offline_cache
    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text("".join(json.dumps({"prompt": f"what is {a}+{a}?", "chosen": f"{2 * a}.",
                                         "rejected": f"{2 * a + 1}."}) + "\n" for a in range(16)))
    out = tmp_path / "run"
    cfg = load_config(ROOT / "configs/dpo_tiny.yaml", [
        "model.init_from=null", "model.hf_path=org/tiny", "roles.reference=org/tiny@v1", f"data.train={pairs}",
        "data.eval=null", "data.chat_template=auto", "data.seq_len=32", "train.steps=2", "train.global_batch=8",
        "train.eval_every=0", "train.log_every=1", f"train.out_dir={out}", "train.progress=false",
        "train.tensorboard=false"])
    train(cfg)
    saved = (out / "config.yaml").read_text()
    assert f"snapshots/{commits['main']}" in saved  # the tokenizer is the snapshot's
    rows = [r for r in read_metrics(out) if "loss" in r]
    assert len(rows) == 2 and all(np.isfinite(r["loss"]) for r in rows)
    # the reference (another revision) differs from the policy: the first DPO loss is not log 2
    assert abs(rows[0]["preference_loss"] - np.log(2)) > 1e-4


def test_a_name_missing_from_the_cache_offline_is_one_clear_error(offline_cache, tmp_path, capsys):
    from jalign.cli import main

    status = main(["train", str(ROOT / "configs/sft_tiny.yaml"), "model.hf_path=org/not-cached",
                   f"train.out_dir={tmp_path / 'run'}", "train.progress=false"])
    err = capsys.readouterr().err.strip()
    assert status == 2 and len(err.splitlines()) == 1 and "Traceback" not in err
    assert "model.hf_path=org/not-cached" in err and "not in the cache" in err and "HF_HUB_OFFLINE" in err
    assert not (tmp_path / "run").exists()
    status = main(["train", str(ROOT / "configs/sft_tiny.yaml"), "model.tokenizer=org/tiny@v9",
                   f"train.out_dir={tmp_path / 'run'}"])
    err = capsys.readouterr().err.strip()
    assert status == 2 and "model.tokenizer" in err and "org/tiny@v9 is not in the cache" in err


def test_a_repository_without_safetensors_is_refused(tmp_path, monkeypatch):
    from huggingface_hub import constants

    from jalign.hub import HubError
    from jalign.models.load import parse_source

    src = tmp_path / "bin-only"
    src.mkdir()
    (src / "config.json").write_text(json.dumps({"model_type": "llama"}))
    (src / "pytorch_model.bin").write_bytes(b"pickle")
    populate(tmp_path / "hub", "org/bin-only", src)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(HubError, match="org/bin-only has no \\*.safetensors weights"):
        parse_source("org/bin-only", where="roles.reward")


def test_local_paths_win_and_file_typos_are_not_hub_names(tmp_path, monkeypatch):
    from jalign.hub import parse_dataset_name, parse_name
    from jalign.models.load import LoadError, parse_source

    assert parse_name("org/name@v1.0") == ("org/name", "v1.0")
    assert parse_name("runs/tok.json") is None and parse_name("a/b/c") is None and parse_name("name") is None
    assert parse_dataset_name("org/data@r:test[:10]") == ("org/data", "r", "test[:10]")
    assert parse_dataset_name("data/train.jsonl") is None
    monkeypatch.chdir(tmp_path)
    (tmp_path / "org" / "name").mkdir(parents=True)  # a local directory of that name wins over the Hub
    with pytest.raises(LoadError, match="neither a Hugging Face directory"):
        parse_source("org/name", where="model.init_from")
    with pytest.raises(LoadError, match="does not exist"):  # run: sources are never Hub names
        parse_source("run:org/other", where="model.init_from")
