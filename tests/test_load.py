"""THE weight loader: run dirs, HF dirs and random init, each leaf straight onto its sharding, strictly.

References are independent of the loader: the arrays a run saved (kept in NumPy), the safetensors read
by the `safetensors` library and converted to our layout by the formulas written out here, and
``ParamDecl.initialize`` for random init.
"""
import dataclasses
import struct
import json

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import optax
import pytest
from jax.sharding import SingleDeviceSharding

from jalign.checkpoint import Checkpointer
from jalign.config import Config, ConfigError, ModelConfig, dump_config
from jalign.models import hf_io
from jalign.models import params as params_lib
from jalign.models.load import LoadError, WeightSource, load_params, parse_source, source_architecture
from jalign.models.transformer import declare_params
from sharding import make_mesh
from sharding.rules import DEFAULT_RULES

CFG = ModelConfig(vocab_size=64, hidden=32, mlp=64, layers=2, heads=4, kv_heads=2)
MESHES = {"fsdp8": dict(data=1, fsdp=8), "2x2x2": dict(data=2, fsdp=2, tensor=2)}


def source_values(decls, seed):
    """Values no random init would give (norms included), so a loaded leaf equal to them was read."""
    rng = np.random.default_rng(seed)
    return {p: rng.standard_normal(d.shape).astype(np.float32) for p, d in params_lib.flatten(decls).items()}


def save_run(run_dir, cfg, steps_values: dict, lm_head=True, score_outputs=0):
    """A run directory exactly as the trainer lays it out: config.yaml and checkpoints/STEP/{state,meta}
    with the whole train state (params, Adam state, step, rng), saved from an 8-way data mesh."""
    mesh = make_mesh(data=8)
    decls = declare_params(cfg, lm_head=lm_head, score_outputs=score_outputs)
    shardings = params_lib.flatten(params_lib.param_shardings(decls, mesh))
    ckpt = Checkpointer(run_dir / "checkpoints", keep=5, async_save=False)
    for step, values in steps_values.items():
        params = params_lib.unflatten({p: jax.device_put(v, shardings[p]) for p, v in values.items()})
        state = {"step": jnp.int32(step), "params": params, "opt_state": optax.adam(1e-3).init(params),
                 "rng": jnp.zeros(2, jnp.uint32)}
        ckpt.save(step, state, meta={"step": step})
    ckpt.close()
    dump_config(Config(model=cfg), run_dir / "config.yaml")
    return run_dir


@pytest.fixture(scope="module")
def sft_run(tmp_path_factory):
    decls = declare_params(CFG)
    values = {3: source_values(decls, 3), 5: source_values(decls, 5)}
    return save_run(tmp_path_factory.mktemp("sft"), CFG, values), values


def build_hf_dir(d):
    """A tiny random Llama saved by transformers in bfloat16; norms perturbed away from 1."""
    transformers = pytest.importorskip("transformers")
    torch = pytest.importorskip("torch")
    torch.manual_seed(0)
    config = transformers.LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128)
    model = transformers.AutoModelForCausalLM.from_config(config)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.add_(0.1 * torch.randn_like(p))
    model.to(torch.bfloat16).save_pretrained(d, safe_serialization=True)
    return d


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    return build_hf_dir(tmp_path_factory.mktemp("hf"))


def hf_reference(hf_dir) -> dict:
    """Our layout from the safetensors (read by the `safetensors` library), by the projection formulas:
    q = x W_q^T with W_q [H*hd, D] -> ours [D, H, hd]; o_proj [D, H*hd] -> ours [H, hd, D]; the MLP and
    lm_head weights transposed to [in, out]."""
    from safetensors import safe_open

    sd = {}
    for f in hf_dir.glob("*.safetensors"):
        with safe_open(str(f), framework="pt") as st:
            sd.update({k: st.get_tensor(k).float().numpy() for k in st.keys()})
    L, D, H, KV = CFG.layers, CFG.hidden, CFG.heads, CFG.kv_heads
    hd = D // H

    def stack(name, f=lambda w: w):
        return np.stack([f(sd[f"model.layers.{i}.{name}"]) for i in range(L)])

    return {"embed": sd["model.embed_tokens.weight"], "final_norm": sd["model.norm.weight"],
            "lm_head": sd["lm_head.weight"].T,
            "layers/attn_norm": stack("input_layernorm.weight"),
            "layers/mlp_norm": stack("post_attention_layernorm.weight"),
            "layers/q": stack("self_attn.q_proj.weight", lambda w: w.reshape(H, hd, D).transpose(2, 0, 1)),
            "layers/k": stack("self_attn.k_proj.weight", lambda w: w.reshape(KV, hd, D).transpose(2, 0, 1)),
            "layers/v": stack("self_attn.v_proj.weight", lambda w: w.reshape(KV, hd, D).transpose(2, 0, 1)),
            "layers/o": stack("self_attn.o_proj.weight", lambda w: w.reshape(D, H, hd).transpose(1, 2, 0)),
            "layers/gate": stack("mlp.gate_proj.weight", np.transpose),
            "layers/up": stack("mlp.up_proj.weight", np.transpose),
            "layers/down": stack("mlp.down_proj.weight", np.transpose)}


