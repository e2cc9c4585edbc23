"""Greedy decoding of one answer per sequence from a (compressed) cache: the eager loop and the CUDA-graph path."""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Collection, Iterator

import torch
from torch import nn

from kvpress.cache.attention import compressed_attention
from kvpress.cache.forward_keyword import cache_kwargs
from kvpress.cache.varlen_cache import VarlenCache
from kvpress.cache.varlen_layer import VarlenLayer
from kvpress.generation.graph_decoder import GraphDecoder, check_graph_cache
from kvpress.generation.step_recorder import StepRecorder
from kvpress.presses.base_press import BasePress
from kvpress.presses.decoding_press import DecodingPress, check_decode_layer
from kvpress.presses.report import CompressionReport
from kvpress.utils import attention_layers, is_sliding_layer, layer_types


def greedy_decode(
    model: nn.Module,
    cache,
    tails: list[torch.Tensor],
    positions: list[int],
    max_new_tokens: int,
    eos_ids: Collection[int],
    pad_id: int = 0,
    cuda_graph: bool | None = None,
    press: BasePress | None = None,
) -> list[list[int]]:
    """Greedy tokens of every sequence of ``cache`` after its prompt tail; each stops at any id of ``eos_ids``.

    Args:
        tails: one ``(1, L_b)`` prompt tail per sequence (the question, not yet in the cache), fed first.
        positions: the position of each tail's first token (where the sequence's context ends).
        cuda_graph: decode through a captured CUDA graph (:class:`GraphDecoder`; a compressed ``VarlenCache`` on
            CUDA) instead of one eager forward per token. Tokens equal the eager loop's. ``None`` (default): the
            graph wherever it applies (:func:`graph_decoding_blocker`), else the eager loop, announced once per cause
            on CUDA; ``False``: always the eager loop.
        press: a decode-time press attached while decoding (it acts on the tail and every generated token; its
            state starts fresh). With ``cuda_graph``, a :class:`DecodingPress` (alone or in a
            :class:`PrefillDecodingPress`): the graph replays the steps between two re-compressions, which run eagerly.

    Tails of different lengths are right-padded (with ``pad_id``) and the cache told each sequence's real count, so
    padding never enters it. The cache keeps the tails and answers afterwards. Returns the generated ids (EOS
    excluded), one list per sequence.
    """
    eos = set(eos_ids)
    generated: list[list[int]] = [[] for _ in tails]
    finished = [False] * len(tails)
    steps = decode_chunks(model, cache, tails, positions, max_new_tokens, sorted(eos), pad_id, cuda_graph, press)
    for chunk in steps:
        for b, row in enumerate(chunk.tolist()):
            for tok in row:
                if finished[b]:
                    break
                if tok in eos:
                    finished[b] = True
                else:
                    generated[b].append(tok)
        if all(finished):
            steps.close()
    return generated


def decode_chunks(
    model: nn.Module,
    cache,
    tails: list[torch.Tensor],
    positions: list[int],
    max_new_tokens: int,
    eos_ids: list[int],
    pad_id: int = 0,
    cuda_graph: bool | None = None,
    press: BasePress | None = None,
    chunk_size: int | None = None,
) -> Iterator[torch.Tensor]:
    """The greedy tokens of :func:`greedy_decode` as they come: ``(batch, k)`` long chunks, ``max_new_tokens`` in
    all. The eager loop yields one token per chunk; a CUDA graph yields each run of replays (at most ``chunk_size``
    tokens; by default all of them, or those between two re-compressions of ``press``), stopped early once every
    sequence has produced an id of ``eos_ids`` within it. Stop iterating to stop decoding (the cache then holds the
    tokens generated so far)."""
    if chunk_size is not None and (not isinstance(chunk_size, int) or chunk_size < 1):
        raise ValueError(f"chunk_size must be an int >= 1 or None, got {chunk_size!r}")
    cuda_graph = resolve_cuda_graph(cuda_graph, model, press, cache)
    decoding = graph_decoding_press(press) if cuda_graph else None
    if cuda_graph and not isinstance(cache, VarlenCache):
        raise ValueError(  # noqa: TRY004
            "cuda_graph=True decodes from a VarlenCache; pass cache=VarlenCache(config=model.config)"
        )
    if cuda_graph:
        check_graph_device(model)
    device = tails[0].device
    batch = len(tails)
    lengths = [t.shape[1] for t in tails]
    width = max(lengths)
    ids = torch.full((batch, width), pad_id, dtype=torch.long, device=device)
    for b, t in enumerate(tails):
        ids[b, : lengths[b]] = t[0]
    start = torch.tensor(positions, device=device)
    padded = min(lengths) != width

    with torch.no_grad(), compressed_attention(model), attached(press, model) as report:
        if padded:
            cache.new_token_lengths = torch.tensor(lengths, dtype=torch.int32, device=device)
        try:
            out = model(
                input_ids=ids,
                **cache_kwargs(model, cache),
                position_ids=start[:, None] + torch.arange(width, device=device),
                use_cache=True,
                logits_to_keep=0 if padded else 1,
            )
        finally:
            if padded:
                cache.new_token_lengths = None
        last = torch.tensor(lengths, device=device) - 1 if padded else torch.full((batch,), -1, device=device)
        token = out.logits[torch.arange(batch, device=device), last].argmax(-1)[:, None]
        position = (start + torch.tensor(lengths, device=device))[:, None]
        del out
        yield token
        remaining = max_new_tokens - 1
        if cuda_graph:
            yield from _graph_chunks(model, cache, token, position, remaining, eos_ids, decoding, report, chunk_size)
            return
        for _ in range(remaining):
            out = model(
                input_ids=token, **cache_kwargs(model, cache), position_ids=position, use_cache=True, logits_to_keep=1
            )
            position = position + 1
            token = out.logits[:, -1:].argmax(-1)
            yield token


