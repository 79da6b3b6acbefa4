"""Parsing of every JSONL format, and the error each kind of bad input gets."""

import re

import pytest

from jaxrlhf import data
from jaxrlhf.data import formats


def test_demonstration_prompt_response(write_lines):
  path = write_lines([{"prompt": "sort : b a ->", "response": "a b", "id": 7}])
  (example,) = data.read_examples("demonstrations", path)
  assert example == data.Demonstration("sort : b a ->", "a b", source=data.Source(path, 1))
  assert not example.is_chat


def test_demonstration_chat(write_lines):
  messages = [{"role": "system", "content": "be brief"},
              {"role": "user", "content": "sort : b a ->"},
              {"role": "assistant", "content": "a b"}]
  (example,) = data.read_examples("demonstrations", write_lines([{"messages": messages}]))
  assert example.is_chat
  assert example.messages == (("system", "be brief"), ("user", "sort : b a ->"),
                              ("assistant", "a b"))


def test_ranking_k_way_with_ties(write_lines):
  record = {"prompt": "p", "responses": ["a", "b", "c", "d"], "ranks": [1, 0, 1, 2]}
  (example,) = data.read_examples("rankings", write_lines([record]))
  assert example.responses == ("a", "b", "c", "d")
  assert example.ranks == (1, 0, 1, 2)
  assert example.k == 4


def test_ranking_pairwise(write_lines):
  (example,) = data.read_examples(
      "rankings", write_lines([{"prompt": "p", "chosen": "good", "rejected": "bad"}]))
  assert (example.prompt, example.responses, example.ranks) == ("p", ("good", "bad"), (0, 1))


def test_hh_transcripts_split_at_final_shared_assistant_turn(write_lines):
  shared = "\n\nHuman: hi\n\nAssistant: hello\n\nHuman: tell me a joke\n\nAssistant:"
  record = {"chosen": shared + " Why did the chicken cross the road?",
            "rejected": shared + " No."}
  (example,) = data.read_examples("rankings", write_lines([record]))
  assert example.prompt == shared
  assert example.responses == (" Why did the chicken cross the road?", " No.")
  assert example.ranks == (0, 1)


def test_hh_transcripts_whose_answers_share_a_prefix():
  shared = "\n\nHuman: q\n\nAssistant:"
  prompt, chosen, rejected = data.split_hh_transcripts(
      shared + " Sure, here", shared + " Sure, no", data.Source("f", 1))
  assert prompt == shared
  assert (chosen, rejected) == (" Sure, here", " Sure, no")


def test_hh_transcripts_diverging_before_the_last_turn():
  # Only the first assistant turn is shared, so the rest of each transcript is its response.
  chosen = "\n\nHuman: a\n\nAssistant: x\n\nHuman: b\n\nAssistant: y"
  rejected = "\n\nHuman: a\n\nAssistant: x\n\nHuman: c\n\nAssistant: z"
  prompt, chosen_response, rejected_response = data.split_hh_transcripts(
      chosen, rejected, data.Source("f", 1))
  assert prompt == "\n\nHuman: a\n\nAssistant:"
  assert chosen_response.startswith(" x\n\nHuman: b")
  assert rejected_response.startswith(" x\n\nHuman: c")


def test_prompts_keep_other_fields_as_meta(write_lines):
  path = write_lines([{"prompt": "sort : b a ->", "task": "sort", "items": ["b", "a"]},
                      {"prompt": "plain"}])
  first, second = data.read_examples("prompts", path)
  assert first.meta == {"task": "sort", "items": ["b", "a"]}
  assert second.meta is None


def test_text_jsonl_and_txt(write_lines):
  jsonl = write_lines([{"text": "one"}, {"text": "two"}])
  txt = write_lines(["first doc", "", "second doc"], name="corpus.txt")
  stats = data.DataStats()
  texts = data.read_examples("text", [jsonl, txt], stats=stats)
  assert [t.text for t in texts] == ["one", "two", "first doc", "second doc"]
  assert texts[3].source == data.Source(txt, 3)
  assert stats["ignored/blank_lines"] == 1


