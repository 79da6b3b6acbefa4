"""The recipe's four kinds of data, parsed into typed examples, from JSONL, Parquet or
Arrow files.

Each example remembers the file and line (or row) it came from, so every later error
can name them. Records are JSON objects (a JSONL line, or a Parquet/Arrow row as Hugging
Face datasets store them). Layouts of each kind (other keys are ignored, except in
prompts, where they travel host-side as `meta`; a message list is
[{"role": str, "content": str}, ...], rendered with the tokenizer's chat template):

  demonstrations (SFT)  {"prompt": str, "response": str}
                        {"prompt": str, "completion": str}
                        {"messages": messages}         loss on every assistant turn
                        {"prompt": messages, "completion": messages}
                                                       loss on the final assistant turn
                        {"subreddit", "title", "post", "summary"}   TL;DR (filtered)
  rankings (RM)         {"prompt": str, "responses": [str, ...], "ranks": [int, ...]}
                        {"prompt": str, "chosen": str, "rejected": str}
                        {"chosen": "\\n\\nHuman: ...\\n\\nAssistant: ...", "rejected": ...}
                        {"chosen": messages, "rejected": messages}  shared prompt implicit
                        {"prompt": messages, "chosen": messages, "rejected": messages}
                        {"info": {"subreddit", "title", "post"},
                         "summaries": [{"text": str}, ...], "choice": int}
                                                       OpenAI's summarize-from-feedback
  prompts (PPO, eval)   {"prompt": str, ...}
                        {"prompt": messages, ...}
                        {"subreddit", "title", "post", ...}   TL;DR
  text (pretraining)    {"text": str}, or a .txt file with one document a line

TL;DR posts are rendered with the summarisation prompt of Stiennon et al. (2020),
"SUBREDDIT: r/{subreddit}\\n\\nTITLE: {title}\\n\\nPOST: {post}\\n\\nTL;DR:", the post
marked as the part of the prompt that is shortened to fit the token budget (the
template never is); a summary is a response that starts with a space.

`fields` ({"question": "prompt"}, say) renames a record's top-level keys before it is
parsed, so files need not be rewritten. Bad input raises `DataError` naming file, line
and field; with `skip_invalid=True` the example is skipped and counted in a
`DataStats` instead.
"""

from __future__ import annotations

import dataclasses
import glob
import json
import os
from typing import Any, Callable, Iterable, Iterator, Mapping, Sequence, Union

from jaxrlhf.data import sources
from jaxrlhf.data.sources import DataError, Source
from jaxrlhf.data.stats import DataStats

KINDS = ("demonstrations", "rankings", "prompts", "text")
# The transcript markers of the Anthropic HH data.
HH_HUMAN = "\n\nHuman:"
HH_ASSISTANT = "\n\nAssistant:"

Turn = tuple[str, str]  # (role, content)
Span = tuple[int, int]  # [start, end) characters of a prompt


def tldr_prompt(subreddit: str, title: str, post: str) -> tuple[str, Span]:
  """The TL;DR summarisation prompt and the span of the post inside it (the part that is
  shortened when the prompt exceeds its token budget)."""
  head = f"SUBREDDIT: r/{subreddit}\n\nTITLE: {title}\n\nPOST:"
  body = " " + post.strip()
  return head + body + "\n\nTL;DR:", (len(head), len(head) + len(body))


def tldr_summary(summary: str) -> str:
  """A TL;DR summary as a response: it starts with one space, after "TL;DR:"."""
  return " " + summary.strip()


@dataclasses.dataclass(frozen=True)
class Demonstration:
  """An SFT example: a prompt and response, or a chat whose assistant turns are targets
  (only the final one with `final_turn_only`). `prompt_cut` is the span of the prompt
  shortened to fit the budget (a TL;DR post); None: the prompt is cut on the left."""
  prompt: str = ""
  response: str = ""
  messages: tuple[Turn, ...] = ()  # chat form only
  source: Source = Source("<memory>", 0)
  final_turn_only: bool = False
  prompt_cut: Span | None = None

  @property
  def is_chat(self) -> bool:
    return bool(self.messages)


