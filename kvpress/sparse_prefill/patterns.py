"""`HeadPattern` and `SparsePrefillConfig`: which MInference pattern each query head of each layer uses, as a file."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator


class HeadPattern(BaseModel):
    """One query head's sparse prefill pattern (MInference), in key blocks of the config's ``block_size`` tokens.

    Attributes:
        kind: ``"a_shape"`` (``sink_blocks`` first blocks plus ``local_blocks`` up to the query's own),
            ``"vertical_slash"`` (the ``n_vertical`` key columns and ``n_slash`` diagonals the last queries attend to
            most, estimated online), or ``"block_sparse"`` (the ``top_blocks`` best blocks by mean-pooled ``q . k``).
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    kind: Literal["a_shape", "vertical_slash", "block_sparse"]
    sink_blocks: int = Field(1, ge=0)
    local_blocks: int = Field(8, ge=1)
    n_vertical: int = Field(512, ge=1)
    n_slash: int = Field(64, ge=1)
    top_blocks: int = Field(16, ge=1)

    @classmethod
    def with_budget(cls, kind: str, blocks: int, block_size: int) -> "HeadPattern":
        """The ``kind`` pattern reading about ``blocks`` key blocks per query block (the search compares kinds at
        equal budgets): A-shape one sink and ``blocks - 1`` local blocks; vertical-slash ``blocks / 2`` blocks' worth
        of columns spread out (``blocks / 2`` columns) and ``blocks / 4`` diagonals (each crossing up to two blocks);
        block-sparse ``blocks`` blocks."""
        if kind == "a_shape":
            return cls(kind=kind, sink_blocks=1, local_blocks=max(1, blocks - 1))
        if kind == "vertical_slash":
            return cls(kind=kind, n_vertical=max(1, blocks // 2), n_slash=max(1, blocks // 4))
        return cls(kind=kind, top_blocks=max(1, blocks))


class SparsePrefillConfig(BaseModel):
    """Per-layer, per-query-head patterns of a model's sparse prefill, and the shared settings.

    Attributes:
        block_size: tokens per query and key block (16, 32, 64 or 128).
        last_q: queries whose attention estimates the vertical-slash columns and diagonals.
        min_tokens: prompts (or chunks) shorter than this run dense attention.
        layers: ``{layer_idx: [HeadPattern per query head]}``; layers left out run dense attention.
    """

    model_config = ConfigDict(extra="forbid")

    block_size: Literal[16, 32, 64, 128] = 64
    last_q: int = Field(64, ge=1)
    min_tokens: int = Field(1024, ge=1)
    layers: dict[int, list[HeadPattern]]

    @model_validator(mode="after")
    def _heads_consistent(self) -> "SparsePrefillConfig":
        counts = {len(heads) for heads in self.layers.values()}
        if len(counts) > 1 or 0 in counts:
            raise ValueError(f"every layer must list one pattern per query head, got counts {sorted(counts)}")
        return self

    @classmethod
    def uniform(cls, n_layers: int, n_heads: int, pattern: HeadPattern, **settings) -> "SparsePrefillConfig":
        """The same ``pattern`` for every head of ``n_layers`` layers."""
        return cls(layers={i: [pattern] * n_heads for i in range(n_layers)}, **settings)

    @classmethod
    def coerce(cls, value, name: str = "sparse") -> "SparsePrefillConfig":
        """``value`` as a config: a config, or the path of a pattern file (:meth:`load`); else ``ValueError``."""
        if isinstance(value, cls):
            return value
        if isinstance(value, (str, Path)):
            return cls.load(value)
        raise ValueError(
            f"{name} must be a SparsePrefillConfig or the path of a pattern file, got {type(value).__name__}"
        )

    def save(self, path: str | Path) -> None:
        Path(path).write_text(self.model_dump_json(indent=1) + "\n")

    @classmethod
    def load(cls, path: str | Path) -> "SparsePrefillConfig":
        """Read a pattern file written by :meth:`save` (or ``python -m kvpress.sparse_prefill``); a missing or invalid
        file raises ``ValueError`` naming it."""
        path = Path(path)
        try:
            return cls.model_validate(json.loads(path.read_text()))
        except FileNotFoundError:
            raise ValueError(f"sparse prefill pattern file {str(path)!r} does not exist") from None
        except (json.JSONDecodeError, ValidationError) as err:
            raise ValueError(f"sparse prefill pattern file {str(path)!r} is not a valid pattern file: {err}") from None
