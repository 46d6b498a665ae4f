"""Verification schemes on the real model with the shipped distilled draft (Direct Alignment, arXiv 2403.00858).

- greedy token identity with plain greedy ``generate()`` for every lossless method of the issue over 20 prompts x
  64 tokens (``slow``; the default run covers 12 prompts x 32 tokens in ``test_speculative_lossless.py``);
- each paper's acceptance property at T=1, in tokens per target forward (accepted draft tokens + the bonus token,
  per verification): SpecTr's K-SEQ, MCSD and RSD (C and S) above single-draft speculative sampling, DySpec above a
  fixed tree with the same node budget.
"""

from __future__ import annotations

import pytest
import torch

from hf_decoding_ext.bench.prompts import interleaved_prompts
from hf_decoding_ext.bench.speed import encode_prompt
from hf_decoding_ext.registry import METHODS
from hf_decoding_ext.speculative import SpeculativeDecoding
from hf_decoding_ext.speculative.drafters.draft_model import DraftModelDrafter, DraftModelTreeDrafter
from hf_decoding_ext.speculative.drafters.dyspec import DySpecDrafter
from hf_decoding_ext.speculative.drafters.mcsd import MCSDDrafter
from hf_decoding_ext.speculative.drafters.rsd import RSDDrafter
from hf_decoding_ext.speculative.drafters.spectr import SpecTrDrafter

pytestmark = pytest.mark.real_model

ISSUE_3_METHODS = ("prompt-lookup", "token-recycling", "auto-speculative", "lookahead", "jacobi")  # training-free I
ISSUE_18_METHODS = ("draft-model", "direct-alignment", "spectr", "mcsd", "rsd", "dyspec", "staged-speculative",
                    "pearl", "specdec-pp")
ISSUE_19_METHODS = ("speculative-jacobi", "stand", "dresd", "aded", "rasd", "specextend")  # lossless drafters II
ISSUE_20_METHODS = ("swift", "clasp", "del", "eesd", "sparse-to-dense")  # lossless self-speculation
TRAINED_HEADS = tuple(m.name for m in METHODS if m.family == "trained-heads" and m.lossless)  # issues 6 and 23


@pytest.fixture(scope="module")
def draft(smollm):
    model, _ = smollm
    return DraftModelDrafter.load_assistant(model, "distilled")


@pytest.mark.slow
@pytest.mark.parametrize("name", ISSUE_3_METHODS + ISSUE_18_METHODS + ISSUE_19_METHODS + ISSUE_20_METHODS
                         + TRAINED_HEADS)
def test_greedy_token_identity_20_prompts_x_64_tokens_real_model(name, smollm):
    """The issues' greedy check: every lossless training-free drafter (issues 3 and 19), every method of the
    verification issue (with the distilled draft) and every lossless self-speculative drafter (issue 20), as the
    registry builds them, token-identical to plain greedy over 20 prompts x 64 tokens, up to floating-point
    near-ties (tallied as in ``test_speculative_lossless.py``, whose default-run version covers 12 prompts x 32
    tokens; the self-speculative drafters' default-run checks are in their own test files)."""
    from hf_decoding_ext.bench.parity import greedy_parity, greedy_references, near_tie_tally
    from hf_decoding_ext.plug import generate_kwargs
    from hf_decoding_ext.registry import get_method

    model, tokenizer = smollm
    refs = greedy_references(model, tokenizer, interleaved_prompts(20), 64)
    kwargs = generate_kwargs(get_method(name), model=model, tokenizer=tokenizer)
    kwargs["do_sample"] = False
    r = greedy_parity(model, kwargs, refs, 64)
    assert near_tie_tally(model, refs, r.diverged) == len(r.mismatches), (name, r.mismatches)
    assert r.accepted > 0 and r.tokens / r.forwards > 1.0, (name, r.tokens, r.forwards)


def _tokens_per_forward(smollm, make, acceptance, n_prompts=4, n_tokens=64, seed=0) -> float:
    model, tokenizer = smollm
    tokens = steps = 0
    for i, row in enumerate(interleaved_prompts(n_prompts)):
        enc = encode_prompt(row, tokenizer)
        loop = SpeculativeDecoding(make(), acceptance=acceptance)
        torch.manual_seed(seed + i)
        model.generate(**enc, max_new_tokens=n_tokens, do_sample=True, top_k=0, top_p=1.0, temperature=1.0,
                       custom_generate=loop)
        s = loop.summary()
        tokens += s["tokens"]
        steps += s["steps"]
    return tokens / steps


def _multi_draft_figures(smollm, draft, schemes) -> dict[str, float]:
    single = _tokens_per_forward(smollm, lambda: DraftModelDrafter(draft, num_tokens=4, confidence_threshold=0.0),
                                 "speculative")
    figures = {"single": single}
    for name, make, rule in schemes:
        figures[name] = _tokens_per_forward(smollm, make, rule)
    print("tokens per target forward at T=1:", {k: round(v, 3) for k, v in figures.items()})
    return figures


@pytest.mark.slow
def test_multi_draft_accepts_more_than_single_draft_at_t1_real_model(smollm, draft):
    """SpecTr (4 i.i.d. drafts of 4 tokens), MCSD (4, 2, 2) and RSD-C ((2, 2, 2)) accept more tokens per target
    forward than single-draft speculative sampling with 4-token drafts (the papers' claim); RSD-S: the test below.
    In the slow run (152 s) to keep the default run under 30 minutes; the default run checks the three schemes'
    exact output distributions on tiny models (``test_spectr.py`` and the verification tests)."""
    figures = _multi_draft_figures(smollm, draft, (
        ("spectr", lambda: SpecTrDrafter(draft, num_drafts=4, num_tokens=4), "spectr"),
        ("mcsd", lambda: MCSDDrafter(draft), "speculative"),
        ("rsd-c", lambda: RSDDrafter(draft), "speculative")))
    assert all(figures[k] > figures["single"] for k in figures if k != "single"), figures


@pytest.mark.slow
def test_rsd_s_accepts_more_than_single_draft_at_t1_real_model(smollm, draft):
    """RSD-S (beam 4, depth 3) accepts more tokens per target forward than single-draft speculative sampling with
    4-token drafts (the paper's claim); in the slow run to keep the default run short."""
    figures = _multi_draft_figures(smollm, draft, (
        ("rsd-s", lambda: RSDDrafter(draft, variant="S"), "speculative"),))
    assert all(figures[k] > figures["single"] for k in figures if k != "single"), figures


def test_dyspec_beats_a_fixed_tree_at_the_same_budget_real_model(smollm, draft):
    """DySpec's best-first tree of 8 nodes accepts more per target forward than a fixed 8-node tree (two chains of
    four), at T=1, over 4 prompts x 32 tokens (measured 1.29 against 1.21; 1.31 against 1.24 at 64 tokens, and
    DySpec ahead at every length from 24 to 64 tokens on these seeds)."""
    dyspec = _tokens_per_forward(smollm, lambda: DySpecDrafter(draft, num_nodes=8, max_depth=6), "speculative",
                                 n_tokens=32)
    fixed = _tokens_per_forward(smollm, lambda: DraftModelTreeDrafter(draft, branching=(2, 1, 1, 1)), "speculative",
                                n_tokens=32)
    print(f"tokens per target forward at T=1: DySpec {dyspec:.3f}, fixed tree {fixed:.3f}")
    assert dyspec > fixed, (dyspec, fixed)
