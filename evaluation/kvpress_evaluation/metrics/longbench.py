"""LongBench's per-dataset metrics, each scoring one prediction against one gold answer, from 0 to 1.

Every metric has the signature ``metric(prediction, ground_truth, all_classes=None) -> float``; a sample's score
is the best over its gold answers (:func:`best_score`). The numbers reproduce LongBench's own scorer:

- ``qa_f1_score`` / ``qa_f1_zh_score``: bag-of-words F1 after SQuAD-style normalisation (Chinese: jieba words).
- ``rouge_score`` / ``rouge_zh_score``: the summary-level ROUGE-L F of the ``rouge`` 1.0.1 package that LongBench
  calls (see :func:`rouge_score` for its quirks, reproduced here).
- ``classification_score``: the classes named in the prediction, with LongBench's removal loop.
- ``retrieval_score`` / ``retrieval_zh_score`` / ``count_score``: the fraction of numbers in the prediction that
  are the right one.
- ``code_sim_score``: fuzzywuzzy's ``ratio`` (difflib backend) of the first code line of the prediction.

Model output is only ever parsed as text here, never executed.
"""

from __future__ import annotations

import difflib
import re
import string
from collections import Counter
from collections.abc import Callable, Iterable

# LongBench's Chinese punctuation list, on top of ASCII's: fullwidth forms, CJK brackets and quotes, dashes and
# ellipses. It holds the closing title mark U+300B but not the opening U+300A; kept as is for identical scores.
_ZH_PUNCTUATION = (
    "\uff01\uff1f\uff61\u3002\uff02\uff03\uff04\uff05\uff06\uff07\uff08\uff09\uff0a\uff0b\uff0c\uff0d\uff0f"
    "\uff1a\uff1b\uff1c\uff1d\uff1e\uff20\uff3b\uff3c\uff3d\uff3e\uff3f\uff40\uff5b\uff5c\uff5d\uff5e\uff5f"
    "\uff60\uff62\uff63\uff64\u3001\u3003\u300b\u300c\u300d\u300e\u300f\u3010\u3011\u3014\u3015\u3016\u3017"
    "\u3018\u3019\u301a\u301b\u301c\u301d\u301e\u301f\u3030\u303e\u303f\u2013\u2014\u2018\u2019\u201b\u201c"
    "\u201d\u201e\u201f\u2026\u2027\ufe4f."
)
_EN_DROP = str.maketrans("", "", string.punctuation)
_ZH_DROP = str.maketrans("", "", string.punctuation + _ZH_PUNCTUATION)
_ARTICLES = re.compile(r"\b(a|an|the)\b")


def normalize_answer(text: str) -> str:
    """English normalisation, in this order: lowercase, drop ASCII punctuation, articles to spaces, collapse spaces."""
    text = text.lower().translate(_EN_DROP)
    return " ".join(_ARTICLES.sub(" ", text).split())


def normalize_zh_answer(text: str) -> str:
    """Chinese normalisation: lowercase, drop ASCII and Chinese punctuation, remove all whitespace."""
    return "".join(text.lower().translate(_ZH_DROP).split())


def token_f1(prediction_tokens: list[str], ground_truth_tokens: list[str]) -> float:
    """F1 of the multiset overlap of two token lists; 0 when nothing overlaps (or either list is empty)."""
    same = sum((Counter(prediction_tokens) & Counter(ground_truth_tokens)).values())
    if same == 0:
        return 0.0
    precision, recall = same / len(prediction_tokens), same / len(ground_truth_tokens)
    return 2 * precision * recall / (precision + recall)


def qa_f1_score(prediction: str, ground_truth: str, all_classes=None) -> float:
    """Token F1 of the whitespace words of the normalised strings (:func:`normalize_answer`)."""
    return token_f1(normalize_answer(prediction).split(), normalize_answer(ground_truth).split())


def jieba_words(text: str) -> list[str]:
    """jieba's accurate-mode segmentation (``cut_all=False``) of the raw text, whitespace tokens included."""
    try:
        import jieba
    except ImportError as err:  # an optional dependency: only the Chinese datasets need it
        raise ImportError("the Chinese LongBench metrics need jieba: pip install 'kvpress[eval]'") from err
    return list(jieba.cut(text, cut_all=False))


