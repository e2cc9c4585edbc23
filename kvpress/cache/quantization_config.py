"""`QuantizationConfig`: method, bit width, group size and full-precision window of a quantized KV cache."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, StrictBool, ValidationError, field_validator, model_validator

BITS = (2, 3, 4, 8)
GROUP_SIZES = (32, 64, 128)
METHODS = ("kivi", "kvquant", "gear")
# Each method's own options and their defaults (the papers'): options of another method are refused.
_METHOD_OPTIONS = {
    "kivi": {},
    "kvquant": {"outlier_ratio": 0.01, "sink_tokens": 1, "pre_rope": True, "levels": "prompt"},
    "gear": {"outlier_ratio": 0.02, "rank": 4},
}


class QuantizationConfig(BaseModel):
    """How a quantized cache stores keys and values (KIVI layout: keys per channel, values per token).

    ``method`` picks what is stored beside the uniform groups:

    - ``"kivi"``: nothing (uniform asymmetric groups).
    - ``"kvquant"``: non-uniform levels (``levels="prompt"``: a 1-d k-means datatype fitted per layer and sequence
      on the prompt's own keys and values when the context is first quantized), keys quantized before RoPE
      (``pre_rope``; the kernel rotates them back), the ``outlier_ratio`` of elements furthest from their vector kept
      exactly, and the first ``sink_tokens`` positions kept whole.
    - ``"gear"``: the ``outlier_ratio`` of elements kept exactly, plus a rank-``rank`` approximation of the
      quantization residual of each block of groups (the context, then each flush).

    Options left at ``None`` take the method's defaults (kvquant: outlier_ratio 0.01, sink_tokens 1, pre_rope True,
    levels "prompt"; gear: outlier_ratio 0.02, rank 4); an option of another method is an error.

    Attributes:
        bits: code width of every layer, one of 2, 3, 4, 8. 3-bit codes (10 to an int32 word) are read by the
            generic decomposed kernel for every method, KIVI included; 2/4/8-bit KIVI groups have a fused kernel.
        group_size: elements sharing one scale and zero: ``group_size`` tokens of a key channel, ``group_size``
            channels of a value token. One of 32, 64, 128; must divide the model's head dimension.
        residual_length: tokens added after compression stay in full precision until this many have accumulated;
            then their complete groups are quantized. A positive multiple of ``group_size``.
        layer_bits: per-layer overrides ``{layer_idx: bits}`` (e.g. 8 bits for the first layers); other layers use
            ``bits``.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    bits: int = 4
    group_size: int = 64
    residual_length: int = 128
    layer_bits: dict[int, int] | None = None
    method: Literal["kivi", "kvquant", "gear"] = "kivi"
    outlier_ratio: float | None = None
    rank: int | None = None
    sink_tokens: int | None = None
    pre_rope: StrictBool | None = None
    levels: Literal["prompt", "uniform"] | None = None

    @field_validator("bits")
    @classmethod
    def _check_bits(cls, value: int) -> int:
        if value not in BITS:
            raise ValueError(f"bits must be one of {', '.join(map(str, BITS))}, got {value!r}")
        return value

    @field_validator("group_size")
    @classmethod
    def _check_group_size(cls, value: int) -> int:
        if value not in GROUP_SIZES:
            raise ValueError(f"group_size must be one of {', '.join(map(str, GROUP_SIZES))}, got {value!r}")
        return value

    @field_validator("layer_bits")
    @classmethod
    def _check_layer_bits(cls, value: dict[int, int] | None) -> dict[int, int] | None:
        for layer, bits in (value or {}).items():
            if layer < 0:
                raise ValueError(f"layer_bits keys must be layer indices >= 0, got {layer}")
            if bits not in BITS:
                raise ValueError(f"layer_bits[{layer}] must be one of {', '.join(map(str, BITS))}, got {bits!r}")
        return value

    @model_validator(mode="before")
    @classmethod
    def _method_defaults(cls, data):
        if not isinstance(data, dict):
            return data
        method = data.get("method", "kivi")
        if method not in METHODS:
            return data  # the Literal check reports it
        own = _METHOD_OPTIONS[method]
        for option in ("outlier_ratio", "rank", "sink_tokens", "pre_rope", "levels"):
            if data.get(option) is not None and option not in own:
                takers = [m for m, opts in _METHOD_OPTIONS.items() if option in opts]
                raise ValueError(f"{option} is an option of method {' / '.join(takers)}, not of method={method!r}")
        return {**data, **{k: v for k, v in own.items() if data.get(k) is None}}

    @field_validator("outlier_ratio")
    @classmethod
    def _check_outlier_ratio(cls, value: float | None) -> float | None:
        if value is not None and not 0.0 <= value < 0.5:
            raise ValueError(f"outlier_ratio must be in [0, 0.5) (a share of the elements), got {value!r}")
        return value

    @field_validator("rank")
    @classmethod
    def _check_rank(cls, value: int | None) -> int | None:
        if value is not None and value < 0:
            raise ValueError(f"rank must be >= 0, got {value!r}")
        return value

    @field_validator("sink_tokens")
    @classmethod
    def _check_sinks(cls, value: int | None) -> int | None:
        if value is not None and value < 0:
            raise ValueError(f"sink_tokens must be >= 0, got {value!r}")
        return value

    @property
    def decomposed(self) -> bool:
        """True when groups carry corrections (KVQuant, GEAR); False for plain KIVI groups."""
        return self.method != "kivi"

    @model_validator(mode="after")
    def _check_residual(self) -> QuantizationConfig:
        if self.residual_length < self.group_size or self.residual_length % self.group_size:
            raise ValueError(
                f"residual_length must be a positive multiple of group_size={self.group_size}, "
                f"got {self.residual_length}"
            )
        return self

    @classmethod
    def coerce(cls, value: QuantizationConfig | dict, name: str = "quantization") -> QuantizationConfig:
        """``value`` as a config: a ``QuantizationConfig`` as is, a dict validated field by field.

        Raises a plain ``ValueError`` naming ``name`` and every problem (unknown keys, bad bits or group size).
        """
        if isinstance(value, cls):
            return value
        if not isinstance(value, dict):
            raise ValueError(  # noqa: TRY004  (bad input is a ValueError throughout the library)
                f"{name} must be a QuantizationConfig or a dict of its fields (bits, group_size, residual_length, "
                f"layer_bits, method, outlier_ratio, rank, sink_tokens, pre_rope, levels), got {type(value).__name__}"
            )
        try:
            return cls(**value)
        except ValidationError as err:
            problems = "; ".join(
                (f"{'.'.join(map(str, e['loc']))}: " if e["loc"] else "") + e["msg"].removeprefix("Value error, ")
                for e in err.errors()
            )
            raise ValueError(f"{name} is not a valid QuantizationConfig: {problems}") from None

    def bits_for(self, layer_idx: int) -> int:
        """Code width of layer ``layer_idx``."""
        return (self.layer_bits or {}).get(layer_idx, self.bits)

    def check_head_dim(self, head_dim: int) -> None:
        """Raise if value groups (``group_size`` channels) do not tile ``head_dim``."""
        if head_dim % self.group_size:
            accepted = [g for g in GROUP_SIZES if head_dim % g == 0]
            fits = f"accepted: {accepted}" if accepted else (
                f"no group size ({', '.join(map(str, GROUP_SIZES))}) divides it: this model's cache cannot be quantized"
            )
            raise ValueError(f"group_size={self.group_size} must divide the head dimension {head_dim}; {fits}")

    def bytes_per_token(self, layer_idx: int, head_dim: int, scale_bytes: int = 2) -> float:
        """Bytes one quantized token costs per kv-head in ``layer_idx``: packed key and value codes plus their
        share of the per-group scale and zero (``scale_bytes`` each, the model dtype's size), and for KVQuant / GEAR
        the expected outliers (value plus position, keys and values), low-rank rows and key positions. Per-block
        low-rank factors, level tables and sink rows are a fixed cost per head, not counted per token."""
        bits, g = self.bits_for(layer_idx), self.group_size
        per_word = 32 // bits  # codes fill whole int32 words: a key row's channels, a value group's tokens
        key_codes = -(-head_dim // per_word) * 4
        value_codes = head_dim * (-(-g // per_word) * 4) / g
        scales = 2 * (head_dim / g) * 2 * scale_bytes  # keys: a scale and zero per channel per g tokens; values: per g
        extra = 0.0
        if self.decomposed:
            position_bytes = 2 if g * head_dim <= 32767 else 4
            extra += 2 * head_dim * self.outlier_ratio * (scale_bytes + position_bytes)
            extra += 2 * 4 / g  # int32 prefix sums of each group's outliers, keys and values
            if self.rank:
                extra += 2 * self.rank * scale_bytes + 2 * 4 / g  # a low-rank row per token; each group's block
            extra += 4 if self.pre_rope else 0
        return key_codes + value_codes + scales + extra

    def head_bytes(self, layer_idx: int, head_dim: int, scale_bytes: int = 2) -> float:
        """Bytes one (sequence, kv-head) costs in ``layer_idx`` whatever its length: KVQuant's two level tables and
        its sink tokens kept whole, GEAR's low-rank factors of the context block (0 for KIVI)."""
        if not self.decomposed:
            return 0.0
        position_bytes = 2 if self.group_size * head_dim <= 32767 else 4
        tables = 2 * (1 << self.bits_for(layer_idx)) * 4 if self.levels == "prompt" else 0
        sinks = (self.sink_tokens or 0) * 2 * head_dim * (scale_bytes + position_bytes)
        low_rank = 2 * (self.rank or 0) * head_dim * scale_bytes
        return float(tables + sinks + low_rank)

    def compression_of_bytes(self, layer_idx: int, head_dim: int, dtype_bytes: int = 2) -> float:
        """Quantized bytes per token over full-precision bytes per token (``2 * head_dim * dtype_bytes``)."""
        return self.bytes_per_token(layer_idx, head_dim, dtype_bytes) / (2 * head_dim * dtype_bytes)
