"""Config loading: every shipped config loads; bad keys / types / meshes give the promised messages."""
from pathlib import Path

import pytest

from jalign.config import ConfigError, load_config, validate_for_devices

CONFIGS = sorted((Path(__file__).parent.parent / "configs").glob("*.yaml"))


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_every_shipped_config_loads(path):
    cfg = load_config(path)
    assert cfg.algorithm.name
    assert cfg.source == str(path)


def _write(tmp_path, text):
    p = tmp_path / "c.yaml"
    p.write_text(text)
    return p


def test_misspelt_key_names_file_line_and_suggestion(tmp_path):
    p = _write(tmp_path, "model:\n  hidden: 64\n  hiden: 32\n")
    with pytest.raises(ConfigError) as e:
        load_config(p)
    msg = str(e.value)
    assert f"{p}:3" in msg and "model.hiden" in msg and "did you mean 'model.hidden'" in msg


def test_misspelt_section(tmp_path):
    p = _write(tmp_path, "optim:\n  lr: 0.1\nmodle:\n  hidden: 8\n")
    with pytest.raises(ConfigError, match=r"c.yaml:3: modle: unknown section; did you mean 'model'"):
        load_config(p)


def test_wrong_type_names_line_and_key(tmp_path):
    p = _write(tmp_path, "train:\n  steps: 10\n  global_batch: lots\n")
    with pytest.raises(ConfigError, match=r"c.yaml:3: train.global_batch: expected an integer, got 'lots'"):
        load_config(p)


def test_bad_literal_suggests(tmp_path):
    p = _write(tmp_path, "optim:\n  schedule: cosin\n")
    with pytest.raises(ConfigError, match=r"c.yaml:2: optim.schedule: must be one of .*did you mean 'cosine'"):
        load_config(p)


def test_overrides_are_typed_and_named():
    cfg = load_config(None, ["optim.lr=3e-4", "mesh.tensor=2", "data.packing=false"])
    assert cfg.optim.lr == pytest.approx(3e-4) and cfg.mesh.tensor == 2 and cfg.data.packing is False
    with pytest.raises(ConfigError, match=r"override 'mesh.tensor=two': mesh.tensor: expected an integer"):
        load_config(None, ["mesh.tensor=two"])
    with pytest.raises(ConfigError, match=r"override 'optim.lrr=1': optim.lrr: unknown key; did you mean 'optim.lr'"):
        load_config(None, ["optim.lrr=1"])


def test_unknown_algorithm(tmp_path):
    p = _write(tmp_path, "algorithm:\n  name: dop\n")
    with pytest.raises(ConfigError, match=r"c.yaml:2: algorithm.name: unknown algorithm 'dop'; did you mean 'dpo'"):
        load_config(p)


def test_algorithm_fields_are_per_algorithm(tmp_path):
    p = _write(tmp_path, "algorithm:\n  name: sft\n  beta: 0.1\n")
    with pytest.raises(ConfigError, match=r"c.yaml:3: algorithm.beta: unknown key"):
        load_config(p)


def test_mesh_product_must_match_devices():
    cfg = load_config(None, ["mesh.data=2", "mesh.tensor=2"])
    with pytest.raises(ConfigError, match=r"mesh data\*fsdp\*tensor\*sequence = 2\*1\*2\*1 = 4 but there are 8 devices"):
        validate_for_devices(cfg, 8)


def test_batch_must_divide_data_parallel():
    cfg = load_config(None, ["mesh.data=8", "train.global_batch=12"])
    with pytest.raises(ConfigError, match=r"train.micro_batch=12 .* not divisible by the data-parallel size .* = 8"):
        validate_for_devices(cfg, 8)


def test_heads_must_divide_tensor():
    cfg = load_config(None, ["mesh.data=1", "mesh.tensor=8", "model.heads=4", "model.kv_heads=2"])
    with pytest.raises(ConfigError, match=r"model.heads=4 is not divisible by mesh.tensor=8"):
        validate_for_devices(cfg, 8)


def test_minus_one_fills_remaining_devices():
    cfg = load_config(None, ["mesh.data=-1", "mesh.tensor=2"])
    assert validate_for_devices(cfg, 8) == {"data": 4, "fsdp": 1, "tensor": 2, "sequence": 1}


def test_resolved_config_round_trips(tmp_path):
    from jalign.config import dump_config

    cfg = load_config(None, ["optim.lr=0.01", "algorithm.name=dpo", "algorithm.beta=0.2"])
    dump_config(cfg, tmp_path / "resolved.yaml")
    again = load_config(tmp_path / "resolved.yaml")
    assert again.optim.lr == 0.01 and again.algorithm.beta == 0.2 and again.algorithm.name == "dpo"


