"""The ``"kv-press-text-generation"`` pipeline: compress a context once, answer one or many questions from it."""

from __future__ import annotations

import logging

import torch
from transformers import AutoModelForCausalLM, Cache, DynamicCache, Pipeline
from transformers.pipelines import PIPELINE_REGISTRY

from kvpress.cache.attention import compressed_attention
from kvpress.cache.layer_access import restore_cache, snapshot_cache
from kvpress.presses.base_press import BasePress
from kvpress.presses.capabilities import Capabilities

logger = logging.getLogger(__name__)

TASK = "kv-press-text-generation"
# Marks where the question goes inside the rendered chat template; never produced by a tokenizer.
_QUESTION_SLOT = "\u2063KVPRESS-QUESTION-SLOT\u2063"


class KVPressTextGenerationPipeline(Pipeline):
    """Answer questions about a long context whose KV cache is compressed by a press.

    ``pipe(context, question=... | questions=[...], answer_prefix="", press=None, max_new_tokens=50,
    max_context_length=None, cache=None, query_aware=False, use_chat_template=None)``

    - The context (with the chat template's prefix) is prefilled once, under the press; each question (with the
      template's suffix and ``answer_prefix``) is then answered by greedy decoding from the compressed cache, and the
      cache is restored to the compressed context between questions, so answers equal those of separate calls.
    - ``query_aware=True`` compresses the context together with each question (one compression per question), as
      observation-window methods such as SnapKV were designed to be used.
    - ``cache``: an empty transformers ``Cache`` to fill (default: a fresh ``DynamicCache``); after the call it holds
      the compressed context (with ``query_aware=True``: the compressed context and last question), so its memory
      can be inspected. A call rejected with ``ValueError`` leaves it empty.

    Returns ``{"answer": str}`` for ``question=`` (or no question) and ``{"answers": [str, ...]}`` for ``questions=``.
    """

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
        **kwargs,
    ):
        if kwargs:
            raise ValueError(
                f"unknown pipeline argument(s) {sorted(kwargs)}; accepted: question, questions, answer_prefix, press, "
                "max_new_tokens, max_context_length, cache, query_aware, use_chat_template"
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
            raise ValueError(f"query_aware must be True or False, got {query_aware!r}")
        if use_chat_template is not None and not isinstance(use_chat_template, bool):
            raise ValueError(f"use_chat_template must be True, False or None (automatic), got {use_chat_template!r}")
        if cache is not None and not isinstance(cache, Cache):
            raise ValueError(
                f"cache must be a transformers Cache (e.g. DynamicCache) or None, got {type(cache).__name__}"
            )
        caps = press.capabilities if press is not None else Capabilities()
        if caps.phase != "prefill":
            raise ValueError(f"{type(press).__name__} is a decode-phase press; this pipeline runs prefill presses only")
        if caps.needs_question and not query_aware:
            raise ValueError(f"{type(press).__name__} needs the question in the compressed prompt: pass query_aware=True")
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
        }
        forward = {"press": press, "max_new_tokens": max_new_tokens, "cache": cache}
        return preprocess, forward, {"single": single}

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

    def preprocess(self, context, questions, answer_prefix, max_context_length, query_aware, use_chat_template):
        if not isinstance(context, str):
            raise ValueError(f"context must be a string, got {type(context).__name__}")
        if not context.strip():
            raise ValueError("context is empty: give the text whose KV cache should be compressed")
        before, after = self._split_template(context, use_chat_template)
        context_ids = self._encode(before)
        if max_context_length is not None and context_ids.shape[1] > max_context_length:
            logger.warning("context truncated from %d to %d tokens", context_ids.shape[1], max_context_length)
            context_ids = context_ids[:, :max_context_length]
        if query_aware:
            prompts = [torch.cat([context_ids, self._encode(q)], dim=1) for q in questions]
            tails = [self._encode(after + answer_prefix)] * len(questions)
        else:
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

    def _prefill(self, input_ids: torch.Tensor, cache, press: BasePress | None) -> int:
        """Prefill ``input_ids`` into ``cache`` under ``press``; returns the position of the next token."""
        base = self.model.base_model
        positions = torch.arange(input_ids.shape[1], device=input_ids.device)[None]
        if press is None:
            base(input_ids=input_ids, past_key_values=cache, position_ids=positions, use_cache=True)
            return input_ids.shape[1]
        with press(self.model) as report:
            base(input_ids=input_ids, past_key_values=cache, position_ids=positions, use_cache=True)
        if press.capabilities.rerotates_positions and report.kept_lengths:
            # Kept keys sit at positions 0..kept-1; layers may differ, so continue after the longest.
            return int(max(v.max().item() for v in report.kept_lengths.values()))
        return input_ids.shape[1]

    def _generate(self, tail_ids: torch.Tensor, cache, position: int, max_new_tokens: int) -> str:
        """Greedy decoding of the answer that follows ``tail_ids``; stops at any EOS id."""
        eos = self._eos_ids()
        model = self.model
        device = tail_ids.device
        generated: list[int] = []
        ids = tail_ids
        with compressed_attention(model):
            for _ in range(max_new_tokens):
                positions = torch.arange(position, position + ids.shape[1], device=device)[None]
                out = model(input_ids=ids, past_key_values=cache, position_ids=positions, use_cache=True, logits_to_keep=1)
                position += ids.shape[1]
                token = int(out.logits[0, -1].argmax())
                if token in eos:
                    break
                generated.append(token)
                ids = torch.tensor([[token]], device=device)
        return self.tokenizer.decode(generated, skip_special_tokens=True)

    def _forward(self, inputs, press=None, max_new_tokens=50, cache=None):
        device = self.model.device
        prompts = [p.to(device) for p in inputs["prompts"]]
        tails = [t.to(device) for t in inputs["tails"]]
        if press is not None:
            # Every check that can fail runs before the first forward, so a rejected call leaves a user cache empty.
            press.validate(self.model)
            for prompt in prompts:
                press.check_length(prompt.shape[1])
        cache = cache if cache is not None else DynamicCache(config=self.model.config)
        if cache.get_seq_length() > 0:
            raise ValueError("cache must be empty: the pipeline prefills the context into it")
        answers = []
        if len(prompts) == 1:  # one compressed context shared by every question
            position = self._prefill(prompts[0], cache, press)
            state = snapshot_cache(cache)
            for tail in tails:
                answers.append(self._generate(tail, cache, position, max_new_tokens))
                restore_cache(cache, state)
        else:  # query-aware: one compression per question
            empty = snapshot_cache(cache)
            for prompt, tail in zip(prompts, tails):
                restore_cache(cache, empty)
                position = self._prefill(prompt, cache, press)
                state = snapshot_cache(cache)
                answers.append(self._generate(tail, cache, position, max_new_tokens))
                restore_cache(cache, state)
        return {"answers": answers}

    def postprocess(self, outputs, single=True):
        if single:
            return {"answer": outputs["answers"][0]}
        return {"answers": outputs["answers"]}


def register_pipeline() -> None:
    """Make ``pipeline("kv-press-text-generation", ...)`` available (called on ``import kvpress``)."""
    PIPELINE_REGISTRY.register_pipeline(
        TASK, pipeline_class=KVPressTextGenerationPipeline, pt_model=AutoModelForCausalLM
    )
