"""The layouts of the field's reference datasets, tokenised with a byte-level BPE
tokenizer (tests/bpe_tokenizer.py): TL;DR posts and comparisons, TRL's conversational
preferences and prompt-completion chats; Parquet and Arrow files; field mapping."""

import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from jaxrlhf import data
from jaxrlhf import data_lib
from jaxrlhf.data import formats
from jaxrlhf.data import tokenize
from tests import bpe_tokenizer as bpe

POST = " ".join(bpe.ENGLISH[:12])  # about 100 tokens
TLDR = {"id": "t3_1", "subreddit": "relationships", "title": "My landlord", "post": POST,
        "summary": "landlord ignores the heater"}
COMPARISON = {"info": {"id": "t3_1", "post": POST, "title": "My landlord",
                       "subreddit": "relationships"},
              "summaries": [{"text": " landlord ignores me", "policy": "sup1"},
                            {"text": "the heater is broken", "policy": "sup2"}],
              "choice": 1, "worker": "w1", "batch": "batch3", "split": "train"}
CHAT = [{"role": "user", "content": "My sister laughed at the rent increase."},
        {"role": "assistant", "content": "Our cat never mentioned the garden fence."},
        {"role": "user", "content": "My best friend forgot about a missing package."}]
CHOSEN = {"role": "assistant", "content": "A coworker finally answered."}
REJECTED = {"role": "assistant", "content": "Our neighbour laughed at the weekly meeting."}


def _text(tokenizer, ids, mask):
  return tokenizer.decode(np.asarray(ids)[np.asarray(mask) == 1])


def test_tldr_post_is_shortened_and_the_template_kept(bpe_tokenizer):
  encoder = tokenize.Encoder(bpe_tokenizer)
  example = formats.parse_demonstration(TLDR, formats.Source("tldr.jsonl", 1))
  assert example.prompt == (f"SUBREDDIT: r/relationships\n\nTITLE: My landlord\n\nPOST: "
                            f"{POST}\n\nTL;DR:")
  assert example.response == " landlord ignores the heater"
  lengths = tokenize.Lengths(prompt=40, response=16)
  out = tokenize.tokenize_demonstration(example, encoder, lengths)
  prompt = _text(bpe_tokenizer, out["input_ids"], out["prompt_mask"])
  response = _text(bpe_tokenizer, out["input_ids"], out["response_mask"])
  assert out["_stats"]["truncated/prompt"] == 1
  assert np.sum(out["prompt_mask"]) == 40
  assert prompt.startswith("SUBREDDIT: r/relationships\n\nTITLE: My landlord\n\nPOST: My "
                           "landlord keeps ignoring")
  assert prompt.endswith("\n\nTL;DR:") and len(prompt) < len(example.prompt)
  assert POST.startswith(prompt[prompt.index("POST: ") + 6:-len("\n\nTL;DR:")].strip())
  assert response == " landlord ignores the heater<|endoftext|>"
  # A prompt that fits is the whole text; the loss falls on the summary and its EOS.
  full = tokenize.tokenize_demonstration(example, encoder, tokenize.Lengths(prompt=256))
  assert _text(bpe_tokenizer, full["input_ids"], full["prompt_mask"]) == example.prompt
  assert full["_stats"]["truncated/prompt"] == 0
  np.testing.assert_array_equal(full["loss_mask"], full["response_mask"])


def test_tldr_template_longer_than_the_budget_is_a_bad_line(bpe_tokenizer):
  example = formats.parse_demonstration(TLDR, formats.Source("tldr.jsonl", 7))
  with pytest.raises(data.DataError, match=r"tldr.jsonl, line 7, field 'prompt': the prompt "
                                           r"without its post takes \d+ tokens, more than "
                                           r"the prompt budget of 12"):
    tokenize.tokenize_demonstration(example, tokenize.Encoder(bpe_tokenizer),
                                    tokenize.Lengths(prompt=12))