def qa_f1_zh_score(prediction: str, ground_truth: str, all_classes=None) -> float:
    """Token F1 of the jieba words of the raw strings, each normalised (:func:`normalize_zh_answer`), empty ones
    dropped."""

    def words(text: str) -> list[str]:
        return [w for w in map(normalize_zh_answer, jieba_words(text)) if w]

    return token_f1(words(prediction), words(ground_truth))


def _rouge_sentences(text: str) -> list[list[str]]:
    """``rouge`` 1.0.1's tokenisation: sentences are the non-empty pieces between ``.``, whitespace-collapsed, and
    words are split on single spaces (a piece of blanks gives one empty word)."""
    return [" ".join(piece.split()).split(" ") for piece in text.split(".") if piece]


def _lcs_words(reference: list[str], candidate: list[str]) -> list[str]:
    """The words of ``reference`` on one longest common subsequence with ``candidate``.

    Walks back through the LCS table the way ``rouge`` 1.0.1 does (a match is taken; otherwise move up only when
    that cell is strictly larger, else left), so that the same LCS is chosen among equally long ones.
    """
    n, m = len(reference), len(candidate)
    table = [[0] * (m + 1) for _ in range(n + 1)]
    for i in range(1, n + 1):
        row, above, word = table[i], table[i - 1], reference[i - 1]
        for j in range(1, m + 1):
            row[j] = above[j - 1] + 1 if word == candidate[j - 1] else max(above[j], row[j - 1])
    words = []
    i, j = n, m
    while i > 0 and j > 0:
        if reference[i - 1] == candidate[j - 1]:
            words.append(reference[i - 1])
            i, j = i - 1, j - 1
        elif table[i - 1][j] > table[i][j - 1]:
            i -= 1
        else:
            j -= 1
    return words


def rouge_score(prediction: str, ground_truth: str, all_classes=None) -> float:
    """ROUGE-L F of ``prediction`` against ``ground_truth``, as LongBench computes it with ``rouge`` 1.0.1.

    Summary-level union LCS with that package's defaults, reproduced: texts split into sentences on ``.`` and words
    on spaces, case kept, no stemming, punctuation other than ``.`` kept; word counts and the union of the LCS words
    of every (reference sentence, prediction sentence) pair are counted as *sets* of distinct words;
    ``F = 2PR / (P + R + 1e-8)``. A prediction or reference with no sentence (empty, or only dots) scores 0, as
    LongBench scores the package's exception.

    Google's ``rouge-score`` is not used: its ROUGE-L counts repeated words and tokenises differently, which gives
    other numbers than LongBench's. One difference from ``rouge`` 1.0.1 remains: it walks the LCS table
    recursively, so a sentence pair of more than about 1000 words together exceeds Python's recursion limit and
    LongBench scores it 0; here the walk is a loop and such a pair gets its real score.
    """
    hypothesis, reference = _rouge_sentences(prediction), _rouge_sentences(ground_truth)
    if not hypothesis or not reference:
        return 0.0
    union: set[str] = set()
    for reference_words in reference:
        for hypothesis_words in hypothesis:
            union.update(_lcs_words(reference_words, hypothesis_words))
    recall = len(union) / len({w for s in reference for w in s})
    precision = len(union) / len({w for s in hypothesis for w in s})
    return 2.0 * precision * recall / (precision + recall + 1e-8)


def rouge_zh_score(prediction: str, ground_truth: str, all_classes=None) -> float:
    """:func:`rouge_score` of the texts re-joined as jieba words separated by spaces."""
    return rouge_score(" ".join(jieba_words(prediction)), " ".join(jieba_words(ground_truth)))


def classification_score(prediction: str, ground_truth: str, all_classes=None) -> float:
    """``1 / len(matched)`` when the gold class is among the classes named in ``prediction``, else 0.

    ``matched``: the classes of ``all_classes`` that are substrings of ``prediction``, in ``all_classes`` order; then
    a matched class that is a proper substring of the gold class is removed, with LongBench's loop, which removes
    from the list it iterates over and so skips the element that follows each removal (reproduced).
    """
    if not all_classes:
        raise ValueError("all_classes must list the class names for classification_score")
    matched = [name for name in all_classes if name in prediction]
    i = 0
    while i < len(matched):  # the index walk of a for-loop over a list that shrinks under it
        name = matched[i]
        if name in ground_truth and name != ground_truth:
            matched.remove(name)
        i += 1
    return 1.0 / len(matched) if ground_truth in matched else 0.0


