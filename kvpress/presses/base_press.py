"""`BasePress`: attaches compression hooks to a model's attention layers for the duration of a ``with`` block."""

from __future__ import annotations

import contextlib
from abc import ABC, abstractmethod
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Iterator

import torch
import transformers
from torch import nn

from kvpress.cache.attention import ATTENTION_NAME, register_attention
from kvpress.cache.compressed_kv import CompressedKV
from kvpress.cache.forward_keyword import CACHE_KEYWORDS, find_cache
from kvpress.cache.layer_access import holds_kvpress_layers, read_layer, read_ragged_layer, write_layer
from kvpress.presses.capabilities import Capabilities
from kvpress.presses.chunk_budget import CHUNK_BUDGET, ChunkBudget
from kvpress.presses.report import CompressionReport
from kvpress.utils import attention_layers, attn_implementation, is_sliding_layer, warn_past_positions


class BasePress(ABC):
    """Base class of every press.

    A press is a dataclass; ``with press(model):`` registers a forward hook on every attention layer and removes it on
    exit (also when an exception is raised). During a prefill forward (the layer's cache holds exactly the tokens of
    this forward), the hook reads the freshly written keys and values, calls :meth:`compress` and writes the result
    back into the cache, so the cache really shrinks. Decode and question forwards are left untouched. A prefill that
    :meth:`check_length` rejects raises before the first layer writes, leaving the cache empty and reusable.

    A prefill forward with a cache during which no layer was compressed raises ``RuntimeError`` as it returns
    (a press never silently does nothing, e.g. when a transformers release passes the cache differently).

    Subclasses implement :meth:`compress`; most implement :class:`~kvpress.presses.scorer_press.ScorerPress.score`
    instead. Press state lives in the per-call :class:`CompressionReport`, never on the model.
    """

    # ---- capabilities ------------------------------------------------------------------------------------------
    @property
    def capabilities(self) -> Capabilities:
        """What the press needs and does (read by the pipeline instead of testing press types)."""
        return Capabilities()

    # ---- validation ----------------------------------------------------------------------------------------------
    def validate(self, model: nn.Module) -> None:
        """Raise ``ValueError`` when the press cannot run on ``model`` (called before any tensor is touched)."""
        if all(is_sliding_layer(m) for m in attention_layers(model)):
            raise ValueError(
                f"{type(self).__name__} has nothing to compress in {type(model).__name__}: every attention layer "
                "slides over a bounded window (config.layer_types / sliding_window), and presses compress only "
                "full-attention layers"
            )
        caps = self.capabilities
        if caps.needs_attention_weights:
            impl = attn_implementation(model)
            if impl != "eager":
                raise ValueError(
                    f"{type(self).__name__} needs attention weights, which attn_implementation={impl!r} does not "
                    "produce. Load the model with attn_implementation='eager' (accepted: 'eager')."
                )

    def chunk_refusal(self) -> str | None:
        """Why this press cannot compress a prefill chunk by chunk, in words (``None`` when it can:
        ``capabilities.chunked_prefill``, or a press that leaves the prefill alone)."""
        caps = self.capabilities
        if caps.chunked_prefill or not caps.compresses_prefill:
            return None
        name = type(self).__name__
        if caps.needs_attention_weights:
            return f"{name} reads the attention weights of the whole prompt"
        if caps.prunes_channels:
            return f"{name} prunes key channels chosen from the whole prompt"
        if caps.merges_layers:
            return f"{name} merges layer pairs of the whole prompt"
        if caps.rerotates_positions:
            return f"{name} moves kept keys to new positions, which later chunks would not continue from"
        return f"{name} chooses its tokens from the whole prompt"

    def check_length(self, n_tokens: int) -> None:
        """Raise ``ValueError`` when a prefill of ``n_tokens`` tokens cannot be compressed by this press.

        Called before the first attention layer of a prefill forward runs, so a rejected prefill leaves the cache as
        it was (empty, and reusable).
        """

    # ---- compression -----------------------------------------------------------------------------------------
    @abstractmethod
    def compress(
        self,
        module: nn.Module,
        hidden_states: torch.Tensor,
        keys: torch.Tensor,
        values: torch.Tensor,
        attentions: torch.Tensor | None,
        kwargs: dict,
    ) -> tuple[torch.Tensor, torch.Tensor] | CompressedKV:
        """Compress one layer's cache.

        Args:
            module: the attention module (has ``layer_idx``, ``head_dim``, ``config``).
            hidden_states: ``(batch, n, hidden)`` input of the attention layer.
            keys, values: ``(batch, kv_heads, n, head_dim)`` post-RoPE keys and the values in the cache.
            attentions: ``(batch, heads, n, n)`` attention weights (eager attention only) or ``None``.
            kwargs: the attention forward's keyword arguments (``position_embeddings``, the cache, ...; read the
                cache with :func:`~kvpress.cache.forward_keyword.find_cache`).

        Returns:
            ``(keys, values)`` of shape ``(batch, kv_heads, n_kept, head_dim)``, or a :class:`CompressedKV` when the
            press also prunes key channels.
        """

    def forward_pre_hook(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        """Pre-hook of the first attention layer: :meth:`check_length` on a prefill, before any layer writes."""
        cache = find_cache(kwargs)
        if cache is not None and _cached_length(cache, module.layer_idx) == 0:
            n_tokens = layer_input(args, kwargs).shape[1]
            warn_past_positions(module.config, n_tokens)
            self.check_length(n_tokens)

    def forward_hook(self, module: nn.Module, args: tuple, kwargs: dict, output, report: CompressionReport):
        """Hook body: hand the layer to :meth:`compress_prefill` if this forward is its prefill."""
        cache = find_cache(kwargs)
        if cache is None:
            return output
        hidden_states = layer_input(args, kwargs)
        q_len = hidden_states.shape[1]
        if is_sliding_layer(module):
            # Sliding-window layers already hold a bounded window; pruning it would break their window semantics.
            return output
        if report.prefill_chunk is not None:
            self.compress_prefill_chunk(module, cache, hidden_states, kwargs, report)
            return output
        if not is_prefill(cache, module, hidden_states):
            return output  # the cache held tokens before this forward
        keys, values = read_layer(cache, module.layer_idx)
        if keys is None or keys.shape[-2] != q_len:
            return output
        attentions = output[1] if isinstance(output, tuple) and len(output) > 1 else None
        self.compress_prefill(module, cache, hidden_states, keys, values, attentions, kwargs, report)
        return output

    def compress_prefill(self, module, cache, hidden_states, keys, values, attentions, kwargs, report) -> None:
        """Replace the freshly prefilled ``keys``/``values`` of ``module``'s layer in ``cache`` by :meth:`compress`'s
        result and record it in ``report``. Presses that act on several layers at once (layer merging) override this
        instead of :meth:`compress`."""
        layer_idx, q_len = module.layer_idx, keys.shape[-2]
        kv = self.compress(module, hidden_states, keys, values, attentions, kwargs)
        kv = kv if isinstance(kv, CompressedKV) else CompressedKV(*kv)
        if report.record_kept and kv.indices is None and kv.values.shape[-2] != q_len:
            raise RuntimeError(
                f"{self!r} removed tokens from layer {layer_idx} without saying which (CompressedKV.indices), so "
                "record_kept=True cannot record them; presses that drop tokens return "
                "kvpress.presses.scorer_press.keep_tokens(keys, values, indices, scores)"
            )
        write_layer(cache, layer_idx, kv)
        report.record(layer_idx, n_tokens=q_len, lengths=kv.lengths, indices=kv.indices, scores=kv.scores)

    def finish_prefill(self, decoder: nn.Module, args: tuple, kwargs: dict, cache, report: CompressionReport) -> None:
        """Called after every prefill forward of the decoder stack (``decoder``, with the forward's ``args`` and
        ``kwargs``), once each layer's hook has run. Presses whose decision spans layers compress here
        (:class:`~kvpress.presses.cross_layer_press.CrossLayerPress`); the default does nothing."""

    def compress_prefill_chunk(self, module, cache, hidden_states, kwargs, report: CompressionReport) -> None:
        """Chunked prefill: bring ``module``'s layer (the kept tokens of the earlier chunks, then this chunk's) back to
        the budget of the prompt tokens seen so far, through :meth:`compress` told so by a :class:`ChunkBudget`."""
        layer_idx = module.layer_idx
        start, end, n = report.prefill_chunk
        ragged = read_ragged_layer(cache, layer_idx)
        keys, values, lengths = ragged if ragged is not None else (*read_layer(cache, layer_idx), None)
        budget = ChunkBudget(seen=end, lengths=lengths, last=end == n)
        kv = self.compress(module, hidden_states, keys, values, None, {**kwargs, CHUNK_BUDGET: budget})
        valid = budget.valid(keys)
        positions = None
        if report.record_kept:  # prompt position of every token the layer holds, in its order
            positions = _chunk_positions(report.state.get(("chunk_positions", layer_idx)), valid, start, end,
                                         keys.shape[2])  # fmt: skip
        if kv is None:  # every token stays
            kept = valid
            indices = None
        else:
            kv = kv if isinstance(kv, CompressedKV) else CompressedKV(*kv)
            if kv.indices is None and kv.values.shape[-2] != keys.shape[-2]:
                raise RuntimeError(f"{self!r} compressed a prefill chunk without saying which tokens it kept")
            write_layer(cache, layer_idx, kv)
            kept = kv.lengths
            indices = kv.indices
        if positions is not None:
            if indices is not None:
                positions = positions.gather(2, indices.to(positions.device))
            report.state[("chunk_positions", layer_idx)] = positions
        report.record(layer_idx, n_tokens=end, lengths=kept, indices=positions)

    # ---- context manager -----------------------------------------------------------------------------------------
    @contextlib.contextmanager
    def __call__(self, model: nn.Module, record_kept: bool = False) -> Iterator[CompressionReport]:
        """Attach the press to every attention layer of ``model``; yields the call's :class:`CompressionReport`.

        Args:
            record_kept: also record, per compressed layer, the positions of the kept tokens and the scores that chose
                them (``report.kept_indices``, ``report.scores``), e.g. for :mod:`kvpress.visualization`.
        """
        if not isinstance(record_kept, bool):
            raise ValueError(f"record_kept must be True or False, got {record_kept!r}")
        self.validate(model)
        layers = attention_layers(model)
        report = CompressionReport(n_layers=len(layers), record_kept=record_kept)
        handles = []
        with contextlib.ExitStack() as stack:
            stack.callback(lambda: [handle.remove() for handle in handles])  # also when an exception is raised
            switch = _AttentionSwitch(model)
            stack.callback(switch.restore)
            # The length check runs before layer 0 writes its keys: failing in a later layer's hook would leave the
            # cache half filled with uncompressed layers.
            handles.append(layers[0].register_forward_pre_hook(self.forward_pre_hook, with_kwargs=True))
            for module in layers:
                hook = _Hook(self, report)
                handles.append(module.register_forward_hook(hook, with_kwargs=True))
            decoder = getattr(model, "base_model", model)  # the CausalLM wrapper forwards the cache to it
            if self.capabilities.compresses_prefill:
                guard = _PrefillGuard(self, report, n_full_layers=sum(not is_sliding_layer(m) for m in layers))
                handles.append(decoder.register_forward_pre_hook(guard.before, with_kwargs=True))
                # Registered before guard.after, so that compressions done at the end of the forward count.
                handles.append(decoder.register_forward_hook(_Hook(self, report).finish, with_kwargs=True))
                handles.append(decoder.register_forward_hook(guard.after, with_kwargs=True))
            handles.append(decoder.register_forward_pre_hook(switch.before, with_kwargs=True))
            yield report


def _chunk_positions(previous, valid: torch.Tensor, start: int, end: int, width: int) -> torch.Tensor:
    """Prompt positions ``(batch, kv_heads, width)`` of a layer's tokens after chunk ``start..end`` was appended:
    each head's ``previous`` kept positions (``None`` for the first chunk), then ``start..end-1``; ``-1`` pads."""
    b, h = valid.shape
    out = torch.full((b, h, width), -1, dtype=torch.long, device=valid.device)
    before = valid - (end - start)  # tokens each head held before the chunk
    if previous is not None:
        m = min(previous.shape[2], width)
        out[..., :m] = previous[..., :m].to(out.device)
    slots = before[..., None] + torch.arange(end - start, device=valid.device)
    out.scatter_(2, slots, torch.arange(start, end, device=valid.device).expand(b, h, -1))
    return out


def layer_input(args: tuple, kwargs: dict) -> torch.Tensor:
    """The ``(batch, n, hidden)`` hidden states an attention layer's forward received (keyword or first argument)."""
    return kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]


