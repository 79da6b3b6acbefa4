"""Faults a long run meets: a NaN or Inf mid-run (stops naming the step and the quantity,
the last good checkpoint untouched), and the trust boundaries (weights only from
safetensors, no remote code, locked configs)."""

import ast
import hashlib
import json
import pathlib
import re
import shutil
import subprocess

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from jaxrlhf import checkpoint as checkpoint_lib
from jaxrlhf import metrics as metrics_lib
from jaxrlhf import models
from jaxrlhf import parallel
from jaxrlhf import ppo
from jaxrlhf import train_lib
from tests import subprocess_utils as sp

DEVICES = jax.local_device_count()


# ---------------------------------------------------------------------------------------
# Numerical faults.
# ---------------------------------------------------------------------------------------


def _regression_step(state, batch):
  """A least-squares step through the library's guard, as every stage's step is."""

  def loss_fn(params):
    pred = state.apply_fn({"params": params}, batch["x"])[:, 0]
    return parallel.pmean(jnp.mean((pred - batch["y"]) ** 2))

  loss, grads = jax.value_and_grad(loss_fn)(state.params)
  grads = parallel.pmean(grads)
  new_state, norms = train_lib.apply_gradients_guarded(state, grads, loss)
  return new_state, {"loss": loss, **norms}


class _Batches:
  """Host batches [devices, 2, 3]; the one of `bad_step` carries `bad_value`."""

  def __init__(self, bad_step, bad_value):
    self.position, self.bad_step, self.bad_value = 0, bad_step, bad_value

  def __iter__(self):
    return self

  def __next__(self):
    self.position += 1
    rng = np.random.default_rng(self.position)
    x = rng.normal(size=(DEVICES * 2, 3)).astype(np.float32)
    if self.position == self.bad_step:
      x[1, 2] = self.bad_value
    return parallel.shard({"x": x, "y": x.sum(axis=1)})

  def get_state(self):
    return {"position": self.position}


def _digest(directory: pathlib.Path) -> dict:
  return {str(p.relative_to(directory)): hashlib.sha256(p.read_bytes()).hexdigest()
          for p in sorted(directory.rglob("*")) if p.is_file()}


@pytest.mark.parametrize("bad_value,shown", [(np.nan, "nan"), (np.inf, "(inf|nan)")])
def test_fit_stops_at_a_non_finite_step_and_keeps_the_last_checkpoint(tmp_path, bad_value,
                                                                       shown):
  model = nn.Dense(1)
  params = model.init(jax.random.key(0), jnp.zeros((1, 3)))["params"]
  state = train_lib.create_train_state(model.apply, params, optax.sgd(0.01), seed=0)
  checkpointer = checkpoint_lib.Checkpointer(tmp_path / "checkpoints", save_every=2, keep=10)
  writer = metrics_lib.MetricWriter(tmp_path)
  batches = _Batches(bad_step=5, bad_value=bad_value)
  saved = {}

  original_save = checkpointer.save

  def save(step, *args, **kwargs):
    original_save(step, *args, **kwargs)
    saved[step] = _digest(tmp_path / "checkpoints" / str(step))

  checkpointer.save = save
  with pytest.raises(train_lib.NonFiniteError,
                     match=rf"step 5: (loss|grad_norm) is {shown}.*checkpoint") as error:
    # Metrics are fetched every 3 steps: the bad step is found at step 6's fetch, yet
    # named as step 5, and no checkpoint is written after it.
    train_lib.run_loop(rstate=parallel.replicate(state),
                       step_fn=parallel.pmap_step(_regression_step),
                       next_batch=train_lib.batches_from(batches), num_steps=10,
                       checkpointer=checkpointer, writer=writer, log_every=3,
                       data_state_fn=batches.get_state)
  assert "step 4" in str(error.value)  # the checkpoint a restart would use
  assert checkpointer.all_steps() == [2, 4]
  for step in (2, 4):  # byte for byte as written
    assert _digest(tmp_path / "checkpoints" / str(step)) == saved[step]
  restored, data_state, _, step = checkpointer.restore(state)
  assert step == 4 and data_state == {"position": 4}
  assert all(np.isfinite(x).all() for x in jax.tree_util.tree_leaves(restored.params))
  checkpointer.close()


def test_ppo_loop_stops_at_a_non_finite_iteration(tmp_path):
  rstate = parallel.replicate({"w": np.zeros((2,), np.float32)})
  calls = []

  def iteration_fn(rstate, prompts, ptx):
    del prompts, ptx
    calls.append(1)
    value = np.float32(np.nan if len(calls) == 3 else 1.0)
    return rstate, {name: np.full((DEVICES,), value) for name in (
        "policy_loss", "value_loss", "policy_grad_norm", "value_grad_norm", "score",
        "kl_k1")}

  class Prompts:
    def __next__(self):
      return {"prompt_ids": np.ones((DEVICES, 1, 4), np.int32),
              "prompt_mask": np.ones((DEVICES, 1, 4), np.int32)}

    def get_state(self):
      return {"position": len(calls)}

  checkpointer = checkpoint_lib.Checkpointer(tmp_path / "checkpoints", save_every=2, keep=10)
  with pytest.raises(train_lib.NonFiniteError, match=r"step 3: policy_loss is nan"):
    prompts = Prompts()
    train_lib.run_loop(rstate=rstate, step_fn=iteration_fn,
                       next_batch=ppo.iteration_batches(prompts, None, 1), num_steps=6,
                       checkpointer=checkpointer, writer=metrics_lib.MetricWriter(tmp_path),
                       **ppo.loop_settings(prompts, None))
  assert checkpointer.all_steps() == [2]
  checkpointer.close()


