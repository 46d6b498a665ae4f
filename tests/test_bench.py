"""Tests of the benchmark harness: prompt set, speed runner, quality metrics, plots, sampling-family runner."""

from __future__ import annotations

import json
import math
from collections import Counter
from types import SimpleNamespace

import pytest
import torch

from hf_decoding_ext.bench.prompts import CATEGORIES, load_prompts
from hf_decoding_ext.bench.quality import aggregate, answer_correct, continuation_surprise, sequence_metrics
from hf_decoding_ext.bench.run import run_family, run_quality, run_sampling_family, run_speed, select_prompts
from hf_decoding_ext.bench.speed import GREEDY_KWARGS, cut_at_eos, summarise

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _norm(s: str) -> str:
    return " ".join(str(s).split())


def _strict_json(path):
    def bad(c):
        raise ValueError(f"non-strict JSON constant {c}")

    with open(path) as f:
        return json.load(f, parse_constant=bad)


def _tiny_prompts(n=4, cats=("qa", "rag_qa")):
    return [{"id": f"p{i}", "category": cats[i % len(cats)], "input_ids": [5 + i, 9, 17 + i, 3, 40, 41, 9, 17 + i]}
            for i in range(n)]


# ------------------------------------------------------------------------------------------------- prompt set
def test_prompt_set_structure():
    prompts = load_prompts()
    assert len(prompts) >= 120
    counts = Counter(p["category"] for p in prompts)
    assert set(counts) == set(CATEGORIES) and len(CATEGORIES) == 6
    assert all(counts[c] >= 20 for c in CATEGORIES), counts
    ids = [p["id"] for p in prompts]
    assert len(set(ids)) == len(ids)
    docs = {}
    from importlib.resources import files

    with (files("hf_decoding_ext") / "data" / "stdlib_docs.jsonl").open() as f:
        for line in f:
            r = json.loads(line)
            docs.setdefault(r["source"], r["text"])
    for p in prompts:
        assert set(p) <= {"id", "category", "prompt", "answer", "source"} and {"id", "category", "prompt",
                                                                              "source"} <= set(p)
        assert p["source"]
        cat = p["category"]
        if cat == "multi_turn_chat":
            msgs = p["prompt"]
            assert isinstance(msgs, list) and all(set(m) == {"role", "content"} and m["content"] for m in msgs)
            assert all(m["role"] in ("system", "user", "assistant") for m in msgs)
            assert msgs[-1]["role"] == "user"
            assert sum(m["role"] == "user" for m in msgs) >= 2
        else:
            assert isinstance(p["prompt"], str) and p["prompt"].strip()
        if cat == "math_reasoning":
            assert isinstance(p["answer"], (int, float)) and not isinstance(p["answer"], bool)
        if cat == "rag_qa":
            assert isinstance(p["answer"], str) and p["answer"]
            assert _norm(p["answer"]) in _norm(p["prompt"])
        if cat in ("summarization", "rag_qa"):
            src = p["source"].removeprefix("stdlib_docs.jsonl:")
            assert p["source"].startswith("stdlib_docs.jsonl:") and src in docs
            assert docs[src].strip() in p["prompt"]
        if cat == "rag_qa":
            assert _norm(p["answer"]) in _norm(docs[src])
        if cat == "translation":
            langs = [lang for lang in ("English", "French", "German", "Spanish") if lang in p["prompt"]]
            assert "English" in langs and len(langs) == 2, p["id"]
        if cat not in ("math_reasoning", "rag_qa"):
            assert "answer" not in p


def test_load_prompts_filters():
    sel = load_prompts(categories=["qa", "translation"], per_category=3)
    assert [p["category"] for p in sel] == ["translation"] * 3 + ["qa"] * 3
    assert len(load_prompts("rag_qa")) >= 20
    with pytest.raises(ValueError, match="Unknown categories"):
        load_prompts(categories=["poetry"])
    with pytest.raises(ValueError):
        load_prompts(per_category=0)
    rows = _tiny_prompts(6)
    assert [p["id"] for p in select_prompts(rows, categories="qa", per_category=2)] == ["p0", "p2"]


