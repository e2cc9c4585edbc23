"""The LongBench v1 datasets: official prompt template, generation length, metric and language of each.

Templates are LongBench's own (``str.format`` with ``{context}`` and ``{input}``), kept byte for byte, typos
included ("asconcisely"), so that prompts match the published ones.
"""

from __future__ import annotations

from dataclasses import dataclass

CONTEXT_FIELD = "{context}"
INPUT_FIELD = "{input}"


@dataclass(frozen=True)
class LongBenchDataset:
    """One LongBench dataset.

    Attributes:
        name: the dataset's file stem (``hotpotqa``, ``repobench-p``...).
        template: the official prompt, with ``{context}`` and, for most datasets, ``{input}``.
        max_new_tokens: the official generation length (tokens).
        metric: a key of :data:`kvpress_evaluation.metrics.longbench.METRICS`.
        language: ``"en"``, ``"zh"`` or ``"code"``.
        chat_template: whether LongBench wraps the prompt in the model's chat template; the few-shot and code
            completion datasets run on the raw prompt.
        first_line: score only the first line of the prediction (the few-shot datasets, whose models tend to go on
            with the next example).
    """

    name: str
    template: str
    max_new_tokens: int
    metric: str
    language: str
    chat_template: bool = True
    first_line: bool = False

    def prompt(self, context: str, input: str) -> str:
        """The official prompt of one row."""
        return self.template.format(context=context, input=input)

    def prompt_parts(self, context: str, input: str) -> tuple[str, str]:
        """The prompt cut after the row's context: ``(instructions + context, the rest)``.

        The first part is what gets prefilled and compressed, the second (the question and the closing instructions,
        e.g. ``"\\n\\nQuestion: {input}\\nAnswer:"``) is read after compression; the two concatenate to
        :meth:`prompt`. A template that asks its question before the context would leave the compressed part
        depending on the question, so its whole prompt goes in the first part and the second is empty (no v1
        template does this).
        """
        cut = self.template.index(CONTEXT_FIELD) + len(CONTEXT_FIELD)
        head, tail = self.template[:cut], self.template[cut:]
        if INPUT_FIELD in head:
            return self.prompt(context, input), ""
        return head.format(context=context), tail.format(input=input)


def _qa(name: str, template: str, max_new_tokens: int, metric: str = "qa_f1", language: str = "en"):
    return LongBenchDataset(name, template, max_new_tokens, metric, language)


_PASSAGES_QA = (
    "Answer the question based on the given passages. Only give me the answer and do not output any other words.\n\n"
    "The following are given passages.\n{context}\n\n"
    "Answer the question based on the given passages. Only give me the answer and do not output any other words.\n\n"
    "Question: {input}\nAnswer:"
)
_QASPER_RULES = (
    "as concisely as you can, using a single phrase or sentence if possible. If the question cannot be answered "
    'based on the information in the article, write "unanswerable". If the question is a yes/no question, answer '
    '"yes", "no", or "unanswerable". Do not provide any explanation.'
)
_CODE = "Please complete the code given below. \n"

