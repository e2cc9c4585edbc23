"""RULER's question answering tasks (qa_1 on SQuAD v2, qa_2 on HotpotQA) over user-supplied data.

The data sets are not shipped with this package: the user passes a JSONL file, one item per line,
``{"question": str, "answers": [str, ...], "documents": [str, ...]}`` (``documents``: the gold paragraphs).
The distractors of an item are the documents of the other items.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass
from pathlib import Path

from .prompt import Prompt, Sampler
from .templates import QA_ANSWER_PREFIX, QA_DOCUMENT, QA_MARKER, QA_TEMPLATE, render

QA_TASKS = ("qa_1", "qa_2")


@dataclass(frozen=True)
class QAItem:
    """One question with its gold answer strings and gold documents."""

    question: str
    answers: tuple[str, ...]
    documents: tuple[str, ...]


def load_qa(qa_path) -> list[QAItem]:
    """Read QA items from the JSONL file ``qa_path`` (format in the module docstring)."""
    if qa_path is None:
        raise ValueError(
            "qa_path is required for the qa tasks: a JSONL file with one "
            '{"question": str, "answers": [str, ...], "documents": [str, ...]} per line'
        )
    path = Path(qa_path)
    if not path.is_file():
        raise FileNotFoundError(f"qa_path {str(path)!r} is not a file")
    items = []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        row = json.loads(line)
        question, answers, documents = row.get("question"), row.get("answers"), row.get("documents")
        if not isinstance(question, str) or not _strings(answers) or not _strings(documents):
            raise ValueError(
                f"qa_path line {number}: need 'question' (str), 'answers' and 'documents' (non-empty lists of str)"
            )
        items.append(QAItem(question, tuple(answers), tuple(documents)))
    if not items:
        raise ValueError(f"qa_path {str(path)!r} holds no QA items")
    return items


def _strings(value) -> bool:
    return isinstance(value, list) and len(value) > 0 and all(isinstance(v, str) for v in value)


@dataclass(frozen=True)
class QATask:
    """Sample ``i`` asks item ``i`` (cycling); its gold documents are shuffled among distractor documents.

    The haystack size is the number of distractors, drawn without replacement from the other items' documents.
    """

    name: str
    items: tuple[QAItem, ...]
    max_new_tokens: int = 32

    def __post_init__(self):
        if self.name not in QA_TASKS:
            raise ValueError(f"name must be one of {QA_TASKS}, got {self.name!r}")

    def sampler(self, rng: random.Random, target_tokens: int, index: int) -> Sampler:
        item = self.items[index % len(self.items)]
        gold = list(dict.fromkeys(item.documents))
        others = sorted({d for other in self.items for d in other.documents} - set(gold))
        rng.shuffle(others)
        order_seed = rng.getrandbits(64)

        def build(n: int, m: int = 0) -> Prompt:
            documents = gold + others[:n]
            random.Random(order_seed).shuffle(documents)
            text = "\n\n".join(QA_DOCUMENT.format(i=i, document=d) for i, d in enumerate(documents, 1))
            return render(
                QA_TEMPLATE, QA_ANSWER_PREFIX, QA_MARKER, list(item.answers), context=text, query=item.question
            )

        return Sampler(build, high=len(others))
