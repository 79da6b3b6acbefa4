"""Length buckets and packed rankings (jaxrlhf/data/buckets.py): fewer padding slots,
the same tokens and the same scores."""

import functools

import jax
import numpy as np
import pytest

from jaxrlhf import data
from jaxrlhf import models
from jaxrlhf import policy_lib
from jaxrlhf import scoring
from jaxrlhf.data import buckets

# Prompts of 1-3 symbols and answers of 1-4: short next to the budgets below.
RANKINGS = [data.Ranking(" ".join("abc"[: 1 + i % 3]) + " ->",
                         tuple(" ".join("xyzw"[: 1 + (i + j) % 4]) for j in range(2 + i % 3)),
                         tuple(range(2 + i % 3)))
            for i in range(12)]
LENGTHS = data.Lengths(prompt=12, response=8, k_max=5, bucket=4)


def _loader(kind, examples, tokenizer, lengths, **kw):
  return data.make_loader(kind, examples, tokenizer, lengths, per_device_batch_size=3,
                          local_device_count=2, process_index=0, process_count=1,
                          shuffle=False, num_epochs=1, **kw)


def test_round_up():
  assert buckets.round_up(5, 20, 4) == 8
  assert buckets.round_up(8, 20, 4) == 8
  assert buckets.round_up(19, 20, 4) == 20  # never past the budget
  assert buckets.round_up(0, 20, 4) == 4  # at least one bucket
  assert buckets.round_up(5, 20, 0) == 20  # off: the budget


def test_ranking_batches_hold_every_real_response_once_and_no_padded_slot(tokenizer):
  padded = list(_loader("rankings", RANKINGS, tokenizer, LENGTHS, cut=False))
  packed = list(_loader("rankings", RANKINGS, tokenizer, LENGTHS))
  assert len(packed) == len(padded) == 2
  for raw, out in zip(padded, packed):
    valid = raw["response_valid"] > 0  # [devices, per_device, k_max]
    slots = out["input_ids"].shape[-1]
    rows = out["input_ids"].shape[1]
    assert slots % 4 == 0 and slots < LENGTHS.sequence
    assert raw["attention_mask"][..., slots:].sum() == 0  # only padding was cut
    assert raw["attention_mask"][..., slots - 4:].sum() > 0  # the smallest bucket
    # Rows: the most real responses any device holds, rounded up to its 3 prompts.
    most = valid.sum(axis=(1, 2)).max()
    assert rows % 3 == 0 and most <= rows < most + 3 and rows < 3 * LENGTHS.k_max
    np.testing.assert_array_equal(out["slot"] >= 0, valid)
    for d, b, k in zip(*np.nonzero(valid)):
      row = out["slot"][d, b, k]
      for name in ("input_ids", "attention_mask", "prompt_mask", "response_mask"):
        np.testing.assert_array_equal(out[name][d, row], raw[name][d, b, k, :slots])
      assert out["end_index"][d, row] == raw["end_index"][d, b, k]
    for d in range(2):  # each row holds at most one response; the rest is empty
      used = out["slot"][d][out["slot"][d] >= 0]
      assert len(set(used.tolist())) == used.size
      empty = np.setdiff1d(np.arange(rows), used)
      assert out["attention_mask"][d, empty].sum() == 0
    for name in ("pair_mask", "ranks", "response_valid", "index"):
      np.testing.assert_array_equal(out[name], raw[name])


def test_without_buckets_rankings_keep_every_slot_in_the_packed_layout(tokenizer):
  lengths = data.Lengths(prompt=12, response=8, k_max=5)
  out = next(iter(_loader("rankings", RANKINGS, tokenizer, lengths)))
  assert out["input_ids"].shape == (2, 3 * 5, lengths.sequence)
  assert out["slot"].shape == (2, 3, 5)


@pytest.fixture(scope="module")
def scalar_model(tokenizer):
  config = models.TransformerConfig.tiny("llama", vocab_size=len(tokenizer), num_layers=1)
  model = models.ScalarHeadModel(config)
  return model, models.init_params(model, jax.random.key(3), seq_len=LENGTHS.sequence)


def test_packed_scores_equal_the_padded_batchs(tokenizer, scalar_model):
  model, params = scalar_model
  raw = next(iter(_loader("rankings", RANKINGS, tokenizer, LENGTHS, cut=False)))
  out = next(iter(_loader("rankings", RANKINGS, tokenizer, LENGTHS)))
  for d in range(2):
    want = scoring.sequence_scores(model.apply, params, raw["input_ids"][d],
                                   raw["attention_mask"][d], raw["end_index"][d])
    got = jax.jit(functools.partial(scoring.ranking_scores, model.apply))(
        params, {k: out[k][d] for k in ("input_ids", "attention_mask", "end_index", "slot")})
    valid = raw["response_valid"][d] > 0
    # Measured: at most 1.2e-7 apart on scores up to 0.61 (one float32 ulp: the same
    # sums over fewer pad columns).
    np.testing.assert_allclose(np.asarray(got)[valid], np.asarray(want)[valid],
                               rtol=1e-6, atol=1e-6)
    assert np.all(np.asarray(got)[~valid] == 0)