def test_directories_and_globs(tmp_path, write_lines):
  write_lines([{"text": "a"}], name="train-0.jsonl")
  write_lines([{"text": "b"}], name="train-1.jsonl")
  assert len(data.read_examples("text", str(tmp_path))) == 2
  assert len(data.read_examples("text", str(tmp_path / "train-*.jsonl"))) == 2
  with pytest.raises(FileNotFoundError):
    data.read_examples("text", str(tmp_path / "nothing-*.jsonl"))


GOOD_RANKING = {"prompt": "p", "responses": ["a", "b"], "ranks": [0, 1]}

# (kind, bad line, field named in the error, reason counted when skipping)
BAD_INPUTS = [
    ("rankings", '{"prompt": "p", "responses": ["a", "b"], "ranks": [0, 1]',
     "<json>", "malformed_json"),
    ("rankings", {"responses": ["a", "b"], "ranks": [0, 1]}, "prompt", "missing_field"),
    ("rankings", {"prompt": "p", "responses": ["a", "b"]}, "ranks", "missing_field"),
    ("rankings", {"prompt": 3, "responses": ["a", "b"], "ranks": [0, 1]}, "prompt",
     "wrong_type"),
    ("rankings", {"prompt": "p", "responses": "a", "ranks": [0, 1]}, "responses",
     "wrong_type"),
    ("rankings", {"prompt": "p", "responses": ["a", 5], "ranks": [0, 1]}, "responses[1]",
     "wrong_type"),
    ("rankings", {"prompt": "p", "responses": ["a", "b"], "ranks": [0, "1"]}, "ranks[1]",
     "wrong_type"),
    ("rankings", {"prompt": "p", "responses": ["a", ""], "ranks": [0, 1]}, "responses[1]",
     "empty_response"),
    ("rankings", {"prompt": "p", "responses": ["a", "b", "c"], "ranks": [0, 1]}, "ranks",
     "ranks_length"),
    ("rankings", {"prompt": "p", "responses": ["a", "b", "c"], "ranks": [1, 1, 1]}, "ranks",
     "too_few_distinct_ranks"),
    ("rankings", {"prompt": "p", "responses": ["a"], "ranks": [0]}, "responses",
     "too_few_responses"),
    ("rankings", {"prompt": "p", "chosen": "a", "rejected": " "}, "rejected",
     "empty_response"),
    ("rankings", {"chosen": "no markers", "rejected": "at all"}, "chosen",
     "hh_no_shared_turn"),
    ("rankings", {"chosen": "\n\nHuman: q\n\nAssistant:", "rejected": "\n\nHuman: q\n\nAssistant: b"},
     "chosen", "empty_response"),
    ("rankings", b'{"prompt": "p", "responses": ["a", "b\xff\xfe"], "ranks": [0, 1]}',
     "responses[1]", "not_utf8"),
    ("demonstrations", {"prompt": "p", "response": ""}, "response", "empty_response"),
    ("demonstrations", {"prompt": "p"}, "response", "missing_field"),
    ("demonstrations", {"prompt": "p", "response": ["x"]}, "response", "wrong_type"),
    ("demonstrations", {"messages": [{"role": "user", "content": "hi"}]}, "messages",
     "no_assistant_turn"),
    ("demonstrations", {"messages": [{"role": "user"}, {"role": "assistant", "content": "x"}]},
     "messages[0].content", "missing_field"),
    ("demonstrations", {"messages": [{"role": "user", "content": "q"},
                                     {"role": "assistant", "content": ""}]},
     "messages[1].content", "empty_response"),
    ("prompts", {"text": "p"}, "prompt", "missing_field"),
    ("prompts", b'{"prompt": "caf\xe9"}', "prompt", "not_utf8"),
    ("text", {"text": None}, "text", "wrong_type"),
    ("text", "[1, 2]", "<record>", "wrong_type"),
    # TL;DR (filtered posts; OpenAI's comparisons) and TRL's conversational layouts.
    ("demonstrations", {"subreddit": "r", "title": "t", "post": " ", "summary": "s"}, "post",
     "empty_prompt"),
    ("demonstrations", {"subreddit": "r", "post": "p", "summary": "s"}, "title",
     "missing_field"),
    ("demonstrations", {"subreddit": "r", "title": "t", "post": "p", "summary": 3}, "summary",
     "wrong_type"),
    ("demonstrations", {"prompt": [{"role": "user", "content": "q"}],
                        "completion": [{"role": "user", "content": "x"}]},
     "completion[0].role", "no_assistant_turn"),
    ("demonstrations", {"prompt": "q", "completion": ""}, "completion", "empty_response"),
    ("demonstrations", b'{"subreddit": "r", "title": "t\xc3", "post": "p", "summary": "s"}',
     "title", "not_utf8"),
    ("rankings", {"info": {"subreddit": "r", "title": "t"}, "choice": 0,
                  "summaries": [{"text": "a"}, {"text": "b"}]}, "info.post", "missing_field"),
    ("rankings", {"info": {"subreddit": "r", "title": "t", "post": "p"}, "choice": "1",
                  "summaries": [{"text": "a"}, {"text": "b"}]}, "choice", "wrong_type"),
    ("rankings", {"info": {"subreddit": "r", "title": "t", "post": "p"}, "choice": 0,
                  "summaries": [{"text": "a"}, {"text": ""}]}, "summaries[1].text",
     "empty_response"),
    ("rankings", {"info": {"subreddit": "r", "title": "t", "post": "p"}, "choice": 0,
                  "summaries": [{"text": "a"}]}, "summaries", "too_few_responses"),
    ("rankings", {"info": "p", "choice": 0, "summaries": []}, "info", "wrong_type"),
    ("rankings", {"chosen": [{"role": "user", "content": "q"},
                             {"role": "assistant", "content": "a"}],
                  "rejected": [{"role": "user", "content": "z"},
                               {"role": "assistant", "content": "b"}]},
     "chosen", "no_shared_prompt"),
    ("rankings", {"chosen": [{"role": "user", "content": "q"},
                             {"role": "assistant", "content": " "}],
                  "rejected": [{"role": "user", "content": "q"},
                               {"role": "assistant", "content": "b"}]},
     "chosen[1].content", "empty_response"),
    ("rankings", {"prompt": [{"role": "user", "content": "q"}],
                  "chosen": [{"role": "assistant", "content": "a"}],
                  "rejected": [{"role": "assistant"}]},
     "rejected[0].content", "missing_field"),
    ("rankings", b'{"prompt": [{"role": "user", "content": "q\xff"}], '
                 b'"chosen": [{"role": "assistant", "content": "a"}], '
                 b'"rejected": [{"role": "assistant", "content": "b"}]}',
     "prompt[0].content", "not_utf8"),
    ("prompts", {"prompt": [{"role": "user", "content": "q"},
                            {"role": "assistant", "content": "a"}]},
     "prompt[1].role", "wrong_type"),
    ("prompts", {"prompt": []}, "prompt", "wrong_type"),
    ("prompts", {"subreddit": "r", "title": "t", "post": 5}, "post", "wrong_type"),
    # Lines cut short.
    ("demonstrations", '{"subreddit": "r", "title": "t", "post": "p", "summ', "<json>",
     "malformed_json"),
    ("rankings", '{"info": {"subreddit": "r", "title": "t", "post": "p"}, "summaries": [',
     "<json>", "malformed_json"),
    ("rankings", '{"chosen": [{"role": "user", "content": "q"}], "rejected": [{"ro', "<json>",
     "malformed_json"),
]


