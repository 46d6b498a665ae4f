"""SpecDec++ (arXiv 2405.19715): the stopping rule's arithmetic and bounds, the drafter's acceptances (the head on the
drafted token's hidden state), greedy token identity and the target's exact distribution at T=1 (with a mutant that
drops the token its rule stopped on as the negative control), the head's save/load round trip and training pieces;
on the real model, the shipped head's held-out AUC and its rejected draft tokens against fixed draft lengths."""

from __future__ import annotations

import gzip
import json
from collections import Counter
from pathlib import Path

import pytest
import torch
from test_speculative_engine import _chi_square_pvalue, _exact_sequence_distribution, _peaky_tiny_llama

from hf_decoding_ext.core.models import truncated_model
from hf_decoding_ext.core.tree import DraftTree
from hf_decoding_ext.speculative import SpeculativeDecoding
from hf_decoding_ext.speculative.drafters.base import Draft
from hf_decoding_ext.speculative.drafters.specdec_pp import AcceptanceThresholdLength, SpecDecPPDrafter
from hf_decoding_ext.speculative.heads.specdec_pp import (
    AcceptancePredictionHead,
    SpecDecPPHeadConfig,
    acceptance_dataset,
    acceptance_labels,
    draft_features,
    evaluate_acceptance_head,
    soft_auc,
    train_acceptance_head,
    weighted_bce_loss,
)

ROOT = Path(__file__).resolve().parents[1]


def _head(hidden, seed=0, scale=4.0, num_layers=1):
    """A random head whose acceptances spread over (0, 1) (the output layer scaled up)."""
    torch.manual_seed(seed)
    head = AcceptancePredictionHead(SpecDecPPHeadConfig(hidden_size=hidden, num_layers=num_layers))
    with torch.no_grad():
        head.out.weight.mul_(scale)
    return head.eval()


def _record(drafter):
    drafts, states = [], []
    propose = drafter.propose

    def spy(state):
        d = propose(state)
        drafts.append(d)
        states.append(state.input_ids.clone())
        return d
    drafter.propose = spy
    return drafts, states


# ------------------------------------------------------------------------------------------------ stopping rule
def test_stopping_rule_arithmetic_and_bounds():
    rule = AcceptanceThresholdLength(threshold=0.5, min_tokens=1, max_tokens=10)
    rule.start()
    assert rule.stop(0.5) is False  # 1 - 0.5 = 0.5 is not > 0.5
    assert rule.stop(0.5) is True  # 1 - 0.25 > 0.5
    assert rule.rejection_probability == 0.75
    rule.start()  # a new draft starts from an empty product
    assert rule.rejection_probability == 0.0
    rule = AcceptanceThresholdLength(threshold=0.25, min_tokens=1, max_tokens=10)
    rule.start()
    assert [rule.stop(a) for a in (1.0, 0.75, 0.875)] == [False, False, True]  # 0, 0.25 (not > 0.25), 0.34375
    # K_min: no stop before min_tokens, whatever the product; K_max: stop at max_tokens even when all accepted
    rule = AcceptanceThresholdLength(threshold=0.3, min_tokens=3, max_tokens=5)
    rule.start()
    assert [rule.stop(a) for a in (0.0, 0.0, 0.0)] == [False, False, True]
    rule.start()
    assert [rule.stop(1.0) for _ in range(5)] == [False, False, False, False, True]
    # should_stop at an explicit length on the acceptances seen so far (the official loop's check)
    rule.start()
    assert rule.should_stop(1) is False and rule.should_stop(5) is True
    rule.observe(0.5)
    assert rule.should_stop(2) is False and rule.should_stop(3) is True
    assert AcceptanceThresholdLength().length() == 20
    for bad in ({"threshold": 1.5}, {"threshold": -0.1}, {"min_tokens": 0}, {"min_tokens": 3, "max_tokens": 2},
                {"max_tokens": 0}, {"threshold": True}):
        with pytest.raises(ValueError):
            AcceptanceThresholdLength(**bad)
    with pytest.raises(ValueError, match="probability"):
        AcceptanceThresholdLength().observe(1.5)


