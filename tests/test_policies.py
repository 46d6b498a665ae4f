"""Tree and draft-length policies of the speculative engine: the best-first builder against brute force, the node
budget from a verify-cost curve, transformers' draft-length schedules step by step, argument checks."""

from __future__ import annotations

import itertools
import json
import math
import random
from pathlib import Path

import pytest
import torch

from hf_decoding_ext.core.resources import data_path
from hf_decoding_ext.core.tree import choices_from_accuracies, normalize_choices
from hf_decoding_ext.speculative.policies import (
    ACCELERATOR_MAX_NODES,
    ConstantLength,
    HeuristicLength,
    NodeBudget,
    VerifyCostCurve,
    best_first_paths,
    best_first_tree,
    draft_length_policy,
    node_budget,
)


# ---------------------------------------------------------------------------------------------- synthetic trees
def _full_tree(branching: int, depth: int) -> list[tuple[int, ...]]:
    return [p for d in range(1, depth + 1) for p in itertools.product(range(branching), repeat=d)]


def _score_table(kind: str, branching: int, depth: int, rng: random.Random) -> dict[tuple[int, ...], float]:
    """Scores of every node of a full tree: ``product`` (path products of accuracies in (0, 1)), ``logprob`` (sums of
    log-probabilities) or ``free`` (arbitrary scores, may rise along a path)."""
    scores: dict[tuple[int, ...], float] = {(): 1.0 if kind == "product" else 0.0}
    for path in _full_tree(branching, depth):
        parent = scores[path[:-1]]
        if kind == "product":
            scores[path] = parent * rng.uniform(0.01, 0.99)
        elif kind == "logprob":
            scores[path] = parent + math.log(rng.uniform(0.01, 0.99))
        else:
            scores[path] = rng.uniform(-1.0, 1.0)
    return scores


def _expand_from(scores, branching):
    def expand(path, score):
        assert score == scores[path]  # the builder hands back the parent's own score
        return [(i, scores[path + (i,)]) for i in range(branching) if path + (i,) in scores]
    return expand


def _prefix_closed(paths) -> bool:
    present = set(paths)
    return all(len(p) == 1 or p[:-1] in present for p in paths)


@pytest.mark.parametrize("kind", ["product", "logprob"])
def test_best_first_spends_the_budget_on_the_top_scored_nodes(kind):
    rng = random.Random(0)
    for branching, depth in ((2, 3), (3, 2), (2, 4), (4, 2)):
        scores = _score_table(kind, branching, depth, rng)
        nodes = [p for p in scores if p]
        ranked = sorted(nodes, key=lambda p: -scores[p])
        for budget in range(len(nodes) + 3):
            picked = best_first_paths(_expand_from(scores, branching), budget,
                                      root_score=1.0 if kind == "product" else 0.0)
            assert len(picked) == min(budget, len(nodes)) and len(set(picked)) == len(picked)
            assert set(picked) == set(ranked[:budget])  # exactly the top-scored nodes
            assert [scores[p] for p in picked] == sorted((scores[p] for p in picked), reverse=True)
            assert _prefix_closed(picked)


def test_best_first_maximises_the_total_score_over_prefix_closed_subtrees():
    """Brute force over every prefix-closed subset of the budget's size (small trees): none scores more."""
    rng = random.Random(1)
    for kind in ("product", "logprob"):
        for branching, depth in ((2, 3), (3, 2)):
            scores = _score_table(kind, branching, depth, rng)
            nodes = [p for p in scores if p]
            for budget in range(1, 7):
                picked = best_first_paths(_expand_from(scores, branching), budget,
                                          root_score=scores[()])
                best = max(sum(scores[p] for p in subset) for subset in itertools.combinations(nodes, budget)
                           if _prefix_closed(subset))
                assert math.isclose(sum(scores[p] for p in picked), best, rel_tol=1e-12, abs_tol=1e-12)


def test_best_first_with_rising_scores_is_a_greedy_frontier_walk():
    """Scores that may rise along a path: each pick is the best node of the frontier at that moment."""
    rng = random.Random(2)
    scores = _score_table("free", 3, 3, rng)
    picked = best_first_paths(_expand_from(scores, 3), 12, root_score=0.0)
    assert len(picked) == 12 and _prefix_closed(picked)
    chosen: set[tuple[int, ...]] = set()
    for path in picked:
        frontier = [p for p in scores if p and p not in chosen and (len(p) == 1 or p[:-1] in chosen)]
        assert scores[path] == max(scores[p] for p in frontier)
        chosen.add(path)


