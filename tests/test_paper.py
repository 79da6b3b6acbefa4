"""The paper-scale miniature's pieces (configs/instructgpt.py:paper): its wiring, rankings
from a mix of policies, rounds of rankings read together, more ranked prompts."""

import dataclasses
import json

import ml_collections
import pytest
from etils import epath

from configs import instructgpt as instructgpt_config
from configs import rankings as rankings_config
from configs import reward_model as rm_config
from jaxrlhf import config_lib
from jaxrlhf import data_lib
from jaxrlhf import instructgpt
from jaxrlhf import models
from jaxrlhf import rankings
from jaxrlhf.data.world import world as world_lib


def test_the_paper_pipeline_wires_each_stage_to_its_inputs():
  config = instructgpt_config.get_config("paper")
  root = epath.Path("/run")
  stage = {name: instructgpt.stage_config(config, name, root) for name in config.stages}
  # A larger reward-model trunk, pretrained on the same corpus, fine-tuned on the
  # demonstrations; both reward models start from it.
  policy_shape, rm_shape = config.pretrain.model, config.pretrain_rm.model
  assert rm_shape.hidden_size > policy_shape.hidden_size
  assert rm_shape.num_layers > policy_shape.num_layers
  assert stage["pretrain_rm"].data.train_file == stage["pretrain"].data.train_file
  assert stage["sft_rm"].init_from == "/run/pretrain_rm/hf"
  # What each does, and what its console lines call it.
  assert (stage["pretrain_rm"].stage, stage["pretrain_rm"].name) == ("pretrain", "pretrain_rm")
  assert (stage["sft_rm"].stage, stage["sft_rm"].name) == ("sft", "sft_rm")
  assert stage["reward_model_round2"].name == "reward_model_round2"
  assert stage["reward_model"].init_from == "/run/sft_rm/hf"
  assert stage["reward_model_round2"].init_from == "/run/sft_rm/hf"
  # Round 1 from SFT and the few-shot base model; round 2 from the first PPO policy.
  assert stage["rankings"].policy == "sft=/run/sft/hf,base=/run/pretrain/hf"
  assert stage["rankings"].few_shot == "base"
  assert stage["ppo_round1"].reward_init_from == "/run/reward_model/hf"
  assert stage["rankings_round2"].policy == "sft=/run/sft/hf,ppo=/run/ppo_round1/hf_ema"
  assert (stage["rankings"].prompts_from, stage["rankings"].prompts_to) == (0.0, 0.5)
  assert (stage["rankings_round2"].prompts_from, stage["rankings_round2"].prompts_to) == (
      0.5, 1.0)
  assert stage["reward_model_round2"].data.rankings_dir == "/run/rankings,/run/rankings_round2"
  for name in ("ppo", "ppo_ptx"):
    assert stage[name].reward_init_from == "/run/reward_model_round2/hf"
    assert stage[name].policy_init_from == "/run/sft/hf"
  assert stage["evaluate"].reward_model == "/run/reward_model_round2/hf"
  # 10x the ranked prompts; the other datasets as :tiny's.
  world = world_lib.WorldConfig.from_dict(config.world.to_dict())
  tiny = world_lib.WorldConfig.from_dict(instructgpt_config.get_config("tiny").world.to_dict())
  assert world.num_prompts("rm", "train") == 10 * tiny.num_prompts("rm", "train")
  assert world.num_prompts("ppo", "train") == tiny.num_prompts("ppo", "train")
  # PPO in the paper's proportions: 8 minibatches an iteration, one pass.
  for name in ("ppo_round1", "ppo", "ppo_ptx"):
    assert stage[name].batch_size == 8 * stage[name].minibatch_size
    assert stage[name].num_ppo_epochs == 1
  assert stage["ppo_round1"].ptx.coef == 0 and stage["ppo_ptx"].ptx.coef > 0
  # The final policies at twice the first round's KL coefficient.
  for name in ("ppo", "ppo_ptx"):
    assert stage[name].kl.init_coef == 2 * stage["ppo_round1"].kl.init_coef
  for name in config.stages:  # every stage has a module to run it
    assert name in instructgpt.STAGES


def test_the_reward_models_trunk_is_pretrained_on_the_corpus_then_fine_tuned(tmp_path):
  from jaxrlhf import sft  # pylint: disable=g-import-not-at-top
  config = instructgpt_config.get_config("paper_test")
  tokenizer = models.load_tokenizer(config.sft.tokenizer)
  sizes = {}
  for name in ("pretrain", "pretrain_rm", "sft", "sft_rm"):
    stage = instructgpt.stage_config(config, name, tmp_path)
    sizes[name] = sft.stage_data(stage, tokenizer, tmp_path).num_train_examples
  world = json.loads((tmp_path / "world" / "world.json").read_text())["sizes"]
  assert sizes["pretrain_rm"] == sizes["pretrain"] == world["pretrain/train"]
  assert sizes["sft_rm"] == sizes["sft"] == world["sft/train"]


