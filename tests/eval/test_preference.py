"""The policy comparison: win-rate statistics, the labeler's judgements, KL as the sampler
sees it, and the pipeline's evaluate stage with its report."""

import json
import math

import jax
import numpy as np
import pytest

from jaxrlhf import models
from jaxrlhf import parallel
from jaxrlhf import sampling
from jaxrlhf import scoring
from jaxrlhf.data import formats
from jaxrlhf.data.world import labeler as labeler_lib
from jaxrlhf.data.world import tasks
from jaxrlhf.data.world import tokenizer as world_tokenizer
from jaxrlhf.eval import generation
from jaxrlhf.eval import judging
from jaxrlhf.eval import policy_inputs
from jaxrlhf.eval import policy_runs
from jaxrlhf.eval import preference
from jaxrlhf.eval import report


# ---------------------------------------------------------------------------------------
# Statistics and parsing.
# ---------------------------------------------------------------------------------------


def test_win_rate_counts_ties_half_with_the_normal_interval():
  outcomes = [1, 1, 0.5, 0, 1, 0.5, 0, 1]
  result = judging.win_rate(outcomes)
  assert result["win_rate"] == pytest.approx(5 / 8)
  half = 1.959964 * np.std(outcomes, ddof=1) / math.sqrt(8)
  np.testing.assert_allclose(result["ci95"], [5 / 8 - half, 5 / 8 + half], rtol=1e-6)
  assert (result["wins"], result["ties"], result["losses"], result["n"]) == (4, 2, 2, 8)
  assert judging.win_rate([1.0, 1.0, 1.0])["ci95"] == [1.0, 1.0]


def test_score_outcomes_compare_with_the_baseline():
  np.testing.assert_array_equal(judging.score_outcomes([1.0, 2.0, 3.0], [2.0, 2.0, 1.0]),
                                [0.0, 0.5, 1.0])


def test_policies_parse_in_order_and_bad_items_are_named():
  assert list(policy_inputs.parse_policies("sft=/a, ppo=/b,ptx=/c")) == ["sft", "ppo", "ptx"]
  with pytest.raises(ValueError, match="'ppo' is not name=path"):
    policy_inputs.parse_policies("sft=/a,ppo")
  with pytest.raises(ValueError, match="appears twice"):
    policy_inputs.parse_policies("sft=/a,sft=/b")


def test_few_shot_prefix_shows_examples_closed_by_the_stop_token():
  demos = [formats.Demonstration(prompt=f"add : {i} 1 ->", response=str(i + 1))
           for i in range(8)]
  prefix = policy_inputs.few_shot_prefix(demos, 3, "<eos>", seed=0)
  assert prefix.count("<eos>") == 3 and prefix.count("->") == 3
  assert prefix == policy_inputs.few_shot_prefix(demos, 3, "<eos>", seed=0)
  assert prefix != policy_inputs.few_shot_prefix(demos, 3, "<eos>", seed=1)
  with pytest.raises(ValueError, match="9 examples wanted, 8 available"):
    policy_inputs.few_shot_prefix(demos, 9, "<eos>", seed=0)


# ---------------------------------------------------------------------------------------
# The labeler's view.
# ---------------------------------------------------------------------------------------


def _metas(n, seed=0):
  rng = np.random.default_rng(seed)
  return [tasks.sample_instance(tasks.TASKS[i % len(tasks.TASKS)], rng) for i in range(n)]


def _run(name, texts, stopped=True):
  n = len(texts)
  return policy_runs.PolicyRun(
      name=name, path="", few_shot=False, texts=list(texts),
      stopped=np.full(n, stopped), lengths=np.ones(n), response_ids=np.zeros((n, 1)),
      response_mask=np.ones((n, 1)))