def test_prompt_batches_lose_only_left_padding(tokenizer):
  prompts = [data.Prompt(" ".join("abcdef"[: 1 + i % 5]) + " ->") for i in range(6)]
  lengths = data.Lengths(prompt=16, response=4, bucket=4)
  raw = next(iter(_loader("prompts", prompts, tokenizer, lengths, cut=False)))
  out = next(iter(_loader("prompts", prompts, tokenizer, lengths)))
  slots = out["prompt_ids"].shape[-1]
  need = raw["prompt_mask"].sum(-1).max()
  assert slots == -(-need // 4) * 4 < 16
  np.testing.assert_array_equal(out["prompt_ids"], raw["prompt_ids"][..., 16 - slots:])
  assert raw["prompt_mask"][..., :16 - slots].sum() == 0
  assert out["meta"].shape == raw["meta"].shape  # host fields pass through


def test_demonstrations_lose_only_right_padding(tokenizer):
  demos = [data.Demonstration("a b ->", " ".join("xyz"[: 1 + i % 3])) for i in range(6)]
  raw = next(iter(_loader("demonstrations", demos, tokenizer, LENGTHS, cut=False)))
  out = next(iter(_loader("demonstrations", demos, tokenizer, LENGTHS)))
  slots = out["input_ids"].shape[-1]
  assert slots % 4 == 0 and raw["attention_mask"][..., slots:].sum() == 0
  for name in ("input_ids", "attention_mask", "loss_mask"):
    np.testing.assert_array_equal(out[name], raw[name][..., :slots])


def test_cached_batches_are_cut_to_one_shape(tokenizer):
  # Six prompts of one symbol and one of five: the batch that holds the long one needs
  # more columns than the others, and every batch gets that many.
  prompts = [data.Prompt("a ->")] * 6 + [data.Prompt("a b c d e f g ->")]
  lengths = data.Lengths(prompt=16, response=4, bucket=4)
  raw = list(_loader("prompts", prompts, tokenizer, lengths, cut=False,
                     drop_remainder=False))
  assert len(raw) == 2
  alone = [buckets.cut("prompts", b, buckets.shape_for(
      "prompts", buckets.need("prompts", b), budget=16, k_max=9, per_device=3, multiple=4))
           for b in raw]
  assert len({b["prompt_ids"].shape for b in alone}) == 2
  together = data.cut_together("prompts", raw, lengths, 3, tokenizer)
  assert len({b["prompt_ids"].shape for b in together}) == 1
  assert together[0]["prompt_ids"].shape == max(b["prompt_ids"].shape for b in alone)


def test_encoded_prompts_take_one_bucket(tokenizer):
  encoder = data.Encoder(tokenizer)
  full = policy_lib.encode_prompts(["a ->", "a b c ->"], encoder, 16)
  cut = policy_lib.encode_prompts(["a ->", "a b c ->"], encoder, 16, length_bucket=4)
  need = full["prompt_mask"].sum(-1).max()
  assert cut["prompt_ids"].shape == (2, -(-need // 4) * 4)
  np.testing.assert_array_equal(cut["prompt_ids"], full["prompt_ids"][:, -cut["prompt_ids"].shape[1]:])


def test_cut_demonstrations_have_the_padded_batchs_loss(tokenizer):
  config = models.TransformerConfig.tiny("llama", vocab_size=len(tokenizer), num_layers=1)
  model = models.CausalLM(config)
  params = models.init_params(model, jax.random.key(4), seq_len=LENGTHS.sequence)
  demos = [data.Demonstration(" ".join("abc"[: 1 + i % 3]) + " ->", " ".join("xyz"[: 1 + i % 3]))
           for i in range(6)]
  raw = next(iter(_loader("demonstrations", demos, tokenizer, LENGTHS, cut=False)))
  out = next(iter(_loader("demonstrations", demos, tokenizer, LENGTHS)))
  assert out["input_ids"].shape[-1] < raw["input_ids"].shape[-1]
  for d in range(2):
    want = scoring.lm_nll(model.apply, params, {k: v[d] for k, v in raw.items()})
    got = scoring.lm_nll(model.apply, params, {k: v[d] for k, v in out.items()})
    assert float(got.count) == float(want.count)
    # Measured: identical here (35.632351 both); rtol allows a float32 rounding of the sum.
    np.testing.assert_allclose(float(got.total), float(want.total), rtol=1e-6)
