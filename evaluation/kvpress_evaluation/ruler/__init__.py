"""RULER synthetic long-context tasks, generated locally for any tokenizer and token budget."""

from .generate import TASKS, generate_ruler
from .qa import load_qa

__all__ = ["TASKS", "generate_ruler", "load_qa"]
