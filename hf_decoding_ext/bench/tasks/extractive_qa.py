"""The extractive question-answering demo set of exact-extractive decoding (``data/extractive_qa.jsonl``).

Short passages written for this library, each with a question whose answer is a substring of the passage, and the
prompt used with them (see :mod:`hf_decoding_ext.structured.exact_extractive`).

Example:
    >>> from hf_decoding_ext.bench.tasks.extractive_qa import load_extractive_qa, qa_prompt
    >>> row = load_extractive_qa()[0]
    >>> row["answer"] in row["context"], qa_prompt(row["context"], row["question"]).startswith(row["context"])
    (True, True)
"""

from __future__ import annotations

from hf_decoding_ext.core.resources import read_jsonl


def qa_prompt(context: str, question: str) -> str:
    """The user message used with the shipped passages: passage, question, and an instruction to copy words."""
    return f"{context}\n\nQuestion: {question}\nAnswer with a few words copied from the text."


def load_extractive_qa() -> list[dict[str, str]]:
    """The shipped extractive-QA passages (``data/extractive_qa.jsonl``, written for this library): dicts with
    ``context``, ``question`` and ``answer`` (a substring of the context)."""
    return read_jsonl("extractive_qa.jsonl")