@dataclasses.dataclass(frozen=True)
class Ranking:
  """K responses to one prompt ranked by a labeler: rank 0 is best, equal ranks tie.

  Chat form: `prompt_messages` and one message list per response in
  `response_messages` (`prompt` and `responses` are then empty)."""
  prompt: str
  responses: tuple[str, ...]
  ranks: tuple[int, ...]
  source: Source = Source("<memory>", 0)
  prompt_messages: tuple[Turn, ...] = ()
  response_messages: tuple[tuple[Turn, ...], ...] = ()
  prompt_cut: Span | None = None

  @property
  def is_chat(self) -> bool:
    return bool(self.response_messages)

  @property
  def k(self) -> int:
    return len(self.response_messages) if self.is_chat else len(self.responses)

  def as_demonstrations(self) -> list[Demonstration]:
    """Each response with its prompt, as the sequence a reward model scores."""
    if self.is_chat:
      return [Demonstration(messages=self.prompt_messages + turns, source=self.source,
                            final_turn_only=True) for turns in self.response_messages]
    return [Demonstration(self.prompt, response, source=self.source,
                          prompt_cut=self.prompt_cut) for response in self.responses]


@dataclasses.dataclass(frozen=True)
class Prompt:
  """A prompt for PPO or evaluation; `meta` holds the record's other fields, host-side.
  Chat form: `messages` (`prompt` is then empty), rendered with a generation prompt."""
  prompt: str
  meta: dict[str, Any] | None = None
  source: Source = Source("<memory>", 0)
  messages: tuple[Turn, ...] = ()
  prompt_cut: Span | None = None

  @property
  def is_chat(self) -> bool:
    return bool(self.messages)


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

def _messages(value: Any, field: str, source: Source, *,
              ends_with_assistant: bool = False) -> tuple[Turn, ...]:
  """A non-empty list of {role, content} objects as (role, content) pairs."""
  if not isinstance(value, list) or not value:
    raise DataError("expected a non-empty list of {role, content} objects",
                    source=source, field=field, reason="wrong_type")
  turns = []
  for i, message in enumerate(value):
    path = f"{field}[{i}]"
    message = _object(message, path, source)
    role = _string(_require(message, "role", source, f"{path}.role"), f"{path}.role", source)
    content = _string(_require(message, "content", source, f"{path}.content"),
                      f"{path}.content", source)
    if role == "assistant" and not content.strip():
      raise DataError("the assistant turn is empty", source=source,
                      field=f"{path}.content", reason="empty_response")
    turns.append((role, content))
  if ends_with_assistant and turns[-1][0] != "assistant":
    raise DataError(f"the last message is from {turns[-1][0]!r}; it must be the assistant's "
                    "turn that is trained on or scored", source=source,
                    field=f"{field}[{len(turns) - 1}].role", reason="no_assistant_turn")
  return tuple(turns)


def _tldr_post(record: dict, source: Source, prefix: str = "") -> tuple[str, Span]:
  """The TL;DR prompt of a record holding subreddit, title and post."""
  def text(name, nonempty):
    return _string(_require(record, name, source, prefix + name), prefix + name, source,
                   nonempty=nonempty, what="prompt")
  return tldr_prompt(text("subreddit", False), text("title", False), text("post", True))


