"""A byte-level BPE tokenizer trained here on English text, with a chat template: the
kind of tokenizer real checkpoints bring (GPT-2, Llama 3, Qwen2), built without a hub.

`ENGLISH` is the text it is trained on and the text the layout tests write; its end of
turn token is also its EOS, as in instruction-tuned checkpoints.
"""

from __future__ import annotations

import itertools
import pathlib

SPECIAL = ("<|endoftext|>", "<|pad|>", "<|user|>", "<|assistant|>", "<|system|>")
CHAT_TEMPLATE = ("{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}"
                 "<|endoftext|>{% endfor %}{% if add_generation_prompt %}<|assistant|>"
                 "{% endif %}")

_SUBJECTS = ("My landlord", "Our neighbour", "The new manager", "My best friend",
             "A coworker", "My sister", "The bus driver", "Our cat")
_VERBS = ("keeps ignoring", "finally answered", "forgot about", "complained about",
          "laughed at", "asked me about", "never mentioned", "wrote a long email about")
_OBJECTS = ("the broken heater.", "my birthday party.", "the rent increase.",
            "our holiday plans.", "the noisy dog next door.", "a missing package.",
            "the weekly meeting.", "the garden fence.")
ENGLISH = [f"{s} {v} {o}" for s, v, o in itertools.product(_SUBJECTS, _VERBS, _OBJECTS)]
# The TL;DR template's words, so that it takes few tokens.
_TEMPLATE = "SUBREDDIT: r/relationships\n\nTITLE: Help\n\nPOST: Hi\n\nTL;DR: Hi"


def save_bpe_tokenizer(directory: str | pathlib.Path, vocab_size: int = 512) -> str:
  """Trains the tokenizer on `ENGLISH` and saves it with `save_pretrained`; its path."""
  from tokenizers import ByteLevelBPETokenizer  # pylint: disable=g-import-not-at-top
  from transformers import PreTrainedTokenizerFast  # pylint: disable=g-import-not-at-top
  bpe = ByteLevelBPETokenizer()
  bpe.train_from_iterator(ENGLISH * 2 + [_TEMPLATE] * 50, vocab_size=vocab_size, min_frequency=2,
                          special_tokens=list(SPECIAL), show_progress=False)
  tokenizer = PreTrainedTokenizerFast(
      tokenizer_object=bpe._tokenizer,  # pylint: disable=protected-access
      eos_token="<|endoftext|>", pad_token="<|pad|>",
      additional_special_tokens=list(SPECIAL[2:]))
  tokenizer.chat_template = CHAT_TEMPLATE
  directory = pathlib.Path(directory)
  tokenizer.save_pretrained(str(directory))
  return str(directory)
