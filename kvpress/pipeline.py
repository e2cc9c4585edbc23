"""The ``"kv-press-text-generation"`` pipeline: compress a context once, answer one or many questions from it."""

from __future__ import annotations

import functools
import logging

import torch
from transformers import AutoModelForCausalLM, Cache, DynamicCache, Pipeline
from transformers.pipelines import PIPELINE_REGISTRY

from kvpress.cache.quantization_config import QuantizationConfig
from kvpress.cache.quantized_cache import QuantizedCache, model_head_dim
from kvpress.cache.varlen_cache import VarlenCache
from kvpress.generation import CompressedContext, graph_decoding_press, make_cache, resolve_cuda_graph
from kvpress.generation.decode import check_graph_device
from kvpress.generation.prefill import check_chunk_size, check_sparse
from kvpress.presses.base_press import BasePress
from kvpress.presses.capabilities import Capabilities
from kvpress.utils import layer_types

logger = logging.getLogger(__name__)

TASK = "kv-press-text-generation"
# Marks where the question goes inside the rendered chat template; never produced by a tokenizer.
_QUESTION_SLOT = "\u2063KVPRESS-QUESTION-SLOT\u2063"


class KVPressTextGenerationPipeline(Pipeline):
    """Answer questions about a long context whose KV cache is compressed by a press.

    ``pipe(context, question=... | questions=[...], answer_prefix="", press=None, max_new_tokens=50,
    max_context_length=None, cache=None, query_aware=False, use_chat_template=None, cuda_graph=None,
    kv_quantization=None, prefill_chunk_size=None, sparse_prefill=None)``

    - The context (with the chat template's prefix) is prefilled once, under the press; each question (with the
      template's suffix and ``answer_prefix``) is then answered by greedy decoding from the compressed cache, and the
      cache is restored to the compressed context between questions, so answers equal those of separate calls.
    - The question follows the context on a new line: ``"\n"`` joins them unless the context already ends, or the
      question already starts, with whitespace (prompt formats that carry their own separators stay as they are).
      The model therefore reads exactly ``context + "\n" + question`` inside the chat template's user turn (or after
      BOS without a template), as ``model.generate`` on that text would.
    - ``query_aware=True`` compresses the context together with each question (one compression per question), as
      observation-window methods such as SnapKV were designed to be used.
    - ``cache``: an empty transformers ``Cache`` to fill (default: a fresh ``DynamicCache``); after the call it holds
      the compressed context (with ``query_aware=True``: the compressed context and last question), so its memory
      can be inspected. A call rejected with ``ValueError`` leaves it empty.

    - A press that keeps a different number of tokens per head (``capabilities.head_variable``, e.g. AdaKVPress)
      gets a :class:`~kvpress.cache.VarlenCache` automatically, which stores exactly what each head keeps.
    - ``pipe([context_1, context_2, ...], ...)`` answers a batch: each context is prefilled and compressed alone,
      the compressed caches are stacked in one ``VarlenCache`` (no padding token enters it) and the questions are
      decoded for all contexts together; ``questions`` may then be one list per context (same count for each).
    - ``pipe(None, question=..., cache=VarlenCache.load(path))`` answers from a saved compressed context, skipping
      the prefill.
    - ``cuda_graph``: on CUDA, answers are decoded by default (``None``) through a captured CUDA graph from a
      ``VarlenCache`` the pipeline builds, removing the Python overhead of the token-by-token loop; where a graph
      cannot apply (presses acting at every step, channel-pruned or merged layers, sliding-window layers, a
      ``cache=`` that is not a ``VarlenCache``) the eager loop runs, with a warning naming the cause. ``True``
      insists on the graph (an error says what stands in the way); ``False`` always takes the eager loop.
    - ``prefill_chunk_size``: prefill the context at most that many tokens per forward, the press bringing the cache
      back to its budget after each chunk, so peak memory follows the chunk, not the context
      (:func:`kvpress.generation.prefill`; presses with ``capabilities.chunked_prefill``). ``None``: one forward.
    - ``sparse_prefill``: a :class:`~kvpress.sparse_prefill.SparsePrefillConfig` or the path of a pattern file
      (``python -m kvpress.sparse_prefill``): the context's prefill runs MInference's sparse attention, each head
      reading the key blocks of its pattern; the press compresses afterwards as it would.
    - ``kv_quantization``: a :class:`~kvpress.cache.QuantizationConfig` (or a dict of its fields) stores the cache
      quantized: the pipeline builds a :class:`~kvpress.cache.QuantizedCache` (single contexts, batches,
      query-aware) and quantizes every layer after the prefill, compressed by the press or not. A press with a
      ``quantization`` attribute (a memory-budget press) supplies it when ``kv_quantization`` is None. Not combined
      with ``cache=`` (pass a ``QuantizedCache`` there instead) nor with channel-pruning presses.

    Returns ``{"answer": str}`` for ``question=`` (or no question) and ``{"answers": [str, ...]}`` for ``questions=``;
    a batch returns one such dict per context. ``return_report=True`` adds ``"report"`` (with ``question=``) or
    ``"reports"`` (one per question with ``questions=``; the same object when the questions share one compression):
    a :class:`~kvpress.compression_summary.CompressionSummary` of the prefill (tokens, achieved compression ratio, KV
    bytes before and after, the prompt's token ids). ``record_kept=True`` (with ``return_report=True``) also records
    which tokens each layer and head kept, and their scores, in the summary's ``layers`` report, for
    :mod:`kvpress.visualization`.
    """

    def __call__(self, inputs=None, *args, **kwargs):
        if isinstance(inputs, (list, tuple)) and inputs and all(isinstance(c, str) for c in inputs):
            return self._call_batch(list(inputs), **kwargs)
        return super().__call__(inputs, *args, **kwargs)

    def _sanitize_parameters(
        self,
        question: str | None = None,
        questions: list[str] | None = None,
        answer_prefix: str | None = None,
        press: BasePress | None = None,
        max_new_tokens: int = 50,
        max_context_length: int | None = None,
        cache=None,
        query_aware: bool = False,
        use_chat_template: bool | None = None,
        cuda_graph: bool | None = None,
        kv_quantization: QuantizationConfig | dict | None = None,
        prefill_chunk_size: int | None = None,
        sparse_prefill=None,
        return_report: bool = False,
        record_kept: bool = False,
        **kwargs,
    ):
        if kwargs:
            raise ValueError(
                f"unknown pipeline argument(s) {sorted(kwargs)}; accepted: question, questions, answer_prefix, press, "
                "max_new_tokens, max_context_length, cache, query_aware, use_chat_template, cuda_graph, "
                "kv_quantization, prefill_chunk_size, sparse_prefill, return_report, record_kept"
            )
        if cuda_graph is not None and not isinstance(cuda_graph, bool):
            raise ValueError(f"cuda_graph must be True, False or None (automatic), got {cuda_graph!r}")  # noqa: TRY004
        if not isinstance(return_report, bool):
            raise ValueError(f"return_report must be True or False, got {return_report!r}")  # noqa: TRY004
        if not isinstance(record_kept, bool):
            raise ValueError(f"record_kept must be True or False, got {record_kept!r}")  # noqa: TRY004
        if record_kept and not (return_report and press is not None):
            raise ValueError(
                "record_kept=True records which tokens the press kept into the report: pass return_report=True and a "
                "press"
            )
        if question is not None and questions is not None:
            raise ValueError("give either question= or questions=, not both")
        single = questions is None
        if questions is None:
            questions = [question if question is not None else ""]
        if isinstance(questions, str) or not all(isinstance(q, str) for q in questions) or not questions:
            raise ValueError("questions must be a non-empty list of strings")
        if press is not None and not isinstance(press, BasePress):
            raise ValueError(f"press must be a kvpress press (a BasePress) or None, got {type(press).__name__}")
        if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be a positive int, got {max_new_tokens!r}")
        if max_context_length is not None and (
            isinstance(max_context_length, bool) or not isinstance(max_context_length, int) or max_context_length < 1
        ):
            raise ValueError(f"max_context_length must be a positive int or None, got {max_context_length!r}")
        if answer_prefix is not None and not isinstance(answer_prefix, str):
            raise ValueError(f"answer_prefix must be a string or None, got {type(answer_prefix).__name__}")
        if not isinstance(query_aware, bool):
            raise ValueError(f"query_aware must be True or False, got {query_aware!r}")  # noqa: TRY004
        if use_chat_template is not None and not isinstance(use_chat_template, bool):
            raise ValueError(f"use_chat_template must be True, False or None (automatic), got {use_chat_template!r}")
        if cache is not None and not isinstance(cache, Cache):
            raise ValueError(
                f"cache must be a transformers Cache (e.g. DynamicCache) or None, got {type(cache).__name__}"
            )
        caps = press.capabilities if press is not None else Capabilities()
        cuda_graph = resolve_cuda_graph(cuda_graph, self.model, press, cache)
        if cuda_graph:
            graph_decoding_press(press)  # decode-time presses other than DecodingPress act at every step: refused
        if caps.needs_question and not query_aware:
            raise ValueError(
                f"{type(press).__name__} needs the question in the compressed prompt: pass query_aware=True"
            )
        if use_chat_template and not getattr(self.tokenizer, "chat_template", None):
            raise ValueError(
                "use_chat_template=True but the tokenizer has no chat template; pass use_chat_template=False "
                "(plain-text prompt) or a tokenizer that has one"
            )
        preprocess = {
            "questions": questions,
            "answer_prefix": answer_prefix or "",
            "max_context_length": max_context_length,
            "query_aware": query_aware,
            "use_chat_template": use_chat_template,
            "return_report": return_report,
        }
        if caps.head_variable and cache is not None and not isinstance(cache, VarlenCache):
            raise ValueError(
                f"{type(press).__name__} keeps a different number of tokens per head, which "
                f"{type(cache).__name__} cannot store; pass cache=None or a kvpress VarlenCache"
            )
        if caps.merges_layers and cache is not None and type(cache) is not DynamicCache:
            raise ValueError(
                f"{type(press).__name__} merges layer pairs into a transformers DynamicCache; got "
                f"{type(cache).__name__}; pass cache=None or a DynamicCache"
            )
        if caps.merges_layers and cuda_graph:
            raise ValueError(f"cuda_graph=True decodes from a VarlenCache, which {type(press).__name__} does not use")
        if cuda_graph:
            check_graph_device(self.model)
        check_chunk_size(prefill_chunk_size, press, "prefill_chunk_size")
        sparse_prefill = check_sparse(sparse_prefill, press, "sparse_prefill")
        quantization = self._quantization(press, cache, kv_quantization)
        if caps.compresses_decode:
            self._check_decode_time(press, caps, cache, quantization)
        forward = {
            "press": press,
            "max_new_tokens": max_new_tokens,
            "cache": cache,
            "cuda_graph": cuda_graph,
            "quantization": quantization,
            "record_kept": record_kept,
            "chunk_size": prefill_chunk_size,
            "sparse": sparse_prefill,
        }
        return preprocess, forward, {"single": single, "return_report": return_report}

    @staticmethod
    def _check_decode_time(press, caps: Capabilities, cache, quantization) -> None:
        """Decode-time presses rewrite caches that store whole tokens: a DynamicCache, or a VarlenCache for the
        presses that re-compress head-variable layers (``decodes_head_variable``) or lay out their own layers
        (``decodes_in_attention``); refuse the rest by cause."""
        name = type(press).__name__
        varlen = caps.decodes_head_variable or caps.decodes_in_attention
        accepted = (DynamicCache, VarlenCache) if varlen else (DynamicCache,)
        if cache is not None and type(cache) not in accepted:
            names = " or ".join(kind.__name__ for kind in accepted)
            raise ValueError(
                f"{name} compresses while decoding, in a {names} only so far; got cache={type(cache).__name__}: "
                f"pass cache=None or a {names}"
            )
        if quantization is not None:
            raise ValueError(
                f"{name} compresses while decoding, in a cache of whole (not quantized) tokens only so far: pass "
                "kv_quantization=None"
            )
        if caps.head_variable and not caps.decodes_head_variable:
            decoding = type(getattr(press, "decoding_press", press)).__name__
            raise ValueError(
                f"{name} keeps a different number of tokens per head (head-variable), and {decoding}, which "
                "compresses while decoding, needs one length for every head: decode with a press that accepts "
                "head-variable layers (DecodingPress with rerotate=False, H2OPress, ScissorhandsPress, CAMPress), or "
                "prefill with a press that keeps the same count per head"
            )

    def _quantization(self, press, cache, kv_quantization) -> QuantizationConfig | None:
        """The config the pipeline's cache is quantized with, or None; every conflict raises before the model runs."""
        if kv_quantization is not None:
            kv_quantization = QuantizationConfig.coerce(kv_quantization, "kv_quantization")
            if cache is not None:
                raise ValueError(
                    "give either cache= or kv_quantization=, not both: kv_quantization makes the pipeline build a "
                    "QuantizedCache; to fill your own, pass cache=QuantizedCache(config=model.config, quantization=...)"
                )
        from_press = getattr(press, "quantization", None)
        if isinstance(from_press, QuantizationConfig):
            if kv_quantization is not None and kv_quantization != from_press:
                raise ValueError(
                    f"kv_quantization={kv_quantization!r} differs from the quantization {type(press).__name__} plans "
                    f"its budget with ({from_press!r}); pass kv_quantization=None (or the same config)"
                )
            if cache is not None and not (isinstance(cache, QuantizedCache) and cache.quantization == from_press):
                raise ValueError(
                    f"{type(press).__name__} plans its budget for a cache quantized with {from_press!r}; pass "
                    "cache=None or a QuantizedCache with that quantization"
                )
            kv_quantization = from_press
        if kv_quantization is None:
            return None
        if press is not None and press.capabilities.prunes_channels:
            raise ValueError(
                f"{type(press).__name__} prunes key channels, which a quantized cache cannot store; "
                "pass kv_quantization=None or a press that keeps every key channel"
            )
        if press is not None and press.capabilities.merges_layers:
            raise ValueError(
                f"{type(press).__name__} merges layer pairs, which a quantized cache cannot store; "
                "pass kv_quantization=None"
            )
        if press is not None and press.capabilities.rerotates_positions and kv_quantization.pre_rope:
            raise ValueError(
                f"{type(press).__name__} moves kept keys to new positions, and method={kv_quantization.method!r} "
                "with pre_rope=True stores keys by their prefill positions; pass pre_rope=False in kv_quantization"
            )
        try:
            kv_quantization.check_head_dim(model_head_dim(self.model.config))
        except ValueError as err:
            raise ValueError(f"kv_quantization: {err}") from None
        return kv_quantization

    # ---- prompt ---------------------------------------------------------------------------------------------------
    def _split_template(self, context: str, use_chat_template: bool | None) -> tuple[str, str]:
        """``(text before the question, text after it)`` for this tokenizer's prompt format."""
        tok = self.tokenizer
        if use_chat_template is not False and getattr(tok, "chat_template", None):
            rendered = tok.apply_chat_template(
                [{"role": "user", "content": context + _QUESTION_SLOT}], add_generation_prompt=True, tokenize=False
            )
            before, after = rendered.split(_QUESTION_SLOT)
            return before, after
        bos = tok.bos_token or ""
        return bos + context, "\n"

    def _encode(self, text: str) -> torch.Tensor:
        return self.tokenizer(text, add_special_tokens=False, return_tensors="pt").input_ids

    def preprocess(
        self, context, questions, answer_prefix, max_context_length, query_aware, use_chat_template, return_report
    ):
        if context is None:  # answer from a cache that already holds a compressed context
            if query_aware:
                raise ValueError("query_aware=True needs the context text (context=None resumes from a saved cache)")
            if return_report:
                raise ValueError(
                    "return_report=True reports the prefill of a context; context=None prefills nothing (the saved "
                    "cache's memory is kvpress.layer_memory_bytes(cache))"
                )
            _, after = self._split_template("", use_chat_template)
            questions = [join_question("", q) for q in questions]
            return {"prompts": [], "tails": [self._encode(q + after + answer_prefix) for q in questions]}
        if not isinstance(context, str):
            raise ValueError(f"context must be a string, got {type(context).__name__}")  # noqa: TRY004
        if not context.strip():
            raise ValueError("context is empty: give the text whose KV cache should be compressed")
        before, after = self._split_template(context, use_chat_template)
        questions = [join_question(context, q) for q in questions]
        context_ids = self._encode(before)
        if max_context_length is not None and context_ids.shape[1] > max_context_length:
            logger.warning("context truncated from %d to %d tokens", context_ids.shape[1], max_context_length)
            context_ids = context_ids[:, :max_context_length]
        if query_aware:
            question_ids = [self._encode(q) for q in questions]
            prompts = [torch.cat([context_ids, q], dim=1) for q in question_ids]
            tails = [self._encode(after + answer_prefix)] * len(questions)
            # Prompt-guided presses (Finch) read where the question starts.
            return {"prompts": prompts, "tails": tails, "question_lengths": [q.shape[1] for q in question_ids]}
        prompts = [context_ids]
        tails = [self._encode(q + after + answer_prefix) for q in questions]
        return {"prompts": prompts, "tails": tails}

    # ---- model ----------------------------------------------------------------------------------------------------
    def _eos_ids(self) -> set[int]:
        ids = set()
        for source in (getattr(self.model, "generation_config", None), self.model.config, self.tokenizer):
            eos = getattr(source, "eos_token_id", None)
            if eos is None:
                continue
            ids.update([eos] if isinstance(eos, int) else list(eos))
        return ids

    def _answer(self, context: CompressedContext, tails, max_new_tokens: int, cuda_graph: bool) -> list[str]:
        ids = context.generate(tails, max_new_tokens, self._eos_ids(), self.tokenizer.pad_token_id or 0, cuda_graph)
        return [self.tokenizer.decode(g, skip_special_tokens=True) for g in ids]

    def _forward(
        self, inputs, press=None, max_new_tokens=50, cache=None, cuda_graph=False, quantization=None, record_kept=False,
        chunk_size=None, sparse=None,
    ):  # fmt: skip
        if "batch" in inputs:
            return self._forward_batch(inputs["batch"], press, max_new_tokens, cuda_graph, quantization, record_kept,
                                       chunk_size, sparse)  # fmt: skip
        device = self.model.device
        prompts = [p.to(device) for p in inputs["prompts"]]
        tails = [t.to(device) for t in inputs["tails"]]
        if not prompts:  # resume: the cache already holds a compressed context
            if cache is None or cache.get_seq_length() == 0 or getattr(cache, "next_positions", None) is None:
                raise ValueError(
                    "context=None answers from a saved compressed context: pass cache=VarlenCache.load(path) "
                    "(a cache the pipeline filled, which records where the context ends)"
                )
            context = CompressedContext.resume(self.model, cache)
            if len(context.positions) != 1:
                raise ValueError(f"the cache holds {len(context.positions)} sequences; context=None takes one")
            return {"answers": [a for t in tails for a in self._answer(context, [t], max_new_tokens, cuda_graph)],
                    "reports": None}  # fmt: skip
        cache = cache if cache is not None else make_cache(self.model, press, quantization, ragged=cuda_graph)
        prefill = functools.partial(CompressedContext.prefill, self.model, press=press, cache=cache,
                                    record_kept=record_kept, compact=cuda_graph, chunk_size=chunk_size,
                                    sparse=sparse)  # fmt: skip
        answers, reports = [], []
        if "question_lengths" not in inputs:  # one compressed context shared by every question
            context = prefill(prompts[0])
            reports = context.summaries * len(tails)
            for tail in tails:
                answers += self._answer(context, [tail], max_new_tokens, cuda_graph)
        else:  # query-aware: one compression per question, each prefilled into the same (emptied) cache
            context = None
            for prompt, tail, question_length in zip(prompts, tails, inputs["question_lengths"]):
                if context is not None:
                    context.clear()
                context = prefill(prompt, question_length=question_length)
                reports += context.summaries
                answers += self._answer(context, [tail], max_new_tokens, cuda_graph)
        return {"answers": answers, "reports": reports}

    # ---- batches --------------------------------------------------------------------------------------------------
    def _batchable(self, press: BasePress | None) -> bool:
        """Stacking needs every layer in ragged storage: no sliding-window layers, no channel-pruned keys, no merged
        layer pairs, no compression while decoding (dense caches only so far)."""
        if any(t != "full_attention" for t in layer_types(self.model.config.get_text_config(decoder=True))):
            return False
        caps = None if press is None else press.capabilities
        return caps is None or not (caps.prunes_channels or caps.merges_layers or caps.compresses_decode)

    def _call_batch(self, contexts: list[str], questions=None, **kwargs):
        per_context = (
            isinstance(questions, (list, tuple)) and questions and all(isinstance(q, (list, tuple)) for q in questions)
        )
        if per_context and len(questions) != len(contexts):
            raise ValueError(f"questions has {len(questions)} lists for {len(contexts)} contexts; give one per context")
        if per_context and len({len(q) for q in questions}) != 1:
            raise ValueError("each context needs the same number of questions (they are decoded together)")
        if kwargs.get("cache") is not None:
            raise ValueError("cache= takes a single context; a batch builds its own VarlenCache")
        if kwargs.get("query_aware"):
            raise ValueError("query_aware=True compresses one prompt per question; pass the contexts one at a time")
        shared = None if per_context else questions
        pre, fwd, post = self._sanitize_parameters(questions=list(questions[0]) if per_context else shared, **kwargs)
        fwd.pop("cache")
        if not self._batchable(fwd["press"]):
            # Sliding-window layers and channel-pruned keys stay dense: answer the contexts one after the other.
            return [
                self(c, questions=list(q) if per_context else shared, **kwargs)
                for c, q in zip(contexts, questions if per_context else [None] * len(contexts))
            ]
        items = []
        for i, context in enumerate(contexts):
            item_pre = {**pre, "questions": list(questions[i])} if per_context else pre
            items.append(self.preprocess(context, **item_pre))
        outputs = self.forward({"batch": items}, **fwd)
        return [
            self.postprocess({"answers": a, "reports": r}, **post)
            for a, r in zip(outputs["batch_answers"], outputs["batch_reports"])
        ]

    def _forward_batch(self, items, press, max_new_tokens, cuda_graph, quantization=None, record_kept=False,
                       chunk_size=None, sparse=None):  # fmt: skip
        device = self.model.device
        prompts = [item["prompts"][0].to(device) for item in items]
        context = CompressedContext.prefill_batch(self.model, prompts, press, quantization, record_kept, chunk_size,
                                                  sparse)  # fmt: skip
        answers: list[list[str]] = [[] for _ in items]
        for j in range(len(items[0]["tails"])):
            tails = [item["tails"][j].to(device) for item in items]
            for b, answer in enumerate(self._answer(context, tails, max_new_tokens, cuda_graph)):
                answers[b].append(answer)
        reports = [[summary] * len(items[0]["tails"]) for summary in context.summaries]
        return {"batch_answers": answers, "batch_reports": reports}

    def postprocess(self, outputs, single=True, return_report=False):
        out = {"answer": outputs["answers"][0]} if single else {"answers": outputs["answers"]}
        if return_report:
            out.update({"report": outputs["reports"][0]} if single else {"reports": outputs["reports"]})
        return out


def join_question(context: str, question: str) -> str:
    """``question`` as it follows ``context`` in the prompt: after a ``"\n"``, unless either side already has
    whitespace at the junction (or the question is empty)."""
    if question and not question[0].isspace() and not context[-1:].isspace():
        return "\n" + question
    return question


def register_pipeline() -> None:
    """Make ``pipeline("kv-press-text-generation", ...)`` available (called on ``import kvpress``)."""
    PIPELINE_REGISTRY.register_pipeline(
        TASK, pipeline_class=KVPressTextGenerationPipeline, pt_model=AutoModelForCausalLM
    )
