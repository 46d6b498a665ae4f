"""Acceptance rules by name, sibling schemes, drafter needs and the verification-target hook of the speculative
engine (the exact distributions of speculative sampling are in ``test_acceptance_exact.py``)."""

from __future__ import annotations

import warnings

import pytest
import torch

from hf_decoding_ext.core.tree import DraftTree
from hf_decoding_ext.speculative import SpeculativeDecoding
from hf_decoding_ext.speculative.acceptance import (ACCEPTANCE_RULES, AcceptanceRule, GreedyAcceptance,
                                                    SpeculativeSamplingAcceptance, TypicalAcceptance,
                                                    get_acceptance_rule, register_acceptance_rule, resolve_rule)
from hf_decoding_ext.speculative.drafters.base import DRAFTER_NEEDS, Draft, Drafter
from hf_decoding_ext.speculative.drafters.draft_model import DraftModelDrafter
from hf_decoding_ext.speculative.drafters.merged import MergedDrafter
from hf_decoding_ext.speculative.drafters.prompt_lookup import PromptLookupDrafter
from hf_decoding_ext.speculative.drafters.token_recycling import TokenRecyclingDrafter

SCHEMES = DraftTree.SIBLING_SCHEMES


def _tree(scheme: str, vocab: int = 5) -> DraftTree:
    """root -> {1, 3}, 1 -> 2 with the given sibling scheme (uniform draft_probs for sampled schemes)."""
    probs = None if scheme == "deterministic" else torch.full((3, vocab), 1.0 / vocab)
    return DraftTree(torch.tensor([1, 3, 2]), [-1, -1, 0], probs, scheme)


# ------------------------------------------------------------------------------------------------ the name table
def test_table_resolves_every_name_and_refuses_unknown_ones():
    assert {"auto", "greedy", "speculative", "typical"} <= set(ACCEPTANCE_RULES)
    expected = {("auto", False): GreedyAcceptance, ("auto", True): SpeculativeSamplingAcceptance,
                ("greedy", False): GreedyAcceptance, ("speculative", False): SpeculativeSamplingAcceptance,
                ("speculative", True): SpeculativeSamplingAcceptance, ("typical", False): TypicalAcceptance,
                ("typical", True): TypicalAcceptance}
    for (name, do_sample), cls in expected.items():
        rule = get_acceptance_rule(name, do_sample)
        assert type(rule) is cls, (name, do_sample)
        if cls is TypicalAcceptance:
            assert rule.sample_bonus is do_sample
    with pytest.raises(ValueError, match="do_sample=True"):
        get_acceptance_rule("greedy", True)
    with pytest.raises(ValueError) as err:
        get_acceptance_rule("spectr-typo", False)
    for name in ACCEPTANCE_RULES:  # the message lists the table
        assert repr(name) in str(err.value)
    for bad in (None, 3, ["greedy"]):
        with pytest.raises(ValueError, match="unknown acceptance rule"):
            get_acceptance_rule(bad, False)
    rule = TypicalAcceptance(epsilon=0.2)
    assert get_acceptance_rule(rule, True) is rule
    assert resolve_rule is get_acceptance_rule  # the former name
    with pytest.raises(ValueError, match="unknown acceptance rule"):
        SpeculativeDecoding(PromptLookupDrafter(), acceptance="nope")


class _RejectAll(AcceptanceRule):
    """Accepts nothing and emits the target's argmax: greedy decoding one token per forward."""

    lossless_schemes = frozenset(DraftTree.SIBLING_SCHEMES)
    calls = 0

    def accept(self, tree, scores_at, generator=None):
        type(self).calls += 1
        return [], int(scores_at(-1).argmax())