def test_drafter_argument_checks():
    with pytest.raises(ValueError, match="threshold"):
        SpecDecPPDrafter(threshold=2.0)
    with pytest.raises(ValueError, match="min_tokens"):
        SpecDecPPDrafter(min_tokens=5, max_tokens=4)
    with pytest.raises(ValueError, match="head"):
        SpecDecPPDrafter(head=3)
    with pytest.raises(ValueError, match="count_last"):
        SpecDecPPDrafter(count_last=1)
    with pytest.raises(ValueError, match="hidden_size"):
        SpecDecPPHeadConfig(hidden_size=0)
    with pytest.raises(ValueError, match="mixing_ratio"):
        SpecDecPPHeadConfig(mixing_ratio=1.0)


@pytest.mark.parametrize("count_last", [True, False], ids=["paper", "official-loop"])
def test_drafts_stop_exactly_where_the_rule_says(tiny_llama, count_last):
    """Each draft's length is the rule applied to its predicted acceptances, and those are the head on the draft's
    hidden state at each drafted token (recomputed here from a plain forward over committed + draft tokens)."""
    draft_model = truncated_model(tiny_llama, 1)
    head = _head(tiny_llama.config.hidden_size)
    h, kmin, kmax = 0.8, 2, 4
    drafter = SpecDecPPDrafter(draft_model, head=head, threshold=h, min_tokens=kmin, max_tokens=kmax,
                               count_last=count_last)
    drafts, states = _record(drafter)
    ids = torch.tensor([[5, 6, 7, 8, 9]])
    for do_sample in (False, True):
        torch.manual_seed(1)
        tiny_llama.generate(ids, max_new_tokens=40, do_sample=do_sample, top_k=0, pad_token_id=0,
                            custom_generate=SpeculativeDecoding(drafter))
    seen_stops = set()
    for d, committed in zip(drafts, states):
        toks = d.tree.tokens.tolist()
        acc = d.info["acceptance"]
        k = len(toks)
        seen_stops.add((k, d.info["stop"]))
        if k:
            _, hidden = draft_features(draft_model, torch.tensor([committed[0].tolist() + toks]))
            expected = head.acceptance_probability(hidden[0, committed.shape[1]:]).tolist()
            assert acc == pytest.approx(expected[: len(acc)], abs=1e-5)
        prods = [1.0]
        for a in acc:
            prods.append(prods[-1] * a)
        # the acceptances the rule saw when it decided about a draft of j tokens
        offset = 0 if count_last else 1
        seen = {j: prods[j - offset] for j in range(1, k + 1) if j - offset < len(prods)}
        for j in range(1, k):  # never stopped before k
            assert not (j >= kmin and 1 - seen[j] > h), (toks, acc)
        if d.info["stop"] == "threshold":
            assert k >= kmin and 1 - seen[k] > h
            assert len(acc) == (k if count_last else k - 1)
        elif d.info["stop"] == "max_tokens":
            assert k == kmax
        else:
            assert d.info["stop"] == "room"
        assert k <= kmax
    # the threshold stopped drafts at K_min and above, and the bound K_max ended others
    assert {(2, "threshold"), (3, "threshold"), (4, "max_tokens")} <= seen_stops, seen_stops


# ------------------------------------------------------------------------------------------------ losslessness
@pytest.mark.parametrize("make", ["tiny_llama", "tiny_gpt2"])
def test_greedy_token_identity(make, request):
    target = request.getfixturevalue(make)
    draft_model = truncated_model(target, 1)
    ids = torch.tensor([[5, 6, 7, 8]])
    greedy = target.generate(ids, max_new_tokens=24, do_sample=False, pad_token_id=0)
    for count_last in (True, False):
        drafter = SpecDecPPDrafter(draft_model, head=_head(target.config.hidden_size), threshold=0.5,
                                   min_tokens=1, max_tokens=6, count_last=count_last)
        drafts, _ = _record(drafter)
        out = target.generate(ids, max_new_tokens=24, do_sample=False, pad_token_id=0,
                              custom_generate=SpeculativeDecoding(drafter))
        assert torch.equal(out, greedy)
        assert any(len(d.tree) > 1 for d in drafts)


class _DropTheStoppingToken(SpecDecPPDrafter):
    """Mutant: drops the token whose predicted acceptance made the rule stop ("stop before the bad token"). Whether a
    token is proposed then depends on the token itself, so its proposal law is no longer the draft distribution it
    hands over: biased. The test below must reject it."""

    def propose(self, state):
        d = super().propose(state)
        if d.info["stop"] != "threshold":
            return d
        t = d.tree
        n = len(t) - 1
        if n == 0:
            return Draft(DraftTree.chain(t.tokens[:0]))
        return Draft(DraftTree.chain(t.tokens[:n], t.draft_probs[:n], t.sibling_scheme))