def test_exact_correctness_reads_the_answer_like_the_labeler():
  meta = {"task": "reverse", "items": ["a", "b", "c"], "arg": None}
  assert judging.exact_correct(meta, "c b a", True)
  assert judging.exact_correct(meta, "c b a . hope this helps", True)  # filler: still right
  assert not judging.exact_correct(meta, "c b", True)
  assert not judging.exact_correct(meta, "done c b a", True)
  assert labeler_lib.answer_words("c b a <eos> x") == ["c", "b", "a"]


def test_task_table_gives_gold_answers_full_marks_per_instruction():
  metas = _metas(40)
  gold = _run("gold", [" ".join(tasks.answer(m)) for m in metas])
  table = judging.task_table(metas, gold)
  assert table["likert"] == 7.0 and table["exact_correct"] == 1.0
  assert sorted(table["per_task"]) == sorted(tasks.TASKS)
  assert sum(cell["n"] for cell in table["per_task"].values()) == 40
  assert table["quality_terms"] == dict.fromkeys(labeler_lib.WEIGHTS, 1.0)
  wrong = _run("wrong", ["done"] * 40)
  assert judging.task_table(metas, wrong)["likert"] == 1.0
  chatty = _run("chatty", [" ".join(tasks.answer(m)) + " . hope this helps" for m in metas])
  terms = judging.task_table(metas, chatty)["quality_terms"]
  assert terms["correct"] == 1.0 and terms["concise"] == 0.0


def test_closed_domain_hallucination_is_a_symbol_the_input_does_not_hold():
  reverse = {"task": "reverse", "items": ["a", "b", "c"], "arg": None}
  assert tasks.hallucinated(reverse, ["c", "b", "a"]) is False
  assert tasks.hallucinated(reverse, ["c", "d", "a"]) is True  # d is not in the input
  assert tasks.hallucinated(reverse, []) is False  # nothing said, nothing made up
  upper = {"task": "upper", "items": ["a", "b"], "arg": None}
  assert tasks.hallucinated(upper, ["A", "B"]) is False
  assert tasks.hallucinated(upper, ["A", "C"]) is True
  assert tasks.hallucinated({"task": "add", "items": ["2", "3"], "arg": None}, ["7"]) is None
  meta = labeler_lib.metadata(reverse, "c d a . done", True)
  assert meta == {"likert": labeler_lib.score(reverse, "c d a . done", True),
                  "hallucination": True}
  metas = _metas(40)
  gold = judging.task_table(metas, _run("gold", [" ".join(tasks.answer(m)) for m in metas]))
  closed = [m for m in metas if m["task"] in tasks.CLOSED_DOMAIN_TASKS]
  assert gold["hallucination"] == 0.0 and gold["hallucination_n"] == len(closed) > 0
  made_up = judging.task_table(metas, _run("made_up", ["j j j j j j j"] * 40))
  for task, cell in made_up["per_task"].items():
    assert ("hallucination" in cell) == (task in tasks.CLOSED_DOMAIN_TASKS)
  expected = np.mean([m["task"] == "upper" or "j" not in m["items"] for m in closed])
  assert made_up["hallucination"] == pytest.approx(expected)


