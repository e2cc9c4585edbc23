"""`QuantizationConfig`: bit width, group size and full-precision window of a quantized KV cache."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, ValidationError, field_validator, model_validator

BITS = (2, 4, 8)
GROUP_SIZES = (32, 64, 128)


class QuantizationConfig(BaseModel):
    """How a quantized cache stores keys and values (KIVI layout: keys per channel, values per token).

    Attributes:
        bits: code width of every layer, one of 2, 4, 8.
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
                f"layer_bits), got {type(value).__name__}"
            )
        try:
            return cls(**value)
        except ValidationError as err:
            problems = "; ".join(
                f"{'.'.join(map(str, e['loc'])) or 'value'}: {e['msg'].removeprefix('Value error, ')}"
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
            raise ValueError(
                f"group_size={self.group_size} must divide the head dimension {head_dim}; accepted: {accepted}"
            )

    def bytes_per_token(self, layer_idx: int, head_dim: int, scale_bytes: int = 2) -> float:
        """Bytes one quantized token costs per kv-head in ``layer_idx``: packed key and value codes plus their
        share of the per-group scale and zero (``scale_bytes`` each, the model dtype's size)."""
        bits, g = self.bits_for(layer_idx), self.group_size
        group_words_bytes = -(-g * bits // 32) * 4  # a group's codes fill whole int32 words
        per_channel_keys = (group_words_bytes + 2 * scale_bytes) / g  # one channel, averaged over g tokens
        per_token_values = (head_dim // g) * (group_words_bytes + 2 * scale_bytes)
        return head_dim * per_channel_keys + per_token_values

    def compression_of_bytes(self, layer_idx: int, head_dim: int, dtype_bytes: int = 2) -> float:
        """Quantized bytes per token over full-precision bytes per token (``2 * head_dim * dtype_bytes``)."""
        return self.bytes_per_token(layer_idx, head_dim, dtype_bytes) / (2 * head_dim * dtype_bytes)
