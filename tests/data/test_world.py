"""The embedded instruction world: determinism, user splits, budgets, labeler, tokenizer."""

import filecmp
import json
import os

import numpy as np
import pytest

from jaxrlhf import data
from jaxrlhf.data import world
from jaxrlhf.data.world import labeler as labeler_lib
from jaxrlhf.data.world import tasks

TINY = world.WorldConfig(seed=0, scale=0.004, num_users=30, pretrain_documents=50_000)


@pytest.fixture(scope="module")
def world_dir(tmp_path_factory):
  out = str(tmp_path_factory.mktemp("world"))
  world.write_world(TINY, out)
  return out


def test_same_seed_same_world_other_seed_other_world(world_dir, tmp_path):
  again = str(tmp_path / "again")
  world.write_world(TINY, again)
  for dataset in ("pretrain", "sft", "flan", "rm", "ppo"):
    for name in os.listdir(os.path.join(world_dir, dataset)):
      assert filecmp.cmp(os.path.join(world_dir, dataset, name),
                         os.path.join(again, dataset, name), shallow=False), (dataset, name)
  other = world.generate_world(world.WorldConfig(**{**TINY.__dict__, "seed": 1}))
  same = world.generate_world(TINY)
  for dataset in other:
    for split in other[dataset]:
      assert other[dataset][split] != same[dataset][split], (dataset, split)


def test_sizes_follow_the_paper_times_scale(world_dir):
  summary = json.load(open(os.path.join(world_dir, "world.json")))
  assert summary["sizes"]["sft/train"] == round(13_000 * TINY.scale)
  assert summary["sizes"]["rm/train"] == round(33_000 * TINY.scale)
  assert summary["sizes"]["ppo/train"] == round(31_000 * TINY.scale)
  assert summary["sizes"]["ppo/test"] == round(31_000 * TINY.scale / 8)
  assert summary["vocab_size"] == len(tasks.VOCAB) == 64


def test_splits_are_by_user(world_dir):
  users = {}
  for split in ("train", "validation", "test"):
    users[split] = set()
    for dataset in ("sft", "rm", "ppo"):
      for record in map(json.loads, open(os.path.join(world_dir, dataset, f"{split}.jsonl"))):
        users[split].add(record["user"])
  assert not users["train"] & users["validation"]
  assert not users["train"] & users["test"]
  assert not users["validation"] & users["test"]
  all_tasks = {r["task"] for r in map(json.loads, open(os.path.join(world_dir, "rm/train.jsonl")))}
  assert len(all_tasks) >= 6


def test_world_files_load_through_the_ordinary_loaders_within_budget(world_dir, tokenizer):
  lengths = data.Lengths(prompt=TINY.max_prompt_len, response=TINY.max_response_len,
                         text=TINY.max_text_len)
  encoder = data.Encoder(tokenizer)
  unk = tokenizer.unk_token_id
  for kind, path in (("demonstrations", "sft/train.jsonl"), ("prompts", "ppo/test.jsonl"),
                     ("prompts", "rm/train.jsonl"), ("text", "pretrain/train.jsonl"),
                     ("demonstrations", "flan/train.jsonl")):
    stats = data.DataStats()
    examples = data.read_examples(kind, os.path.join(world_dir, path), stats=stats)
    assert stats.num_skipped == 0
    for example in examples:
      out = data.tokenize.TOKENIZERS[kind](example, encoder, lengths)
      assert not any(int(v) for v in out["_stats"].values()), (path, example)
      token_ids = out["prompt_ids"] if kind == "prompts" else out["input_ids"]
      assert unk not in token_ids.tolist()
  prompt = data.read_examples("prompts", os.path.join(world_dir, "ppo/test.jsonl"))[0]
  assert set(world.task_meta(prompt.meta)) == {"task", "items", "arg"}


def _statements(text):
  return [s.strip() + " ." for s in text.split(" .") if s.strip()]


def test_pretraining_text_states_facts_some_in_the_prompt_form_never_stopped(world_dir):
  texts = [json.loads(l)["text"] for l in open(os.path.join(world_dir, "pretrain/train.jsonl"))]
  assert len(texts) == round(TINY.pretrain_documents * TINY.scale)
  statements = [s for t in texts for s in _statements(t)]
  qa = [s for s in statements if tasks.PROMPT_END in s]
  web = [s for s in statements if " is " in s]
  assert len(qa) + len(web) > 0.85 * len(statements)
  # qa_text_rate of the task statements (not the bare lists), within 4 binomial SE.
  share, n = len(qa) / (len(qa) + len(web)), len(qa) + len(web)
  assert abs(share - TINY.qa_text_rate) < 4 * (0.3 * 0.7 / n) ** 0.5, share
  for statement in qa:  # "sort : 3 1 -> 1 3 .": a right answer, no user style, no stop
    prompt, answer = statement[:-2].split(f" {tasks.PROMPT_END} ")
    words = prompt.split()
    assert words[0] in tasks.TASKS and words[-1] not in tasks.PROMPT_WORDS
    meta = {"task": words[0], "arg": words[1] if words[2] == ":" else None,
            "items": words[words.index(":") + 1:]}
    assert answer.split() == tasks.answer(meta), statement
  assert not any(w in " ".join(texts).split() for w in ("<eos>",) + tasks.FILLER_WORDS
                 + tasks.PROMPT_WORDS)


