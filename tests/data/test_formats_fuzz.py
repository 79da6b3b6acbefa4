"""Property-based bad input for every JSONL reader: random bytes, adversarial JSON built
from the formats' own field names, and valid lines cut or spliced. Each file either
parses (and its examples tokenise) or raises `DataError` naming the file and the line;
no other exception escapes and nothing hangs."""

import contextlib
import json
import os
import re
import signal
import tempfile

from hypothesis import HealthCheck, given, settings, strategies as st
import pytest

from jaxrlhf import data
from jaxrlhf.data import formats
from jaxrlhf.data import tokenize

MAX_EXAMPLES = 100  # per reader; TRIED counts what hypothesis actually ran
TRIED = {}
SETTINGS = settings(max_examples=MAX_EXAMPLES, deadline=None, database=None,
                    suppress_health_check=[HealthCheck.too_slow,
                                           HealthCheck.function_scoped_fixture])
PER_FILE_TIMEOUT_S = 20  # a parse that takes longer counts as a hang

FIELDS = ["prompt", "response", "responses", "ranks", "chosen", "rejected", "text",
          "messages", "role", "content", "meta", "x", "completion", "subreddit", "title",
          "post", "summary", "info", "summaries", "choice"]
HH = [formats.HH_HUMAN, formats.HH_ASSISTANT, "\n\n", "Human:", "Assistant:"]

text = st.one_of(
    st.text(max_size=30),
    st.lists(st.sampled_from(HH + ["a", "b c", " ", "\u2028", "\udc80", "\x00"]),
             max_size=8).map("".join))
scalars = st.one_of(st.none(), st.booleans(), st.integers(-2**70, 2**70),
                    st.floats(allow_nan=True, allow_infinity=True), text)
json_values = st.recursive(
    scalars,
    lambda inner: st.one_of(st.lists(inner, max_size=10),
                            st.dictionaries(st.sampled_from(FIELDS) | st.text(max_size=5),
                                            inner, max_size=6)),
    max_leaves=30)
records = st.dictionaries(st.sampled_from(FIELDS), json_values, max_size=6)
chat = st.fixed_dictionaries({"messages": st.lists(st.fixed_dictionaries({
    "role": st.sampled_from(["system", "user", "assistant", "tool", "", "USER"]) | text,
    "content": text | json_values}), max_size=6)})
rankings = st.fixed_dictionaries({
    "prompt": text, "responses": st.lists(text, max_size=12),
    "ranks": st.lists(st.integers(-3, 12) | st.booleans() | st.floats(), max_size=12)})


messages = st.lists(st.fixed_dictionaries({
    "role": st.sampled_from(["user", "assistant", "system"]) | text,
    "content": text | json_values}), max_size=4)
# TL;DR posts and comparisons; TRL's conversational preferences and prompt-completions.
tldr = st.fixed_dictionaries({"subreddit": text, "title": text, "post": text | json_values},
                             optional={"summary": text | json_values})
comparison = st.fixed_dictionaries({
    "info": st.fixed_dictionaries({"subreddit": text, "title": text, "post": text})
            | json_values,
    "summaries": st.lists(st.fixed_dictionaries({"text": text | json_values}) | json_values,
                          max_size=4),
    "choice": st.integers(-2, 4) | json_values})
conversational = st.fixed_dictionaries({"chosen": messages, "rejected": messages},
                                       optional={"prompt": messages})
prompt_completion = st.fixed_dictionaries({"prompt": messages | text,
                                           "completion": messages | text})


def _dumps(value) -> bytes:
  try:
    return json.dumps(value, ensure_ascii=bool(hash(str(value)) % 2)).encode(
        "utf-8", errors="surrogatepass")
  except (ValueError, TypeError):
    return b"{}"


json_lines = st.one_of(records, chat, rankings, tldr, comparison, conversational,
                       prompt_completion, json_values).map(_dumps)
# Valid-looking lines cut at a random byte or with random bytes spliced in.
mangled = st.tuples(json_lines, st.integers(0, 200), st.binary(max_size=6)).map(
    lambda t: t[0][:t[1]] + t[2] + t[0][t[1]:] if t[2] else t[0][:t[1]])
lines = st.one_of(st.binary(max_size=60).map(lambda b: b.replace(b"\n", b" ")),
                  json_lines, mangled)
files = st.lists(lines, min_size=1, max_size=6)


