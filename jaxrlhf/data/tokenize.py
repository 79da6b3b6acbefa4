"""Tokenisation of parsed examples to the fixed-shape numpy dicts the trainers eat.

Prompts are truncated on the left (the end of a prompt is what the response
answers), except where the example marks the span to shorten (a TL;DR post: the
template around it is kept whole); responses are cut on the right, and every
plain response ends with EOS. Chats are rendered with the tokenizer's chat template. Each
function returns the model fields plus a `_stats` dict of 0/1 truncation flags
that the loader strips off and counts. All index/mask arrays are int32;
`pair_mask` is float32.

  SFT / pretraining:  input_ids, attention_mask, loss_mask, prompt_mask,
                      response_mask                                       [T]
  rankings:           input_ids, attention_mask, prompt_mask, response_mask [K_max, T],
                      end_index, response_valid, ranks (-1 if padding)   [K_max],
                      pair_mask [K_max, K_max] (1 iff i strictly beats j)
  prompts:            prompt_ids, prompt_mask                    [P], left-padded
"""

from __future__ import annotations

import dataclasses
from typing import Any, Sequence

import numpy as np

from jaxrlhf.data.formats import DataError, Demonstration, Prompt, Ranking, Text

# Every tokenised element carries these flags so batches stack uniformly.
STAT_KEYS = ("truncated/prompt", "truncated/response", "truncated/text",
             "skipped/tokenize", "padding")


@dataclasses.dataclass(frozen=True)
class Lengths:
  """Token budgets. A prompt/response sequence is `prompt + response` long."""
  prompt: int = 24      # P: prompt tokens, BOS included, left-truncated
  response: int = 12    # R: response tokens, EOS included, right-truncated
  text: int = 64        # pretraining sequence length
  k_max: int = 9        # rankings are padded to this many responses
  bucket: int = 0       # > 0: batches cut to multiples of this many slots (buckets.py)

  @property
  def sequence(self) -> int:
    return self.prompt + self.response

  def __post_init__(self):
    if (self.prompt < 2 or self.response < 1 or self.text < 2 or self.k_max < 2
        or self.bucket < 0):
      raise ValueError(f"lengths too small: {self}")


