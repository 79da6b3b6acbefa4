"""What the policy comparison reads: the policies to compare, the prompts, few-shot prompts.

`parse_policies` reads config.policies; `prompt_files` and `read_prompts` give the
held-out prompts every policy answers (by default the embedded world's test prompts);
`few_shot_prefix` builds the prompted-base-model baseline's prefix and `text_batches`
the held-out pretraining text on which the alignment tax is measured.
"""

from __future__ import annotations

import ml_collections
import numpy as np
from etils import epath

from jaxrlhf import config_lib
from jaxrlhf.data import formats
from jaxrlhf.data import tokenize as tokenize_lib

# Splits of the embedded world whose prompts come from held-out (test) users.
WORLD_TEST_PROMPTS = ("ppo/test", "rm/test", "sft/test")


def _split_list(value: str) -> list[str]:
  return [part.strip() for part in str(value or "").split(",") if part.strip()]


def parse_policies(spec: str) -> dict[str, str]:
  """'name=path,name=path' -> {name: path}, in order; names must be unique."""
  policies = {}
  for item in _split_list(spec):
    name, sep, path = item.partition("=")
    name, path = name.strip(), path.strip()
    if not sep or not name or not path:
      raise config_lib.ConfigError(f"config.policies: {item!r} is not name=path")
    if name in policies:
      raise config_lib.ConfigError(f"config.policies: the name {name!r} appears twice")
    policies[name] = path
  return policies


def prompt_files(config: ml_collections.ConfigDict) -> list[str]:
  """The prompt files: config.prompts_file, or the world's held-out test prompts."""
  if config.prompts_file:
    return formats.expand_paths(_split_list(config.prompts_file))
  directory = epath.Path(config.world_dir)
  if not (directory / "world.json").exists():
    raise FileNotFoundError(
        f"config.world_dir={config.world_dir!r} holds no world.json; set "
        "config.prompts_file to a prompts JSONL or config.world_dir to a world written by "
        "the pipeline (<workdir>/world).")
  return [str(directory / f"{name}.jsonl") for name in WORLD_TEST_PROMPTS]


def read_prompts(files: list[str], *, need_meta: bool, limit: int = 0
                 ) -> list[formats.Prompt]:
  """Prompts (with their host-side meta); the labeler needs each prompt's task fields."""
  prompts = []
  for path in files:
    if path.startswith("tfds:"):  # a prepared split, tfds:<data_dir>:<split>
      from jaxrlhf import data_lib  # pylint: disable=g-import-not-at-top
      prompts.extend(data_lib.read("prompts", path, skip_invalid=False)[0])
    else:
      prompts.extend(formats.iter_file("prompts", path))
  if limit:
    prompts = prompts[:limit]
  if not prompts:
    raise ValueError(f"no prompts in {files}")
  if need_meta:
    for prompt in prompts:
      meta = prompt.meta or {}
      for field in ("task", "items"):
        if field not in meta:
          raise formats.DataError(
              f"the labeler judges by the world's task fields, and {field!r} is missing "
              "(use config.judge='reward_model' for prompts without them)",
              source=prompt.source, field=field, reason="missing_field")
  return prompts


def few_shot_prefix(demonstrations: list[formats.Demonstration], num_shots: int,
                    eos_token: str, seed: int) -> str:
  """`num_shots` demonstrations as "prompt response <eos>" blocks, chosen with a seed.

  Like the paper's prompted GPT-3 baseline: the base model never saw the instruction
  format, so it is shown a few examples of it, each closed by the stop token so it can
  learn in context where an answer ends.
  """
  candidates = [d for d in demonstrations if not d.is_chat]
  if len(candidates) < num_shots:
    raise ValueError(f"few-shot: {num_shots} examples wanted, {len(candidates)} available")
  order = np.random.default_rng(seed).permutation(len(candidates))[:num_shots]
  return " ".join(f"{candidates[i].prompt} {candidates[i].response} {eos_token}"
                  for i in order)


def text_batches(path: str, tokenizer, max_len: int, per_device: int, limit: int
                 ) -> list[dict]:
  """Held-out pretraining text as host batches [devices, per_device, T]."""
  texts = formats.read_examples("text", path)
  lengths = tokenize_lib.Lengths(prompt=2, response=1, text=max_len)
  from jaxrlhf import data_lib  # pylint: disable=g-import-not-at-top
  return data_lib.eval_loader_batches("text", texts, tokenizer, lengths, per_device,
                                      limit)()