def _graph_chunks(model, cache, token, position, remaining: int, eos_ids, decoding, report, chunk_size):
    """Replays of captured steps; with a :class:`DecodingPress`, one graph per stretch between re-compressions,
    whose inputs a :class:`StepRecorder` keeps for the press, which then re-compresses eagerly."""
    if decoding is None:
        if remaining > 0:
            yield from _replays(GraphDecoder(model, cache, remaining), token, position, remaining, eos_ids, chunk_size)
        return
    layers = [m for m in attention_layers(model) if not is_sliding_layer(m)]
    for module in layers:
        check_decode_layer(decoding, cache, module.layer_idx, (VarlenLayer,), "re-compresses, between graph "
                           "replays, layers that store whole tokens (a VarlenCache without quantization)")  # fmt: skip
    with StepRecorder(model, decoding.hidden_states_buffer) as recorder:
        while remaining > 0:
            n = min(decoding.steps_to_recompression(report), remaining)
            with suspended(report):  # the press's hooks would otherwise run during warm-up and capture
                decoder = GraphDecoder(model, cache, n)
            done = 0
            for chunk in _replays(decoder, token, position, n, eos_ids, chunk_size, report):
                done += chunk.shape[1]
                yield chunk
            del decoder  # frees the graph's memory pool before the next capture
            remaining -= done
            if done < n:
                return  # every sequence ended
            token, position = chunk[:, -1:], position + done
            kwargs = cache_kwargs(model, cache)
            for module in layers:
                hidden, cos, sin = recorder.last(module.layer_idx, done)
                decoding.observe(module, cache, hidden, (cos, sin), kwargs, report, n_steps=done)


def _replays(decoder: GraphDecoder, token, position, n: int, eos_ids, chunk_size, report=None):
    """``n`` steps of ``decoder`` from ``token`` at ``position``, in chunks of at most ``chunk_size``."""
    done = 0
    while done < n:
        k = min(chunk_size or n, n - done)
        with suspended(report):
            chunk = decoder.decode(*((token, position) if done == 0 else (None, None)), k, eos_ids)
        done += chunk.shape[1]
        yield chunk
        if chunk.shape[1] < k:
            return  # every sequence ended


def graph_decoding_press(press: BasePress | None) -> DecodingPress | None:
    """The :class:`DecodingPress` that CUDA-graph decoding drives between replays for ``press`` (``None`` without a
    decode-time press, or one whose work the replayed attention does: ``capabilities.decodes_in_attention``);
    ``ValueError`` for the decode-time presses a graph cannot run (their hooks act at every step)."""
    if press is None or not press.capabilities.compresses_decode:
        return None
    decoding = getattr(press, "decoding_press", press)
    if decoding.capabilities.decodes_in_attention:
        return None  # its per-step work is in the layers' attention, which the graph replays
    if type(decoding) is not DecodingPress or decoding.rerotate:
        raise ValueError(
            f"cuda_graph=True replays captured steps, which run no press hooks; between replays it re-compresses "
            f"with a DecodingPress (rerotate=False), alone or in a PrefillDecodingPress, while "
            f"{type(decoding).__name__}{' (rerotate=True)' if type(decoding) is DecodingPress else ''} acts at every "
            "step: pass cuda_graph=False"
        )
    return decoding