class Encoder:
  """A Hugging Face tokenizer reduced to what the data layer needs.

  `add_bos=None` follows the tokenizer: a BOS is prepended to prompts and texts
  exactly when the tokenizer itself adds one (Llama, the world tokenizer), not
  for GPT-2 or Qwen2.
  """

  def __init__(self, tokenizer, *, add_bos: bool | None = None):
    self.tokenizer = tokenizer
    if tokenizer.eos_token_id is None:
      raise ValueError("the tokenizer has no eos_token; set one before loading data")
    self.eos_id = int(tokenizer.eos_token_id)
    pad = tokenizer.pad_token_id
    self.pad_id = int(pad if pad is not None else self.eos_id)
    self.bos_id = None if tokenizer.bos_token_id is None else int(tokenizer.bos_token_id)
    if add_bos is None:
      probe = tokenizer("a", add_special_tokens=True)["input_ids"]
      add_bos = self.bos_id is not None and bool(probe) and probe[0] == self.bos_id
    if add_bos and self.bos_id is None:
      raise ValueError("add_bos=True but the tokenizer has no bos_token")
    self.add_bos = bool(add_bos)

  def encode(self, text: str) -> list[int]:
    return list(self.tokenizer(text, add_special_tokens=False)["input_ids"])

  def prefix(self) -> list[int]:
    return [self.bos_id] if self.add_bos else []

  def _render(self, messages, generation_prompt: bool, source) -> str:
    dicts = [{"role": role, "content": content} for role, content in messages]
    try:
      return self.tokenizer.apply_chat_template(
          dicts, tokenize=False, add_generation_prompt=generation_prompt)
    except Exception as e:  # jinja raises for roles/orderings a template rejects
      raise DataError(f"the tokenizer's chat template rejected the conversation: {e}",
                      source=source, field="messages", reason="chat_template") from None

  def chat_prompt(self, messages: Sequence[tuple[str, str]], source=None) -> list[int]:
    """A conversation rendered up to the assistant's reply (the generation prompt)."""
    return self.encode(self._render(messages, True, source))

  def chat_split(self, prompt: Sequence[tuple[str, str]],
                 completion: Sequence[tuple[str, str]], source=None) -> tuple[list[int], list[int]]:
    """(prompt ids, completion ids) of a conversation rendered whole: the prompt runs up
    to the end of the generation prompt that precedes the completion."""
    start_text = self._render(prompt, True, source)
    full = self._render(tuple(prompt) + tuple(completion), False, source)
    if not full.startswith(start_text):
      raise DataError("the chat template does not render the prompt as a prefix of the "
                      "whole conversation, so the completion cannot be located",
                      source=source, field="messages", reason="chat_template")
    encoded = self.tokenizer(full, add_special_tokens=False, return_offsets_mapping=True)
    ids = list(encoded["input_ids"])
    cut = next((t for t, (s, _) in enumerate(encoded["offset_mapping"])
                if s >= len(start_text)), len(ids))
    return ids[:cut], ids[cut:]

  def chat(self, messages: Sequence[tuple[str, str]], source=None) -> tuple[list[int], list[int], int]:
    """Renders a chat with the tokenizer's template.

    Returns (token ids, target flags, start of the final assistant turn). Target
    tokens are those whose characters fall inside an assistant turn: the text
    between the generation prompt that precedes the turn and the end of the turn
    (its closing token included). Turns after the last assistant turn are cut.
    """
    def render(upto: int, generation_prompt: bool) -> str:
      if upto == 0 and not generation_prompt:
        return ""
      return self._render(messages[:upto], generation_prompt, source)

    last = max(i for i, (role, _) in enumerate(messages) if role == "assistant")
    full = render(last + 1, False)
    spans = []
    for i, (role, _) in enumerate(messages[:last + 1]):
      if role != "assistant":
        continue
      start_text, end_text = render(i, True), render(i + 1, False)
      if not (full.startswith(start_text) and full.startswith(end_text)):
        raise DataError("the chat template does not render conversations as prefixes of "
                        "each other, so assistant turns cannot be located",
                        source=source, field=f"messages[{i}]", reason="chat_template")
      spans.append((len(start_text), len(end_text)))
    encoded = self.tokenizer(full, add_special_tokens=False, return_offsets_mapping=True)
    ids = list(encoded["input_ids"])
    starts = [start for start, _ in encoded["offset_mapping"]]
    targets = [int(any(lo <= s < hi for lo, hi in spans)) for s in starts]
    final_start = next((t for t, s in enumerate(starts) if s >= spans[-1][0]), len(ids))
    return ids, targets, final_start


def _stats(**flags: int) -> dict[str, np.ndarray]:
  return {key: np.int32(flags.get(key.replace("/", "_"), 0)) for key in STAT_KEYS}


def _prompt_tokens(encoder: Encoder, prompt: str, budget: int, cut=None,
                   source=None) -> tuple[list[int], bool]:
  """A prompt in at most `budget` tokens, the BOS kept: truncated on the left, or, where
  `cut` marks a span of it (a TL;DR post), that span is shortened from its end and the
  text around it is kept whole. The three parts are tokenised apart in that case, at
  the boundaries the TL;DR template puts there (a space before the post, a blank line
  after it)."""
  if cut is None:
    body = encoder.encode(prompt)
    room = budget - len(encoder.prefix())
    truncated = len(body) > room
    if truncated:
      body = body[len(body) - room:]
    return encoder.prefix() + body, truncated
  start, end = cut
  head, middle, tail = (encoder.encode(prompt[:start]), encoder.encode(prompt[start:end]),
                        encoder.encode(prompt[end:]))
  room = budget - len(encoder.prefix()) - len(head) - len(tail)
  if room < 1:
    raise DataError(f"the prompt without its post takes {budget - room} tokens, more than "
                    f"the prompt budget of {budget} (config.data.max_prompt_len)",
                    source=source, field="prompt", reason="prompt_too_long")
  truncated = len(middle) > room
  return encoder.prefix() + head + middle[:room] + tail, truncated


def _cut_left(ids: list[int], budget: int, bos_id: int | None) -> tuple[list[int], bool]:
  """Keeps the last tokens of a rendered chat prompt, and the BOS it may start with."""
  if len(ids) <= budget:
    return ids, False
  keep_bos = int(bos_id is not None and bool(ids) and ids[0] == bos_id)
  return ids[:keep_bos] + ids[len(ids) - (budget - keep_bos):], True


def _cut_right(ids: list[int], budget: int, eos_id: int) -> tuple[list[int], bool]:
  """Keeps the first tokens of a rendered completion, ending a cut one with EOS."""
  if len(ids) <= budget:
    return ids, False
  return ids[:budget - 1] + [eos_id], True


