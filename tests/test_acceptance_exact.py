"""Exact tests of tree speculative sampling against enumerated target distributions, with negative controls.

Every random draw of an acceptance rule goes through ``draw_bernoulli`` and ``draw_token``; replaying the draws from
a script, and branching on every outcome, enumerates the rule's accept/reject paths with their exact probabilities.
Summing over every draft tree a drafter can propose (weighted by its probability) gives the exact distribution of
the tokens one engine step emits; continued by the target to a common length it must equal the target's own
sequence distribution, within 1e-6 (float32 softmax and residual arithmetic).

The synthetic target gives every tree node its own next-token distribution (a function of the whole path), and the
drafter samples from a distribution ``q`` close to the target's (its logits plus noise), so drafts are correlated
with the target and most of them are accepted, as in real use. Mutated rules (small subclasses below: bonus from
the un-updated target, residual not updated between siblings, siblings drawn without replacement treated as i.i.d.)
must fail the same test.
"""

from __future__ import annotations

import functools
import itertools

import pytest
import torch

from hf_decoding_ext.core.tree import DraftTree
from hf_decoding_ext.speculative.acceptance import SpeculativeSamplingAcceptance, target_probs

VOCAB = 4
TOLERANCE = 1e-6
# tree shapes (parents): depth 3 with two sibling groups; three siblings at the root (two earlier siblings removed
# for the last one when drawn without replacement)
SHAPES = {"2-2-1": [-1, -1, 0, 0, 2], "3-2": [-1, -1, -1, 0, 0]}


# ------------------------------------------------------------------------------------------------ synthetic models
def _logits(path: tuple, salt: int) -> torch.Tensor:
    seed = salt + sum((t + 1) * (VOCAB + 1) ** i for i, t in enumerate(path))
    return 2.5 * torch.randn(VOCAB, generator=torch.Generator().manual_seed(seed))


@functools.cache
def target_scores(path: tuple) -> torch.Tensor:
    """The target's next-token scores after ``path``: a different distribution at every node."""
    return _logits(path, 0)


@functools.cache
def target_p(path: tuple) -> tuple[float, ...]:
    """The target's probabilities after ``path``, exactly as the rule computes them from the scores."""
    return tuple(target_probs(target_scores(path)).double().tolist())


@functools.cache
def draft_q(path: tuple) -> torch.Tensor:
    """The drafter's distribution after ``path``: close to the target's (its logits plus noise), rounded to
    multiples of 2**-20 summing to exactly 1, so that float32 (the rule) and float64 (the enumeration) agree."""
    q = torch.softmax(target_scores(path) + 0.25 * _logits(path, 10 ** 6), -1).double()
    q = torch.round(q * 2 ** 20)
    q[q.argmax()] += 2 ** 20 - q.sum()
    return (q / 2 ** 20).float()


def target_sequences(length: int) -> dict[tuple, float]:
    out = {}
    for seq in itertools.product(range(VOCAB), repeat=length):
        prob = 1.0
        for i, t in enumerate(seq):
            prob *= target_p(seq[:i])[t]
        out[seq] = prob
    return out


# ------------------------------------------------------------------------------------------------ drafts
def sampled_trees(parents: list[int], scheme: str):
    """Every draft of shape ``parents`` a drafter sampling from ``draft_q`` can propose, with its probability:
    siblings i.i.d. (``"iid"``) or without replacement (``"without_replacement"``); each node's ``draft_probs`` row
    is ``q`` at its parent, before any removal (the :class:`DraftTree` convention)."""

    def extend(tokens: list[int], weight: float):
        i = len(tokens)
        if i == len(parents):
            paths = _paths(parents, tokens)
            rows = torch.stack([draft_q(paths[p]) for p in parents])
            yield DraftTree(torch.tensor(tokens), parents, rows, scheme), weight
            return
        q = draft_q(_paths(parents, tokens)[parents[i]]).double().tolist()
        earlier = [tokens[j] for j in range(i) if parents[j] == parents[i]]
        for t in range(VOCAB):
            if scheme == "iid":
                w = q[t]
            elif t in earlier:
                continue
            else:
                w = q[t] / (1.0 - sum(q[e] for e in earlier))
            yield from extend(tokens + [t], weight * w)

    yield from extend([], 1.0)