@pytest.mark.parametrize("variant", ["paper", "official-loop", "mutant"])
def test_sampling_keeps_the_target_distribution(variant):
    """Marginal law of the first two tokens of 4-token generations (the first draft may hold three tokens, so the
    rule decides whether to draft the second and the third) against the target's exact distribution."""
    vocab, length, n = 6, 2, 1200
    target, draft_model = _peaky_tiny_llama(1, vocab), _peaky_tiny_llama(2, vocab)
    head = _head(draft_model.config.hidden_size)
    prompt = [1, 2, 3]
    probs = _exact_sequence_distribution(target, prompt, length, vocab)
    cls = _DropTheStoppingToken if variant == "mutant" else SpecDecPPDrafter
    drafter = cls(draft_model, head=head, threshold=0.5, min_tokens=1, max_tokens=3,
                  count_last=variant != "official-loop")
    drafts, states = _record(drafter)
    loop = SpeculativeDecoding(drafter, acceptance="speculative")
    torch.manual_seed(0)
    ids = torch.tensor([prompt])
    counts = {}
    for _ in range(n):
        out = target.generate(ids, max_new_tokens=length + 2, do_sample=True, top_k=0, pad_token_id=0,
                              custom_generate=loop)
        seq = tuple(out[0, len(prompt):len(prompt) + length].tolist())
        counts[seq] = counts.get(seq, 0) + 1
    pvalue = _chi_square_pvalue(counts, probs, n)
    first = Counter(len(d.tree) for d, s in zip(drafts, states) if s.shape[1] == len(prompt))  # first drafts
    assert sum(c >= n // 20 for c in first.values()) >= 2, first  # the rule made first drafts of several lengths
    if variant == "mutant":
        assert pvalue < 1e-6, pvalue
    else:
        assert pvalue > 1e-3, pvalue


# ------------------------------------------------------------------------------------------------ head, training
def test_head_save_load_round_trip(tmp_path, tiny_llama):
    head = _head(32, seed=3, num_layers=3)
    head.config.heldout_auc = 0.61
    head.config.training = {"steps": 7}
    head.save_pretrained(str(tmp_path / "h"))
    assert (tmp_path / "h" / "model.safetensors").exists() and (tmp_path / "h" / "config.json").exists()
    loaded = AcceptancePredictionHead.from_pretrained(str(tmp_path / "h"))
    x = torch.randn(5, 32)
    assert torch.allclose(loaded(x), head(x))
    assert loaded.config.num_layers == 3 and loaded.config.heldout_auc == 0.61
    assert loaded.config.training == {"steps": 7} and loaded.config.weight_mismatch == 6.0
    assert len({id(b.linear.weight) for b in loaded.blocks}) == 3  # own weights per block
    # the drafter loads a head from a folder, and refuses one of the wrong width
    ids = torch.tensor([[5, 6, 7]])
    drafter = SpecDecPPDrafter(truncated_model(tiny_llama, 1), head=str(tmp_path / "h"), min_tokens=1)
    tiny_llama.generate(ids, max_new_tokens=4, do_sample=False, pad_token_id=0,
                        custom_generate=SpeculativeDecoding(drafter))
    assert torch.allclose(drafter.head(x), head(x))
    _head(16).save_pretrained(str(tmp_path / "narrow"))
    with pytest.raises(ValueError, match="hidden size"):
        tiny_llama.generate(ids, max_new_tokens=4, do_sample=False, pad_token_id=0, custom_generate=SpeculativeDecoding(
            SpecDecPPDrafter(truncated_model(tiny_llama, 1), head=str(tmp_path / "narrow"))))


def test_labels_loss_and_auc():
    p = torch.tensor([[0.5, 0.25, 0.25]]).log().expand(3, 3)
    q = torch.tensor([[0.25, 0.5, 0.25]]).log().expand(3, 3)
    assert acceptance_labels(p, q, torch.tensor([0, 1, 2])).tolist() == pytest.approx([1.0, 0.5, 1.0])
    logits = torch.tensor([[0.0, 2.0], [1.0, -1.0]])
    y = torch.tensor([0.75, 0.25])
    logp = torch.log_softmax(logits, -1)
    w = 6.0
    expected = sum(w * (1 - y[i]) * -logp[i, 0] + y[i] * -logp[i, 1] for i in range(2)) / sum(
        w * (1 - y[i]) + y[i] for i in range(2))
    assert float(weighted_bce_loss(logits, y, w)) == pytest.approx(float(expected))
    torch.manual_seed(0)
    s, lab = torch.rand(60), torch.rand(60)
    wins = total = 0.0
    for i in range(60):
        for j in range(60):
            if i != j:
                pair = lab[i] * (1 - lab[j])
                wins += pair * (float(s[i] > s[j]) + 0.5 * float(s[i] == s[j]))
                total += pair
    assert soft_auc(s, lab) == pytest.approx(float(wins / total), abs=1e-6)
    assert soft_auc(torch.tensor([0.2, 0.9]), torch.tensor([0.0, 1.0])) == 1.0


def test_training_learns_acceptance_on_tiny_models(tiny_llama):
    """Target: the tiny llama; draft: its first layer. The dataset follows the official recipe (soft labels on
    draft-sampled positions, mixing), and training lowers the held-out loss and beats chance."""
    torch.manual_seed(0)
    draft_model = truncated_model(tiny_llama, 1)
    g = torch.Generator().manual_seed(0)

    def rows(k, seed):
        out = []
        for i in range(k):
            prompt = torch.randint(3, 128, (6,), generator=g).tolist()
            resp = tiny_llama.generate(torch.tensor([prompt]), max_new_tokens=24, do_sample=True, top_k=0,
                                       pad_token_id=0)[0, 6:].tolist()
            out.append({"id": f"{seed}-{i}", "prompt_ids": prompt, "response_ids": resp})
        return out
    train, held = rows(24, 0), rows(8, 1)
    data = acceptance_dataset(tiny_llama, draft_model, train, mixing_ratio=0.15, seed=0)
    n_resp = sum(min(len(r["response_ids"]), 384 - 6) for r in train)
    assert 0.7 * n_resp < len(data["labels"]) < n_resp  # about 85 % draft-token positions kept
    assert data["hidden"].shape == (len(data["labels"]), 32) and ((data["labels"] >= 0) & (data["labels"] <= 1)).all()
    held_data = acceptance_dataset(tiny_llama, draft_model, held, seed=1)
    untrained = evaluate_acceptance_head(AcceptancePredictionHead(SpecDecPPHeadConfig(hidden_size=32)), held_data)
    head = train_acceptance_head(tiny_llama, draft_model, train, data=data, heldout_data=held_data, epochs=30,
                                 batch_size=64, lr=3e-3)
    figures = head.config.training["heldout"]
    assert figures["loss"] < untrained["loss"]
    assert head.config.heldout_auc == figures["auc"] > 0.55


# ------------------------------------------------------------------------------------------------ real model
def _heldout_rows(kind="greedy"):
    rows = []
    with gzip.open(ROOT / "results" / "direct_alignment" / f"responses-{kind}.jsonl.gz", "rt") as f:
        rows = [json.loads(line) for line in f if line.strip()]
    ordered = sorted(r["id"] for r in rows)
    held = set(ordered[9::10])  # scripts/train_specdec_pp.py's held-out prompts
    return sorted((r for r in rows if r["id"] in held and r["response_ids"]), key=lambda r: r["id"])


@pytest.fixture(scope="module")
def distilled(smollm):
    from hf_decoding_ext.speculative.drafters.draft_model import DraftModelDrafter
    from hf_decoding_ext.speculative.heads.specdec_pp import load_shipped_head, shipped_head_path

    if not (shipped_head_path() / "config.json").exists():
        pytest.fail("no shipped SpecDec++ head (scripts/train_specdec_pp.py --ship)")
    model, _ = smollm
    return model, DraftModelDrafter.load_assistant(model, "distilled"), load_shipped_head()


def test_shipped_head_heldout_auc(distilled):
    model, draft_model, head = distilled
    rows = _heldout_rows("sampled")[:6]
    data = acceptance_dataset(model, draft_model, rows, seed=1, max_length=160)
    figures = evaluate_acceptance_head(head, data)
    assert figures["positions"] > 300
    assert figures["auc"] > 0.5, figures


def _decode_stats(model, drafter, prompts, max_new_tokens, do_sample, seed=0):
    """Drafted, accepted and verification rounds of ``drafter`` over ``prompts``, and per verified draft token (the
    accepted ones and the first rejected one of each draft) the head's predicted acceptance and whether it was
    accepted."""
    loop = SpeculativeDecoding(drafter, kernels="pytorch", seed=seed)
    drafts, _ = _record(drafter)
    drafted = accepted = rounds = 0
    scores, events = [], []
    torch.manual_seed(seed)
    for p in prompts:
        drafts.clear()
        x = torch.tensor([p])
        model.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=max_new_tokens, do_sample=do_sample,
                       top_k=0, custom_generate=loop, pad_token_id=2)
        for st, d in zip(loop.last_stats, drafts):
            drafted += st.draft_size
            accepted += st.accepted
            rounds += 1
            for k, a in enumerate(d.info.get("acceptance", [])[: st.accepted + 1]):
                scores.append(a)
                events.append(float(k < st.accepted))
    return {"rejected_per_accepted": (drafted - accepted) / max(1, accepted), "accepted_per_round": accepted / rounds,
            "scores": torch.tensor(scores), "events": torch.tensor(events)}


