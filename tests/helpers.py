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