def _number_fraction(prediction: str, number: str) -> float:
    """Fraction of the digit runs of ``prediction`` equal to ``number``; 0 when it has none."""
    numbers = re.findall(r"\d+", prediction)
    return sum(n == number for n in numbers) / len(numbers) if numbers else 0.0


def _gold_paragraph(ground_truth: str, pattern: str) -> str:
    match = re.search(pattern, ground_truth)
    if match is None:
        raise ValueError(f"ground_truth must name a paragraph matching {pattern!r}, got {ground_truth!r}")
    return match.group(1)


def retrieval_score(prediction: str, ground_truth: str, all_classes=None) -> float:
    """Fraction of the numbers in ``prediction`` that are the paragraph id of ``Paragraph N`` in the gold answer."""
    return _number_fraction(prediction, _gold_paragraph(ground_truth, r"Paragraph (\d+)"))


def retrieval_zh_score(prediction: str, ground_truth: str, all_classes=None) -> float:
    """:func:`retrieval_score` with the gold id read from ``段落N``."""
    return _number_fraction(prediction, _gold_paragraph(ground_truth, r"段落(\d+)"))


def count_score(prediction: str, ground_truth: str, all_classes=None) -> float:
    """Fraction of the numbers in ``prediction`` equal to the gold count (a string of digits)."""
    return _number_fraction(prediction, str(ground_truth))


def fuzz_ratio(a: str, b: str) -> int:
    """fuzzywuzzy's ``fuzz.ratio`` without python-Levenshtein, the backend LongBench's requirements install.

    100 for equal strings (so two empty strings give 100), 0 when either is empty, else
    ``round(100 * difflib.SequenceMatcher(None, a, b).ratio())`` with difflib's automatic junk heuristic, which
    applies when ``b`` has 200 characters or more and can make long near-identical strings score low. (rapidfuzz's
    ``ratio``, an Indel distance, differs from this by several points on short lines, so it is not used.)
    """
    if a == b:
        return 100
    if not a or not b:
        return 0
    return round(100 * difflib.SequenceMatcher(None, a, b).ratio())


def first_code_line(prediction: str) -> str:
    """The first line of ``prediction`` (leading newlines dropped) holding no `````, ``#`` or ``//``; ``""`` if none."""
    for line in prediction.lstrip("\n").split("\n"):
        if "`" not in line and "#" not in line and "//" not in line:
            return line
    return ""


def code_sim_score(prediction: str, ground_truth: str, all_classes=None) -> float:
    """:func:`fuzz_ratio` of the first code line of ``prediction`` and the gold line, divided by 100."""
    return fuzz_ratio(first_code_line(prediction), ground_truth) / 100


Metric = Callable[..., float]

METRICS: dict[str, Metric] = {
    "qa_f1": qa_f1_score,
    "qa_f1_zh": qa_f1_zh_score,
    "rouge": rouge_score,
    "rouge_zh": rouge_zh_score,
    "classification": classification_score,
    "retrieval": retrieval_score,
    "retrieval_zh": retrieval_zh_score,
    "count": count_score,
    "code_sim": code_sim_score,
}


def first_line(prediction: str) -> str:
    """The first line after leading newlines: what the few-shot datasets score (the model may continue the pattern)."""
    return prediction.lstrip("\n").split("\n")[0]


def best_score(metric: str, prediction: str, answers: Iterable[str], all_classes=None) -> float:
    """The best ``METRICS[metric]`` score (0 to 1) of ``prediction`` over the gold ``answers``."""
    if metric not in METRICS:
        raise ValueError(f"metric must be one of {', '.join(METRICS)}; got {metric!r}")
    answers = list(answers)
    if not answers:
        raise ValueError("answers must hold at least one gold string")
    fn = METRICS[metric]
    return max(0.0, *(fn(prediction, answer, all_classes=all_classes) for answer in answers))