def _response_tokens(encoder: Encoder, response: str, budget: int) -> tuple[list[int], bool]:
  """Right-truncates a response to leave room for the EOS that always ends it."""
  body = encoder.encode(response)
  truncated = len(body) > budget - 1
  return body[:budget - 1] + [encoder.eos_id], truncated


def _pad_right(values: list[int], length: int, pad: int) -> np.ndarray:
  out = np.full((length,), pad, np.int32)
  out[:len(values)] = values
  return out


def _lm_fields(prompt_ids: list[int], response_ids: list[int], targets: list[int],
               length: int, pad_id: int) -> dict[str, np.ndarray]:
  ids = prompt_ids + response_ids
  n_prompt, n_all = len(prompt_ids), len(prompt_ids) + len(response_ids)
  prompt_mask = np.zeros((length,), np.int32)
  prompt_mask[:n_prompt] = 1
  response_mask = np.zeros((length,), np.int32)
  response_mask[n_prompt:n_all] = 1
  return {
      "input_ids": _pad_right(ids, length, pad_id),
      "attention_mask": prompt_mask + response_mask,
      "loss_mask": _pad_right(targets, length, 0),
      "prompt_mask": prompt_mask,
      "response_mask": response_mask,
  }


def tokenize_demonstration(example: Demonstration, encoder: Encoder,
                           lengths: Lengths) -> dict[str, Any]:
  """SFT example of length P + R: prompt, response + EOS, right padding."""
  if not example.is_chat:
    prompt_ids, prompt_cut = _prompt_tokens(encoder, example.prompt, lengths.prompt,
                                            example.prompt_cut, example.source)
    response_ids, response_cut = _response_tokens(encoder, example.response, lengths.response)
    targets = [0] * len(prompt_ids) + [1] * len(response_ids)
    out = _lm_fields(prompt_ids, response_ids, targets, lengths.sequence, encoder.pad_id)
    out["_stats"] = _stats(truncated_prompt=prompt_cut, truncated_response=response_cut)
    return out
  ids, targets, final_start = encoder.chat(example.messages, example.source)
  if example.final_turn_only:
    targets = [0] * final_start + targets[final_start:]
  prompt_ids, prompt_targets = ids[:final_start], targets[:final_start]
  response_ids, response_targets = ids[final_start:], targets[final_start:]
  prompt_cut = len(prompt_ids) > lengths.prompt
  if prompt_cut:
    # Keep the end of the conversation, and the BOS a template may start with.
    keep_bos = encoder.bos_id is not None and prompt_ids[0] == encoder.bos_id
    room = lengths.prompt - keep_bos
    prompt_ids = prompt_ids[:keep_bos] + prompt_ids[-room:]
    prompt_targets = prompt_targets[:keep_bos] + prompt_targets[-room:]
  response_cut = len(response_ids) > lengths.response
  if response_cut:  # keep the stop-token invariant of the plain format
    response_ids = response_ids[:lengths.response - 1] + [encoder.eos_id]
    response_targets = response_targets[:lengths.response - 1] + [1]
  out = _lm_fields(prompt_ids, response_ids, prompt_targets + response_targets,
                   lengths.sequence, encoder.pad_id)
  out["_stats"] = _stats(truncated_prompt=prompt_cut, truncated_response=response_cut)
  return out


def pair_mask_from_ranks(ranks: Sequence[int], k_max: int) -> np.ndarray:
  """[k_max, k_max] float32: 1 where response i is strictly preferred to j (lower rank)."""
  k = len(ranks)
  r = np.asarray(ranks)
  mask = np.zeros((k_max, k_max), np.float32)
  mask[:k, :k] = (r[:, None] < r[None, :]).astype(np.float32)
  return mask