def test_tldr_comparison_and_prompt(bpe_tokenizer):
  encoder = tokenize.Encoder(bpe_tokenizer)
  ranking = formats.parse_ranking(COMPARISON, formats.Source("comparisons.jsonl", 1))
  assert ranking.responses == (" landlord ignores me", " the heater is broken")
  assert ranking.ranks == (1, 0)  # choice 1 is preferred
  out = tokenize.tokenize_ranking(ranking, encoder, tokenize.Lengths(prompt=40, k_max=3))
  for i, summary in enumerate(ranking.responses):
    text = _text(bpe_tokenizer, out["input_ids"][i], out["attention_mask"][i])
    assert text.startswith("SUBREDDIT: r/relationships") and text.endswith(
        f"\n\nTL;DR:{summary}<|endoftext|>")
    assert out["input_ids"][i][out["end_index"][i]] == bpe_tokenizer.eos_token_id
  np.testing.assert_array_equal(out["pair_mask"][:2, :2], [[0, 0], [1, 0]])
  prompt = formats.parse_prompt(TLDR, formats.Source("prompts.jsonl", 1))
  assert prompt.meta == {"id": "t3_1", "summary": "landlord ignores the heater"}
  tokens = tokenize.tokenize_prompt(prompt, encoder, tokenize.Lengths(prompt=40))
  text = _text(bpe_tokenizer, tokens["prompt_ids"], tokens["prompt_mask"])
  assert text.startswith("SUBREDDIT:") and text.endswith("\n\nTL;DR:")
  assert tokens["prompt_mask"][0] == 1 and tokens["_stats"]["truncated/prompt"] == 1


@pytest.mark.parametrize("explicit_prompt", [False, True])
def test_conversational_preferences_score_the_final_assistant_turn(bpe_tokenizer,
                                                                   explicit_prompt):
  if explicit_prompt:
    record = {"prompt": CHAT, "chosen": [CHOSEN], "rejected": [REJECTED]}
  else:
    record = {"chosen": CHAT + [CHOSEN], "rejected": CHAT + [REJECTED]}
  ranking = formats.parse_ranking(record, formats.Source("prefs.jsonl", 1))
  assert ranking.prompt_messages == tuple((m["role"], m["content"]) for m in CHAT)
  assert ranking.k == 2 and ranking.ranks == (0, 1)
  out = tokenize.tokenize_ranking(ranking, tokenize.Encoder(bpe_tokenizer),
                                  tokenize.Lengths(prompt=64, response=24, k_max=2))
  rendered = bpe_tokenizer.apply_chat_template(CHAT, tokenize=False,
                                               add_generation_prompt=True)
  for i, turn in enumerate((CHOSEN, REJECTED)):
    assert _text(bpe_tokenizer, out["input_ids"][i], out["prompt_mask"][i]) == rendered
    assert (_text(bpe_tokenizer, out["input_ids"][i], out["response_mask"][i])
            == turn["content"] + "<|endoftext|>")
    assert out["input_ids"][i][out["end_index"][i]] == bpe_tokenizer.eos_token_id
  # The reward model's normalisation scores each response as one sequence.
  demos = ranking.as_demonstrations()
  assert [d.messages[-1][1] for d in demos] == [CHOSEN["content"], REJECTED["content"]]
  assert all(d.final_turn_only for d in demos)


