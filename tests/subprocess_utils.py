"""Running the experiment scripts as child processes: forced CPU devices, a shared
compilation cache, several processes joined by jax.distributed on 127.0.0.1."""

from __future__ import annotations

import atexit
import os
import pathlib
import signal
import socket
import subprocess
import sys
from typing import Any, Iterable, Mapping

REPO = pathlib.Path(__file__).resolve().parents[1]
# First on a child's PYTHONPATH: hides the test-only torch (tests/child_site/sitecustomize.py).
CHILD_SITE = pathlib.Path(__file__).resolve().parent / "child_site"
# A child that outlives this is stuck (a collective waiting for a peer): fail, don't hang.
CHILD_TIMEOUT_S = 300


def child_env(num_devices: int, cache_dir: str | os.PathLike, *,
              session_xla_flags: bool = True) -> dict[str, str]:
  """The environment of a child jax process with `num_devices` CPU devices.

  Its compilation cache is the test session's (tests/conftest.py), else `cache_dir`. It
  compiles with the session's XLA flags (tests/conftest.py), or with XLA's defaults, as a
  user's run does, when `session_xla_flags` is False. It cannot import torch, which only
  the tests install (tests/child_site/sitecustomize.py).
  """
  env = {k: v for k, v in os.environ.items()
         if not k.startswith(("JAX_COORDINATOR", "JAX_NUM_PROCESSES", "JAX_PROCESS_ID"))}
  env.update({
      # The test session's own flags (tests/conftest.py), with this child's device count.
      "XLA_FLAGS": ((os.environ.get("JAXRLHF_TEST_XLA_FLAGS", "") if session_xla_flags else "")
                    + f" --xla_force_host_platform_device_count={num_devices}").strip(),
      "JAX_PLATFORMS": "cpu",
      "JAX_DEFAULT_MATMUL_PRECISION": "highest",  # as tests/conftest.py does in-process
      "JAX_COMPILATION_CACHE_DIR": os.environ.get("JAX_COMPILATION_CACHE_DIR") or str(cache_dir),
      "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0",
      "JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES": "0",
      "TOKENIZERS_PARALLELISM": "false",
      "HF_HUB_OFFLINE": "1",
      "TRANSFORMERS_OFFLINE": "1",
      "PYTHONPATH": os.pathsep.join((str(CHILD_SITE), str(REPO))),
  })
  return env


_LIVE: set[subprocess.Popen] = set()


def popen(command: list[str], **kwargs) -> subprocess.Popen:
  """`subprocess.Popen` for a test's child, SIGKILLed if still running when the test
  session exits (a background job's children, tests/background.py, included)."""
  proc = subprocess.Popen(command, **kwargs)
  _LIVE.add(proc)
  return proc


@atexit.register
def _kill_live_children():
  for proc in _LIVE:
    if proc.poll() is None:
      proc.kill()


def free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def config_flags(config_file: str, overrides: Mapping[str, Any]) -> list[str]:
  """`--config=configs/x.py:test --config.a.b=v ...`, as a user would type them."""
  return [f"--config={config_file}"] + [f"--config.{k}={v}" for k, v in overrides.items()]


def apply_overrides(config, overrides: Mapping[str, Any]):
  """The in-process twin of `config_flags`'s overrides."""
  for dotted, value in overrides.items():
    *parents, leaf = dotted.split(".")
    node = config
    for name in parents:
      node = node[name]
    node[leaf] = value
  return config


def python_command(module: str, args: Iterable[str]) -> list[str]:
  return [sys.executable, "-m", module, *args]


class Processes:
  """`python -m module args` as the processes of one jax.distributed job, running."""

  def __init__(self, module: str, args: list[str], *, num_processes: int,
               devices_per_process: int, cache_dir, log_dir: pathlib.Path,
               use_env_vars: bool = False):
    port = free_port()
    self.module, self.procs, self.logs = module, [], []
    log_dir.mkdir(parents=True, exist_ok=True)
    for process_id in range(num_processes):
      env = child_env(devices_per_process, cache_dir)
      extra = []
      if num_processes == 1:
        pass  # A plain single-process run, no jax.distributed.
      elif use_env_vars:
        env.update({"JAX_COORDINATOR_ADDRESS": f"127.0.0.1:{port}",
                    "JAX_NUM_PROCESSES": str(num_processes),
                    "JAX_PROCESS_ID": str(process_id)})
      else:
        extra = [f"--coordinator_address=127.0.0.1:{port}",
                 f"--num_processes={num_processes}", f"--process_id={process_id}"]
      log = open(log_dir / f"{module}.{process_id}.{port}.log", "w+")
      self.logs.append(log)
      self.procs.append(popen(python_command(module, args + extra), cwd=REPO,
                              env=env, stdout=log, stderr=subprocess.STDOUT))

  def wait(self) -> list[str]:
    """Each process's combined output; raises if any process failed."""
    outputs = []
    try:
      for proc in self.procs:
        proc.wait(timeout=CHILD_TIMEOUT_S)
    finally:
      for proc in self.procs:
        if proc.poll() is None:
          proc.send_signal(signal.SIGKILL)
          proc.wait()
      for log in self.logs:
        log.seek(0)
        outputs.append(log.read())
        log.close()
    for process_id, (proc, out) in enumerate(zip(self.procs, outputs)):
      if proc.returncode != 0:
        raise AssertionError(f"{self.module} process {process_id} exited "
                             f"{proc.returncode}:\n" + out[-6000:])
    return outputs


def run_processes(module: str, args: list[str], **kwargs) -> list[str]:
  """Runs `Processes(module, args, **kwargs)` to the end; see `Processes.wait`."""
  return Processes(module, args, **kwargs).wait()
