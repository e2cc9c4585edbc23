"""Text-pipeline fixtures: tiny random models that share the offline SmolLM2 tokenizer, and plain reference decoding.

Tiny models from ``tests.conftest`` have no tokenizer; these copies of them have a vocabulary as large as the SmolLM2
tokenizer's (49152), so ``pipeline("kv-press-text-generation", ...)`` runs on them end to end without downloads.
"""

from __future__ import annotations

import functools
import random

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, pipeline

from kvpress.offline_model import smollm2_gguf
from kvpress.pipeline import TASK
from tests.conftest import tiny_config

_WORDS = (
    "river stone lantern harbour market winter garden copper violet quiet ancient bridge letter window orchard "
    "sailor baker clock tower storm candle shelf meadow village road north forest evening morning silver"
).split()


@functools.lru_cache(maxsize=None)
def smollm2_tokenizer():
    """The SmolLM2 tokenizer (with its chat template), read from the installed GGUF once per process (~7 s)."""
    directory, name = smollm2_gguf()
    return AutoTokenizer.from_pretrained(directory, gguf_file=name)


def text_model(arch: str = "llama", attn: str = "sdpa", head_dim: int | None = None):
    """A tiny random ``arch`` model whose vocabulary and special tokens match :func:`smollm2_tokenizer`
    (``head_dim``: as :func:`tests.conftest.tiny_config`).

    Cached per process (one object per ``(arch, attn, head_dim)``): restore anything a test changes on it.
    """
    return _build(arch, attn, head_dim)


@functools.lru_cache(maxsize=None)
def _build(arch: str, attn: str, head_dim: int | None):
    tok = smollm2_tokenizer()
    config = tiny_config(arch, head_dim)
    config.vocab_size = len(tok)
    config.bos_token_id, config.eos_token_id, config.pad_token_id = tok.bos_token_id, tok.eos_token_id, tok.pad_token_id
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(config, attn_implementation=attn, dtype=torch.float32).eval()


def text_pipeline(arch: str = "llama", attn: str = "sdpa", tokenizer=None):
    """The kvpress pipeline on :func:`text_model` (``tokenizer`` defaults to the SmolLM2 one)."""
    return pipeline(TASK, model=text_model(arch, attn), tokenizer=tokenizer or smollm2_tokenizer())


def random_text(n_words: int, seed: int = 0) -> str:
    """Deterministic pseudo-English text of ``n_words`` words, ending with a full stop."""
    rng = random.Random(seed)
    return " ".join(rng.choice(_WORDS) for _ in range(n_words)).capitalize() + "."


def eos_ids(model, tokenizer) -> list[int]:
    """Every id that ends an answer: the EOS ids of the generation config, the model config and the tokenizer."""
    ids = set()
    for source in (model.generation_config, model.config, tokenizer):
        eos = getattr(source, "eos_token_id", None)
        if eos is not None:
            ids.update([eos] if isinstance(eos, int) else eos)
    return sorted(ids)


def chat_prompt(tokenizer, context: str, question: str, answer_prefix: str = "") -> str:
    """The whole prompt as one string: the chat template around ``context + question``, then ``answer_prefix``."""
    messages = [{"role": "user", "content": context + question}]
    return tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False) + answer_prefix


def greedy_tokens(model, tokenizer, ids: torch.Tensor, max_new_tokens: int) -> list[int]:
    """Reference: ``model.generate`` (greedy, the model's own attention) after ``ids`` ``(1, n)``; EOS cut off."""
    eos = eos_ids(model, tokenizer)
    with torch.no_grad():
        out = model.generate(
            ids, do_sample=False, max_new_tokens=max_new_tokens, eos_token_id=eos, pad_token_id=eos[0],
            attention_mask=torch.ones_like(ids),
        )
    new = out[0, ids.shape[1] :].tolist()
    return new[: next((i for i, t in enumerate(new) if t in eos), len(new))]


def greedy_generate(model, tokenizer, prompt: str, max_new_tokens: int) -> str:
    """Reference answer: :func:`greedy_tokens` on the whole tokenized ``prompt``, decoded."""
    ids = tokenizer(prompt, add_special_tokens=False, return_tensors="pt").input_ids
    return tokenizer.decode(greedy_tokens(model, tokenizer, ids, max_new_tokens), skip_special_tokens=True)
