"""TFDS builders that prepare each kind of data from local JSONL/.txt files, TF-free.

Preparation parses and validates once and writes array_record files; training
jobs (on a TPU VM, every host) then open the prepared dataset by name and
directory through `tfds.data_source`, with random access for grain:

    prepare("rankings", files_dir="my_rm_data/", data_dir="gs://bucket/tfds")
    train = load_prepared("rankings", "gs://bucket/tfds", "train")
    loader = make_loader("rankings", train, tokenizer, ...)

`files_dir` holds one or more files per split named `train*.jsonl`,
`validation*.jsonl`, `test*.jsonl` (or `.parquet`, `.arrow`; and `*.txt` for text).
Every stage reads a prepared split through its config:
`config.data.train_file="tfds:<data_dir>:train"`. Every example keeps
its "file:line" source. With `skip_invalid=True`, invalid examples are skipped
and their counts stored in the dataset's metadata, reported again on loading.
"""

from __future__ import annotations

import glob
import inspect
import json
import os
from typing import Any

from etils import epath
import numpy as np
import tensorflow_datasets as tfds

from jaxrlhf.data import formats
from jaxrlhf.data import sources
from jaxrlhf.data.stats import DataStats

SPLITS = ("train", "validation", "test")
# 1.1.0: an `extra` JSON feature holds the chat form and the prompt span to shorten.
VERSION = tfds.core.Version("1.1.0")

_text = tfds.features.Text
FEATURES = {
    "demonstrations": lambda: tfds.features.FeaturesDict({
        "prompt": _text(), "response": _text(),
        "messages": tfds.features.Sequence({"role": _text(), "content": _text()}),
        "source": _text(), "extra": _text()}),
    "rankings": lambda: tfds.features.FeaturesDict({
        "prompt": _text(), "responses": tfds.features.Sequence(_text()),
        "ranks": tfds.features.Sequence(np.int32), "source": _text(), "extra": _text()}),
    "prompts": lambda: tfds.features.FeaturesDict({
        "prompt": _text(), "meta": _text(), "source": _text(), "extra": _text()}),
    "text": lambda: tfds.features.FeaturesDict({"text": _text(), "source": _text()}),
}


# Fields of the typed examples beyond the plain features, stored as JSON in `extra`.
_EXTRA = {
    formats.Demonstration: ("final_turn_only", "prompt_cut"),
    formats.Ranking: ("prompt_messages", "response_messages", "prompt_cut"),
    formats.Prompt: ("messages", "prompt_cut"),
}


def _extra(example) -> str:
  fields = {name: getattr(example, name) for name in _EXTRA[type(example)]}
  return json.dumps({**fields, "source_unit": example.source.unit})


def _tuples(value):
  """JSON lists back to the nested tuples of the example dataclasses."""
  return tuple(_tuples(v) for v in value) if isinstance(value, list) else value


def _from_extra(record: dict[str, Any], source: formats.Source) -> dict[str, Any]:
  """The example's extra fields, and its source with the unit it was read in."""
  extra = json.loads(_str(record["extra"])) if "extra" in record else {}
  unit = extra.pop("source_unit", source.unit)
  return {"source": formats.Source(source.file, source.line, unit),
          **{name: _tuples(value) for name, value in extra.items()}}


def _to_features(example: formats.Example) -> dict[str, Any]:
  source = str(example.source)
  if isinstance(example, formats.Demonstration):
    return {"prompt": example.prompt, "response": example.response, "source": source,
            "messages": {"role": [r for r, _ in example.messages],
                         "content": [c for _, c in example.messages]},
            "extra": _extra(example)}
  if isinstance(example, formats.Ranking):
    return {"prompt": example.prompt, "responses": list(example.responses),
            "ranks": list(example.ranks), "source": source, "extra": _extra(example)}
  if isinstance(example, formats.Prompt):
    return {"prompt": example.prompt, "meta": json.dumps(example.meta), "source": source,
            "extra": _extra(example)}
  return {"text": example.text, "source": source}


def _str(value: Any) -> str:
  return value.decode("utf-8") if isinstance(value, bytes) else str(value)


def _source(value: Any) -> formats.Source:
  file, _, line = _str(value).rpartition(":")
  return formats.Source(file, int(line))


def from_features(kind: str, record: dict[str, Any]) -> formats.Example:
  """A decoded TFDS record back to the typed example it was prepared from."""
  source = _source(record["source"])
  if kind == "demonstrations":
    roles = [_str(r) for r in record["messages"]["role"]]
    contents = [_str(c) for c in record["messages"]["content"]]
    return formats.Demonstration(_str(record["prompt"]), _str(record["response"]),
                                 tuple(zip(roles, contents)), **_from_extra(record, source))
  if kind == "rankings":
    return formats.Ranking(_str(record["prompt"]),
                           tuple(_str(r) for r in record["responses"]),
                           tuple(int(r) for r in record["ranks"]),
                           **_from_extra(record, source))
  if kind == "prompts":
    return formats.Prompt(_str(record["prompt"]), json.loads(_str(record["meta"])),
                          **_from_extra(record, source))
  return formats.Text(_str(record["text"]), source)


