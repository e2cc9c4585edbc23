"""The offline SmolLM2 loads quietly: no per-tensor conversion bar, and transformers is left as it was."""

from __future__ import annotations

import pytest
from transformers import modeling_gguf_pytorch_utils as gguf_utils
from transformers.utils.logging import is_progress_bar_enabled

from kvpress.offline_model import load_smollm2, smollm2_gguf

pytestmark = pytest.mark.slow


def test_load_prints_no_conversion_progress_bar(capfd):
    before = gguf_utils.tqdm
    model, tokenizer = load_smollm2()
    out, err = capfd.readouterr()
    assert "Converting and de-quantizing" not in out + err and "it/s]" not in out + err, err[-300:]
    assert gguf_utils.tqdm is before and is_progress_bar_enabled()  # restored
    assert model.config.num_hidden_layers == 30 and tokenizer.eos_token


def test_the_bar_is_what_transformers_draws_without_kvpress(capfd):
    """The check above could not pass by accident: a plain load of the same file draws the bar."""
    from transformers import AutoModelForCausalLM

    directory, name = smollm2_gguf()
    capfd.readouterr()
    AutoModelForCausalLM.from_pretrained(directory, gguf_file=name)
    _, err = capfd.readouterr()
    assert "Converting and de-quantizing" in err
