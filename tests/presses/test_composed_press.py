"""ComposedPress: presses applied in turn, attention weights only for the first, accepted orders validated."""

from dataclasses import dataclass, field

import pytest
import torch

from kvpress.cache.compressed_kv import CompressedKV
from kvpress.presses.capabilities import Capabilities
from kvpress.presses.composed_press import ComposedPress
from kvpress.presses.key_rerotation_press import KeyRerotationPress
from kvpress.presses.knorm_press import KnormPress
from kvpress.presses.snapkv_press import SnapKVPress
from tests.conftest import random_ids, tiny_model
from tests.presses.plain_reference import (
    ProjectionPress,
    assert_hooks_removed_after_error,
    compressed_prefill,
    dense_prefill,
    gather,
    projection_scores,
    recover_indices,
)


@dataclass
class SpyPress(ProjectionPress):
    """A projection scorer that declares chosen capabilities and records what it receives."""

    caps: Capabilities = Capabilities()
    wrap: bool = False  # return a CompressedKV instead of a tuple
    seen: list = field(default_factory=list)

    @property
    def capabilities(self):
        return self.caps

    def compress(self, module, hidden_states, keys, values, attentions, kwargs):
        self.seen.append((module.layer_idx, hidden_states.shape[1], keys.shape[2], attentions))
        kv = super().compress(module, hidden_states, keys, values, attentions, kwargs)
        kv = (kv.keys, kv.values) if isinstance(kv, CompressedKV) else kv  # as a press returning bare tensors
        return CompressedKV(*kv) if self.wrap else kv


@pytest.mark.parametrize("batch", [1, 2])
def test_kept_counts_and_selection_match_reference(arch, batch):
    model = tiny_model(arch)
    n, r1, r2 = 43, 0.5, 0.4
    ids = random_ids(n, batch, seed=batch + 20)
    first, second = ProjectionPress(compression_ratio=r1, seed=1), ProjectionPress(compression_ratio=r2, seed=2)
    press = ComposedPress([first, second])
    cache, report = compressed_prefill(model, press, ids)
    dense, _ = dense_prefill(model, ids)
    k1 = round(n * (1 - r1))
    k2 = round(k1 * (1 - r2))
    assert report.compressed_layers == sorted(dense)
    for i, (keys, values) in dense.items():
        assert torch.equal(report.kept_lengths[i], torch.full((batch, 2), k2))
        # Reference: top k1 by the first scores, then the top k2 of those by the second scores.
        s1 = projection_scores(keys.double(), seed=1)
        s2 = projection_scores(keys.double(), seed=2)
        top1 = s1.topk(k1, dim=-1).indices
        top2 = top1.gather(-1, s2.gather(-1, top1).topk(k2, dim=-1).indices)
        got = recover_indices(keys, cache.layers[i].keys)
        assert torch.equal(got.sort(-1).values, top2.sort(-1).values)
        torch.testing.assert_close(cache.layers[i].values, gather(values, got), atol=1e-5, rtol=1e-5)
    assert press.compression_ratio == pytest.approx(1 - (1 - r1) * (1 - r2))
    assert report.compression_ratio == pytest.approx(1 - k2 / n)


def test_later_presses_get_no_attention_weights_once_tokens_are_removed():
    model = tiny_model("llama", "eager")
    n = 24
    needs = Capabilities(needs_attention_weights=True)
    first, second, third = SpyPress(0.5, caps=needs, wrap=True), SpyPress(0.0), SpyPress(0.25)
    compressed_prefill(model, ComposedPress([first, second, third]), random_ids(n, 2))
    for layer in range(3):
        # Every press gets the full layer input; the token count shrinks along the chain.
        assert [s[layer][:3] for s in (first.seen, second.seen, third.seen)] == [
            (layer, n, n),
            (layer, n, 12),
            (layer, n, 12),
        ]
        assert first.seen[layer][3].shape == (2, 4, n, n)
        assert second.seen[layer][3] is None and third.seen[layer][3] is None
    # When no press removes tokens, the weights still describe the token set and are passed on.
    keep_all = [SpyPress(0.0), SpyPress(0.5)]
    compressed_prefill(model, ComposedPress(keep_all), random_ids(n))
    assert all(s[3] is not None for s in keep_all[1].seen)


def test_later_press_length_is_checked_on_what_it_receives():
    model = tiny_model("mistral")
    press = ComposedPress([SnapKVPress(compression_ratio=0.5, window_size=4), SnapKVPress(window_size=16)])
    compressed_prefill(model, press, random_ids(40))  # the second press sees 20 >= 16 tokens
    with pytest.raises(ValueError, match="window_size=16"):
        compressed_prefill(model, press, random_ids(24))  # ... here only 12


def test_capabilities_are_merged_and_validated():
    attn = Capabilities(needs_attention_weights=True)
    channels = Capabilities(prunes_channels=True)
    press = ComposedPress([SpyPress(caps=attn), KnormPress(), SpyPress(caps=channels)])
    assert press.capabilities == Capabilities(needs_attention_weights=True, prunes_channels=True)
    with pytest.raises(ValueError, match="eager"):  # the merged need reaches validate()
        with press(tiny_model("llama", "sdpa")):
            pass
    press.validate(tiny_model("llama", "eager"))


def test_bad_parameters():
    with pytest.raises(ValueError, match="non-empty list"):
        ComposedPress([])
    with pytest.raises(ValueError, match="non-empty list"):
        ComposedPress(KnormPress())
    with pytest.raises(ValueError, match=r"presses\[1\] must be a press"):
        ComposedPress([KnormPress(), "knorm"])
    with pytest.raises(ValueError, match=r"presses\[1\].*position 0"):
        ComposedPress([KnormPress(), SpyPress(caps=Capabilities(needs_attention_weights=True))])
    for caps in (Capabilities(prunes_channels=True), Capabilities(head_variable=True)):
        with pytest.raises(ValueError, match=r"presses\[0\].*last position \(1\)"):
            ComposedPress([SpyPress(caps=caps), KnormPress()])
    with pytest.raises(ValueError, match="re-rotates positions"):
        ComposedPress([KeyRerotationPress(KnormPress(0.5)), KnormPress(0.5)])
    with pytest.raises(ValueError, match="decode-phase"):
        ComposedPress([KnormPress(), SpyPress(caps=Capabilities(phase="decode"))])
    ComposedPress([KeyRerotationPress(KnormPress(0.5))])  # alone, a re-rotating press is fine


def test_hooks_removed_after_error():
    press = ComposedPress([KnormPress(0.3), SnapKVPress(0.3, window_size=2)])
    assert_hooks_removed_after_error(tiny_model("gemma3"), press, random_ids(16))
