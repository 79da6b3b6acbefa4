"""Flax Linen decoder-only transformer (GPT-2, Llama, Qwen2) with a KV-cache decode path.

One trunk, `Transformer`, under two heads: `CausalLM` (policy, reference, pretraining) and
`ScalarHeadModel` (reward and value models). The sampler drives `CausalLM.decode`.
"""

import functools
from typing import Any

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from jaxrlhf import losses
from jaxrlhf.models.config import TransformerConfig

_INIT_STD = 0.02  # Hugging Face's initializer_range for all three architectures.

_ACTIVATIONS = {
    "gelu_tanh": functools.partial(jax.nn.gelu, approximate=True),  # HF "gelu_new"
    "silu": jax.nn.silu,
}


# ----------------------------------------------------------------------------
# KV cache
# ----------------------------------------------------------------------------


@flax.struct.dataclass
class KVCache:
  """Keys and values of every token written so far, in fixed-size buffers.

  Slot s of every row holds the s-th token fed to `CausalLM.decode` (prompt padding
  included), so all rows write the same slot at each step and shapes never change.
  """
  # Heads before slots, so each decode step's attention reads the buffers as they lie
  # (slots last-but-one) instead of transposing the whole cache in every layer.
  # Per layer [batch, kv_heads, max_len, head_dim]; with config.scan_layers one array
  # [layers, batch, kv_heads, max_len, head_dim], which the scanned layer reads in turn.
  keys: tuple[jax.Array, ...] | jax.Array
  values: tuple[jax.Array, ...] | jax.Array
  mask: jax.Array                # [batch, max_len] bool: slot holds a real (unpadded) token
  lengths: jax.Array             # [batch] int32: real tokens so far = next position id
  index: jax.Array               # [] int32: next slot to write

  @property
  def max_len(self) -> int:
    return self.mask.shape[1]


def init_cache(model_or_config, batch_size: int, max_len: int) -> KVCache:
  """An empty cache for `batch_size` rows of up to `max_len` tokens (prompt + response)."""
  config = getattr(model_or_config, "config", model_or_config)
  shape = (batch_size, config.num_kv_heads, max_len, config.head_dim)
  if config.scan_layers:
    keys = jnp.zeros((config.num_layers,) + shape, config.dtype)
    values = jnp.zeros((config.num_layers,) + shape, config.dtype)
  else:
    keys = tuple(jnp.zeros(shape, config.dtype) for _ in range(config.num_layers))
    values = tuple(jnp.zeros(shape, config.dtype) for _ in range(config.num_layers))
  return KVCache(
      keys=keys, values=values,
      mask=jnp.zeros((batch_size, max_len), bool),
      lengths=jnp.zeros((batch_size,), jnp.int32),
      index=jnp.zeros((), jnp.int32))


def position_ids_from_mask(attention_mask: jax.Array, offset: Any = 0) -> jax.Array:
  """Position of each token among the real tokens of its row, so left padding shifts nothing.

  Padding slots get position 0 (their outputs are never used). `offset` [batch, 1] is the
  number of real tokens already in the cache.
  """
  counts = jnp.cumsum(attention_mask.astype(jnp.int32), axis=1)  # [batch, time]
  return jnp.maximum(offset + counts - 1, 0)


# ----------------------------------------------------------------------------
# Layers
# ----------------------------------------------------------------------------


def _dense(config: TransformerConfig, features: int, use_bias: bool, name: str) -> nn.Dense:
  # Parameters stay in param_dtype; nn.Dense casts them to the compute dtype at the matmul.
  return nn.Dense(
      features, use_bias=use_bias, dtype=config.dtype, param_dtype=config.param_dtype,
      kernel_init=nn.initializers.normal(_INIT_STD), name=name)