# ---- value ranges: every numeric key with a meaningless range is refused, naming where it came from ----
BAD_VALUES = [
    ("train.steps=-5", "train.steps: must be >= 1, got -5"),
    ("train.steps=0", "train.steps: must be >= 1, got 0"),
    ("optim.lr=.nan", "optim.lr: must be a finite number, got nan"),
    ("optim.lr=inf", "optim.lr: must be a finite number, got inf"),
    ("optim.lr=0", "optim.lr: must be > 0, got 0.0"),
    ("optim.lr=-1e-4", "optim.lr: must be > 0, got -0.0001"),
    ("train.eval_every=-1", "train.eval_every: must be >= 0, got -1 (0 turns evaluation off)"),
    ("train.log_every=0", "train.log_every: must be >= 1, got 0"),
    ("train.checkpoint_every=-10", "train.checkpoint_every: must be >= 0, got -10 (0 checkpoints only at the end)"),
    ("optim.warmup_steps=-1", "optim.warmup_steps: must be >= 0, got -1"),
    ("train.max_nonfinite=0", "train.max_nonfinite: must be >= 1, got 0"),
    ("optim.b1=1.0", "optim.b1: must be in [0, 1), got 1.0"),
    ("optim.b2=-0.1", "optim.b2: must be in [0, 1), got -0.1"),
    ("optim.eps=0", "optim.eps: must be > 0, got 0.0"),
    ("optim.grad_clip=0", "optim.grad_clip: must be > 0, got 0.0 (null turns clipping off)"),
    ("optim.min_lr_ratio=1.5", "optim.min_lr_ratio: must be in [0, 1], got 1.5"),
    ("optim.weight_decay=-0.1", "optim.weight_decay: must be >= 0, got -0.1"),
    ("train.keep_checkpoints=0", "train.keep_checkpoints: must be >= 1, got 0"),
    ("train.micro_batch=0", "train.micro_batch: must be >= 1, got 0"),
    ("train.global_batch=-8", "train.global_batch: must be >= 1, got -8"),
    ("train.stop_after_steps=0", "train.stop_after_steps: must be >= 1, got 0"),
    ("model.init_std=0", "model.init_std: must be > 0, got 0.0"),
    ("model.norm_eps=-1e-6", "model.norm_eps: must be > 0, got -1e-06"),
    ("model.kv_heads=0", "model.kv_heads: must be >= 1, got 0"),
    ("model.heads=0", "model.heads: must be >= 1, got 0"),
    ("model.vocab_size=0", "model.vocab_size: must be >= 1, got 0"),
    ("model.rope_theta=0", "model.rope_theta: must be > 0, got 0.0"),
    ("data.seq_len=8192", "data.seq_len: 8192 exceeds model.max_seq_len=4096"),
    ("data.seq_len=1", "data.seq_len: must be >= 2, got 1"),
    ("data.seed=-1", "data.seed: must be in [0, 4294967295], got -1 (numpy and grain take seeds in [0, 2**32))"),
    ("data.max_examples=0", "data.max_examples: must be >= 1, got 0"),
    ("distributed.heartbeat_timeout=0", "distributed.heartbeat_timeout: must be >= 1, got 0"),
]


@pytest.mark.parametrize("override,message", BAD_VALUES, ids=[b[0] for b in BAD_VALUES])
def test_meaningless_values_are_refused(override, message):
    with pytest.raises(ConfigError) as e:
        load_config(None, [override])
    assert str(e.value) == f"override '{override}': {message}"


ALGORITHM_BAD_VALUES = [
    ("dpo", "algorithm.beta=0", "algorithm.beta: must be > 0, got 0.0"),
    ("dpo", "algorithm.label_smoothing=0.5", "algorithm.label_smoothing: must be in [0, 0.5), got 0.5"),
    ("dpo", "algorithm.sft_weight=-1", "algorithm.sft_weight: must be >= 0, got -1.0"),
    ("sft", "eval.max_new_tokens=0", "eval.max_new_tokens: must be >= 1, got 0"),
    ("dpo", "eval.prompts=-1", "eval.prompts: must be >= 0, got -1 (0 turns generation-based evaluation off)"),
    ("reward", "algorithm.num_attributes=0", "algorithm.num_attributes: must be >= 1, got 0"),
    ("ppo", "algorithm.gamma=1.5", "algorithm.gamma: must be in [0, 1], got 1.5"),
    ("ppo", "algorithm.lam=-0.1", "algorithm.lam: must be in [0, 1], got -0.1"),
    ("ppo", "algorithm.top_p=0", "algorithm.top_p: must be in (0, 1], got 0.0"),
    ("ppo", "algorithm.temperature=0", "algorithm.temperature: must be > 0, got 0.0"),
    ("ppo", "algorithm.kl_coef=-0.1", "algorithm.kl_coef: must be >= 0, got -0.1"),
    ("ppo", "algorithm.critic_lr=.nan", "algorithm.critic_lr: must be a finite number, got nan"),
    ("ppo", "algorithm.value_clip=0", "algorithm.value_clip: must be > 0, got 0.0"),
    ("grpo", "algorithm.clip_eps=0", "algorithm.clip_eps: must be > 0, got 0.0"),  # inherited from the RL base
    ("rloo", "algorithm.reward_scale=0", "algorithm.reward_scale: must be > 0, got 0.0"),
]