def parse_demonstration(record: dict, source: Source) -> Demonstration:
  record = _object(record, "<record>", source)
  if "messages" in record:
    turns = _messages(record["messages"], "messages", source)
    if not any(role == "assistant" for role, _ in turns):
      raise DataError("a chat demonstration needs at least one assistant turn",
                      source=source, field="messages", reason="no_assistant_turn")
    return Demonstration(messages=turns, source=source)
  if "post" in record and "summary" in record:  # filtered TL;DR
    prompt, cut = _tldr_post(record, source)
    summary = _string(record["summary"], "summary", source, nonempty=True, what="response")
    return Demonstration(prompt, tldr_summary(summary), source=source, prompt_cut=cut)
  if "completion" in record:  # TRL's prompt-completion layouts
    prompt = _require(record, "prompt", source)
    if isinstance(prompt, list) or isinstance(record["completion"], list):
      turns = (_messages(prompt, "prompt", source)
               + _messages(record["completion"], "completion", source,
                           ends_with_assistant=True))
      return Demonstration(messages=turns, source=source, final_turn_only=True)
    return Demonstration(_string(prompt, "prompt", source),
                         _string(record["completion"], "completion", source,
                                 nonempty=True, what="response"), source=source)
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
  if "summaries" in record or "choice" in record:  # OpenAI's summarize-from-feedback
    info = _object(_require(record, "info", source), "info", source)
    prompt, cut = _tldr_post(info, source, "info.")
    summaries = _require(record, "summaries", source)
    if not isinstance(summaries, list):
      raise DataError(f"expected a list of {{text}} objects, got {type(summaries).__name__}",
                      source=source, field="summaries", reason="wrong_type")
    texts = []
    for i, summary in enumerate(summaries):
      path = f"summaries[{i}]"
      summary = _object(summary, path, source)
      texts.append(tldr_summary(_string(_require(summary, "text", source, f"{path}.text"),
                                        f"{path}.text", source, nonempty=True,
                                        what="response")))
    if len(texts) < 2:
      raise DataError(f"a comparison needs at least 2 summaries, got {len(texts)}",
                      source=source, field="summaries", reason="too_few_responses")
    choice = _require(record, "choice", source)
    if not isinstance(choice, int) or isinstance(choice, bool) or not 0 <= choice < len(texts):
      raise DataError(f"expected the index of the preferred summary (0 to "
                      f"{len(texts) - 1}), got {json.dumps(choice)}", source=source,
                      field="choice", reason="wrong_type")
    ranks = tuple(0 if i == choice else 1 for i in range(len(texts)))
    return Ranking(prompt, tuple(texts), ranks, source, prompt_cut=cut)
  if "chosen" in record or "rejected" in record:
    chosen, rejected = _require(record, "chosen", source), _require(record, "rejected", source)
    if isinstance(chosen, list) or isinstance(rejected, list):  # TRL's conversational
      chosen = _messages(chosen, "chosen", source, ends_with_assistant=True)
      rejected = _messages(rejected, "rejected", source, ends_with_assistant=True)
      if "prompt" in record:
        prompt = _messages(record["prompt"], "prompt", source)
      else:  # the shared prompt is the messages both conversations start with
        n = 0
        while n < min(len(chosen), len(rejected)) - 1 and chosen[n] == rejected[n]:
          n += 1
        if n == 0:
          raise DataError("the two conversations share no first message, so the prompt "
                          "cannot be found (or give it as 'prompt')", source=source,
                          field="chosen", reason="no_shared_prompt")
        prompt, chosen, rejected = chosen[:n], chosen[n:], rejected[n:]
      return Ranking("", (), (0, 1), source, prompt_messages=prompt,
                     response_messages=(chosen, rejected))
    chosen = _string(chosen, "chosen", source, nonempty=True, what="response")
    rejected = _string(rejected, "rejected", source, nonempty=True, what="response")
    if "prompt" in record:
      prompt = _string(record["prompt"], "prompt", source)
    else:
      prompt, chosen, rejected = split_hh_transcripts(chosen, rejected, source)
    return Ranking(prompt, (chosen, rejected), (0, 1), source)
  raise DataError("expected 'responses' and 'ranks', 'chosen' and 'rejected', or "
                  "'info', 'summaries' and 'choice'", source=source, field="responses",
                  reason="missing_field")


