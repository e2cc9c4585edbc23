"""Graph decoding in tests: the real :class:`GraphDecoder` on a GPU, an emulation of its replays elsewhere.

A replayed CUDA graph runs the captured kernels on the captured tensors and no Python. :class:`ReplayedSteps` runs
every step with the layers' Python state as it was at construction (what a replay sees), so decoding is right only
if every step's state lives on the device.
"""

from __future__ import annotations

import copy

import torch

import kvpress.generation.decode as decode_module
from kvpress.cache.attention import compressed_attention
from kvpress.generation.graph_decoder import (
    advance_host_tails,
    check_graph_cache,
    greedy_step,
    host_length,
    set_host_length,
)


class ReplayedSteps:
    """Stands in for :class:`GraphDecoder` where there is no GPU (the press's hooks stay suspended; a step
    recorder's hooks stand for their captured copies)."""

    def __init__(self, model, cache, max_new_tokens: int):
        check_graph_cache(cache)
        cache.reserve(max_new_tokens)
        self.model, self.cache = model, cache
        self.frozen = [dict(vars(layer)) for layer in cache.layers]

    def decode(self, ids, positions, n_steps: int, eos_token_id=None):
        if ids is not None:  # else continue where the previous call stopped
            self.ids, self.positions = ids.clone(), positions.clone()
        ids, positions, out = self.ids, self.positions, []
        host = [host_length(layer) for layer in self.cache.layers]  # where the previous call left the host mirrors
        with torch.no_grad(), compressed_attention(self.model):
            for _ in range(n_steps):
                for layer, state in zip(self.cache.layers, self.frozen):
                    vars(layer).update(state)
                greedy_step(self.model, self.cache, ids, positions)
                out.append(ids.clone())
        for layer, state, n in zip(self.cache.layers, self.frozen, host):
            vars(layer).update(state)
            set_host_length(layer, n)
        advance_host_tails(self.cache, n_steps)
        return torch.cat(out, dim=1)


def graph_ready(monkeypatch, model, captures: list | None = None):
    """``model`` where graph decoding runs: moved to the GPU if there is one; elsewhere the model stays on the CPU,
    which the generation layer is told is CUDA, and :class:`ReplayedSteps` replaces the decoder. ``captures``
    collects every decoder built (one per capture)."""
    real = decode_module.GraphDecoder if torch.cuda.is_available() else ReplayedSteps

    def build(*args, **kwargs):
        decoder = real(*args, **kwargs)
        if captures is not None:
            captures.append(decoder)
        return decoder

    monkeypatch.setattr(decode_module, "GraphDecoder", build)
    monkeypatch.setattr(decode_module, "_ANNOUNCED", set())  # each test sees its own fallback warnings
    if torch.cuda.is_available():
        return copy.deepcopy(model).to("cuda")
    monkeypatch.setattr(decode_module, "on_cuda", lambda model: True)
    return model