class Norm(nn.Module):
  """LayerNorm or RMSNorm (config.spec.norm), statistics in float32."""
  config: TransformerConfig

  @nn.compact
  def __call__(self, x):
    config = self.config
    features = x.shape[-1]
    x32 = x.astype(jnp.float32)
    if config.spec.norm == "layernorm":
      x32 = x32 - x32.mean(-1, keepdims=True)
    y = x32 * jax.lax.rsqrt(jnp.square(x32).mean(-1, keepdims=True) + config.norm_eps)
    scale = self.param("scale", nn.initializers.ones, (features,), config.param_dtype)
    y = y.astype(config.dtype) * scale.astype(config.dtype)
    if config.spec.norm == "layernorm":
      bias = self.param("bias", nn.initializers.zeros, (features,), config.param_dtype)
      y = y + bias.astype(config.dtype)
    return y


def apply_rope(x: jax.Array, positions: jax.Array, theta: float) -> jax.Array:
  """Rotary embedding in Hugging Face's layout: dimension i pairs with i + head_dim / 2.

  x: [batch, time, heads, head_dim]; positions: [batch, time].
  """
  head_dim = x.shape[-1]
  half = head_dim // 2
  inv_freq = 1.0 / (theta ** (jnp.arange(0, head_dim, 2, dtype=jnp.float32) / head_dim))
  angles = positions[..., None].astype(jnp.float32) * inv_freq  # [batch, time, half]
  sin = jnp.sin(angles)[:, :, None, :]
  cos = jnp.cos(angles)[:, :, None, :]
  x32 = x.astype(jnp.float32)
  first, second = x32[..., :half], x32[..., half:]
  rotated = jnp.concatenate([first * cos - second * sin, second * cos + first * sin], -1)
  return rotated.astype(x.dtype)


class Attention(nn.Module):
  """Causal self-attention with grouped-query heads, optionally through a KV cache."""
  config: TransformerConfig

  @nn.compact
  def __call__(self, x, positions, mask, deterministic, layer_cache=None):
    # x: [batch, time, hidden]; mask: [batch, time, keys] bool.
    config = self.config
    batch, time, _ = x.shape
    groups = config.num_heads // config.num_kv_heads
    q = _dense(config, config.num_heads * config.head_dim, config.qkv_bias, "q")(x)
    k = _dense(config, config.num_kv_heads * config.head_dim, config.qkv_bias, "k")(x)
    v = _dense(config, config.num_kv_heads * config.head_dim, config.qkv_bias, "v")(x)
    q = q.reshape(batch, time, config.num_heads, config.head_dim)
    k = k.reshape(batch, time, config.num_kv_heads, config.head_dim)
    v = v.reshape(batch, time, config.num_kv_heads, config.head_dim)
    if config.spec.positions == "rope":
      q = apply_rope(q, positions, config.rope_theta)
      k = apply_rope(k, positions, config.rope_theta)

    # Heads first: [batch, kv_heads, time, head_dim], the cache's layout.
    k, v = k.transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3)
    new_layer_cache = None
    if layer_cache is not None:
      cached_k, cached_v, index = layer_cache
      k = jax.lax.dynamic_update_slice(cached_k, k.astype(cached_k.dtype), (0, 0, index, 0))
      v = jax.lax.dynamic_update_slice(cached_v, v.astype(cached_v.dtype), (0, 0, index, 0))
      new_layer_cache = (k, v)

    # Query head h reads kv head h // groups, as in Hugging Face's repeat_kv.
    q = q.reshape(batch, time, config.num_kv_heads, groups, config.head_dim)
    scores = jnp.einsum("btkgd,bksd->bkgts", q, k.astype(q.dtype)).astype(jnp.float32)
    scores = scores * config.head_dim**-0.5
    # A finite floor, not -inf: fully padded query rows then average instead of giving NaN,
    # which would leak into gradients through the masked loss.
    scores = jnp.where(mask[:, None, None], scores, jnp.finfo(jnp.float32).min)
    probs = jax.nn.softmax(scores, axis=-1)
    probs = nn.Dropout(config.attention_dropout_rate)(probs, deterministic=deterministic)
    out = jnp.einsum("bkgts,bksd->btkgd", probs.astype(config.dtype), v.astype(config.dtype))
    out = out.reshape(batch, time, config.num_heads * config.head_dim)
    out = _dense(config, config.hidden_size, config.out_bias, "o")(out)
    return out, new_layer_cache