@pytest.mark.parametrize("kind,bad,field,reason", BAD_INPUTS,
                         ids=[f"{k}-{r}-{i}" for i, (k, _, _, r) in enumerate(BAD_INPUTS)])
def test_bad_input_error_names_file_line_and_field(write_lines, kind, bad, field, reason):
  good = GOOD_RANKING if kind == "rankings" else {
      "demonstrations": {"prompt": "p", "response": "r"}, "prompts": {"prompt": "p"},
      "text": {"text": "t"}}[kind]
  path = write_lines([good, good, bad, good])
  with pytest.raises(data.DataError) as info:
    data.read_examples(kind, path)
  error = info.value
  assert error.source == data.Source(path, 3)
  assert error.field == field
  assert error.reason == reason
  message = str(error)
  assert path in message and "line 3" in message and f"'{field}'" in message


@pytest.mark.parametrize("kind,bad,field,reason", BAD_INPUTS,
                         ids=[f"{k}-{r}-{i}" for i, (k, _, _, r) in enumerate(BAD_INPUTS)])
def test_skip_invalid_counts_instead(write_lines, kind, bad, field, reason):
  del field
  good = GOOD_RANKING if kind == "rankings" else {
      "demonstrations": {"prompt": "p", "response": "r"}, "prompts": {"prompt": "p"},
      "text": {"text": "t"}}[kind]
  path = write_lines([good, bad, good, bad])
  stats = data.DataStats()
  examples = data.read_examples(kind, path, skip_invalid=True, stats=stats)
  assert [e.source.line for e in examples] == [1, 3]
  assert stats[f"skipped/{reason}"] == 2
  assert stats.num_skipped == 2
  assert stats["examples_read"] == 2
  assert f"skipped/{reason}=2" in stats.summary()


