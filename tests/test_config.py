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