def test_conversational_prompt_completion_trains_on_the_final_turn_only(bpe_tokenizer):
  encoder = tokenize.Encoder(bpe_tokenizer)
  lengths = tokenize.Lengths(prompt=64, response=24)
  final = formats.parse_demonstration({"prompt": CHAT, "completion": [CHOSEN]},
                                      formats.Source("chat.jsonl", 1))
  every = formats.parse_demonstration({"messages": CHAT + [CHOSEN]},
                                      formats.Source("chat.jsonl", 2))
  a, b = (tokenize.tokenize_demonstration(ex, encoder, lengths) for ex in (final, every))
  np.testing.assert_array_equal(a["input_ids"], b["input_ids"])
  assert _text(bpe_tokenizer, a["input_ids"], a["loss_mask"]) == (CHOSEN["content"]
                                                                  + "<|endoftext|>")
  # The 'messages' layout also trains on the earlier assistant turn.
  assert CHAT[1]["content"] in _text(bpe_tokenizer, b["input_ids"], b["loss_mask"])
  prompt = formats.parse_prompt({"prompt": CHAT, "id": 3}, formats.Source("p.jsonl", 1))
  tokens = tokenize.tokenize_prompt(prompt, encoder, lengths)
  assert _text(bpe_tokenizer, tokens["prompt_ids"], tokens["prompt_mask"]) == (
      bpe_tokenizer.apply_chat_template(CHAT, tokenize=False, add_generation_prompt=True))
  assert prompt.meta == {"id": 3}


RECORDS = {"demonstrations": [TLDR, {"prompt": CHAT, "completion": [CHOSEN]},
                              {"prompt": "q", "completion": "a"}],
           "rankings": [COMPARISON, {"chosen": CHAT + [CHOSEN], "rejected": CHAT + [REJECTED]}],
           "prompts": [TLDR, {"prompt": CHAT}]}


def _write_table(path, records):
  table = pa.Table.from_pylist(records)
  if str(path).endswith(".parquet"):
    pq.write_table(table, path)
  else:  # a Hugging Face dataset saved to disk: an Arrow IPC stream
    with pa.ipc.new_stream(str(path), table.schema) as writer:
      writer.write_table(table)
  return str(path)


@pytest.mark.parametrize("suffix", [".parquet", ".arrow"])
@pytest.mark.parametrize("kind", sorted(RECORDS))
def test_parquet_and_arrow_rows_read_as_the_jsonl_lines(tmp_path, kind, suffix):
  records = RECORDS[kind]
  jsonl = tmp_path / "data.jsonl"
  formats.write_jsonl(str(jsonl), records)
  from_jsonl = formats.read_examples(kind, str(jsonl))
  # One file per record: Arrow gives a table one schema, which mixed layouts do not share.
  files = [_write_table(tmp_path / f"part{i}{suffix}", [r]) for i, r in enumerate(records)]
  from_table = formats.read_examples(kind, files)
  assert [ex.source for ex in from_table] == [formats.Source(f, 1, "row") for f in files]
  strip = lambda ex: {k: v for k, v in vars(ex).items() if k not in ("source", "meta")}
  assert [strip(ex) for ex in from_table] == [strip(ex) for ex in from_jsonl]
  assert formats.read_examples(kind, str(tmp_path)) == formats.read_examples(
      kind, [str(jsonl)] + files)


def test_bad_rows_name_file_row_and_column_and_are_counted(tmp_path):
  path = _write_table(tmp_path / "demos.parquet", [
      {"prompt": "a", "response": "b"}, {"prompt": "c", "response": None},
      {"prompt": "d", "response": ""}, {"prompt": "e", "response": "f"}])
  with pytest.raises(data.DataError, match=rf"{path}, row 2, field 'response': expected a "
                                           "string, got NoneType"):
    formats.read_examples("demonstrations", path)
  stats = data.DataStats()
  kept = formats.read_examples("demonstrations", path, skip_invalid=True, stats=stats)
  assert [ex.source.line for ex in kept] == [1, 4]
  assert stats["skipped/wrong_type"] == 1 and stats["skipped/empty_response"] == 1
  missing = _write_table(tmp_path / "prompts.parquet", [{"question": "q"}])
  with pytest.raises(data.DataError, match=r"row 1, field 'prompt': missing required field "
                                           r"\(fields present: question\)"):
    formats.read_examples("prompts", missing)
  # Bytes that are not UTF-8 in a string column, as another writer may leave them.
  values = [b"fine", b"caf\xe9"]
  offsets = np.cumsum([0] + [len(v) for v in values]).astype(np.int32)
  bad = pa.Array.from_buffers(pa.string(), 2, [None, pa.py_buffer(offsets.tobytes()),
                                               pa.py_buffer(b"".join(values))])
  table = pa.table({"prompt": bad})
  bad_path = str(tmp_path / "bad.parquet")
  pq.write_table(table, bad_path)
  stats = data.DataStats()
  with pytest.raises(data.DataError, match=rf"{bad_path}, row 2, field 'prompt': not valid "
                                           "UTF-8"):
    formats.read_examples("prompts", bad_path)
  kept = formats.read_examples("prompts", bad_path, skip_invalid=True, stats=stats)
  assert [ex.prompt for ex in kept] == ["fine"] and stats["skipped/not_utf8"] == 1


