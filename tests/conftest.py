"""Test-wide setup. Runs before any test module imports jax.

Eight fake CPU devices let sharding tests build (2, 2, 2) meshes on a laptop; the flag must be set
before the XLA backend starts, which is why it lives here and not in a fixture.
"""
import os

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402

assert jax.device_count() >= 8 or "xla_force_host_platform_device_count" not in os.environ["XLA_FLAGS"], (
    "XLA_FLAGS was set after jax initialised its backend")
