"""SFT -> reward model -> PPO on files in the field's own layouts, as a user brings them:
TL;DR posts and comparisons and TRL's conversational records, in JSONL and Parquet,
with a byte-level BPE tokenizer trained here (tests/bpe_tokenizer.py). Each stage runs
from its `:tldr` preset, shrunk to CI size, finishes with finite metrics, and each
export loads in transformers."""

import json
import math

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from configs import ppo as ppo_config
from configs import reward_model as rm_config
from configs import sft as sft_config
from jaxrlhf import config_lib
from jaxrlhf import reward_model
from jaxrlhf import sft
from jaxrlhf.data import formats
from jaxrlhf.ppo import stage as ppo_stage
from tests import bpe_tokenizer as bpe

SENTENCES = bpe.ENGLISH


def _sentence(i):
  return SENTENCES[(7 * i) % len(SENTENCES)]


def _tldr(i):
  return {"id": f"t3_{i}", "subreddit": "relationships", "title": _sentence(i + 1)[:12],
          "post": " ".join(_sentence(i + k) for k in range(2 + i % 3)),
          "summary": _sentence(i + 5).split(" about ")[0]}


def _chat(i):
  return [{"role": "user", "content": _sentence(i)}]


def _answer(i):
  return {"role": "assistant", "content": _sentence(i + 3)[:24]}


def _parquet(path, records):
  pq.write_table(pa.Table.from_pylist(records), str(path))


def _write(root, n, offset):
  """One directory per stage and split: a JSONL file and a Parquet file in two layouts."""
  dirs = {}
  for stage in ("sft", "rm", "ppo"):
    dirs[stage] = root / f"{stage}_{offset}"
    dirs[stage].mkdir()
  ids = range(offset, offset + n)
  formats.write_jsonl(str(dirs["sft"] / "tldr.jsonl"), [_tldr(i) for i in ids])
  _parquet(dirs["sft"] / "chat.parquet",
           [{"prompt": _chat(i), "completion": [_answer(i)]} for i in ids])
  formats.write_jsonl(str(dirs["rm"] / "comparisons.jsonl"), [
      {"info": {k: v for k, v in _tldr(i).items() if k != "summary"},
       "summaries": [{"text": " " + _tldr(i)["summary"]}, {"text": " " + _sentence(i)}],
       "choice": 0, "worker": "w0", "batch": "batch1", "split": "train"} for i in ids])
  _parquet(dirs["rm"] / "preferences.parquet",
           [{"chosen": _chat(i) + [_answer(i)], "rejected": _chat(i) + [_answer(i + 9)]}
            for i in ids])
  _parquet(dirs["ppo"] / "tldr.parquet",
           [{k: v for k, v in _tldr(i).items() if k != "summary"} for i in ids])
  formats.write_jsonl(str(dirs["ppo"] / "chat.jsonl"), [{"prompt": _chat(i)} for i in ids])
  return {stage: str(d) for stage, d in dirs.items()}


def _shrink(config, tokenizer):
  config.tokenizer = tokenizer
  config.model = config_lib.model_preset("test")
  config.data.max_prompt_len = 40
  config.data.max_response_len = 12
  config.checkpoint_every = 1000
  return config


def _finite(tree, where):
  """Every number in a summary is finite (None is an evaluation that did not run)."""
  if isinstance(tree, dict):
    for key, value in tree.items():
      _finite(value, f"{where}.{key}")
  elif isinstance(tree, (list, tuple)):
    for i, value in enumerate(tree):
      _finite(value, f"{where}[{i}]")
  elif isinstance(tree, (int, float)) and not isinstance(tree, bool):
    assert math.isfinite(tree), where


