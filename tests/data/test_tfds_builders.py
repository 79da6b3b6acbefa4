"""TFDS preparation from local files (TF-free, array_record) and loading by name and directory."""

import json
import sys

import numpy as np
import pytest
import tensorflow_datasets as tfds

from jaxrlhf import data
from jaxrlhf.data import tfds_builders

RECORDS = {
    "demonstrations": [
        {"prompt": "sort : b a ->", "response": "a b"},
        {"messages": [{"role": "user", "content": "reverse : a b ->"},
                      {"role": "assistant", "content": "b a"}]},
        {"prompt": "max : 1 3 ->", "response": "3"},
    ],
    "rankings": [
        {"prompt": "sort : b a ->", "responses": ["a b", "b a", "a b . ok"], "ranks": [0, 2, 1]},
        {"prompt": "add : 1 2 ->", "chosen": "3", "rejected": "4"},
        {"chosen": "\n\nHuman: hi\n\nAssistant: a", "rejected": "\n\nHuman: hi\n\nAssistant: b"},
    ],
    "prompts": [
        {"prompt": "sort : b a ->", "task": "sort", "items": ["b", "a"], "arg": None},
        {"prompt": "upper : a ->"},
    ],
    "text": [{"text": "reverse a b is b a ."}, {"text": "list c d ."}],
}


def write_split(directory, split, records, extra_lines=()):
  directory.mkdir(parents=True, exist_ok=True)
  path = directory / f"{split}.jsonl"
  with open(path, "w") as f:
    for record in records:
      f.write(json.dumps(record) + "\n")
    for line in extra_lines:
      f.write(line + "\n")
  return str(path)


@pytest.mark.parametrize("kind", data.KINDS)
def test_prepared_dataset_matches_the_jsonl_files(tmp_path, tokenizer, kind):
  files = tmp_path / "files"
  train = write_split(files, "train", RECORDS[kind])
  write_split(files, "validation", RECORDS[kind][:1])
  tfds_builders.prepare(kind, str(files), str(tmp_path / "tfds"))
  assert "tensorflow" not in sys.modules

  prepared = data.tfds_builders.load_prepared(kind, str(tmp_path / "tfds"), "train")
  from_files = data.read_examples(kind, train)
  # TFDS stores records in its own order; every example keeps its source line.
  assert sorted((e for e in prepared), key=lambda e: e.source.line) == from_files
  assert len(data.tfds_builders.load_prepared(kind, str(tmp_path / "tfds"), "validation")) == 1

  # Opening by name and directory works without the builder class too.
  name = tfds_builders.BUILDERS[kind].name
  assert len(tfds.data_source(name, split="train", data_dir=str(tmp_path / "tfds"))) == len(
      from_files)

  lengths = data.Lengths(prompt=8, response=6, text=12, k_max=3)
  common = dict(per_device_batch_size=1, local_device_count=1, process_index=0,
                process_count=1, shuffle=False, num_epochs=1)
  # The budgets' shapes, as the tokenizer writes them (cut=False: no buckets, rankings
  # not packed; tests/data/test_buckets.py checks those).
  batches = list(data.make_loader(kind, prepared, tokenizer, lengths, cut=False, **common))
  assert len(batches) == len(from_files)
  by_line = {prepared[int(b["index"][0, 0])].source.line: b for b in batches}
  for example in from_files:
    want = data.tokenize.TOKENIZERS[kind](example, data.Encoder(tokenizer), lengths)
    got = by_line[example.source.line]
    for key, value in want.items():
      if key != "_stats":
        np.testing.assert_array_equal(got[key][0, 0], value, err_msg=key)


def test_skip_invalid_counts_are_kept_in_the_metadata(tmp_path):
  files = tmp_path / "files"
  write_split(files, "train", RECORDS["prompts"],
              extra_lines=['{"prompt": ""}', "not json"])
  with pytest.raises(data.DataError, match="train.jsonl, line 3, field 'prompt'"):
    tfds_builders.prepare("prompts", str(files), str(tmp_path / "strict"))
  tfds_builders.prepare("prompts", str(files), str(tmp_path / "tfds"), skip_invalid=True)
  prepared = tfds_builders.load_prepared("prompts", str(tmp_path / "tfds"), "train")
  assert len(prepared) == 2
  assert prepared.parse_stats.as_dict() == {
      "examples_read": 2, "skipped/empty_prompt": 1, "skipped/malformed_json": 1}


def test_missing_files_are_reported(tmp_path):
  (tmp_path / "empty").mkdir()
  with pytest.raises(FileNotFoundError, match="train"):
    tfds_builders.prepare("text", str(tmp_path / "empty"), str(tmp_path / "tfds"))


def test_reference_layouts_from_parquet_prepare_and_load_through_a_stage_config(tmp_path):
  """TL;DR and conversational records in Parquet, renamed by a field mapping, prepared
  once, and read back by `data_lib.read` the way every stage's config names them."""
  import pyarrow as pa
  import pyarrow.parquet as pq
  from jaxrlhf import data_lib
  from tests.data import test_layouts as layouts
  files = tmp_path / "files"
  files.mkdir()
  # "body" is the file's name for the post; the mapping renames it.
  records = [{("body" if k == "post" else k): v for k, v in layouts.TLDR.items()},
             {"prompt": layouts.CHAT, "completion": [layouts.CHOSEN], "body": None}]
  for i, record in enumerate(records):
    pq.write_table(pa.Table.from_pylist([record]), str(files / f"train-{i}.parquet"))
  write_split(files, "validation", [{"prompt": "q", "response": "a"}])
  tfds_builders.prepare("demonstrations", str(files), str(tmp_path / "tfds"),
                        fields={"body": "post"})
  examples, stats = data_lib.read("demonstrations", f"tfds:{tmp_path / 'tfds'}:train",
                                  skip_invalid=False)
  from_files = data.read_examples("demonstrations", sorted(map(str, files.glob("*.parquet"))),
                                  fields={"body": "post"})
  assert sorted(examples, key=lambda e: e.source.file) == from_files
  assert from_files[0].prompt_cut is not None and from_files[1].final_turn_only
  assert from_files[0].source.unit == "row"
  assert stats["examples_read"] == 2
  with pytest.raises(ValueError, match="tfds:<data_dir>:<split>"):
    data_lib.read("demonstrations", f"tfds:{tmp_path / 'tfds'}:dev", skip_invalid=False)
  with pytest.raises(ValueError, match="while a dataset is prepared"):
    data_lib.read("demonstrations", f"tfds:{tmp_path / 'tfds'}:train", skip_invalid=False,
                  fields="body=post")
