"""Pretrain -> SFT -> reward model on a CI-sized world: each stage runs, learns, resumes.

The session-scoped `chain` (tests/conftest.py) runs the pipeline once for every module.
"""

import dataclasses
import json
import pathlib

import jax
import numpy as np
import pytest

from configs import sft as sft_config
from jaxrlhf import instructgpt
from jaxrlhf import metrics as metrics_lib
from jaxrlhf import models
from jaxrlhf import parallel
from jaxrlhf import sft


def test_pretraining_lowers_loss_and_exports(chain):
  summary = chain["pretrain"]
  assert summary["final_eval"]["eval_loss"] < summary["initial_eval"]["eval_loss"]
  model, params = models.from_pretrained(str(chain["root"] / "pretrain" / "hf"))
  assert isinstance(model, models.CausalLM)


def test_sft_lowers_validation_loss(chain):
  summary = chain["sft"]
  assert summary["final_eval"]["eval_loss"] < summary["initial_eval"]["eval_loss"]
  assert (chain["root"] / "sft" / "hf" / "model.safetensors").exists()


def test_tensorboard_event_file_holds_the_loss_curve(chain):
  from tensorboard.backend.event_processing import event_accumulator
  acc = event_accumulator.EventAccumulator(str(chain["root"] / "sft" / "tb"))
  acc.Reload()
  losses = acc.Scalars("loss")
  steps = [e.step for e in losses]
  # Every log interval, plus the flushes before each checkpoint (every 3 steps).
  assert steps == sorted(set(range(2, 13, 2)) | set(range(3, 13, 3)))
  rows = metrics_lib.read_jsonl_scalars(chain["root"] / "sft")
  jsonl_losses = [r["loss"] for r in rows if "loss" in r]
  np.testing.assert_allclose([e.value for e in losses], jsonl_losses, rtol=1e-6)
  assert json.loads((chain["root"] / "sft" / "config.json").read_text())["stage"] == "sft"


def test_sft_resume_is_bit_identical(chain, tmp_path):
  def config(num_steps):
    c = sft_config.get_config("test")
    c.data.world_dir = chain["world_dir"]
    c.init_from = str(chain["root"] / "pretrain" / "hf")
    c.num_steps = num_steps
    c.optimizer.schedule = "warmup_constant"  # same lr at each step whatever the length
    c.checkpoint_every = 100
    c.num_sample_prompts = 0
    return c

  sft.train_and_evaluate(config(6), str(tmp_path / "straight"))
  sft.train_and_evaluate(config(3), str(tmp_path / "resumed"))  # "interrupted" at 3
  sft.train_and_evaluate(config(6), str(tmp_path / "resumed"))  # picks up at 3
  _, straight = models.from_pretrained(str(tmp_path / "straight" / "hf"))
  _, resumed = models.from_pretrained(str(tmp_path / "resumed" / "hf"))
  for a, b in zip(jax.tree_util.tree_leaves(straight), jax.tree_util.tree_leaves(resumed)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  # The resumed run's summary keeps the evaluation made before training (once: null).
  straight_summary, resumed_summary = (json.loads((tmp_path / d / "summary.json").read_text())
                                       for d in ("straight", "resumed"))
  assert straight_summary["initial_eval"] is not None
  for key in ("initial_eval", "final_eval", "train_loss", "steps"):
    assert resumed_summary[key] == straight_summary[key], key
  # Rerunning the finished stage returns, and keeps, what it wrote.
  rerun = sft.train_and_evaluate(config(6), str(tmp_path / "straight"))
  assert rerun == json.loads((tmp_path / "straight" / "summary.json").read_text())
  for key in ("initial_eval", "final_eval", "train_loss"):
    assert rerun[key] == straight_summary[key] is not None, key


def test_resume_onto_another_layout(chain, tmp_path):
  """A checkpoint written under pmap resumes in mesh mode (fsdp x tensor over the 4
  devices: each array read into its split by name), and one written there resumes under
  pmap: as a preempted job that comes back on another
  slice. The figures are those of a straight pmap run, to float rounding."""
  def config(num_steps, mode, mesh=""):
    c = sft_config.get_config("test")
    c.data.world_dir = chain["world_dir"]
    c.init_from = str(chain["root"] / "pretrain" / "hf")
    c.num_steps = num_steps
    c.optimizer.schedule = "warmup_constant"  # same lr at each step whatever the length
    c.checkpoint_every, c.eval_every, c.num_sample_prompts = 100, 100, 0  # eval at the end
    c.parallel.mode, c.parallel.mesh = mode, mesh
    return c

  straight = sft.train_and_evaluate(config(9, "pmap"), str(tmp_path / "straight"))
  for steps, mode, mesh in ((3, "pmap", ""), (6, "mesh", "fsdp=2,tensor=2"), (9, "pmap", "")):
    moved = sft.train_and_evaluate(config(steps, mode, mesh), str(tmp_path / "moved"))
  assert moved["steps"] == straight["steps"] == 9
  # Measured: train loss equal, validation loss within 1.2e-7 (relative), parameters
  # within 1.5e-8.
  np.testing.assert_allclose(moved["train_loss"], straight["train_loss"], rtol=1e-5)
  np.testing.assert_allclose(moved["final_eval"]["eval_loss"],
                             straight["final_eval"]["eval_loss"], rtol=1e-5)
  _, a = models.from_pretrained(str(tmp_path / "straight" / "hf"))
  _, b = models.from_pretrained(str(tmp_path / "moved" / "hf"))
  for x, y in zip(jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b)):
    np.testing.assert_allclose(np.asarray(y), np.asarray(x), rtol=1e-5, atol=1e-6)
  assert parallel.layout().is_mesh is False  # the last stage ran under pmap