@pytest.mark.real_model
def test_prompt_token_lengths():
    from transformers import AutoTokenizer

    from hf_decoding_ext.core.models import default_model_path, encode_prompts

    tokenizer = AutoTokenizer.from_pretrained(str(default_model_path()))  # the default model's tokenizer only
    lengths = {p["id"]: encode_prompts(tokenizer, p["prompt"])["input_ids"].shape[1] for p in load_prompts()}
    # prompt + 256 new tokens must stay well under the 2048-token context of SmolLM2
    assert max(lengths.values()) + 256 <= 1536, max(lengths.items(), key=lambda kv: kv[1])
    assert min(lengths.values()) >= 10


# ------------------------------------------------------------------------------------------------- speed
SPEED_FIELDS = {"n_prompts", "new_tokens", "wall_s", "tokens_per_s", "speed_ratio", "speed_ratio_mean_per_prompt",
                "forwards", "tokens_per_forward", "peak_mem_mb", "match_baseline_rate"}
ROW_FIELDS = {"prompt_id", "category", "method", "order", "wall_s", "new_tokens", "tokens_per_s", "forwards",
              "tokens_per_forward", "peak_mem_mb", "matches_baseline", "prompt_tokens"}


def test_speed_runner_tiny(tiny_llama, tmp_path):
    methods = {"greedy-repeat": dict(GREEDY_KWARGS), "prompt-lookup": {"prompt_lookup_num_tokens": 3}}
    res = run_speed(methods, tiny_llama, None, _tiny_prompts(3), max_new_tokens=8, warmup=1, out_dir=tmp_path,
                    tag="speed_test", progress=False)
    data = _strict_json(tmp_path / "speed_test.json")
    assert (tmp_path / "speed_test.png").read_bytes()[:8] == PNG_MAGIC
    for key in ("kind", "tag", "created", "model", "machine", "settings", "baseline", "methods", "rows"):
        assert key in data
    assert data["kind"] == "speed" and data["baseline"] == "greedy"
    assert {"torch", "transformers", "python", "platform", "cpu_count"} <= set(data["machine"])
    assert data["settings"]["max_new_tokens"] == 8 and data["settings"]["n_prompts"] == 3
    assert list(data["methods"]) == ["greedy", *methods]
    for name, m in data["methods"].items():
        assert SPEED_FIELDS <= set(m["overall"])
        assert set(m["per_category"]) == {"qa", "rag_qa"}
        assert all(SPEED_FIELDS <= set(f) for f in m["per_category"].values())
        assert m["overall"]["peak_mem_mb"] > 0
    assert len(data["rows"]) == 3 * 3 and all(ROW_FIELDS <= set(r) for r in data["rows"])
    # the order rotates: every entry is run first on some prompt
    assert {r["method"] for r in data["rows"] if r["order"] == 0} == set(data["methods"])

    greedy, repeat = data["methods"]["greedy"]["overall"], data["methods"]["greedy-repeat"]["overall"]
    assert greedy["speed_ratio"] == pytest.approx(1.0) and greedy["tokens_per_forward"] == 1.0
    assert repeat["tokens_per_forward"] == 1.0 and repeat["match_baseline_rate"] == 1.0
    assert repeat["new_tokens"] == greedy["new_tokens"] == 3 * 8
    # greedy against itself: the ratio is 1 up to timing noise (loose bounds: CI machines are shared)
    assert 1 / 3 < repeat["speed_ratio"] < 3
    assert 1 / 3 < repeat["speed_ratio_mean_per_prompt"] < 3
    # prompt lookup verifies several tokens per target forward; never more forwards than tokens
    pld = data["methods"]["prompt-lookup"]["overall"]
    assert 1.0 <= pld["tokens_per_forward"] and pld["forwards"] <= pld["new_tokens"]
    assert res["files"]["json"].endswith("speed_test.json")


