"""LongBench metrics on hand-worked cases (the arithmetic is in the comments), plus a randomised check of ROUGE-L
against Google's rouge-score on texts where the two definitions coincide."""

import random

import pytest

from kvpress_evaluation.metrics.longbench import (
    METRICS,
    best_score,
    classification_score,
    code_sim_score,
    count_score,
    first_code_line,
    first_line,
    fuzz_ratio,
    jieba_words,
    normalize_answer,
    normalize_zh_answer,
    qa_f1_score,
    qa_f1_zh_score,
    retrieval_score,
    retrieval_zh_score,
    rouge_score,
    rouge_zh_score,
)


def f1(p, r):
    return 2 * p * r / (p + r)


def rouge_f(p, r):
    """rouge 1.0.1's F: the 1e-8 in the denominator included."""
    return 2 * p * r / (p + r + 1e-8)


# --- normalisation -------------------------------------------------------------------------------------------------


def test_normalize_answer_order_lower_punctuation_articles_spaces():
    # lower: "the  cat's hat, an apple!" -> no punctuation: "the  cats hat an apple" -> articles to spaces -> collapse
    assert normalize_answer("The  Cat's hat, AN apple!") == "cats hat apple"
    # Punctuation goes before articles: "a.b." becomes "ab", which is no article; "the-end" becomes "theend".
    assert normalize_answer("A.B. the-end") == "ab theend"


def test_normalize_zh_answer_drops_listed_punctuation_and_all_whitespace():
    # "，" and "》" are in LongBench's list, "《" is not (kept, as the reference does); ASCII is lowercased.
    assert normalize_zh_answer("《书》 A，B\t") == "《书ab"
    assert normalize_zh_answer("答案：“北京”。") == "答案北京"


# --- QA F1 ---------------------------------------------------------------------------------------------------------


def test_qa_f1_bag_of_words():
    # pred -> [cat, sat, on, mat] (4 words), gold -> [cat, on, mat] (3): overlap 3, P = 3/4, R = 3/3.
    assert qa_f1_score("The cat sat on the mat.", "A cat on a mat") == pytest.approx(f1(3 / 4, 1))
    # Multiset overlap: {cat: 2, dog: 1} & {cat: 1, dog: 2} = 2 words; P = R = 2/3.
    assert qa_f1_score("cat cat dog", "cat dog dog") == pytest.approx(2 / 3)
    assert qa_f1_score("Paris", "paris!") == 1.0
    assert qa_f1_score("London", "Paris") == 0.0
    assert qa_f1_score("", "Paris") == 0.0
    assert qa_f1_score("the", "a") == 0.0  # both normalise to nothing


def test_qa_f1_zh_on_jieba_words():
    # jieba: 答案|是|北京|。 -> "。" normalises to "" and is dropped -> [答案, 是, 北京]; gold [北京].
    assert jieba_words("答案是北京。") == ["答案", "是", "北京", "。"]
    # overlap 1: P = 1/3, R = 1/1 -> F1 = 0.5
    assert qa_f1_zh_score("答案是北京。", "北京") == pytest.approx(f1(1 / 3, 1))
    # Whitespace tokens normalise to "" and are dropped: 北京| |很|好 -> [北京, 很, 好] vs [北京, 很, 好].
    assert qa_f1_zh_score("北京 很好", "北京很好") == pytest.approx(1.0)
    assert qa_f1_zh_score("上海", "北京") == 0.0


# --- ROUGE-L (rouge 1.0.1 semantics) -------------------------------------------------------------------------------


def test_rouge_identical_and_case_sensitive():
    assert rouge_score("the cat sat", "the cat sat") == pytest.approx(rouge_f(1, 1), abs=1e-15)
    # "The" != "the": the LCS of [the, cat, sat] and [The, cat, sat] is [cat, sat]; P = R = 2/3.
    assert rouge_score("The cat sat", "the cat sat") == pytest.approx(rouge_f(2 / 3, 2 / 3), abs=1e-15)


def test_rouge_counts_distinct_words():
    # Word sets: {the, cat} on both sides (m = n = 2); LCS of [the, cat, cat] and [the, the, cat] is [the, cat].
    assert rouge_score("the the cat", "the cat cat") == pytest.approx(rouge_f(1, 1), abs=1e-15)


def test_rouge_is_summary_level_over_sentences():
    # One sentence "a b c d" vs "c d a b": LCS 2 of 4 distinct words each -> P = R = 1/2.
    assert rouge_score("a b c d", "c d a b") == pytest.approx(rouge_f(1 / 2, 1 / 2), abs=1e-15)
    # Split at ".": the LCS with "a b" is {a, b}, with "c d" it is {c, d}; their union has 4 words -> P = R = 1.
    assert rouge_score("a b. c d", "c d a b") == pytest.approx(rouge_f(1, 1), abs=1e-15)


