"""prefill: the cache holds the prompt (compressed under a press), and the next position is where decoding resumes."""

import warnings

import pytest
import torch
from transformers import AutoModelForCausalLM, DynamicCache

from kvpress.generation import prefill
from kvpress.presses.key_rerotation_press import KeyRerotationPress
from kvpress.presses.knorm_press import KnormPress
from tests.conftest import random_ids, tiny_config, tiny_model


def test_without_a_press_the_whole_prompt_is_cached():
    model = tiny_model("llama")
    cache = DynamicCache(config=model.config)
    position, report = prefill(model, random_ids(40), cache)
    assert (position, report) == (40, None)
    assert cache.get_seq_length() == 40


def test_a_press_compresses_and_reports():
    model = tiny_model("qwen2")
    ids = random_ids(40, seed=1)
    cache = DynamicCache(config=model.config)
    position, report = prefill(model, ids, cache, KnormPress(0.25), record_kept=True)
    assert position == 40 and cache.get_seq_length() == 30
    assert abs(report.compression_ratio - 0.25) < 1e-6
    kept = report.kept_indices[0]  # (batch, kv heads, kept) positions of the prompt
    assert kept.shape[-1] == 30 and int(kept.max()) < 40
    # The kept keys are the prefill's own keys at those positions (nothing recomputed).
    full = DynamicCache(config=model.config)
    prefill(model, ids, full)
    idx = kept[..., None].expand(-1, -1, -1, full.layers[0].keys.shape[-1])
    torch.testing.assert_close(cache.layers[0].keys, full.layers[0].keys.gather(2, idx))


def test_rerotated_keys_continue_after_the_kept_length():
    model = tiny_model("llama")
    cache = DynamicCache(config=model.config)
    position, _ = prefill(model, random_ids(40, seed=2), cache, KeyRerotationPress(KnormPress(0.5)))
    assert position == 20 == cache.get_seq_length()


def test_a_prompt_past_the_trained_positions_warns_once_naming_both_numbers():
    config = tiny_config("llama")
    config.max_position_embeddings = 32
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config).eval()
    with pytest.warns(
        UserWarning, match=r"the prompt holds 40 tokens, more than the model's max_position_embeddings=32"
    ):
        prefill(model, random_ids(40), DynamicCache(config=model.config))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        prefill(model, random_ids(40, seed=1), DynamicCache(config=model.config))  # the same length: said already
        prefill(model, random_ids(32), DynamicCache(config=model.config))  # within the trained positions
    with pytest.warns(UserWarning, match="holds 48 tokens"):
        with KnormPress(0.5)(model):  # under a press, outside the generation layer (model.generate's prefill)
            model(input_ids=random_ids(48), use_cache=True)
