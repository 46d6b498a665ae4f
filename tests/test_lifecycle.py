"""Stateful logits processors stay exact inside this library's loops and engine (issue 15, first item).

Each test compares what a loop or the engine made a stateful processor produce with the same processor recomputed
from scratch on the same tokens (a fresh processor, one full forward per position), or checks a refusal.
"""

from __future__ import annotations


import pytest
import torch
from transformers import LogitsProcessorList

from hf_decoding_ext.contrastive.cad import ContextAwareDecodingProcessor
from hf_decoding_ext.core.tree import DraftTree
from hf_decoding_ext.sampling.adadec import AdaDec
from hf_decoding_ext.sampling.cautious import CautiousNTP
from hf_decoding_ext.sampling.knn_lm import (
    HiddenStateCapture,
    KNNDatastore,
    KNNLMLogitsProcessor,
)
from hf_decoding_ext.sampling.mirostat import MirostatLogitsProcessor
from hf_decoding_ext.sampling.superposed import SuperposedDecoding
from hf_decoding_ext.speculative import SpeculativeDecoding
from hf_decoding_ext.speculative.drafters.base import Draft, Drafter
from hf_decoding_ext.speculative.drafters.draft_model import DraftModelDrafter
from conftest import StatefulWithoutLifecycle, perturbed_copy

PROMPT = torch.tensor([[1, 17, 33, 45, 9, 60, 71]])
SECOND = torch.tensor([[1, 45, 9]])  # the "no context" view: a shorter prompt


def _cad(model):
    return ContextAwareDecodingProcessor(model, SECOND, alpha=1.0)


@torch.no_grad()
def _from_scratch(model, make_processor, sequences, prompt_length, scores_count):
    """Processed scores of each step recomputed with a fresh processor (first called on the prompt, as in
    ``generate()``) and a full forward on the same tokens."""
    out = []
    prompt = sequences[:, :prompt_length]
    prompt_logits = model(input_ids=prompt).logits[:, -1, :].float()
    for t in range(scores_count):
        ids = sequences[:, : prompt_length + t]
        logits = model(input_ids=ids).logits[:, -1, :].float()
        proc = make_processor()
        proc(prompt, prompt_logits.clone())
        out.append(proc(ids, logits))
    return out


def _assert_same_scores(got, expected):
    assert len(got) == len(expected)
    for t, (g, e) in enumerate(zip(got, expected)):
        finite = torch.isfinite(e)
        assert torch.equal(torch.isfinite(g), finite), f"step {t}: other tokens kept"
        torch.testing.assert_close(g[finite], e[finite], rtol=1e-4, atol=1e-4, msg=f"step {t}")


# ------------------------------------------------------------------------------------------------ contrastive (CAD)
def test_cad_with_adadec_matches_cad_from_scratch(tiny_llama):
    cad = _cad(tiny_llama)
    loop = AdaDec(threshold=0.0, top_k=3, lookahead_length=3)  # pauses at every step: rollouts every step
    out = tiny_llama.generate(PROMPT, attention_mask=torch.ones_like(PROMPT), logits_processor=[cad],
                              custom_generate=loop, do_sample=False, max_new_tokens=6, pad_token_id=0,
                              output_scores=True, return_dict_in_generate=True)
    assert sum(len(s["candidates"]) for s in out.adadec_trace) == 6  # the lookahead ran at every step
    expected = _from_scratch(tiny_llama, lambda: _cad(tiny_llama), out.sequences, PROMPT.shape[1], len(out.scores))
    _assert_same_scores(list(out.scores), expected)


def test_cad_with_cautious_ntp_matches_cad_from_scratch(tiny_llama):
    cad = _cad(tiny_llama)
    loop = CautiousNTP(punctuation_ids=[5, 6, 7], min_trials=3, max_trials=3, max_trial_tokens=3)
    torch.manual_seed(0)
    out = tiny_llama.generate(PROMPT, attention_mask=torch.ones_like(PROMPT), logits_processor=[cad],
                              custom_generate=loop, do_sample=True, top_k=0, max_new_tokens=8, pad_token_id=0,
                              output_scores=True, return_dict_in_generate=True)
    assert any(len(t) > 1 for step in out.cntp_trace for t in step["trials"])  # trials of several tokens ran
    expected = _from_scratch(tiny_llama, lambda: _cad(tiny_llama), out.sequences, PROMPT.shape[1], len(out.scores))
    _assert_same_scores(list(out.scores), expected)


