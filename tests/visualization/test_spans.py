"""token_spans finds a piece of the prompt among its tokens."""

from __future__ import annotations

import pytest
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast


def _tokenizer():
    vocab = {w: i for i, w in enumerate(["[UNK]", "the", "secret", "is", "7", "3", "9", "2", ".", "vault", "blue"])}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Whitespace(), pre_tokenizers.Digits(individual_digits=True)]
    )
    return PreTrainedTokenizerFast(tokenizer_object=tok)


def test_spans_cover_exactly_the_tokens_of_each_piece():
    from kvpress.visualization import token_spans

    tok = _tokenizer()
    text = "the blue vault secret is 7392 . the vault"
    spans = token_spans(tok, text, {"needle": "7392", "first vault": "vault"}, offset=10)
    tokens = tok.convert_ids_to_tokens(tok(text, add_special_tokens=False).input_ids)
    start, end = spans["needle"]
    assert tokens[start - 10 : end - 10] == ["7", "3", "9", "2"]
    assert spans["first vault"] == (12, 13)
    with pytest.raises(ValueError, match=r"pieces\['x'\] = 'gold' does not occur in the text"):
        token_spans(tok, text, {"x": "gold"})
