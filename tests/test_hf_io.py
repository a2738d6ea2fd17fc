"""Hugging Face checkpoints in and out: logits parity per architecture, sharded files, round trips, errors."""
import json
import os
import re
import shutil
import struct
import tracemalloc

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jalign.models import hf_io
from jalign.models.hf_io import HFCheckpointError, load_hf_params, model_config_from_hf, save_hf
from jalign.models.params import flatten, param_specs
from jalign.models.transformer import declare_params, forward, lm_logits
from sharding import make_mesh

transformers = pytest.importorskip("transformers")
torch = pytest.importorskip("torch")

KINDS = ["llama3", "llama_tied", "mistral", "qwen2", "qwen3"]
VOCAB = 256


def hf_config(kind: str):
    common = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, max_position_embeddings=512, bos_token_id=1, eos_token_id=2)
    if kind == "llama3":
        return transformers.LlamaConfig(**common, rope_theta=500000.0, rope_scaling=dict(
            rope_type="llama3", factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
            original_max_position_embeddings=64))
    if kind == "llama_tied":
        return transformers.LlamaConfig(**common, tie_word_embeddings=True)
    if kind == "mistral":
        return transformers.MistralConfig(**common, sliding_window=None)
    if kind == "qwen2":
        return transformers.Qwen2Config(**common)
    if kind == "qwen3":
        return transformers.Qwen3Config(**common, head_dim=32)  # head_dim != hidden // heads
    raise ValueError(kind)


def build_hf(kind: str, path, **save_kw):
    """A tiny random model; norms and biases perturbed away from 1 / 0 so they are exercised."""
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(hf_config(kind)).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name or "bias" in name:
                p.add_(0.1 * torch.randn_like(p))
    model.save_pretrained(path, safe_serialization=True, **save_kw)
    return model


@pytest.fixture(scope="module")
def hf_dirs(tmp_path_factory):
    out = {}
    for kind in KINDS:
        d = tmp_path_factory.mktemp(kind)
        out[kind] = (build_hf(kind, d), d)
    return out


def batch(B=3, T=12, lens=(12, 7, 3), seed=0):
    rng = np.random.default_rng(seed)
    tokens = rng.integers(0, VOCAB, (B, T))
    mask = (np.arange(T)[None] < np.asarray(lens)[:, None]).astype(np.int64)  # right padding
    return tokens, mask


def jalign_logits(params, cfg, tokens, mask):
    pos = np.broadcast_to(np.arange(tokens.shape[1]), tokens.shape)
    hidden = forward(params, jnp.asarray(tokens, jnp.int32), jnp.asarray(pos, jnp.int32),
                     jnp.asarray(mask, jnp.int32), cfg)
    return np.asarray(lm_logits(params, hidden, cfg))


def hf_logits(model, tokens, mask):
    with torch.no_grad():
        return model(input_ids=torch.tensor(tokens), attention_mask=torch.tensor(mask)).logits.float().numpy()


@pytest.mark.parametrize("kind", KINDS)
def test_logits_match_transformers(hf_dirs, kind):
    model, d = hf_dirs[kind]
    cfg = model_config_from_hf(d)
    assert cfg.tie_embeddings == (kind == "llama_tied")
    assert cfg.qkv_bias == (kind == "qwen2") and cfg.qk_norm == (kind == "qwen3")
    assert (cfg.rope_scaling is not None) == (kind == "llama3")
    params = load_hf_params(d, cfg)
    assert jax.tree.structure(params) == jax.tree.structure(
        jax.tree.map(lambda d: 0, declare_params(cfg), is_leaf=lambda x: hasattr(x, "axes")))
    tokens, mask = batch()
    ours, ref = jalign_logits(params, cfg, tokens, mask), hf_logits(model, tokens, mask)
    valid = mask.astype(bool)
    np.testing.assert_allclose(ours[valid], ref[valid], atol=1e-4, rtol=1e-4)


def test_index_sharded_checkpoint_loads(tmp_path, hf_dirs):
    model = build_hf("qwen2", tmp_path, max_shard_size="40KB")
    assert (tmp_path / "model.safetensors.index.json").is_file()
    assert len(list(tmp_path.glob("model-*.safetensors"))) > 1
    cfg = model_config_from_hf(tmp_path)
    tokens, mask = batch()
    ours = jalign_logits(load_hf_params(tmp_path, cfg), cfg, tokens, mask)
    np.testing.assert_allclose(ours[mask.astype(bool)], hf_logits(model, tokens, mask)[mask.astype(bool)], atol=1e-4)


