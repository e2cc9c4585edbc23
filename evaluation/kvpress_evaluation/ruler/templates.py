"""The RULER prompt templates (verbatim) and their split into ``context`` / ``question`` / ``answer_prefix``.

A RULER prompt is ``TEMPLATE + ANSWER_PREFIX``; the question starts at the last occurrence of a marker that follows
``{context}`` in the template. Splitting the *unformatted* template there keeps haystack text out of the search.
"""

from __future__ import annotations

from .prompt import Prompt

NIAH_TEMPLATE = (
    "Some special magic {type_needle_v} are hidden within the following text. Make sure to memorize it. "
    "I will quiz you about the {type_needle_v} afterwards.\n{context}\n"
    "What are all the special magic {type_needle_v} for {query} mentioned in the provided text?"
)
NIAH_ANSWER_PREFIX = " The special magic {type_needle_v} for {query} mentioned in the provided text are"
NIAH_NEEDLE = "One of the special magic {type_needle_v} for {key} is: {value}."
NIAH_MARKER = "What "

VT_TEMPLATE = (
    "Memorize and track the chain(s) of variable assignment hidden in the following text.\n\n{context}\n"
    "Question: Find all variables that are assigned the value {query} in the text above."
)
VT_ANSWER_PREFIX = (
    " Answer: According to the chain(s) of variable assignment in the text above, {num_v} variables are assigned "
    "the value {query}, they are: "
)
VT_MARKER = "Question: Find all variables"

CWE_TEMPLATE = (
    "Below is a numbered list of words. In these words, some appear more often than others. "
    "Memorize the ones that appear most often.\n{context}\n"
    "Question: What are the 10 most common words in the above list?"
)
CWE_ANSWER_PREFIX = " Answer: The top 10 words that appear most often in the list are:"
CWE_MARKER = "Question: What are the 10"

FWE_TEMPLATE = (
    "Read the following coded text and track the frequency of each coded word. "
    "Find the three most frequently appeared coded words. {context}\n"
    "Question: Do not provide any explanation. Please ignore the dots '....'. "
    "What are the three most frequently appeared words in the above coded text?"
)
FWE_ANSWER_PREFIX = " Answer: According to the coded text above, the three most frequently appeared words are:"
FWE_MARKER = "Question: Do not provide"

QA_TEMPLATE = (
    "Answer the question based on the given documents. Only give me the answer and do not output any other words.\n\n"
    "The following are given documents.\n\n{context}\n\n"
    "Answer the question based on the given documents. Only give me the answer and do not output any other words.\n\n"
    "Question: {query}"
)
QA_ANSWER_PREFIX = " Answer:"
QA_MARKER = "Answer the question based"
QA_DOCUMENT = "Document {i}:\n{document}"


def singular(text: str, type_needle_v: str) -> tuple[str, str]:
    """RULER's rewrite of a niah template for a single answer (``q * v == 1``), and the singular needle type.

    Applied in this order on the unformatted text: ``Some``→``A``, ``are all``→``is``, ``are``→``is``,
    ``answers``→``answer``; the type word loses its final ``s`` (``numbers``→``number``).
    """
    for old, new in (("Some", "A"), ("are all", "is"), ("are", "is"), ("answers", "answer")):
        text = text.replace(old, new)
    return text, type_needle_v[:-1]


def render(template: str, answer_prefix: str, marker: str, answers: list[str], **fields: str) -> Prompt:
    """Fill ``template`` and ``answer_prefix`` with ``fields`` and split the prompt before the last ``marker``.

    ``question`` keeps the prefix's leading whitespace at its end, so ``context + question + answer_prefix`` is
    exactly RULER's ``TEMPLATE + ANSWER_PREFIX``.
    """
    cut = template.rindex(marker)
    stripped = answer_prefix.lstrip()
    lead = answer_prefix[: len(answer_prefix) - len(stripped)]
    return Prompt(
        context=template[:cut].format(**fields),
        question=template[cut:].format(**fields) + lead,
        answer_prefix=stripped.format(**fields),
        answers=list(answers),
    )


def join_keys(keys: list[str]) -> str:
    """RULER's query string: one key as is, several as ``k1, k2, and k3`` (two keys: ``k1, and k2``)."""
    if len(keys) == 1:
        return keys[0]
    return ", ".join(keys[:-1]) + ", and " + keys[-1]