def test_rouge_lcs_tie_break_follows_the_reference_walk():
    # Reference [a, b], prediction sentences [b, a] and [b]. The LCS table of ([a, b], [b, a]) ends in a tie
    # (up = left = 1); the walk goes left on ties and takes "b", never "a". Union {b}: 1 of 2 distinct words on each
    # side -> P = R = 1/2. (Going up on ties would take "a" and give a union of 2 words, F = 1.)
    assert rouge_score("b a. b", "a b") == pytest.approx(rouge_f(1 / 2, 1 / 2), abs=1e-15)


def test_rouge_keeps_punctuation_other_than_dots():
    # "sat," is not "sat": LCS of [cat, sat] and [cat, sat,] is [cat]; P = R = 1/2.
    assert rouge_score("cat sat,", "cat sat") == pytest.approx(rouge_f(1 / 2, 1 / 2), abs=1e-15)


@pytest.mark.parametrize("prediction,reference", [("", "a b"), ("...", "a b"), ("a b", ""), (" . ", "x")])
def test_rouge_without_sentences_scores_zero(prediction, reference):
    # ("" and "..." have no non-empty piece between dots; " . " has pieces " " -> one empty word, which is no match.)
    assert rouge_score(prediction, reference) == 0.0


def test_rouge_matches_rouge_score_library_on_distinct_word_sentences():
    # With one sentence per side and no repeated word, summary-level set ROUGE-L is the plain LCS F-measure, which
    # Google's rouge-score computes with a whitespace tokenizer (no stemming, no lowercasing).
    from rouge_score import rouge_scorer

    class Whitespace:
        def tokenize(self, text):
            return text.split()

    scorer = rouge_scorer.RougeScorer(["rougeL"], tokenizer=Whitespace())
    vocab = [f"w{i}" for i in range(40)] + ["Cat", "cat", "x,"]
    rng = random.Random(0)
    for _ in range(200):
        reference = " ".join(rng.sample(vocab, rng.randint(1, 30)))
        prediction = " ".join(rng.sample(vocab, rng.randint(1, 30)))
        expected = scorer.score(reference, prediction)["rougeL"].fmeasure
        assert rouge_score(prediction, reference) == pytest.approx(expected, abs=1e-7)


def test_rouge_zh_scores_jieba_words():
    # 会议|讨论|了|预算|。 vs 会议|讨论|预算 ("。" is no sentence break): n = 5, m = 3, LCS 3 -> P = 3/5, R = 1.
    assert rouge_zh_score("会议讨论了预算。", "会议讨论预算") == pytest.approx(rouge_f(3 / 5, 1), abs=1e-15)
    assert rouge_zh_score("会议讨论预算", "会议讨论预算") == pytest.approx(rouge_f(1, 1), abs=1e-15)


# --- classification ------------------------------------------------------------------------------------------------


def test_classification_shares_credit_among_named_classes():
    classes = ["Human", "Location", "Number"]
    assert classification_score("Location", "Location", all_classes=classes) == 1.0
    # Two classes named, the gold one among them -> 1/2.
    assert classification_score("Human or Location", "Location", all_classes=classes) == 0.5
    assert classification_score("Number", "Location", all_classes=classes) == 0.0
    assert classification_score("no idea", "Location", all_classes=classes) == 0.0


def test_classification_removal_loop_skips_after_a_removal():
    # matched = [A, B, AB] (all substrings of "AB"). The loop removes "A" (a proper substring of the gold "AB"),
    # the list shifts to [B, AB] and the next index lands on "AB": "B" is never examined and stays -> 1/2.
    assert classification_score("AB", "AB", all_classes=["A", "B", "AB"]) == 0.5
    # With "B" first, the walk removes it, then examines "AB"; "A" is skipped -> [A, AB] -> 1/2 as well.
    assert classification_score("AB", "AB", all_classes=["B", "A", "AB"]) == 0.5
    # One proper substring only: it is removed -> [AB] -> 1.
    assert classification_score("AB", "AB", all_classes=["A", "AB", "C"]) == 1.0


def test_classification_needs_classes():
    with pytest.raises(ValueError, match="all_classes"):
        classification_score("x", "x", all_classes=None)


# --- retrieval and count -------------------------------------------------------------------------------------------