@pytest.mark.parametrize("name,override,message", ALGORITHM_BAD_VALUES, ids=[b[1] for b in ALGORITHM_BAD_VALUES])
def test_meaningless_algorithm_values_are_refused(name, override, message):
    with pytest.raises(ConfigError) as e:
        load_config(None, [f"algorithm.name={name}", override])
    assert str(e.value) == f"override '{override}': {message}"


def test_bad_value_in_yaml_names_file_and_line(tmp_path):
    p = _write(tmp_path, "train:\n  steps: 100\n  max_nonfinite: 0\n")
    with pytest.raises(ConfigError, match=rf"^{p}:3: train.max_nonfinite: must be >= 1, got 0$"):
        load_config(p)


def test_good_edge_values_are_accepted():
    cfg = load_config(None, ["train.eval_every=0", "train.checkpoint_every=0", "optim.grad_clip=null",
                             "optim.warmup_steps=0", "optim.min_lr_ratio=0", "optim.min_lr_ratio=1", "optim.b1=0",
                             "data.seq_len=4096", "train.max_nonfinite=1"])
    assert cfg.optim.grad_clip is None and cfg.train.eval_every == 0 and cfg.data.seq_len == 4096


def test_llama3_rope_factors_must_be_ordered():
    with pytest.raises(ConfigError, match=r"model.rope_scaling.high_freq_factor: must be greater than "
                                          r"low_freq_factor=4.0"):
        load_config(None, ["model.rope_scaling={type: llama3, low_freq_factor: 4.0, high_freq_factor: 4.0}"])


def test_seq_len_beyond_an_hf_models_max_seq_len_is_checked_at_setup():
    cfg = load_config(None, ["model.hf_path=/somewhere", "data.seq_len=8192"])  # config.json not read yet
    cfg.model.max_seq_len = 2048  # as trainer.resolve_model sets it from config.json
    with pytest.raises(ConfigError, match=r"data.seq_len=8192 exceeds model.max_seq_len=2048 "
                                          r"\(max_position_embeddings of /somewhere/config.json\)"):
        validate_for_devices(cfg, 8)


def test_mesh_rules_name_real_axes():
    with pytest.raises(ConfigError, match=r"^override 'mesh.rules=\{embed: fsdpp\}': mesh.rules.embed: unknown mesh "
                                          r"axis 'fsdpp'; did you mean 'fsdp'\?"):
        load_config(None, ["mesh.rules={embed: fsdpp}"])
    with pytest.raises(ConfigError, match=r"mesh.rules.batch: a mesh axis is listed twice"):
        load_config(None, ["mesh.rules={batch: [data, data]}"])
    assert load_config(None, ["mesh.rules={embed: null, batch: [data, fsdp]}"]).mesh.rules["embed"] is None


# ---- duplicate keys and sections: PyYAML would let the last one win silently ----------------------
def test_duplicate_key_names_both_lines(tmp_path):
    p = _write(tmp_path, "train:\n  steps: 10\n  log_every: 1\n  steps: 20\n")
    with pytest.raises(ConfigError, match=rf"^{p}:4: train.steps: duplicate key \(already set at line 2\)"):
        load_config(p)


def test_duplicate_section_names_both_lines(tmp_path):
    p = _write(tmp_path, "train:\n  steps: 10\noptim:\n  lr: 0.1\ntrain:\n  log_every: 1\n")
    with pytest.raises(ConfigError, match=rf"^{p}:5: train: duplicate section \(already set at line 1\)"):
        load_config(p)


def test_duplicate_nested_key(tmp_path):
    p = _write(tmp_path, "mesh:\n  rules:\n    embed: fsdp\n    embed: null\n")
    with pytest.raises(ConfigError, match=rf"^{p}:4: mesh.rules.embed: duplicate key \(already set at line 3\)"):
        load_config(p)


def test_unknown_section_in_an_override_blames_the_override(tmp_path):
    p = _write(tmp_path, "train:\n  steps: 10\n")
    with pytest.raises(ConfigError, match=r"^override 'modle.hidden=8': modle: unknown section; did you mean 'model'"):
        load_config(p, ["modle.hidden=8"])
    with pytest.raises(ConfigError, match=r"^override 'trian.steps=3': trian: unknown section"):
        load_config(None, ["trian.steps=3"])


def test_unreadable_config_is_one_message(tmp_path):
    with pytest.raises(ConfigError, match=rf"^{tmp_path}/nope.yaml: cannot read config"):
        load_config(tmp_path / "nope.yaml")
    (tmp_path / "bin.yaml").write_bytes(b"\xff\xfe\x00bad")
    with pytest.raises(ConfigError, match=r"bin.yaml: not a text \(UTF-8\) file"):
        load_config(tmp_path / "bin.yaml")


def test_unhashable_yaml_key(tmp_path):
    p = _write(tmp_path, "train:\n  ? [a, b]\n  : 3\n")
    with pytest.raises(ConfigError, match=rf"^{p}:2: invalid YAML: unhashable key \['a', 'b'\]"):
        load_config(p)
