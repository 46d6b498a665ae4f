"""The one place that locates the data shipped inside the package (``hf_decoding_ext/data``).

Every loader of packaged prompts, evaluation sets, corpora and checkpoints goes through :func:`data_file` /
:func:`read_jsonl`, so the data folder can move (or be split into a data package) by changing this module alone.
Nothing here downloads anything.

Example:
    >>> from hf_decoding_ext.core.resources import read_jsonl
    >>> rows = read_jsonl("prompts", "benchmark.jsonl")
    >>> len(rows) > 0
    True
"""

from __future__ import annotations

import gzip
import importlib.resources
import json
from importlib.abc import Traversable
from pathlib import Path
from typing import Any

PACKAGE = "hf_decoding_ext"
DATA_FOLDER = "data"


def data_file(*parts: str) -> Traversable:
    """The packaged resource ``hf_decoding_ext/data/<parts...>`` (a ``Traversable``; it may not exist)."""
    return importlib.resources.files(PACKAGE).joinpath(DATA_FOLDER, *parts)


def data_path(*parts: str) -> Path:
    """:func:`data_file` as a filesystem ``Path`` (the package is installed as files, never zipped)."""
    return Path(str(data_file(*parts)))


def read_jsonl(*parts: str) -> list[dict[str, Any]]:
    """The records of a packaged JSON-lines file (``.jsonl`` or gzip-compressed ``.jsonl.gz``); blank lines and
    ``#`` comment lines (a header saying what the file is) skipped."""
    resource = data_file(*parts)
    raw = resource.read_bytes()
    if parts and parts[-1].endswith(".gz"):
        raw = gzip.decompress(raw)
    lines = (line.strip() for line in raw.decode("utf-8").splitlines())
    return [json.loads(line) for line in lines if line and not line.startswith("#")]
