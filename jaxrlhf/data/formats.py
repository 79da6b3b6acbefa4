"""JSONL formats of the recipe's four kinds of data, parsed into typed examples.

Each example remembers the file and line it came from, so every later error can
name them. Kinds (one JSON object a line; other keys are ignored, except in
prompts, where they travel host-side as `meta`):

  demonstrations (SFT)  {"prompt": str, "response": str}
                        {"messages": [{"role": str, "content": str}, ...]}
  rankings (RM)         {"prompt": str, "responses": [str, ...], "ranks": [int, ...]}
                        {"prompt": str, "chosen": str, "rejected": str}
                        {"chosen": "\\n\\nHuman: ...\\n\\nAssistant: ...", "rejected": ...}
  prompts (PPO, eval)   {"prompt": str, ...}
  text (pretraining)    {"text": str}, or a .txt file with one document a line

Bad input raises `DataError` naming file, line and field; with `skip_invalid=True`
the example is skipped and counted in a `DataStats` instead.
"""

from __future__ import annotations

import dataclasses
import glob
import json
import os
from typing import Any, Callable, Iterable, Iterator, Sequence, Union

from jaxrlhf.data.stats import DataStats

KINDS = ("demonstrations", "rankings", "prompts", "text")
# The transcript markers of the Anthropic HH data.
HH_HUMAN = "\n\nHuman:"
HH_ASSISTANT = "\n\nAssistant:"


@dataclasses.dataclass(frozen=True)
class Source:
  """Where an example came from: a file and a 1-based line number."""
  file: str
  line: int

  def __str__(self) -> str:
    return f"{self.file}:{self.line}"


class DataError(ValueError):
  """Bad input data; the message names file, line and field and what was expected."""

  def __init__(self, message: str, *, source: Source | None = None,
               field: str | None = None, reason: str = "invalid"):
    self.source = source
    self.field = field
    self.reason = reason
    where = []
    if source is not None:
      where.append(f"{source.file}, line {source.line}")
    if field is not None:
      where.append(f"field '{field}'")
    super().__init__(f"{', '.join(where)}: {message}" if where else message)


@dataclasses.dataclass(frozen=True)
class Demonstration:
  """An SFT example: a prompt and response, or a chat whose assistant turns are targets."""
  prompt: str = ""
  response: str = ""
  messages: tuple[tuple[str, str], ...] = ()  # (role, content) pairs; chat form only
  source: Source = Source("<memory>", 0)

  @property
  def is_chat(self) -> bool:
    return bool(self.messages)


@dataclasses.dataclass(frozen=True)
class Ranking:
  """K responses to one prompt ranked by a labeler: rank 0 is best, equal ranks tie."""
  prompt: str
  responses: tuple[str, ...]
  ranks: tuple[int, ...]
  source: Source = Source("<memory>", 0)

  @property
  def k(self) -> int:
    return len(self.responses)


@dataclasses.dataclass(frozen=True)
class Prompt:
  """A prompt for PPO or evaluation; `meta` holds the record's other fields, host-side."""
  prompt: str
  meta: dict[str, Any] | None = None
  source: Source = Source("<memory>", 0)


@dataclasses.dataclass(frozen=True)
class Text:
  """A pretraining document."""
  text: str
  source: Source = Source("<memory>", 0)


Example = Union[Demonstration, Ranking, Prompt, Text]


# ---------------------------------------------------------------------------
# Field checks.

def _require(record: dict, field: str, source: Source, path: str | None = None) -> Any:
  if field not in record:
    present = ", ".join(sorted(record)) or "none"
    raise DataError(f"missing required field (fields present: {present})",
                    source=source, field=path or field, reason="missing_field")
  return record[field]