def test_reward_model_check_counts_orders_against_noiseless_quality(tmp_path):
  metas = _metas(6)
  records = []
  for i, meta in enumerate(metas):
    right = " ".join(tasks.answer(meta))
    # ranks disagree with the noiseless quality on every other record
    ranks = [0, 1] if i % 2 == 0 else [1, 0]
    records.append({"prompt": f"p{i}", "responses": [right, right + " . hope this helps"],
                    "ranks": ranks, **meta})
  path = tmp_path / "rankings.jsonl"
  formats.write_jsonl(str(path), records)
  tokenizer = models.load_tokenizer(world_tokenizer.world_tokenizer_dir())
  model = models.ScalarHeadModel(models.TransformerConfig.tiny(vocab_size=len(tokenizer)))
  params = models.init_params(model, jax.random.key(0))
  check = judging.reward_model_check(str(path), model, params, tokenizer,
                                     max_prompt_len=8, max_response_len=8,
                                     per_device_batch_size=2,
                                     held_out=labeler_lib.Labeler.held_out())
  assert check["pairs"] == 6 and check["untied_rank_pairs"] == 6
  # Against the recorded ranks: right on the records where they agree with the noiseless
  # quality exactly where it is right against that quality, so 1 - the two disagree.
  assert check["training_labeler_pairs"] == 6
  assert check["rm_vs_training_labelers"] in {i / 6 for i in range(7)}
  assert 0 <= check["held_out_labeler_pairs"] <= 6
  if check["held_out_labeler_pairs"]:
    assert 0.0 <= check["rm_vs_held_out_labelers"] <= 1.0
  assert check["ranks_vs_noiseless"] == 0.5
  assert check["rm_vs_noiseless"] in {i / 6 for i in range(7)}
  # right vs right + filler differ only in form
  assert check["by_difference"]["form"]["pairs"] == 6
  assert check["by_difference"]["form"]["rm_vs_noiseless"] == check["rm_vs_noiseless"]
  assert check["by_difference"]["content"] == {"pairs": 0, "rm_vs_noiseless": None}
  del records[0]["task"]
  formats.write_jsonl(str(path), records)
  with pytest.raises(ValueError, match=r"rankings.jsonl:1: field 'task' missing"):
    judging.reward_model_check(str(path), model, params, tokenizer, max_prompt_len=8,
                               max_response_len=8, per_device_batch_size=2)


def test_held_out_labelers_weigh_and_err_in_their_own_way():
  held_out, training = labeler_lib.Labeler.held_out(), labeler_lib.Labeler.calibrated(0.73)
  assert held_out.weight_map == labeler_lib.HELD_OUT_WEIGHTS != training.weight_map
  assert sum(labeler_lib.HELD_OUT_WEIGHTS.values()) == pytest.approx(1.0)
  # Two of them agree on about 73% of distinct policy-like pairs, as two training ones do.
  pairs = labeler_lib.reference_comparisons(3000, seed=11)
  assert labeler_lib.measure_agreement(held_out, pairs) == pytest.approx(0.73, abs=0.03)
  # Right but chatty: the held-out group, weighing conciseness more, rates it lower.
  meta = {"task": "reverse", "items": ["a", "b", "c"], "arg": None}
  chatty = "c b a . hope this helps"
  assert (labeler_lib.latent_score(meta, chatty, weights=held_out.weight_map)
          < labeler_lib.latent_score(meta, chatty, weights=training.weight_map))
  wrong_but_terse = "c a b"  # two of three in place, stopped, nothing extra
  assert held_out.score(meta, wrong_but_terse) >= training.score(meta, wrong_but_terse)
  assert held_out.score(meta, "c b a") == training.score(meta, "c b a") == 7


def test_best_of_n_picks_by_reward_model_and_by_labeler():
  metas = _metas(40, seed=3)
  labeler = labeler_lib.Labeler.calibrated(0.73)
  right = [" ".join(tasks.answer(m)) for m in metas]
  wrong = [" ".join(tasks.corrupt(m, tasks.answer(m), np.random.default_rng(i)))
           for i, m in enumerate(metas)]
  baseline = _run("sft", wrong)
  candidates = [_run("c0", wrong), _run("c1", right), _run("c2", wrong)]
  # the reward model prefers the wrong answers, the labeler the right ones
  for c, score in zip(candidates, (1.0, 0.0, 0.5)):
    c.rm_scores = np.full(len(metas), score)
  table = judging.best_of_n(candidates, metas, labeler, baseline, seed=0)
  assert table["n"] == [1, 2]  # powers of two up to the 3 candidates
  assert table["kl_bound"] == [0.0, pytest.approx(math.log(2) - 0.5)]
  assert table["labeler"][0] == table["reward_model"][0]  # n=1: same pick, same verdicts
  assert table["labeler"][1]["correct"] == 1.0
  wrong_correct = np.mean([tasks.correctness(m, w.split()) for m, w in zip(metas, wrong)])
  assert table["reward_model"][1]["correct"] == pytest.approx(wrong_correct)
  assert table["labeler"][1]["win_rate"] > table["reward_model"][1]["win_rate"] + 0.3
  # Proxy and gold of the picks: the reward model's best of 2 scores 1.0 on its own scale
  # and worse on the labeler's than the labeler's own pick.
  assert table["reward_model"][1]["rm_score"] == 1.0
  assert table["reward_model"][1]["gold"] < table["labeler"][1]["gold"] <= 7.0
  for c in candidates:
    c.rm_scores = None
  assert "reward_model" not in judging.best_of_n(candidates, metas, labeler, baseline, 0)
  with pytest.raises(ValueError, match="at least one candidate"):
    judging.best_of_n([], metas, labeler, baseline, 0)


