"""jaxrlhf/parallel.py: the fixed-order cross-device sums (their multi-process half is in
tests/test_multihost.py)."""

import jax.numpy as jnp
import numpy as np

from jaxrlhf import parallel


def _values(devices):
  rng = np.random.default_rng(1)
  return (rng.normal(size=(devices, 512))
          * 10.0 ** rng.integers(-3, 4, size=(devices, 512))).astype(np.float32)


def test_fixed_order_sums_in_device_order_and_keeps_dtypes():
  values = _values(parallel.local_device_count())
  in_order = values[0]
  for row in values[1:]:
    in_order = in_order + row
  counts = np.arange(parallel.local_device_count(), dtype=np.int32)
  batch = parallel.device_put_sharded({"x": values, "n": counts})
  with parallel.fixed_reduction_order():
    total = parallel.fetch(parallel.pmap_fn(parallel.psum)(batch))
    mean = parallel.fetch(parallel.pmap_fn(parallel.pmean)(batch))
    masked = parallel.fetch(parallel.pmap_fn(
        lambda b: parallel.masked_mean(jnp.sum(b["x"]), jnp.float32(1.0)))(batch))
  np.testing.assert_array_equal(total["x"], in_order)
  assert total["n"].dtype == np.int32 and total["n"] == counts.sum()
  np.testing.assert_array_equal(mean["x"], in_order / np.float32(len(values)))
  np.testing.assert_allclose(masked, values.sum() / len(values), rtol=1e-5)


def test_a_fixed_order_step_is_traced_anew_and_the_setting_is_restored():
  # jax caches one trace per function object: under the fixed order, pmap_fn must not
  # reuse the trace of the same function made with the collectives' order.
  traces = []

  def total(x):
    traces.append(parallel._FIXED_ORDER)  # pylint: disable=protected-access
    return parallel.psum(x)

  batch = parallel.device_put_sharded(_values(parallel.local_device_count()))
  parallel.pmap_fn(total)(batch)
  with parallel.fixed_reduction_order():
    parallel.pmap_fn(total)(batch)
  parallel.pmap_fn(total)(batch)
  assert traces == [False, True]  # the third call reuses the first trace
  assert not parallel._FIXED_ORDER  # pylint: disable=protected-access


def test_a_mesh_function_is_traced_once_however_often_it_is_wrapped():
  # A new mesh wrapper per pmap_fn call made jax trace and lower the function again on
  # every call (an evaluation loop re-wrapping its scorer retraced it each time).
  traces = []

  def total(x):
    traces.append(parallel._TRACING_MESH)  # pylint: disable=protected-access
    return parallel.psum(x).sum()

  lay = parallel.make_layout("mesh", "")
  with parallel.using(lay):
    batch = parallel.device_put_sharded(_values(parallel.local_device_count()))
    first = parallel.fetch(parallel.pmap_fn(total)(batch))
    second = parallel.fetch(parallel.pmap_fn(total)(batch))
  assert traces == [lay]
  np.testing.assert_array_equal(first, second)
  assert parallel._TRACING_MESH is None  # pylint: disable=protected-access
