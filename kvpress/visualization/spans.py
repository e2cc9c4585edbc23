"""`token_spans`: where pieces of a prompt's text sit among its tokens, to mark them on the maps."""

from __future__ import annotations


def token_spans(tokenizer, text: str, pieces: dict[str, str], offset: int = 0) -> dict[str, tuple[int, int]]:
    """Token range ``[start, end)`` of each piece of ``text``, as ``tokenizer(text, add_special_tokens=False)``
    splits it.

    Args:
        tokenizer: a fast tokenizer (it must return offset mappings).
        text: the tokenized text.
        pieces: ``{name: substring}``; each substring is located by its first occurrence in ``text``.
        offset: added to every position (e.g. the number of tokens that precede ``text`` in the prompt).

    Returns:
        ``{name: (start, end)}``: the tokens that overlap the substring's characters.
    """
    encoding = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    offsets = encoding["offset_mapping"]
    spans = {}
    for name, piece in pieces.items():
        begin = text.find(piece) if piece else -1
        if begin < 0:
            raise ValueError(f"pieces[{name!r}] = {piece!r} does not occur in the text")
        end = begin + len(piece)
        tokens = [i for i, (a, b) in enumerate(offsets) if a < end and b > begin]
        spans[name] = (tokens[0] + offset, tokens[-1] + 1 + offset)
    return spans