class Mlp(nn.Module):
  """GELU MLP (GPT-2) or SwiGLU (Llama, Qwen2)."""
  config: TransformerConfig

  @nn.compact
  def __call__(self, x):
    config = self.config
    activation = _ACTIVATIONS[config.spec.activation]
    hidden = _dense(config, config.intermediate_size, config.mlp_bias, "up")(x)
    if config.spec.gated_mlp:
      gate = _dense(config, config.intermediate_size, config.mlp_bias, "gate")(x)
      hidden = activation(gate) * hidden
    else:
      hidden = activation(hidden)
    return _dense(config, config.hidden_size, config.mlp_bias, "down")(hidden)


class DecoderLayer(nn.Module):
  """Pre-norm block: x + attn(norm(x)), then x + mlp(norm(x))."""
  config: TransformerConfig

  @nn.compact
  def __call__(self, x, positions, mask, deterministic, layer_cache=None):
    config = self.config
    h, new_layer_cache = Attention(config, name="attn")(
        Norm(config, name="attn_norm")(x), positions, mask, deterministic, layer_cache)
    x = x + nn.Dropout(config.dropout_rate)(h, deterministic=deterministic)
    h = Mlp(config, name="mlp")(Norm(config, name="mlp_norm")(x))
    x = x + nn.Dropout(config.dropout_rate)(h, deterministic=deterministic)
    return x, new_layer_cache


# ----------------------------------------------------------------------------
# Trunk and heads
# ----------------------------------------------------------------------------


def _layer_class(remat: str):
  """DecoderLayer, rematerialised in the backward pass as `remat` says (see
  TransformerConfig.remat); the parameters are the same whichever."""
  if remat == "none":
    return DecoderLayer
  policy = (None if remat == "full"
            else jax.checkpoint_policies.dots_with_no_batch_dims_saveable)
  # Argument 4 of __call__ (self being 0) is `deterministic`, a Python bool.
  return nn.remat(DecoderLayer, policy=policy, static_argnums=(4,), prevent_cse=True)


def _scanned_layers(config: TransformerConfig):
  """One DecoderLayer (rematerialised as config.remat says) scanned num_layers times:
  x is the carry; positions, mask and `deterministic` reach every layer as they are;
  the layer cache (keys, values, slot index per layer) and the params are split along
  their leading layer axis, and so are dropout keys."""
  return nn.scan(_layer_class(config.remat), variable_axes={"params": 0},
                 split_rngs={"params": True, "dropout": True},
                 in_axes=(nn.broadcast, nn.broadcast, nn.broadcast, 0),
                 length=config.num_layers)(config)


def stack_layers(params, num_layers: int):
  """Params with the trunk's layers one by one ("layers_0", ...) -> the scanned model's
  (one "layers" subtree, each array stacked on a new leading layer axis)."""
  def stack(trunk):
    trunk = dict(trunk)
    layers = [trunk.pop(f"layers_{i}") for i in range(num_layers)]
    trunk["layers"] = jax.tree.map(lambda *xs: jnp.stack(xs) if isinstance(xs[0], jax.Array)
                                   else np.stack(xs), *layers)
    return trunk
  return {**params, "transformer": stack(params["transformer"])}


def unstack_layers(params, num_layers: int):
  """The inverse of `stack_layers`."""
  trunk = dict(params["transformer"])
  stacked = trunk.pop("layers")
  for i in range(num_layers):
    trunk[f"layers_{i}"] = jax.tree.map(lambda x, i=i: x[i], stacked)
  return {**params, "transformer": trunk}