def test_bfloat16_checkpoint_loads(tmp_path):
    model = build_hf("llama3", tmp_path / "src")
    model.to(torch.bfloat16).save_pretrained(tmp_path / "bf16", safe_serialization=True)
    cfg = model_config_from_hf(tmp_path / "bf16")
    params = load_hf_params(tmp_path / "bf16", cfg)
    assert params["embed"].dtype == jnp.float32
    want = model.model.layers[1].self_attn.q_proj.weight.detach().float().numpy()  # [H*hd, D]
    got = np.asarray(params["layers"]["q"][1]).reshape(cfg.hidden, -1).T
    np.testing.assert_array_equal(got, want)
    bf = load_hf_params(tmp_path / "bf16", cfg, dtype=jnp.bfloat16)
    assert bf["layers"]["down"].dtype == jnp.bfloat16


@pytest.mark.parametrize("kind", KINDS)
def test_round_trip_through_save_hf(hf_dirs, tmp_path, kind):
    model, d = hf_dirs[kind]
    cfg = model_config_from_hf(d)
    out = tmp_path / "export"
    (tmp_path / "tok").mkdir()
    (tmp_path / "tok" / "tokenizer.json").write_text("{}")
    save_hf(load_hf_params(d, cfg), cfg, out, tokenizer_dir=tmp_path / "tok", max_shard_bytes=64 * 1024)
    files = sorted(os.listdir(out))
    assert "config.json" in files and "generation_config.json" in files and "tokenizer.json" in files
    index = json.loads((out / "model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) > 1 and shards[-1].endswith(f"-of-{len(shards):05d}.safetensors")
    assert not [f for f in os.listdir(tmp_path) if f.startswith(".export")]  # temp dir renamed away
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
    assert type(reloaded).__name__ == {"llama3": "LlamaForCausalLM", "llama_tied": "LlamaForCausalLM",
                                       "mistral": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM",
                                       "qwen3": "Qwen3ForCausalLM"}[kind]
    tokens, mask = batch()
    np.testing.assert_array_equal(hf_logits(reloaded, tokens, mask), hf_logits(model, tokens, mask))
    assert model_config_from_hf(out) == cfg.__class__(**{**cfg.__dict__, "hf_path": str(out)})


def test_load_onto_mesh_and_save_from_it(hf_dirs, tmp_path):
    model, d = hf_dirs["qwen3"]
    cfg = model_config_from_hf(d)
    mesh = make_mesh(data=2, fsdp=2, tensor=2, sequence=1)
    params = load_hf_params(d, cfg, mesh=mesh)
    want = flatten(param_specs(declare_params(cfg), mesh))
    for path, arr in flatten(params).items():
        assert arr.sharding.spec == want[path], path
        assert arr.sharding.mesh == mesh
    assert params["layers"]["q"].sharding.spec[1:3] == ("fsdp", "tensor")
    shard_shapes = {s.data.shape for s in params["layers"]["gate"].addressable_shards}
    assert shard_shapes == {(cfg.layers, cfg.hidden // 2, cfg.mlp // 2)}  # no device holds a full copy
    tokens, mask = batch()
    ours = jalign_logits(params, cfg, tokens, mask)
    valid = mask.astype(bool)
    np.testing.assert_allclose(ours[valid], hf_logits(model, tokens, mask)[valid], atol=1e-4)
    save_hf(params, cfg, tmp_path / "out", dtype="bfloat16")
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "out")
    assert reloaded.model.layers[0].self_attn.q_proj.weight.dtype == torch.bfloat16
    torch.testing.assert_close(reloaded.model.layers[1].mlp.down_proj.weight,
                               model.model.layers[1].mlp.down_proj.weight.bfloat16())


def test_convert_cli_round_trip(hf_dirs, tmp_path):
    model, d = hf_dirs["llama3"]
    assert hf_io.convert_main(["--hf", str(d), "--out", str(tmp_path / "ckpt")]) == 0
    assert (tmp_path / "ckpt" / "config.yaml").is_file()
    rc = hf_io.convert_main(["--from-checkpoint", str(tmp_path / "ckpt"), "--to-hf", str(tmp_path / "hf")])
    assert rc == 0
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf").eval()
    tokens, mask = batch()
    np.testing.assert_array_equal(hf_logits(reloaded, tokens, mask), hf_logits(model, tokens, mask))
    assert hf_io.convert_main([]) == 2


# ---- bad directories ------------------------------------------------------------------------------
def _copy(src, dst):
    shutil.copytree(src, dst)
    return dst


def test_missing_config_json(tmp_path):
    with pytest.raises(HFCheckpointError, match="missing config.json"):
        model_config_from_hf(tmp_path)


def test_missing_weights(hf_dirs, tmp_path):
    d = _copy(hf_dirs["llama3"][1], tmp_path / "m")
    cfg = model_config_from_hf(d)
    (d / "model.safetensors").unlink()
    with pytest.raises(HFCheckpointError, match="missing weights: no model.safetensors"):
        load_hf_params(d, cfg)


def test_wrong_tensor_shape(hf_dirs, tmp_path):
    d = _copy(hf_dirs["llama3"][1], tmp_path / "m")
    c = json.loads((d / "config.json").read_text())
    c["intermediate_size"] = 128
    (d / "config.json").write_text(json.dumps(c))
    with pytest.raises(HFCheckpointError, match=r"model.safetensors: tensor model.layers.0.mlp.gate_proj.weight "
                                                r"has shape \[96, 64\], expected \[128, 64\]"):
        load_hf_params(d, model_config_from_hf(d))


def test_missing_tensor(hf_dirs, tmp_path):
    d = _copy(hf_dirs["llama_tied"][1], tmp_path / "m")
    c = json.loads((d / "config.json").read_text())
    c["tie_word_embeddings"] = False
    (d / "config.json").write_text(json.dumps(c))
    with pytest.raises(HFCheckpointError, match="missing tensor lm_head.weight"):
        load_hf_params(d, model_config_from_hf(d))


def test_unknown_architecture(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"architectures": ["GPT2LMHeadModel"], "model_type": "gpt2"}))
    with pytest.raises(HFCheckpointError, match=r"unsupported architecture \['GPT2LMHeadModel'\]"):
        model_config_from_hf(tmp_path)


# ---- malformed config.json ------------------------------------------------------------------------
def _edit_config(d, **changes):
    c = json.loads((d / "config.json").read_text())
    for k, v in changes.items():
        if v is None:
            c.pop(k, None)
        else:
            c[k] = v
    (d / "config.json").write_text(json.dumps(c))


def test_missing_directory(tmp_path):
    with pytest.raises(HFCheckpointError, match=rf"^{tmp_path}/nope: no such directory"):
        model_config_from_hf(tmp_path / "nope")


def test_invalid_config_json(hf_dirs, tmp_path):
    d = _copy(hf_dirs["llama3"][1], tmp_path / "m")
    (d / "config.json").write_text('{"architectures": ["LlamaForCausalLM"],')
    with pytest.raises(HFCheckpointError, match=rf"^{d}/config.json: invalid JSON \("):
        model_config_from_hf(d)
    (d / "config.json").write_text("[1, 2]")
    with pytest.raises(HFCheckpointError, match=rf"^{d}/config.json: invalid config: expected a JSON object"):
        model_config_from_hf(d)


@pytest.mark.parametrize("key", ["hidden_size", "num_attention_heads", "vocab_size", "intermediate_size",
                                 "num_hidden_layers"])
def test_missing_config_key(hf_dirs, tmp_path, key):
    d = _copy(hf_dirs["qwen2"][1], tmp_path / "m")
    _edit_config(d, **{key: None})
    with pytest.raises(HFCheckpointError, match=rf"^{d}/config.json: missing key '{key}'$"):
        model_config_from_hf(d)


def test_bad_config_values_name_the_key(hf_dirs, tmp_path):
    d = _copy(hf_dirs["llama3"][1], tmp_path / "m")
    _edit_config(d, hidden_size="64")
    with pytest.raises(HFCheckpointError, match=r"config.json: hidden_size='64': expected a positive integer"):
        model_config_from_hf(d)
    _edit_config(d, hidden_size=64, num_key_value_heads=0)
    with pytest.raises(HFCheckpointError, match=r"config.json: num_key_value_heads=0: expected a positive integer"):
        model_config_from_hf(d)
    c = json.loads((d / "config.json").read_text())
    block = "rope_scaling" if c.get("rope_scaling") else "rope_parameters"  # transformers 4 / 5
    scaling = {k: v for k, v in c[block].items() if k != "factor"}
    _edit_config(d, num_key_value_heads=2, **{block: scaling})
    with pytest.raises(HFCheckpointError, match=rf"config.json: {block}.factor: missing \(needed for rope_type "
                                                r"'llama3'\)"):
        model_config_from_hf(d)
    _edit_config(d, architectures="LlamaForCausalLM")
    with pytest.raises(HFCheckpointError, match=r"architectures='LlamaForCausalLM': expected a list"):
        model_config_from_hf(d)


# ---- malformed safetensors ------------------------------------------------------------------------
def _header(path):
    raw = path.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    return json.loads(raw[8:8 + n]), raw[8 + n:]


def _write_safetensors(path, header, data):
    blob = json.dumps(header).encode()
    blob += b" " * (-len(blob) % 8)
    path.write_bytes(struct.pack("<Q", len(blob)) + blob + data)


def _last_two(header):
    spans = sorted((v["data_offsets"], k) for k, v in header.items() if k != "__metadata__")
    return spans[-2][1], spans[-1][1]


def _corrupt(d, how):
    st = d / "model.safetensors"
    raw = st.read_bytes()
    header, data = _header(st)
    if how == "empty":
        st.write_bytes(b"")
    elif how == "seven_bytes":
        st.write_bytes(raw[:7])
    elif how == "truncated":
        st.write_bytes(raw[:len(raw) // 2])
    elif how == "huge_header":
        st.write_bytes(struct.pack("<Q", 2**40) + raw[8:])
    elif how == "header_past_end":
        st.write_bytes(struct.pack("<Q", len(raw)) + raw[8:])
    elif how == "garbage_header":
        (n,) = struct.unpack("<Q", raw[:8])
        st.write_bytes(raw[:8] + b"\xff" * n + data)
    elif how == "past_end":  # the last tensor's end moved past the data
        _, last = _last_two(header)
        header[last]["data_offsets"][1] += 4096
        _write_safetensors(st, header, data)
    elif how == "overlap":  # the last tensor starts inside the one before it
        prev, last = _last_two(header)
        b, e = header[last]["data_offsets"]
        header[last]["data_offsets"] = [b - 8, e - 8]
        _write_safetensors(st, header, data)
    elif how == "extra_bytes":
        st.write_bytes(raw + b"\0" * 100)
    elif how == "wrong_dtype":
        _, last = _last_two(header)
        header[last]["dtype"] = "F64"
        _write_safetensors(st, header, data)
    return st


CORRUPTIONS = {
    "empty": r"not a valid safetensors file: the file is empty \(0 bytes\)",
    "seven_bytes": r"truncated: 7 bytes, shorter than the 8-byte header length",
    "truncated": r"truncated|tensor .* ends at byte",
    "huge_header": r"the header length field says 1,099,511,627,776 bytes, over the format's 100,000,000-byte cap",
    "header_past_end": r"truncated: the header length field says [\d,]+ bytes but only [\d,]+ follow it",
    "garbage_header": r"the header is not valid JSON",
    "past_end": r"tensor (lm_head|model)\S* ends at byte [\d,]+ of the data but the file holds only [\d,]+ bytes",
    "overlap": r"tensor \S+ \(data_offsets \[\d+, \d+\]\) overlaps tensor \S+ \(data_offsets \[\d+, \d+\]\)",
    "extra_bytes": r"100 bytes after the last tensor that the header does not describe",
    "wrong_dtype": r"tensor \S+: data_offsets \[\d+, \d+\] span [\d,]+ bytes but shape \[\d+(, \d+)*\] of F64 needs",
}


@pytest.mark.parametrize("how", list(CORRUPTIONS))
def test_corrupt_safetensors_is_one_message_naming_the_file(hf_dirs, tmp_path, how):
    d = _copy(hf_dirs["llama3"][1], tmp_path / "m")
    cfg = model_config_from_hf(d)
    st = _corrupt(d, how)
    with pytest.raises(HFCheckpointError) as e:
        load_hf_params(d, cfg)
    msg = str(e.value)
    assert msg.startswith(f"{st}: not a valid safetensors file: "), msg
    assert re.search(CORRUPTIONS[how], msg), msg


def test_huge_header_length_allocates_nothing(hf_dirs, tmp_path):
    d = _copy(hf_dirs["llama3"][1], tmp_path / "m")
    _corrupt(d, "huge_header")
    tracemalloc.start()
    with pytest.raises(HFCheckpointError, match="over the format's"):
        hf_io.open_weights(d)
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    assert peak < 1 << 20  # the 1 TiB header is never read


def test_every_offset_is_checked_before_reading(hf_dirs, tmp_path):
    """A tensor the model does not even need (an extra one) still makes the file invalid, before any read."""
    d = _copy(hf_dirs["llama3"][1], tmp_path / "m")
    st = d / "model.safetensors"
    header, data = _header(st)
    header["extra.unused"] = {"dtype": "F32", "shape": [4], "data_offsets": [len(data), len(data) + 16]}
    _write_safetensors(st, header, data)  # 16 bytes short
    with pytest.raises(HFCheckpointError, match=r"tensor extra.unused ends at byte"):
        hf_io.open_weights(d)


def test_pickle_only_checkpoint_is_refused_never_unpickled(hf_dirs, tmp_path):
    import pickle

    d = _copy(hf_dirs["llama3"][1], tmp_path / "m")
    (d / "model.safetensors").unlink()
    marker = tmp_path / "unpickled"

    class Payload:  # unpickling this creates the marker file
        def __reduce__(self):
            return (open, (str(marker), "w"))

    (d / "pytorch_model.bin").write_bytes(pickle.dumps(Payload()))
    with pytest.raises(HFCheckpointError, match=rf"^{d}: only pickle weights \(pytorch_model.bin\); jalign reads "
                                                r"safetensors only and never unpickles .*save_pretrained\(OUT, "
                                                r"safe_serialization=True\)"):
        load_hf_params(d, model_config_from_hf(d))
    assert not marker.exists()


def test_index_errors_name_the_index(hf_dirs, tmp_path):
    d = tmp_path / "m"
    build_hf("qwen2", d, max_shard_size="40KB")
    index = d / "model.safetensors.index.json"
    good = json.loads(index.read_text())
    cfg = model_config_from_hf(d)
    index.write_text("{not json")
    with pytest.raises(HFCheckpointError, match=rf"^{index}: invalid JSON"):
        load_hf_params(d, cfg)
    index.write_text(json.dumps({"metadata": {}}))
    with pytest.raises(HFCheckpointError, match=rf"^{index}: missing key 'weight_map'"):
        load_hf_params(d, cfg)
    wm = dict(good["weight_map"])
    wm["model.norm.weight"] = next(f for f in sorted(set(wm.values())) if f != wm["model.norm.weight"])
    index.write_text(json.dumps({"weight_map": wm}))
    with pytest.raises(HFCheckpointError, match=rf"^{index}: lists tensor model.norm.weight in model-\d+-of-\d+"
                                                r"\.safetensors, which does not contain it"):
        load_hf_params(d, cfg)
    index.write_text(json.dumps(good))
    victim = sorted(set(good["weight_map"].values()))[1]
    (d / victim).unlink()
    with pytest.raises(HFCheckpointError, match=rf"^{index}: lists {victim}, which is missing"):
        load_hf_params(d, cfg)


def test_unsupported_tensor_dtype_is_named(hf_dirs, tmp_path):
    d = _copy(hf_dirs["llama3"][1], tmp_path / "m")
    st = d / "model.safetensors"
    header, data = _header(st)
    header["model.norm.weight"]["dtype"] = "U32"  # same itemsize as F32: a valid file jalign does not read
    _write_safetensors(st, header, data)
    with pytest.raises(HFCheckpointError, match=r"model.safetensors: tensor model.norm.weight has dtype U32, which "
                                                r"jalign does not read"):
        load_hf_params(d, model_config_from_hf(d))


# ---- jalign convert --------------------------------------------------------------------------------
def test_convert_refuses_to_overwrite_params(hf_dirs, tmp_path):
    from jalign.config import ConfigError

    _, d = hf_dirs["llama3"]
    out = tmp_path / "ckpt"
    assert hf_io.convert_main(["--hf", str(d), "--out", str(out)]) == 0
    before = sorted(p.name for p in (out / "params").iterdir())
    with pytest.raises(ConfigError, match=rf"--out {out}: {out}/params already exists"):
        hf_io.convert_main(["--hf", str(d), "--out", str(out)])
    assert sorted(p.name for p in (out / "params").iterdir()) == before


def test_convert_without_config_says_which_paths_it_tried(tmp_path):
    from jalign.config import ConfigError

    (tmp_path / "ck").mkdir()
    with pytest.raises(ConfigError, match=r"--from-checkpoint .*/ck: no config.yaml beside it or in its run "
                                          r"directory; pass --config"):
        hf_io.convert_main(["--from-checkpoint", str(tmp_path / "ck"), "--to-hf", str(tmp_path / "hf")])


def test_convert_an_intermediate_checkpoint_of_a_run(tmp_path):
    """`jalign convert --from-checkpoint RUN/checkpoints/2 --to-hf DIR`: that step's weights (not the
    newest), the architecture from RUN/config.yaml; transformers' logits equal ours for that step."""
    from pathlib import Path

    from jalign.checkpoint import load_params
    from jalign.config import load_config
    from jalign.trainer import train

    root = Path(__file__).parent.parent
    run = tmp_path / "run"
    train(load_config(root / "configs/sft_tiny.yaml", [
        "model.hidden=32", "model.mlp=64", "model.layers=1", "model.heads=4", "model.kv_heads=2",
        "data.seq_len=32", "train.global_batch=16", "train.steps=4", "train.checkpoint_every=2",
        "train.keep_checkpoints=3", "train.eval_every=0", "train.log_every=1", "train.progress=false",
        "train.tensorboard=false", "train.async_checkpointing=false", "eval.prompts=0",
        "optim.lr=1e-2", "optim.warmup_steps=0", f"train.out_dir={run}"]))
    assert (run / "checkpoints" / "2").is_dir() and (run / "checkpoints" / "4").is_dir()
    out = tmp_path / "hf2"
    assert hf_io.convert_main(["--from-checkpoint", str(run / "checkpoints" / "2"), "--to-hf", str(out)]) == 0
    cfg = load_config(run / "config.yaml").model
    step2, step4 = load_params(run, step=2), load_params(run, step=4)
    assert not np.allclose(np.asarray(step2["embed"]), np.asarray(step4["embed"]))  # the steps really differ
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
    np.testing.assert_array_equal(reloaded.model.embed_tokens.weight.detach().numpy(), np.asarray(step2["embed"]))
    rng = np.random.default_rng(0)
    tokens = rng.integers(0, cfg.vocab_size, (2, 10))
    mask = np.ones_like(tokens)
    np.testing.assert_allclose(hf_logits(reloaded, tokens, mask), jalign_logits(step2, cfg, tokens, mask),
                               atol=1e-4, rtol=1e-4)
    # the checkpoints directory itself means the newest step
    assert hf_io.convert_main(["--from-checkpoint", str(run / "checkpoints"), "--to-hf", str(tmp_path / "hf4")]) == 0
    newest = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf4")
    np.testing.assert_array_equal(newest.model.embed_tokens.weight.detach().numpy(), np.asarray(step4["embed"]))


# ---- sliding-window attention (Mistral, Qwen2/Qwen3 use_sliding_window) ----------------------------
WINDOW = 5  # far shorter than the rows below, so every layer with a window masks for real


def build_windowed(kind: str, path, head_scale: float = 1.0, **extra):
    common = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=3, num_attention_heads=4,
                  num_key_value_heads=2, max_position_embeddings=512, bos_token_id=1, eos_token_id=2,
                  attn_implementation="eager")
    torch.manual_seed(1)
    if kind == "mistral":
        hf_cfg = transformers.MistralConfig(**common, sliding_window=WINDOW, **extra)
    elif kind == "qwen2":
        hf_cfg = transformers.Qwen2Config(**common, use_sliding_window=True, sliding_window=WINDOW, **extra)
    else:
        hf_cfg = transformers.Qwen3Config(**common, use_sliding_window=True, sliding_window=WINDOW, **extra)
    model = transformers.AutoModelForCausalLM.from_config(hf_cfg).eval()
    with torch.no_grad():
        model.lm_head.weight.mul_(head_scale)
    model.save_pretrained(path, safe_serialization=True)
    return model


def full_attention_logits(params, cfg, tokens, mask):
    import dataclasses

    return jalign_logits(params, dataclasses.replace(cfg, sliding_window=None), tokens, mask)


@pytest.mark.parametrize("kind,extra,start", [("mistral", {}, 0), ("qwen2", {"max_window_layers": 1}, 1),
                                              ("qwen3", {"max_window_layers": 0}, 0)])
def test_sliding_window_logits_match_transformers(tmp_path, kind, extra, start):
    model = build_windowed(kind, tmp_path, **extra)
    cfg = model_config_from_hf(tmp_path)
    assert (cfg.sliding_window, cfg.sliding_window_start_layer) == (WINDOW, start)
    params = load_hf_params(tmp_path, cfg)
    tokens, mask = batch(B=3, T=24, lens=(24, 13, 4))
    ours, ref = jalign_logits(params, cfg, tokens, mask), hf_logits(model, tokens, mask)
    valid = mask.astype(bool)
    np.testing.assert_allclose(ours[valid], ref[valid], atol=1e-5, rtol=1e-5)
    # the window matters past WINDOW tokens (so the comparison above is not the full-attention one)
    full = full_attention_logits(params, cfg, tokens, mask)
    assert np.abs(full[0, WINDOW:] - ref[0, WINDOW:]).max() > 1e-2
    np.testing.assert_allclose(full[0, :WINDOW], ref[0, :WINDOW], atol=1e-5, rtol=1e-5)


def test_sliding_window_packed_rows_match_separate_sequences(tmp_path):
    model = build_windowed("mistral", tmp_path)
    cfg = model_config_from_hf(tmp_path)
    params = load_hf_params(tmp_path, cfg)
    rng = np.random.default_rng(4)
    a, b = rng.integers(3, VOCAB, 11), rng.integers(3, VOCAB, 9)
    row = np.concatenate([a, b, [0, 0, 0, 0]])[None]  # two examples packed in one row of 24, then padding
    seg = np.array([[1] * 11 + [2] * 9 + [0] * 4])
    pos = np.array([list(range(11)) + list(range(9)) + [0] * 4])
    hidden = forward(params, jnp.asarray(row, jnp.int32), jnp.asarray(pos, jnp.int32), jnp.asarray(seg, jnp.int32), cfg)
    packed = np.asarray(lm_logits(params, hidden, cfg))[0]
    for ids, sl in ((a, slice(0, 11)), (b, slice(11, 20))):
        ref = hf_logits(model, ids[None], np.ones((1, len(ids)), np.int64))[0]
        np.testing.assert_allclose(packed[sl], ref, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("kind,extra", [("mistral", {}), ("qwen2", {"max_window_layers": 1})])
def test_sliding_window_generation_matches_transformers(tmp_path, kind, extra):
    from jalign import generate as gen

    model = build_windowed(kind, tmp_path, head_scale=40.0, **extra)  # sharp logits: no near-ties in greedy
    cfg = model_config_from_hf(tmp_path)
    params = load_hf_params(tmp_path, cfg)
    prompts = [[5, 6, 7, 8, 9, 10, 11], [3, 4], [100, 101, 102, 103]]
    n_new = 24  # prompt + new tokens far past the window: the KV cache must mask by slot distance
    out = gen.generate(params, cfg, prompts, max_new_tokens=n_new, greedy=True, eos_ids=(2,), min_new_tokens=n_new)
    T = max(map(len, prompts))
    ids = torch.tensor([[0] * (T - len(p)) + p for p in prompts])
    mask = torch.tensor([[0] * (T - len(p)) + [1] * len(p) for p in prompts])
    with torch.no_grad():
        ref = model.generate(input_ids=ids, attention_mask=mask, do_sample=False, max_new_tokens=n_new,
                             min_new_tokens=n_new, eos_token_id=2, pad_token_id=0)[:, T:].numpy()
    np.testing.assert_array_equal(out["tokens"], ref)
    assert len(set(ref[0].tolist())) > 3


@pytest.mark.parametrize("kind,extra,arch", [("mistral", {}, "MistralForCausalLM"),
                                             ("qwen2", {"max_window_layers": 1}, "Qwen2ForCausalLM"),
                                             ("qwen3", {"max_window_layers": 2}, "Qwen3ForCausalLM")])
def test_sliding_window_survives_save_hf(tmp_path, kind, extra, arch):
    model = build_windowed(kind, tmp_path / "src", **extra)
    cfg = model_config_from_hf(tmp_path / "src")
    out = save_hf(load_hf_params(tmp_path / "src", cfg), cfg, tmp_path / "out")
    c = json.loads((tmp_path / "out" / "config.json").read_text())
    assert c["architectures"] == [arch] and c["sliding_window"] == WINDOW
    if kind != "mistral":
        assert c["use_sliding_window"] and c["max_window_layers"] == extra["max_window_layers"]
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(out, attn_implementation="eager").eval()
    tokens, mask = batch(B=3, T=24, lens=(24, 13, 4))
    np.testing.assert_array_equal(hf_logits(reloaded, tokens, mask), hf_logits(model, tokens, mask))
    assert model_config_from_hf(out) == cfg.__class__(**{**cfg.__dict__, "hf_path": str(out)})


def test_llama_with_a_window_exports_as_mistral(tmp_path, hf_dirs):
    import dataclasses

    model, d = hf_dirs["llama3"]
    cfg = dataclasses.replace(model_config_from_hf(d), sliding_window=WINDOW)
    params = load_hf_params(d, cfg)
    save_hf(params, cfg, tmp_path / "out")
    assert json.loads((tmp_path / "out" / "config.json").read_text())["architectures"] == ["MistralForCausalLM"]
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "out", attn_implementation="eager").eval()
    tokens, mask = batch(B=3, T=24, lens=(24, 13, 4))
    valid = mask.astype(bool)
    np.testing.assert_allclose(jalign_logits(params, cfg, tokens, mask)[valid],
                               hf_logits(reloaded, tokens, mask)[valid], atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="sliding_window_start_layer=1 > 0 has no Hugging Face architecture"):
        save_hf(params, dataclasses.replace(cfg, sliding_window_start_layer=1), tmp_path / "bad")


def test_qwen2_window_past_the_last_layer_is_full_attention(tmp_path):
    # max_window_layers >= num_hidden_layers: transformers attends fully in every layer; so do we
    model = build_windowed("qwen2", tmp_path, max_window_layers=3)
    cfg = model_config_from_hf(tmp_path)
    assert cfg.sliding_window is None
    tokens, mask = batch(B=3, T=24, lens=(24, 13, 4))
    valid = mask.astype(bool)
    np.testing.assert_allclose(jalign_logits(load_hf_params(tmp_path, cfg), cfg, tokens, mask)[valid],
                               hf_logits(model, tokens, mask)[valid], atol=1e-5, rtol=1e-5)
    c = json.loads((tmp_path / "config.json").read_text())
    c["layer_types"] = ["sliding_attention", "full_attention", "sliding_attention"]  # alternating: not supported
    (tmp_path / "config.json").write_text(json.dumps(c))
    with pytest.raises(HFCheckpointError, match="mixes full and sliding-window layers after layer 0"):
        model_config_from_hf(tmp_path)


def test_rows_longer_than_max_seq_len_are_an_error(hf_dirs):
    import dataclasses

    _, d = hf_dirs["llama3"]
    cfg = dataclasses.replace(model_config_from_hf(d), max_seq_len=16)
    params = load_hf_params(d, cfg)
    tokens, mask = batch(B=1, T=17, lens=(17,))
    with pytest.raises(ValueError, match=r"rows of 17 tokens are longer than model.max_seq_len=16"):
        jalign_logits(params, cfg, tokens, mask)
    with pytest.raises(HFCheckpointError, match="data.seq_len=1024 is longer than max_position_embeddings=512"):
        model_config_from_hf(d, seq_len=1024)


def test_sliding_window_refused_with_ring_attention(hf_dirs):
    import dataclasses

    from sharding.rules import use_rules

    _, d = hf_dirs["llama3"]
    cfg = dataclasses.replace(model_config_from_hf(d), sliding_window=WINDOW)
    params = load_hf_params(d, cfg)
    tokens, mask = batch(B=2, T=16, lens=(16, 9))
    pos = np.broadcast_to(np.arange(16), tokens.shape)
    mesh = make_mesh(1, 1, 1, 4, devices=jax.devices()[:4])

    def ring(c):
        @jax.jit
        def f(p):
            with use_rules(mesh):
                return forward(p, jnp.asarray(tokens, jnp.int32), jnp.asarray(pos, jnp.int32),
                               jnp.asarray(mask, jnp.int32), c)
        return np.asarray(f(jax.device_get(params)))

    with pytest.raises(ValueError, match=r"model.sliding_window=5 is shorter than the rows \(16 tokens\), and ring"):
        ring(cfg)
    # a window no row reaches changes nothing, so the ring runs
    wide = dataclasses.replace(cfg, sliding_window=16)
    ref = np.asarray(forward(params, jnp.asarray(tokens, jnp.int32), jnp.asarray(pos, jnp.int32),
                             jnp.asarray(mask, jnp.int32), dataclasses.replace(cfg, sliding_window=None)))
    np.testing.assert_allclose(ring(wide)[mask > 0], ref[mask > 0], atol=1e-5)
