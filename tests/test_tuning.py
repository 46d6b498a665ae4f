"""Tree sizes tuned by measurement (hf_decoding_ext.speculative.policies.tuning): acceptance gains counted from the
engine's per-step accepted nodes, the verify-cost curve measured on the running model and cached, and
``max_nodes="auto"`` resolved from both."""

from __future__ import annotations

import json

import pytest
import torch

from hf_decoding_ext.speculative import SpeculativeDecoding
from hf_decoding_ext.speculative.drafters.prompt_lookup import PromptLookupDrafter
from hf_decoding_ext.speculative.policies import tuning
from hf_decoding_ext.speculative.policies.tree_policy import NodeBudget, VerifyCostCurve, node_budget


@pytest.fixture
def fresh_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_DECODING_EXT_CACHE", str(tmp_path))
    monkeypatch.setattr(tuning, "_CURVES", {})
    monkeypatch.setattr(tuning, "_BY_MODEL", {})
    return tmp_path


def test_engine_records_accepted_nodes_and_gains_count_them(tiny_llama):
    prompt = torch.tensor([[5, 6, 7, 8, 5, 6, 7, 8, 5, 6, 7, 8, 5, 6]])
    loop = SpeculativeDecoding(PromptLookupDrafter(num_tokens=4), kernels="pytorch")
    tiny_llama.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=24, do_sample=False,
                        custom_generate=loop)
    stats = loop.last_stats
    assert all(len(s.accepted_nodes) == s.accepted for s in stats)
    assert all(all(i < s.draft_size for i in s.accepted_nodes) for s in stats)
    gains = tuning.acceptance_gains(stats)
    drafted = [s for s in stats if s.draft_size]
    assert len(gains) == max(s.draft_size for s in stats)
    assert gains[0] == pytest.approx(sum(0 in s.accepted_nodes for s in drafted) / len(drafted))
    # a chain: a node is accepted only if its parent is, so the gains never increase along the chain
    assert all(a >= b - 1e-12 for a, b in zip(gains, gains[1:]))


def test_device_curve_is_measured_once_and_cached(tiny_llama, fresh_cache, monkeypatch):
    calls = []
    real = tuning.measure_verify_cost

    def counting(*args, **kwargs):
        calls.append(1)
        return real(*args, **kwargs, sizes=(1, 2, 4, 8), reps=2, budget_s=0.5)

    monkeypatch.setattr(tuning, "measure_verify_cost", counting)
    curve = tuning.device_curve(tiny_llama)
    assert curve.tokens == (1, 2, 4, 8) and curve.cost[0] == pytest.approx(1.0)
    assert tuning.device_curve(tiny_llama) is curve and len(calls) == 1
    monkeypatch.setattr(tuning, "_CURVES", {})  # another process reads the file
    monkeypatch.setattr(tuning, "_BY_MODEL", {})
    again = tuning.device_curve(tiny_llama)
    assert len(calls) == 1 and again.cost == curve.cost
    (path,) = (fresh_cache / "verify_cost").glob("*.json")
    assert json.loads(path.read_text())["tokens"] == [1, 2, 4, 8]


def test_auto_budget_uses_measured_curve_and_gains(tiny_llama, monkeypatch):
    curve = VerifyCostCurve((1, 2, 4, 8, 16), (1.0, 1.05, 1.1, 1.6, 3.0))
    monkeypatch.setattr(tuning, "device_curve", lambda model, kernels="auto": curve)
    gains = [0.7, 0.5, 0.4, 0.3, 0.2, 0.1, 0.05, 0.01]
    budget = NodeBudget("auto", cpu=16, gains=gains)
    expected = node_budget(curve, gains)
    assert budget.resolve("cpu", model=tiny_llama) == expected == 4  # cost-aware, not the hand-set 16
    assert budget.resolve("cpu") == 16  # without the model: the fallback
    assert NodeBudget(5, gains=gains).resolve("cpu", model=tiny_llama) == 5  # an explicit size wins
    monkeypatch.setattr(tuning, "shipped_gains", lambda name: gains if name == "known" else None)
    assert NodeBudget("auto", cpu=16, gains="known").resolve("cpu", model=tiny_llama) == 4
    assert NodeBudget("auto", cpu=16, gains="unknown").resolve("cpu", model=tiny_llama) == 16
    with pytest.raises(ValueError, match="gains"):
        NodeBudget("auto", gains=[0.5, -1.0])


def test_feature_head_gains_are_its_best_first_path_values():
    from types import SimpleNamespace

    from hf_decoding_ext.core.tree import choices_from_accuracies
    from hf_decoding_ext.speculative.drafters.feature_head import FeatureHeadDrafter

    acc = [[0.6, 0.2, 0.1], [0.5, 0.2, 0.1], [0.4, 0.1, 0.05]]
    drafter = SimpleNamespace(head=SimpleNamespace(config=SimpleNamespace(head_accuracies=acc)), max_depth=3,
                              tree_choices=None)
    gains = FeatureHeadDrafter.expected_gains(drafter, max_nodes=6)
    assert gains[:3] == pytest.approx([0.6, 0.3, 0.2])  # (0,), (0,0), (1,)
    assert gains == sorted(gains, reverse=True)
    paths = choices_from_accuracies(acc, 6, max_depth=3)
    assert sum(gains) == pytest.approx(sum(
        torch.tensor([acc[d][r] for d, r in enumerate(p)]).prod().item() for p in paths))