def test_best_first_respects_max_depth_and_breaks_ties_by_path():
    scores = _score_table("product", 3, 4, random.Random(3))
    picked = best_first_paths(_expand_from(scores, 3), 30, max_depth=2)
    assert len(picked) == 12 and max(len(p) for p in picked) == 2  # the whole tree down to depth 2
    flat = best_first_paths(lambda path, s: [(i, 1.0) for i in (2, 0, 1)] if len(path) < 2 else [], 5)
    assert flat == [(0,), (0, 0), (0, 1), (0, 2), (1,)]


def _brute_force_choices(accuracies, num_nodes, max_depth=None):
    """Every rank path's product of accuracies; the ``num_nodes`` best, ties to the smaller path."""
    depth = len(accuracies) if max_depth is None else min(max_depth, len(accuracies))
    values = {}
    for d in range(1, depth + 1):
        for path in itertools.product(*(range(len(accuracies[i])) for i in range(d))):
            value = 1.0
            for i, rank in enumerate(path):
                value = value * float(accuracies[i][rank])
            values[path] = value
    return normalize_choices(sorted(values, key=lambda p: (-values[p], p))[:num_nodes])


def test_choices_from_accuracies_equal_the_best_first_tree_and_brute_force():
    rng = random.Random(4)
    configs = [json.loads(p.read_text()) for p in sorted(data_path("heads").glob("*/config.json"))]
    tables = [c["head_accuracies"] for c in configs if "head_accuracies" in c]  # the draft heads (not the exit head)
    assert len(tables) >= 4
    tables = [[row[:4] for row in table[:3]] for table in tables]  # keep brute force small
    tables += [[[rng.choice([0.5, 0.25, 0.1, rng.random()]) for _ in range(rng.randint(1, 3))]
                for _ in range(rng.randint(1, 3))] for _ in range(40)]  # includes ties
    for acc in tables:
        def expand(path, score, acc=acc):
            return [(i, score * float(a)) for i, a in enumerate(acc[len(path)])] if len(path) < len(acc) else []

        for n in range(1, 12):
            for max_depth in (None, 1, 2):
                expected = _brute_force_choices(acc, n, max_depth)
                assert choices_from_accuracies(acc, n, max_depth) == expected, (acc, n, max_depth)
                assert normalize_choices(best_first_paths(expand, n, max_depth=max_depth)) == expected


def test_best_first_tree_builds_a_draft_tree_in_pick_order():
    logp = {(): {5: math.log(0.6), 6: math.log(0.25), 9: math.log(0.15)},
            (5,): {7: math.log(0.5), 8: math.log(0.4)}, (6,): {7: math.log(0.9)}}
    tree = best_first_tree(lambda path, s: [(t, s + lp) for t, lp in logp.get(path, {}).items()], budget=4)
    # path probabilities: 5: .6, 5->7: .3, 6: .25, 5->8: .24, 6->7: .225, 9: .15
    assert tree.tokens.tolist() == [5, 7, 6, 8] and tree.parents.tolist() == [-1, 0, -1, 0]
    assert best_first_tree(lambda path, s: [], budget=3).tokens.numel() == 0


# ---------------------------------------------------------------------------------------------- node budget
CURVE = VerifyCostCurve((1, 2, 4, 8, 16), (1.0, 0.6, 0.8, 1.2, 2.4))


def test_cost_curve_interpolates_and_stays_in_its_measured_range():
    assert CURVE(1) == 1.0 and CURVE(2) == 0.6 and CURVE(3) == pytest.approx(0.7) and CURVE(6) == pytest.approx(1.0)
    assert CURVE(12) == pytest.approx(1.8) and CURVE.max_tokens == 16
    for bad in (0, 17):
        with pytest.raises(ValueError, match=str(bad)):
            CURVE(bad)