def test_reference_answers_bound_what_dropping_filler_wins():
  metas = _metas(60, seed=4)
  labeler = labeler_lib.Labeler.calibrated(0.73)
  wrong_chatty = _run("sft", [" ".join(tasks.corrupt(m, tasks.answer(m),
                                                     np.random.default_rng(i))) + " . ok"
                              for i, m in enumerate(metas)])
  ref = judging.reference_answers(metas, labeler, wrong_chatty, seed=0)
  assert ref["baseline_without_extra"]["win_rate"] > 0.6  # filler cut: rated higher
  assert ref["right_answer"]["win_rate"] > ref["baseline_without_extra"]["win_rate"]
  never_stops = _run("sft", [" ".join(tasks.answer(m)) for m in metas], stopped=False)
  ref = judging.reference_answers(metas, labeler, never_stops, seed=0)
  # the trimmed answer is read as stopped (unchanged it would win only half the time)
  assert ref["baseline_without_extra"]["win_rate"] > 0.75


def test_pair_difference_separates_what_an_answer_says_from_how_it_ends():
  meta = {"task": "sort", "items": ["c", "a", "b"], "arg": None}
  right = labeler_lib.quality_terms(meta, "a b c")
  assert judging.pair_difference(right, labeler_lib.quality_terms(meta, "a c b")) == "content"
  assert judging.pair_difference(right, labeler_lib.quality_terms(meta, "a b c . ok")) == "form"
  assert judging.pair_difference(right, labeler_lib.quality_terms(meta, "b a c . ok")) == "both"
  assert judging.pair_difference(right, labeler_lib.quality_terms(meta, "a b c",
                                                                     stopped=False)) == "form"
  with pytest.raises(ValueError, match="equal quality terms"):
    judging.pair_difference(right, right)


def test_labeler_prefers_right_answers_and_ties_identical_ones():
  metas = _metas(300, seed=1)
  labeler = labeler_lib.Labeler.calibrated(0.73)
  gold = _run("gold", [" ".join(tasks.answer(m)) for m in metas])
  rng = np.random.default_rng(2)
  slipped = _run("slipped", [" ".join(tasks.corrupt(m, tasks.answer(m), rng)) + " . ok"
                             for m in metas])
  better = judging.win_rate(judging.labeler_outcomes(labeler, metas, gold, slipped, 0))
  assert better["ci95"][0] > 0.8
  same = judging.win_rate(judging.labeler_outcomes(labeler, metas, gold,
                                                   _run("copy", gold.texts), 0))
  # The same answer twice is one answer to the labeler: every prompt a tie.
  assert same["win_rate"] == 0.5 and same["ties"] == same["n"] == len(metas)


# ---------------------------------------------------------------------------------------
# KL on the policy's own samples, batched with padding.
# ---------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_policy():
  model = models.CausalLM(models.TransformerConfig.tiny(vocab_size=24))
  params = models.init_params(model, jax.random.key(0))
  other = models.init_params(model, jax.random.key(1))
  return model, params, other


