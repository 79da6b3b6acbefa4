"""Test set-up: four forced CPU devices, so every pmapped step runs over several devices,
and one persistent compilation cache for the whole session, shared with the child
processes the tests start (tests/subprocess_utils.py), so a step compiled once is read
back wherever the same program is built again."""

import atexit
import os
import shutil
import tempfile

# XLA:CPU's backend (LLVM) optimisation level for the whole suite, child processes
# included (tests/subprocess_utils.py): compilation is most of the suite's cost, and at
# level 0 the same HLO compiles faster (tests/models/test_transformer.py and
# tests/test_sampling.py: 80 s at the default level, 55 s at 0, on one host in one
# sitting). Set XLA_FLAGS=--xla_backend_optimization_level=N to test another level.
TEST_XLA_FLAGS = ("--xla_backend_optimization_level=0"
                  if "--xla_backend_optimization_level" not in os.environ.get("XLA_FLAGS", "")
                  else "")
os.environ["JAXRLHF_TEST_XLA_FLAGS"] = " ".join(
    f for f in os.environ.get("XLA_FLAGS", "").split()
    if not f.startswith("--xla_force_host_platform_device_count")) + " " + TEST_XLA_FLAGS

# Must happen before jax is imported anywhere. The suite is written for 4 devices;
# JAXRLHF_TEST_DEVICES=8 runs tests/test_mesh.py on 8 (fsdp=8 and data=2 x fsdp=4).
os.environ["XLA_FLAGS"] = (
    os.environ["JAXRLHF_TEST_XLA_FLAGS"] + " --xla_force_host_platform_device_count="
    + os.environ.get("JAXRLHF_TEST_DEVICES", "4")).strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")
# A fresh cache per session, removed at its end: the suite's cost is that of a cold start.
if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
  os.environ["JAX_COMPILATION_CACHE_DIR"] = tempfile.mkdtemp(prefix="jaxrlhf-tests-jax-cache-")
  atexit.register(shutil.rmtree, os.environ["JAX_COMPILATION_CACHE_DIR"], ignore_errors=True)
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES", "0")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import jax  # noqa: E402
import pytest  # noqa: E402

jax.config.update("jax_default_matmul_precision", "highest")


from tests import background  # noqa: E402
from tests import subprocess_utils as sp  # noqa: E402


@background.job("chain")
def _run_chain(root):
  """The whole pipeline (pretrain, SFT, RM, PPO, PPO-ptx, evaluate) on the CI-sized world,
  through the experiment script, as a user runs it."""
  import json
  import subprocess
  log = root / "instructgpt.log"
  with open(log, "w") as out:
    proc = sp.popen(
        sp.python_command("experiments.instructgpt", ["--config=configs/instructgpt.py:test",
                                                      f"--workdir={root}"]),
        cwd=sp.REPO, env=sp.child_env(4, root / "jax_cache"), stdout=out,
        stderr=subprocess.STDOUT)
    try:
      proc.wait(timeout=sp.CHILD_TIMEOUT_S * 3)
    finally:
      if proc.poll() is None:
        proc.kill()
        proc.wait()
  if proc.returncode != 0:
    raise AssertionError(f"the pipeline exited {proc.returncode}:\n"
                         + log.read_text()[-6000:])
  return root, json.loads((root / "pipeline_summary.json").read_text())


@pytest.fixture(scope="session")
def chain():
  """The session's pipeline run (`_run_chain`), shared by every module that needs trained
  checkpoints: its root, the world, and each stage's summary."""
  from configs import instructgpt as instructgpt_config
  root, summaries = background.result("chain")
  config = instructgpt_config.get_config("test")
  return {"root": root, "world_dir": str(root / "world"), **summaries,
          "rm": summaries["reward_model"], "config": config,
          "rm_config": config.reward_model}


def _background_jobs(item) -> list[str]:
  # A job is named after the fixture that waits for it.
  return [name for name in background.registered() if name in getattr(item, "fixturenames", ())]


def pytest_collection_modifyitems(session, config, items):
  # Tests that wait on a background job go last, in the order the jobs run: the
  # in-process tests run first, beside the jobs.
  order = {name: i + 1 for i, name in enumerate(background.registered())}
  items.sort(key=lambda item: max((order[j] for j in _background_jobs(item)), default=0))


def pytest_collection_finish(session):
  if session.config.option.collectonly:
    return
  needed = {j for item in session.items for j in _background_jobs(item)}
  factory = session.config._tmp_path_factory  # pylint: disable=protected-access
  background.start_session(factory, [n for n in background.registered() if n in needed])


def pytest_report_header(config):
  return f"jax {jax.__version__}, devices: {jax.devices()}"
