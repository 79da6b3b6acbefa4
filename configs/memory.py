r"""Per-device memory of each stage's compiled step, from abstract shapes (benchmarks/memory.py).

  python -m experiments.memory_report --config=configs/memory.py --workdir=/tmp/mem
  python -m experiments.memory_report --config=configs/memory.py:7b --workdir=/tmp/mem7b

Nothing is allocated: each step is compiled for one device from shapes alone and its
memory_analysis() read back. Under pmap (the data-parallel mode) every device holds the
whole state, so a figure holds for any device count. Variants: `default` (GPT-2 small,
the 1.3B GPT-3 XL shape, Llama-3.2-1B and Qwen2.5-1.5B shapes), `7b` (a Llama-2-7B
shape), `tiny` (what the test compiles).
"""

import ml_collections


def _shapes() -> ml_collections.ConfigDict:
  shapes = ml_collections.ConfigDict()
  # GPT-3 XL (Brown et al. 2020, table 2.1): the 1.3B size of InstructGPT's smallest
  # policy, in the GPT-2 architecture (learned positions, tied embeddings).
  shapes.gpt3_xl_1_3b = dict(arch="gpt2", vocab_size=50257, hidden_size=2048, num_layers=24,
                             num_heads=16, num_kv_heads=16, head_dim=128,
                             intermediate_size=8192, max_position_embeddings=2048,
                             tie_word_embeddings=True)
  # Llama-3.2-1B's config.json shape (RoPE scaling aside: it does not change memory).
  shapes.llama_3_2_1b = dict(arch="llama", vocab_size=128256, hidden_size=2048,
                             num_layers=16, num_heads=32, num_kv_heads=8, head_dim=64,
                             intermediate_size=8192, max_position_embeddings=131072,
                             rope_theta=500000.0, tie_word_embeddings=True)
  # Qwen2.5-1.5B's config.json shape.
  shapes.qwen2_5_1_5b = dict(arch="qwen2", vocab_size=151936, hidden_size=1536,
                             num_layers=28, num_heads=12, num_kv_heads=2, head_dim=128,
                             intermediate_size=8960, max_position_embeddings=32768,
                             rope_theta=1000000.0, tie_word_embeddings=True)
  # Llama-2-7B's config.json shape.
  shapes.llama_2_7b = dict(arch="llama", vocab_size=32000, hidden_size=4096, num_layers=32,
                           num_heads=32, num_kv_heads=32, head_dim=128,
                           intermediate_size=11008, max_position_embeddings=4096,
                           tie_word_embeddings=False)
  shapes.tiny = dict(arch="llama", vocab_size=256, hidden_size=32, num_layers=2,
                     num_heads=4, num_kv_heads=2, head_dim=8, intermediate_size=64,
                     max_position_embeddings=64, tie_word_embeddings=True)
  return shapes


def get_config(arg=None):
  variant = arg or "default"
  config = ml_collections.ConfigDict()
  config.models = ("gpt2", "gpt3_xl_1_3b", "llama_3_2_1b", "qwen2_5_1_5b")
  config.shapes = _shapes()
  config.stages = ("sft", "rm", "ppo_ptx")
  # 'pmap' (every device holds the whole state: one device is compiled for) or 'mesh'
  # over config.mesh (as config.parallel.mesh; needs that many devices, e.g. forced CPU
  # ones: XLA_FLAGS=--xla_force_host_platform_device_count=8).
  config.mode = "pmap"
  config.mesh = "fsdp=-1"
  config.dtype = "bfloat16"  # Compute dtype.
  config.param_dtype = "float32"  # Master parameters and optimizer states.
  config.remat = "none"  # config.model.remat of the stages.
  config.logits_chunk = 0  # config.model.logits_chunk of the stages.
  config.scan_layers = False  # config.model.scan_layers of the stages.
  config.frozen_dtype = ""  # PPO's config.frozen_dtype ('' = param_dtype).
  # Per device: SFT/pretraining sequences and their length; RM prompts x K responses.
  config.batch = 1
  config.seq_len = 1024
  config.rm_batch = 1
  config.rm_k = 4
  config.rm_seq_len = 512
  # PPO-ptx per device: episodes, minibatch, prompt and response tokens, ptx sequences.
  config.ppo_batch = 2
  config.ppo_minibatch = 1
  config.prompt_len = 512
  config.new_tokens = 256
  config.ptx_batch = 1
  if variant == "7b":
    config.models = ("llama_2_7b",)
  elif variant == "mesh":  # the default models, fsdp over 8 devices
    config.mode, config.mesh = "mesh", "fsdp=8"
  elif variant == "7b_mesh":  # 7B, fsdp over 64 devices
    config.models = ("llama_2_7b",)
    config.mode, config.mesh = "mesh", "fsdp=64"
  elif variant == "tiny_mesh":
    config.models = ("tiny",)
    config.dtype = "float32"
    config.seq_len, config.rm_seq_len, config.prompt_len, config.new_tokens = 32, 16, 8, 4
    config.mode, config.mesh = "mesh", "fsdp=-1"
  elif variant == "tiny":
    config.models = ("tiny",)
    config.dtype = "float32"
    config.seq_len, config.rm_seq_len, config.prompt_len, config.new_tokens = 32, 16, 8, 4
  elif variant != "default":
    raise ValueError(f"configs/memory.py: unknown variant {variant!r}; use default, 7b, "
                     "tiny, mesh, 7b_mesh or tiny_mesh")
  return config