def test_response_logprob_is_what_the_sampler_drew_with(tiny_policy):
  model, params, _ = tiny_policy
  rng = np.random.default_rng(0)
  prompt_ids = rng.integers(3, 24, size=(4, 5)).astype(np.int32)
  prompt_mask = np.ones_like(prompt_ids)
  prompt_mask[0, :2] = 0  # left padding
  out = sampling.sample(model, params, prompt_ids, prompt_mask, jax.random.key(3),
                        max_new_tokens=6, temperature=0.7, stop_token_id=1, pad_token_id=0)
  ids, mask, _ = scoring.truncate_after_stop(out.response_ids, 1, 0)
  got = generation.response_logprob(params, prompt_ids, prompt_mask, ids, mask,
                                    apply_fn=model.apply, temperature=0.7)
  np.testing.assert_allclose(got, np.sum(np.asarray(out.logprobs) * np.asarray(mask), -1),
                             rtol=1e-5, atol=1e-5)


def test_kl_matches_a_numpy_log_softmax_and_batching_pads_nothing_in(tiny_policy):
  model, params, other = tiny_policy
  rng = np.random.default_rng(1)
  n, prompt_len, response_len = 6, 4, 3  # 6 rows over 4 devices x 1: the tail is padded
  arrays = {
      "prompt_ids": rng.integers(3, 24, size=(n, prompt_len)).astype(np.int32),
      "prompt_mask": np.ones((n, prompt_len), np.int32),
      "response_ids": rng.integers(3, 24, size=(n, response_len)).astype(np.int32),
      "response_mask": np.array([[1, 1, 1], [1, 1, 0], [1, 0, 0]] * 2, np.int32),
  }
  programs = generation.Programs(generation.Generation(3, 1.0, 0, 1.0, False, 1, 0))
  fn = programs.logprob(model)
  assert programs.logprob(models.CausalLM(model.config)) is fn  # shared per config
  got = {name: generation.run_batched(fn, parallel.replicate(p), arrays, 1)
         for name, p in (("policy", params), ("ref", other))}

  def numpy_logprob(p):
    seq = np.concatenate([arrays["prompt_ids"], arrays["response_ids"]], 1)
    logits = np.asarray(model.apply({"params": p}, seq), np.float64)
    logp = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
    picked = np.take_along_axis(logp[:, prompt_len - 1:-1], arrays["response_ids"][..., None],
                                -1)[..., 0]
    return (picked * arrays["response_mask"]).sum(-1)

  np.testing.assert_allclose(got["policy"], numpy_logprob(params), rtol=1e-4, atol=1e-4)
  np.testing.assert_allclose(got["policy"] - got["ref"],
                             numpy_logprob(params) - numpy_logprob(other), rtol=1e-4,
                             atol=1e-4)
  assert got["policy"].shape == (n,)


# ---------------------------------------------------------------------------------------
# The pipeline's evaluate stage (session chain) and the standalone reward-model judge.
# ---------------------------------------------------------------------------------------