def _string(value: Any, field: str, source: Source, *, nonempty: bool = False,
            what: str = "text") -> str:
  if not isinstance(value, str):
    raise DataError(f"expected a string, got {type(value).__name__}",
                    source=source, field=field, reason="wrong_type")
  if nonempty and not value.strip():
    reason = "empty_response" if what == "response" else f"empty_{what}"
    raise DataError(f"the {what} is empty", source=source, field=field, reason=reason)
  try:
    value.encode("utf-8")
  except UnicodeEncodeError as e:
    # JSON may escape an unpaired surrogate ("\udc80"); no tokenizer can encode it.
    raise DataError(f"holds an unpaired surrogate escape at character {e.start}, which "
                    "is not text", source=source, field=field, reason="not_utf8") from None
  return value


def _string_list(value: Any, field: str, source: Source) -> list[str]:
  if not isinstance(value, list):
    raise DataError(f"expected a list of strings, got {type(value).__name__}",
                    source=source, field=field, reason="wrong_type")
  return [_string(v, f"{field}[{i}]", source, nonempty=True, what="response")
          for i, v in enumerate(value)]


def _int_list(value: Any, field: str, source: Source) -> list[int]:
  if not isinstance(value, list):
    raise DataError(f"expected a list of integers, got {type(value).__name__}",
                    source=source, field=field, reason="wrong_type")
  for i, v in enumerate(value):
    # bool is an int subclass, and true/false as ranks is surely a mistake.
    if not isinstance(v, int) or isinstance(v, bool):
      raise DataError(f"expected an integer rank, got {json.dumps(v)}",
                      source=source, field=f"{field}[{i}]", reason="wrong_type")
    if v < 0:
      raise DataError(f"ranks must be >= 0 (0 is best), got {v}",
                      source=source, field=f"{field}[{i}]", reason="negative_rank")
  return list(value)


def _object(value: Any, field: str, source: Source) -> dict:
  if not isinstance(value, dict):
    raise DataError(f"expected a JSON object, got {type(value).__name__}",
                    source=source, field=field, reason="wrong_type")
  return value


# ---------------------------------------------------------------------------
# Parsers, one per kind: JSON object -> typed example.

def parse_demonstration(record: dict, source: Source) -> Demonstration:
  record = _object(record, "<record>", source)
  if "messages" in record:
    messages = record["messages"]
    if not isinstance(messages, list) or not messages:
      raise DataError("expected a non-empty list of {role, content} objects",
                      source=source, field="messages", reason="wrong_type")
    turns = []
    for i, message in enumerate(messages):
      message = _object(message, f"messages[{i}]", source)
      path = f"messages[{i}]"
      role = _string(_require(message, "role", source, f"{path}.role"),
                     f"{path}.role", source)
      content = _string(_require(message, "content", source, f"{path}.content"),
                        f"{path}.content", source)
      if role == "assistant" and not content.strip():
        raise DataError("the assistant turn is empty", source=source,
                        field=f"messages[{i}].content", reason="empty_response")
      turns.append((role, content))
    if not any(role == "assistant" for role, _ in turns):
      raise DataError("a chat demonstration needs at least one assistant turn",
                      source=source, field="messages", reason="no_assistant_turn")
    return Demonstration(messages=tuple(turns), source=source)
  prompt = _string(_require(record, "prompt", source), "prompt", source)
  response = _string(_require(record, "response", source), "response", source,
                     nonempty=True, what="response")
  return Demonstration(prompt=prompt, response=response, source=source)


def split_hh_transcripts(chosen: str, rejected: str, source: Source) -> tuple[str, str, str]:
  """Splits two HH transcripts into (shared prompt, chosen response, rejected response).

  The prompt runs up to and including the last "\\n\\nAssistant:" marker inside the
  longest common prefix of the two transcripts, i.e. the final assistant turn
  they share; the responses are what follows it in each.
  """
  common = os.path.commonprefix([chosen, rejected])
  cut = common.rfind(HH_ASSISTANT)
  if cut < 0:
    raise DataError(
        f"the two transcripts share no '{HH_ASSISTANT.strip()}' turn, so the prompt "
        "cannot be found", source=source, field="chosen", reason="hh_no_shared_turn")
  cut += len(HH_ASSISTANT)
  prompt, chosen_response, rejected_response = chosen[:cut], chosen[cut:], rejected[cut:]
  for field, response in (("chosen", chosen_response), ("rejected", rejected_response)):
    if not response.strip():
      raise DataError("the final assistant response is empty", source=source,
                      field=field, reason="empty_response")
  return prompt, chosen_response, rejected_response


