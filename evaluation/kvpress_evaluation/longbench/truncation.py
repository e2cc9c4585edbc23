"""LongBench's middle truncation: a prompt over the token budget keeps its first and last tokens.

The instructions sit at both ends of a LongBench prompt, so the middle of the context is what goes. Tokens are
counted with ``tokenizer.encode(text, add_special_tokens=False)`` (no BOS, no chat template) and each kept part is
decoded with ``skip_special_tokens=True``, then the two strings are joined, as LongBench's ``pred.py`` does.
"""

from __future__ import annotations


def _check_tokenizer(tokenizer) -> None:
    if not (hasattr(tokenizer, "encode") and hasattr(tokenizer, "decode")):
        raise ValueError(
            f"tokenizer must have encode and decode methods (a Hugging Face tokenizer), got {type(tokenizer).__name__}"
        )


def _check_budget(max_tokens) -> None:
    if isinstance(max_tokens, bool) or not isinstance(max_tokens, int) or max_tokens <= 0:
        raise ValueError(f"max_tokens must be a positive int, got {max_tokens!r}")


def _encode(tokenizer, text: str) -> list[int]:
    return list(tokenizer.encode(text, add_special_tokens=False))


def _cut(tokenizer, ids: list[int], head: int, tail: int) -> str:
    """The text of the first ``head`` and last ``tail`` of ``ids``."""
    kept_tail = ids[len(ids) - tail :] if tail > 0 else []
    return tokenizer.decode(ids[:head], skip_special_tokens=True) + tokenizer.decode(
        kept_tail, skip_special_tokens=True
    )


def truncate_middle(text: str, tokenizer, max_tokens: int, head_tokens: int | None = None) -> str:
    """``text`` unchanged if it has at most ``max_tokens`` tokens, else its first ``head_tokens`` tokens (default
    ``max_tokens // 2``) and its last ``max_tokens - head_tokens`` tokens, decoded and joined.

    Re-encoding the result can give a token or two more or less than ``max_tokens`` where the two parts meet.
    """
    _check_tokenizer(tokenizer)
    _check_budget(max_tokens)
    head = max_tokens // 2 if head_tokens is None else head_tokens
    if isinstance(head, bool) or not isinstance(head, int) or not 0 <= head <= max_tokens:
        raise ValueError(f"head_tokens must be an int in [0, max_tokens={max_tokens}], got {head_tokens!r}")
    ids = _encode(tokenizer, text)
    if len(ids) <= max_tokens:
        return text
    return _cut(tokenizer, ids, head, max_tokens - head)


def fit_prompt(context: str, question: str, tokenizer, max_tokens: int) -> tuple[str, str]:
    """Middle-truncate the prompt ``context + question`` to ``max_tokens`` tokens, cutting only inside ``context``.

    LongBench keeps the first ``max_tokens // 2`` and the last ``max_tokens - max_tokens // 2`` tokens of the whole
    prompt. When the question fits in that last part, the same cut falls inside the context: the context keeps its
    first ``max_tokens // 2`` tokens and its last ``max_tokens - max_tokens // 2 - tokens(question)``, and the
    question stays whole. A question longer than that is cut as LongBench cuts it: the whole prompt is truncated
    and returned as the context, with an empty question. Returns ``(context, question)`` unchanged when the prompt
    fits.
    """
    _check_tokenizer(tokenizer)
    _check_budget(max_tokens)
    context_ids, question_ids = _encode(tokenizer, context), _encode(tokenizer, question)
    if len(context_ids) + len(question_ids) <= max_tokens:
        return context, question
    head = max_tokens // 2
    tail = max_tokens - head - len(question_ids)
    if tail >= 0:
        return _cut(tokenizer, context_ids, head, tail), question
    return truncate_middle(context + question, tokenizer, max_tokens, head), ""