class Transformer(nn.Module):
  """The trunk shared by every head: embeddings, decoder layers, final norm."""
  config: TransformerConfig

  def setup(self):
    config = self.config
    embed = functools.partial(
        nn.Embed, features=config.hidden_size, dtype=config.dtype,
        param_dtype=config.param_dtype, embedding_init=nn.initializers.normal(_INIT_STD))
    self.embed = embed(config.vocab_size)
    if config.spec.positions == "learned":
      self.pos_embed = embed(config.max_position_embeddings)
    if config.scan_layers:
      self.layers = _scanned_layers(config)
    else:
      self.layers = [_layer_class(config.remat)(config) for _ in range(config.num_layers)]
    self.final_norm = Norm(config)
    self.embed_dropout = nn.Dropout(config.dropout_rate)

  def __call__(self, input_ids, attention_mask=None, position_ids=None,
               deterministic=True, cache: KVCache | None = None):
    """Hidden states [batch, time, hidden] in config.dtype, and the updated cache (or None).

    With a cache, `input_ids` are written to slots [cache.index, cache.index + time) and
    attend to every earlier real slot.
    """
    batch, time = input_ids.shape
    if attention_mask is None:
      attention_mask = jnp.ones((batch, time), jnp.int32)
    token_mask = attention_mask.astype(bool)  # [batch, time]
    if position_ids is None:
      offset = 0 if cache is None else cache.lengths[:, None]
      position_ids = position_ids_from_mask(attention_mask, offset)

    if cache is None:
      causal = jnp.tril(jnp.ones((time, time), bool))
      mask = causal[None] & token_mask[:, None, :]  # [batch, time, time]
    else:
      slot_mask = jax.lax.dynamic_update_slice(cache.mask, token_mask, (0, cache.index))
      query_slots = cache.index + jnp.arange(time)
      causal = jnp.arange(cache.max_len)[None, :] <= query_slots[:, None]
      mask = causal[None] & slot_mask[:, None, :]  # [batch, time, max_len]

    x = self.embed(input_ids)
    if self.config.spec.positions == "learned":
      x = x + self.pos_embed(position_ids)
    x = self.embed_dropout(x, deterministic=deterministic)

    new_keys, new_values = [], []
    if self.config.scan_layers:
      layer_cache = None if cache is None else (
          cache.keys, cache.values, jnp.broadcast_to(cache.index, (self.config.num_layers,)))
      x, new_layer_cache = self.layers(x, position_ids, mask, deterministic, layer_cache)
      if cache is not None:
        new_keys, new_values = new_layer_cache
    for i, layer in enumerate([] if self.config.scan_layers else self.layers):
      layer_cache = None if cache is None else (cache.keys[i], cache.values[i], cache.index)
      x, new_layer_cache = layer(x, position_ids, mask, deterministic, layer_cache)
      if cache is not None:
        new_keys.append(new_layer_cache[0])
        new_values.append(new_layer_cache[1])
    x = self.final_norm(x)

    new_cache = None
    if cache is not None:
      new_cache = KVCache(
          keys=new_keys if self.config.scan_layers else tuple(new_keys),
          values=new_values if self.config.scan_layers else tuple(new_values),
          mask=slot_mask,
          lengths=cache.lengths + token_mask.sum(axis=1, dtype=jnp.int32),
          index=cache.index + time)
    return x, new_cache

  def embedding_matrix(self):
    return self.embed.embedding  # [vocab, hidden]


class LMHead(nn.Module):
  """Untied output projection; the params are {"kernel": [hidden, vocab]}."""
  config: TransformerConfig

  def setup(self):
    config = self.config
    self.kernel = self.param("kernel", nn.initializers.normal(_INIT_STD),
                             (config.hidden_size, config.vocab_size), config.param_dtype)

  def __call__(self, hidden):
    return _logits(hidden, self.kernel, self.config.dtype)


def _logits(hidden, kernel, dtype):
  # Compute-dtype matmul accumulated into float32: logits feed log-softmax and sampling.
  return jnp.einsum("bth,hv->btv", hidden.astype(dtype), kernel.astype(dtype),
                    preferred_element_type=jnp.float32)


