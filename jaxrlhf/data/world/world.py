"""A seeded, self-contained "API prompt distribution" in which the whole recipe runs.

Simulated users (each with a favourite mix of tasks and a way of asking) send
prompts; users, not prompts, are split into train / validation / test as in
the paper. Writers of demonstrations answer correctly most of the time, but some
make slips and some add chatty filler after the answer, which the labeler
marks down: SFT copies those habits, and an RM trained on the labeler's rankings
can teach PPO to drop them. The pretraining corpus states the same facts as
"web text" ("reverse c a f is f a c . sort 3 1 is 1 3 ."), and a share of it as
question-and-answer text in the prompts' own form ("sort : 3 1 -> 1 3 ."), as a web
corpus holds some, but never with a stop after an answer, never with demonstrators'
filler and never with the users' "please"; so a base model learns the tasks, can be
prompted few-shot, and rambles.

`write_world(config, out_dir)` writes everything as JSONL in the formats of
`jaxrlhf.data.formats`, so the world is read through the same loaders as real
data:

  pretrain/{train,validation}.jsonl     {"text"}
  sft/{train,validation,test}.jsonl     {"prompt", "response", + meta}
  flan/{train,validation}.jsonl         {"prompt", "response", + meta}: "public NLP tasks"
  rm/{train,validation,test}.jsonl      {"prompt", + meta}   (to be sampled and ranked)
  ppo/{train,validation,test}.jsonl     {"prompt", + meta}   (test: final evaluation)
  world.json                            config, sizes, labeler noise scale

The meta fields (task, items, arg, user, id) are for the labeler only: the policy
sees token ids of the prompt and nothing else.
"""

from __future__ import annotations

import dataclasses
import json
import os
import zlib
from typing import Any, Iterable

import numpy as np

from jaxrlhf.data import formats
from jaxrlhf.data.world import labeler as labeler_lib
from jaxrlhf.data.world import tasks

# Prompts in the paper's SFT / RM / PPO training sets (Table 6).
PAPER_PROMPTS = {"sft": 13_000, "rm": 33_000, "ppo": 31_000}
SPLITS = ("train", "validation", "test")


@dataclasses.dataclass(frozen=True)
class WorldConfig:
  """Everything that fixes a world; the same config always gives the same files."""
  seed: int = 0
  scale: float = 0.1                      # x the paper's 13k / 33k / 31k prompts
  rm_scale: float = 1.0                   # x scale again, for the RM prompts alone
  num_users: int = 200                    # simulated API users
  split_fractions: tuple[float, float, float] = (0.8, 0.1, 0.1)  # of users: train/valid/test
  pretrain_documents: int = 400_000       # x scale; 5% more go to validation
  num_demonstrators: int = 8              # writers of the SFT responses
  demo_error_rate: float = 0.1            # mean chance a demonstration has a slip
  demo_filler_rate: float = 0.25          # mean chance it ends with chatty filler
  labeler_agreement: float = 0.73         # two labelers agree on this share of comparisons
  max_prompt_len: int = 24                # tokens, with BOS (the longest world prompt is 14)
  max_response_len: int = 12              # tokens, with EOS (the longest answer is 6)
  max_text_len: int = 64                  # pretraining document tokens, BOS and EOS included
  qa_text_rate: float = 0.3               # share of web statements in the prompts' "->" form
  tasks: tuple[str, ...] = tasks.TASKS

  def __post_init__(self):
    if abs(sum(self.split_fractions) - 1.0) > 1e-6 or min(self.split_fractions) <= 0:
      raise ValueError(f"split_fractions must be positive and sum to 1: {self.split_fractions}")
    unknown = set(self.tasks) - set(tasks.TASKS)
    if unknown:
      raise ValueError(f"unknown tasks {sorted(unknown)}; known: {tasks.TASKS}")
    if not 0.0 <= self.qa_text_rate <= 1.0:
      raise ValueError(f"qa_text_rate must be in [0, 1], got {self.qa_text_rate}")
    if self.rm_scale <= 0:
      raise ValueError(f"rm_scale must be positive, got {self.rm_scale}")
    if self.num_users < 3:
      raise ValueError("num_users must be at least 3, one per split")

  @classmethod
  def from_dict(cls, values: Any) -> WorldConfig:
    """From a dict or ml_collections ConfigDict; lists become tuples."""
    values = dict(values)
    for key in ("split_fractions", "tasks"):
      if key in values:
        values[key] = tuple(values[key])
    return cls(**values)

  def num_prompts(self, dataset: str, split: str) -> int:
    scale = self.scale * (self.rm_scale if dataset == "rm" else 1.0)
    train = max(1, round(PAPER_PROMPTS[dataset] * scale))
    if split == "train":
      return train
    fraction = self.split_fractions[SPLITS.index(split)] / self.split_fractions[0]
    return max(1, round(train * fraction))

  def labeler(self) -> labeler_lib.Labeler:
    return labeler_lib.Labeler.calibrated(self.labeler_agreement, self.seed)