def test_speed_runner_validation(tiny_llama):
    with pytest.raises(ValueError, match="baseline"):
        run_speed({"greedy": {}}, tiny_llama, None, _tiny_prompts(1), out_dir=None, progress=False)
    with pytest.raises(ValueError, match="max_new_tokens"):
        run_speed({"x": {"max_new_tokens": 4}}, tiny_llama, None, _tiny_prompts(1), max_new_tokens=4, warmup=0,
                  out_dir=None, progress=False)
    with pytest.raises(ValueError, match="tokenizer"):
        run_speed({"x": {}}, tiny_llama, None, [{"id": "a", "category": "qa", "prompt": "hi"}], out_dir=None,
                  progress=False)


def test_summarise_hand_computed():
    rows = []
    for pid, cat, (bt, bw), (mt, mw, mf) in [("a", "qa", (10, 1.0), (10, 0.5, 4)), ("b", "rag_qa", (20, 4.0),
                                                                                      (10, 1.0, 5))]:
        rows.append(dict(prompt_id=pid, category=cat, method="greedy", new_tokens=bt, wall_s=bw,
                         tokens_per_s=bt / bw, forwards=bt, peak_mem_mb=1.0, matches_baseline=True))
        rows.append(dict(prompt_id=pid, category=cat, method="m", new_tokens=mt, wall_s=mw, tokens_per_s=mt / mw,
                         forwards=mf, peak_mem_mb=2.0, matches_baseline=pid == "a"))
    s = summarise(rows)
    m = s["m"]["overall"]
    assert m["tokens_per_s"] == pytest.approx(20 / 1.5)
    assert m["speed_ratio"] == pytest.approx((20 / 1.5) / (30 / 5.0))  # ratio of totals (headline)
    assert m["speed_ratio_mean_per_prompt"] == pytest.approx((20 / 10 + 10 / 5) / 2)
    assert m["tokens_per_forward"] == pytest.approx(20 / 9)
    assert m["match_baseline_rate"] == 0.5 and m["peak_mem_mb"] == 2.0
    assert s["m"]["per_category"]["rag_qa"]["speed_ratio"] == pytest.approx(10 / 5)
    assert s["greedy"]["overall"]["tokens_per_forward"] == 1.0
    assert cut_at_eos([5, 2, 7], {2}) == [5, 2] and cut_at_eos([5, 2, 7], {2}, include_eos=False) == [5]


# ------------------------------------------------------------------------------------------------- quality
class _FixedDistModel(torch.nn.Module):
    """Every position predicts the same next-token distribution ``probs``."""

    def __init__(self, probs):
        super().__init__()
        self.w = torch.nn.Parameter(torch.zeros(1))
        self.logp = torch.tensor(probs, dtype=torch.float32).log()

    def forward(self, input_ids, attention_mask=None, **kw):
        b, n = input_ids.shape
        return SimpleNamespace(logits=self.logp.expand(b, n, -1).clone() + 7.0)  # shift: softmax is invariant


def test_quality_metrics_hand_computed():
    model = _FixedDistModel([0.5, 0.25, 0.125, 0.125])
    s = continuation_surprise(model, [3, 3], [0, 1, 2, 2])
    assert s.tolist() == pytest.approx([1.0, 2.0, 3.0, 3.0], abs=1e-5)
    m = sequence_metrics([0, 1, 2, 2], s)
    assert m["surprise_mean"] == pytest.approx(2.25, abs=1e-5)
    assert m["surprise_std"] == pytest.approx(math.sqrt(0.6875), abs=1e-5)
    assert m["perplexity"] == pytest.approx(2 ** 2.25, rel=1e-5)
    assert m["length"] == 4

    uniform = _FixedDistModel([1 / 8] * 8)
    su = continuation_surprise(uniform, [1], [1, 2, 1, 2, 1, 2])
    assert su.tolist() == pytest.approx([3.0] * 6, abs=1e-5)
    mu = sequence_metrics([1, 2, 1, 2, 1, 2], su)
    assert mu["perplexity"] == pytest.approx(8.0, rel=1e-5) and mu["surprise_std"] == pytest.approx(0.0, abs=1e-5)
    assert mu["rep_2"] == pytest.approx(1 - 2 / 5)
    assert mu["rep_3"] == pytest.approx(1 - 2 / 4)
    assert mu["rep_4"] == pytest.approx(1 - 2 / 3)

    rows = [dict(token_ids=[1, 2, 1, 2, 1, 2], surprises=[3.0] * 6, perplexity=8.0, ended_with_eos=True,
                 answer_correct=None),
            dict(token_ids=[3, 3, 3], surprises=[1.0, 1.0, 1.0], perplexity=2.0, ended_with_eos=False,
                 answer_correct=True)]
    agg = aggregate(rows)
    assert agg["surprise_mean"] == pytest.approx(21 / 9)  # pooled over the 9 tokens
    assert agg["surprise_std"] == pytest.approx(math.sqrt((6 * (3 - 21 / 9) ** 2 + 3 * (1 - 21 / 9) ** 2) / 9))
    assert agg["perplexity"] == pytest.approx(2 ** (21 / 9))
    assert agg["perplexity_mean_per_seq"] == pytest.approx(5.0)
    assert agg["distinct_1"] == pytest.approx(3 / 9)
    assert agg["distinct_2"] == pytest.approx(3 / 7)
    assert agg["distinct_3"] == pytest.approx(3 / 5)
    assert agg["rep_2"] == pytest.approx((0.6 + (1 - 1 / 2)) / 2)
    assert agg["length"] == pytest.approx(4.5) and agg["eos_rate"] == 0.5 and agg["answer_accuracy"] == 1.0


