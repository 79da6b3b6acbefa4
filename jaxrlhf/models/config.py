"""TransformerConfig: the frozen description of a decoder-only transformer.

Every model in jaxrlhf (policy, reference, reward, value) is built from one of these; the
architecture-specific layer kinds come from jaxrlhf.models.architectures.
"""

import dataclasses
from typing import Any

import jax.numpy as jnp

from jaxrlhf.models import architectures


REMAT_POLICIES = ("none", "full", "dots")


@dataclasses.dataclass(frozen=True)
class TransformerConfig:
  """Sizes, options and dtypes of a decoder-only transformer."""
  arch: str = "llama"                  # key of architectures.ARCHITECTURES
  vocab_size: int = 32000
  hidden_size: int = 512
  num_layers: int = 8
  num_heads: int = 8
  num_kv_heads: int | None = None      # grouped-query attention; None: num_heads
  head_dim: int | None = None          # None: hidden_size // num_heads
  intermediate_size: int | None = None  # MLP width; None: 4 * hidden_size
  max_position_embeddings: int = 2048  # table size for learned positions
  norm_eps: float = 1e-5
  rope_theta: float = 10000.0          # RoPE base; unused with learned positions
  tie_word_embeddings: bool = True     # logits = hidden @ embedding.T
  qkv_bias: bool = False               # biases on the q, k, v projections
  out_bias: bool = False               # bias on the attention output projection
  mlp_bias: bool = False               # biases on the MLP projections
  dropout_rate: float = 0.0            # embedding and residual-branch dropout
  attention_dropout_rate: float = 0.0  # dropout on attention probabilities
  dtype: Any = jnp.float32             # compute dtype
  param_dtype: Any = jnp.float32       # storage dtype of the parameters
  bos_token_id: int | None = None
  eos_token_id: int | None = None
  pad_token_id: int | None = None
  # Rematerialisation of each decoder layer in the backward pass (a run-time choice, not
  # part of a checkpoint): 'none'; 'full' keeps only each layer's input and recomputes the
  # rest; 'dots' also keeps the matmul outputs that have no batch dimension (the weight
  # matmuls), recomputing norms, activations and attention.
  remat: str = "none"
  # Sequence positions per chunk when log-probabilities are taken (CausalLM.token_logprobs):
  # each chunk's [batch, chunk, vocab] logits are made, read and (in the backward pass)
  # made again, so the [batch, T, vocab] float32 array never exists; 0: the full logits.
  # A run-time choice, like remat.
  logits_chunk: int = 0
  # The decoder layers as one layer scanned num_layers times (params stacked on a leading
  # layer axis): one layer compiled instead of num_layers, and under fsdp one layer's
  # weights gathered at a time. A run-time choice: Hugging Face checkpoints hold the
  # layers one by one whichever (models/hf.py stacks and unstacks them).
  scan_layers: bool = False

  def __post_init__(self):
    spec = architectures.get_arch(self.arch)
    if not isinstance(self.scan_layers, bool):
      raise ValueError(f"TransformerConfig: scan_layers must be True or False, got "
                       f"{self.scan_layers!r}")
    if not isinstance(self.logits_chunk, int) or self.logits_chunk < 0:
      raise ValueError(f"TransformerConfig: logits_chunk must be an integer >= 0, got "
                       f"{self.logits_chunk!r}")
    if self.remat not in REMAT_POLICIES:
      raise ValueError(f"TransformerConfig: remat must be one of {REMAT_POLICIES}, got "
                       f"{self.remat!r}")
    # Fill the derived sizes so that every reader sees plain ints.
    if self.num_kv_heads is None:
      object.__setattr__(self, "num_kv_heads", self.num_heads)
    if self.head_dim is None:
      object.__setattr__(self, "head_dim", self.hidden_size // self.num_heads)
    if self.intermediate_size is None:
      object.__setattr__(self, "intermediate_size", 4 * self.hidden_size)
    if self.num_heads % self.num_kv_heads:
      raise ValueError(
          f"TransformerConfig: num_heads={self.num_heads} must be a multiple of "
          f"num_kv_heads={self.num_kv_heads}")
    if spec.positions == "rope" and self.head_dim % 2:
      raise ValueError(f"TransformerConfig: RoPE needs an even head_dim, got {self.head_dim}")
    for field, value in spec.fixed.items():
      if getattr(self, field) != value:
        raise ValueError(
            f"TransformerConfig: arch {self.arch!r} requires {field}={value}, "
            f"got {getattr(self, field)}")

  @property
  def spec(self) -> architectures.ArchSpec:
    return architectures.get_arch(self.arch)

  def replace(self, **changes) -> "TransformerConfig":
    return dataclasses.replace(self, **changes)

  @classmethod
  def for_arch(cls, arch: str, **fields) -> "TransformerConfig":
    """A config with the fields the architecture pins (biases) already set."""
    return cls(arch=arch, **{**architectures.get_arch(arch).fixed, **fields})

  @classmethod
  def tiny(cls, arch: str = "llama", vocab_size: int = 128, **fields) -> "TransformerConfig":
    """Two layers, hidden size 32: for tests and smoke runs."""
    grouped = architectures.get_arch(arch).positions == "rope"
    defaults = dict(
        vocab_size=vocab_size, hidden_size=32, num_layers=2, num_heads=4,
        num_kv_heads=2 if grouped else 4, head_dim=8, intermediate_size=64,
        max_position_embeddings=128)
    return cls.for_arch(arch, **{**defaults, **fields})