def test_head_ranks_verified_draft_tokens_while_decoding(distilled):
    """T=1 sampling of 3 held-out prompts with the shipped head (threshold 0.95, bounds [1, 20], so that drafts are
    often longer than one token): over the draft tokens verification reached, the predicted acceptance ranks the
    accepted ones above the rejected ones (AUC 0.67-0.71 in the sweep of scripts/train_specdec_pp.py)."""
    model, draft_model, head = distilled
    prompts = [r["prompt_ids"] for r in _heldout_rows("greedy")[::12][:3]]
    stats = _decode_stats(model, SpecDecPPDrafter(draft_model, head=head, threshold=0.95, min_tokens=1), prompts,
                          40, do_sample=True)
    assert len(stats["events"]) > 60 and 0 < stats["events"].mean() < 1
    assert soft_auc(stats["scores"], stats["events"]) > 0.55


@pytest.mark.slow
@pytest.mark.xfail(strict=True, reason=(
    "not reproduced at this scale (135M target, distilled 4-layer draft accepting ~23% of greedy tokens): "
    "SpecDec++ drafts like K=1 at low thresholds and its extra tokens are accepted less often than first tokens; "
    "greedy, 6 held-out prompts x 48 tokens: best fixed K=1 3.224 rejected per accepted, best SpecDec++ 3.245 "
    "(h=0.3, [1, 20]); T=1, 12 prompts x 4 seeds: K=1 3.638, SpecDec++ [1, 20] h=0.7 3.758, h=0.8 3.529 (within "
    "the seed-to-seed spread) (scripts/train_specdec_pp.py --sweep, model_cards/specdec_pp_head.md)"))
