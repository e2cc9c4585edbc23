"""`ExpectedAttentionPress`: the attention future queries are expected to pay each key, from a Gaussian query model."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from kvpress.presses.budget import check_n_sink, check_sink_budget
from kvpress.presses.scorer_press import ScorerPress
from kvpress.utils import apply_rope, attention_layers, group_reduce, is_sliding_layer, pre_rope_query_states

STATS_FORMAT = "kvpress-query-stats"


def query_moments(queries: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean ``(heads, head_dim)`` and maximum-likelihood covariance ``(heads, head_dim, head_dim)``, float32, of
    recorded pre-RoPE queries ``(heads, N, head_dim)`` (computed in float64)."""
    q = queries.double()
    mean = q.mean(dim=1)
    centered = q - mean[:, None]
    return mean.float(), (centered.transpose(-1, -2) @ centered / q.shape[1]).float()


def write_query_stats(path: str | Path, stats: dict[int, tuple[torch.Tensor, torch.Tensor]], **metadata) -> None:
    """Write ``{layer: (mean, cov)}`` query statistics and ``metadata`` (strings, numbers) with ``torch.save``."""
    layers = {int(i): {"mean": m.float().cpu(), "cov": c.float().cpu()} for i, (m, c) in sorted(stats.items())}
    torch.save({"format": STATS_FORMAT, "version": 1, **metadata, "layers": layers}, Path(path))


def read_query_stats(path: str | Path) -> dict[int, tuple[torch.Tensor, torch.Tensor]]:
    """The statistics of a file :func:`write_query_stats` wrote (``python -m kvpress.query_stats``), loaded without
    executing code (``weights_only``); ``ValueError`` naming the path for a file that is not one."""
    try:
        data = torch.load(Path(path), map_location="cpu", weights_only=True)
    except Exception as err:  # missing, unreadable or not a tensor file: one error naming the path
        raise ValueError(f"stats: cannot read {path} as a query-statistics file ({err})") from err
    if not isinstance(data, dict) or data.get("format") != STATS_FORMAT:
        raise ValueError(f"stats: {path} is not a query-statistics file (format {STATS_FORMAT!r}); write one with "
                         "python -m kvpress.query_stats --output PATH")  # fmt: skip
    return {int(i): (v["mean"], v["cov"]) for i, v in data["layers"].items()}