def tokenize_ranking(example: Ranking, encoder: Encoder, lengths: Lengths) -> dict[str, Any]:
  """K responses to one prompt as one element, padded to K_max, with the pair structure."""
  k, k_max, length = example.k, lengths.k_max, lengths.sequence
  if k > k_max:
    raise DataError(f"{k} responses but the loader pads rankings to k_max={k_max}",
                    source=example.source, field="responses", reason="too_many_responses")
  if example.is_chat:
    split = [encoder.chat_split(example.prompt_messages, turns, example.source)
             for turns in example.response_messages]
    if any(ids != split[0][0] for ids, _ in split):
      raise DataError("the chat template renders the shared prompt differently before "
                      "different responses", source=example.source, field="prompt",
                      reason="chat_template")
    prompt_ids, prompt_cut = _cut_left(split[0][0], lengths.prompt, encoder.bos_id)
    responses = [_cut_right(ids, lengths.response, encoder.eos_id) for _, ids in split]
  else:
    prompt_ids, prompt_cut = _prompt_tokens(encoder, example.prompt, lengths.prompt,
                                            example.prompt_cut, example.source)
    responses = [_response_tokens(encoder, r, lengths.response) for r in example.responses]
  rows = {name: np.zeros((k_max, length), np.int32)
          for name in ("attention_mask", "prompt_mask", "response_mask")}
  input_ids = np.full((k_max, length), encoder.pad_id, np.int32)
  end_index = np.zeros((k_max,), np.int32)
  responses_cut = 0
  for i, (response_ids, cut) in enumerate(responses):
    responses_cut += cut
    fields = _lm_fields(prompt_ids, response_ids, [], length, encoder.pad_id)
    input_ids[i] = fields["input_ids"]
    for name in rows:
      rows[name][i] = fields[name]
    end_index[i] = len(prompt_ids) + len(response_ids) - 1  # the EOS: reward read here
  response_valid = np.zeros((k_max,), np.int32)
  response_valid[:k] = 1
  ranks = np.full((k_max,), -1, np.int32)
  ranks[:k] = example.ranks
  return {
      "input_ids": input_ids, **rows, "end_index": end_index,
      "response_valid": response_valid, "ranks": ranks,
      "pair_mask": pair_mask_from_ranks(example.ranks, k_max),
      "_stats": _stats(truncated_prompt=prompt_cut, truncated_response=responses_cut),
  }


def tokenize_prompt(example: Prompt, encoder: Encoder, lengths: Lengths) -> dict[str, Any]:
  """Left-padded prompt for the sampler: real tokens end at the last position."""
  if example.is_chat:
    prompt_ids, prompt_cut = _cut_left(encoder.chat_prompt(example.messages, example.source),
                                       lengths.prompt, encoder.bos_id)
  else:
    prompt_ids, prompt_cut = _prompt_tokens(encoder, example.prompt, lengths.prompt,
                                            example.prompt_cut, example.source)
  ids = np.full((lengths.prompt,), encoder.pad_id, np.int32)
  mask = np.zeros((lengths.prompt,), np.int32)
  ids[lengths.prompt - len(prompt_ids):] = prompt_ids
  mask[lengths.prompt - len(prompt_ids):] = 1
  return {"prompt_ids": ids, "prompt_mask": mask, "_stats": _stats(truncated_prompt=prompt_cut)}


def tokenize_text(example: Text, encoder: Encoder, lengths: Lengths) -> dict[str, Any]:
  """Pretraining sequence [BOS] text EOS, right-truncated; every token but the first is a target."""
  ids = encoder.prefix() + encoder.encode(example.text) + [encoder.eos_id]
  truncated = len(ids) > lengths.text
  ids = ids[:lengths.text]
  out = _lm_fields([], ids, [0] + [1] * (len(ids) - 1), lengths.text, encoder.pad_id)
  out["_stats"] = _stats(truncated_text=truncated)
  return out


def empty_example(kind: str, encoder: Encoder, lengths: Lengths) -> dict[str, Any]:
  """An all-padding element of `kind`: no attention, no loss, no pairs."""
  if kind == "prompts":
    out = {"prompt_ids": np.full((lengths.prompt,), encoder.pad_id, np.int32),
           "prompt_mask": np.zeros((lengths.prompt,), np.int32)}
  elif kind == "rankings":
    k, t = lengths.k_max, lengths.sequence
    out = {"input_ids": np.full((k, t), encoder.pad_id, np.int32),
           **{n: np.zeros((k, t), np.int32)
              for n in ("attention_mask", "prompt_mask", "response_mask")},
           "end_index": np.zeros((k,), np.int32),
           "response_valid": np.zeros((k,), np.int32),
           "ranks": np.full((k,), -1, np.int32),
           "pair_mask": np.zeros((k, k), np.float32)}
  else:
    t = lengths.text if kind == "text" else lengths.sequence
    out = _lm_fields([], [], [], t, encoder.pad_id)
  out["_stats"] = _stats()
  return out


TOKENIZERS = {
    "demonstrations": tokenize_demonstration,
    "rankings": tokenize_ranking,
    "prompts": tokenize_prompt,
    "text": tokenize_text,
}
