"""Test setup: eight fake CPU devices, fp32 matmuls, before JAX is imported anywhere."""

import os

os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
).strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")
# `mopd train/demo` subprocesses share one compilation cache (kept out of the user's own).
os.environ.setdefault("MOPD_XLA_CACHE", os.path.join(
    os.environ.get("TMPDIR", "/tmp"), "mopd-jax-test-xla-cache"))

import jax  # noqa: E402

jax.config.update("jax_default_matmul_precision", "highest")