@contextlib.contextmanager
def _no_hang(seconds):
  def _raise(signum, frame):
    raise TimeoutError(f"parsing took more than {seconds}s")

  previous = signal.signal(signal.SIGALRM, _raise)
  signal.setitimer(signal.ITIMER_REAL, seconds)
  try:
    yield
  finally:
    signal.setitimer(signal.ITIMER_REAL, 0)
    signal.signal(signal.SIGALRM, previous)


def _write(body: list[bytes], suffix: str) -> str:
  fd, path = tempfile.mkstemp(suffix=suffix)
  with os.fdopen(fd, "wb") as f:
    f.write(b"\n".join(b.replace(b"\n", b" ").replace(b"\r", b" ") for b in body))
  return path


def _check_error(error: formats.DataError, path: str, num_lines: int):
  message = str(error)
  assert message.startswith(f"{path}, line "), message
  line = int(re.match(rf"{re.escape(path)}, line (\d+)", message).group(1))
  assert 1 <= line <= num_lines, message


@pytest.fixture(scope="module")
def encoder(tokenizer):
  return tokenize.Encoder(tokenizer)


@pytest.mark.parametrize("kind,suffix", [(k, ".jsonl") for k in formats.KINDS]
                         + [("text", ".txt")])
def test_readers_parse_or_name_file_and_line(encoder, kind, suffix):
  lengths = tokenize.Lengths(prompt=8, response=8, text=8, k_max=4)

  @SETTINGS
  @given(body=files)
  def check(body):
    TRIED[f"{kind}{suffix}"] = TRIED.get(f"{kind}{suffix}", 0) + 1
    path = _write(body, suffix)
    try:
      with _no_hang(PER_FILE_TIMEOUT_S):
        try:
          examples = data.read_examples(kind, path)
        except formats.DataError as e:
          _check_error(e, path, len(body))
          examples = []
        stats = data.DataStats()
        skipped = data.read_examples(kind, path, skip_invalid=True, stats=stats)
        assert len(skipped) + stats.num_skipped <= len(body)
        for example in examples:
          try:
            tokenize.TOKENIZERS[kind](example, encoder, lengths)
          except formats.DataError as e:
            _check_error(e, path, len(body))
    finally:
      os.unlink(path)

  check()
  print(f"fuzz: {TRIED[f'{kind}{suffix}']} files of random and adversarial lines "
        f"through the {kind} reader ({suffix})")


def test_eval_json_records_reader():
  from jaxrlhf.eval import files as eval_files  # pylint: disable=g-import-not-at-top

  @SETTINGS
  @given(body=files, as_array=st.booleans())
  def check(body, as_array):
    TRIED["eval.read_json_records"] = TRIED.get("eval.read_json_records", 0) + 1
    if as_array:
      body = [b"["] + [b + b"," for b in body[:-1]] + [body[-1], b"]"]
    path = _write(body, ".jsonl")
    try:
      with _no_hang(PER_FILE_TIMEOUT_S):
        try:
          eval_files.read_json_records(path)
        except formats.DataError as e:
          _check_error(e, path, len(body))
    finally:
      os.unlink(path)

  check()
  print(f"fuzz: {TRIED['eval.read_json_records']} files through eval.files.read_json_records")


@pytest.mark.parametrize("kind,record", [
    ("prompts", {"prompt": "\udc80"}),
    ("demonstrations", {"prompt": "a", "response": "b\ud800"}),
    ("demonstrations", {"messages": [{"role": "user", "content": "\udfff"},
                                     {"role": "assistant", "content": "b"}]}),
    ("rankings", {"prompt": "p", "responses": ["a", "\udc80"], "ranks": [0, 1]}),
    ("rankings", {"chosen": [{"role": "user", "content": "q"},
                             {"role": "assistant", "content": "\udc80"}],
                  "rejected": [{"role": "user", "content": "q"},
                               {"role": "assistant", "content": "b"}]}),
    ("rankings", {"info": {"subreddit": "r", "title": "\ud800", "post": "p"},
                  "summaries": [{"text": "a"}, {"text": "b"}], "choice": 0}),
    ("demonstrations", {"subreddit": "r", "title": "t", "post": "p", "summary": "\udfff"}),
    ("prompts", {"prompt": [{"role": "user", "content": "\udc80"}]}),
    ("text", {"text": "x\udc80"})])
def test_unpaired_surrogate_escapes_are_data_errors(write_lines, kind, record):
  # Valid JSON and valid UTF-8 on disk, but no text: the tokenizer raised TypeError.
  path = write_lines([json.dumps(record)])
  with pytest.raises(formats.DataError, match=rf"{re.escape(path)}, line 1, field"):
    data.read_examples(kind, path)
