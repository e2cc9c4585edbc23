"""`token_spans`: where pieces of a prompt's text sit among its tokens, to mark them on the maps."""

from __future__ import annotations

import torch


def token_spans(tokenizer, ids, pieces: dict[str, str]) -> dict[str, tuple[int, int]]:
    """Token range ``[start, end)`` of each piece of text inside the prompt ``ids``.

    Args:
        tokenizer: the prompt's tokenizer.
        ids: ``(n,)`` token ids (a tensor or a list), e.g. ``CompressionSummary.prompt_ids``.
        pieces: ``{name: substring}``; each substring is located by its first occurrence in the decoded prompt.

    Returns:
        ``{name: (start, end)}``: the tokens whose decoded text overlaps the substring's characters.
    """
    ids = ids.tolist() if isinstance(ids, torch.Tensor) else list(ids)
    texts = [tokenizer.decode([i]) for i in ids]
    text = "".join(texts)
    if text != tokenizer.decode(ids):
        raise ValueError("these ids do not decode token by token to the prompt's text (multi-token characters?)")
    ends = torch.tensor([len(t) for t in texts]).cumsum(0)
    starts = ends - torch.tensor([len(t) for t in texts])
    spans = {}
    for name, piece in pieces.items():
        begin = text.find(piece) if piece else -1
        if begin < 0:
            raise ValueError(f"pieces[{name!r}] = {piece!r} does not occur in the prompt")
        overlap = ((starts < begin + len(piece)) & (ends > begin)).nonzero().flatten()
        spans[name] = (int(overlap[0]), int(overlap[-1]) + 1)
    return spans