def test_evaluate_stage_judges_every_policy_against_sft(chain):
  results = chain["evaluate"]
  policies = results["policies"]
  assert list(policies) == ["sft", "ppo", "ppo_ptx", "flan", "base_few_shot"]
  assert results["judge"] == "labeler" and results["baseline"] == "sft"
  # The FLAN/T0-style baseline: the base model fine-tuned on the public-task collection,
  # with SFT's budget, judged on the users' held-out prompts like the others.
  assert policies["flan"]["path"].endswith("flan/hf")
  assert "`flan` is the paper's FLAN / T0 baseline" in (chain["root"] / "report.md").read_text()
  assert 0.0 <= policies["flan"]["win_rate"] <= 1.0
  assert chain["flan"]["steps"] == chain["sft"]["steps"]
  assert chain["flan"]["data"]["examples_read"] == chain["sft"]["data"]["examples_read"]
  assert policies["sft"]["win_rate"] is None
  assert policies["sft"]["kl_from_reference"] == 0.0
  assert policies["sft"]["alignment_tax"] == 0.0
  assert policies["base_few_shot"]["few_shot"] and policies["base_few_shot"]["kl_from_reference"] is None
  for name in ("ppo", "ppo_ptx", "base_few_shot"):
    entry = policies[name]
    lo, hi = entry["win_rate_ci95"]
    assert 0.0 <= lo <= entry["win_rate"] <= hi <= 1.0
    assert entry["labeler"]["n"] == results["num_prompts"]
    assert entry["rm_judged"]["n"] == results["num_prompts"]
    assert math.isfinite(entry["pretrain_nll"])
  for name in ("ppo", "ppo_ptx"):  # k1 on 19 samples of a barely moved EMA: any sign
    kl = policies[name]["kl_from_reference"]
    assert math.isfinite(kl) and kl != 0.0
  for entry in policies.values():
    assert 1.0 <= entry["likert"] <= 7.0
    assert sum(c["n"] for c in entry["per_task"].values()) == results["num_prompts"]
    assert entry["hallucination_n"] > 0 and 0.0 <= entry["hallucination"] <= 1.0
  for name in ("ppo", "ppo_ptx", "base_few_shot"):
    held = policies[name]["held_out_labelers"]
    assert held["n"] == results["num_prompts"] and 0.0 <= held["win_rate"] <= 1.0
  lines = (chain["root"] / "evaluate" / "responses.jsonl").read_text().splitlines()
  assert len(lines) == results["num_prompts"]
  first = json.loads(lines[0])
  assert set(first["responses"]) == set(first["labeler"]) == set(policies)
  recorded = [json.loads(line)["labeler"]["sft"] for line in lines]
  assert all(1 <= r["likert"] <= 7 for r in recorded)
  closed = [r["hallucination"] for r in recorded if r["hallucination"] is not None]
  assert len(closed) == policies["sft"]["hallucination_n"]
  assert np.mean(closed) == pytest.approx(policies["sft"]["hallucination"])


def test_report_has_the_table_plots_and_tensorboard_images(chain):
  root = chain["root"]
  text = (root / "report.md").read_text()
  for heading in ("## Results", "## Per instruction type", "## Closed-domain hallucination",
                  "## What the labeler rewards", "## Held-out labelers", "## Stages",
                  "## Plots", "## Sample answers"):
    assert heading in text, heading
  for name in ("sft", "ppo", "ppo_ptx", "base_few_shot (few-shot)"):
    assert f"| {name} |" in text, name
  assert "reward model**: held-out pairwise accuracy" in text
  check = json.loads((root / "evaluate" / "results.json").read_text())["reward_model_check"]
  assert check["pairs"] > 0 and 0.0 <= check["rm_vs_noiseless"] <= 1.0
  assert check["held_out_labeler_pairs"] > 0
  assert 0.0 <= check["rm_vs_held_out_labelers"] <= 1.0
  assert 0.0 <= check["rm_vs_training_labelers"] <= 1.0
  assert "The reward model agrees with" in text
  assert "the reward model orders" in text
  results = json.loads((root / "evaluate" / "results.json").read_text())
  best = results["best_of_n"]
  assert best["n"] == [1, 2] and len(best["reward_model"]) == len(best["labeler"]) == 2
  assert best["labeler"][1]["correct"] >= best["labeler"][0]["correct"]  # picks the better
  assert set(results["reference_answers"]) == {"right_answer", "baseline_without_extra"}
  assert "## How far the reward model can take the baseline" in text
  assert "| 2 | 0.19 |" in text
  # Gold against proxy: every held-out evaluation of both PPO runs, and best-of-n.
  curves = results["gold_vs_proxy"]
  assert set(curves) == {"ppo", "ppo_ptx", "best_of_n"}
  for name in ("ppo", "ppo_ptx"):
    rows = [r for r in json.loads("[" + ",".join(
        (root / name / "metrics.jsonl").read_text().splitlines()) + "]")
        if "eval_policy_gold" in r]
    assert [p["iteration"] for p in curves[name]] == [r["step"] for r in rows] != []
    assert all(1.0 <= p["gold"] <= 7.0 for p in curves[name])
  assert [p["n"] for p in curves["best_of_n"]] == best["n"]
  assert "## Gold against proxy" in text and "| ppo_ptx | iteration " in text
  split = check["by_difference"]
  assert sum(group["pairs"] for group in split.values()) == check["pairs"]
  for name, group in split.items():
    if group["pairs"]:
      assert f"of the {group['pairs']} {report.REWARD_CHECK_SPLITS[name]}" in text
  for plot in report.PLOTS:
    assert f"(plots/{plot})" in text
    assert (root / "plots" / plot).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
  from tensorboard.backend.event_processing import event_accumulator
  acc = event_accumulator.EventAccumulator(str(root / "tb"))
  acc.Reload()
  assert {f"report/{p[:-4]}" for p in report.PLOTS} <= set(acc.Tags()["images"])
  assert chain["evaluate"]["report"] == str(root / "report.md")


