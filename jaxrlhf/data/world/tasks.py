"""The instruction world's token language and its eight tasks.

A task instance is a small dict, its hidden `meta`: {"task", "items", "arg"}.
From it come the user's prompt ("please first 2 : c a f ->"), the correct
answer ("c a"), the "web text" statement the pretraining corpus states it as
("first 2 of c a f is c a ."), and the checks the simulated labeler scores with.
"""

from __future__ import annotations

from typing import Any, Sequence

import numpy as np

SPECIAL_TOKENS = ("<pad>", "<eos>", "<bos>", "<unk>")
ROLE_WORDS = ("user", "assistant", "system")
PUNCTUATION = (":", "->", ".", ";", ",")
TASKS = ("reverse", "sort", "add", "count", "first", "remove", "upper", "max")
PROMPT_WORDS = ("please", "can", "you")
WEB_WORDS = ("is", "of", "in", "from", "list")
FILLER_WORDS = ("done", "ok", "hope", "this", "helps", "that")
LETTERS = tuple("abcdefghij")
UPPER = tuple("ABCDEFGHIJ")
DIGITS = tuple("0123456789")
VOCAB = (SPECIAL_TOKENS + ROLE_WORDS + PUNCTUATION + TASKS + PROMPT_WORDS + WEB_WORDS
         + FILLER_WORDS + LETTERS + UPPER + DIGITS)
ANSWER_SYMBOLS = frozenset(LETTERS + UPPER + DIGITS)
PROMPT_END = "->"

# How users phrase a request; each simulated user keeps one style.
PROMPT_STYLES = ("", "please ", "can you ")
# What a chatty writer tacks on after an answer; the labeler counts it as extra.
FILLERS = (". done", ". ok", ". hope this helps", ". is that ok", "; ok , done")
NUMERIC_TASKS = frozenset({"add", "count", "max"})
# Tasks whose answer is made of the input's own symbols (for `upper`, their upper-case
# forms): an answer symbol from anywhere else is a closed-domain hallucination, the
# paper's "information not present in the input". `add` and `count` answer with new
# numbers, so nothing in their answers can be told apart as made up.
CLOSED_DOMAIN_TASKS = frozenset({"reverse", "sort", "first", "remove", "upper", "max"})


def _symbols(rng: np.random.Generator, alphabet: Sequence[str], n: int) -> list[str]:
  return [alphabet[i] for i in rng.integers(0, len(alphabet), size=n)]


def sample_instance(task: str, rng: np.random.Generator) -> dict[str, Any]:
  """Draws the items (and argument) of one instance of `task`."""
  alphabet = LETTERS if rng.random() < 0.5 else DIGITS
  arg = None
  if task in ("reverse", "sort"):
    items = _symbols(rng, alphabet, int(rng.integers(2, 7)))
  elif task == "add":
    items = _symbols(rng, DIGITS, int(rng.integers(2, 4)))
  elif task == "max":
    items = _symbols(rng, DIGITS, int(rng.integers(2, 7)))
  elif task == "upper":
    items = _symbols(rng, LETTERS, int(rng.integers(2, 6)))
  elif task == "count":
    # A pool of three symbols makes counts of 0..n all likely.
    pool = [alphabet[i] for i in rng.choice(len(alphabet), size=3, replace=False)]
    items = _symbols(rng, pool, int(rng.integers(3, 7)))
    arg = pool[int(rng.integers(0, 3))]
  elif task == "first":
    items = _symbols(rng, alphabet, int(rng.integers(3, 7)))
    arg = str(int(rng.integers(1, len(items))))
  elif task == "remove":
    pool = [alphabet[i] for i in rng.choice(len(alphabet), size=3, replace=False)]
    items = _symbols(rng, pool, int(rng.integers(3, 7)))
    arg = pool[0]
    # At least one to remove and at least one to keep.
    if arg not in items:
      items[int(rng.integers(0, len(items)))] = arg
    if all(item == arg for item in items):
      items[int(rng.integers(0, len(items)))] = pool[1]
  else:
    raise ValueError(f"unknown task {task!r}; expected one of {TASKS}")
  return {"task": task, "items": items, "arg": arg}


def answer(meta: dict[str, Any]) -> list[str]:
  """The correct response tokens."""
  task, items, arg = meta["task"], list(meta["items"]), meta.get("arg")
  if task == "reverse":
    return items[::-1]
  if task == "sort":
    return sorted(items)
  if task == "add":
    return list(str(sum(int(d) for d in items)))
  if task == "count":
    return [str(items.count(arg))]
  if task == "first":
    return items[:int(arg)]
  if task == "remove":
    return [item for item in items if item != arg]
  if task == "upper":
    return [item.upper() for item in items]
  if task == "max":
    return [max(items)]
  raise ValueError(f"unknown task {task!r}")


