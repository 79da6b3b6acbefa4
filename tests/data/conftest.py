"""Shared fixtures for the data tests: the world tokenizer and a JSONL writer."""

import json

import pytest

from jaxrlhf.data.world import load_world_tokenizer


@pytest.fixture(scope="session")
def tokenizer():
  return load_world_tokenizer()


@pytest.fixture
def write_lines(tmp_path):
  """Writes lines (dicts as JSON, str as text, bytes raw) to a file; returns its path."""

  def write(lines, name="data.jsonl"):
    path = tmp_path / name
    with open(path, "wb") as f:
      for line in lines:
        if isinstance(line, dict):
          line = json.dumps(line)
        if isinstance(line, str):
          line = line.encode("utf-8")
        f.write(line + b"\n")
    return str(path)

  return write


@pytest.fixture(scope="session")
def bpe_tokenizer(tmp_path_factory):
  """A byte-level BPE tokenizer trained on English text, with a chat template."""
  from jaxrlhf import models
  from tests import bpe_tokenizer as bpe
  return models.load_tokenizer(bpe.save_bpe_tokenizer(tmp_path_factory.mktemp("bpe")))