@pytest.fixture(scope="module")
def pipeline(tmp_path_factory):
  root = tmp_path_factory.mktemp("real_layouts")
  tokenizer = bpe.save_bpe_tokenizer(root / "tokenizer")
  train, valid = _write(root, 16, 0), _write(root, 8, 100)

  c = _shrink(sft_config.get_config("tldr"), tokenizer)
  c.data.train_file, c.data.valid_file = train["sft"], valid["sft"]
  c.batch_size, c.num_steps, c.log_every, c.eval_every = 8, 4, 2, 4
  c.num_eval_batches, c.num_sample_prompts = 1, 0
  c.optimizer.learning_rate = 3e-3
  sft_summary = sft.train_and_evaluate(c, str(root / "sft"))

  c = _shrink(rm_config.get_config("tldr"), tokenizer)
  c.init_from = str(root / "sft" / "hf")
  c.data.train_file, c.data.valid_file = train["rm"], valid["rm"]
  c.data.demonstrations_file = train["sft"]
  c.normalize.max_sequences = 16
  c.batch_size, c.num_steps, c.log_every, c.eval_every = 8, 2, 1, 2
  c.optimizer.learning_rate = 1e-3
  rm_summary = reward_model.train_and_evaluate(c, str(root / "rm"))

  c = _shrink(ppo_config.get_config("tldr"), tokenizer)
  c.policy_init_from, c.reward_init_from = str(root / "sft" / "hf"), str(root / "rm" / "hf")
  c.data.train_file, c.data.valid_file = train["ppo"], valid["ppo"]
  c.batch_size, c.minibatch_size, c.num_ppo_epochs, c.num_iterations = 8, 8, 1, 2
  c.eval_every, c.num_eval_batches, c.num_sample_texts = 2, 1, 0
  ppo_summary = ppo_stage.train_and_evaluate(c, str(root / "ppo"))
  return {"root": root, "sft": sft_summary, "rm": rm_summary, "ppo": ppo_summary}


def test_each_stage_finishes_with_finite_metrics(pipeline):
  sft_summary, rm_summary, ppo_summary = pipeline["sft"], pipeline["rm"], pipeline["ppo"]
  for name in ("sft", "rm", "ppo"):
    _finite(pipeline[name], name)
  assert sft_summary["steps"] == 4 and sft_summary["final_eval"]["eval_loss"] > 0
  # Both files of each directory were read: 16 TL;DR + 16 conversational records.
  assert sft_summary["data"]["examples_read"] == 32
  assert rm_summary["steps"] == 2 and rm_summary["final_eval"]["eval_comparisons"] == 16
  assert 0 <= rm_summary["final_eval"]["eval_accuracy"] <= 1
  assert abs(rm_summary["normalization"]["demonstrations"]["mean_after"]) < 1e-4
  assert ppo_summary["iterations"] == 2
  assert ppo_summary["final_eval"] is not None and ppo_summary["final_kl"] is not None
  assert 0 <= ppo_summary["final_train"]["stopped_fraction"] <= 1


def test_exports_load_in_transformers(pipeline):
  import torch
  import transformers
  root = pipeline["root"]
  tokenizer = transformers.AutoTokenizer.from_pretrained(str(root / "tokenizer"))
  ids = torch.tensor([tokenizer("SUBREDDIT: r/relationships")["input_ids"]])
  for export in ("sft/hf", "ppo/hf", "ppo/hf_ema"):
    model = transformers.AutoModelForCausalLM.from_pretrained(str(root / export)).eval()
    with torch.no_grad():
      logits = model(input_ids=ids).logits
    assert logits.shape[-1] >= len(tokenizer) and torch.isfinite(logits).all(), export
  classifier = transformers.AutoModelForSequenceClassification.from_pretrained(
      str(root / "rm" / "hf")).eval()
  with torch.no_grad():
    assert torch.isfinite(classifier(input_ids=ids).logits).all()
  normalization = json.loads((root / "rm" / "hf" / "reward_normalization.json").read_text())
  assert normalization["demonstrations"]["count"] == 16
  np.testing.assert_allclose(normalization["bias"],
                             -normalization["demonstrations"]["mean_before"], rtol=1e-6)


def test_a_preset_without_a_tokenizer_says_so(tmp_path):
  c = sft_config.get_config("tldr")
  with pytest.raises(config_lib.ConfigError, match="config.tokenizer is empty"):
    sft.train_and_evaluate(c, str(tmp_path))