def test_registered_rule_is_used_by_the_engine(tiny_llama):
    name = "test-reject-all"
    try:
        register_acceptance_rule(name, _RejectAll)
        with pytest.raises(ValueError, match="already registered"):
            register_acceptance_rule(name, _RejectAll)
        register_acceptance_rule(name, lambda do_sample: _RejectAll(), overwrite=True)  # a factory works too
        for bad_name, bad_rule in (("", _RejectAll), ("x", int), ("y", _RejectAll())):
            with pytest.raises(ValueError):
                register_acceptance_rule(bad_name, bad_rule)
        _RejectAll.calls = 0
        loop = SpeculativeDecoding(PromptLookupDrafter(num_tokens=4), acceptance=name)
        ids = torch.tensor([[3, 4, 5, 3, 4, 5, 3, 4]])
        ref = tiny_llama.generate(ids, max_new_tokens=12, do_sample=False)
        out = tiny_llama.generate(ids, max_new_tokens=12, do_sample=False, custom_generate=loop)
        assert torch.equal(ref, out)
        assert _RejectAll.calls == len(loop.last_stats) == 12  # one step per token: nothing was accepted
        assert any(s.draft_size > 0 for s in loop.last_stats)  # although there were drafts to accept
        assert all(s.accepted == 0 for s in loop.last_stats)
    finally:
        ACCEPTANCE_RULES.pop(name, None)
    assert name not in ACCEPTANCE_RULES


# ------------------------------------------------------------------------------------------------ sibling schemes
def test_draft_tree_sibling_scheme_validation():
    probs = torch.full((2, 4), 0.25)
    assert DraftTree.chain([1, 2]).sibling_scheme == "deterministic"
    assert DraftTree.chain([1, 2], probs).sibling_scheme == "iid"  # default with draft_probs
    tree = DraftTree(torch.tensor([1, 2]), [-1, -1], probs, "without_replacement")
    assert tree.truncate(1).sibling_scheme == "without_replacement" and len(tree.truncate(1)) == 1
    assert DraftTree.from_sequences([[1, 2], [3]]).sibling_scheme == "deterministic"
    with pytest.raises(ValueError, match="'sorted'"):
        DraftTree.chain([1, 2], probs, "sorted")
    with pytest.raises(ValueError, match="needs draft_probs"):
        DraftTree.chain([1, 2], None, "iid")
    with pytest.raises(ValueError, match="takes no draft_probs"):
        DraftTree.chain([1, 2], probs, "deterministic")


def test_rules_declare_their_lossless_schemes_and_refuse_the_others():
    assert GreedyAcceptance().lossless_schemes == set(SCHEMES)
    assert SpeculativeSamplingAcceptance().lossless_schemes == set(SCHEMES)  # without replacement: RSD's rule
    assert TypicalAcceptance().lossless_schemes == set() and not TypicalAcceptance().lossless
    for name in ACCEPTANCE_RULES:
        for do_sample in (False, True):
            if name == "greedy" and do_sample:
                continue
            try:
                rule = get_acceptance_rule(name, do_sample)
            except ValueError as err:  # greedy-only criteria (blockwise top-k / distance) refuse sampling clearly
                assert do_sample and "do_sample=False" in str(err), (name, err)
                continue
            assert rule.lossless_schemes <= set(SCHEMES)
            for scheme in SCHEMES:
                if rule.lossless and scheme not in rule.lossless_schemes:
                    with pytest.raises(ValueError, match=scheme):
                        rule.check_tree(_tree(scheme))
                else:
                    rule.check_tree(_tree(scheme))
    with pytest.raises(ValueError, match="without_replacement"):
        _IidOnly().check_tree(_tree("without_replacement"))

    class Custom(AcceptanceRule):  # a rule that declares nothing claims only deterministic drafts
        def accept(self, tree, scores_at, generator=None):
            return [], 0

    Custom().check_tree(_tree("deterministic"))
    with pytest.raises(ValueError, match="iid"):
        Custom().check_tree(_tree("iid"))


class _IidOnly(SpeculativeSamplingAcceptance):
    """A sampling rule that claims only deterministic and i.i.d. siblings."""

    lossless_schemes = frozenset({"deterministic", "iid"})


class _SampledSiblingsDrafter(Drafter):
    """Two siblings at the root sampled from a uniform distribution, i.i.d. or without replacement."""

    def __init__(self, scheme, vocab=128):
        self.scheme, self.vocab = scheme, vocab
        self.g = torch.Generator().manual_seed(0)

    def propose(self, state):
        q = torch.full((self.vocab,), 1.0 / self.vocab)
        tokens = torch.multinomial(q, 2, replacement=self.scheme == "iid", generator=self.g)
        return Draft(DraftTree(tokens, [-1, -1], q.expand(2, -1).clone(), self.scheme))


