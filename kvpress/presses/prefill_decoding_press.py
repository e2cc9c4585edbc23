"""`PrefillDecodingPress`: one press for the prompt, another while generating."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from torch import nn

from kvpress.cache.forward_keyword import find_cache
from kvpress.presses.base_press import BasePress, is_prefill, layer_input
from kvpress.presses.capabilities import Capabilities
from kvpress.presses.report import CompressionReport


@dataclass
class PrefillDecodingPress(BasePress):
    """Compress the prefill with ``prefill_press`` and keep the cache bounded while generating with
    ``decoding_press`` (e.g. ``PrefillDecodingPress(SnapKVPress(0.5), DecodingPress(KnormPress(), 256, 1024))``).

    Each forward goes to the press of its phase: a forward that fills an empty layer is the prefill, any later one
    (question, generated token) the decoding."""

    prefill_press: BasePress = None
    decoding_press: BasePress = None

    def __post_init__(self):
        for name, phase in (("prefill_press", "prefill"), ("decoding_press", "decode")):
            press = getattr(self, name)
            if not isinstance(press, BasePress) or press.capabilities.phase != phase:
                kind = type(press).__name__
                raise ValueError(f"{name} must be a {phase}-phase press, got {kind}")
        if self.decoding_press.capabilities.rerotates_positions and not (
            self.prefill_press.capabilities.rerotates_positions
        ):
            raise ValueError(
                "the decoding press places tokens at positions inside the cache (rerotate=True), so the prompt's kept "
                f"keys must sit at positions 0..k-1 too: wrap the prefill press, KeyRerotationPress("
                f"{type(self.prefill_press).__name__}(...))"
            )

    @property
    def capabilities(self) -> Capabilities:
        merged = dataclasses.replace(self.prefill_press.capabilities, phase="decode").merge(
            self.decoding_press.capabilities
        )
        return dataclasses.replace(merged, phase="both")

    def validate(self, model: nn.Module) -> None:
        self.prefill_press.validate(model)
        self.decoding_press.validate(model)

    def check_length(self, n_tokens: int) -> None:
        self.prefill_press.check_length(n_tokens)

    def compress(self, module, hidden_states, keys, values, attentions, kwargs):
        return self.prefill_press.compress(module, hidden_states, keys, values, attentions, kwargs)

    def forward_hook(self, module: nn.Module, args: tuple, kwargs: dict, output, report: CompressionReport):
        cache = find_cache(kwargs)
        if cache is None:
            return output
        prefill = is_prefill(cache, module, layer_input(args, kwargs))
        press = self.prefill_press if prefill else self.decoding_press
        return press.forward_hook(module, args, kwargs, output, report)