def test_answer_correct():
    assert answer_correct("math_reasoning", 60, "It ends at 10 pm, so 60 minutes after 9 pm... wait: 60.")
    assert answer_correct("math_reasoning", 1800, "Total: 1,800")
    assert not answer_correct("math_reasoning", 6, "The change is 14 dollars.")
    assert answer_correct("rag_qa", "the first mapping", "Writes go to The first\nmapping only.")
    assert not answer_correct("rag_qa", "zero", "It defaults to one.")
    assert answer_correct("qa", None, "anything") is None


def test_quality_runner_tiny(tiny_gpt2, tmp_path):
    res = run_quality({"top-k-sampling": {"do_sample": True, "top_k": 5}}, tiny_gpt2, None, _tiny_prompts(2),
                      max_new_tokens=6, out_dir=tmp_path, tag="quality_test", progress=False)
    data = _strict_json(tmp_path / "quality_test.json")
    assert (tmp_path / "quality_test.png").read_bytes()[:8] == PNG_MAGIC
    assert data["kind"] == "quality" and list(data["methods"]) == ["greedy", "ancestral", "top-k-sampling"]
    fields = {"n", "tokens", "surprise_mean", "surprise_std", "perplexity", "perplexity_mean_per_seq", "rep_2",
              "rep_3", "rep_4", "distinct_1", "distinct_2", "distinct_3", "length", "eos_rate", "answer_accuracy"}
    for m in data["methods"].values():
        assert fields <= set(m["overall"]) and set(m["per_category"]) == {"qa", "rag_qa"}
    assert len(data["rows"]) == 3 * 2
    # top-k (k=5) tokens are more probable under the model than pure ancestral samples, on average
    assert data["methods"]["top-k-sampling"]["overall"]["surprise_mean"] < math.log2(128)
    assert res["files"]["plot"].endswith("quality_test.png")


def test_run_sampling_family_registered(tiny_llama, tmp_path, monkeypatch):
    from hf_decoding_ext import registry

    spec = registry.MethodSpec(name="test-top-k", title="t", arxiv="0000.00000", family="sampling",
                               kind="processor", target="transformers:TopKLogitsWarper", lossless=False,
                               needs_training=False, status="experimental", do_sample=True, defaults={"top_k": 4})
    monkeypatch.setattr(registry, "METHODS", [spec])
    out = run_sampling_family(tiny_llama, None, _tiny_prompts(1), max_new_tokens=4, warmup=0, out_dir=tmp_path,
                              progress=False)
    assert out["methods"] == ["test-top-k"]
    for stem in ("sampling_quality", "sampling_speed"):
        assert (tmp_path / f"{stem}.png").read_bytes()[:8] == PNG_MAGIC
        data = _strict_json(tmp_path / f"{stem}.json")
        assert "test-top-k" in data["methods"]
    with pytest.raises(ValueError, match="Unknown parameter"):
        run_sampling_family(tiny_llama, None, _tiny_prompts(1), params={"test-top-k": {"nope": 1}}, out_dir=None)
    with pytest.raises(ValueError, match="Unknown sampling methods"):
        run_family("sampling", tiny_llama, None, _tiny_prompts(1), methods=["nope"], out_dir=None)
    # a family without registered methods still times greedy (and writes nothing here)
    res = run_family("no-such-family", tiny_llama, None, _tiny_prompts(1), max_new_tokens=2, warmup=0,
                     out_dir=None, progress=False)
    assert res["quality"] is None and list(res["speed"]["methods"]) == ["greedy"]


