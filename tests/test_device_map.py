"""Models placed by accelerate's ``device_map``: layers offloaded to disk (their weights on the meta device, loaded by
accelerate's hooks for each forward) answer through the pipeline exactly as the same model held whole, for every
cache kind (dense, head-variable, quantized) and for presses that recompute queries from the layer's weights or run
forwards of their own. Several GPUs are not available here; this covers the hook path every placement goes through."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM, pipeline

from kvpress.pipeline import TASK
from kvpress.presses import AdaKVPress, DuoAttentionPress, KnormPress, KVzipPress, SnapKVPress
from tests.fixtures_pipeline import random_text, smollm2_tokenizer, text_model

PRESSES = {
    "none": lambda: None,
    "knorm": lambda: KnormPress(0.5),
    "snapkv": lambda: SnapKVPress(0.5, window_size=4),
    "adakv": lambda: AdaKVPress(SnapKVPress(0.5, window_size=4)),
    "kvzip": lambda: KVzipPress(0.5, chunk_size=16),
    "duo_attention": lambda: DuoAttentionPress(0.5, sink_size=4, recent_size=8),
}


@pytest.fixture(scope="module")
def offloaded(tmp_path_factory):
    """The tiny Llama saved, then reloaded with its middle layer and head on disk."""
    path = tmp_path_factory.mktemp("model")
    model = text_model("llama", head_dim=32)
    model.save_pretrained(path)
    device_map = {"model.embed_tokens": "cpu", "model.rotary_emb": "cpu", "model.layers.0": "cpu",
                  "model.layers.1": "disk", "model.layers.2": "cpu", "model.norm": "cpu",
                  "lm_head": "disk"}  # fmt: skip
    placed = AutoModelForCausalLM.from_pretrained(path, device_map=device_map, offload_folder=path / "offload",
                                                  dtype=torch.float32)  # fmt: skip
    assert placed.model.layers[1].self_attn.q_proj.weight.device.type == "meta"  # really offloaded
    return model, placed


def answers(model, press: str, quantization: str) -> dict:
    """The pipeline's answer and report for ``model`` under ``PRESSES[press]`` (``"4-bit"``: quantized storage)."""
    bits = {"bits": 4, "group_size": 32} if quantization == "4-bit" else None
    kwargs = dict(question=" Why?", max_new_tokens=8, kv_quantization=bits, return_report=True)
    return pipeline(TASK, model=model, tokenizer=smollm2_tokenizer())(random_text(60, seed=5), press=PRESSES[press](),
                                                                      **kwargs)  # fmt: skip


# KVzip refuses quantized caches (tests/presses/test_generate_under_press.py).
CASES = [(p, q) for p in sorted(PRESSES) for q in ("full", "4-bit") if (p, q) != ("kvzip", "4-bit")]


@pytest.mark.parametrize(("press", "quantization"), CASES)
def test_offloaded_layers_answer_as_the_whole_model(offloaded, press, quantization):
    model, placed = offloaded
    whole, split = answers(model, press, quantization), answers(placed, press, quantization)
    assert split["answer"] == whole["answer"]
    assert split["report"].kv_bytes == whole["report"].kv_bytes
    if press != "none":
        assert split["report"].compression_ratio > 0.2


@pytest.mark.skipif(
    not torch.cuda.is_available(), reason="needs a GPU: run on the GPU machine (benchmarks/gpu_suite.sh 1)"
)
@pytest.mark.parametrize(("press", "quantization"), CASES)
def test_layers_split_between_gpu_and_cpu(offloaded, press, quantization, tmp_path):
    """Layers on two devices (cuda:0 and the CPU): the answers and the bytes held equal those of the whole model on
    the GPU (every cache kind, presses that recompute queries, KVzip's own forwards)."""
    model, _ = offloaded
    model.save_pretrained(tmp_path)
    device_map = {"model.embed_tokens": 0, "model.rotary_emb": 0, "model.layers.0": 0, "model.layers.1": "cpu",
                  "model.layers.2": 0, "model.norm": 0, "lm_head": 0}  # fmt: skip
    split = AutoModelForCausalLM.from_pretrained(tmp_path, device_map=device_map, dtype=torch.float32)
    whole = AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.float32).to("cuda:0")
    want, got = answers(whole, press, quantization), answers(split, press, quantization)
    assert got["answer"] == want["answer"]
    assert got["report"].kv_bytes == want["report"].kv_bytes