class _RecordingCAD(ContextAwareDecodingProcessor):
    """CAD that records the rows it was called on and its second view's logits at each call."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.calls = []

    def second_view_logits(self, input_ids):
        logits = super().second_view_logits(input_ids)
        self.calls.append((input_ids.clone(), logits.clone()))
        return logits


def test_cad_with_superposed_drafts_reads_each_drafts_own_tokens(tiny_llama):
    cad = _RecordingCAD(tiny_llama, SECOND, alpha=1.0)
    tiny_llama.generate(PROMPT, attention_mask=torch.ones_like(PROMPT), logits_processor=[cad],
                        custom_generate=SuperposedDecoding(num_drafts=3, alpha=0.0), do_sample=False,
                        max_new_tokens=5, pad_token_id=0)
    assert len(cad.calls) == 5 and cad.calls[-1][0].shape[0] == 3  # three drafts, reordered at every step
    for ids, second in cad.calls:  # the second view of each draft is the one of its own tokens
        fresh = ContextAwareDecodingProcessor(tiny_llama, SECOND, alpha=1.0)
        fresh.second_view_logits(ids[:, : PROMPT.shape[1]])
        torch.testing.assert_close(second, fresh.second_view_logits(ids), rtol=1e-4, atol=1e-4)


# ------------------------------------------------------------------------------------------------ Mirostat
@torch.no_grad()
def _mu_replay(model, sequences, prompt_length, steps, **kwargs):
    proc = MirostatLogitsProcessor(**kwargs)
    for t in range(steps):
        ids = sequences[:, : prompt_length + t]
        proc(ids, model(input_ids=ids).logits[:, -1, :].float())
    return proc




def test_mirostat_under_speculative_sampling_keeps_the_plain_mu_sequence(tiny_llama):
    proc = MirostatLogitsProcessor(tau=2.0, eta=0.5)
    loop = SpeculativeDecoding(DraftModelDrafter(perturbed_copy(tiny_llama, 0.3), num_tokens=3), seed=0)
    torch.manual_seed(0)
    out = tiny_llama.generate(PROMPT, attention_mask=torch.ones_like(PROMPT), logits_processor=[proc],
                              custom_generate=loop, do_sample=True, top_k=0, max_new_tokens=12, pad_token_id=0,
                              return_dict_in_generate=True)
    stats = out.spec_stats
    assert sum(s.draft_size for s in stats) > sum(s.accepted for s in stats)  # some drafted tokens were rejected
    assert sum(s.accepted for s in stats) > 0
    n = out.sequences.shape[1] - PROMPT.shape[1]
    replay = _mu_replay(tiny_llama, out.sequences, PROMPT.shape[1], n, tau=2.0, eta=0.5)
    torch.testing.assert_close(proc.mu, replay.mu)
    assert len(proc.mu_history) == len(replay.mu_history) == n
    for got, want in zip(proc.mu_history, replay.mu_history):
        torch.testing.assert_close(got, want)


def test_mirostat_under_cautious_ntp_continues_from_the_chosen_trial(tiny_llama):
    proc = MirostatLogitsProcessor(tau=2.0, eta=0.5)
    loop = CautiousNTP(punctuation_ids=[5, 6, 7], min_trials=3, max_trials=3, max_trial_tokens=3)
    torch.manual_seed(0)
    out = tiny_llama.generate(PROMPT, attention_mask=torch.ones_like(PROMPT), logits_processor=[proc],
                              custom_generate=loop, do_sample=True, top_k=0, max_new_tokens=8, pad_token_id=0,
                              return_dict_in_generate=True)
    assert any(len(step["appended"]) > 1 for step in out.cntp_trace)  # whole trials were appended
    n = out.sequences.shape[1] - PROMPT.shape[1]
    replay = _mu_replay(tiny_llama, out.sequences, PROMPT.shape[1], n, tau=2.0, eta=0.5)
    torch.testing.assert_close(proc.mu, replay.mu)
    assert len(proc.mu_history) == n
    for got, want in zip(proc.mu_history, replay.mu_history):
        torch.testing.assert_close(got, want)


# ------------------------------------------------------------------------------------------------ kNN-LM
@torch.no_grad()
def _datastore(model):
    torch.manual_seed(1)
    texts = torch.randint(4, 128, (4, 24))
    capture = HiddenStateCapture(model)
    model(input_ids=texts)
    keys = capture.hidden[:, :-1].reshape(-1, capture.hidden.shape[-1]).float()
    capture.remove()
    return KNNDatastore(keys, texts[:, 1:].reshape(-1))


class _TreeDrafter(Drafter):
    """A two-branch tree whose first branch follows a reference continuation (accepted) and whose second branch is
    a distractor, so tree nodes off the accepted path are scored too."""

    def __init__(self, reference: torch.Tensor):
        self.reference = reference

    def propose(self, state) -> Draft:
        pos = state.input_ids.shape[1]
        ref = self.reference[0, pos: pos + 2].tolist()
        if len(ref) < 2:
            return Draft(DraftTree(torch.zeros(0, dtype=torch.long), []))
        other = (ref[0] + 1) % 128
        return Draft(DraftTree([other, ref[0], ref[1], other], [-1, -1, 1, 0]))


def test_knn_lm_at_tree_nodes_equals_knn_lm_decoded_plainly(tiny_llama):
    store = _datastore(tiny_llama)
    kwargs = {"attention_mask": torch.ones_like(PROMPT), "do_sample": False, "max_new_tokens": 8, "pad_token_id": 0,
              "output_scores": True, "return_dict_in_generate": True}
    with KNNLMLogitsProcessor(store, lmbda=0.5, k=8, model=tiny_llama) as knn:
        plain = tiny_llama.generate(PROMPT, logits_processor=[knn], **kwargs)
    with KNNLMLogitsProcessor(store, lmbda=0.5, k=8, model=tiny_llama) as knn:
        loop = SpeculativeDecoding(_TreeDrafter(plain.sequences))
        spec = tiny_llama.generate(PROMPT, logits_processor=[knn], custom_generate=loop, **kwargs)
    assert sum(s.accepted for s in loop.last_stats) > 0
    assert torch.equal(spec.sequences, plain.sequences)
    _assert_same_scores(list(spec.scores), list(plain.scores))


def test_knn_lm_with_ips_reads_the_chosen_candidates_hidden_state(tiny_llama):
    from hf_decoding_ext.sampling.ips import IsotropicProximalSearch

    store = _datastore(tiny_llama)
    with KNNLMLogitsProcessor(store, lmbda=0.5, k=8, model=tiny_llama) as knn:
        out = tiny_llama.generate(PROMPT, attention_mask=torch.ones_like(PROMPT), logits_processor=[knn],
                                  custom_generate=IsotropicProximalSearch(alpha=0.6, top_k=3, first_steps=1),
                                  do_sample=False, max_new_tokens=5, pad_token_id=0, output_scores=True,
                                  return_dict_in_generate=True)
        expected = []
        with torch.no_grad():
            for t in range(len(out.scores)):  # kNN-LM on one full forward of the same tokens
                ids = out.sequences[:, : PROMPT.shape[1] + t]
                expected.append(knn(ids, tiny_llama(input_ids=ids).logits[:, -1, :].float()))
    _assert_same_scores(list(out.scores), expected)


# ------------------------------------------------------------------------------------------------ refusal
_CountingProcessor = StatefulWithoutLifecycle


@pytest.mark.parametrize("loop, sample", [
    (lambda: AdaDec(threshold=0.0), False),
    (lambda: CautiousNTP(punctuation_ids=[5], max_trial_tokens=2), True),
    (lambda: SuperposedDecoding(num_drafts=2, alpha=0.0), False),
    (lambda: SpeculativeDecoding(DraftModelDrafter(num_tokens=2)), False),
])
def test_stateful_processor_without_lifecycle_is_refused(tiny_llama, loop, sample):
    proc = _CountingProcessor()
    kwargs = {"assistant_model": tiny_llama} if "Speculative" in type(loop()).__name__ else {}
    with pytest.raises(ValueError, match="lifecycle"):
        tiny_llama.generate(PROMPT, attention_mask=torch.ones_like(PROMPT), logits_processor=[proc],
                            custom_generate=loop(), do_sample=sample, max_new_tokens=4, pad_token_id=0, **kwargs)
    assert proc.calls <= 1  # refused before the processor's state could be corrupted


def test_fork_leaves_the_original_untouched(tiny_llama):
    from hf_decoding_ext.core import lifecycle

    cad = _cad(tiny_llama)
    procs = LogitsProcessorList([cad])
    procs(PROMPT, tiny_llama(input_ids=PROMPT).logits[:, -1, :].float())
    ids = torch.cat([PROMPT, torch.tensor([[40, 41]])], dim=1)
    logits = tiny_llama(input_ids=ids).logits[:, -1, :].float()
    before = procs(ids, logits.clone())
    trials = lifecycle.fork(procs, torch.tensor([0, 0, 0]))
    branch_ids = torch.cat([ids.repeat(3, 1), torch.tensor([[50], [51], [52]])], dim=1)
    branch_scores = trials(branch_ids, tiny_llama(input_ids=branch_ids).logits[:, -1, :].float())
    expected = _from_scratch(tiny_llama, lambda: _cad(tiny_llama), branch_ids, PROMPT.shape[1], 4)[-1]
    torch.testing.assert_close(branch_scores, expected, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(procs(ids, logits.clone()), before)  # the main processor still sits at ``ids``
    assert cad._gen.shape == (1, 2)
