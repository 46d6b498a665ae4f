"""results/finetuned_methods.json (scripts/summarize_finetuned.py, issue 24's summary) is what the four methods'
committed results and the registry say now: a changed result or verdict without a rerun of the summary fails."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_committed_summary_matches_the_method_results():
    spec = importlib.util.spec_from_file_location("summarize_finetuned", ROOT / "scripts" / "summarize_finetuned.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    fresh = json.loads(json.dumps(mod.summary()))
    committed = json.loads((ROOT / "results" / "finetuned_methods.json").read_text())
    assert fresh == committed
    assert set(committed["methods"]) == {"space", "s2d", "lexical-unit-decoding", "set-block-decoding"}
    for name, row in committed["methods"].items():
        assert 0 < row["forwards_per_token"] <= 1.0, (name, row)
        lo, hi = row["speed"]["same_kernel_min_max"]
        assert lo <= row["speed"]["same_kernel"] <= hi, (name, row)
