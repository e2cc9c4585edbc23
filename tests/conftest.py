"""Shared fixtures: tiny random models of every supported architecture, built from configs (no hub access)."""

from __future__ import annotations

import functools

import pytest
import torch
from transformers import (
    AutoModelForCausalLM,
    Gemma3TextConfig,
    LlamaConfig,
    MistralConfig,
    Phi3Config,
    Qwen2Config,
    Qwen3Config,
)

import kvpress  # noqa: F401  (registers the pipeline)

_COMMON = dict(
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=3,
    num_attention_heads=4,
    num_key_value_heads=2,
    vocab_size=128,
    max_position_embeddings=1024,
    bos_token_id=1,
    eos_token_id=2,
    pad_token_id=0,
)

ARCHITECTURES = {
    "llama": lambda: LlamaConfig(**_COMMON, head_dim=16),
    "mistral": lambda: MistralConfig(**_COMMON, head_dim=16, sliding_window=None),
    "qwen2": lambda: Qwen2Config(**_COMMON),
    "qwen3": lambda: Qwen3Config(**_COMMON, head_dim=16),
    "phi3": lambda: Phi3Config(**_COMMON),
    # Layers 0 and 1 slide over 8 tokens, layer 2 attends globally (Gemma3's local/global pattern, shrunk).
    "gemma3": lambda: Gemma3TextConfig(
        **_COMMON, head_dim=16, sliding_window=8, layer_types=["sliding_attention", "sliding_attention", "full_attention"]
    ),
}


def tiny_config(arch: str, head_dim: int | None = None, kv_heads: int | None = None):
    """The tiny ``arch`` config, optionally with another head dimension (quantization groups need >= 32; the
    default is 16) or number of kv heads."""
    config = ARCHITECTURES[arch]()
    if head_dim is not None:
        config.head_dim = head_dim
    if kv_heads is not None:
        config.num_key_value_heads = kv_heads
    return config


@functools.lru_cache(maxsize=None)
def _build(arch: str, attn: str, head_dim: int | None, kv_heads: int | None, dtype: torch.dtype):
    torch.manual_seed(0)
    config = tiny_config(arch, head_dim, kv_heads)
    model = AutoModelForCausalLM.from_config(config, attn_implementation=attn, dtype=dtype)
    return model.eval()


def tiny_model(arch: str = "llama", attn: str = "sdpa", *, head_dim: int | None = None, kv_heads: int | None = None,
               dtype: torch.dtype = torch.float32):  # fmt: skip
    """A tiny random model of ``arch`` (:func:`tiny_config`; cached per process; do not modify its weights)."""
    return _build(arch, attn, head_dim, kv_heads, dtype)


@pytest.fixture(params=sorted(ARCHITECTURES))
def arch(request) -> str:
    return request.param


@pytest.fixture(params=["sdpa", "eager"])
def attn(request) -> str:
    return request.param


def random_ids(n: int, batch: int = 1, vocab: int = 128, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(1, vocab, (batch, n), generator=g)