def test_a_changed_model_on_an_old_workdir_names_what_changed(chain, tmp_path):
  c = sft_config.get_config("test")
  c.data.world_dir = chain["world_dir"]
  c.num_steps, c.checkpoint_every, c.eval_every, c.num_sample_prompts = 3, 100, 0, 0
  sft.train_and_evaluate(c, str(tmp_path))
  c.model.intermediate_size = 48  # was 64
  c.num_steps = 6
  with pytest.raises(ValueError, match=r"checkpoint at step 3 does not fit the model .*"
                                       r"\(64, 32\) in the checkpoint and \(48, 32\) now.*"
                                       r"model.intermediate_size: 64 -> 48"):
    sft.train_and_evaluate(c, str(tmp_path))
  # Refused, not mistaken for damage: the checkpoint is where it was.
  assert [p.name for p in (tmp_path / "checkpoints").iterdir()] == ["3"]


def test_reward_model_learns_rankings_and_is_normalised(chain):
  summary = chain["rm"]
  assert summary["final_eval"]["eval_comparisons"] > 0
  assert 0.0 <= summary["final_eval"]["eval_accuracy"] <= 1.0
  assert summary["train_loss"] is not None
  norm = summary["normalization"]["demonstrations"]
  assert abs(norm["mean_after"]) < 1e-4
  assert abs(norm["mean_before"]) > abs(norm["mean_after"])
  model, _ = models.from_pretrained(str(chain["root"] / "reward_model" / "hf"))
  assert isinstance(model, models.ScalarHeadModel)
  assert 0.5 < summary["labeler_agreement"] < 0.95


