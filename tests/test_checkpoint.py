"""The checkpointer: relative workdirs, keeping the newest, falling back past damage."""

import numpy as np
import pytest

from jaxrlhf import checkpoint as checkpoint_lib


def _state(value):
  return {"w": np.full((3,), value, np.float32), "step": np.int32(value)}


def test_relative_directory_and_newest_kept(tmp_path, monkeypatch):
  monkeypatch.chdir(tmp_path)
  ckpt = checkpoint_lib.Checkpointer("run/checkpoints", save_every=1, keep=2)
  for step in (1, 2, 3):
    ckpt.save(step, _state(step), data_state={"position": step})
  assert ckpt.all_steps() == [2, 3]
  state, data_state, _, step = ckpt.restore(_state(0))
  assert step == 3 and data_state == {"position": 3}
  np.testing.assert_array_equal(state["w"], _state(3)["w"])
  ckpt.close()


def test_damaged_newest_checkpoint_falls_back(tmp_path, capsys):
  ckpt = checkpoint_lib.Checkpointer(tmp_path / "ckpt", save_every=1, keep=3)
  ckpt.save(1, _state(1))
  ckpt.save(2, _state(2))
  ckpt.close()
  # Corrupt every file of the newest checkpoint's state.
  for f in (tmp_path / "ckpt" / "2" / "state").rglob("*"):
    if f.is_file():
      f.write_bytes(b"\x00garbage")
  ckpt = checkpoint_lib.Checkpointer(tmp_path / "ckpt", save_every=1, keep=3)
  state, _, _, step = ckpt.restore(_state(0))
  assert step == 1
  np.testing.assert_array_equal(state["w"], _state(1)["w"])
  assert "step 2" in capsys.readouterr().out