@dataclass
class ExpectedAttentionPress(ScorerPress):
    """Score = expected attention of the next ``n_future_positions`` queries to each key, weighted by ``‖v‖₂``.

    The pre-RoPE queries of the context (without the sinks) are modelled per query head as a Gaussian with mean μ and
    covariance Σ. Future queries sit at positions ``n, ..., n+T-1``; averaging their RoPE rotations gives
    ``R̄ = mean_t R(n+t)``, hence the rotated moments ``μ̄ = R̄μ`` and ``Σ̄ = R̄ΣR̄ᵀ``. For ``q ~ N(μ̄, Σ̄)`` and the
    attention scaling ``s``, ``E[exp(s·qᵀk)] = exp(s·kᵀμ̄ + ½·s²·kᵀΣ̄k)``; a softmax of that exponent over the tokens
    gives each head's expected attention, which is averaged over the GQA group ("Expected Attention", NVIDIA, 2025,
    arXiv 2510.00636). The first ``n_sink`` tokens are always kept.

    With ``stats`` (a file written by ``python -m kvpress.query_stats``, calibrated once on the model's queries over
    generated text), μ and Σ come from the file instead of the prompt's own queries, as the paper's variant with
    precomputed statistics does; nothing is downloaded.

    Args:
        n_future_positions: number ``T`` of future positions whose rotations are averaged.
        n_sink: leading tokens always kept and left out of the query statistics (their queries are outliers).
            A compressed layer must keep at least ``n_sink`` tokens, else ``ValueError`` (see :meth:`check_length`).
        use_covariance: include the second-order term ``½·s²·kᵀΣ̄k`` (``False``: mean query only).
        use_vnorm: multiply the expected attention by the value norm ``‖v‖₂`` (an attended token with a small value
            barely moves the output).
        epsilon: added to the expected attention before the value-norm weighting, so that tokens whose expected
            attention vanishes are still ranked by ``‖v‖₂`` (with ``use_vnorm=False`` it cannot change the ranking).
        stats: path of a query-statistics file (or ``{layer: (mean (heads, head_dim), cov (heads, head_dim,
            head_dim))}``); ``None``: the prompt's own queries.
    """

    n_future_positions: int = 512
    n_sink: int = 4
    use_covariance: bool = True
    use_vnorm: bool = True
    epsilon: float = 0.0
    stats: str | Path | dict | None = None
    _stats: dict | None = field(init=False, repr=False, compare=False, default=None)

    def __post_init__(self):
        super().__post_init__()
        if self.stats is not None:
            self._stats = self.stats if isinstance(self.stats, dict) else read_query_stats(self.stats)
        t = self.n_future_positions
        if isinstance(t, bool) or not isinstance(t, int) or t < 1:
            raise ValueError(f"n_future_positions must be a positive int, got {t!r}")
        check_n_sink(self.n_sink)
        for name in ("use_covariance", "use_vnorm"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"{name} must be True or False, got {getattr(self, name)!r}")
        e = self.epsilon
        if isinstance(e, bool) or not isinstance(e, (int, float)) or not math.isfinite(e) or e < 0:
            raise ValueError(f"epsilon must be a finite number >= 0, got {e!r}")

    def check_length(self, n_tokens: int) -> None:
        check_sink_budget(self.n_sink, n_tokens, self.n_kept(n_tokens))

    def validate(self, model: nn.Module) -> None:
        super().validate(model)
        if self._stats is None:
            return
        for module in attention_layers(model):
            if is_sliding_layer(module):
                continue
            want = (model.config.get_text_config(decoder=True).num_attention_heads, module.head_dim)
            got = self._stats.get(module.layer_idx)
            if got is None or tuple(got[0].shape) != want or tuple(got[1].shape) != (*want, want[1]):
                raise ValueError(
                    f"stats: layer {module.layer_idx} needs a {want} mean and a {(*want, want[1])} covariance, the "
                    f"file has {None if got is None else (tuple(got[0].shape), tuple(got[1].shape))}; calibrate on "
                    "this model: python -m kvpress.query_stats --model DIR --output PATH"
                )

    def query_statistics(self, module, hidden_states) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Mean ``(batch, heads, head_dim)`` and covariance ``(batch, heads, head_dim, head_dim)`` (``None`` without
        ``use_covariance``) of the pre-RoPE context queries after the sinks, in float32.

        The covariance is the maximum-likelihood one (divided by the number of tokens), defined even for one token.
        With ``stats``, the file's, the same for every sequence.
        """
        if self._stats is not None:
            mean, cov = (t.to(hidden_states.device) for t in self._stats[module.layer_idx])
            b = hidden_states.shape[0]
            return mean.expand(b, -1, -1), (cov.expand(b, -1, -1, -1) if self.use_covariance else None)
        start = min(self.n_sink, hidden_states.shape[1] - 1)
        q = pre_rope_query_states(module, hidden_states[:, start:]).float()
        mean = q.mean(dim=2)
        if not self.use_covariance:
            return mean, None
        centered = q - mean.unsqueeze(2)
        return mean, centered.transpose(-1, -2) @ centered / q.shape[2]

    def score(self, module, hidden_states, keys, values, attentions, kwargs):
        b, n_kv, n, d = keys.shape
        s = module.scaling
        mean, cov = self.query_statistics(module, hidden_states)
        groups = mean.shape[1] // n_kv
        cos, sin = average_future_rope(kwargs["position_embeddings"], self.n_future_positions)
        cos, sin = cos.float(), sin.float()
        # apply_rope is linear in (cos, sin), so with the averaged cos/sin it applies R̄ to each row vector.
        mean = apply_rope(mean.unsqueeze(2), cos, sin).view(b, n_kv, groups, d)  # R̄μ, grouped by kv head
        k = keys.float()
        exponent = s * (k @ mean.transpose(-1, -2)).transpose(-1, -2)  # (B, kv_heads, groups, n)
        if cov is not None:
            # Rows first (ΣR̄ᵀ), then columns: R̄ΣR̄ᵀ.
            cov = apply_rope(apply_rope(cov, cos, sin).transpose(-1, -2), cos, sin).transpose(-1, -2)
            cov = cov.view(b, n_kv, groups, d, d)
            # One query head of each group at a time, so a single float32 copy of the keys is alive.
            quadratic = torch.stack([((k @ cov[:, :, j]) * k).sum(dim=-1) for j in range(groups)], dim=2)
            exponent = exponent + 0.5 * s**2 * quadratic
        scores = group_reduce(exponent.softmax(dim=-1).view(b, n_kv * groups, n), n_kv)
        if self.use_vnorm:
            scores = (scores + self.epsilon) * values.float().norm(dim=-1)
        else:
            scores = scores + self.epsilon
        scores[..., : self.n_sink] = float("inf")
        return scores


def average_future_rope(position_embeddings, n_future: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean ``(cos, sin)`` over the ``n_future`` positions that follow the last one of ``position_embeddings``.

    Args:
        position_embeddings: the layer's ``(cos, sin)``, each ``(batch, n, rot_dim)``, for consecutive positions.
    Returns:
        ``(cos, sin)``, each ``(batch, 1, rot_dim)`` float64; :func:`~kvpress.utils.apply_rope` with them applies the
        average rotation ``R̄ = mean_t R(p_last + t)``, ``t = 1..n_future``.
    """
    # The attention module holds no reference to the decoder's rotary module, and architectures call theirs
    # differently (per-layer-type frequencies, long/short factors). The (cos, sin) handed to this layer are exactly its
    # rotations, partial rotary (rot_dim < head_dim) and attention scaling included, and RoPE angles grow linearly with
    # the position, so the future rotations are extrapolated from them instead.
    cos, sin = (x.double() for x in position_embeddings)
    phase = torch.atan2(sin, cos)  # p·θ per channel, modulo 2π
    amplitude = torch.hypot(cos[:, -1:], sin[:, -1:])  # the rotary module's attention scaling
    # Per-position advance θ of each channel (|θ| < π for every RoPE variant): the wrapped consecutive differences
    # telescope, so their mean is the whole prompt's advance over its length, robust to low-precision cos/sin.
    step = torch.remainder(phase.diff(dim=1) + math.pi, 2 * math.pi) - math.pi
    theta = step.mean(dim=1, keepdim=True) if step.shape[1] else torch.zeros_like(amplitude)
    t = torch.arange(1, n_future + 1, dtype=torch.float64, device=cos.device)[:, None]
    angles = phase[:, -1:] + t * theta  # (batch, n_future, rot_dim)
    return (amplitude * angles.cos()).mean(dim=1, keepdim=True), (amplitude * angles.sin()).mean(dim=1, keepdim=True)