def is_prefill(cache, module: nn.Module, hidden_states: torch.Tensor) -> bool:
    """Whether this forward filled ``module``'s layer of ``cache``: the layer holds exactly its tokens (seen from a
    forward hook, after the layer wrote them)."""
    return _cached_length(cache, module.layer_idx) == hidden_states.shape[1]


def _cached_length(cache, layer_idx: int) -> int:
    """Tokens the cache holds for ``layer_idx`` (0 for a layer not created yet); cheap, never densifies."""
    layers = getattr(cache, "layers", None)
    if layers is not None and layer_idx >= len(layers):
        return 0
    return cache.get_seq_length(layer_idx)


@dataclass
class _Hook:
    """A picklable bound hook carrying the press and the call's report (no state on the module)."""

    press: BasePress
    report: CompressionReport = field(repr=False)

    def __call__(self, module, args, kwargs, output):
        if self.report.suspended:
            return output
        return self.press.forward_hook(module, args, kwargs, output, self.report)

    def finish(self, decoder, args, kwargs, output):
        """Forward hook of the decoder stack: :meth:`BasePress.finish_prefill` after a prefill forward."""
        cache = find_cache(kwargs) or (find_cache(output) if isinstance(output, Mapping) else None)
        if self.report.suspended or cache is None or self.report.prefill_chunk is not None:
            return output
        self.press.finish_prefill(decoder, args, kwargs, cache, self.report)
        return output