def _rng(config: WorldConfig, *stream: str) -> np.random.Generator:
  """An independent generator per named stream, so changing one part moves no other."""
  return np.random.default_rng([config.seed] + [zlib.crc32(s.encode()) for s in stream])


def make_users(config: WorldConfig) -> list[dict[str, Any]]:
  """Users with a split, a task mix, a phrasing style and an activity level."""
  rng = _rng(config, "users")
  order = rng.permutation(config.num_users)
  bounds = np.cumsum(config.split_fractions)[:-1] * config.num_users
  bounds = np.clip(np.round(bounds).astype(int), 1, config.num_users - 1)
  bounds[1] = max(bounds[1], bounds[0] + 1)
  split_of = np.empty(config.num_users, dtype=object)
  for split, members in zip(SPLITS, np.split(order, bounds)):
    split_of[members] = split
  users = []
  for user in range(config.num_users):
    users.append({
        "user": user,
        "split": split_of[user],
        "task_weights": rng.dirichlet(np.ones(len(config.tasks))),
        "style": int(rng.integers(len(tasks.PROMPT_STYLES))),
        "activity": float(rng.lognormal(0.0, 1.0)),
    })
  return users


def _prompt_records(config: WorldConfig, users: list[dict], dataset: str,
                    split: str) -> list[dict[str, Any]]:
  rng = _rng(config, "prompts", dataset, split)
  members = [u for u in users if u["split"] == split]
  activity = np.array([u["activity"] for u in members])
  records = []
  for i in range(config.num_prompts(dataset, split)):
    user = members[rng.choice(len(members), p=activity / activity.sum())]
    task = config.tasks[rng.choice(len(config.tasks), p=user["task_weights"])]
    meta = tasks.sample_instance(task, rng)
    records.append({"prompt": tasks.prompt_text(meta, user["style"]), **meta,
                    "user": user["user"], "id": f"{dataset}-{split}-{i:06d}"})
  return records


def _demonstrators(config: WorldConfig) -> list[dict[str, float]]:
  rng = _rng(config, "demonstrators")
  return [{"error_rate": float(rng.uniform(0, 2 * config.demo_error_rate)),
           "filler_rate": float(rng.uniform(0, 2 * config.demo_filler_rate))}
          for _ in range(config.num_demonstrators)]


def _demonstrations(config: WorldConfig, prompts: list[dict], split: str) -> list[dict]:
  """Labeler-written responses: right, but with each writer's slips and filler."""
  rng = _rng(config, "demonstrations", split)
  writers = _demonstrators(config)
  records = []
  for record in prompts:
    writer_id = int(rng.integers(len(writers)))
    writer = writers[writer_id]
    words = tasks.answer(record)
    if rng.random() < writer["error_rate"]:
      words = tasks.corrupt(record, words, rng)
    response = " ".join(words)
    if rng.random() < writer["filler_rate"]:
      response += " " + tasks.FILLERS[int(rng.integers(len(tasks.FILLERS)))]
    records.append({**record, "response": response, "demonstrator": writer_id})
  return records