def test_fewer_rejected_tokens_per_accepted_than_the_best_fixed_length(distilled):
    """The paper's property, greedy (deterministic, so every configuration decodes the same text) on 3 held-out
    prompts: rejected draft tokens per accepted draft token of SpecDec++ (shipped head, threshold 0.3, bounds
    [1, 20]: the best SpecDec++ setting of the greedy sweep) below the fewest of the fixed draft lengths K = 1..6.
    Strict xfail: it documents the negative result and turns red if a better draft/head makes it hold."""
    from hf_decoding_ext.speculative.drafters.draft_model import DraftModelDrafter

    model, draft_model, head = distilled
    prompts = [r["prompt_ids"] for r in _heldout_rows("greedy")[::12][:3]]
    fixed = {k: _decode_stats(model, DraftModelDrafter(draft_model, num_tokens=k, confidence_threshold=0.0,
                                                       schedule="constant"), prompts, 40, do_sample=False)
             for k in range(1, 7)}
    ours = _decode_stats(model, SpecDecPPDrafter(draft_model, head=head, threshold=0.3, min_tokens=1), prompts, 40,
                         do_sample=False)
    best = min(r["rejected_per_accepted"] for r in fixed.values())
    assert ours["rejected_per_accepted"] < best, (ours["rejected_per_accepted"], {
        k: r["rejected_per_accepted"] for k, r in fixed.items()})
