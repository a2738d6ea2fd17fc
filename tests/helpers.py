"""Assertions shared by the test files."""
import jax
import numpy as np


def assert_trees_close(actual, expected, rtol=1e-5):
    """Each tensor within rtol of the expected tensor's scale (max |x|): elementwise relative error is
    meaningless for entries that happen to sit near zero."""
    def check(a, b):
        a, b = np.asarray(a), np.asarray(b)
        assert np.abs(a - b).max() <= rtol * max(np.abs(b).max(), 1e-30), (np.abs(a - b).max(), np.abs(b).max())

    jax.tree.map(check, actual, expected)


def roles_for(algo):
    """The frozen models an algorithm declares, built the way the loop builds them."""
    from jalign.roles import build_roles

    return build_roles(algo.cfg, algo.role_specs(), algo.rt.mesh, algo.rt.rules, log=lambda *_: None)


def make_reward_run(directory, model_overrides: list, seed: int = 3) -> str:
    """A reward-model run dir (config.yaml + checkpoint) with a random trunk and score head, for RL tests that
    need a ``roles.reward``."""
    import jax.numpy as jnp

    from jalign.checkpoint import Checkpointer
    from jalign.config import dump_config, load_config
    from jalign.models import params as params_lib
    from jalign.models import transformer as tfm

    cfg = load_config(None, ["algorithm.name=reward", *model_overrides, f"train.out_dir={directory}"])
    directory.mkdir(parents=True, exist_ok=True)
    dump_config(cfg, directory / "config.yaml")
    params = params_lib.init_params(tfm.declare_params(cfg.model, lm_head=False, score_outputs=1), seed)
    ck = Checkpointer(directory / "checkpoints", async_save=False)
    ck.save(1, {"step": jnp.int32(1), "params": params}, force=True)
    ck.close()
    return str(directory)