def test_rankings_keep_every_prompt_whole(chain):
  # The pipeline's own stage: <root>/rankings, read by the reward model from there.
  rankings_dir = chain["root"] / "rankings"
  lines = (rankings_dir / "train.jsonl").read_text().splitlines()
  records = [json.loads(line) for line in lines]
  r = chain["rm_config"]
  collected = chain["rankings"]
  assert collected == json.loads((rankings_dir / "summary.json").read_text())
  assert collected["policy"] == str(chain["root"] / "sft" / "hf")
  assert collected["k_max"] <= r.data.k_max  # the reward model pads K to its k_max
  # K sampled in k_min..k_max; empty samples are left out (and counted in summary.json).
  assert all(2 <= len(x["responses"]) <= collected["k_max"] for x in records)
  assert sum(len(x["responses"]) for x in records) > (collected["k_min"] - 1) * len(records)
  assert all(len(x["responses"]) == len(x["ranks"]) for x in records)
  assert collected["train"]["written"] == len(records)
  assert chain["rm"]["labeler_agreement"] == collected["labeler_agreement"]
  # One loader element holds every response and every comparison of one prompt.
  from jaxrlhf import data
  examples = data.read_examples("rankings", str(rankings_dir / "train.jsonl"))
  tokenizer = models.load_tokenizer(r.tokenizer)
  loader = data.make_loader("rankings", examples, tokenizer,
                            data.Lengths(prompt=16, response=8, k_max=r.data.k_max),
                            per_device_batch_size=2, shuffle=True, num_epochs=1)
  batch = next(loader)
  for valid, pairs, index in zip(batch["response_valid"].reshape(-1, r.data.k_max),
                                 batch["pair_mask"].reshape(-1, r.data.k_max, r.data.k_max),
                                 batch["index"].reshape(-1)):
    ranks = examples[index].ranks
    assert valid.sum() == len(ranks)
    assert pairs.sum() == sum(a < b for a in ranks for b in ranks)


def test_config_errors_name_the_problem(chain, tmp_path):
  c = sft_config.get_config("test")
  c.batch_size = 6
  with pytest.raises(ValueError, match="batch_size=6 is not divisible"):
    sft.train_and_evaluate(c, str(tmp_path / "a"))
  c = sft_config.get_config("test")
  c.data.train_file = str(tmp_path / "missing.jsonl")
  c.data.valid_file = str(tmp_path / "missing.jsonl")
  with pytest.raises(FileNotFoundError, match="missing.jsonl"):
    sft.train_and_evaluate(c, str(tmp_path / "b"))
  c = sft_config.get_config("test")
  c.model.arch = "mamba"
  c.data.world_dir = chain["world_dir"]
  with pytest.raises(ValueError, match="mamba"):
    sft.train_and_evaluate(c, str(tmp_path / "c"))
  # A tokenizer with more tokens than the model's vocabulary: named at start-up (its
  # ids would read past the embedding table and turn the loss into NaN).
  c = sft_config.get_config("test")
  c.data.world_dir = chain["world_dir"]
  c.model.vocab_size = 12
  with pytest.raises(ValueError, match=r"config.model.vocab_size: the model's vocabulary "
                                       r"has 12 entries but the tokenizer .* has \d+ tokens"):
    sft.train_and_evaluate(c, str(tmp_path / "f"))
  c = sft_config.get_config("test")
  c.data.world_dir = chain["world_dir"]
  c.init_from = str(chain["root"] / "sft" / "hf")
  c.tokenizer = str(tmp_path / "big_tokenizer")
  big = models.load_tokenizer(chain["config"].sft.tokenizer)
  big.add_tokens([f"extra_token_{i}" for i in range(600)])
  big.save_pretrained(c.tokenizer)
  with pytest.raises(ValueError, match=r"config.init_from=.*vocabulary has \d+ entries"):
    sft.train_and_evaluate(c, str(tmp_path / "g"))
  # Files of the user's are never completed with the embedded world's.
  c = sft_config.get_config("test")
  c.data.world_dir = chain["world_dir"]
  c.data.train_file = str(chain["root"] / "world" / "sft" / "train.jsonl")
  with pytest.raises(ValueError, match="config.data.train_file is set but "
                                       "config.data.valid_file is empty"):
    sft.train_and_evaluate(c, str(tmp_path / "h"))
  # No rankings given: an error naming the fields, not rankings sampled on the quiet.
  from configs import reward_model as rm_config  # pylint: disable=g-import-not-at-top
  from jaxrlhf import reward_model  # pylint: disable=g-import-not-at-top
  c = rm_config.get_config("test")
  c.data.world_dir = chain["world_dir"]
  with pytest.raises(ValueError, match="config.data.train_file is empty and so is "
                                       "config.data.rankings_dir"):
    reward_model.train_and_evaluate(c, str(tmp_path / "d"))
  c.data.rankings_dir = str(tmp_path / "no_rankings_here")
  with pytest.raises(FileNotFoundError, match="no_rankings_here.*no summary.json"):
    reward_model.train_and_evaluate(c, str(tmp_path / "e"))
  c.data.rankings_dir = ""
  c.data.train_file = str(chain["root"] / "rankings" / "train.jsonl")
  c.data.valid_file = str(chain["root"] / "rankings" / "validation.jsonl")
  with pytest.raises(ValueError, match="config.data.demonstrations_file is empty"):
    reward_model.train_and_evaluate(c, str(tmp_path / "i"))
  from configs import ppo as ppo_config  # pylint: disable=g-import-not-at-top
  from jaxrlhf import ppo  # pylint: disable=g-import-not-at-top
  c = ppo_config.get_config("test")
  c.data.world_dir = chain["world_dir"]
  c.policy_init_from = str(chain["root"] / "sft" / "hf")
  c.reward_init_from = str(chain["root"] / "reward_model" / "hf")
  c.data.train_file = str(chain["root"] / "world" / "ppo" / "train.jsonl")
  with pytest.raises(ValueError, match="config.data.train_file is set but "
                                       "config.data.valid_file is empty"):
    ppo.train_and_evaluate(c, str(tmp_path / "j"))
  c.data.valid_file = str(chain["root"] / "world" / "ppo" / "validation.jsonl")
  with pytest.raises(ValueError, match="config.ptx.data.train_file is empty while the "
                                       "prompts are your own"):
    ppo.train_and_evaluate(c, str(tmp_path / "k"))
  # A reward model given as the policy: the error names the flag that was set.
  c = ppo_config.get_config("test")
  c.data.world_dir = chain["world_dir"]
  c.policy_init_from = c.reward_init_from = str(chain["root"] / "reward_model" / "hf")
  with pytest.raises(ValueError, match=r"^config.policy_init_from='.*' holds a "
                                       r"scalar-head model"):
    ppo.train_and_evaluate(c, str(tmp_path / "l"))