class CausalLM(nn.Module):
  """Next-token logits.

  Params: {"transformer": trunk, "lm_head": {"kernel"}}, lm_head only when untied.
  """
  config: TransformerConfig

  def setup(self):
    self.transformer = Transformer(self.config)
    if not self.config.tie_word_embeddings:
      self.lm_head = LMHead(self.config)

  def _head(self, hidden):
    if self.config.tie_word_embeddings:
      return _logits(hidden, self.transformer.embedding_matrix().T, self.config.dtype)
    return self.lm_head(hidden)

  def __call__(self, input_ids, attention_mask=None, position_ids=None, deterministic=True):
    """input_ids [batch, time] -> float32 logits [batch, time, vocab]."""
    hidden, _ = self.transformer(input_ids, attention_mask, position_ids, deterministic)
    return self._head(hidden)

  def unembedding(self):
    """The output projection [hidden, vocab] (the embedding's transpose when tied)."""
    if self.config.tie_word_embeddings:
      return self.transformer.embedding_matrix().T
    return self.lm_head.kernel

  def token_logprobs(self, input_ids, attention_mask=None, *, start: int,
                     temperature: float = 1.0, with_entropy: bool = False,
                     deterministic: bool = True):
    """log softmax(logits / temperature) of tokens input_ids[:, start:], each read where
    it is predicted (position t - 1): [batch, time - start] float32, and the entropy
    there with `with_entropy`.

    With config.logits_chunk > 0 the logits are made that many positions at a time
    (losses.chunked_token_logprobs); with 0, from the full logits as `__call__` gives them.
    """
    hidden, _ = self.transformer(input_ids, attention_mask, None, deterministic)
    targets = input_ids[:, start:]
    if not self.config.logits_chunk:
      logits = self._head(hidden)[:, start - 1:-1]
      logprobs = losses.token_logprobs(logits, targets, temperature)
      if with_entropy:
        return logprobs, losses.entropy_from_logits(logits, temperature)
      return logprobs
    return losses.chunked_token_logprobs(
        hidden[:, start - 1:-1], self.unembedding(), targets, chunk=self.config.logits_chunk,
        dtype=self.config.dtype, temperature=temperature, with_entropy=with_entropy)

  def decode(self, input_ids, cache: KVCache, attention_mask=None, last_only: bool = False):
    """Feeds input_ids [batch, time] through the cache: (logits [batch, time, vocab], cache).

    Used for both the prefill (the whole left-padded prompt, with its mask) and each
    one-token step. `last_only` keeps only the last position's logits ([batch, 1, vocab]),
    which spares a [batch, prompt, vocab] array at prefill. Deterministic: no dropout.
    """
    hidden, cache = self.transformer(input_ids, attention_mask, cache=cache)
    if last_only:
      hidden = hidden[:, -1:]
    return self._head(hidden), cache


class ScalarHeadModel(nn.Module):
  """One float32 scalar per position (reward or value).

  Params: {"transformer": trunk, "score_head": {"kernel": [hidden, 1], "bias": [1]}}; a
  CausalLM's params["transformer"] drops in unchanged.
  """
  config: TransformerConfig

  def setup(self):
    config = self.config
    self.transformer = Transformer(config)
    self.score_head = nn.Dense(
        1, dtype=jnp.float32, param_dtype=config.param_dtype,
        kernel_init=nn.initializers.normal(1.0 / (config.hidden_size + 1) ** 0.5))

  def __call__(self, input_ids, attention_mask=None, position_ids=None, deterministic=True):
    """input_ids [batch, time] -> float32 scores [batch, time]."""
    hidden, _ = self.transformer(input_ids, attention_mask, position_ids, deterministic)
    return self.score_head(hidden.astype(jnp.float32))[..., 0]


def init_params(model: nn.Module, rng: jax.Array, seq_len: int = 8):
  """Random params for `model` (a CausalLM or ScalarHeadModel)."""
  dummy = jnp.zeros((1, seq_len), jnp.int32)
  return model.init(rng, dummy)["params"]
