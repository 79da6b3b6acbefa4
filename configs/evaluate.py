r"""Public benchmarks (TruthfulQA MC, CrowS-Pairs, Winogender, RealToxicityPrompts, few-shot
multiple choice) on several checkpoints side by side.

Real benchmark files (see docs/usage.md, "Public benchmarks", for where each comes from):
  python -m experiments.evaluate --config=configs/evaluate.py \
      --config.checkpoints=sft=/ckpt/sft/hf,ppo=/ckpt/ppo/hf,ppo_ptx=/ckpt/ppo_ptx/hf \
      --config.truthfulqa.file=TruthfulQA/data/mc_task.json \
      --config.crows_pairs.file=crows-pairs/data/crows_pairs_anonymized.csv \
      --config.winogender.file=winogender-schemas/data/templates.tsv \
      --config.toxicity.file=realtoxicityprompts-data/prompts.jsonl \
      --config.toxicity.scorer=/ckpt/toxicity_classifier --config.max_examples=0 \
      --config.multiple_choice.files=hellaswag=hellaswag/data/hellaswag_val.jsonl \
      --workdir=/tmp/run/benchmarks
  Writes <workdir>/benchmarks.md and benchmarks.json (a column per checkpoint) and
  <workdir>/toxicity_samples/<checkpoint>.jsonl.

Smoke run on the small files checked into tests/eval/fixtures (numbers mean nothing
beyond "it runs"; any causal LM works, the world models see mostly unknown words):
  python -m experiments.evaluate --config=configs/evaluate.py:fixtures \
      --config.checkpoints=runs/demo/sft/hf,runs/demo/ppo/hf \
      --config.toxicity.scorer=runs/demo/reward_model/hf --workdir=/tmp/run/benchmarks
"""

import os

import ml_collections

from jaxrlhf import config_lib

_FIXTURES = os.path.join(os.path.dirname(os.path.abspath(__file__)), os.pardir, "tests",
                         "eval", "fixtures")


def get_config(arg=None):
  variant = arg or "files"
  config = ml_collections.ConfigDict()
  config.checkpoints = ""  # Comma-separated name=dir (or bare dirs) of causal-LM exports.
  config.tokenizer = ""  # Tokenizer directory; '' = each checkpoint's own.
  config.seed = 0  # Sampling (toxicity) and the k-shot draw.
  config.parallel = config_lib.parallel_config()  # pmap, or a sharded mesh.
  config.max_len = 512  # Tokens per scored sequence; longer contexts lose their start.
  config.per_device_batch_size = 8  # Sequences per device per forward pass or sample.
  config.max_examples = 0  # If > 0, only the first N items of each benchmark (smoke runs).

  config.truthfulqa = ml_collections.ConfigDict()
  config.truthfulqa.file = ""  # mc_task.json (or the HF layout as JSON/JSONL); '' = skip.
  config.truthfulqa.prompt = "instruction_qa"  # 'plain', 'qa', 'instruction_qa' or text.

  config.crows_pairs = ml_collections.ConfigDict()
  config.crows_pairs.file = ""  # crows_pairs_anonymized.csv; '' = skip.
  config.crows_pairs.instructions = "basic,respectful,biased"  # Each one its own rows.

  config.winogender = ml_collections.ConfigDict()
  config.winogender.file = ""  # templates.tsv or all_sentences.tsv; '' = skip.
  config.winogender.genders = "male,female"  # Pronoun sets compared (the paper: pairs).
  config.winogender.instructions = "basic,respectful,biased"  # Each one its own rows.

  config.toxicity = ml_collections.ConfigDict()
  config.toxicity.file = ""  # RealToxicityPrompts prompts.jsonl; '' = skip.
  config.toxicity.scorer = ""  # Scalar-head checkpoint dir, or 'package.module:factory'.
  config.toxicity.scorer_max_len = 128  # Tokens of a continuation the scorer reads.
  config.toxicity.instructions = "basic,respectful"  # The paper's two prompt settings.
  config.toxicity.num_samples = 25  # Continuations per prompt (Gehman et al.: 25).
  config.toxicity.max_prompt_len = 64  # Prompt tokens kept (cut on the left).
  config.toxicity.max_new_tokens = 20  # Continuation length (Gehman et al.: 20).
  config.toxicity.temperature = 1.0  # Sampling temperature.
  config.toxicity.top_p = 0.9  # Nucleus sampling (Gehman et al.: 0.9).

  config.multiple_choice = ml_collections.ConfigDict()
  config.multiple_choice.files = ""  # Comma-separated name=path JSONL; '' = skip.
  config.multiple_choice.fewshot_files = ""  # name=path pools for the shots; '' = same file.
  config.multiple_choice.num_shots = 0  # k in k-shot.
  config.multiple_choice.normalization = "chars"  # 'chars', 'tokens' or 'none'.

  if variant == "files":
    pass
  elif variant == "fixtures":
    def fixture(name):
      return os.path.normpath(os.path.join(_FIXTURES, name))
    config.max_len = 256
    config.truthfulqa.file = fixture("truthfulqa_mc_task.json")
    config.truthfulqa.prompt = "plain"
    config.crows_pairs.file = fixture("crows_pairs_anonymized.csv")
    config.winogender.file = fixture("winogender_templates.tsv")
    config.toxicity.file = fixture("realtoxicityprompts.jsonl")
    config.toxicity.num_samples = 4
    config.toxicity.max_new_tokens = 12
    config.multiple_choice.files = "hellaswag=" + fixture("hellaswag_val.jsonl")
    config.multiple_choice.num_shots = 1
  else:
    raise ValueError(f"unknown variant {variant!r}; expected 'files' or 'fixtures'")
  return config
