"""jaxrlhf/launch.py, as the experiment scripts run it: a quiet console with the INFO log
in the workdir, and the XLA:CPU instruction-set cap."""

import subprocess

import numpy as np
import pytest

from tests import subprocess_utils as sp


def _run(workdir, *flags):
  workdir.mkdir()
  result = subprocess.run(
      sp.python_command("tests.launch_probe", ["--config=configs/sft.py:test",
                                               f"--workdir={workdir}", *flags]),
      # XLA's default optimisation level, as a user's run: at the suite's level 0
      # (tests/conftest.py) XLA:CPU emits no fused multiply-add on any instruction set.
      cwd=sp.REPO, env=sp.child_env(1, workdir / "cache", session_xla_flags=False),
      capture_output=True, text=True,
      timeout=sp.CHILD_TIMEOUT_S)
  assert result.returncode == 0, result.stderr[-4000:]
  return result.stdout + result.stderr, np.load(workdir / "probe.npy")


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
  root = tmp_path_factory.mktemp("launch")
  return {"default": _run(root / "default"), "verbose": _run(root / "verbose", "--alsologtostderr"),
          "sse": _run(root / "sse", "--cpu_isa=SSE4_2"), "root": root}


def test_info_goes_to_the_log_file_and_warnings_to_the_console(runs):
  console, _ = runs["default"]
  assert "probe: a WARNING line" in console
  assert "probe: an INFO line" not in console and "config:" not in console
  log = (runs["root"] / "default" / "log.txt").read_text()
  assert "probe: an INFO line" in log and "probe: a WARNING line" in log
  assert "config:" in log  # the launcher's own INFO record of the config
  verbose, _ = runs["verbose"]
  assert "probe: an INFO line" in verbose  # --alsologtostderr shows INFO again
  assert "probe: an INFO line" in (runs["root"] / "verbose" / "log.txt").read_text()


def test_cpu_isa_reaches_xla(runs):
  # Without FMA (SSE4.2) a * b + c rounds twice; every host here has FMA (AVX2).
  _, default = runs["default"]
  _, sse = runs["sse"]
  assert not np.array_equal(default, sse)
  np.testing.assert_allclose(default, sse, rtol=1e-5, atol=1e-6)  # rounding only


def test_help_lists_the_flags_every_experiment_script_takes(tmp_path):
  result = subprocess.run(sp.python_command("experiments.sft", ["--help"]), cwd=sp.REPO,
                          env=sp.child_env(1, tmp_path / "cache"), capture_output=True,
                          text=True, timeout=sp.CHILD_TIMEOUT_S)
  # absl's --help exits 1 after printing the main module's flags.
  for flag in ("--config:", "--config.<field>=<value>", "--workdir:",
               "--coordinator_address:", "--[no]fixed_reduction_order:"):
    assert flag in result.stdout, (flag, result.stdout)


def test_bad_data_is_one_message_and_the_traceback_goes_to_the_log(tmp_path):
  data = tmp_path / "demos.jsonl"
  data.write_text('{"prompt": "a", "response": "b"}\n{"prompt": 3, "response": "b"}\n')
  workdir = tmp_path / "run"
  result = subprocess.run(
      sp.python_command("experiments.sft", [
          "--config=configs/sft.py:test", f"--config.data.train_file={data}",
          f"--config.data.valid_file={data}", f"--workdir={workdir}"]),
      cwd=sp.REPO, env=sp.child_env(1, tmp_path / "cache"), capture_output=True, text=True,
      timeout=sp.CHILD_TIMEOUT_S)
  assert result.returncode == 1
  assert result.stderr.strip().splitlines() == [
      f"error: {data}, line 2, field 'prompt': expected a string, got int"], result.stderr
  assert "Traceback" in (workdir / "log.txt").read_text()


def test_a_config_that_cannot_work_is_one_line_with_exit_status_1(tmp_path, capsys):
  from configs import sft as sft_config
  from jaxrlhf import config_lib
  from jaxrlhf import launch
  from jaxrlhf import sft
  config = sft_config.get_config("test")
  config.data.train_file = str(tmp_path / "mine.jsonl")  # and no valid_file
  with pytest.raises(config_lib.ConfigError, match="config.data.valid_file is empty"):
    sft.train_and_evaluate(config, str(tmp_path / "raised"))
  with pytest.raises(SystemExit) as exit_info:
    launch.run_for_people(sft.train_and_evaluate, config, str(tmp_path / "run"))
  assert exit_info.value.code == 1
  err = capsys.readouterr().err.strip().splitlines()
  assert err == ["error: config.data.train_file is set but config.data.valid_file is empty: "
                 "give both (held-out data of your own, e.g. a split of your file), or "
                 "neither for the embedded world's sft files; the world's toy data never "
                 "stands in for yours."], err
  # Anything else is a bug and keeps its traceback.
  def broken(config, workdir):
    raise ValueError("not a config problem")
  with pytest.raises(ValueError, match="not a config problem"):
    launch.run_for_people(broken, config, str(tmp_path))