def test_every_stage_left_checkpoints_and_an_export(chain):
  for stage in chain["config"].stages:
    if stage in ("rankings", "evaluate"):  # train nothing; checked on their own
      continue
    stage_dir = chain["root"] / stage
    assert (stage_dir / "summary.json").exists(), stage
    assert any((stage_dir / "checkpoints").iterdir()), stage
    assert (stage_dir / "hf" / "model.safetensors").exists(), stage
  assert (chain["root"] / "ppo" / "hf_ema" / "model.safetensors").exists()


def test_ppo_stages_ran_with_and_without_pretraining_mix(chain):
  assert chain["ppo"]["ptx_coef"] == 0.0
  assert chain["ppo_ptx"]["ptx_coef"] > 0.0
  for stage in ("ppo", "ppo_ptx"):
    train = chain[stage]["final_train"]
    # The sampler and learner share one forward pass: ratio 1 on the first minibatch.
    assert train["first_minibatch_log_ratio_abs_max"] < 1e-4
    assert np.isfinite(train["kl_k1"]) and np.isfinite(train["score"])


def test_rerunning_the_pipeline_skips_finished_stages(chain, capsys):
  summaries = instructgpt.train_and_evaluate(chain["config"], str(chain["root"]))
  out = capsys.readouterr().out
  for stage in chain["config"].stages:
    assert f"{stage}: already finished" in out
  assert summaries["sft"]["final_eval"] == chain["sft"]["final_eval"]