def parse_ranking(record: dict, source: Source) -> Ranking:
  record = _object(record, "<record>", source)
  if "responses" in record or "ranks" in record:
    prompt = _string(_require(record, "prompt", source), "prompt", source)
    responses = _string_list(_require(record, "responses", source), "responses", source)
    ranks = _int_list(_require(record, "ranks", source), "ranks", source)
    if len(responses) < 2:
      raise DataError(f"a ranking needs at least 2 responses, got {len(responses)}",
                      source=source, field="responses", reason="too_few_responses")
    if len(ranks) != len(responses):
      raise DataError(f"{len(ranks)} ranks for {len(responses)} responses; "
                      "expected one rank per response", source=source, field="ranks",
                      reason="ranks_length")
    if len(set(ranks)) < 2:
      raise DataError(f"ranks {ranks} hold fewer than two distinct values, so the "
                      "ranking has no comparison", source=source, field="ranks",
                      reason="too_few_distinct_ranks")
    return Ranking(prompt, tuple(responses), tuple(ranks), source)
  if "chosen" in record or "rejected" in record:
    chosen = _string(_require(record, "chosen", source), "chosen", source,
                     nonempty=True, what="response")
    rejected = _string(_require(record, "rejected", source), "rejected", source,
                       nonempty=True, what="response")
    if "prompt" in record:
      prompt = _string(record["prompt"], "prompt", source)
    else:
      prompt, chosen, rejected = split_hh_transcripts(chosen, rejected, source)
    return Ranking(prompt, (chosen, rejected), (0, 1), source)
  raise DataError("expected 'responses' and 'ranks', or 'chosen' and 'rejected'",
                  source=source, field="responses", reason="missing_field")


def parse_prompt(record: dict, source: Source) -> Prompt:
  record = _object(record, "<record>", source)
  prompt = _string(_require(record, "prompt", source), "prompt", source,
                   nonempty=True, what="prompt")
  meta = {k: v for k, v in record.items() if k != "prompt"} or None
  return Prompt(prompt, meta, source)


def parse_text(record: dict, source: Source) -> Text:
  record = _object(record, "<record>", source)
  text = _string(_require(record, "text", source), "text", source,
                 nonempty=True, what="text")
  return Text(text, source)


PARSERS: dict[str, Callable[[dict, Source], Example]] = {
    "demonstrations": parse_demonstration,
    "rankings": parse_ranking,
    "prompts": parse_prompt,
    "text": parse_text,
}


# ---------------------------------------------------------------------------
# Reading files.

def _field_with_bad_bytes(value: Any, path: str) -> str | None:
  """Finds the JSON field holding undecodable bytes (kept as lone surrogates)."""
  if isinstance(value, str):
    return path if any("\udc80" <= c <= "\udcff" for c in value) else None
  if isinstance(value, dict):
    for key, item in value.items():
      key_path = key if not path else f"{path}.{key}"
      found = _field_with_bad_bytes(key, key_path) or _field_with_bad_bytes(item, key_path)
      if found:
        return found
  if isinstance(value, list):
    for i, item in enumerate(value):
      found = _field_with_bad_bytes(item, f"{path}[{i}]")
      if found:
        return found
  return None


