"""Every registered method is complete, importable, documented, and (if done) covered by a real-model test."""

from pathlib import Path

import pytest
from transformers import LogitsProcessor, StoppingCriteria

from hf_decoding_ext.core.loop import DecodingLoop
from hf_decoding_ext.speculative.drafters.base import Drafter
from hf_decoding_ext.registry import KINDS, METHODS, MethodSpec, format_table, get_method, markdown_table

TESTS = Path(__file__).parent
ISSUE_2_METHODS = {"mirostat-v1", "mirostat-v2", "momentum", "adaptive-top-k", "knn-lm", "adadec", "cautious-ntp",
                   "superposed", "ips"}
ISSUE_3_METHODS = {"prompt-lookup", "token-recycling", "lookahead", "jacobi", "draft-model"}
ISSUE_4_METHODS = {"cad", "cfg", "instructive", "lqcd", "contrastive-decoding", "dola", "lol", "speculative-contrastive"}


def test_names_unique_and_fields_valid():
    names = [m.name for m in METHODS]
    assert len(names) == len(set(names))
    for m in METHODS:
        assert m.kind in KINDS and m.title and m.family and m.arxiv.replace(".", "").isdigit()


def test_issue_2_3_and_4_methods_registered_as_done():
    done = {m.name for m in METHODS if m.status == "done"}
    assert ISSUE_2_METHODS | ISSUE_3_METHODS | ISSUE_4_METHODS <= done
    assert {m.name for m in METHODS if m.family == "contrastive"} >= ISSUE_4_METHODS
    assert {m.name for m in METHODS if m.family == "speculative" and m.lossless} >= ISSUE_3_METHODS


@pytest.mark.parametrize("spec", METHODS, ids=lambda m: m.name)
def test_component_matches_kind_and_is_documented(spec: MethodSpec):
    cls = spec.load()
    expected = {"processor": LogitsProcessor, "stopping_criterion": StoppingCriteria,
                "decoding_loop": DecodingLoop, "candidate_generator": Drafter}.get(spec.kind)
    if expected is not None:
        assert issubclass(cls, expected), f"{spec.target} is not a {expected.__name__}"
    doc = cls.__doc__ or ""
    assert spec.arxiv in doc, f"{spec.target} docstring does not cite arXiv {spec.arxiv}"
    assert ">>>" in doc, f"{spec.target} docstring has no example"
    assert set(spec.defaults) <= set(spec.parameters())
    assert set(spec.example) <= set(spec.parameters())


@pytest.mark.parametrize("spec", [m for m in METHODS if m.status == "done"], ids=lambda m: m.name)
def test_done_methods_have_a_real_model_test(spec: MethodSpec):
    cls_name = spec.target.split(":")[1]
    hits = [p for p in TESTS.glob("test_*.py")
            if cls_name in (text := p.read_text()) and "real_model" in text and p.name != "test_registry.py"]
    assert hits, f"{spec.name} is 'done' but no test file exercises {cls_name} on the real model"


def test_lookup_and_tables():
    with pytest.raises(ValueError, match="registered methods"):
        get_method("no-such-method")
    table = format_table()
    md = markdown_table()
    for m in METHODS:
        assert m.name in table and m.name in md


def test_unknown_parameter_lists_valid_ones():
    spec = METHODS[0]
    with pytest.raises(ValueError, match="valid parameters"):
        spec.build(no_such_parameter=1)


def test_readme_table_is_generated_from_the_registry():
    readme = (TESTS.parent / "README.md").read_text()
    assert markdown_table() in readme, "run: python scripts/update_readme_table.py"
