"""Templates: RULER's singular rewrite, the key join, and the context/question/answer_prefix split."""

import pytest

from kvpress_evaluation.ruler import templates as t


def test_singular_rewrite_of_the_niah_template():
    template, kind = t.singular(t.NIAH_TEMPLATE, "numbers")
    prefix, _ = t.singular(t.NIAH_ANSWER_PREFIX, "numbers")
    assert kind == "number"
    assert template.format(type_needle_v=kind, context="HAY", query="k") == (
        "A special magic number is hidden within the following text. Make sure to memorize it. I will quiz you about "
        "the number afterwards.\nHAY\nWhat is the special magic number for k mentioned in the provided text?"
    )
    assert (
        prefix.format(type_needle_v=kind, query="k")
        == " The special magic number for k mentioned in the provided text is"
    )


@pytest.mark.parametrize(
    "keys, joined", [(["a"], "a"), (["a", "b"], "a, and b"), (["a", "b", "c", "d"], "a, b, c, and d")]
)
def test_keys_join_with_the_oxford_comma(keys, joined):
    assert t.join_keys(keys) == joined


CASES = [
    (t.NIAH_TEMPLATE, t.NIAH_ANSWER_PREFIX, t.NIAH_MARKER, {"type_needle_v": "uuids", "query": "q1, and q2"}),
    (t.VT_TEMPLATE, t.VT_ANSWER_PREFIX, t.VT_MARKER, {"query": "12345", "num_v": "5"}),
    (t.CWE_TEMPLATE, t.CWE_ANSWER_PREFIX, t.CWE_MARKER, {}),
    (t.FWE_TEMPLATE, t.FWE_ANSWER_PREFIX, t.FWE_MARKER, {}),
    (t.QA_TEMPLATE, t.QA_ANSWER_PREFIX, t.QA_MARKER, {"query": "Who?"}),
]


@pytest.mark.parametrize("template, prefix, marker, fields", CASES)
def test_split_reassembles_rulers_prompt(template, prefix, marker, fields):
    # A haystack holding the marker itself must not move the split.
    haystack = f"x {marker} y\nWhat Question: Answer the question based z"
    prompt = t.render(template, prefix, marker, ["g"], context=haystack, **fields)
    assert prompt.text == template.format(context=haystack, **fields) + prefix.format(**fields)
    assert haystack in prompt.context and haystack not in prompt.question
    assert prompt.question.startswith(marker) and prompt.question.endswith(" ")
    assert prompt.answer_prefix == prefix.format(**fields).lstrip() and prompt.answers == ["g"]


def test_verbatim_prefixes():
    assert t.CWE_ANSWER_PREFIX == " Answer: The top 10 words that appear most often in the list are:"
    assert (
        t.FWE_ANSWER_PREFIX
        == " Answer: According to the coded text above, the three most frequently appeared words are:"
    )
    assert t.VT_ANSWER_PREFIX.endswith("they are: ") and t.QA_ANSWER_PREFIX == " Answer:"
    assert " {context}\nQuestion: Do not provide any explanation." in t.FWE_TEMPLATE
