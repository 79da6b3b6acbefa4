"""The Flax transformer on its own: padding invariance, KV-cache decode, heads, dropout, dtypes."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxrlhf import models
from tests.models import utils


@pytest.fixture(scope="module")
def lm(request):
  """lm(arch) -> (model, params, jitted forward), built once per module."""
  built = {}

  def get(arch):
    if arch not in built:
      model = models.CausalLM(utils.tiny_config(arch))
      built[arch] = (model, utils.perturbed_params(model), utils.jitted_apply(model))
    return built[arch]

  return get


@pytest.mark.parametrize("arch", utils.ARCHS)
def test_left_padding_gives_the_logits_of_the_unpadded_sequence(arch, lm):
  model, params, forward = lm(arch)
  ids, mask = utils.padded_batch((9, 6, 3), total=9, seed=1)
  padded = forward(params, ids, mask)
  for row in range(ids.shape[0]):
    start = ids.shape[1] - mask[row].sum()
    alone = forward(params, ids[row:row + 1, start:], mask[row:row + 1, start:])
    np.testing.assert_allclose(padded[row, start:], alone[0], atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("arch", utils.ARCHS)
def test_cached_decode_matches_full_forward(arch, lm):
  model, params, forward = lm(arch)
  prompt, prompt_mask = utils.padded_batch((6, 4, 1), total=6, seed=2)
  steps = np.random.default_rng(3).integers(3, utils.VOCAB, size=(3, 4)).astype(np.int32)
  decode = jax.jit(lambda p, ids, cache, mask: model.apply(
      {"params": p}, ids, cache, mask, method=models.CausalLM.decode))

  cache = models.init_cache(model.config, batch_size=3, max_len=6 + 4)
  prefill_logits, cache = decode(params, prompt, cache, prompt_mask)
  step_logits = []
  for t in range(steps.shape[1]):
    logits, cache = decode(params, steps[:, t:t + 1], cache, np.ones((3, 1), np.int32))
    step_logits.append(logits[:, 0])

  full_ids = np.concatenate([prompt, steps], axis=1)
  full_mask = np.concatenate([prompt_mask, np.ones_like(steps)], axis=1)
  full = forward(params, full_ids, full_mask)
  real = prompt_mask.astype(bool)
  np.testing.assert_allclose(prefill_logits[real], full[:, :6][real], atol=1e-4, rtol=1e-4)
  np.testing.assert_allclose(np.stack(step_logits, 1), full[:, 6:], atol=1e-4, rtol=1e-4)
  assert int(cache.index) == 10
  np.testing.assert_array_equal(cache.lengths, full_mask.sum(1))


def test_decode_last_only_keeps_the_last_position(lm):
  model, params, _ = lm("llama")
  prompt, prompt_mask = utils.padded_batch((5, 3), total=5)
  cache = models.init_cache(model, batch_size=2, max_len=8)
  apply = lambda **kw: model.apply({"params": params}, prompt, cache, prompt_mask,
                                   method=models.CausalLM.decode, **kw)
  all_logits, _ = apply()
  last, _ = apply(last_only=True)
  assert last.shape == (2, 1, utils.VOCAB)
  np.testing.assert_allclose(last[:, 0], all_logits[:, -1], atol=1e-6)


def test_params_tree_follows_the_contract(lm):
  llama, llama_params, _ = lm("llama")
  qwen, qwen_params, _ = lm("qwen2")
  assert set(llama_params) == {"transformer", "lm_head"}  # untied
  assert set(qwen_params) == {"transformer"}  # tied
  assert llama_params["lm_head"]["kernel"].shape == (32, utils.VOCAB)
  attn = qwen_params["transformer"]["layers_0"]["attn"]
  assert attn["k"]["kernel"].shape == (32, 2 * 8)  # grouped-query: 2 kv heads of 8
  assert "bias" in attn["q"] and "bias" not in attn["o"]


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_scalar_head_reuses_the_lm_trunk(arch, lm):
  model, params, forward = lm(arch)
  scalar = models.ScalarHeadModel(model.config)
  fresh = models.init_params(scalar, jax.random.key(5))
  assert set(fresh["score_head"]) == {"kernel", "bias"}
  scalar_params = {"transformer": params["transformer"], "score_head": fresh["score_head"]}
  ids, mask = utils.padded_batch((7, 4), total=7)
  scores = scalar.apply({"params": scalar_params}, ids, mask)
  assert scores.shape == (2, 7) and scores.dtype == jnp.float32
  # Same trunk: the scores are an affine map of the LM's final hidden states.
  hidden, _ = models.Transformer(model.config).apply(
      {"params": params["transformer"]}, ids, mask)
  head = fresh["score_head"]
  np.testing.assert_allclose(scores, (hidden @ head["kernel"])[..., 0] + head["bias"][0],
                             atol=1e-5)


def test_dropout_only_when_not_deterministic():
  config = utils.tiny_config("gpt2", dropout_rate=0.3, attention_dropout_rate=0.3)
  model = models.CausalLM(config)
  params = utils.perturbed_params(model)
  ids, mask = utils.padded_batch((6, 6), total=6)
  run = lambda det, seed: model.apply({"params": params}, ids, mask, deterministic=det,
                                      rngs={"dropout": jax.random.key(seed)})
  np.testing.assert_array_equal(run(True, 0), run(True, 1))
  np.testing.assert_array_equal(run(True, 0), model.apply({"params": params}, ids, mask))
  assert not np.allclose(run(False, 0), run(True, 0))
  assert not np.allclose(run(False, 0), run(False, 1))


def test_bfloat16_compute_with_float32_params_is_close():
  f32_model = models.CausalLM(utils.tiny_config("llama"))
  params = utils.perturbed_params(f32_model, scale=0.1)
  bf16_model = models.CausalLM(f32_model.config.replace(dtype=jnp.bfloat16))
  ids, mask = utils.padded_batch((8, 5), total=8)
  reference = f32_model.apply({"params": params}, ids, mask)
  logits = bf16_model.apply({"params": params}, ids, mask)
  assert logits.dtype == jnp.float32  # logits are always float32
  real = mask.astype(bool)
  # A different dtype, not a loosened parity check: bf16 has ~3 significant digits.
  np.testing.assert_allclose(logits[real], reference[real], atol=0.1, rtol=0.05)


def test_bfloat16_params_are_stored_in_bfloat16():
  model = models.CausalLM(utils.tiny_config("qwen2", param_dtype=jnp.bfloat16,
                                            dtype=jnp.bfloat16))
  params = models.init_params(model, jax.random.key(0))
  assert {x.dtype for x in jax.tree.leaves(params)} == {jnp.dtype(jnp.bfloat16)}
  ids, mask = utils.padded_batch((4,), total=4)
  assert model.apply({"params": params}, ids, mask).dtype == jnp.float32


def test_config_errors_are_explicit():
  with pytest.raises(ValueError, match="unsupported architecture 'mistral'.*gpt2, llama, qwen2"):
    models.TransformerConfig(arch="mistral")
  with pytest.raises(ValueError, match="num_kv_heads=3"):
    models.TransformerConfig.tiny("llama", num_kv_heads=3)
  with pytest.raises(ValueError, match="qwen2.*qkv_bias=True"):
    models.TransformerConfig(arch="qwen2")
  assert models.TransformerConfig.for_arch("qwen2").qkv_bias


def test_position_ids_follow_the_mask():
  mask = np.array([[0, 0, 1, 1, 1], [1, 1, 1, 1, 1]])
  np.testing.assert_array_equal(models.position_ids_from_mask(mask),
                                [[0, 0, 0, 1, 2], [0, 1, 2, 3, 4]])


def test_remat_gives_the_same_parameters_gradients_and_samples():
  from jaxrlhf import sampling
  ids = (jnp.arange(12).reshape(2, 6) * 7) % 100
  results = {}
  for remat in ("none", "full", "dots"):
    model = models.CausalLM(models.TransformerConfig.tiny("llama", remat=remat,
                                                          dropout_rate=0.1))
    params = model.init(jax.random.key(0), ids)["params"]

    def loss(p, deterministic, model=model):
      logits = model.apply({"params": p}, ids, deterministic=deterministic,
                           rngs={"dropout": jax.random.key(1)})
      return jnp.mean(jax.nn.logsumexp(logits, -1) - logits[..., 0])

    grad = jax.jit(jax.grad(loss), static_argnums=1)
    results[remat] = (params, grad(params, True), grad(params, False))
    if remat != "dots":  # the KV-cache path goes through the rematerialised layers too
      results[remat] += (sampling.sample(
          model, params, ids, jnp.ones_like(ids), jax.random.key(2), max_new_tokens=3,
          stop_token_id=None, pad_token_id=0).response_ids,)
  for remat in ("full", "dots"):
    for got, want in zip(results[remat], results["none"]):
      # Measured: bit-identical on XLA:CPU (dropout masks included); a tolerance would hide
      # a policy that recomputes something differently.
      jax.tree.map(np.testing.assert_array_equal, got, want)
  with pytest.raises(ValueError, match="remat must be one of"):
    models.TransformerConfig.tiny("llama", remat="some")


def test_remat_is_a_run_time_choice_for_checkpoints_and_fresh_models(tmp_path):
  from jaxrlhf import config_lib
  from jaxrlhf import model_lib
  from jaxrlhf.data.world import load_world_tokenizer
  tokenizer = load_world_tokenizer()
  section = config_lib.model_preset("test")
  section.remat = "dots"
  fresh, params = model_lib.load_or_init("lm", tokenizer, seq_len=8, model=section)
  assert fresh.config.remat == "dots"
  models.save_pretrained(fresh, params, tmp_path)
  assert "remat" not in (tmp_path / "config.json").read_text()  # not part of a checkpoint
  section.remat = "full"
  loaded, loaded_params = model_lib.load_or_init("lm", tokenizer, seq_len=8,
                                                 init_from=str(tmp_path), model=section)
  assert loaded.config.remat == "full"
  jax.tree.map(np.testing.assert_array_equal, loaded_params, jax.device_get(params))
  section.remat = "everything"
  with pytest.raises(config_lib.ConfigError, match="config.model.*remat must be one of"):
    model_lib.load_or_init("lm", tokenizer, seq_len=8, init_from=str(tmp_path), model=section)
  with pytest.raises(config_lib.ConfigError, match="config.model.*remat must be one of"):
    model_lib.load_or_init("lm", tokenizer, seq_len=8, model=section)


@pytest.mark.parametrize("remat", ["none", "full"])
def test_scanned_layers_give_the_unrolled_logits_gradients_and_samples(remat):
  from jaxrlhf import sampling
  ids = (jnp.arange(12).reshape(2, 6) * 7) % 100
  mask = jnp.ones_like(ids).at[0, :2].set(0)
  config = models.TransformerConfig.tiny("llama", num_layers=3, remat=remat)
  unrolled, scanned = models.CausalLM(config), models.CausalLM(config.replace(scan_layers=True))
  params = utils.perturbed_params(unrolled)
  stacked = models.stack_layers(params, 3)
  assert jax.tree.map(jnp.shape, stacked) == jax.tree.map(
      jnp.shape, scanned.init(jax.random.key(0), ids)["params"])
  jax.tree.map(np.testing.assert_array_equal, models.unstack_layers(stacked, 3), params)

  def run(model, p):
    def loss(p):
      logits = model.apply({"params": p}, ids, mask)
      return jnp.mean(jax.nn.logsumexp(logits, -1) - logits[..., 0]), logits
    (_, logits), grads = jax.jit(jax.value_and_grad(loss, has_aux=True))(p)
    samples = sampling.sample(model, p, ids, mask, jax.random.key(2), max_new_tokens=4,
                              stop_token_id=None, pad_token_id=0).response_ids
    return logits, grads, samples

  logits, grads, samples = run(unrolled, params)
  scan_logits, scan_grads, scan_samples = run(scanned, stacked)
  # Measured on XLA:CPU: logits and gradients equal to the bit for these inputs, logits
  # within 6.7e-8 for others (the scan's loop body is compiled on its own and may round
  # differently, hence a tolerance); the samples equal.
  np.testing.assert_allclose(scan_logits, logits, atol=1e-5, rtol=1e-5)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-6, rtol=1e-5),
               models.unstack_layers(scan_grads, 3), grads)
  np.testing.assert_array_equal(scan_samples, samples)


def test_scan_layers_is_a_run_time_choice_for_checkpoints(tmp_path):
  from jaxrlhf import config_lib
  from jaxrlhf import model_lib
  from jaxrlhf.data.world import load_world_tokenizer
  tokenizer = load_world_tokenizer()
  section = config_lib.model_preset("test")
  section.scan_layers = True
  scanned, params = model_lib.load_or_init("scalar", tokenizer, seq_len=8, model=section)
  assert "layers" in params["transformer"] and "layers_0" not in params["transformer"]
  models.save_pretrained(scanned, params, tmp_path)  # written one layer at a time
  assert "scan_layers" not in (tmp_path / "config.json").read_text()
  loaded, loaded_params = models.from_pretrained(str(tmp_path))
  assert not loaded.config.scan_layers and "layers_0" in loaded_params["transformer"]
  jax.tree.map(np.testing.assert_array_equal, loaded_params,
               models.unstack_layers(jax.device_get(params), scanned.config.num_layers))
  again, again_params = model_lib.load_or_init("scalar", tokenizer, seq_len=8,
                                               init_from=str(tmp_path), model=section)
  assert again.config.scan_layers
  jax.tree.map(np.testing.assert_array_equal, again_params, jax.device_get(params))
  with pytest.raises(models.CheckpointError, match="no stacked 'layers'"):
    models.save_pretrained(scanned, loaded_params, tmp_path / "other")
  with pytest.raises(ValueError, match="scan_layers must be True or False"):
    models.TransformerConfig.tiny("llama", scan_layers="yes")


def _logprob_programs(chunk, vocab=512, time=24):
  model = models.CausalLM(models.TransformerConfig.tiny("llama", vocab_size=vocab,
                                                        logits_chunk=chunk))
  ids = (jnp.arange(2 * time).reshape(2, time) * 37) % vocab
  mask = jnp.ones_like(ids).at[0, :3].set(0)

  def value(params):
    return model.apply({"params": params}, ids, mask, start=8, temperature=0.7,
                       with_entropy=True, method="token_logprobs")

  def loss(params):
    logprobs, entropy = value(params)
    return jnp.sum(logprobs) + 0.1 * jnp.sum(entropy), logprobs

  return model, ids, jax.jit(value), jax.jit(jax.value_and_grad(loss, has_aux=True))


@pytest.mark.parametrize("chunk", [5, 16])  # 16 does not divide the 16 positions read + pad
def test_chunked_logprobs_equal_the_full_logits(chunk):
  model, ids, value, grad = _logprob_programs(0)
  params = model.init(jax.random.key(0), ids)["params"]
  _, _, value_c, grad_c = _logprob_programs(chunk)
  (logprobs, entropy), ((_, lp_in_grad), grads) = value(params), grad(params)
  (logprobs_c, entropy_c), ((_, lp_in_grad_c), grads_c) = value_c(params), grad_c(params)
  # Measured on XLA:CPU: chunks of up to 4 positions bit-identical to the full logits, a
  # padded last chunk within 5e-7 (log-probabilities) and 2e-6 (entropy, nats), gradients
  # within 5e-7 relative to their largest entry.
  np.testing.assert_allclose(logprobs_c, logprobs, rtol=0, atol=2e-6)
  np.testing.assert_allclose(entropy_c, entropy, rtol=0, atol=1e-5)
  for got, want in zip(jax.tree.leaves(grads_c), jax.tree.leaves(grads)):
    np.testing.assert_allclose(got, want, rtol=0, atol=5e-6 * float(jnp.max(jnp.abs(want))))
  # What the rollout records is what the learner recomputes: the PPO ratio starts at 1.
  np.testing.assert_array_equal(lp_in_grad_c, logprobs_c)
  np.testing.assert_array_equal(lp_in_grad, logprobs)


def test_chunked_logprobs_never_make_the_full_logits():
  """The gradient program's scratch memory (compiled, nothing run) grows with the
  sequence by whole [batch, T, vocab] float32 arrays without chunks, and barely with them."""
  def temp_bytes(chunk, time):
    model, ids, _, grad = _logprob_programs(chunk, vocab=8192, time=time)
    params = jax.eval_shape(lambda: model.init(jax.random.key(0), ids)["params"])
    return grad.lower(params).compile().memory_analysis().temp_size_in_bytes
  full = {t: temp_bytes(0, t) for t in (64, 128)}
  chunked = {t: temp_bytes(8, t) for t in (64, 128)}
  logits_64 = 2 * 64 * 8192 * 4  # 64 more positions of [batch, T, vocab] float32
  # Measured: 23.7 -> 51.2 MB without chunks (6.5 logit arrays per 64 positions), 4.9 ->
  # 7.1 MB with chunks of 8 (the trunk's activations and one chunk's logits).
  assert full[128] - full[64] > 4 * logits_64, full
  assert chunked[128] - chunked[64] < logits_64, chunked
  assert chunked[128] < full[128] / 4