_DATASETS = (
    _qa(
        "narrativeqa",
        "You are given a story, which can be either a novel or a movie script, and a question. Answer the question "
        "asconcisely as you can, using a single phrase if possible. Do not provide any explanation.\n\n"
        "Story: {context}\n\nNow, answer the question based on the story asconcisely as you can, using a single "
        "phrase if possible. Do not provide any explanation.\n\nQuestion: {input}\n\nAnswer:",
        128,
    ),
    _qa(
        "qasper",
        "You are given a scientific article and a question. Answer the question " + _QASPER_RULES + "\n\n"
        "Article: {context}\n\n Answer the question based on the above article " + _QASPER_RULES + "\n\n"
        "Question: {input}\n\nAnswer:",
        128,
    ),
    _qa(
        "multifieldqa_en",
        "Read the following text and answer briefly.\n\n{context}\n\nNow, answer the following question based on "
        "the above text, only give me the answer and do not output any other words.\n\nQuestion: {input}\nAnswer:",
        64,
    ),
    _qa(
        "multifieldqa_zh",
        "阅读以下文字并用中文简短回答：\n\n{context}\n\n现在请基于上面的文章回答下面的问题，只告诉我答案，不要输出任何其他字词。"
        "\n\n问题：{input}\n回答：",
        64,
        "qa_f1_zh",
        "zh",
    ),
    _qa("hotpotqa", _PASSAGES_QA, 32),
    _qa("2wikimqa", _PASSAGES_QA, 32),
    _qa("musique", _PASSAGES_QA, 32),
    LongBenchDataset(
        "dureader",
        "请基于给定的文章回答下述问题。\n\n文章：{context}\n\n请基于上述文章回答下面的问题。\n\n问题：{input}\n回答：",
        128,
        "rouge_zh",
        "zh",
    ),
    LongBenchDataset(
        "gov_report",
        "You are given a report by a government agency. Write a one-page summary of the report.\n\n"
        "Report:\n{context}\n\nNow, write a one-page summary of the report.\n\nSummary:",
        512,
        "rouge",
        "en",
    ),
    LongBenchDataset(
        "qmsum",
        "You are given a meeting transcript and a query containing a question or instruction. Answer the query in "
        "one or more sentences.\n\nTranscript:\n{context}\n\nNow, answer the query based on the above meeting "
        "transcript in one or more sentences.\n\nQuery: {input}\nAnswer:",
        512,
        "rouge",
        "en",
    ),
    LongBenchDataset(
        "multi_news",
        "You are given several news passages. Write a one-page summary of all news. \n\nNews:\n{context}\n\n"
        "Now, write a one-page summary of all the news.\n\nSummary:",
        512,
        "rouge",
        "en",
    ),
    LongBenchDataset(
        "vcsum",
        "下面有一段会议记录，请你阅读后，写一段总结，总结会议的内容。\n会议记录：\n{context}\n\n会议总结：",
        512,
        "rouge_zh",
        "zh",
    ),
    LongBenchDataset(
        "trec",
        "Please determine the type of the question below. Here are some examples of questions.\n\n{context}\n{input}",
        64,
        "classification",
        "en",
        chat_template=False,
        first_line=True,
    ),
    LongBenchDataset(
        "triviaqa",
        "Answer the question based on the given passage. Only give me the answer and do not output any other words. "
        "The following are some examples.\n\n{context}\n\n{input}",
        32,
        "qa_f1",
        "en",
        chat_template=False,
        first_line=True,
    ),
    LongBenchDataset(
        "samsum",
        "Summarize the dialogue into a few short sentences. The following are some examples.\n\n{context}\n\n{input}",
        128,
        "rouge",
        "en",
        chat_template=False,
        first_line=True,
    ),
    LongBenchDataset(
        "lsht",
        "请判断给定新闻的类别，下面是一些例子。\n\n{context}\n{input}",
        64,
        "classification",
        "zh",
        chat_template=False,
        first_line=True,
    ),
    LongBenchDataset(
        "passage_count",
        "There are some paragraphs below sourced from Wikipedia. Some of them may be duplicates. Please carefully "
        "read these paragraphs and determine how many unique paragraphs there are after removing duplicates. In "
        "other words, how many non-repeating paragraphs are there in total?\n\n{context}\n\nPlease enter the final "
        "count of unique paragraphs after removing duplicates. The output format should only contain the number, "
        "such as 1, 2, 3, and so on.\n\nThe final answer is: ",
        32,
        "count",
        "en",
    ),
    LongBenchDataset(
        "passage_retrieval_en",
        "Here are 30 paragraphs from Wikipedia, along with an abstract. Please determine which paragraph the "
        "abstract is from.\n\n{context}\n\nThe following is an abstract.\n\n{input}\n\nPlease enter the number of "
        'the paragraph that the abstract is from. The answer format must be like "Paragraph 1", "Paragraph 2", '
        "etc.\n\nThe answer is: ",
        32,
        "retrieval",
        "en",
    ),
    LongBenchDataset(
        "passage_retrieval_zh",
        "以下是若干段落文字，以及其中一个段落的摘要。请确定给定的摘要出自哪一段。\n\n{context}\n\n下面是一个摘要\n\n{input}\n\n"
        '请输入摘要所属段落的编号。答案格式必须是"段落1"，"段落2"等格式\n\n答案是：',
        32,
        "retrieval_zh",
        "zh",
    ),
    LongBenchDataset("lcc", _CODE + "{context}Next line of code:\n", 64, "code_sim", "code", chat_template=False),
    LongBenchDataset(
        "repobench-p", _CODE + "{context}{input}Next line of code:\n", 64, "code_sim", "code", chat_template=False
    ),
)

DATASETS: dict[str, LongBenchDataset] = {d.name: d for d in _DATASETS}

# Every v1 dataset (English, Chinese and code), in LongBench's order.
TASKS: tuple[str, ...] = tuple(DATASETS)

# The datasets of LongBench-E (files ``<name>_e.jsonl``), whose samples spread evenly over three length buckets.
E_TASKS: tuple[str, ...] = (
    "qasper",
    "multifieldqa_en",
    "hotpotqa",
    "2wikimqa",
    "gov_report",
    "multi_news",
    "trec",
    "triviaqa",
    "samsum",
    "passage_count",
    "passage_retrieval_en",
    "lcc",
    "repobench-p",
)


def file_stem(task: str, longbench_e: bool) -> str:
    """The data file stem (and hub config name) of ``task``: ``hotpotqa`` or, for LongBench-E, ``hotpotqa_e``."""
    return f"{task}_e" if longbench_e else task


def check_tasks(tasks, longbench_e: bool) -> tuple[str, ...]:
    """``tasks`` as a tuple after checking each is a dataset of LongBench (or LongBench-E); None means all of them."""
    allowed = E_TASKS if longbench_e else TASKS
    if tasks is None:
        return allowed
    tasks = tuple(tasks)
    unknown = [t for t in tasks if t not in allowed]
    if unknown or not tasks or len(set(tasks)) != len(tasks):
        variant = "LongBench-E" if longbench_e else "LongBench"
        raise ValueError(
            f"tasks must be distinct {variant} datasets from {', '.join(allowed)}; got {list(tasks)!r}"
            + (f" (unknown: {', '.join(unknown)})" if unknown else "")
        )
    return tasks
