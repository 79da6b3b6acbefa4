r"""Policies against a baseline on held-out prompts: win rates, Likert, KL, alignment tax.

After a pipeline run (`make demo` writes runs/demo), the paper's comparison:
  python -m experiments.compare_policies --config=configs/compare_policies.py \
      --config.policies=sft=runs/demo/sft/hf,ppo=runs/demo/ppo/hf_ema,ppo_ptx=runs/demo/ppo_ptx/hf_ema \
      --config.few_shot.base=runs/demo/pretrain/hf --config.world_dir=runs/demo/world \
      --config.reward_model=runs/demo/reward_model/hf --workdir=/tmp/compare
  Writes results.json, responses.jsonl and report.md (with plots/) to the workdir and
  prints each policy's win rate against SFT judged by the world's labeler, with a 95%
  interval. The pipeline's last stage runs exactly this (`evaluate`).

Real data, where no labeler exists (win rate judged by a reward model):
  python -m experiments.compare_policies --config=configs/compare_policies.py \
      --config.policies=sft=/ckpt/sft,ppo=/ckpt/ppo --config.judge=reward_model \
      --config.reward_model=/ckpt/rm --config.prompts_file=test_prompts.jsonl \
      --config.pretrain_file=held_out_text.jsonl --workdir=/tmp/compare
"""

import ml_collections

from jaxrlhf import config_lib


def get_config(arg=None):
  del arg
  config = ml_collections.ConfigDict()
  config.policies = ""  # "name=hf_dir,name=hf_dir", in table order (causal LMs).
  config.baseline = "sft"  # Win rates are against this policy's answers.
  config.reference = "sft"  # KL is from this policy ('' = no KL).
  config.judge = "labeler"  # 'labeler' (the embedded world's) or 'reward_model'.
  config.reward_model = ""  # RM export: RM-judged win rate and mean score ('' = none).
  # World rankings JSONL (with task fields) on which to check the reward model against
  # the labeler's noiseless quality ('' = none; the pipeline passes the RM's held-out set).
  config.rankings_file = ""
  config.tokenizer = ""  # Tokenizer directory; '' = the baseline policy's.
  config.prompts_file = ""  # Prompts JSONL (comma-separated list, globs); '' = world test.
  config.world_dir = ""  # A written world (<pipeline workdir>/world) for '' files.
  config.world = config_lib.world_config()  # Its config, if world.json lacks the labeler.
  config.pretrain_file = ""  # Held-out text JSONL for the alignment tax; '' = world's.
  config.num_text_batches = 0  # Held-out text batches (0 = all).
  config.num_prompts = 0  # Prompts used (0 = all).
  config.max_prompt_len = 32  # Prompt tokens kept (left-truncated).
  config.max_response_len = 16  # Tokens sampled per answer, stop token included.
  # Batches cut to multiples of this many tokens that hold their longest example
  # (a few shapes, each compiled once; data/buckets.py); 0 = the budget's shape.
  config.length_bucket = 8  # Prompts: their left padding.
  config.max_text_len = 64  # Held-out text sequence length.
  config.temperature = 1.0  # Sampling temperature (KL is measured at it too).
  config.top_k = 0  # 0 = off.
  config.top_p = 1.0  # 1 = off.
  config.greedy = False  # Greedy answers instead of samples.
  config.per_device_batch = 32  # Rows per device per compiled call.
  config.seed = 0  # Sampling keys, few-shot example choice, labeler noise.
  config.parallel = config_lib.parallel_config()  # pmap, or a sharded mesh.
  config.num_sample_texts = 6  # Prompts whose answers appear in the report.
  # Labeler judge only: n more baseline answers per prompt; the best of 1, 2, 4 .. n by the
  # reward model and by the labeler's noiseless quality, judged against the baseline
  # (0 = off; a power of two).
  config.best_of_n = 0

  config.few_shot = ml_collections.ConfigDict()
  config.few_shot.base = ""  # Base (pretrained) model prompted few-shot; '' = none.
  config.few_shot.name = "base_few_shot"  # Its row in the table.
  config.few_shot.num_shots = 2  # Demonstrations shown before each prompt.
  config.few_shot.examples_file = ""  # Demonstrations JSONL; '' = the world's SFT train.
  config.few_shot.max_prompt_len = 64  # Few-shot prompts are longer.

  config.report_dir = ""  # Where report.md and plots/ go; '' = the workdir.
  config.pipeline_dir = ""  # A pipeline workdir: adds PPO curves and stage summaries.
  return config
