r"""The whole InstructGPT recipe on the embedded world, one stage after another.

  python -m experiments.instructgpt --config=configs/instructgpt.py:tiny --workdir=/tmp/run
  (`make demo` runs exactly this into runs/demo.) Each stage writes <workdir>/<stage>/,
  with TensorBoard logs in <stage>/tb and the final weights in <stage>/hf; rerunning the
  command skips finished stages and resumes an interrupted one. The last stage judges
  SFT, PPO, PPO-ptx and the few-shot base model on held-out prompts and writes
  <workdir>/report.md: expect PPO-ptx to win against SFT and to pay a smaller alignment
  tax (held-out text NLL above SFT's) than PPO.
"""

import ml_collections

from configs import pretrain as pretrain_config
from configs import compare_policies as compare_config
from configs import ppo as ppo_config
from configs import rankings as rankings_config
from configs import reward_model as rm_config
from configs import sft as sft_config
from jaxrlhf import config_lib


def get_config(arg=None):
  variant = arg or "tiny"
  if variant not in ("tiny", "test"):
    raise ValueError(f"configs/instructgpt.py: unknown variant {variant!r}; use tiny or test")
  config = ml_collections.ConfigDict()
  config.stages = ("pretrain", "sft", "flan", "rankings", "reward_model", "ppo", "ppo_ptx",
                   "evaluate")  # Run in order.
  # Added to every training stage's own seed (init, data order, sampling); the world
  # (config.world.seed) and the evaluation's sampling and labeler noise stay fixed, so
  # two seeds differ only in how the models were trained.
  config.seed = 0
  # Every stage's config.parallel when mode is set ('pmap' or 'mesh'); '' = each
  # stage's own section. E.g. --config.parallel.mode=mesh --config.parallel.mesh=fsdp=8.
  config.parallel = config_lib.parallel_config()
  config.parallel.mode = ""
  # One world for every stage (its sections' own `data.world` are replaced by this).
  config.world = config_lib.world_config(scale=0.002 if variant == "test" else 0.05)
  config.pretrain = pretrain_config.get_config(variant)
  config.sft = sft_config.get_config(variant)
  # The FLAN/T0-style baseline: SFT's settings and budget on the public-task collection.
  config.flan = sft_config.get_config(variant)
  config.flan.stage = "flan"
  config.rankings = rankings_config.get_config(variant)
  config.reward_model = rm_config.get_config(variant)
  config.ppo = ppo_config.get_config(variant)
  config.ppo.ptx.coef = 0.0  # Plain PPO.
  config.ppo_ptx = ppo_config.get_config("test" if variant == "test" else "tiny_ptx")
  config.ppo_ptx.stage = "ppo_ptx"
  # Policies, few-shot base model, reward model and world are filled in by the pipeline.
  config.evaluate = compare_config.get_config()
  config.evaluate.max_prompt_len = config.ppo.data.max_prompt_len
  config.evaluate.max_response_len = config.ppo.data.max_response_len
  config.evaluate.max_text_len = config.ppo.ptx.data.max_seq_len
  config.evaluate.temperature = config.ppo.rollout.temperature
  # Best of 1..16 SFT answers by the reward model and by the labeler: how far optimising
  # this reward model can take a policy.
  config.evaluate.best_of_n = 2 if variant == "test" else 16
  if variant == "test":
    config.evaluate.few_shot.max_prompt_len = 48
    config.evaluate.per_device_batch = 4
    config.evaluate.num_text_batches = 1
  return config
