"""`MemoryBudgetPress`: prune to a memory budget, keeping as many tokens as their (quantized) storage allows."""

from __future__ import annotations

import copy
import dataclasses
import math
from dataclasses import dataclass
from fractions import Fraction

import torch
from torch import nn

from kvpress.cache.forward_keyword import find_cache
from kvpress.cache.quantization_config import QuantizationConfig
from kvpress.presses.adakv_press import AdaKVPress
from kvpress.presses.base_press import BasePress, _cached_length
from kvpress.presses.capabilities import Capabilities
from kvpress.presses.key_rerotation_press import KeyRerotationPress
from kvpress.presses.scorer_press import ScorerPress
from kvpress.utils import attention_layers, full_attention_layer_indices, kv_geometry

# Wrappers whose kept count per (sequence, kv-head) is exactly their inner scorer's ``n_kept`` (AdaKV spreads
# ``kv_heads * n_kept`` tokens over the heads of a layer, which costs the same memory).
_COUNT_WRAPPERS = (AdaKVPress, KeyRerotationPress)


@dataclass
class MemoryBudgetPress(BasePress):
    """Keep, in every compressed layer, as many top-scored tokens as fit a memory budget at the cache's precision.

    With ``quantization`` set, kept tokens are stored at ``quantization.bits_for(layer)`` bits (KIVI layout, see
    :class:`~kvpress.cache.quantization_config.QuantizationConfig`), so the same budget keeps more of them; the
    pipeline reads ``press.quantization`` and builds a quantized cache with that configuration. Without it, tokens
    stay at the model's precision and the press is plain pruning at that budget (the fair baseline).

    The budget is split evenly over the compressed (full-attention) layers. Layer ``l`` of one sequence may use
    ``B_l`` bytes and keeps, per kv-head, ``min(n, floor((B_l - kv_heads * h_l) / (kv_heads * c_l * u)) * u)``
    tokens, where ``c_l`` is the cost of one token of one kv-head (``2 * head_dim * dtype bytes`` unquantized, else
    ``quantization.bytes_per_token(l, head_dim, dtype bytes)``), ``h_l`` what a kv-head costs whatever it keeps
    (``quantization.head_bytes``: KVQuant's level tables and sinks, GEAR's low-rank factors; 0 otherwise) and ``u``
    the storage unit: 1 token unquantized,
    ``quantization.group_size`` tokens quantized, since the quantized cache stores a head's tokens in whole groups
    (the last one padded). The cache then holds at most ``B_l`` bytes of kept tokens per layer (plus a few bytes of
    int32 lengths), within one unit per kv-head of it; a layer at 8 bits keeps fewer tokens than one at 4 bits.
    Head-variable presses (AdaKV) keep ``kv_heads`` times the per-head count per layer, split unevenly, so their
    heads' partial groups may add up to ``group_size - 1`` padded tokens per head. Which tokens are kept is the
    wrapped press's choice; its own budget (``compression_ratio`` / ``target_size``) is ignored and it is never
    modified.

    Give exactly one of ``budget_fraction`` and ``budget_bytes``.

    Args:
        press: a :class:`ScorerPress` with the default per-layer count (not one with its own per-layer schedule,
            such as PyramidKV), or an :class:`AdaKVPress` / :class:`KeyRerotationPress` around one.
        budget_fraction: budget as a fraction of the full-precision cache of the context, in ``(0, 1]``:
            ``B_l = budget_fraction * n * kv_heads * 2 * head_dim * dtype bytes``.
        budget_bytes: budget in bytes for the whole compressed context of one sequence over all compressed layers
            (``B_l = budget_bytes / n_layers``), a positive int.
        quantization: storage precision of the kept tokens (a :class:`QuantizationConfig` or a dict of its fields),
            or ``None`` for the model's precision.
    """

    press: BasePress
    budget_fraction: float | None = None
    budget_bytes: int | None = None
    quantization: QuantizationConfig | None = None

    def __post_init__(self):
        scorer = self.press.press if isinstance(self.press, _COUNT_WRAPPERS) else self.press
        if not isinstance(scorer, ScorerPress) or type(scorer).n_kept is not ScorerPress.n_kept:
            raise ValueError(
                f"press must be a ScorerPress with the default per-layer count, or AdaKVPress/KeyRerotationPress "
                f"around one (e.g. SnapKVPress(), AdaKVPress(SnapKVPress())), got {_describe(self.press)}"
            )
        if getattr(scorer, "skip_layers", ()):
            raise ValueError(
                f"press skips layers {scorer.skip_layers}, which the byte budget cannot plan for; accepted: "
                "skip_layers=() inside MemoryBudgetPress"
            )
        if (self.budget_fraction is None) == (self.budget_bytes is None):
            raise ValueError(
                "give exactly one of budget_fraction (fraction of the full-precision cache, in (0, 1]) and "
                f"budget_bytes (bytes per sequence, a positive int); got budget_fraction={self.budget_fraction!r}, "
                f"budget_bytes={self.budget_bytes!r}"
            )
        fraction = self.budget_fraction
        if fraction is not None and (
            isinstance(fraction, bool)
            or not isinstance(fraction, (int, float))
            or math.isnan(fraction)
            or not 0 < fraction <= 1
        ):
            raise ValueError(
                f"budget_fraction must be a number in (0, 1] (fraction of the full-precision cache), got {fraction!r}"
            )
        nbytes = self.budget_bytes
        if nbytes is not None and (isinstance(nbytes, bool) or not isinstance(nbytes, int) or nbytes < 1):
            raise ValueError(f"budget_bytes must be a positive int (bytes per sequence), got {nbytes!r}")
        if self.quantization is not None:
            self.quantization = QuantizationConfig.coerce(self.quantization, "quantization")

    # ---- the plan -------------------------------------------------------------------------------------------------
    def token_bytes(self, layer_idx: int, head_dim: int, dtype: torch.dtype) -> float:
        """Bytes one kept token costs per kv-head in ``layer_idx`` (keys and values, scales and zeros included)."""
        if self.quantization is None:
            return 2 * head_dim * dtype.itemsize
        self.quantization.check_head_dim(head_dim)
        return self.quantization.bytes_per_token(layer_idx, head_dim, dtype.itemsize)

    def layer_budget_bytes(self, n_tokens: int, config, dtype: torch.dtype) -> Fraction:
        """Bytes one sequence may use in each compressed layer for an ``n_tokens`` prefill (exact)."""
        head_dim, kv_heads, layers = _geometry(config)
        if self.budget_bytes is not None:
            return Fraction(self.budget_bytes, len(layers))
        # The decimal the user wrote (0.3), not the binary float just below it, so floors are not off by one.
        return Fraction(repr(float(self.budget_fraction))) * n_tokens * kv_heads * 2 * head_dim * dtype.itemsize

    def planned_tokens(self, n_tokens: int, layer_idx: int, config, dtype: torch.dtype) -> int:
        """Tokens kept per (sequence, kv-head) in ``layer_idx`` out of ``n_tokens``, in ``[0, n_tokens]``.

        Args:
            n_tokens: prefill length.
            layer_idx: a compressed (full-attention) layer.
            config: the model's config (head dimension, kv heads and layer types are read from it).
            dtype: the cache's dtype (the model's), which sets full-precision and scale bytes.
        """
        head_dim, kv_heads, _ = _geometry(config)
        unit = self.storage_unit
        per_unit = Fraction(self.token_bytes(layer_idx, head_dim, dtype)) * kv_heads * unit
        fixed = Fraction(self.head_bytes(layer_idx, head_dim, dtype)) * kv_heads
        budget = max(Fraction(0), self.layer_budget_bytes(n_tokens, config, dtype) - fixed)
        return min(n_tokens, math.floor(budget / per_unit) * unit)

    def head_bytes(self, layer_idx: int, head_dim: int, dtype: torch.dtype) -> float:
        """Bytes each kv-head of ``layer_idx`` costs whatever it keeps (KVQuant's level tables and sinks, GEAR's
        low-rank factors; 0 unquantized and for KIVI)."""
        if self.quantization is None:
            return 0.0
        return self.quantization.head_bytes(layer_idx, head_dim, dtype.itemsize)

    @property
    def storage_unit(self) -> int:
        """Tokens a head's storage grows by: 1 at full precision, ``group_size`` quantized (partial groups are padded)."""
        return 1 if self.quantization is None else self.quantization.group_size

    def planned_bytes(self, n_tokens: int, config, dtype: torch.dtype) -> float:
        """Bytes the kept tokens of one sequence occupy in the cache over all compressed layers (``<=`` the budget),
        padding of a partial last group included; the cache adds only int32 lengths to it."""
        head_dim, kv_heads, layers = _geometry(config)
        unit = self.storage_unit
        stored = {i: -(-self.planned_tokens(n_tokens, i, config, dtype) // unit) * unit for i in layers}
        return sum(kv_heads * (stored[i] * self.token_bytes(i, head_dim, dtype) + self.head_bytes(i, head_dim, dtype))
                   for i in layers)  # fmt: skip

    def effective_compression_ratio(self, n_tokens: int, config, dtype: torch.dtype) -> float:
        """Fraction of the ``n_tokens`` prefilled tokens removed, averaged over the compressed layers."""
        layers = _geometry(config)[2]
        kept = sum(self.planned_tokens(n_tokens, i, config, dtype) for i in layers)
        return 1.0 - kept / (n_tokens * len(layers))

    @property
    def compression_ratio(self) -> float:
        """Fraction of tokens removed by a ``budget_fraction`` in layers at ``quantization.bits``, for a 16-bit cache
        and long contexts (the exact figure for a model is :meth:`effective_compression_ratio`).

        A ``budget_bytes`` budget removes a fraction that depends on the context length: asking for it raises.
        """
        if self.budget_fraction is None:
            raise ValueError(
                f"budget_bytes={self.budget_bytes} removes a fraction of tokens that depends on the context length; "
                "use effective_compression_ratio(n_tokens, config, dtype) or budget_fraction"
            )
        if self.quantization is None:
            return 1.0 - self.budget_fraction
        uniform = self.quantization.model_copy(update={"layer_bits": None})
        # The ratio of quantized to full bytes does not depend on head_dim (both scale with it).
        stored = uniform.compression_of_bytes(0, uniform.group_size, 2)
        return 1.0 - min(1.0, self.budget_fraction / stored)

    def check_plan(self, n_tokens: int, config, dtype: torch.dtype) -> None:
        """Raise ``ValueError`` when some compressed layer would keep no token per head out of ``n_tokens``."""
        for i in _geometry(config)[2]:
            if n_tokens > 0 and self.planned_tokens(n_tokens, i, config, dtype) < 1:
                raise ValueError(self._too_small(n_tokens, i, config, dtype))

    def _too_small(self, n_tokens: int, layer_idx: int, config, dtype: torch.dtype) -> str:
        head_dim, kv_heads, layers = _geometry(config)
        unit = self.storage_unit
        cost = self.token_bytes(layer_idx, head_dim, dtype) * kv_heads * unit
        # The dearest layer sets the bar.
        worst = max(self.token_bytes(i, head_dim, dtype) for i in layers) * kv_heads * unit
        what = "one token" if unit == 1 else f"one group of {unit} tokens (quantized heads are stored in whole groups)"
        where = f"layer {layer_idx} needs {cost:g} bytes per sequence to keep {what} in each of its {kv_heads} kv-heads"
        if self.budget_bytes is not None:
            return (
                f"budget_bytes={self.budget_bytes} is too small: {where}, but gets {self.budget_bytes / len(layers):g} "
                f"bytes ({len(layers)} compressed layers); accepted: budget_bytes >= {math.ceil(worst * len(layers))}"
            )
        full = n_tokens * kv_heads * 2 * head_dim * dtype.itemsize
        return (
            f"budget_fraction={self.budget_fraction} is too small for a {n_tokens}-token context: {where}, but gets "
            f"{float(self.layer_budget_bytes(n_tokens, config, dtype)):g}; accepted: budget_fraction >= "
            f"{worst / full:.4g} for this context length"
        )

    # ---- BasePress ------------------------------------------------------------------------------------------------
    @property
    def capabilities(self) -> Capabilities:
        return dataclasses.replace(self.press.capabilities, chunked_prefill=False)  # budgets from the whole prompt

    def validate(self, model: nn.Module) -> None:
        super().validate(model)
        self.press.validate(model)
        modules = attention_layers(model)
        config = modules[0].config
        head_dim = _geometry(config)[0]
        if self.quantization is not None:
            self.quantization.check_head_dim(head_dim)
            beyond = sorted(i for i in (self.quantization.layer_bits or {}) if i >= len(modules))
            if beyond:
                raise ValueError(
                    f"quantization.layer_bits names layer(s) {beyond}, but the model has {len(modules)} attention "
                    f"layers; accepted: layer indices 0..{len(modules) - 1}"
                )
        if self.budget_bytes is not None:  # independent of the context length: reject before any forward
            self.check_plan(1, config, next(model.parameters()).dtype)

    def check_length(self, n_tokens: int) -> None:
        self.press.check_length(n_tokens)

    def forward_pre_hook(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        super().forward_pre_hook(module, args, kwargs)
        cache = find_cache(kwargs)
        if cache is not None and _cached_length(cache, module.layer_idx) == 0:
            # A fraction budget depends on the prefill length: check it before the first layer writes.
            hidden_states = kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]
            self.check_plan(hidden_states.shape[1], module.config, hidden_states.dtype)

    def compress(self, module, hidden_states, keys, values, attentions, kwargs):
        n = keys.shape[-2]
        k = self.planned_tokens(n, module.layer_idx, module.config, keys.dtype)
        if k < 1:
            raise ValueError(self._too_small(n, module.layer_idx, module.config, keys.dtype))
        return self._keeping(k).compress(module, hidden_states, keys, values, attentions, kwargs)

    def _keeping(self, k: int) -> BasePress:
        """A shallow copy of ``press`` whose scorer keeps ``k`` tokens per head (the original is left as it is)."""
        wrapped = isinstance(self.press, _COUNT_WRAPPERS)
        scorer = copy.copy(self.press.press if wrapped else self.press)
        # Shallow, so any state the scorer shares across layers stays shared; only its budget differs.
        scorer.compression_ratio, scorer.target_size = 0.0, k
        if not wrapped:
            return scorer
        outer = copy.copy(self.press)
        outer.press = scorer
        return outer


def _geometry(config) -> tuple[int, int, list[int]]:
    """``(head_dim, kv_heads, compressed layer indices)`` of a model config."""
    get_text = getattr(config, "get_text_config", None)
    config = get_text(decoder=True) if get_text is not None else config
    return (*kv_geometry(config), full_attention_layer_indices(config))


def _describe(press) -> str:
    inner = getattr(press, "press", None)
    return f"{type(press).__name__}({type(inner).__name__})" if inner is not None else type(press).__name__
