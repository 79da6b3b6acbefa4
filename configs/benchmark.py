r"""Throughput benchmark: every stage, MFU, and transformers' PyTorch models side by side.

  python -m experiments.benchmark --config=configs/benchmark.py:gpt2 --workdir=/tmp/bench

Variants: `tiny` (seconds; what the test runs), `gpt2` (GPT-2 small, 124M), `llama_small`
(Llama-shaped, GQA, untied, of about the same size). Random weights and tokens, float32,
one jax device unless `--config.num_devices` says otherwise. Prints a table and writes
the JSON to <workdir>/benchmark.json (or `--config.output`); with a workdir the compiled
steps are cached in <workdir>/jax_cache, so a second run reports near-zero compile times.
Expect jaxrlhf to lead transformers most on sampling (one compiled while_loop over the
KV cache against a Python loop of small ops).
"""

import ml_collections

from jaxrlhf import config_lib


def get_config(arg=None):
  variant = arg or "tiny"
  config = ml_collections.ConfigDict()
  config.model_name = variant  # For the report.
  config.seed = 0  # Random weights, tokens and sampling keys.
  config.num_devices = 1  # jax devices used (0 = all local ones); the host's CPU is one.
  config.torch = True  # Also measure transformers' PyTorch models when torch imports.
  # Which measurements run: sft, rm, sampler (every batch size), ppo.
  config.sections = ("sft", "rm", "sampler", "ppo")
  config.repeats = 3  # Timed calls per measurement; the median is reported.
  config.warmup = 0  # Untimed calls after the first one (which compiles and warms up).
  config.matmul_size = 2048  # [n, n] @ [n, n] in `dtype` for the peak FLOP/s.
  # Compute dtype of both frameworks: 'bfloat16' is jaxrlhf's mixed precision (bfloat16
  # compute over float32 parameters and AdamW states) and torch.autocast(bfloat16) over
  # float32 parameters; the matmul peak is then measured in bfloat16 too.
  config.dtype = "float32"
  config.torch_device = "cpu"  # 'cpu', 'cuda', or 'auto' (cuda when torch sees one).
  config.output = ""  # JSON path; '' = <workdir>/benchmark.json when a workdir is given.
  config.learning_rate = 1e-5  # AdamW, both frameworks (betas 0.9/0.95, clip 1.0).
  config.weight_decay = 0.01

  config.train_batch_size = 4  # SFT sequences per step.
  config.seq_len = 256  # SFT sequence length.
  config.rm_batch_size = 2  # Prompts per RM step, each with rm_k ranked responses.
  config.rm_k = 4  # Responses per prompt: C(K, 2) comparisons each.
  config.rm_seq_len = 128  # Tokens per response sequence.
  config.prompt_len = 64  # Prompt tokens (sampler and PPO).
  config.new_tokens = 64  # Tokens sampled per prompt (sampler and PPO).
  config.sampler_batch_sizes = (1, 8, 32)  # Rows sampled together.
  config.ppo = True  # Time one PPO iteration.
  config.ppo_batch_size = 8  # Episodes per PPO iteration.
  config.ppo_minibatch_size = 4  # Episodes per PPO update (one epoch).
  config.ppo_kl_coef = 0.02  # beta of the per-token KL penalty (fixed), both frameworks.
  config.ppo_full_iteration = True  # Also time the iteration as one call.

  if variant == "tiny":
    config.model = ml_collections.ConfigDict(dict(
        arch="llama", vocab_size=256, hidden_size=64, num_layers=2, num_heads=4,
        num_kv_heads=2, head_dim=16, intermediate_size=128, max_position_embeddings=128,
        tie_word_embeddings=False))
    config.matmul_size = 512
    config.seq_len = 32
    config.rm_seq_len = 16
    config.prompt_len = 8
    config.new_tokens = 8
  elif variant in ("gpu_gpt2", "gpu_1_3b"):
    # One CUDA GPU, bfloat16 (benchmarks/accelerator.sh runs both in one 10-minute call).
    config.dtype = "bfloat16"
    config.torch_device = "auto"
    config.matmul_size = 8192
    config.repeats, config.warmup = 5, 1
    config.seq_len, config.rm_seq_len, config.rm_k = 1024, 512, 4
    config.prompt_len, config.new_tokens = 128, 128
    config.ppo_batch_size, config.ppo_minibatch_size = 32, 8
    if variant == "gpu_gpt2":
      config.model = config_lib.model_preset("gpt2")
      config.train_batch_size, config.rm_batch_size = 16, 4
    else:  # the 1.3B GPT-3 XL shape of configs/memory.py, its layers scanned
      config.model = config_lib.model_preset("gpt2")
      config.model.update(hidden_size=2048, num_layers=24, num_heads=16, num_kv_heads=16,
                          head_dim=128, intermediate_size=8192, max_position_embeddings=2048)
      config.model.scan_layers = True
      config.train_batch_size, config.rm_batch_size = 8, 2
      config.ppo_full_iteration = False
  elif variant in ("gpt2", "llama_small"):
    config.model = config_lib.model_preset(variant)
    # The one-call iteration costs as much again as its three parts; on 2 CPU cores the
    # parts' sum stands in for it (the tiny run times both).
    config.ppo_full_iteration = False
  else:
    raise ValueError(f"configs/benchmark.py: unknown variant {variant!r}; expected tiny, "
                     "gpt2, llama_small, gpu_gpt2 or gpu_1_3b")
  return config