def test_non_utf8_plain_text(write_lines):
  path = write_lines([b"fine", b"bad \xff here"], name="corpus.txt")
  with pytest.raises(data.DataError, match=re.escape(f"{path}, line 2, field 'text'")):
    data.read_examples("text", path)


def test_bad_bytes_in_a_field_name_give_a_printable_message(write_lines):
  path = write_lines([{"prompt": "p"}, b'{"prompt": "p", "n\xd2me": 1}'])
  with pytest.raises(data.DataError, match=re.escape("field 'n\\xd2me'")) as error:
    data.read_examples("prompts", path)
  str(error.value).encode("utf-8")  # lone surrogates would raise UnicodeEncodeError


def test_ranks_reject_booleans_and_negatives():
  source = data.Source("f", 1)
  with pytest.raises(data.DataError, match="ranks\\[0\\]"):
    formats.parse_ranking({"prompt": "p", "responses": ["a", "b"], "ranks": [True, 0]}, source)
  with pytest.raises(data.DataError, match="ranks\\[1\\]"):
    formats.parse_ranking({"prompt": "p", "responses": ["a", "b"], "ranks": [0, -1]}, source)


def test_a_ranking_longer_than_k_max_is_a_bad_line_found_when_read(write_lines):
  from jaxrlhf import data_lib
  path = write_lines([
      {"prompt": "p", "responses": ["a", "b"], "ranks": [0, 1]},
      {"prompt": "q", "responses": ["a", "b", "c", "d"], "ranks": [0, 1, 2, 3]},
      {"prompt": "r", "responses": ["a", "b", "c"], "ranks": [2, 1, 0]},
  ])
  with pytest.raises(data.DataError, match=r"data.jsonl, line 2, field 'responses': 4 "
                                           r"responses, more than config.data.k_max=3.*"
                                           r"raise config.data.k_max"):
    data_lib.read("rankings", path, skip_invalid=False, k_max=3)
  examples, stats = data_lib.read("rankings", path, skip_invalid=True, k_max=3)
  assert [ex.prompt for ex in examples] == ["p", "r"]
  assert stats["skipped/too_many_responses"] == 1


def test_malformed_json_reads_as_a_sentence(write_lines):
  # json's own message may end in "at" ("Unterminated string starting at"): no "at at".
  path = write_lines([b'{"prompt": "p", "response": "unterminated'])
  with pytest.raises(data.DataError) as e:
    data.read_examples("demonstrations", path)
  assert str(e.value).endswith("line 1, field '<json>': malformed JSON: Unterminated "
                               "string starting at (column 29)"), str(e.value)
