"""Run by tests/test_launch.py through the experiment scripts' entry point: logs an INFO
and a WARNING line, and writes an elementwise float32 result whose rounding depends on
the instruction set XLA:CPU generates code for (a fused multiply-add or not)."""

from absl import logging
from etils import epath
import jax
import jax.numpy as jnp
import numpy as np

from jaxrlhf import launch


def probe(config, workdir):
  del config
  logging.info("probe: an INFO line")
  logging.warning("probe: a WARNING line")
  rng = np.random.default_rng(0)
  a, b, c = (jnp.asarray(rng.normal(size=(4096,)).astype(np.float32)) for _ in range(3))
  out = jax.jit(lambda a, b, c: a * b + c)(a, b, c)
  np.save(epath.Path(workdir) / "probe.npy", np.asarray(out))


if __name__ == "__main__":
  launch.main(probe)
