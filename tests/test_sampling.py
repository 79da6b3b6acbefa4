"""The KV-cache sampler: stop-token cut, masks, logprobs the learner reproduces, compile count."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxrlhf import losses
from jaxrlhf import models
from jaxrlhf import sampling
from tests.models import utils

P, N = 6, 7  # prompt length, max_new_tokens


@pytest.fixture(scope="module")
def policy():
  model = models.CausalLM(utils.tiny_config("llama"))
  params = utils.perturbed_params(model, seed=8)
  prompt, prompt_mask = utils.padded_batch((6, 3, 5, 1), total=P, seed=9)
  return model, params, prompt, prompt_mask


def _sample(policy, **kw):
  model, params, prompt, prompt_mask = policy
  kw = {"max_new_tokens": N, "stop_token_id": None, "pad_token_id": utils.PAD, **kw}
  return sampling.sample(model, params, prompt, prompt_mask, kw.pop("rng", jax.random.key(0)),
                         **kw)


def test_stop_token_cuts_the_response(policy):
  free = _sample(policy, greedy=True)
  assert not free.stopped.any() and (free.response_mask == 1).all()
  # Stop on row 0's third token: rows emitting it stop there, the others run on.
  stop = int(free.response_ids[0, 2])
  out = _sample(policy, greedy=True, stop_token_id=stop)
  ids, mask = np.asarray(out.response_ids), np.asarray(out.response_mask)
  assert out.stopped[0]
  for row in range(ids.shape[0]):
    hits = np.flatnonzero(np.asarray(free.response_ids[row]) == stop)
    if hits.size:
      first = hits[0]
      assert out.stopped[row]
      np.testing.assert_array_equal(ids[row, :first + 1], free.response_ids[row, :first + 1])
      np.testing.assert_array_equal(ids[row, first + 1:], utils.PAD)
      np.testing.assert_array_equal(mask[row], np.arange(N) <= first)
      np.testing.assert_array_equal(out.logprobs[row, first + 1:], 0.0)
    else:
      assert not out.stopped[row]
      np.testing.assert_array_equal(ids[row], free.response_ids[row])
      np.testing.assert_array_equal(mask[row], 1)
  np.testing.assert_array_equal(out.sequences, np.concatenate([policy[2], ids], axis=1))


def test_sample_categorical_draws_each_token_with_its_probability():
  probs = np.array([0.0, 0.5, 0.0, 0.2, 0.05, 0.25, 0.0])  # zero mass first and last
  logits = jnp.log(jnp.asarray(probs, jnp.float32))[None].repeat(40_000, axis=0)
  tokens = np.asarray(sampling.sample_categorical(jax.random.key(3), logits))
  counts = np.bincount(tokens, minlength=len(probs)) / len(tokens)
  np.testing.assert_array_equal(counts[probs == 0], 0.0)
  # 4 binomial standard errors at p = 0.5 over 40k draws: 0.01
  np.testing.assert_allclose(counts, probs, atol=0.01)
  # rows are independent and the key decides
  again = sampling.sample_categorical(jax.random.key(3), logits)
  np.testing.assert_array_equal(again, tokens)
  assert len(set(tokens[:50].tolist())) > 1
  # a row of one finite logit always gives that token
  one = jnp.full((4, 9), -jnp.inf).at[:, 8].set(0.0)
  np.testing.assert_array_equal(sampling.sample_categorical(jax.random.key(4), one), 8)


def test_top_k_1_and_tiny_top_p_equal_greedy(policy):
  greedy = _sample(policy, greedy=True)
  top_k = _sample(policy, top_k=1, temperature=0.7, rng=jax.random.key(1))
  top_p = _sample(policy, top_p=1e-6, temperature=1.3, rng=jax.random.key(2))
  np.testing.assert_array_equal(top_k.response_ids, greedy.response_ids)
  np.testing.assert_array_equal(top_p.response_ids, greedy.response_ids)


@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_logprobs_equal_the_learner_forward(policy, temperature):
  model, params, prompt, prompt_mask = policy
  out = _sample(policy, temperature=temperature, rng=jax.random.key(3),
                stop_token_id=int(utils.EOS))
  # What the PPO learner computes: one forward over prompt + response, then token_logprobs.
  mask = np.concatenate([prompt_mask, out.response_mask], axis=1)
  logits = model.apply({"params": params}, out.sequences, mask)
  learner = losses.token_logprobs(logits[:, P - 1:-1], out.response_ids, temperature)
  learner = learner * out.response_mask
  np.testing.assert_allclose(out.logprobs, learner, atol=1e-4, rtol=1e-4)
  # And it is log softmax(logits / temperature), not of the raw logits.
  chosen = jnp.take_along_axis(
      jax.nn.log_softmax(logits[:, P - 1:-1] / temperature), out.response_ids[..., None], -1)
  np.testing.assert_allclose(out.logprobs, chosen[..., 0] * out.response_mask, atol=1e-4)


def test_sampling_depends_only_on_the_key(policy):
  a = _sample(policy, rng=jax.random.key(4))
  b = _sample(policy, rng=jax.random.key(5))
  assert not np.array_equal(a.response_ids, b.response_ids)
  np.testing.assert_array_equal(a.response_ids, _sample(policy, rng=jax.random.key(4)).response_ids)


def test_compiles_once_per_setting(policy):
  model, params, prompt, prompt_mask = policy
  before = sampling.sample._cache_size()
  kw = dict(max_new_tokens=3, temperature=0.9, top_k=5, stop_token_id=utils.EOS,
            pad_token_id=utils.PAD)
  for seed in range(3):
    other_prompt = np.roll(prompt, seed, axis=0)
    sampling.sample(model, params, other_prompt, prompt_mask, jax.random.key(seed), **kw)
  assert sampling.sample._cache_size() == before + 1
  sampling.sample(model, params, prompt, prompt_mask, jax.random.key(0),
                  **{**kw, "temperature": 0.5})
  assert sampling.sample._cache_size() == before + 2


def test_decode_loop_exits_once_every_row_stopped():
  """A scripted model: row r emits script[r, step] (the cache is the step counter)."""
  stop, pad = 9, 0
  script = jnp.array([[4, 9, 5, 5, 5, 5], [4, 4, 4, 9, 5, 5]])

  def tokens_to_logits(tokens, calls):
    next_tokens = script[:, jnp.minimum(calls + 1, script.shape[1] - 1)]
    return 10.0 * jax.nn.one_hot(next_tokens, 12), calls + 1

  first_logits = 10.0 * jax.nn.one_hot(script[:, 0], 12)
  run = jax.jit(lambda: sampling.decode_loop(
      tokens_to_logits, first_logits, jnp.int32(0), jax.random.key(0), max_new_tokens=6,
      stop_token_id=stop, pad_token_id=pad, greedy=True))
  response, logprobs, stopped, num_steps = run()
  assert int(num_steps) == 4  # row 1 stops at its 4th token; steps 5 and 6 never run
  np.testing.assert_array_equal(response, [[4, 9, 0, 0, 0, 0], [4, 4, 4, 9, 0, 0]])
  np.testing.assert_array_equal(stopped, [True, True])
  np.testing.assert_array_equal(sampling.response_mask_from_ids(response, stop),
                                [[1, 1, 0, 0, 0, 0], [1, 1, 1, 1, 0, 0]])
  assert (logprobs[0, 2:] == 0).all() and (logprobs[1, 4:] == 0).all()


def test_filter_logits():
  logits = jnp.log(jnp.array([[0.5, 0.2, 0.15, 0.1, 0.05]]))
  kept = lambda x: np.isfinite(np.asarray(x))[0].tolist()
  assert kept(sampling.filter_logits(logits, top_k=2)) == [True, True, False, False, False]
  # Nucleus 0.8: 0.5 + 0.2 < 0.8, so the 0.15 token is still needed; 0.1 and 0.05 are not.
  assert kept(sampling.filter_logits(logits, top_p=0.8)) == [True, True, True, False, False]
  assert kept(sampling.filter_logits(logits, top_p=0.5)) == [True, False, False, False, False]
  assert kept(sampling.filter_logits(logits, top_k=0, top_p=1.0)) == [True] * 5


def test_bad_settings_are_refused(policy):
  with pytest.raises(ValueError, match="temperature must be > 0"):
    _sample(policy, temperature=0.0)
  with pytest.raises(ValueError, match="max_position_embeddings"):
    gpt2 = models.CausalLM(utils.tiny_config("gpt2", max_position_embeddings=8))
    sampling.sample(gpt2, models.init_params(gpt2, jax.random.key(0)), policy[2], policy[3],
                    jax.random.key(0), max_new_tokens=4, stop_token_id=None, pad_token_id=0)