def test_retrieval_fraction_of_numbers_that_are_the_gold_paragraph():
    assert retrieval_score("Paragraph 12", "Paragraph 12") == 1.0
    assert retrieval_score("Paragraph 12 or Paragraph 3", "Paragraph 12") == 0.5  # numbers [12, 3]
    assert retrieval_score("Paragraph 120", "Paragraph 12") == 0.0  # 120 is a different number
    assert retrieval_score("I cannot tell", "Paragraph 12") == 0.0  # no number at all
    with pytest.raises(ValueError, match="ground_truth"):
        retrieval_score("Paragraph 1", "the first one")


def test_retrieval_zh_reads_duanluo():
    assert retrieval_zh_score("答案是：段落7", "段落7") == 1.0
    assert retrieval_zh_score("段落7和段落8", "段落7") == 0.5  # numbers [7, 8]
    with pytest.raises(ValueError, match="ground_truth"):
        retrieval_zh_score("段落7", "Paragraph 7")


def test_count_fraction_of_numbers_equal_to_the_count():
    assert count_score("4", "4") == 1.0
    assert count_score("There are 4 unique paragraphs out of 10", "4") == 0.5  # numbers [4, 10]
    assert count_score("4, 4 and 5", "4") == pytest.approx(2 / 3)  # numbers [4, 4, 5]
    assert count_score("four", "4") == 0.0


# --- code similarity -----------------------------------------------------------------------------------------------


def test_first_code_line_skips_comments_and_fences():
    assert first_code_line("\n\n```python\n# add\n// c\n    return a + b\nx") == "    return a + b"
    assert first_code_line("# only\n`x`") == ""


def test_code_sim_difflib_ratio():
    # "x = 1" vs "x = 2": 4 matching characters, ratio 2 * 4 / 10 = 0.8 -> 80 -> 0.8.
    assert code_sim_score("```python\nx = 1", "x = 2") == 0.8
    assert code_sim_score("\n# add\n    return a + b\nmore", "    return a + b") == 1.0
    assert code_sim_score("// nothing", "x = 2") == 0.0  # no code line: "" vs gold -> 0
    assert fuzz_ratio("", "") == 100  # equality is tested before emptiness
    # difflib's junk heuristic (second string of 200+ characters): 'a' is junk, only 'b' matches:
    # ratio 2 * 1 / 502 -> round(0.398) = 0, although the strings share 250 characters.
    assert fuzz_ratio("a" * 250 + "b", "b" + "a" * 250) == 0
    # "ab" vs "abc": 2 * 2 / 5 = 0.8 -> 80. Halves round to even, as Python 3's round: one shared character in 16
    # gives 2 * 1 / 16 = 0.125 -> 12.5 -> 12.
    assert fuzz_ratio("ab", "abc") == 80
    assert fuzz_ratio("abcdefgh", "aijklmno") == 12


# --- shared helpers ------------------------------------------------------------------------------------------------


def test_first_line_cut():
    assert first_line("\n\nLocation\nQuestion: next") == "Location"
    assert first_line("") == ""


def test_best_score_takes_the_max_over_answers():
    # [paris] vs "London": 0; vs [paris, france]: P = 1, R = 1/2 -> 2/3; vs [paris]: 1. The best is kept.
    assert best_score("qa_f1", "Paris", ["London", "Paris France", "paris"]) == 1.0
    assert best_score("qa_f1", "Paris", ["London", "Paris France"]) == pytest.approx(f1(1, 1 / 2))
    assert best_score("classification", "Human", ["Human"], all_classes=["Human", "Number"]) == 1.0
    with pytest.raises(ValueError, match="metric must be one of"):
        best_score("bleu", "x", ["x"])
    with pytest.raises(ValueError, match="answers"):
        best_score("qa_f1", "x", [])


def test_metric_table_and_unit_range():
    assert set(METRICS) == {
        "qa_f1",
        "qa_f1_zh",
        "rouge",
        "rouge_zh",
        "classification",
        "retrieval",
        "retrieval_zh",
        "count",
        "code_sim",
    }
    rng = random.Random(1)
    words = ["Paragraph 3", "段落3", "the", "cat", "3", "#", "\n", ".", "北京", "Human"]
    for _ in range(100):
        prediction = " ".join(rng.choice(words) for _ in range(rng.randint(0, 8)))
        for name, gold in [
            ("qa_f1", "the cat"),
            ("qa_f1_zh", "北京"),
            ("rouge", "the cat. 3"),
            ("rouge_zh", "北京 cat"),
            ("classification", "Human"),
            ("retrieval", "Paragraph 3"),
            ("retrieval_zh", "段落3"),
            ("count", "3"),
            ("code_sim", "cat = 3"),
        ]:
            value = METRICS[name](prediction, gold, all_classes=["Human", "cat"])
            assert 0.0 <= value <= 1.0