def test_engine_refuses_a_rule_not_lossless_for_the_drafts(tiny_llama):
    ids = torch.tensor([[3, 4, 5]])
    with pytest.raises(ValueError, match="without_replacement"):
        tiny_llama.generate(ids, max_new_tokens=4, do_sample=True, pad_token_id=0,
                            custom_generate=SpeculativeDecoding(_SampledSiblingsDrafter("without_replacement"),
                                                                acceptance=_IidOnly()))
    for scheme, acceptance in (("iid", "auto"), ("without_replacement", "auto"), ("without_replacement", "typical"),
                               ("without_replacement", "greedy")):
        loop = SpeculativeDecoding(_SampledSiblingsDrafter(scheme), acceptance=acceptance)
        out = tiny_llama.generate(ids, max_new_tokens=4, do_sample=acceptance != "greedy", pad_token_id=0,
                                  custom_generate=loop)
        assert out.shape[1] == 7 and all(s.draft_size == 2 for s in loop.last_stats)


# ------------------------------------------------------------------------------------------------ drafter needs
class _Recorder(Drafter):
    """A fixed tree while there is room; keeps every VerifyResult."""

    def __init__(self, needs=frozenset(), sequences=((10, 11), (12,))):
        self.needs = needs
        self.sequences = sequences
        self.results = []

    def begin(self, state):
        self.results = []

    def propose(self, state):
        room = state.generation_config.max_length - state.input_ids.shape[1] - 1
        return Draft(DraftTree.from_sequences(self.sequences) if room >= 2 else DraftTree.empty())

    def observe(self, state, result):
        self.results.append((state.input_ids.shape[1], result))


def test_needs_are_validated_and_the_old_flags_are_views():
    assert DRAFTER_NEEDS == {"last_hidden_state", "all_hidden_states", "committed_logits", "committed_top_k",
                             "assistant_model", "target_cache"}
    with pytest.raises(ValueError, match="'hidden_state'"):
        SpeculativeDecoding(_Recorder({"hidden_state"}))
    with pytest.raises(ValueError, match="set of need names"):
        SpeculativeDecoding(_Recorder("last_hidden_state"))  # a bare string is not a set of names
    # every drafter declares its needs in one set; the former booleans read it
    assert TokenRecyclingDrafter().needs == {"committed_top_k"} and TokenRecyclingDrafter().committed_k == 8
    assert DraftModelDrafter().needs == {"assistant_model"} and DraftModelDrafter().uses_assistant_model
    assert PromptLookupDrafter().needs == set() and not PromptLookupDrafter().wants_hidden_states
    merged = MergedDrafter([PromptLookupDrafter(), TokenRecyclingDrafter(), _Recorder({"last_hidden_state"})])
    assert merged.needs == {"committed_top_k", "last_hidden_state"} and merged.wants_hidden_states
    assert merged.committed_k == 8
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")

        class Legacy(Drafter):
            wants_hidden_states = True
            wants_committed_logits = False

            def propose(self, state):
                return Draft(DraftTree.empty())

    assert any(issubclass(w.category, DeprecationWarning) for w in caught)
    assert Legacy.needs == {"last_hidden_state"} and Legacy().wants_hidden_states
    assert not Legacy().wants_committed_logits


def test_engine_hands_over_only_what_is_declared(tiny_llama):
    ids = torch.tensor([[3, 4, 5, 6]])
    for needs in (set(), {"committed_logits"}):
        d = _Recorder(needs)
        tiny_llama.generate(ids, max_new_tokens=3, do_sample=False, custom_generate=SpeculativeDecoding(d))
        _, r = d.results[0]
        assert r.hidden_states is None and r.all_hidden_states is None and r.target_cache is None
        assert r.committed_logits.shape[0] == (3 if needs else 0)  # the prompt before the root, when declared


