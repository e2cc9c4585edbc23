"""token_spans finds a piece of the prompt among its tokens."""

from __future__ import annotations

import pytest
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast


def _tokenizer():
    """A byte-level BPE with single-digit tokens, like SmolLM2's, trained on a few sentences."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Digits(individual_digits=True), pre_tokenizers.ByteLevel(add_prefix_space=False)]
    )
    tok.decoder = decoders.ByteLevel()
    text = ["the blue vault secret is kept in the vault", "the secret of the blue sea"] * 20
    tok.train_from_iterator(
        text, trainers.BpeTrainer(vocab_size=300, initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    )
    return PreTrainedTokenizerFast(tokenizer_object=tok)


def test_spans_cover_exactly_the_tokens_of_each_piece():
    from kvpress.visualization import token_spans

    tok = _tokenizer()
    ids = tok("the blue vault secret is 7392 . the vault", add_special_tokens=False, return_tensors="pt").input_ids
    spans = token_spans(tok, ids[0], {"needle": "7392", "first vault": "vault", "end": "2 . the"})
    tokens = tok.convert_ids_to_tokens(ids[0])
    start, end = spans["needle"]
    assert [t.strip("Ġ") for t in tokens[start:end]] == ["7", "3", "9", "2"]
    assert "".join(tokens[slice(*spans["first vault"])]).strip("Ġ") == "vault"
    assert tok.decode(ids[0][slice(*spans["end"])]) == "2 . the"
    with pytest.raises(ValueError, match=r"pieces\['x'\] = 'gold' does not occur in the prompt"):
        token_spans(tok, ids[0].tolist(), {"x": "gold"})
