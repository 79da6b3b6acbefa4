"""Imported at start-up by the test suite's child processes (tests/subprocess_utils.py
puts this folder first on their PYTHONPATH): torch is a test-only dependency (setup.py),
so a child runs the experiment scripts as a user's install does, without it. A library
import of torch then fails there, and the children do not pay the ~2 s that transformers'
tokenizer import spends importing torch when it is installed."""

import sys

sys.modules.setdefault("torch", None)  # `import torch` raises ImportError; find_spec: None
