"""StepRecorder: the ring holds each full-attention layer's last steps' inputs in generation order, whatever the
number of steps against the ring's size; hooks come off on exit; multi-token forwards are refused."""

import pytest
import torch

from kvpress.cache.forward_keyword import cache_kwargs
from kvpress.generation import StepRecorder
from kvpress.presses.base_press import layer_input
from kvpress.utils import attention_layers, is_sliding_layer
from tests.conftest import random_ids, tiny_model


def _decode(model, cache, steps: int, start: int, batch: int):
    with torch.no_grad():
        for i in range(steps):
            ids = random_ids(1, batch=batch, seed=100 + i)
            model(input_ids=ids, **cache_kwargs(model, cache), position_ids=torch.full((batch, 1), start + i))


@pytest.mark.parametrize("arch, batch, size, steps", [("llama", 1, 4, 3), ("qwen2", 2, 4, 9), ("gemma3", 3, 5, 5)])
def test_last_returns_the_recorded_steps_in_order(arch, batch, size, steps):
    from transformers import DynamicCache

    model = tiny_model(arch)
    cache = DynamicCache(config=model.config)
    with torch.no_grad():
        model(input_ids=random_ids(8, batch=batch), **cache_kwargs(model, cache))
    seen: dict[int, list] = {}

    def spy(module, args, kwargs, output):
        cos, sin = kwargs["position_embeddings"]
        seen.setdefault(module.layer_idx, []).append((layer_input(args, kwargs), cos, sin))

    layers = attention_layers(model)
    handles = [m.register_forward_hook(spy, with_kwargs=True) for m in layers]
    try:
        with StepRecorder(model, size) as recorder:
            _decode(model, cache, steps, 8, batch)
    finally:
        for h in handles:
            h.remove()
    full = [m.layer_idx for m in layers if not is_sliding_layer(m)]
    assert sorted(recorder.rings) == full  # sliding-window layers are not recorded
    for idx in full:
        for n in (1, steps, steps + 3):
            m = min(n, size, steps)
            want = [torch.cat([step[j] for step in seen[idx][-m:]], dim=1) for j in range(3)]
            got = recorder.last(idx, min(n, steps))
            for g, w in zip(got, want):
                assert torch.equal(g, w)
    # Hooks are gone: more forwards leave the rings alone.
    before = [t.clone() for t in recorder.rings[full[0]]]
    _decode(model, cache, 2, 8 + steps, batch)
    assert all(torch.equal(a, b) for a, b in zip(before, recorder.rings[full[0]]))


def test_bad_input():
    model = tiny_model("llama")
    with pytest.raises(ValueError, match="size must be an int >= 1, got 0"):
        StepRecorder(model, 0)
    recorder = StepRecorder(model, 2)
    with pytest.raises(ValueError, match="no steps recorded for layer 0"):
        recorder.last(0, 1)
    with recorder, pytest.raises(ValueError, match="records one-token decode steps; a forward of 3 tokens ran"):
        with torch.no_grad():
            model(input_ids=random_ids(3))
    with torch.no_grad():
        model(input_ids=random_ids(3))  # the hooks came off despite the error