def graph_decoding_blocker(model: nn.Module, press: BasePress | None = None, cache=None) -> str | None:
    """Why greedy decoding of ``model`` under ``press`` from ``cache`` cannot replay a captured CUDA graph, in words;
    ``None`` when it can. ``cache=None`` stands for the cache :func:`~kvpress.generation.make_cache` builds with
    ``ragged=True`` (a :class:`VarlenCache`, compacted after the prefill)."""
    if press is not None:
        name = type(press).__name__
        if press.capabilities.merges_layers:
            return f"{name} merges layer pairs in a transformers DynamicCache, which grows by concatenation"
        if press.capabilities.prunes_channels:
            return f"{name} prunes key channels, which stay in dense layers that grow by concatenation"
        try:
            graph_decoding_press(press)
        except ValueError:
            name = type(getattr(press, "decoding_press", press)).__name__
            return f"{name} acts at every decode step, and a replayed graph runs no press hooks"
    if any(kind != "full_attention" for kind in layer_types(model.config.get_text_config(decoder=True))):
        return "the model has sliding-window layers, which stay in dense layers that grow by concatenation"
    if cache is not None and not isinstance(cache, VarlenCache):
        return f"a {type(cache).__name__} grows by concatenation (pass cache=None or a kvpress VarlenCache)"
    if cache is not None and getattr(cache, "offloading", False):
        return "the cache offloads layers between devices each forward"
    if cache is not None and cache.get_seq_length() > 0:  # an empty one is filled and compacted by the prefill
        for i, layer in enumerate(cache.layers):
            if isinstance(layer, VarlenLayer) and not layer.ragged:
                return f"layer {i} of the VarlenCache is dense (call cache.compact() after the prefill)"
        try:
            check_graph_cache(cache)
        except ValueError as err:
            return str(err)
    if not on_cuda(model):
        return f"the model is on {model.device}, not on a CUDA device"
    return None


def on_cuda(model: nn.Module) -> bool:
    """Whether ``model`` runs on a CUDA device (where graph decoding applies)."""
    return model.device.type == "cuda"


def check_graph_device(model: nn.Module) -> None:
    """``ValueError`` unless ``model`` is on a CUDA device (``cuda_graph=True`` captures CUDA graphs)."""
    if not on_cuda(model):
        raise ValueError(f"cuda_graph=True needs the model on a CUDA device, got {model.device}")


_ANNOUNCED: set[str] = set()


def resolve_cuda_graph(cuda_graph: bool | None, model: nn.Module, press: BasePress | None = None, cache=None) -> bool:
    """Whether to decode through a CUDA graph: ``cuda_graph`` when it is a bool; for ``None``, wherever
    :func:`graph_decoding_blocker` finds nothing in the way. A CUDA model that falls back to the eager loop says why,
    once per cause (a ``UserWarning``): that loop is host-bound, several times slower per token."""
    if cuda_graph is not None:
        if not isinstance(cuda_graph, bool):
            raise ValueError(f"cuda_graph must be True, False or None (automatic), got {cuda_graph!r}")  # noqa: TRY004
        return cuda_graph
    reason = graph_decoding_blocker(model, press, cache)
    if reason is not None and on_cuda(model) and reason not in _ANNOUNCED:
        _ANNOUNCED.add(reason)
        warnings.warn(
            f"decoding with the eager loop (one forward per token, host-bound on CUDA) instead of a captured CUDA "
            f"graph: {reason}. Pass cuda_graph=False to choose the eager loop and silence this warning",
            UserWarning,
            stacklevel=3,
        )
    return reason is None


@contextlib.contextmanager
def suspended(report: CompressionReport | None) -> Iterator[None]:
    """Keep the press's hooks idle while steps run that the press is told about afterwards (graph warm-up, capture
    and replays: a replay runs no hooks, and the others must not count twice)."""
    if report is None:
        yield
        return
    report.suspended = True
    try:
        yield
    finally:
        report.suspended = False


@contextlib.contextmanager
def attached(press: BasePress | None, model: nn.Module) -> Iterator[CompressionReport | None]:
    """``with press(model) as report`` when there is a press; yields ``None`` otherwise."""
    if press is None:
        yield None
        return
    with press(model) as report:
        yield report