def test_prompt_is_prefilled_causally_with_features_and_chunked_top_k(tiny_llama, monkeypatch):
    """Issue 16 (memory): without "committed_logits", a prompt longer than ``prefill_above`` (all but its last
    token) is run through the model's normal causal path (2D mask, one kept logit) before the first verification;
    the features the drafter needs at the prompt (final-norm output by a hook) and the top-k ids (in chunks) equal
    those of one full forward, and so do they when a short prompt shares the first verification forward."""
    from hf_decoding_ext.speculative import engine as E

    ids = torch.tensor([[3, 4, 5, 6, 7, 8, 9]])
    feats = torch.randn(5, 32)
    torch.testing.assert_close(E._chunked_top_k(tiny_llama, feats, 3, chunk=2),
                               tiny_llama.lm_head(feats).topk(3).indices, atol=0, rtol=0)
    calls = []
    original_forward = tiny_llama.forward

    def spy(*args, **kwargs):
        mask = kwargs.get("attention_mask")
        calls.append((kwargs["input_ids"].shape[1], None if mask is None else mask.dim(), kwargs.get("logits_to_keep")))
        return original_forward(*args, **kwargs)

    monkeypatch.setitem(tiny_llama.__dict__, "forward", spy)  # undo deletes it
    d = _Recorder({"last_hidden_state", "committed_top_k"})
    d.committed_k = 3
    loop = SpeculativeDecoding(d)
    loop.prefill_above = 4  # (default 1024: shorter prompts share the first verification forward)
    tiny_llama.generate(ids, max_new_tokens=3, do_sample=False, custom_generate=loop)
    monkeypatch.undo()
    assert calls[0] == (6, 2, 1)  # the prefill: 6 prompt tokens, a 2D mask, one logit
    assert calls[1][1] == 4  # then the first verification with the tree mask
    _, r = d.results[0]
    with torch.no_grad():
        full = tiny_llama(ids, output_hidden_states=True)
    n = r.hidden_states.shape[0] - len(r.draft.tree)
    torch.testing.assert_close(r.hidden_states[:n], full.hidden_states[-1][0], atol=1e-5, rtol=1e-5)
    assert r.committed_top_k.shape == (6, 3)
    assert torch.equal(r.committed_top_k, full.logits[0, :6].topk(3).indices)
    short = _Recorder({"committed_top_k"})
    short.committed_k = 3
    tiny_llama.generate(ids, max_new_tokens=3, do_sample=False, custom_generate=SpeculativeDecoding(short))
    _, r = short.results[0]  # default prefill_above: one forward, top-k from the hooked features
    assert r.hidden_states is None and torch.equal(r.committed_top_k, full.logits[0, :6].topk(3).indices)


def test_long_prompt_prefill_runs_in_chunks_with_the_same_features(tiny_llama, monkeypatch):
    """The causal prefill of a long prompt runs ``prefill_chunk`` tokens per forward (the activations of one chunk at
    a time); features, top-k ids and output equal the one-chunk prefill's."""
    ids = torch.tensor([[3, 4, 5, 6, 7, 8, 9, 10, 11, 12]])
    results = {}
    for chunk in (512, 4):
        calls = []
        original_forward = tiny_llama.forward

        def spy(*args, **kwargs):
            calls.append(kwargs["input_ids"].shape[1])
            return original_forward(*args, **kwargs)

        monkeypatch.setitem(tiny_llama.__dict__, "forward", spy)  # undo deletes it
        d = _Recorder({"last_hidden_state", "committed_top_k"})
        d.committed_k = 3
        loop = SpeculativeDecoding(d, kernels="pytorch")
        loop.prefill_above, loop.prefill_chunk = 4, chunk
        out = tiny_llama.generate(ids, max_new_tokens=3, do_sample=False, custom_generate=loop)
        monkeypatch.undo()
        results[chunk] = (out, d.results[0][1], calls)
    assert results[512][2][0] == 9 and results[4][2][:3] == [4, 4, 1]  # 9 prompt tokens before the root
    (out_a, r_a, _), (out_b, r_b, _) = results[512], results[4]
    assert torch.equal(out_a, out_b) and torch.equal(r_a.committed_top_k, r_b.committed_top_k)
    torch.testing.assert_close(r_a.hidden_states, r_b.hidden_states, atol=1e-5, rtol=1e-5)