def test_node_budget_follows_the_documented_rules_on_a_synthetic_curve():
    # without gains: the largest n whose forward over n + 1 tokens costs <= max_cost
    for max_cost in (0.5, 0.6, 0.8, 1.0, 1.1, 2.0, 3.0):
        expected = max([n for n in range(CURVE.max_tokens) if CURVE(n + 1) <= max_cost], default=0)
        assert node_budget(CURVE, max_cost=max_cost) == expected
    assert node_budget(CURVE) == 5 and node_budget(CURVE, max_cost=3.0) == 15 and node_budget(CURVE, max_cost=0.5) == 0
    assert node_budget(CURVE, max_cost=3.0, max_nodes=4) == 4
    # with gains: the n maximising (1 + expected accepted) / cost
    rng = random.Random(5)
    for _ in range(50):
        gains = sorted((rng.random() ** 2 for _ in range(rng.randint(0, 20))), reverse=True)
        rates = [(1 + sum(gains[:n])) / CURVE(n + 1) for n in range(min(len(gains), 15) + 1)]
        assert node_budget(CURVE, gains) == rates.index(max(rates))
    assert node_budget(CURVE, [0.9, 0.8, 0.7, 0.6, 0.5]) == 5  # (1 + 3.5) / 1.0 beats (1 + 1.7) / 0.6 = 4.5
    assert node_budget(CURVE, [0.1, 0.01]) == 1  # 1.1 / 0.6


def test_packaged_curve_is_the_measured_one_and_gives_the_documented_cpu_budget():
    curve = VerifyCostCurve.packaged()
    results = Path(__file__).resolve().parents[1] / "results" / "verify_cost.json"
    if results.exists():
        rows = json.loads(results.read_text())["cost"]
        assert curve.tokens == tuple(r["tokens"] for r in rows)
        assert curve.cost == tuple(r["weight_left_ratio"] for r in rows)
        assert VerifyCostCurve.packaged("pytorch").cost == tuple(r["pytorch_ratio"] for r in rows)
    assert "results/verify_cost.json" in curve.source
    n = node_budget(curve)
    assert curve(n + 1) <= 1.0 < curve(n + 2)
    cpu, gpu = torch.device("cpu"), torch.device("cuda")
    assert NodeBudget("auto").resolve(cpu) == n == 5
    assert NodeBudget("auto", cpu=3).resolve(cpu) == 3
    assert NodeBudget("auto", cpu=3).resolve(gpu) == ACCELERATOR_MAX_NODES
    assert NodeBudget("auto", accelerator=None).resolve("cuda:0") is None
    assert NodeBudget(7).resolve(cpu) == NodeBudget(7).resolve(gpu) == 7 and NodeBudget(None).resolve(cpu) is None
    assert NodeBudget("auto", curve=CURVE).resolve(cpu) == 5
    assert NodeBudget("auto", curve=CURVE).resolve(cpu, gains=[0.1]) == 1
    assert NodeBudget("auto", curve=CURVE, max_cost=0.5).resolve(cpu) == 1  # raised to at least one node


def test_merged_drafter_auto_cap_uses_the_packaged_curve(tiny_llama):
    from hf_decoding_ext.speculative import SpeculativeDecoding
    from hf_decoding_ext.speculative.drafters.merged import MergedDrafter
    from hf_decoding_ext.speculative.drafters.prompt_lookup import PromptLookupDrafter

    drafter = MergedDrafter([PromptLookupDrafter(num_tokens=8), PromptLookupDrafter(num_tokens=8, match="first")],
                            max_nodes="auto")
    loop = SpeculativeDecoding(drafter)
    ids = torch.tensor([[3, 4, 5, 6, 7, 8, 9, 10, 11, 3, 4, 5, 6, 7, 8, 9, 10, 11, 3, 4]])
    ref = tiny_llama.generate(ids, max_new_tokens=20, do_sample=False)
    assert torch.equal(tiny_llama.generate(ids, max_new_tokens=20, do_sample=False, custom_generate=loop), ref)
    sizes = [s.draft_size for s in loop.last_stats]
    assert max(sizes) == node_budget(VerifyCostCurve.packaged()) == 5, sizes


# ---------------------------------------------------------------------------------------------- draft length
def _transformers_heuristic(num_tokens: int, transient: bool):
    """transformers' own AssistedCandidateGenerator, bypassing its model set-up, to call its
    ``update_candidate_strategy``."""
    from transformers import GenerationConfig
    from transformers.generation.candidate_generator import AssistedCandidateGenerator

    gen = AssistedCandidateGenerator.__new__(AssistedCandidateGenerator)
    gen.assistant_generation_config = GenerationConfig(
        num_assistant_tokens=num_tokens, assistant_confidence_threshold=0.0,
        num_assistant_tokens_schedule="heuristic_transient" if transient else "heuristic")
    gen.num_assistant_tokens = num_tokens
    return gen