def split_files(kind: str, files_dir: str) -> dict[str, list[str]]:
  """{split: files} found in `files_dir`; raises if there are none."""
  extensions = ("jsonl", "parquet", "arrow") + (("txt",) if kind == "text" else ())
  found = {}
  for split in SPLITS:
    files = sorted(f for ext in extensions
                   for f in glob.glob(os.path.join(files_dir, f"{split}*.{ext}")))
    if files:
      found[split] = files
  if not found:
    raise FileNotFoundError(
        f"no {kind} data files in {files_dir}: expected one or more of "
        f"{', '.join(f'{s}*.{extensions[0]}' for s in SPLITS)}")
  return found


class _JsonlBuilder(tfds.core.GeneratorBasedBuilder, skip_registration=True):
  """Shared body of the four builders; `KIND` picks parser and features."""

  KIND = ""
  VERSION = VERSION
  MANUAL_DOWNLOAD_INSTRUCTIONS = (
      "Put the data files in the manual dir, one or more per split: train*.jsonl, "
      "validation*.jsonl, test*.jsonl (or .parquet, .arrow; or *.txt, one document a "
      "line, for text).")
  # Set on the instance before download_and_prepare; see `prepare`.
  skip_invalid = False
  fields: dict[str, str] = {}

  # tfds 4.9 looks the builder's file up through `importlib_resources`, a package
  # it only installs for Python < 3.9; the plain file path is what it would find.
  @tfds.core.utils.classproperty
  @classmethod
  def code_path(cls) -> epath.Path:
    return epath.Path(inspect.getfile(cls))

  def _info(self) -> tfds.core.DatasetInfo:
    return tfds.core.DatasetInfo(
        builder=self, description=formats.__doc__, features=FEATURES[self.KIND](),
        metadata=tfds.core.MetadataDict())

  def _split_generators(self, dl_manager):
    return {split: self._generate_examples(split=split, files=files)
            for split, files in split_files(self.KIND, os.fspath(dl_manager.manual_dir)).items()}

  def _generate_examples(self, split: str, files: list[str]):
    stats = DataStats()
    for file in files:
      for example in formats.iter_file(self.KIND, file, skip_invalid=self.skip_invalid,
                                       stats=stats, fields=self.fields):
        yield str(example.source), _to_features(example)
    # Runs once the split is written, before the dataset info is saved.
    self.info.metadata[f"stats/{split}"] = stats.as_dict()
    stats.log_summary(f"{self.name}/{split}")


class JaxrlhfDemonstrations(_JsonlBuilder):
  """SFT demonstrations: prompt/response pairs or chats."""
  KIND = "demonstrations"


class JaxrlhfRankings(_JsonlBuilder):
  """RM rankings: K-way, pairwise or Anthropic HH transcripts."""
  KIND = "rankings"


class JaxrlhfPrompts(_JsonlBuilder):
  """Prompts for PPO and evaluation, with their other fields as JSON `meta`."""
  KIND = "prompts"


class JaxrlhfText(_JsonlBuilder):
  """Pretraining text documents."""
  KIND = "text"


BUILDERS = {b.KIND: b for b in (JaxrlhfDemonstrations, JaxrlhfRankings, JaxrlhfPrompts,
                                JaxrlhfText)}


def prepare(kind: str, files_dir: str, data_dir: str, *, skip_invalid: bool = False,
            fields: dict[str, str] | None = None) -> tfds.core.DatasetBuilder:
  """Parses `files_dir` and writes the prepared `kind` dataset under `data_dir`; every
  stage reads a split of it as `config.data.train_file="tfds:<data_dir>:train"`.
  `fields` renames record keys first (sources.rename_fields)."""
  split_files(kind, files_dir)  # a clear error before TFDS's own
  builder = BUILDERS[kind](data_dir=data_dir, file_format="array_record")
  builder.skip_invalid = skip_invalid
  builder.fields = sources.check_fields(fields)
  builder.download_and_prepare(
      download_config=tfds.download.DownloadConfig(manual_dir=files_dir))
  return builder


class PreparedSource:
  """Random access to a prepared split as typed examples, for `make_loader`.

  `parse_stats` are the skip counts recorded when the split was prepared.
  """

  def __init__(self, kind: str, data_dir: str, split: str):
    self.kind, self.split = kind, split
    name = BUILDERS[kind].name
    self._records = tfds.data_source(name, split=split, data_dir=data_dir)
    builder = tfds.builder(name, data_dir=data_dir)
    self.parse_stats = DataStats(builder.info.metadata.get(f"stats/{split}", {}))

  def __len__(self) -> int:
    return len(self._records)

  def __getitem__(self, index: int) -> formats.Example:
    return from_features(self.kind, self._records[index])

  def __iter__(self):
    return (self[i] for i in range(len(self)))

  def __repr__(self) -> str:
    return f"PreparedSource({self.kind}, {self.split}, {len(self)} examples)"


def load_prepared(kind: str, data_dir: str, split: str) -> PreparedSource:
  """Opens a split prepared by `prepare` (by builder name and directory)."""
  return PreparedSource(kind, data_dir, split)