def test_a_damaged_table_file_is_named(tmp_path):
  path = _write_table(tmp_path / "demos.parquet",
                      [{"prompt": "a", "response": "b"}] * 50)
  with open(path, "r+b") as f:
    f.truncate(len(f.read()) // 2)
  with pytest.raises(data.DataError, match=rf"{path}: not a readable parquet file, or a "
                                           "damaged one"):
    formats.read_examples("demonstrations", path, skip_invalid=True)


def test_field_mapping(write_lines):
  path = write_lines([{"question": "q1", "answer": "a1", "id": 1},
                      {"question": "q2", "answer": "a2", "id": 2}])
  fields = data_lib.field_mapping("question=prompt, answer=response")
  assert fields == {"question": "prompt", "answer": "response"}
  examples = formats.read_examples("demonstrations", path, fields=fields)
  assert [(ex.prompt, ex.response) for ex in examples] == [("q1", "a1"), ("q2", "a2")]
  examples, _ = data_lib.read("prompts", path, skip_invalid=False, fields="question=prompt")
  assert examples[0].meta == {"answer": "a1", "id": 1}
  # A mapped field the file lacks is named as the file names it.
  with pytest.raises(data.DataError, match=r"line 1, field 'query': missing required field "
                                           r"'query', which the field mapping renames to "
                                           r"'prompt'"):
    data_lib.read("prompts", path, skip_invalid=False, fields="query=prompt")
  clash = write_lines([{"question": "q", "prompt": "p"}], name="clash.jsonl")
  with pytest.raises(data.DataError, match="holds both 'question' and 'prompt'"):
    data_lib.read("prompts", clash, skip_invalid=False, fields="question=prompt")
  for bad in ("question", "question=", "a=prompt,b=prompt"):
    with pytest.raises(ValueError, match="config.data.fields|several fields map"):
      data_lib.field_mapping(bad)


def test_evaluation_encodes_parsed_prompts_as_training_does(bpe_tokenizer):
  from jaxrlhf import policy_lib
  from jaxrlhf.eval import preference
  encoder = tokenize.Encoder(bpe_tokenizer)
  chat = formats.parse_prompt({"prompt": CHAT}, formats.Source("p.jsonl", 1))
  tldr = formats.parse_prompt(TLDR, formats.Source("p.jsonl", 2))
  arrays = policy_lib.encode_prompts([chat, tldr, "plain text"], encoder, 40)
  for i, prompt in enumerate([chat, tldr, formats.Prompt("plain text")]):
    row = tokenize.tokenize_prompt(prompt, encoder, tokenize.Lengths(prompt=40, response=1))
    np.testing.assert_array_equal(arrays["prompt_ids"][i], row["prompt_ids"])
  # responses.jsonl keeps a chat prompt as the messages it was.
  assert preference._prompt_record(chat) == CHAT  # pylint: disable=protected-access
  assert preference._prompt_record(tldr) == tldr.prompt  # pylint: disable=protected-access