def test_scoring_entry_point_writes_normalised_scores(chain, tmp_path):
  from configs import score as score_config
  from jaxrlhf import reward_model
  demos = (chain["root"] / "world" / "sft" / "train.jsonl").read_text().splitlines()[:10]
  pairs = tmp_path / "pairs.jsonl"
  pairs.write_text("\n".join(demos) + "\n")
  config = score_config.get_config()
  config.reward_model = str(chain["root"] / "reward_model" / "hf")
  config.input_file = str(pairs)
  config.output_file = str(tmp_path / "scores.jsonl")
  config.per_device_batch_size = 2  # 10 pairs: the last batch is padded
  summary = reward_model.score_file(config)
  rows = [json.loads(line) for line in (tmp_path / "scores.jsonl").read_text().splitlines()]
  assert summary["scored"] == len(rows) == 10
  assert [r["prompt"] for r in rows] == [json.loads(d)["prompt"] for d in demos]
  # Scores equal the model's own forward pass at each sequence's EOS.
  model, params = models.from_pretrained(config.reward_model)
  tokenizer = models.load_tokenizer(config.reward_model)
  ids = tokenizer(rows[3]["prompt"])["input_ids"] + tokenizer(
      rows[3]["response"], add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
  direct = model.apply({"params": params}, np.asarray([ids], np.int32))[0, -1]
  np.testing.assert_allclose(rows[3]["score"], float(direct), atol=1e-5)
  config.reward_model = str(chain["root"] / "sft" / "hf")
  with pytest.raises(ValueError, match="not a reward model"):
    reward_model.score_file(config)


def test_normalisation_to_unit_std_on_policy_samples():
  from jaxrlhf import reward_model
  rng = np.random.default_rng(0)
  demos, samples = rng.normal(2.0, 3.0, 50), rng.normal(-1.0, 0.5, 80)
  gain, bias = reward_model.fit_normalization(demos)
  assert gain == 1.0 and abs(np.mean(demos * gain + bias)) < 1e-9
  gain, bias = reward_model.fit_normalization(demos, samples)
  normed = samples * gain + bias
  assert abs(normed.mean()) < 1e-9 and abs(normed.std() - 1.0) < 1e-9


def test_pipeline_seed_moves_every_training_seed_but_not_the_world():
  from configs import instructgpt as pipeline_config
  config = pipeline_config.get_config("test")
  root = pathlib.Path("/unused")
  base = {name: instructgpt.stage_config(config, name, root).seed
          for name in config.stages if name != "evaluate"}
  config.seed = 3
  for name, seed in base.items():
    stage = instructgpt.stage_config(config, name, root)
    assert stage.seed == seed + 3, name
    assert stage.data.world.seed == config.world.seed == 0, name
  assert instructgpt.stage_config(config, "evaluate", root).seed == 0


def test_every_summary_reads_through_its_typed_view(chain):
  # jaxrlhf/summaries.py names every key the stages write: a key renamed in a stage
  # shows up here as a missing (NaN) figure.
  from jaxrlhf import summaries
  kinds = {"pretrain": summaries.LanguageModel, "sft": summaries.LanguageModel,
           "rankings": summaries.Rankings, "reward_model": summaries.RewardModel,
           "ppo": summaries.PPO, "ppo_ptx": summaries.PPO, "evaluate": summaries.Evaluation}
  for name, cls in kinds.items():
    view = summaries.view(name, chain[name])
    assert isinstance(view, cls), name
    if name == "evaluate":
      lines = view.lines()
      assert [line.split(":")[0].strip() for line in lines] == list(chain[name]["policy_order"])
      assert "(baseline)" in lines[0] and all("%" in line for line in lines[1:])
      continue
    values = [v for v in dataclasses.asdict(view).values() if isinstance(v, float)]
    assert values and not any(np.isnan(values)), (name, view)
    assert "nan" not in view.describe(), (name, view.describe())
  ppo = summaries.view("ppo", chain["ppo"])
  assert ppo.ema_score == chain["ppo"]["final_eval"]["eval_ema_score"]
  assert f"{ppo.ema_score:.3f}" in ppo.describe()