def test_repeat_last_token_reference_is_lossless(tiny_llama):
    from hf_decoding_ext.bench.references import RepeatLastTokenDrafter
    from hf_decoding_ext.speculative import SpeculativeDecoding

    x = torch.tensor([[5, 6, 7, 7, 7]])
    ref = tiny_llama.generate(x, max_new_tokens=20, do_sample=False)
    loop = SpeculativeDecoding(RepeatLastTokenDrafter())
    out = tiny_llama.generate(x, max_new_tokens=20, do_sample=False, custom_generate=loop)
    assert torch.equal(out, ref)
    assert all(s.draft_size == 1 for s in loop.last_stats)
    repeats = sum(int(out[0, i] == out[0, i - 1]) for i in range(x.shape[1], out.shape[1]))
    assert sum(s.accepted for s in loop.last_stats) <= repeats


def test_speed_protocol_repeats_same_kernel_baseline_and_warmup_outside(tiny_llama):
    """Issue 16's methodology: several interleaved passes with their spread, the ratio against greedy under the
    same kernels beside the one against stock greedy, warm-up prompts outside the measured set and persistent
    drafters reset after it."""
    from hf_decoding_ext.bench.speed import benchmark_speed
    from hf_decoding_ext.speculative import SpeculativeDecoding
    from hf_decoding_ext.speculative.drafters.token_recycling import TokenRecyclingDrafter

    loop = SpeculativeDecoding(TokenRecyclingDrafter(max_nodes=4))
    resets = []
    real_reset = loop.drafter.reset
    loop.drafter.reset = lambda: (resets.append(loop.drafter.adjacency is not None), real_reset())
    methods = {"greedy/fast-kernels": {"kernels": "auto", **GREEDY_KWARGS},
               "token-recycling": {"custom_generate": loop, "do_sample": False}}
    warm = [{"id": "w", "category": "qa", "input_ids": [7, 8, 9, 10, 11]}]
    res = benchmark_speed(tiny_llama, None, methods, _tiny_prompts(2), max_new_tokens=6, repeats=2,
                          warmup_prompts=warm, same_kernel="greedy/fast-kernels", progress=False,
                          track_memory=False)
    assert len(res["rows"]) == 2 * 2 * 3 and {r["rep"] for r in res["rows"]} == {0, 1}
    assert "w" not in {r["prompt_id"] for r in res["rows"]}
    assert resets == [True]  # reset once, after the warm-up had filled its adjacency matrix
    for name in ("greedy/fast-kernels", "token-recycling"):
        overall = res["methods"][name]["overall"]
        assert len(overall["speed_ratio_per_rep"]) == 2
        assert 0 < overall["speed_ratio_min"] <= overall["speed_ratio_max"]
        assert "speed_ratio_same_kernel" in overall and overall["match_baseline_rate"] == 1.0
    same = res["methods"]["greedy/fast-kernels"]["overall"]
    assert same["speed_ratio_same_kernel"] == pytest.approx(1.0)
    assert res["settings"]["repeats"] == 2 and res["settings"]["same_kernel_baseline"] == "greedy/fast-kernels"
    with pytest.raises(ValueError, match="same_kernel"):
        benchmark_speed(tiny_llama, None, methods, _tiny_prompts(1), same_kernel="nope", progress=False)
    with pytest.raises(ValueError, match="repeats"):
        benchmark_speed(tiny_llama, None, methods, _tiny_prompts(1), repeats=0, progress=False)