def _decode_json_line(raw: bytes, source: Source) -> Any:
  try:
    text = raw.decode("utf-8")
  except UnicodeDecodeError as e:
    # Decode leniently only to name the field that holds the bad bytes.
    lenient = raw.decode("utf-8", errors="surrogateescape")
    try:
      field = _field_with_bad_bytes(json.loads(lenient), "") or "<line>"
    except json.JSONDecodeError:
      field = "<line>"
    # A field name may hold the bad bytes itself: show them escaped (\xd2), since a
    # message with lone surrogates cannot be printed or written as UTF-8.
    try:
      field = field.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")
    except UnicodeEncodeError:  # a surrogate JSON escape ("\ud800") in the name as well
      field = field.encode("utf-8", "backslashreplace").decode("utf-8")
    raise DataError(f"not valid UTF-8 ({e.reason} at byte {e.start})", source=source,
                    field=field, reason="not_utf8") from None
  try:
    return json.loads(text)
  except json.JSONDecodeError as e:
    raise DataError(f"malformed JSON: {e.msg} (column {e.colno})", source=source,
                    field="<json>", reason="malformed_json") from None


def _raw_lines(path: str) -> Iterator[tuple[int, bytes]]:
  with open(path, "rb") as f:
    for number, raw in enumerate(f, start=1):
      yield number, raw.rstrip(b"\r\n")


def iter_file(kind: str, path: str, *, skip_invalid: bool = False,
              stats: DataStats | None = None) -> Iterator[Example]:
  """Yields the examples of one JSONL file (or .txt file for kind 'text')."""
  if kind not in PARSERS:
    raise ValueError(f"unknown data kind {kind!r}; expected one of {KINDS}")
  stats = stats if stats is not None else DataStats()
  parse = PARSERS[kind]
  plain_text = kind == "text" and path.endswith(".txt")
  for number, raw in _raw_lines(path):
    source = Source(path, number)
    if not raw.strip():
      stats.add("ignored/blank_lines")
      continue
    try:
      if plain_text:
        try:
          example = Text(raw.decode("utf-8"), source)
        except UnicodeDecodeError as e:
          raise DataError(f"not valid UTF-8 ({e.reason} at byte {e.start})",
                          source=source, field="text", reason="not_utf8") from None
      else:
        example = parse(_decode_json_line(raw, source), source)
    except DataError as e:
      if not skip_invalid:
        raise
      stats.skip(e.reason, str(e))
      continue
    stats.add("examples_read")
    yield example


def expand_paths(paths: str | Sequence[str]) -> list[str]:
  """Files named by paths, glob patterns or directories (their *.jsonl and *.txt)."""
  if isinstance(paths, (str, os.PathLike)):
    paths = [paths]
  files = []
  for path in map(os.fspath, paths):
    if os.path.isdir(path):
      found = sorted(glob.glob(os.path.join(path, "*.jsonl")) +
                     glob.glob(os.path.join(path, "*.txt")))
    elif glob.has_magic(path):
      found = sorted(glob.glob(path))
    else:
      found = [path]
    if not found:
      raise FileNotFoundError(f"no data files match {path!r}")
    files.extend(found)
  for file in files:
    if not os.path.isfile(file):
      raise FileNotFoundError(f"data file {file!r} does not exist")
  return files


def read_examples(kind: str, paths: str | Sequence[str], *, skip_invalid: bool = False,
                  stats: DataStats | None = None) -> list[Example]:
  """Parses every example of `paths` into memory; see `iter_file`."""
  examples = []
  for path in expand_paths(paths):
    examples.extend(iter_file(kind, path, skip_invalid=skip_invalid, stats=stats))
  return examples


def write_jsonl(path: str, records: Iterable[dict]) -> int:
  """Writes dict records one a line (UTF-8, no ASCII escaping); returns the count."""
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  count = 0
  with open(path, "w", encoding="utf-8") as f:
    for record in records:
      f.write(json.dumps(record, ensure_ascii=False) + "\n")
      count += 1
  return count
