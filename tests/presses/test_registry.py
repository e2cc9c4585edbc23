"""The press registry: one name per press, parameters and defaults listed from the press classes."""

from __future__ import annotations

import dataclasses

import pytest

import kvpress.presses as presses
from kvpress.presses.registry import PRESSES, REQUIRED, describe_press, press_class, press_name, press_parameters


def test_every_concrete_press_has_exactly_one_name():
    exported = {
        cls
        for cls in vars(presses).values()
        if isinstance(cls, type) and issubclass(cls, presses.BasePress) and dataclasses.is_dataclass(cls)
        and cls not in (presses.ScorerPress, presses.ScorerWrapperPress, presses.AttentionEvictionPress,
                        presses.CrossLayerPress)
    }  # fmt: skip
    assert set(PRESSES.values()) == exported
    assert len(set(PRESSES.values())) == len(PRESSES)
    for name, cls in PRESSES.items():
        assert press_name(cls) == name and press_class(name) is cls


def test_parameters_are_the_constructor_defaults():
    assert press_parameters("snapkv") == {
        "compression_ratio": 0.0, "target_size": None, "window_size": 8, "kernel_size": 7, "pooling": "max",
        "group_reduction": "mean",
    }  # fmt: skip
    assert press_parameters("adakv") == {"press": REQUIRED, "alpha_safeguard": 0.2}
    for name, cls in PRESSES.items():
        fields = [f.name for f in dataclasses.fields(cls) if f.init]
        assert list(press_parameters(name)) == fields


def test_description_shows_parameters_and_summary():
    line = describe_press("streaming_llm")
    assert line.startswith("streaming_llm") and "StreamingLLMPress(compression_ratio=0.0, target_size=None, n_sink=4)" in line
    assert "ComposedPress(presses):" in describe_press("composed")


def test_unknown_names_are_refused_with_the_accepted_ones():
    with pytest.raises(ValueError, match="unknown press 'streamingllm'; accepted: random, knorm, streaming_llm"):
        press_class("streamingllm")
    with pytest.raises(ValueError, match="ScorerPress is not a registered press"):
        press_name(presses.ScorerPress)
