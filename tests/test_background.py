"""The background set-ups (tests/background.py) never call pytest's temporary-directory
factory from their thread: two threads making the factory's first call at once create
two base directories, and a test caught between them fails in its tmp_path fixture."""

import threading

import pytest

from tests import background


class _RecordingFactory:
  """Stands in for pytest's TempPathFactory and records the thread of every call."""

  def __init__(self, base):
    self.base = base
    self.threads = []

  def mktemp(self, basename, numbered=True):
    self.threads.append(threading.current_thread())
    path = self.base / f"{basename}{len(self.threads)}"
    path.mkdir()
    return path

  def getbasetemp(self):
    self.threads.append(threading.current_thread())
    return self.base


def test_jobs_get_their_directories_without_calling_the_factory_from_their_thread(tmp_path):
  seen = {}

  @background.job("test_background_probe_a")
  def _a(directory):
    seen["a"] = (directory, threading.current_thread())
    return "a done"

  @background.job("test_background_probe_b")
  def _b(directory):
    seen["b"] = (directory, threading.current_thread())
    (directory / "out").write_text("b")
    return "b done"

  factory = _RecordingFactory(tmp_path)
  root = background.start_session(factory, ["test_background_probe_a",
                                            "test_background_probe_b"])
  assert background.result("test_background_probe_a") == "a done"
  assert background.result("test_background_probe_b") == "b done"
  # One factory call, from this thread; each job ran elsewhere in its own new directory.
  assert factory.threads == [threading.current_thread()]
  assert seen["a"][0] == root / "test_background_probe_a" and seen["a"][0].is_dir()
  assert seen["b"][0] == root / "test_background_probe_b"
  assert (root / "test_background_probe_b" / "out").read_text() == "b"
  assert seen["a"][1] is not threading.current_thread()
  # Started jobs are not started again; nothing left to run makes no directory.
  assert background.start_session(factory, ["test_background_probe_a"]) is None
  assert len(factory.threads) == 1


def test_a_failed_job_raises_where_its_result_is_awaited(tmp_path):
  @background.job("test_background_probe_failing")
  def _failing(directory):
    raise OSError(f"cannot write {directory}")

  background.start_session(_RecordingFactory(tmp_path), ["test_background_probe_failing"])
  with pytest.raises(RuntimeError, match="test_background_probe_failing.*failed") as info:
    background.result("test_background_probe_failing")
  assert isinstance(info.value.__cause__, OSError)