def test_reward_model_judges_prompts_without_a_labeler(chain, tmp_path):
  from configs import compare_policies
  root = chain["root"]
  records = [json.loads(l) for l in (root / "world" / "ppo" / "test.jsonl").read_text().splitlines()]
  plain = tmp_path / "prompts.jsonl"
  formats.write_jsonl(str(plain), [{"prompt": r["prompt"]} for r in records])
  config = compare_policies.get_config()
  config.policies = f"sft={root / 'sft' / 'hf'},ppo={root / 'ppo' / 'hf'}"
  config.prompts_file = str(plain)
  config.reward_model = str(root / "reward_model" / "hf")
  config.max_prompt_len, config.max_response_len = 16, 6
  config.per_device_batch = 4
  config.num_sample_texts = 2
  with pytest.raises(formats.DataError, match=r"prompts.jsonl, line 1, field 'task'"):
    preference.evaluate_policies(config, str(tmp_path / "labeler"))
  config.judge = "reward_model"
  results = preference.evaluate_policies(config, str(tmp_path / "rm"))
  entry = results["policies"]["ppo"]
  assert "labeler" not in entry and "likert" not in entry
  assert entry["win_rate"] == entry["rm_judged"]["win_rate"]
  assert results["pretrain_file"] is None and entry["pretrain_nll"] is None
  assert (tmp_path / "rm" / "report.md").exists()
  config.best_of_n = 2
  with pytest.raises(ValueError, match="config.best_of_n needs config.judge='labeler'"):
    preference.evaluate_policies(config, str(tmp_path / "bad"))
  config.judge, config.best_of_n = "labeler", 3
  with pytest.raises(ValueError, match="config.best_of_n=3: use 0 .off. or a power of two"):
    preference.evaluate_policies(config, str(tmp_path / "bad"))
  config.best_of_n = 0
  with pytest.raises(ValueError, match="config.baseline='base' is not one of"):
    config.baseline = "base"
    preference.evaluate_policies(config, str(tmp_path / "bad"))


def test_report_keeps_the_policy_order_through_a_sorted_json_file(chain, tmp_path):
  # summary.json is written with sorted keys; a skipped stage's results come from it.
  results = json.loads(json.dumps(chain["evaluate"], sort_keys=True))
  assert list(results["policies"]) != results["policy_order"]
  text = report.write_report(tmp_path, results).read_text()
  rows = [line.split("|")[1].strip() for line in text.splitlines()
          if line.startswith("| ") and "win rate" not in line][:4]
  assert rows == ["sft", "ppo", "ppo_ptx", "flan"]
  header = next(line for line in text.splitlines() if line.startswith("| policy | c"))
  assert header == "| policy | " + " | ".join(labeler_lib.WEIGHTS) + " |"
