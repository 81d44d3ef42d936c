"""The suite compiles at XLA backend optimisation level 0 (tests/conftest.py); what it tests
must not depend on that: a DiT's loss gradients agree with the fully optimised build."""
import os

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from conftest import backend_optimisation  # tests/ is on sys.path (no __init__.py)
from dlm_jax.models import DiT


def _loss_grads(model):
    x = jax.random.randint(jax.random.key(1), (2, 16), 0, 37)
    t = jnp.array([0.3, 0.8])

    @jax.jit
    def loss(m):
        return jax.nn.log_softmax(m(x, t)).mean()

    return jax.tree.leaves(nnx.state(nnx.grad(loss)(model), nnx.Param))


def test_suite_default_is_level_0():
    if os.environ["JAX_DISABLE_MOST_OPTIMIZATIONS"].lower() in ("1", "true"):
        assert jax.config.read("jax_disable_most_optimizations")


def test_level_0_and_optimised_builds_agree():
    model = DiT(37, 32, 2, 4, rngs=nnx.Rngs(0), cond_dim=16, time_conditioning=True, dropout=0.0)
    params = nnx.state(model, nnx.Param)  # random everywhere: the zero-initialised output and
    rng = np.random.default_rng(0)        # adaLN layers would leave most gradients exactly 0
    scale = lambda x: x.shape[0] ** -0.5 if x.ndim > 1 else 1.0  # noqa: E731  (1/sqrt(fan in))
    nnx.update(model, jax.tree.map(
        lambda x: jnp.asarray(rng.normal(0, scale(x), x.shape), x.dtype), params))
    with backend_optimisation(full=False):
        low = _loss_grads(model)
    with backend_optimisation(full=True):
        assert not jax.config.read("jax_disable_most_optimizations")
        high = _loss_grads(model)
    assert len(low) == len(high) > 10 and all(np.abs(g).max() > 1e-4 for g in high)
    for a, b in zip(low, high):
        # float32 rounding of another summation order (differences about 1e-7 here)
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4, atol=1e-6)