def test_qa_text_rate_zero_keeps_instruction_format_out_of_pretraining():
  config = world.WorldConfig(**{**TINY.__dict__, "qa_text_rate": 0.0})
  texts = [d["text"] for d in world.generate_world(config)["pretrain"]["train"]]
  assert not any(tasks.PROMPT_END in t or " : " in t for t in texts)
  assert " ".join(texts).count(" is ") > 2 * len(texts)
  with pytest.raises(ValueError, match="qa_text_rate"):
    world.WorldConfig(qa_text_rate=1.5)


def test_public_tasks_are_every_task_in_academic_templates_answered_right(world_dir):
  # The FLAN/T0-style collection: SFT's size, tasks in turn, no user's phrasing, the right
  # answer with nothing after it.
  records = [json.loads(line) for line in open(os.path.join(world_dir, "flan/train.jsonl"))]
  sft = [json.loads(line) for line in open(os.path.join(world_dir, "sft/train.jsonl"))]
  assert len(records) == len(sft)
  counts = {t: sum(r["task"] == t for r in records) for t in tasks.TASKS}
  assert max(counts.values()) - min(counts.values()) <= 1
  user_prompts = {r["prompt"] for r in sft}
  for r in records:
    assert r["prompt"] == tasks.academic_prompt(r, r["template"])
    assert r["prompt"].endswith(tasks.PROMPT_END) and r["prompt"] not in user_prompts
    assert not r["prompt"].startswith(("please", "can you"))
    assert not r["prompt"].startswith(tasks.instruction(r) + " :")  # the users' bare form
    assert r["response"] == " ".join(tasks.answer(r)) and "user" not in r
  assert {r["template"] for r in records} == set(range(len(tasks.ACADEMIC_TEMPLATES)))


def test_demonstrations_are_mostly_right_but_imperfect(world_dir):
  records = [json.loads(l) for l in open(os.path.join(world_dir, "sft/train.jsonl"))]
  scores = np.array([world.score(world.task_meta(r), r["response"]) for r in records])
  assert 0.5 < np.mean(scores == 7) < 0.9
  assert np.mean(scores >= 5) > 0.9


@pytest.mark.parametrize("task", tasks.TASKS)
def test_labeler_scores_what_the_paper_asks_for(task):
  rng = np.random.default_rng(0)
  meta = tasks.sample_instance(task, rng)
  right = " ".join(tasks.answer(meta))
  assert world.score(meta, right) == 7
  assert world.score(meta, right + " . hope this helps") < 7           # adds something extra
  assert world.score(meta, right, stopped=False) < 7                     # does not stop
  assert world.score(meta, right + " <eos> junk", stopped=False) == 7    # stops at <eos>
  wrong = " ".join(tasks.corrupt(meta, tasks.answer(meta), rng))
  assert world.score(meta, wrong) < 7                                    # partial credit
  assert world.score(meta, wrong) > world.score(meta, "")
  assert world.score(meta, "") == 1 == world.score(meta, "please sort")


def test_labeler_constraints_get_credit_even_when_wrong():
  meta = {"task": "sort", "items": ["c", "a", "b"], "arg": None}
  sorted_but_wrong = labeler_lib.quality(meta, "a b d")
  unsorted_and_wrong = labeler_lib.quality(meta, "d b a")
  assert sorted_but_wrong > unsorted_and_wrong


def test_quality_terms_separate_filler_from_wrong_answers():
  meta = {"task": "reverse", "items": ["a", "b", "c"], "arg": None}
  filler = labeler_lib.quality_terms(meta, "c b a . hope this helps")
  assert filler["correct"] == 1.0 and filler["concise"] == 0.0 and filler["stopped"] == 1.0
  wrong = labeler_lib.quality_terms(meta, "a b c")
  assert wrong["correct"] < 1.0 and wrong["concise"] == 1.0
  assert labeler_lib.quality_terms(meta, "please") == dict.fromkeys(labeler_lib.WEIGHTS, 0.0)
  for response in ("c b a . hope this helps", "a b c", "c b", "please", "c b a"):
    terms = labeler_lib.quality_terms(meta, response)
    assert labeler_lib.quality(meta, response) == pytest.approx(
        sum(labeler_lib.WEIGHTS[k] * v for k, v in terms.items()))