def instruction(meta: dict[str, Any]) -> str:
  return meta["task"] if meta.get("arg") is None else f"{meta['task']} {meta['arg']}"


def prompt_text(meta: dict[str, Any], style: int = 0) -> str:
  """The user's request; PROMPT_END marks where the response starts."""
  return f"{PROMPT_STYLES[style]}{instruction(meta)} : {' '.join(meta['items'])} {PROMPT_END}"


# The "public NLP tasks" collection's templates (FLAN / T0 style): the same tasks asked
# in fixed, academic phrasings, none of them a user's ("please", "can you", or the
# users' bare "<instruction> : <items> ->").
ACADEMIC_TEMPLATES = (
    "{instruction} of list {items} ->",
    "list {items} ; {instruction} ->",
    "in : {items} . {instruction} ->",
)


def academic_prompt(meta: dict[str, Any], template: int) -> str:
  """The task as a templated dataset example states it; PROMPT_END ends it too."""
  return ACADEMIC_TEMPLATES[template].format(instruction=instruction(meta),
                                             items=" ".join(meta["items"]))


def web_statement(meta: dict[str, Any]) -> str:
  """The same fact as pretraining text states it, without the instruction format."""
  task, items, arg = meta["task"], " ".join(meta["items"]), meta.get("arg")
  result = " ".join(answer(meta))
  if task == "count":
    return f"count {arg} in {items} is {result} ."
  if task == "first":
    return f"first {arg} of {items} is {result} ."
  if task == "remove":
    return f"remove {arg} from {items} is {result} ."
  return f"{task} {items} is {result} ."


def qa_statement(meta: dict[str, Any]) -> str:
  """The fact as question-and-answer text on the web states it: the prompt's form, no stop."""
  return f"{prompt_text(meta)} {' '.join(answer(meta))} ."


def _as_number(tokens: Sequence[str]) -> int | None:
  if not 1 <= len(tokens) <= 2 or not all(t in DIGITS for t in tokens):
    return None
  if len(tokens) == 2 and tokens[0] == "0":
    return None
  return int("".join(tokens))


def hallucinated(meta: dict[str, Any], predicted: Sequence[str]) -> bool | None:
  """Whether an answer to a closed-domain task holds a symbol that its input does not;
  None for the other tasks."""
  task = meta["task"]
  if task not in CLOSED_DOMAIN_TASKS:
    return None
  allowed = set(meta["items"])
  if task == "upper":
    allowed = {s.upper() for s in allowed}
  return any(p not in allowed for p in predicted)


def correctness(meta: dict[str, Any], predicted: Sequence[str]) -> float:
  """Partial credit in [0, 1]: positions right for lists, closeness for numbers."""
  target = answer(meta)
  if not predicted:
    return 0.0
  if meta["task"] in NUMERIC_TASKS:
    value, wanted = _as_number(predicted), int("".join(target))
    if value is None:
      return 0.0
    return {0: 1.0, 1: 0.5, 2: 0.25}.get(abs(value - wanted), 0.0)
  right = sum(p == t for p, t in zip(predicted, target))
  return right / max(len(predicted), len(target))


def follows_constraint(meta: dict[str, Any], predicted: Sequence[str]) -> bool:
  """The instruction's form, right or wrong in content: sorted, upper case, K items..."""
  task, items, arg = meta["task"], list(meta["items"]), meta.get("arg")
  predicted = list(predicted)
  if task == "reverse":
    return sorted(predicted) == sorted(items)
  if task == "sort":
    return len(predicted) == len(items) and predicted == sorted(predicted)
  if task in ("add", "count"):
    number = _as_number(predicted)
    return number is not None and (task == "add" or len(predicted) == 1)
  if task == "max":
    return len(predicted) == 1 and predicted[0] in items
  if task == "first":
    return len(predicted) == int(arg)
  if task == "remove":
    return bool(predicted) and arg not in predicted
  if task == "upper":
    return bool(predicted) and all(p in UPPER for p in predicted)
  raise ValueError(f"unknown task {task!r}")


def corrupt(meta: dict[str, Any], tokens: list[str], rng: np.random.Generator) -> list[str]:
  """One plausible slip: a wrong item, a dropped item, or a number off by one."""
  if meta["task"] in NUMERIC_TASKS:
    value = int("".join(tokens))
    value = value + 1 if value == 0 or rng.random() < 0.5 else value - 1
    return list(str(value))
  tokens = list(tokens)
  if len(tokens) > 1 and rng.random() < 0.3:
    del tokens[int(rng.integers(0, len(tokens)))]
    return tokens
  position = int(rng.integers(0, len(tokens)))
  alphabet = UPPER if tokens[position] in UPPER else (
      DIGITS if tokens[position] in DIGITS else LETTERS)
  choices = [s for s in alphabet if s != tokens[position]]
  tokens[position] = choices[int(rng.integers(0, len(choices)))]
  return tokens
