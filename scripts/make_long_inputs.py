"""Public-domain long text for SpecExtend's long-input tests (issue 19).

Extracts the long docstrings (over 300 characters) of the docutils modules whose header places them in the public
domain ("This module has been placed in the public domain."), in a fixed module order, and writes them to
``hf_decoding_ext/data/specextend/docutils_docstrings.jsonl`` (one row per docstring: ``module``, ``text``), from
which :func:`hf_decoding_ext.speculative.drafters.specextend.long_document` builds documents of 2-8K tokens.

    python scripts/make_long_inputs.py
"""

from __future__ import annotations

import ast
import json
from pathlib import Path

import docutils

OUT = Path(__file__).resolve().parents[1] / "hf_decoding_ext" / "data" / "specextend" / "docutils_docstrings.jsonl"


def main() -> int:
    root = Path(docutils.__file__).parent
    rows = []
    for path in sorted(root.rglob("*.py")):
        src = path.read_text(encoding="utf-8", errors="ignore")
        if "placed in the public domain" not in src:
            continue
        try:
            tree = ast.parse(src)
        except SyntaxError:
            continue
        for node in ast.walk(tree):
            if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef)):
                doc = ast.get_docstring(node)
                if doc and len(doc) > 300:
                    rows.append({"module": f"docutils/{path.relative_to(root).as_posix()}", "text": doc})
    OUT.parent.mkdir(parents=True, exist_ok=True)
    with open(OUT, "w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
    print(f"{len(rows)} docstrings, {sum(len(r['text']) for r in rows)} characters from docutils "
          f"{docutils.__version__} -> {OUT}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