def test_rankings_rank_zero_best_with_ties():
  assert world.ranks_from_ratings([5, 7, 5, 2]) == [1, 0, 1, 2]
  labeler = world.Labeler(noise_scale=0.0)
  meta = {"task": "reverse", "items": ["a", "b", "c"], "arg": None}
  ranks = labeler.rank(meta, ["c b a", "c b a . ok", "a", "c b a"], np.random.default_rng(0))
  assert ranks == [0, 1, 2, 0]


def test_responses_that_read_the_same_get_one_rating_and_tie():
  labeler = world.Labeler(noise_scale=3.0)  # Noisy enough that independent draws differ.
  meta = {"task": "reverse", "items": ["a", "b", "c"], "arg": None}
  rng = np.random.default_rng(0)
  for _ in range(50):
    ratings = labeler.ratings(meta, ["c b a", "a", "c b a <pad>", "c b a", "c b a <eos> x"],
                              rng, [True, True, True, False, False])
    # Padding and words after the stop are not read; a missing stop is.
    assert ratings[0] == ratings[2] == ratings[4]
    assert labeler.prefer(meta, "c b", "c b", rng) == 0.5
  # Distinct responses still get their own noise.
  many = [labeler.ratings(meta, ["c b a", "c b a . ok"], rng) for _ in range(50)]
  assert len({tuple(r) for r in many}) > 1


def test_rankings_agreement_is_measured_on_distinct_pairs_only():
  from jaxrlhf import rankings
  meta = {"task": "reverse", "items": ["a", "b", "c"], "arg": None}
  texts = ["c b a", "c b a <pad>", "a", "c b a", "a"]
  stopped = [True, True, True, False, True]
  pairs = rankings.distinct_comparisons(meta, texts, stopped)
  # 10 pairs; the same reading: (0, 1) and (2, 4). "c b a" unstopped differs from stopped.
  assert len(pairs) == 8
  assert all(labeler_lib.reading(*a) != labeler_lib.reading(*b) for _, a, b in pairs)


def test_reference_comparisons_pair_distinct_responses():
  for _, first, second in world.reference_comparisons(500, seed=3):
    assert labeler_lib.reading(*first) != labeler_lib.reading(*second)


def test_measured_agreement_is_within_3_points_of_the_configured_value():
  comparisons = world.reference_comparisons(2000, seed=123)
  for target in (0.73, 0.65):
    labeler = world.Labeler.calibrated(target, seed=0)
    measured = world.measure_agreement(labeler, comparisons, seed=7)
    assert abs(measured - target) < 0.03, (target, measured)
  assert world.WorldConfig().labeler() == world.Labeler.calibrated(0.73, 0)


def test_labeler_calibrates_on_given_comparisons():
  # Responses of a narrower mix than the reference: only right answers and slips.
  def comparisons(seed):
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(2000):
      meta = tasks.sample_instance(tasks.TASKS[int(rng.integers(8))], rng)
      right = " ".join(tasks.answer(meta))
      wrong = " ".join(tasks.corrupt(meta, tasks.answer(meta), rng))
      out.append((meta, (right, True), (wrong if rng.random() < 0.5 else right, True)))
    return out

  labeler = world.Labeler.calibrated_on(comparisons(1), agreement=0.73)
  assert abs(world.measure_agreement(labeler, comparisons(2)) - 0.73) < 0.03


def test_ranking_records_round_trip_through_the_rankings_loader(tmp_path, world_dir):
  prompts = [json.loads(l) for l in open(os.path.join(world_dir, "rm/train.jsonl"))][:20]
  labeler = TINY.labeler()
  rng = np.random.default_rng(0)
  records = []
  for prompt in prompts:
    meta = world.task_meta(prompt)
    responses = [world.sample_policy_like_response(meta, rng)[0] for _ in range(4)]
    records.append(world.ranking_record(prompt, responses, labeler.rank(meta, responses, rng)))
  records.append(world.ranking_record(prompts[0], ["a", "b"], [0, 0]))  # all tied
  counts = world.write_rankings(str(tmp_path / "train.jsonl"), records)
  assert counts["skipped/all_tied"] >= 1
  rankings = data.read_examples("rankings", str(tmp_path / "train.jsonl"))
  assert len(rankings) == counts["written"] == len(records) - counts["skipped/all_tied"]
  assert all(r.k == 4 for r in rankings)


def test_checked_in_tokenizer_matches_the_generator(tmp_path, tokenizer):
  world.write_tokenizer(str(tmp_path))
  for name in world.tokenizer.FILES:
    assert filecmp.cmp(os.path.join(world.world_tokenizer_dir(), name),
                       os.path.join(tmp_path, name), shallow=False), name
  assert len(tokenizer) == len(tasks.VOCAB)
  assert tokenizer.convert_ids_to_tokens(list(range(4))) == ["<pad>", "<eos>", "<bos>", "<unk>"]
  ids = tokenizer("please first 2 : c a f ->")["input_ids"]
  assert tokenizer.decode(ids, skip_special_tokens=True) == "please first 2 : c a f ->"