def _public_tasks(config: WorldConfig, split: str, count: int) -> list[dict[str, Any]]:
  """The FLAN/T0-style collection: every task equally often, each example in one of the
  fixed academic templates, answered right with nothing after it, from no user. A policy
  fine-tuned on it (instead of the users' demonstrations) is the paper's FLAN and T0
  baselines."""
  rng = _rng(config, "public_tasks", split)
  records = []
  for i in range(count):
    task = config.tasks[i % len(config.tasks)]
    meta = tasks.sample_instance(task, rng)
    template = int(rng.integers(len(tasks.ACADEMIC_TEMPLATES)))
    records.append({"prompt": tasks.academic_prompt(meta, template), **meta,
                    "response": " ".join(tasks.answer(meta)), "template": template,
                    "id": f"flan-{split}-{i:06d}"})
  order = rng.permutation(len(records))
  return [records[j] for j in order]


def _documents(config: WorldConfig, count: int, stream: str) -> list[dict[str, str]]:
  """Web text: runs of statements, each a fact about some list, and some bare lists."""
  rng = _rng(config, "pretrain", stream)
  budget = config.max_text_len - 2  # BOS and EOS
  documents = []
  for _ in range(count):
    words: list[str] = []
    for _ in range(int(rng.integers(2, 7))):
      if rng.random() < 0.1:
        items = tasks.sample_instance("reverse", rng)["items"]
        statement = f"list {' '.join(items)} ."
      else:
        task = config.tasks[int(rng.integers(len(config.tasks)))]
        meta = tasks.sample_instance(task, rng)
        if config.qa_text_rate and rng.random() < config.qa_text_rate:
          statement = tasks.qa_statement(meta)
        else:
          statement = tasks.web_statement(meta)
      if words and len(words) + len(statement.split()) > budget:
        break
      words.extend(statement.split())
    documents.append({"text": " ".join(words)})
  return documents


def generate_world(config: WorldConfig) -> dict[str, dict[str, list[dict[str, Any]]]]:
  """All records of the world: {dataset: {split: [record, ...]}}."""
  users = make_users(config)
  world: dict[str, dict[str, list[dict]]] = {}
  for dataset in PAPER_PROMPTS:
    world[dataset] = {split: _prompt_records(config, users, dataset, split) for split in SPLITS}
  world["sft"] = {split: _demonstrations(config, records, split)
                  for split, records in world["sft"].items()}
  # As many examples as SFT's demonstrations: the same budget.
  world["flan"] = {split: _public_tasks(config, split, len(world["sft"][split]))
                   for split in ("train", "validation")}
  num_documents = max(1, round(config.pretrain_documents * config.scale))
  world["pretrain"] = {
      "train": _documents(config, num_documents, "train"),
      "validation": _documents(config, max(1, round(0.05 * num_documents)), "validation"),
  }
  return world


def write_world(config: WorldConfig, out_dir: str) -> dict[str, Any]:
  """Writes the world's JSONL files under `out_dir`; returns (and writes) world.json."""
  world = generate_world(config)
  sizes = {}
  for dataset, splits in world.items():
    for split, records in splits.items():
      path = os.path.join(out_dir, dataset, f"{split}.jsonl")
      sizes[f"{dataset}/{split}"] = formats.write_jsonl(path, records)
  summary = {
      "config": dataclasses.asdict(config),
      "sizes": sizes,
      "vocab_size": len(tasks.VOCAB),
      "labeler_noise_scale": config.labeler().noise_scale,
  }
  with open(os.path.join(out_dir, "world.json"), "w", encoding="utf-8") as f:
    json.dump(summary, f, indent=2)
  return summary


def task_meta(record: dict[str, Any]) -> dict[str, Any]:
  """The labeler's view of a prompt record (or a loader batch's `meta` entry)."""
  return {"task": record["task"], "items": list(record["items"]), "arg": record.get("arg")}


def ranking_record(prompt_record: dict[str, Any], responses: list[str], ranks: list[int]
                   ) -> dict[str, Any] | None:
  """A rankings JSONL record, or None when every response tied (no comparison)."""
  if len(set(ranks)) < 2:
    return None
  return {"prompt": prompt_record["prompt"], "responses": list(responses),
          "ranks": [int(r) for r in ranks], **task_meta(prompt_record),
          "id": prompt_record.get("id")}


def write_rankings(path: str, records: Iterable[dict[str, Any] | None]) -> dict[str, int]:
  """Writes ranking records, counting (and leaving out) the all-tied Nones."""
  records = list(records)
  kept = [r for r in records if r is not None]
  written = formats.write_jsonl(path, kept)
  return {"written": written, "skipped/all_tied": len(records) - len(kept)}
