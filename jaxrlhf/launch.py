"""The shared entry point of every experiment script: flags, distributed init, one call.

`experiments/<stage>.py` is `launch.main(stage.train_and_evaluate)`; this module owns the
flags so every stage accepts the same ones.

The console shows stage headers, progress bars, results, warnings and errors; the INFO
log of jaxrlhf and the libraries (orbax, jax) goes to `<workdir>/log.txt` (process 0;
`log.process<N>.txt` for the others), appended across reruns. `--alsologtostderr` (or an
explicit `--verbosity`) shows it on the console too.
"""

from __future__ import annotations

import difflib
import importlib.util
import logging as python_logging
from logging import handlers as logging_handlers
import os
import re
import sys
import tempfile
from typing import Any, Callable

from absl import app
from absl import flags
from absl import logging
from ml_collections import config_flags

_CONFIG = config_flags.DEFINE_config_file(
    "config", None, "Config file and variant, e.g. configs/sft.py:tiny; any field can "
    "then be set as --config.<field>=<value> (a misspelt field is an error).",
    lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory for checkpoints and logs.")
_COORDINATOR = flags.DEFINE_string(
    "coordinator_address", None,
    "host:port of process 0 for a multi-process run (or JAX_COORDINATOR_ADDRESS).")
_NUM_PROCESSES = flags.DEFINE_integer(
    "num_processes", None, "Processes in a multi-process run (or JAX_NUM_PROCESSES).")
_PROCESS_ID = flags.DEFINE_integer(
    "process_id", None, "This process's index (or JAX_PROCESS_ID).")
_CPU_ISA = flags.DEFINE_enum(
    "cpu_isa", None, ["SSE4_2", "AVX", "AVX2", "AVX512", "AVX512_VNNI", "AVX512_BF16", "AMX"],
    "Newest x86 instruction set XLA:CPU may generate code for (--xla_cpu_max_isa). XLA "
    "otherwise targets the host's own, and float32 results follow it (a fused "
    "multiply-add rounds once). AVX2 holds an AVX-512 host to the instructions an AVX2 "
    "host uses; docs/results.md says what was measured.")
_FIXED_REDUCTION_ORDER = flags.DEFINE_bool(
    "fixed_reduction_order", False,
    "Sum over devices in device order, so a run is bit-identical however its devices are "
    "spread over processes (costs one gathered copy per device of what is summed; see "
    "jaxrlhf/parallel.py).")


def log_file_path(workdir: str | None) -> str:
  """Where this process's INFO log goes: in the workdir when it is a local directory."""
  import jax  # pylint: disable=g-import-not-at-top
  name = "log.txt" if jax.process_index() == 0 else f"log.process{jax.process_index()}.txt"
  if workdir and "://" not in workdir:
    return os.path.join(os.path.abspath(workdir), name)
  # No workdir, or a bucket (a FileHandler cannot append there): a local directory.
  return os.path.join(tempfile.gettempdir(), "jaxrlhf_logs", name)


def quiet_console() -> logging_handlers.MemoryHandler:
  """WARNING and up on the console unless asked for more; INFO held until the log file
  is known (it is named by the process index, which distributed init decides)."""
  if not (flags.FLAGS["verbosity"].present or flags.FLAGS["alsologtostderr"].value
          or flags.FLAGS["logtostderr"].value):
    logging.get_absl_handler().setLevel(python_logging.WARNING)
  held = logging_handlers.MemoryHandler(capacity=1 << 20,
                                        flushLevel=python_logging.CRITICAL + 1)
  python_logging.getLogger().addHandler(held)
  return held


def route_logs(workdir: str | None, held: logging_handlers.MemoryHandler) -> str:
  """Sends the INFO log (what `held` kept so far, then everything) to the log file."""
  path = log_file_path(workdir)
  os.makedirs(os.path.dirname(path), exist_ok=True)
  handler = python_logging.FileHandler(path, mode="a", encoding="utf-8")
  handler.setFormatter(logging.PythonFormatter())
  root = python_logging.getLogger()
  root.addHandler(handler)
  held.setTarget(handler)
  held.flush()
  root.removeHandler(held)
  held.close()
  logging.info("log of this run: %s", path)
  return path


def _config_keys(argv: list[str]) -> list[str]:
  """The dotted fields of the config `--config=path.py:variant` names ([] if it does not
  load)."""
  spec = next((a.split("=", 1)[1] for a in argv if a.startswith("--config=")), None)
  if not spec:
    return []
  path, _, variant = spec.partition(":")
  try:
    module_spec = importlib.util.spec_from_file_location("_launch_config", path)
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    config = module.get_config(variant or None)
  except Exception:  # pylint: disable=broad-except
    return []
  keys = []

  def walk(node, prefix):
    for key, value in node.items():
      if hasattr(value, "items"):
        walk(value, f"{prefix}{key}.")
      else:
        keys.append(f"{prefix}{key}")

  walk(config, "")
  return keys


def config_override_error(argv: list[str], error: Exception) -> str:
  """One line for a `--config.<field>=<value>` that does not apply, naming the flag and,
  for a misspelt field, the nearest ones."""
  overrides = [a for a in argv[1:] if a.startswith("--config.")]
  quoted = re.findall(r"'([^'\\]+)", str(error))  # the missing key, as ml_collections quotes it
  culprit = next((a for a in overrides for key in quoted[:1]
                  if key in a.split("=", 1)[0].split(".")), None)
  if culprit is None:
    return f"error in the --config flags: {error}"
  name = culprit.split("=", 1)[0][len("--config."):]
  keys = _config_keys(argv)
  if keys and name not in keys:
    # The nearest full field names; failing those, fields whose last part is near.
    near = difflib.get_close_matches(name, keys, n=3, cutoff=0.8)
    if not near:
      leaves = difflib.get_close_matches(name.rsplit(".", 1)[-1],
                                         [k.rsplit(".", 1)[-1] for k in keys], n=3, cutoff=0.8)
      near = [k for k in keys if k.rsplit(".", 1)[-1] in leaves][:3]
    hint = f"; did you mean {', '.join('--config.' + k for k in near)}?" if near else ""
    return f"error: --config.{name}: the config has no such field{hint}"
  return f"error: {culprit}: {error}"


def _errors_for_people() -> tuple[type[BaseException], ...]:
  from jaxrlhf import config_lib  # pylint: disable=g-import-not-at-top
  from jaxrlhf.data import formats  # pylint: disable=g-import-not-at-top
  from jaxrlhf.models import hf  # pylint: disable=g-import-not-at-top
  return (formats.DataError, hf.CheckpointError, FileNotFoundError, config_lib.ConfigError)


def run_for_people(train_fn: Callable, config, workdir) -> Any:
  """`train_fn(config, workdir)`; bad data, a bad checkpoint, a missing file or a config
  setting that cannot work ends it in one line on stderr naming file, line and field (or
  the config field), exit status 1, the traceback in the log file (and on the console
  with --verbosity)."""
  try:
    return train_fn(config, workdir)
  except _errors_for_people() as e:
    if _verbose():
      raise
    logging.info("stopped: %s", e, exc_info=True)
    print(f"error: {e}", file=sys.stderr, flush=True)
    sys.exit(1)


def _verbose() -> bool:
  return flags.FLAGS["verbosity"].present or flags.FLAGS["alsologtostderr"].value


def _parse_flags(argv: list[str]) -> list[str]:
  """absl's flag parsing, with a config override that does not apply reported in one
  line (the traceback too with --verbosity)."""
  try:
    return app.parse_flags_with_usage(argv)
  except (AttributeError, KeyError, TypeError, ValueError) as e:
    if any(a.startswith(("--verbosity", "-v")) for a in argv[1:]):
      raise
    print(config_override_error(argv, e), file=sys.stderr)
    sys.exit(2)


def main(train_fn: Callable, *, needs_workdir: bool = True) -> None:
  """Parses flags and runs `train_fn(config, workdir)`."""

  def _main(argv):
    if len(argv) > 1:
      raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
    held = quiet_console()
    if _CPU_ISA.value:  # read when the CPU backend starts, which nothing has asked for yet
      os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "")
                                 + f" --xla_cpu_max_isa={_CPU_ISA.value}").strip()
    from jaxrlhf import parallel  # imports jax only after absl parsed the flags
    parallel.maybe_initialize_distributed(
        _COORDINATOR.value, _NUM_PROCESSES.value, _PROCESS_ID.value)
    parallel.set_fixed_reduction_order(_FIXED_REDUCTION_ORDER.value)
    route_logs(_WORKDIR.value, held)
    if needs_workdir and not _WORKDIR.value:
      raise app.UsageError("--workdir is required.")
    if _WORKDIR.value:  # reruns and resumes read compiled steps back from the workdir
      from jaxrlhf import train_lib
      train_lib.enable_compilation_cache(_WORKDIR.value)
    logging.info("config:\n%s", _CONFIG.value)
    run_for_people(train_fn, _CONFIG.value, _WORKDIR.value)

  flags.mark_flags_as_required(["config"])
  # `--help` lists the main module's key flags: these are every experiment script's.
  for name in ("config", "workdir", "coordinator_address", "num_processes", "process_id",
               "cpu_isa", "fixed_reduction_order"):
    flags.FLAGS.register_key_flag_for_module(sys.argv[0], flags.FLAGS[name])
  os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
  # Without torch (a user's install), transformers' import advises on the console that its
  # PyTorch models are unavailable; jaxrlhf uses only its tokenizers and config files.
  os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")
  app.run(_main, flags_parser=_parse_flags)