def test_wiring_a_field_the_stage_lacks_is_a_config_error():
  config = instructgpt_config.get_config("paper_test")
  config.wiring.reward_model.init_form = "sft/hf"
  with pytest.raises(config_lib.ConfigError, match="config.wiring.reward_model.init_form"):
    instructgpt.stage_config(config, "reward_model", epath.Path("/run"))


@pytest.fixture(scope="module")
def mixed_rankings(chain, tmp_path_factory):
  root = chain["root"]
  config = rankings_config.get_config("test")
  config.policy = f"sft={root / 'sft' / 'hf'},base={root / 'pretrain' / 'hf'}"
  config.few_shot = "base"
  config.prompts_to = 0.5
  config.data.world = chain["config"].world
  config.data.world_dir = chain["world_dir"]
  workdir = tmp_path_factory.mktemp("mixed_rankings")
  return workdir, rankings.collect(config, str(workdir))


def test_rankings_from_a_mix_of_policies_name_who_wrote_each_answer(chain, mixed_rankings):
  workdir, summary = mixed_rankings
  records = [json.loads(line) for line in (workdir / "train.jsonl").read_text().splitlines()]
  assert all(len(r["policies"]) == len(r["responses"]) for r in records)
  authors = [a for r in records for a in r["policies"]]
  assert set(authors) == {"sft", "base"}
  # Each answer's author drawn at random: neither writes almost all of them.
  assert 0.3 < authors.count("base") / len(authors) < 0.7
  # Half the prompts: those the single-policy stage ranked first.
  world_prompts = (epath.Path(chain["world_dir"]) / "rm" / "train.jsonl").read_text()
  first_half = [json.loads(line)["id"] for line in world_prompts.splitlines()]
  first_half = first_half[:round(0.5 * len(first_half))]
  written = summary["train"]["written"] + summary["train"]["skipped/all_tied"]
  assert written == len(first_half)
  assert {r["id"] for r in records} <= set(first_half)
  assert summary["policy"] == f"sft={chain['root'] / 'sft' / 'hf'},base={chain['root'] / 'pretrain' / 'hf'}"


def test_a_reward_model_reads_rounds_of_rankings_together(chain, mixed_rankings):
  workdir, summary = mixed_rankings
  config = rm_config.get_config("test")
  config.data.rankings_dir = f"{chain['root'] / 'rankings'},{workdir}"
  config.data.world = chain["config"].world
  config.data.world_dir = chain["world_dir"]
  tokenizer = models.load_tokenizer(config.tokenizer)
  data = data_lib.ranking_data(config, tokenizer, workdir)
  one = chain["rankings"]["train"]["written"]
  assert data.num_train_examples == one + summary["train"]["written"]
  agreements = [chain["rankings"]["labeler_agreement"], summary["labeler_agreement"]]
  assert data.labeler_agreement == pytest.approx(sum(agreements) / 2)
  config.data.rankings_dir = f"{chain['root'] / 'rankings'},{workdir / 'missing'}"
  with pytest.raises(FileNotFoundError, match="missing"):
    data_lib.ranking_data(config, tokenizer, workdir)


@pytest.mark.parametrize("change, error", [
    (dict(few_shot="pretrained"), "name no policy"),
    (dict(prompts_from=0.6, prompts_to=0.5), "0 <= from < to <= 1"),
    (dict(policy="sft=a,sft=b"), "not a new name=dir")])
def test_bad_rankings_mixes_are_config_errors(tmp_path, change, error):
  config = rankings_config.get_config("test")
  config.policy = "sft=a,base=b"
  config.update(change)
  with pytest.raises(config_lib.ConfigError, match=error):
    rankings.collect(config, str(tmp_path))


def test_a_world_written_before_a_knob_existed_is_still_that_world(tmp_path):
  section = ml_collections.ConfigDict({"world": config_lib.world_config(scale=0.002),
                                       "world_dir": str(tmp_path)})
  data_lib.ensure_world(section, tmp_path)
  marker = tmp_path / "world.json"
  written = json.loads(marker.read_text())
  del written["config"]["rm_scale"]  # as a world.json from before rm_scale
  marker.write_text(json.dumps(written))
  data_lib.ensure_world(section, tmp_path)  # accepted: the default is what it used
  section.world.rm_scale = 2.0
  with pytest.raises(config_lib.ConfigError, match="another config"):
    data_lib.ensure_world(section, tmp_path)
  assert dataclasses.asdict(world_lib.WorldConfig())["rm_scale"] == 1.0