def _paths(parents, tokens) -> dict[int, tuple]:
    """Node -> token path from the root (``-1``: the empty path), for the nodes already chosen."""
    paths = {-1: ()}
    for i, t in enumerate(tokens):
        paths[i] = paths[parents[i]] + (t,)
    return paths


# ------------------------------------------------------------------------------------------------ enumeration
class _Branch(Exception):
    def __init__(self, options):
        self.options = options


class _ScriptedDraws:
    """Mixin: random draws replay ``self.script``; a draw past its end raises its possible outcomes."""

    script: list

    def _next(self, options):
        if self.script:
            return self.script.pop(0)
        raise _Branch(options)

    def draw_bernoulli(self, prob, generator=None):
        prob = min(max(float(prob), 0.0), 1.0)
        return self._next([(True, prob), (False, 1.0 - prob)])

    def draw_token(self, probs, generator=None):
        return self._next([(t, p) for t, p in enumerate(probs.double().tolist()) if p > 0])


@functools.cache
def _scripted_class(cls):
    return type(f"Scripted{cls.__name__}", (_ScriptedDraws, cls), {})


def _scripted(rule, script):
    scripted = _scripted_class(type(rule)).__new__(_scripted_class(type(rule)))
    scripted.__dict__.update(rule.__dict__)
    scripted.script = list(script)
    return scripted


def step_distribution(rule, tree: DraftTree) -> dict[tuple, float]:
    """Exact distribution of the tokens one step emits (accepted draft tokens, then the bonus) for ``tree``."""
    paths = _paths(tree.parents.tolist(), tree.tokens.tolist())

    def scores_at(node):
        return target_scores(paths[node])

    out: dict[tuple, float] = {}
    stack = [((), 1.0)]
    while stack:
        script, prob = stack.pop()
        try:
            accepted, bonus = _scripted(rule, script).accept(tree, scores_at)
        except _Branch as branch:
            stack.extend((script + (value,), prob * p) for value, p in branch.options if p > 0)
            continue
        key = tuple(int(tree.tokens[i]) for i in accepted) + (bonus,)
        out[key] = out.get(key, 0.0) + prob
    return out


def complete(emitted: dict[tuple, float], length: int) -> dict[tuple, float]:
    """Sequence distribution of ``length`` tokens: one step's tokens, continued by the target (later steps)."""
    out: dict[tuple, float] = {}
    for prefix, prob in emitted.items():
        for rest in itertools.product(range(VOCAB), repeat=max(0, length - len(prefix))):
            seq = (prefix + rest)[:length]
            p = prob
            for i in range(len(prefix), length):
                p *= target_p(seq[:i])[seq[i]]
            out[seq] = out.get(seq, 0.0) + p
    return out


def mixture_error(rule, parents: list[int], scheme: str) -> float:
    """Largest absolute error, over every sequence, of the rule's output distribution (every draft of the scheme,
    every accept/reject path) against the target's."""
    emitted: dict[tuple, float] = {}
    mass = 0.0
    for tree, weight in sampled_trees(parents, scheme):
        mass += weight
        for key, p in step_distribution(rule, tree).items():
            emitted[key] = emitted.get(key, 0.0) + weight * p
    assert abs(mass - 1.0) < 1e-9  # every draft enumerated once
    length = max(DraftTree(torch.zeros(len(parents), dtype=torch.long), parents).depth.tolist()) + 1
    got, want = complete(emitted, length), target_sequences(length)
    assert abs(sum(got.values()) - 1.0) < TOLERANCE
    return max(abs(got.get(s, 0.0) - p) for s, p in want.items())


