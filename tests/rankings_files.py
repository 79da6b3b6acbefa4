"""K-way rankings files for the subprocess tests, made from a world's files without
sampling a policy (the rankings stage has tests of its own, tests/test_stages.py)."""

import json
import pathlib

import numpy as np


def write_rankings(world: pathlib.Path, path: pathlib.Path, n: int,
                   rng: np.random.Generator) -> None:
  """`n` rankings of 2 to 4 responses over the world's RM prompts: the responses are
  runs of words from its demonstrations, the ranks a random permutation."""
  prompts = [json.loads(line)["prompt"] for line in
             (world / "rm" / "train.jsonl").read_text().splitlines()]
  words = " ".join(json.loads(line)["response"] for line in
                   (world / "sft" / "train.jsonl").read_text().splitlines()).split()
  with open(path, "w") as f:
    for i in range(n):
      k = int(rng.integers(2, 5))
      responses = [" ".join(rng.choice(words, size=int(rng.integers(1, 6)))) for _ in range(k)]
      ranks = rng.permutation(k).tolist()
      f.write(json.dumps({"prompt": prompts[i % len(prompts)], "responses": responses,
                          "ranks": ranks}) + "\n")