@pytest.mark.parametrize("schedule", ["heuristic", "heuristic_transient"])
def test_heuristic_schedule_follows_transformers_step_by_step(schedule):
    rng = random.Random(6)
    ours = draft_length_policy(schedule, 5)
    theirs = _transformers_heuristic(5, schedule == "heuristic_transient")
    ours.begin()
    ids = torch.zeros(1, 4, dtype=torch.long)
    lengths = []
    for _ in range(200):
        # a draft may stop early (confidence threshold) or be empty (no room left); about a third fully accepted
        drafted = 0 if rng.random() < 0.05 else rng.randint(1, ours.length())
        accepted = drafted if rng.random() < 0.35 else rng.randint(0, max(0, drafted - 1))
        ours.update(drafted, accepted)
        theirs.update_candidate_strategy(ids, torch.zeros(1, drafted + 1, 8), accepted)
        assert ours.length() == theirs.num_assistant_tokens
        lengths.append(ours.length())
    assert min(lengths) == 1 and max(lengths) > 7  # both directions and the floor were exercised
    carried = ours.length()
    ours.begin()  # the next generate() call
    assert ours.length() == (5 if schedule == "heuristic_transient" else carried)


def test_heuristic_rule_by_hand_and_constant_schedule():
    policy = HeuristicLength(3)
    steps = [((3, 3), 5), ((5, 2), 4), ((4, 0), 3), ((0, 0), 5), ((1, 0), 4), ((4, 3), 3), ((3, 0), 2), ((2, 1), 1),
             ((1, 0), 1), ((1, 1), 3)]
    for (drafted, accepted), length in steps:
        policy.update(drafted, accepted)
        assert policy.length() == length
    constant = ConstantLength(4, confidence_threshold=0.4)
    constant.begin()
    for drafted, accepted in ((4, 4), (4, 0), (0, 0), (2, 1)):
        constant.update(drafted, accepted)
        assert constant.length() == 4
    assert constant.stop(0.39) and not constant.stop(0.4) and not ConstantLength(4).stop(0.0)
    assert isinstance(draft_length_policy("constant", 2), ConstantLength)
    assert draft_length_policy("heuristic_transient", 2, 0.3).confidence_threshold == 0.3


# ---------------------------------------------------------------------------------------------- invalid arguments
def test_invalid_arguments_raise_value_errors():
    expand = _expand_from(_score_table("product", 2, 2, random.Random(7)), 2)
    for bad in (-1, 1.5, True, "3"):
        with pytest.raises(ValueError, match="budget"):
            best_first_paths(expand, bad)
    for bad in (0, -2, 1.0):
        with pytest.raises(ValueError, match="max_depth"):
            best_first_paths(expand, 3, max_depth=bad)
    with pytest.raises(ValueError, match="NaN"):
        best_first_paths(lambda path, s: [(0, float("nan"))], 1)
    with pytest.raises(ValueError, match="two children"):
        best_first_paths(lambda path, s: [(4, 0.5), (4, 0.2)], 1)
    for tokens, cost in (((), ()), ((1, 2), (1.0,)), ((2, 1), (1.0, 1.0)), ((0, 1), (1.0, 1.0)), ((1,), (0.0,)),
                         ((1,), (float("inf"),))):
        with pytest.raises(ValueError):
            VerifyCostCurve(tokens, cost)
    with pytest.raises(ValueError, match="bogus"):
        VerifyCostCurve.packaged("bogus")
    with pytest.raises(ValueError, match="max_cost"):
        node_budget(CURVE, max_cost=0)
    with pytest.raises(ValueError, match="gains"):
        node_budget(CURVE, [0.5, -0.1])
    with pytest.raises(ValueError, match="max_nodes"):
        node_budget(CURVE, max_nodes=-1)
    for bad in (0, -3, "big", True, 2.0):
        with pytest.raises(ValueError, match="max_nodes"):
            NodeBudget(bad)
    with pytest.raises(ValueError, match="cpu"):
        NodeBudget("auto", cpu=0)
    with pytest.raises(ValueError, match="accelerator"):
        NodeBudget("auto", accelerator=-1)
    with pytest.raises(ValueError, match="fast"):
        draft_length_policy("fast", 3)
    for bad in (0, -1, 2.5, True):
        with pytest.raises(ValueError, match="num_tokens"):
            ConstantLength(bad)
    for bad in (-0.1, 1.0):
        with pytest.raises(ValueError, match="confidence_threshold"):
            HeuristicLength(3, confidence_threshold=bad)
    for drafted, accepted in ((2, 3), (-1, 0), (2, -1)):
        with pytest.raises(ValueError, match="num_accepted"):
            HeuristicLength(3).update(drafted, accepted)