def load(spec, decls, mesh, **kw):
    kw.setdefault("log", lambda *_: None)
    kw.setdefault("where", "model.init_from")
    return load_params(parse_source(str(spec), where="model.init_from"), decls, mesh=mesh, rules=DEFAULT_RULES,
                       dtype=kw.pop("dtype", jnp.float32), seed=kw.pop("seed", 0), **kw)


def assert_on_target_shardings(params, decls, mesh):
    """Every leaf has its target sharding and every addressable shard the sharded shape; a leaf with
    a sharded axis is never whole on any device."""
    targets = params_lib.flatten(params_lib.param_shardings(decls, mesh))
    flat = params_lib.flatten(params)
    assert set(flat) == set(targets)
    for path, x in flat.items():
        assert x.sharding == targets[path], path
        shard_shape = targets[path].shard_shape(x.shape)
        assert len(x.addressable_shards) == mesh.devices.size
        for shard in x.addressable_shards:
            assert shard.data.shape == shard_shape, (path, shard.data.shape, shard_shape)
            if any(s is not None for s in targets[path].spec):
                assert shard.data.size < x.size, path


def new_full_size_single_device_arrays(before_ids, decls, mesh):
    """Arrays created since ``before_ids`` that sit whole on one device with the shape of a leaf whose
    target sharding splits it."""
    specs = params_lib.flatten(params_lib.param_specs(decls, mesh))
    sharded = {d.shape for p, d in params_lib.flatten(decls).items() if any(s is not None for s in specs[p])}
    return [a.shape for a in jax.live_arrays() if id(a) not in before_ids
            and isinstance(a.sharding, SingleDeviceSharding) and a.shape in sharded and a.size > 1]


# ---- parsing ------------------------------------------------------------------------------------
def test_parse_source_kinds_and_detection(sft_run, hf_dir, tmp_path):
    run_dir, _ = sft_run
    assert parse_source(None, where="k") == WeightSource("random")
    assert parse_source("random", where="k").kind == "random"
    assert parse_source(f"run:{run_dir}", where="k") == WeightSource("run", str(run_dir), None)
    assert parse_source(f"run:{run_dir}@3", where="k") == WeightSource("run", str(run_dir), 3)
    assert parse_source(f"hf:{hf_dir}", where="k") == WeightSource("hf", str(hf_dir), None)
    assert parse_source(str(run_dir), where="k").kind == "run"  # config.yaml + checkpoints/
    assert parse_source(str(hf_dir), where="k").kind == "hf"  # config.json
    assert str(parse_source(f"{run_dir}@5", where="k")) == f"run:{run_dir}@5"
    assert issubclass(LoadError, ConfigError)
    cases = {
        f"{tmp_path}/nope": "does not exist",
        f"hf:{run_dir}": f"not a Hugging Face directory .*it is a jalign run directory: write run:{run_dir}",
        f"run:{hf_dir}": f"not a jalign directory .*it is a Hugging Face directory: write hf:{hf_dir}",
        f"run:{run_dir}@x": "must be a non-negative integer",
        f"hf:{hf_dir}@3": "applies to run: sources only",
        str(tmp_path): "neither a Hugging Face directory",
        str(hf_dir / "config.json"): "is a file",
    }
    for spec, message in cases.items():
        with pytest.raises(LoadError, match=f"^algorithm.reward_model={spec}: .*{message}"):
            parse_source(spec, where="algorithm.reward_model")