# ------------------------------------------------------------------------------------------------ mutants
class BonusFromTarget(SpeculativeSamplingAcceptance):
    """Wrong: the bonus is drawn from the node's target distribution, not from the residual."""

    def bonus_distribution(self, residual, target):
        return target


class ResidualNotUpdated(SpeculativeSamplingAcceptance):
    """Wrong: after a rejected sibling the next one is tried against the same distribution."""

    def residual(self, p, q):
        return p


class WithoutReplacementAsIid(SpeculativeSamplingAcceptance):
    """Wrong for siblings drawn without replacement: divides by the draft row as if the siblings were i.i.d."""

    def draft_distribution(self, tree, child, earlier, p):
        return tree.draft_probs[child].to(p.device, torch.float32)


# ------------------------------------------------------------------------------------------------ tests
def test_the_synthetic_drafter_is_correlated_with_the_target():
    """The drafts are not uniform noise: over every node of depth <= 2, ``q`` is much closer to the target than the
    uniform distribution is (a one-token draft is accepted with probability ``1 - TV`` > 0.75 on average), yet
    never equal to it (so the residual matters); the target differs between nodes."""
    paths = [path for depth in range(3) for path in itertools.product(range(VOCAB), repeat=depth)]
    to_q, to_uniform = [], []
    for path in paths:
        p = torch.tensor(target_p(path))
        to_q.append(0.5 * float((p - draft_q(path).double()).abs().sum()))
        to_uniform.append(0.5 * float((p - 1.0 / VOCAB).abs().sum()))
    assert min(to_q) > 5e-3
    assert sum(to_q) / len(paths) < 0.25 and sum(to_q) < 0.5 * sum(to_uniform)
    assert len({target_p(path) for path in paths}) == len(paths)


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("scheme", ["iid", "without_replacement"])
def test_speculative_sampling_is_exact_on_sampled_trees(shape, scheme):
    """Siblings sampled from ``q`` i.i.d. or without replacement, depth up to 3: the emitted tokens (continued by
    the target) follow the target's sequence distribution exactly."""
    assert mixture_error(SpeculativeSamplingAcceptance(), SHAPES[shape], scheme) < TOLERANCE


@pytest.mark.parametrize("shape", SHAPES)
def test_speculative_sampling_is_exact_on_every_deterministic_tree(shape):
    """Deterministic drafts (one-hot ``q``), duplicate siblings included: exact for each tree on its own."""
    parents = SHAPES[shape]
    want = target_sequences(max(DraftTree(torch.zeros(len(parents), dtype=torch.long), parents).depth) + 1)
    length = len(next(iter(want)))
    for tokens in itertools.product(range(VOCAB), repeat=len(parents)):
        got = complete(step_distribution(SpeculativeSamplingAcceptance(), DraftTree(torch.tensor(tokens), parents)),
                       length)
        assert max(abs(got.get(s, 0.0) - p) for s, p in want.items()) < TOLERANCE, tokens


MUTANTS = [(BonusFromTarget, "iid"), (BonusFromTarget, "without_replacement"), (ResidualNotUpdated, "iid"),
           (ResidualNotUpdated, "without_replacement"), (WithoutReplacementAsIid, "without_replacement")]


@pytest.mark.parametrize("mutant,scheme", MUTANTS, ids=lambda v: getattr(v, "__name__", v))
def test_mutated_rules_fail_the_same_test(mutant, scheme):
    """Negative controls: each mutation of the rule misses the target distribution on the same drafts, by far more
    than the tolerance."""
    for shape in SHAPES.values():
        assert mixture_error(mutant(), shape, scheme) > 1e-3


def test_without_replacement_mutant_is_right_for_iid_siblings():
    """The without-replacement mutant differs from the rule only there: on i.i.d. siblings it is exact."""
    assert mixture_error(WithoutReplacementAsIid(), SHAPES["3-2"], "iid") < TOLERANCE