def parse_prompt(record: dict, source: Source) -> Prompt:
  record = _object(record, "<record>", source)
  if "prompt" not in record and "post" in record:  # TL;DR
    prompt, cut = _tldr_post(record, source)
    meta = {k: v for k, v in record.items() if k not in ("subreddit", "title", "post")}
    return Prompt(prompt, meta or None, source, prompt_cut=cut)
  prompt = _require(record, "prompt", source)
  meta = {k: v for k, v in record.items() if k != "prompt"} or None
  if isinstance(prompt, list):
    turns = _messages(prompt, "prompt", source)
    if turns[-1][0] == "assistant":
      raise DataError("the last message is the assistant's; a prompt ends where the policy "
                      "answers", source=source, field=f"prompt[{len(turns) - 1}].role",
                      reason="wrong_type")
    return Prompt("", meta, source, messages=turns)
  prompt = _string(prompt, "prompt", source, nonempty=True, what="prompt")
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

def _json_rows(path: str, plain_text: bool) -> Iterator[tuple[Source, Callable[[], Any] | None]]:
  """(source, record loader) per line; None for a blank line."""
  for number, raw in sources.raw_lines(path):
    source = Source(path, number)
    if not raw.strip():
      yield source, None
    elif plain_text:
      yield source, (lambda raw=raw, source=source: _plain_text(raw, source))
    else:
      yield source, (lambda raw=raw, source=source: sources.decode_json_line(raw, source))


def _plain_text(raw: bytes, source: Source) -> Text:
  try:
    return Text(raw.decode("utf-8"), source)
  except UnicodeDecodeError as e:
    raise DataError(f"not valid UTF-8 ({e.reason} at byte {e.start})",
                    source=source, field="text", reason="not_utf8") from None


def iter_file(kind: str, path: str, *, skip_invalid: bool = False,
              stats: DataStats | None = None,
              fields: Mapping[str, str] | None = None) -> Iterator[Example]:
  """Yields the examples of one JSONL, Parquet or Arrow file (or .txt file for kind
  'text'); `fields` renames record keys first (see `rename_fields`)."""
  if kind not in PARSERS:
    raise ValueError(f"unknown data kind {kind!r}; expected one of {KINDS}")
  stats = stats if stats is not None else DataStats()
  fields = sources.check_fields(fields)
  parse = PARSERS[kind]
  plain_text = kind == "text" and path.endswith(".txt")
  rows = sources.table_rows(path) if sources.is_table(path) else _json_rows(path, plain_text)
  for source, load in rows:
    if load is None:
      stats.add("ignored/blank_lines")
      continue
    try:
      record = load()
      if isinstance(record, Text):
        example = record
      else:
        example = parse(sources.rename_fields(record, fields, source), source)
    except DataError as e:
      mapped_from = {dst: src for src, dst in fields.items()}.get(e.field)
      if mapped_from is not None and e.reason == "missing_field":
        e = DataError(f"missing required field {mapped_from!r}, which the field mapping "
                      f"renames to {e.field!r}", source=source, field=mapped_from,
                      reason=e.reason)
      if not skip_invalid:
        raise e from None
      stats.skip(e.reason, str(e))
      continue
    stats.add("examples_read")
    yield example


def expand_paths(paths: str | Sequence[str]) -> list[str]:
  """Files named by paths, glob patterns or directories (their *.jsonl, *.txt,
  *.parquet and *.arrow files)."""
  if isinstance(paths, (str, os.PathLike)):
    paths = [paths]
  files = []
  for path in map(os.fspath, paths):
    if os.path.isdir(path):
      found = sorted(f for ext in ("*.jsonl", "*.txt", "*.parquet", "*.arrow")
                     for f in glob.glob(os.path.join(path, ext)))
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
                  stats: DataStats | None = None,
                  fields: Mapping[str, str] | None = None) -> list[Example]:
  """Parses every example of `paths` into memory; see `iter_file`."""
  examples = []
  for path in expand_paths(paths):
    examples.extend(iter_file(kind, path, skip_invalid=skip_invalid, stats=stats,
                              fields=fields))
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