def test_source_architecture(sft_run, hf_dir):
    run_dir, _ = sft_run
    assert source_architecture(parse_source(None, where="k")) is None
    arch = source_architecture(parse_source(str(run_dir), where="k"))
    assert (arch.vocab_size, arch.hidden, arch.mlp, arch.layers, arch.heads, arch.kv_heads) == (64, 32, 64, 2, 4, 2)
    hf = source_architecture(parse_source(str(hf_dir), where="k"))
    assert (hf.vocab_size, hf.hidden, hf.mlp, hf.layers, hf.heads, hf.kv_heads) == (64, 32, 64, 2, 4, 2)
    assert declare_params(hf).keys() == declare_params(CFG).keys()


# ---- each kind of source: exact values, straight onto the target shardings ----------------------
@pytest.mark.parametrize("mesh_name", sorted(MESHES))
def test_run_source_exact_on_target_shardings(sft_run, mesh_name):
    run_dir, values = sft_run
    mesh, decls = make_mesh(**MESHES[mesh_name]), declare_params(CFG)
    before = {id(a) for a in jax.live_arrays()}
    newest = load(run_dir, decls, mesh)  # saved on an 8-way data mesh, restored onto another layout
    assert_on_target_shardings(newest, decls, mesh)
    assert new_full_size_single_device_arrays(before, decls, mesh) == []
    for path, x in params_lib.flatten(newest).items():
        np.testing.assert_array_equal(np.asarray(x), values[5][path], err_msg=path)  # bit for bit
    older = params_lib.flatten(load(f"run:{run_dir}@3", decls, mesh, dtype=jnp.bfloat16))
    for path, x in older.items():
        assert x.dtype == jnp.bfloat16
        np.testing.assert_array_equal(np.asarray(x), values[3][path].astype(ml_dtypes.bfloat16), err_msg=path)


@pytest.mark.parametrize("mesh_name", sorted(MESHES))
def test_hf_source_exact_on_target_shardings(hf_dir, mesh_name, monkeypatch):
    mesh, decls = make_mesh(**MESHES[mesh_name]), declare_params(CFG)
    # Every host buffer handed to a device is that device's shard, never the whole tensor.
    put = []
    original = jax.device_put

    def spy(x, device=None, *a, **k):
        put.extend(np.shape(v) for v in (x if isinstance(x, list) else [x]) if isinstance(v, np.ndarray))
        return original(x, device, *a, **k)

    monkeypatch.setattr(jax, "device_put", spy)
    before = {id(a) for a in jax.live_arrays()}
    params = load(f"hf:{hf_dir}", decls, mesh)
    monkeypatch.undo()
    assert_on_target_shardings(params, decls, mesh)
    assert new_full_size_single_device_arrays(before, decls, mesh) == []
    shardings = params_lib.flatten(params_lib.param_shardings(decls, mesh))
    expected = sorted(shardings[p].shard_shape(d.shape) for p, d in params_lib.flatten(decls).items() for _ in range(8))
    assert sorted(put) == expected
    ref = hf_reference(hf_dir)
    for path, x in params_lib.flatten(params).items():
        np.testing.assert_array_equal(np.asarray(x), ref[path], err_msg=path)


def test_random_source_is_the_declared_init_on_target_shardings():
    mesh, decls = make_mesh(**MESHES["2x2x2"]), declare_params(CFG, score_outputs=2)
    params = load("random", decls, mesh, seed=7)
    assert_on_target_shardings(params, decls, mesh)
    for path, d in params_lib.flatten(decls).items():
        np.testing.assert_array_equal(np.asarray(params_lib.flatten(params)[path]), d.initialize(7, path, np.float32))


def test_convert_dir_equals_the_hf_directory(hf_dir, tmp_path):
    assert hf_io.convert_main(["--hf", str(hf_dir), "--out", str(tmp_path / "conv")]) == 0
    source = parse_source(str(tmp_path / "conv"), where="k")
    assert source.kind == "run" and source_architecture(source).hidden == 32
    mesh, decls = make_mesh(**MESHES["fsdp8"]), declare_params(CFG)
    a, b = load(tmp_path / "conv", decls, mesh), load(hf_dir, decls, mesh)
    assert_on_target_shardings(a, decls, mesh)
    jax.tree.map(lambda x, y: np.testing.assert_array_equal(np.asarray(x), np.asarray(y)), a, b)
    # an orbax params checkpoint directory itself (what `convert` wrote under params/)
    c = load(f"run:{tmp_path / 'conv' / 'params'}", decls, mesh)
    jax.tree.map(lambda x, y: np.testing.assert_array_equal(np.asarray(x), np.asarray(y)), c, b)


