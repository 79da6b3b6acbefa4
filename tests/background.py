"""Test set-ups that are child processes from start to end (the session's pipeline, the
kill-and-resume trials, the multi-host job) run in one background thread from the start
of the session, while the in-process tests run beside them: XLA compiles on one thread,
so the in-process tests leave a core idle that the children use. tests/conftest.py
starts the jobs the selected tests need and moves those tests to the end of the run, in
the order the jobs finish.

A set-up is a function of a fresh directory; `job(name)` registers it under the name of
the fixture that waits for it with `result(name)`, which raises what the set-up raised.
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


def start(names: list[str], make_dir: Callable[[str], pathlib.Path]) -> None:
  """Runs the named set-ups one after another in a daemon thread (an interrupted session
  does not wait for them; tests/subprocess_utils.py kills their children at exit)."""
  names = [n for n in names if n not in _DONE]
  for name in names:
    _DONE[name] = threading.Event()

  def run_all():
    for name in names:
      try:
        _RESULTS[name] = {"value": _FUNCTIONS[name](make_dir(name))}
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
