"""Models: the transformer (GPT-2, Llama, Qwen2), its KV cache, and Hugging Face interop."""

from jaxrlhf.models.architectures import ARCHITECTURES, ArchSpec
from jaxrlhf.models.config import TransformerConfig
from jaxrlhf.models.hf import (
    CheckpointError, config_from_hf, config_to_hf, from_pretrained, load_tokenizer,
    save_pretrained)
from jaxrlhf.models.transformer import (
    CausalLM, KVCache, ScalarHeadModel, Transformer, init_cache, init_params,
    position_ids_from_mask, stack_layers, unstack_layers)