# ---- heads: fresh only where allowed, named in the log; extra source leaves ignored ---------------
def test_reward_model_from_sft_run_gets_the_trunk_and_a_fresh_head(sft_run):
    run_dir, values = sft_run
    mesh = make_mesh(**MESHES["2x2x2"])
    decls = declare_params(CFG, lm_head=False, score_outputs=1)
    logs = []
    params = params_lib.flatten(load(run_dir, decls, mesh, allow_fresh=("score", "score_bias"), seed=11,
                                     role="reward model", log=logs.append))
    assert set(params) == set(params_lib.flatten(decls)) and "lm_head" not in params
    for path, x in params.items():
        expected = params_lib.flatten(decls)[path].initialize(11, path, np.float32) if path.startswith("score") \
            else values[5][path]
        np.testing.assert_array_equal(np.asarray(x), expected, err_msg=path)
    assert_on_target_shardings(params_lib.unflatten(params), decls, mesh)
    assert len(logs) == 1 and "reward model" in logs[0]
    assert "initialised fresh (not in the source): score, score_bias" in logs[0] and "lm_head" not in logs[0]
    with pytest.raises(LoadError, match=r"score: not in the checkpoint \(config \(32, 1\)\).*score_bias: not in"):
        load(run_dir, decls, mesh, role="reward model")


def test_critic_from_hf_gets_the_trunk_and_a_fresh_head(hf_dir):
    mesh, decls = make_mesh(**MESHES["fsdp8"]), declare_params(CFG, lm_head=False, score_outputs=1)
    logs = []
    params = params_lib.flatten(load(hf_dir, decls, mesh, allow_fresh=("score",), role="critic", log=logs.append))
    ref = hf_reference(hf_dir)
    for path, x in params.items():
        if not path.startswith("score"):
            np.testing.assert_array_equal(np.asarray(x), ref[path], err_msg=path)
    assert "critic" in logs[0] and "score, score_bias" in logs[0]


# ---- strictness: one LoadError naming source, key, tensors and shapes -----------------------------
def test_shape_mismatch_names_every_tensor_and_the_fix(sft_run, hf_dir):
    run_dir, _ = sft_run
    mesh = make_mesh(**MESHES["fsdp8"])
    wide = declare_params(dataclasses.replace(CFG, hidden=64))  # the model: section's defaults, not the run's
    with pytest.raises(LoadError) as e:
        load(run_dir, wide, mesh, role="reference model")
    msg = str(e.value)
    assert msg.startswith(f"model.init_from=run:{run_dir}: the reference model's weights do not match")
    assert "layers/q: checkpoint (2, 32, 4, 8) vs config (2, 64, 4, 16)" in msg
    assert "embed: checkpoint (64, 32) vs config (64, 64)" in msg
    assert "and 6 more" in msg
    assert "set the model: section to the source's architecture, or drop it to take it from the source" in msg
    with pytest.raises(LoadError, match=r"hf:.*embed: checkpoint \(64, 32\) vs config \(128, 32\).*lm_head: "
                                        r"checkpoint \(32, 64\) vs config \(32, 128\)"):
        load(f"hf:{hf_dir}", declare_params(dataclasses.replace(CFG, vocab_size=128)), mesh)


def test_missing_tensors_are_named(tmp_path, hf_dir):
    mesh = make_mesh(**MESHES["fsdp8"])
    rm_decls = declare_params(CFG, lm_head=False, score_outputs=1)
    rm_run = save_run(tmp_path / "rm", CFG, {1: source_values(rm_decls, 1)}, lm_head=False, score_outputs=1)
    with pytest.raises(LoadError, match=r"lm_head: not in the checkpoint \(config \(32, 64\)\)\)\. Fix: the "
                                        r"source lacks these tensors"):
        load(rm_run, declare_params(CFG), mesh)  # a policy from a reward-model run
    # an HF directory whose safetensors lack a tensor config.json implies
    broken = tmp_path / "hf_broken"
    broken.mkdir()
    (broken / "config.json").write_text((hf_dir / "config.json").read_text())
    drop_tensor(hf_dir / "model.safetensors", broken / "model.safetensors", "model.layers.1.mlp.up_proj.weight")
    with pytest.raises(LoadError, match=r"tensor model.layers.1.mlp.up_proj.weight \(for layers/up\) is missing"):
        load(broken, declare_params(CFG), mesh)