@dataclass
class _AttentionSwitch:
    """Forwards over a cache holding kvpress layers (ragged, quantized, channel-pruned or merged layers; decode steps
    and questions) run the ``"kvpress"`` attention function, the only one that reads them, until the press's block
    ends. The prefill keeps the model's own attention (presses may need its weights). This is what lets
    ``model.generate`` decode under ``with press(model):`` from every cache a press can fill."""

    model: nn.Module
    previous: str | None = None

    def before(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        cache = find_cache(kwargs)
        if self.previous is not None or cache is None or cache.get_seq_length() == 0:
            return
        if not holds_kvpress_layers(cache):
            return
        current = self.model.config._attn_implementation
        if current != ATTENTION_NAME:
            self.previous = current
            self.model.set_attn_implementation(register_attention())

    def restore(self) -> None:
        if self.previous is not None:
            self.model.set_attn_implementation(self.previous)
            self.previous = None


@dataclass
class _PrefillGuard:
    """Turns a prefill that the press left uncompressed into a ``RuntimeError``, so a press never does nothing quietly.

    Hooks on the decoder stack (the module that receives the cache and runs every attention layer): a forward of
    ``n > 0`` tokens into an empty (or new) cache is a prefill, and the press must have compressed at least one layer
    during it. The cache is found by :func:`find_cache`, under any keyword.
    """

    press: BasePress
    report: CompressionReport = field(repr=False)
    n_full_layers: int
    # (prefill tokens, records before) per forward in progress: a press may run forwards of its own inside one.
    _open: list[tuple[int, int]] = field(default_factory=list)

    def before(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        cache = find_cache(kwargs)
        prefill = kwargs.get("use_cache") is not False and (cache is None or cache.get_seq_length() == 0)
        inputs = kwargs.get("input_ids")
        inputs = kwargs.get("inputs_embeds") if inputs is None else inputs
        inputs = args[0] if inputs is None and args else inputs
        n_tokens = inputs.shape[1] if prefill and isinstance(inputs, torch.Tensor) and inputs.dim() > 1 else 0
        self._open.append((n_tokens, self.report.n_records))

    def after(self, module: nn.Module, args: tuple, kwargs: dict, output) -> None:
        n_tokens, records = self._open.pop() if self._open else (0, 0)
        if n_tokens == 0 or self.report.n_records > records:
            return
        cache = find_cache(kwargs) or (find_cache(output) if isinstance(output, Mapping) else None)
        if cache is None:
            return  # the forward kept no cache: there is nothing to compress
        raise RuntimeError(
            f"{self.press!r} compressed no attention layer during a prefill of {n_tokens} tokens into a "
            f"{type(cache).__name__} (transformers {transformers.__version__}). Expected: the {self.n_full_layers} "
            f"full-attention layer(s) compressed; happened: none (the cache holds {cache.get_seq_length()} tokens). "
            "The attention layers did not hand the press a cache it can read: a transformers Cache (looked for the "
            f"keywords {', '.join(CACHE_KEYWORDS)}, then any Cache argument) holding this forward's tokens in "
            "DynamicCache or kvpress cache layers. If this transformers version is within the range kvpress "
            "declares, please report it."
        )