# ---------------------------------------------------------------------------------------
# Trust boundaries.
# ---------------------------------------------------------------------------------------

LIBRARY = sp.REPO / "jaxrlhf"
UNSAFE = [r"trust_remote_code\s*=\s*True", r"\bpickle\.loads?\(", r"torch\.load\(",
          r"allow_pickle\s*=\s*True", r"\bdill\b", r"\bjoblib\.load", r"\bcloudpickle\b",
          r"\beval\([a-z_]+\)", r"\bexec\("]


def test_library_never_unpickles_or_runs_remote_code():
  sources = [p for d in ("jaxrlhf", "experiments", "configs", "benchmarks")
             for p in (sp.REPO / d).rglob("*.py")]
  assert len(sources) > 20
  for path in sources:
    text = path.read_text()
    for pattern in UNSAFE:
      assert not re.search(pattern, text), f"{path}: matches {pattern}"
  # Every transformers AutoX.from_pretrained the library calls says no to remote code.
  calls = 0
  for path in sources:
    for node in ast.walk(ast.parse(path.read_text())):
      if (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)
          and node.func.attr == "from_pretrained"
          and ast.unparse(node.func.value).split(".")[-1].startswith("Auto")):
        calls += 1
        flags = {k.arg: ast.unparse(k.value) for k in node.keywords}
        assert flags.get("trust_remote_code") == "False", f"{path}:{node.lineno}"
  assert calls >= 1


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
  directory = tmp_path_factory.mktemp("export")
  config = models.TransformerConfig.tiny("llama", vocab_size=32, num_layers=1)
  model = models.CausalLM(config)
  models.save_pretrained(model, models.init_params(model, jax.random.key(0), seq_len=4),
                         str(directory / "model"))
  return directory / "model"


def _remote_code(directory: pathlib.Path, marker: pathlib.Path, config_file: str) -> None:
  """Makes `directory` ask for remote code that would leave `marker` if it ever ran."""
  (directory / "evil.py").write_text(
      f"import pathlib\npathlib.Path({str(marker)!r}).write_text('ran')\n"
      "class Evil: pass\n")
  path = directory / config_file
  config = json.loads(path.read_text()) if path.exists() else {}
  config["auto_map"] = {"AutoConfig": "evil.Evil", "AutoModelForCausalLM": "evil.Evil",
                        "AutoTokenizer": ["evil.Evil", "evil.Evil"]}
  path.write_text(json.dumps(config))


def test_weights_come_only_from_safetensors(exported, tmp_path):
  directory = tmp_path / "model"
  shutil.copytree(exported, directory)
  # A pickle next to the safetensors is never opened (it would not even parse).
  (directory / "pytorch_model.bin").write_bytes(b"\x80\x04not a pickle")
  models.from_pretrained(str(directory))
  # An index may name only safetensors shards inside the directory.
  (directory / "model.safetensors").rename(directory / "model-00001.safetensors")
  shutil.copy(directory / "model-00001.safetensors", tmp_path)  # readable, but outside
  for shard in ("pytorch_model.bin", "../model-00001.safetensors"):
    (directory / "model.safetensors.index.json").write_text(json.dumps(
        {"weight_map": {"model.embed_tokens.weight": shard}}))
    with pytest.raises(models.CheckpointError, match="expected a .safetensors file name"):
      models.from_pretrained(str(directory))


def test_remote_code_in_a_checkpoint_is_never_run(exported, tmp_path):
  from jaxrlhf import config_lib  # pylint: disable=g-import-not-at-top
  marker = tmp_path / "remote_code_ran"
  directory = tmp_path / "model"
  shutil.copytree(exported, directory)
  _remote_code(directory, marker, "config.json")
  models.from_pretrained(str(directory))
  tokenizer_dir = tmp_path / "tokenizer"
  shutil.copytree(config_lib.world_tokenizer_dir(), tokenizer_dir)
  _remote_code(tokenizer_dir, marker, "tokenizer_config.json")
  try:
    models.load_tokenizer(str(tokenizer_dir))
  except (ValueError, OSError) as e:  # transformers may refuse instead of ignoring
    assert "trust_remote_code" in str(e) or "remote" in str(e), e
  assert not marker.exists()


def test_unknown_config_keys_are_rejected(tmp_path):
  # The locked config of every experiment script: a typo is an error, not a new field.
  result = subprocess.run(
      sp.python_command("experiments.sft", [
          "--config=configs/sft.py:test", "--config.learning_rat=0.1",
          f"--workdir={tmp_path}"]),
      cwd=sp.REPO, env=sp.child_env(1, tmp_path / "cache"), capture_output=True, text=True,
      timeout=sp.CHILD_TIMEOUT_S)
  assert result.returncode != 0
  assert "learning_rat" in result.stderr + result.stdout
  # One line for a person, with the field it probably meant; no traceback.
  assert (result.stderr + result.stdout).strip().splitlines() == [
      "error: --config.learning_rat: the config has no such field; did you mean "
      "--config.optimizer.learning_rate?"]
  assert not (tmp_path / "checkpoints").exists()
  from configs import sft as sft_config  # pylint: disable=g-import-not-at-top
  config = sft_config.get_config("test")
  config.lock()
  with pytest.raises(AttributeError):
    config.optimizer.learning_rat = 0.1


def test_a_truncated_safetensors_file_is_named(exported, tmp_path):
  directory = tmp_path / "model"
  shutil.copytree(exported, directory)
  weights = directory / "model.safetensors"
  weights.write_bytes(weights.read_bytes()[:weights.stat().st_size // 2])
  with pytest.raises(models.CheckpointError,
                     match=r"model/model.safetensors: not a readable safetensors file"):
    models.from_pretrained(str(directory))