def drop_tensor(src, dst, name):
    """Rewrite a safetensors file without one tensor (header + data, offsets recomputed)."""
    raw = src.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8:8 + n])
    meta = header.pop("__metadata__", None)
    data, out, off = raw[8 + n:], {}, 0
    blobs = []
    for k, v in sorted(header.items(), key=lambda kv: kv[1]["data_offsets"][0]):
        if k == name:
            continue
        b, e = v["data_offsets"]
        blobs.append(data[b:e])
        out[k] = dict(v, data_offsets=[off, off + e - b])
        off += e - b
    if meta:
        out["__metadata__"] = meta
    h = json.dumps(out).encode()
    dst.write_bytes(struct.pack("<Q", len(h)) + h + b"".join(blobs))


def test_non_finite_weights_are_named(tmp_path, hf_dir):
    mesh = make_mesh(**MESHES["fsdp8"])
    decls = declare_params(CFG)
    values = source_values(decls, 2)
    values["layers/up"][1, 3, 5] = np.nan
    values["final_norm"][0] = np.inf
    run = save_run(tmp_path / "nan", CFG, {1: values})
    with pytest.raises(LoadError, match=r"run:.*the policy's weights contain NaN or inf in layers/up, final_norm|"
                                        r"final_norm, layers/up"):
        load(run, decls, mesh)
    # an inf in a bf16 HF tensor
    bad = tmp_path / "hf_inf"
    bad.mkdir()
    (bad / "config.json").write_text((hf_dir / "config.json").read_text())
    raw = bytearray((hf_dir / "model.safetensors").read_bytes())
    (n,) = struct.unpack("<Q", raw[:8])
    begin = json.loads(raw[8:8 + n])["model.embed_tokens.weight"]["data_offsets"][0] + 8 + n
    raw[begin + 10:begin + 12] = np.array([np.inf], ml_dtypes.bfloat16).tobytes()
    (bad / "model.safetensors").write_bytes(bytes(raw))
    with pytest.raises(LoadError, match=r"NaN or inf in embed;"):
        load(bad, decls, mesh)


def test_missing_step_and_damaged_metadata(sft_run, tmp_path):
    run_dir, _ = sft_run
    mesh, decls = make_mesh(**MESHES["fsdp8"]), declare_params(CFG)
    with pytest.raises(LoadError, match=r"no finished checkpoint of step 4 .*there are steps 3, 5"):
        load(f"run:{run_dir}@4", decls, mesh)
    import shutil

    damaged = tmp_path / "damaged"
    shutil.copytree(run_dir, damaged)
    (damaged / "checkpoints/5/state/_METADATA").unlink()
    with pytest.raises(LoadError, match=r"cannot read the checkpoint metadata in .*checkpoints/5/state"):
        load(damaged, decls, mesh)
    empty = tmp_path / "empty_run"
    (empty / "checkpoints").mkdir(parents=True)
    with pytest.raises(LoadError, match="contains no finished checkpoint"):
        load(f"run:{empty}", decls, mesh)


def test_orbax_in_flight_bound_fits_the_largest_shard():
    """Orbax refuses to read a shard larger than its in-flight byte bound: the bound is 1 GB, or the
    chunk-rounded size of the largest leaf when that is more (e.g. an 8B model's stacked MLP leaf)."""
    from types import SimpleNamespace

    from jalign.models.load import _RunReader

    def leaf(shape, chunks, dtype):
        return SimpleNamespace(shape=shape, dtype=np.dtype(dtype), storage=SimpleNamespace(chunk_shape=chunks))

    reader = _RunReader.__new__(_RunReader)
    reader._meta = {"small": leaf((64, 32), (8, 32), np.float32),
                    "mlp": leaf((32, 4096, 14336), (32, 512, 14336), np.float32),  # 7.5 GB, chunks divide it
                    "odd": leaf((100, 10), (64, 10), ml_dtypes.bfloat16)}
    assert reader._in_flight_gb({"small": None, "odd": None}) == 1
    assert reader._in_flight_gb({"small": None, "mlp": None}) == 8  # 7.52e9 bytes -> 8 GB
