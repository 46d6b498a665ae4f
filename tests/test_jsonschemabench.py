"""JSONSchemaBench harness: the shipped data, the mask tests (no valid instance blocked, no invalid one admitted) on a
sample of MaskBench, the metrics, and constrained generation on the real model."""

from __future__ import annotations

import pytest

from hf_decoding_ext.bench import jsonschemabench as jsb


@pytest.fixture(scope="module")
def tok():
    from transformers import AutoTokenizer

    from hf_decoding_ext.core.models import default_model_path

    return AutoTokenizer.from_pretrained(default_model_path())


def test_shipped_data():
    schemas = jsb.load_schemas()
    assert {r["subset"] for r in schemas} == {"Glaiveai2K", "Github_easy"}
    assert len(schemas) == 3650
    cases = jsb.load_maskbench()
    assert len(cases) == 3797
    assert sum(len(c["tests"]) for c in cases) == 4289 + 5754
    sample = jsb.load_schemas(limit=5)
    assert len(sample) == 10 and len({r["id"] for r in sample}) == 10


def test_mask_tests_on_a_maskbench_sample(tok):
    cases = jsb.load_maskbench(limit=25)  # 25 per subset, spread over each subset: 75 schemas
    res = jsb.run_mask_tests(tok, cases, progress=False)
    s = jsb.summarise_masks(res)
    assert s["declared"] >= 40
    assert s["valid_instances"] >= 40 and s["invalid_instances"] >= 40
    assert s["valid_blocked"] == 0, s["failures"]
    assert s["invalid_admitted"] == 0, s["failures"]
    assert s["mask_us"]["p50"] < 5000  # a typical mask costs well under a millisecond (loose: shared CI machines)


def test_check_instance_detects_both_directions(tok):
    from hf_decoding_ext.structured import grammar as G

    schema = {"type": "object", "properties": {"n": {"type": "integer", "maximum": 5}}, "required": ["n"],
              "additionalProperties": False}
    compiled = G.compile_grammar(tok, G.json_schema(schema, whitespace_flexible=True), (2,))
    assert jsb.check_instance(compiled, tok, {"n": 3})[0]
    assert not jsb.check_instance(compiled, tok, {"n": 7})[0]  # violates maximum
    assert not jsb.check_instance(compiled, tok, {})[0]  # missing required: never accepting
    assert not jsb.check_instance(compiled, tok, {"n": 1, "m": 2})[0]


def test_metrics_and_validation():
    ok, _ = jsb.validate_output('{"a": 1}', {"type": "object", "required": ["a"]})
    assert ok
    assert jsb.validate_output("{", {})[1].startswith("not JSON")
    assert jsb.validate_output('{"a": "x"}', {"properties": {"a": {"type": "integer"}}})[1].startswith("invalid")
    run = lambda valid, complete=True, tokens=11: {  # noqa: E731
        "tokens": tokens, "seconds": 1.0, "decode_seconds": 0.5, "mask_seconds": 0.01, "valid": valid,
        "complete": complete, "error": None, "tight_steps": 0, "text": "x" if valid else "y"}
    row = lambda sub, dec, valid, complete=True: {  # noqa: E731
        "subset": sub, "declared": dec, "compile_seconds": 0.001,
        **({"constrained": run(valid, complete), "budgeted": run(True)} if dec else {}),
        "unconstrained": {**run(False), "decode_seconds": 0.4}}
    m = jsb.metrics([row("A", True, True), row("A", True, False, complete=False), row("A", False, False),
                     row("B", True, True)])
    assert m["A"]["declared_coverage"] == pytest.approx(2 / 3)
    assert m["A"]["constrained"]["empirical_coverage"] == pytest.approx(1 / 3)
    assert m["A"]["constrained"]["compliance"] == pytest.approx(1 / 2)
    assert m["A"]["constrained"]["compliance_of_completed"] == 1.0
    assert m["A"]["constrained"]["cut_by_budget"] == pytest.approx(1 / 2)
    assert m["A"]["compliance"] == 1.0 and m["A"]["budgeted"]["cut_by_budget"] == 0  # the budgeted runs lead
    assert m["A"]["budget_vs_unbudgeted"]["valid_budgeted_only"] == 1
    assert m["A"]["budget_vs_unbudgeted"]["identical_output"] == pytest.approx(1 / 2)
    assert m["all"]["schemas"] == 4
    # time per output token without the prefill: decode time over the steps after the first token
    assert m["all"]["tpot_unconstrained_ms"] == pytest.approx(1e3 * 0.4 / 10)
    assert m["all"]["budgeted"]["tpot_ratio"] == pytest.approx(0.5 / 0.4)


def test_validator_checks_formats_refuses_remote_refs_and_catches_everything():
    assert not jsb.validate_output('"not-an-ip"', {"format": "ipv4"})[0]  # formats asserted, as the benchmark does
    assert jsb.validate_output('"2001:db8::1"', {"format": "ipv6"})[0]
    assert not jsb.validate_output('"zz"', {"format": "uuid"})[0]
    ok, reason = jsb.validate_output('{"a": 1}', {"$ref": "https://example.invalid/schema.json"})
    assert not ok and "Unresolvable" in reason  # never fetched
    ok, reason = jsb.validate_output("1", {"type": "no-such-type"})
    assert not ok and reason.startswith("schema error")
    ok, reason = jsb.validate_output('"a"', {"pattern": "("})
    assert not ok


@pytest.mark.real_model
def test_constrained_outputs_validate_on_the_real_model(smollm):
    """Three benchmark schemas the default model completes within the budget: every output validates under Draft
    2020-12 (unconstrained, the model writes prose or echoes the schema)."""
    model, tok = smollm
    wanted = {"o10008", "calculate_area_82427f82", "o57789"}
    entries = [r for r in jsb.load_schemas() if r["id"] in wanted]
    assert len(entries) == 3
    res = jsb.run_generation(model, tok, entries, max_new_tokens=96, unconstrained=False, progress=False)
    for r in res["rows"]:
        assert r["declared"]
        assert r["constrained"]["complete"], r
        assert r["constrained"]["valid"], r
    assert res["metrics"]["all"]["compliance"] == 1.0