def test_truncated_newest_checkpoint_is_set_aside_and_its_step_saved_again(tmp_path, capsys):
  ckpt = checkpoint_lib.Checkpointer(tmp_path / "ckpt", save_every=1, keep=3)
  for step in (1, 2, 3):
    ckpt.save(step, _state(step), data_state={"position": step})
  ckpt.close()
  # A kill mid-copy (or a full disk) leaves files cut short in the newest two.
  for step in (2, 3):
    for f in (tmp_path / "ckpt" / str(step)).rglob("*"):
      if f.is_file():
        f.write_bytes(f.read_bytes()[:len(f.read_bytes()) // 2])
  ckpt = checkpoint_lib.Checkpointer(tmp_path / "ckpt", save_every=1, keep=3)
  state, data_state, _, step = ckpt.restore(_state(0))
  assert step == 1 and data_state == {"position": 1}
  out = capsys.readouterr().out
  assert "step 3" in out and "step 2" in out and "skipping 2 damaged" in out
  assert sorted(p.name for p in (tmp_path / "ckpt.damaged").iterdir()) == ["2", "3"]
  # The resumed run reaches steps 2 and 3 again and must be able to save them.
  ckpt.save(2, _state(20))
  ckpt.save(3, _state(30))
  state, _, _, step = ckpt.restore(_state(0))
  assert step == 3
  np.testing.assert_array_equal(state["w"], _state(30)["w"])
  ckpt.close()


def test_a_resumed_run_cuts_metrics_and_tensorboard_back_to_its_step(tmp_path):
  # A run killed after logging steps 4 and 5 but checkpointing only step 3 is resumed
  # from 3 and logs 4 and 5 again: each step must show once, with the resumed values.
  from tensorboard.backend.event_processing import event_accumulator
  from jaxrlhf import metrics as metrics_lib
  writer = metrics_lib.MetricWriter(tmp_path, enabled=True)
  for step in range(1, 6):
    writer.write_scalars(step, {"loss": float(step)})
  writer.write_texts(4, {"sample_0": "a"})
  writer.close()
  with open(tmp_path / "metrics.jsonl", "a") as f:
    f.write('{"step": 6, "lo')  # torn by the kill
  writer = metrics_lib.MetricWriter(tmp_path, enabled=True, resume_step=3)
  for step in (4, 5):
    writer.write_scalars(step, {"loss": 10.0 * step})
  writer.close()
  rows = metrics_lib.read_jsonl_scalars(tmp_path)
  assert [(r["step"], r["loss"]) for r in rows] == [(1, 1.0), (2, 2.0), (3, 3.0),
                                                    (4, 40.0), (5, 50.0)]
  assert "texts" not in (tmp_path / "metrics.jsonl").read_text()
  events = event_accumulator.EventAccumulator(str(tmp_path / "tb"))
  events.Reload()
  assert [(e.step, e.value) for e in events.Scalars("loss")] == [
      (1, 1.0), (2, 2.0), (3, 3.0), (4, 40.0), (5, 50.0)]
  # A fresh start in that workdir (no checkpoint) logs everything again: nothing kept.
  metrics_lib.MetricWriter(tmp_path, enabled=True, resume_step=-1).close()
  assert metrics_lib.read_jsonl_scalars(tmp_path) == []


def test_flipped_bytes_of_the_same_size_are_caught_by_the_checksums(tmp_path, capsys):
  # Bytes flipped inside an array's data leave every file its size and orbax reads it
  # back without complaint; the checksums saved with the checkpoint do not match.
  def state(seed):
    rng = np.random.default_rng(seed)
    return {"w": rng.normal(size=(64, 64)).astype(np.float32), "step": np.int32(seed)}

  ckpt = checkpoint_lib.Checkpointer(tmp_path / "ckpt", save_every=1, keep=3)
  ckpt.save(1, state(1), extra={"note": "kept"})
  ckpt.save(2, state(2))
  ckpt.close()
  files = [f for f in (tmp_path / "ckpt" / "2" / "state").rglob("*") if f.is_file()]
  biggest = max(files, key=lambda f: f.stat().st_size)
  data = bytearray(biggest.read_bytes())
  middle = len(data) // 2
  data[middle:middle + 64] = bytes(b ^ 0xFF for b in data[middle:middle + 64])
  biggest.write_bytes(bytes(data))
  ckpt = checkpoint_lib.Checkpointer(tmp_path / "ckpt", save_every=1, keep=3)
  restored, _, extra, step = ckpt.restore(state(0))
  assert step == 1 and extra == {"note": "kept"}
  np.testing.assert_array_equal(restored["w"], state(1)["w"])
  out = capsys.readouterr().out
  assert "step 2" in out and "differ from the checksums" in out
  assert [p.name for p in (tmp_path / "ckpt.damaged").iterdir()] == ["2"]
  ckpt.close()


def test_a_checkpoint_restores_with_the_layers_scanned_or_not(tmp_path):
  # The file holds the layers one by one: a run may resume with scan_layers changed.
  import jax
  import optax
  from jaxrlhf import models
  from jaxrlhf import train_lib
  config = models.TransformerConfig.tiny("llama", num_layers=2)
  params = models.init_params(models.CausalLM(config), jax.random.key(0))
  params = jax.tree.map(lambda x: x + 0.1, params)  # Adam moments need a step to be nonzero
  states = {}
  for scan in (False, True):
    model = models.CausalLM(config.replace(scan_layers=scan))
    state = train_lib.create_train_state(
        model.apply, models.stack_layers(params, 2) if scan else params, optax.adam(1e-3),
        seed=0)
    grads = jax.tree.map(lambda x: 0.5 * x, state.params)
    states[scan] = jax.device_get(state.apply_gradients(grads=grads))
  assert jax.tree_util.tree_structure(states[False]) != jax.tree_util.tree_structure(
      states[True])
  for saved, wanted in ((True, False), (False, True)):
    ckpt = checkpoint_lib.Checkpointer(tmp_path / f"from_{saved}", save_every=1)
    ckpt.save(1, states[saved])
    restored, _, _, _ = ckpt.restore(states[wanted])
    ckpt.close()
    assert jax.tree_util.tree_structure(restored) == jax.tree_util.tree_structure(
        states[wanted])
    jax.tree.map(np.testing.assert_array_equal, restored, states[wanted])


def test_mesh_checkpoints_are_written_and_read_sharded(tmp_path):
  # Mesh mode saves the global arrays as they are split (no process gathers a whole
  # state) and reads each array straight into its split; pmap reads the same files.
  import jax
  from jaxrlhf import parallel
  host = {"w": np.arange(64 * 32, dtype=np.float32).reshape(64, 32),
          "b": np.ones(3, np.float32), "step": np.int32(7)}
  ckpt = checkpoint_lib.Checkpointer(tmp_path / "ckpt", save_every=1)
  with parallel.using(parallel.make_layout("mesh", "")):
    placed = parallel.replicate(host)
    saved = parallel.for_checkpoint(placed)
    assert saved["w"] is placed["w"] and not saved["w"].sharding.is_fully_replicated
    ckpt.save(1, saved)
    state, _, _, step = ckpt.restore(host, shardings=parallel.checkpoint_shardings())
    assert step == 1 and isinstance(state["w"], jax.Array)
    assert state["w"].sharding == parallel.param_sharding((64, 32))
    np.testing.assert_array_equal(np.asarray(state["w"]), host["w"])
    again = parallel.replicate(state)  # already in place: moved, not copied via the host
    assert again["w"].sharding == placed["w"].sharding
    # The checksums do not depend on how an array is split.
    assert checkpoint_lib.checksums(placed) == checkpoint_lib.checksums(host)
  state, _, _, _ = ckpt.restore(host)  # as pmap reads it: host arrays
  assert isinstance(state["w"], np.ndarray)
  np.testing.assert_array_equal(state["w"], host["w"])
  ckpt.close()


def test_checkpoints_with_crc_checksums_still_verify():
  # Checkpoints written before the position-weighted sums hold CRC-32s.
  state = _state(2)
  checkpoint_lib._verify(state, {"checksums": checkpoint_lib._crc_checksums(state)})
  flipped = {**state, "w": state["w"] + 1}
  with pytest.raises(ValueError, match="differ from the checksums"):
    checkpoint_lib._verify(flipped, {"checksums": checkpoint_lib._crc_checksums(state)})
  with pytest.raises(ValueError, match="differ from the checksums"):
    checkpoint_lib._verify(flipped, {"checksums": checkpoint_lib.checksums(state)})
