"""`QFilterPress`: score keys by their projection on each head's dominant query direction (Q-Filters)."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from kvpress.presses.scorer_press import ScorerPress
from kvpress.utils import attention_layers, kv_geometry

FORMAT = "kvpress-qfilters"


def query_filters(queries: torch.Tensor, n_kv_heads: int) -> torch.Tensor:
    """Filters ``(kv_heads, head_dim)`` float32 from recorded queries ``(heads, N, head_dim)`` of one layer: each
    query head's first right singular vector, signed so that the queries project positively on it on average,
    averaged over the query heads of each kv head and normalised."""
    heads, _, d = queries.shape
    _, _, vh = torch.linalg.svd(queries.double(), full_matrices=False)
    top = vh[:, 0]  # (heads, d)
    sign = torch.sign((queries.double() @ top[..., None]).squeeze(-1).mean(-1))
    top = top * torch.where(sign == 0, 1.0, sign)[:, None]
    grouped = top.view(n_kv_heads, heads // n_kv_heads, d).mean(1)
    return torch.nn.functional.normalize(grouped, dim=-1).float()


def write_filters(path: str | Path, filters: dict[int, torch.Tensor], **metadata) -> None:
    """Write ``{layer: (kv_heads, head_dim)}`` filters and ``metadata`` as a Q-Filters JSON file."""
    layers = {str(i): f.tolist() for i, f in sorted(filters.items())}
    Path(path).write_text(json.dumps({"format": FORMAT, "version": 1, **metadata, "layers": layers}))


def read_filters(path: str | Path) -> dict[int, torch.Tensor]:
    """The filters of a file :func:`write_filters` wrote (``python -m kvpress.qfilters``); ``ValueError`` naming
    the path for a file that is not one."""
    try:
        data = json.loads(Path(path).read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise ValueError(f"filters: cannot read {path} as a Q-Filters JSON file ({err})") from err
    if not isinstance(data, dict) or data.get("format") != FORMAT:
        raise ValueError(f"filters: {path} is not a Q-Filters file (format {FORMAT!r}); write one with "
                         "python -m kvpress.qfilters --output PATH")  # fmt: skip
    return {int(i): torch.tensor(f, dtype=torch.float32) for i, f in data["layers"].items()}


@dataclass
class QFilterPress(ScorerPress):
    """Score = ``⟨k_i, f_h⟩``: the projection of each key on its kv head's filter, the dominant direction of the
    head's queries (Godey et al., 2025, "Q-Filters: Leveraging QK Geometry for Efficient KV Cache Compression",
    arXiv 2503.02812). Queries share a direction along which they project positively on average, so keys further
    along it draw more attention from any future query: query-agnostic and as cheap as a dot product.

    The filters are a property of the model, calibrated once: ``python -m kvpress.qfilters --output filters.json``
    records the queries of the user's model on generated text and takes each head's first singular vector
    (:func:`query_filters`). Nothing is downloaded.

    Args:
        filters: path of the filters file (or ``{layer: (kv_heads, head_dim) tensor}``).
    """

    filters: str | Path | dict = field(kw_only=True)
    _filters: dict = field(init=False, repr=False, compare=False, default=None)

    def __post_init__(self):
        super().__post_init__()
        if self.filters is None:
            raise ValueError("filters is required: the path of a file written by python -m kvpress.qfilters")
        self._filters = self.filters if isinstance(self.filters, dict) else read_filters(self.filters)

    def validate(self, model: nn.Module) -> None:
        super().validate(model)
        head_dim, kv_heads = kv_geometry(model.config.get_text_config(decoder=True))
        for module in attention_layers(model):
            f = self._filters.get(module.layer_idx)
            if f is None or tuple(f.shape) != (kv_heads, head_dim):
                got = None if f is None else tuple(f.shape)
                raise ValueError(
                    f"filters: layer {module.layer_idx} needs a ({kv_heads}, {head_dim}) filter, the file has {got}; "
                    "calibrate on this model: python -m kvpress.qfilters --model DIR --output PATH"
                )

    def score(self, module, hidden_states, keys, values, attentions, kwargs):
        f = self._filters[module.layer_idx].to(keys.device)
        return (keys.float() * f[None, :, None, :]).sum(-1)
