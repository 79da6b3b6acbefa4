"""Test set-ups that are child processes from start to end (the session's pipeline, the
kill-and-resume trials, the multi-host job) run in one background thread from the start
of the session, while the in-process tests run beside them: XLA compiles on one thread,
so the in-process tests leave a core idle that the children use. tests/conftest.py
starts the jobs the selected tests need and moves those tests to the end of the run, in
the order the jobs finish.

A set-up is a function of a fresh directory; `job(name)` registers it under the name of
the fixture that waits for it with `result(name)`, which raises what the set-up raised.

The thread never calls into pytest's temporary-directory factory: the factory is not
thread-safe. Its first call creates the session's base directory, and two threads making
that first call at once create two, and the in-process test caught between them fails
with "... is not a normalized and relative path". `start_session` makes the jobs' parent
directory in the calling (main) thread; the thread only creates the subdirectories.
"""

from __future__ import annotations

import pathlib
import threading
import traceback
from typing import Any, Callable

_FUNCTIONS: dict[str, Callable[[pathlib.Path], Any]] = {}
_RESULTS: dict[str, dict] = {}
_ORDER: list[str] = []
_DONE: dict[str, threading.Event] = {}


def job(name: str):
  """Registers the decorated `function(directory) -> result` as the set-up `name`."""
  def register(function):
    if name in _FUNCTIONS and _FUNCTIONS[name] is not function:
      raise ValueError(f"background job {name!r} registered twice")
    _FUNCTIONS[name] = function
    if name not in _ORDER:
      _ORDER.append(name)
    return function
  return register


def registered() -> list[str]:
  """Names in registration order."""
  return list(_ORDER)


def start_session(factory, names: list[str]) -> pathlib.Path | None:
  """Starts the named set-ups under one directory that `factory` (pytest's
  TempPathFactory) makes here, in the calling thread; returns it (None: nothing to run)."""
  names = [n for n in names if n not in _DONE]
  if not names:
    return None
  root = factory.mktemp("background")
  start(names, root)
  return root


def start(names: list[str], root: pathlib.Path) -> None:
  """Runs the named set-ups one after another in a daemon thread, each in a new
  directory `root / name` (an interrupted session does not wait for them;
  tests/subprocess_utils.py kills their children at exit)."""
  names = [n for n in names if n not in _DONE]
  for name in names:
    _DONE[name] = threading.Event()

  def run_all():
    for name in names:
      try:
        directory = root / name
        directory.mkdir()
        _RESULTS[name] = {"value": _FUNCTIONS[name](directory)}
      except BaseException as e:  # pylint: disable=broad-except
        _RESULTS[name] = {"error": e, "traceback": traceback.format_exc()}
      finally:
        _DONE[name].set()

  threading.Thread(target=run_all, name="test-background-jobs", daemon=True).start()


def result(name: str) -> Any:
  """Waits for the set-up `name` to finish; its result, or its exception raised here."""
  if name not in _DONE:
    raise RuntimeError(f"background job {name!r} was never started (tests/conftest.py "
                       f"starts the jobs of the selected tests); registered: {_ORDER}")
  _DONE[name].wait()
  out = _RESULTS[name]
  if "error" in out:
    raise RuntimeError(f"background job {name!r} failed:\n{out['traceback']}") from out["error"]
  return out["value"]