def test_all_hidden_states_are_every_layer_at_every_position(tiny_llama):
    prompt = [3, 4, 5, 6, 7]
    d = _Recorder({"all_hidden_states", "last_hidden_state"})
    tiny_llama.generate(torch.tensor([prompt]), max_new_tokens=3, do_sample=False,
                        custom_generate=SpeculativeDecoding(d))
    _, r = d.results[0]  # first step: the whole prompt is uncached, then the 3 tree nodes (10 -> 11, 12)
    layers = r.all_hidden_states
    assert len(layers) == tiny_llama.config.num_hidden_layers + 1
    s = len(prompt)
    assert all(h.shape == (s + 3, tiny_llama.config.hidden_size) for h in layers)
    torch.testing.assert_close(r.hidden_states, layers[-1])
    with torch.no_grad():
        for seq, rows, at in ((prompt + [10, 11], [s, s + 1], [s, s + 1]), (prompt + [12], [s + 2], [s])):
            ref = tiny_llama(torch.tensor([seq]), output_hidden_states=True).hidden_states
            for got, want in zip(layers, ref):
                torch.testing.assert_close(got[:s], want[0, :s], atol=1e-4, rtol=1e-4)
                torch.testing.assert_close(got[rows], want[0, at], atol=1e-4, rtol=1e-4)
    only_all = _Recorder({"all_hidden_states"})
    tiny_llama.generate(torch.tensor([prompt]), max_new_tokens=3, do_sample=False,
                        custom_generate=SpeculativeDecoding(only_all))
    assert only_all.results[0][1].hidden_states is None and len(only_all.results[0][1].all_hidden_states) == 3


class _CacheWriter(_Recorder):
    """Runs the target on junk tokens over its own cache while proposing (as a layer-skip drafter sharing the
    target's cache would), then drafts the next two tokens of a known output beside a wrong branch; the engine must
    crop the junk back."""

    def __init__(self, needs, oracle):
        super().__init__(needs)
        self.oracle = oracle

    def propose(self, state):
        state.model(input_ids=torch.tensor([[9, 9]]), past_key_values=state.cache, use_cache=True)
        n = state.input_ids.shape[1]
        self.sequences = (self.oracle[n:n + 2], (12,))
        return super().propose(state)

    def observe(self, state, result):
        assert result.target_cache is state.cache
        self.results.append((state.input_ids.shape[1], len(result.accepted), result.target_cache.get_seq_length()))


def test_target_cache_is_readable_and_cropped_back(tiny_llama):
    ids = torch.tensor([[3, 4, 5, 6]])
    ref = tiny_llama.generate(ids, max_new_tokens=8, do_sample=False)
    d = _CacheWriter({"target_cache"}, ref[0].tolist())
    out = tiny_llama.generate(ids, max_new_tokens=8, do_sample=False, custom_generate=SpeculativeDecoding(d))
    assert torch.equal(ref, out)  # the junk the drafter wrote never reached verification
    assert len(d.results) > 1 and any(accepted for _, accepted, _ in d.results)
    for committed, accepted, cached in d.results:
        assert cached == committed + accepted  # the committed tokens and the accepted path, no junk


# ------------------------------------------------------------------------------------------------ verification hook
class _Banned(SpeculativeDecoding):
    """Verifies against the target with one token banned."""

    def __init__(self, drafter, banned):
        super().__init__(drafter)
        self.banned = banned

    def verification_scores(self, state, draft, tree_logits):
        assert tree_logits.shape[0] == len(draft.tree) + 1
        return tree_logits.index_fill(-1, torch.tensor([self.banned]), float("-inf"))


def test_verification_scores_hook_changes_the_target(tiny_llama):
    ids = torch.tensor([[3, 4, 5, 3, 4, 5, 3]])
    free = tiny_llama.generate(ids, max_new_tokens=15, do_sample=False)
    banned = int(free[0, -5])  # a token greedy decoding emits
    ref = tiny_llama.generate(ids, max_new_tokens=15, do_sample=False, suppress_tokens=[banned])
    loop = _Banned(PromptLookupDrafter(num_tokens=4), banned)
    out = tiny_llama.generate(ids, max_new_tokens=15, do_sample=False, custom_generate=loop)
    assert torch.equal(ref, out) and banned not in out[0, ids.shape[1]:].tolist()
