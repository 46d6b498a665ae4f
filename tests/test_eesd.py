"""EESD (arXiv 2406.03853): the Thompson-sampling draft-length controller and the early-exit drafter.

- Beta-TS: with simulated Bernoulli acceptances the posterior mean converges to the true rate, and the draft length
  the controller chooses rises with it; the update counts the accepted tokens and the first rejection only; the
  calibrated variant learns a confidence-dependent acceptance rate per bin;
- the drafter is lossless: token-identical to greedy ``generate()`` on tiny models (plain exit, untrained and
  perturbed heads, every controller, several prompts) and on SmolLM2-135M with the shipped head;
- an exit that *is* the full model (the head's extra layer = the model's last layer) has every draft accepted: the
  extra layer's own KV cache stays in step with the target's across verifications.
"""

from __future__ import annotations

import pytest
import torch

from hf_decoding_ext.speculative import SpeculativeDecoding
from hf_decoding_ext.speculative.drafters.eesd import EESDDrafter, break_even_acceptance, draft_cost_fraction
from hf_decoding_ext.speculative.heads.exit_head import ExitHead
from hf_decoding_ext.speculative.policies.thompson import ThompsonLength, expected_draft_length


def _simulate(policy, rate, rounds, seed=0, confidence=lambda g: 0.5, accept=None):
    """Drive ``policy`` like a drafter: draft until it stops (cap ``length()``), accept a prefix by Bernoulli
    trials. Returns the draft lengths."""
    g = torch.Generator().manual_seed(seed)
    lengths = []
    policy.begin()
    for _ in range(rounds):
        confs = []
        while len(confs) < policy.length():
            confs.append(confidence(g))
            if policy.stop(confs[-1]):
                break
        accepted = 0
        for c in confs:
            p = rate if accept is None else accept(c)
            if float(torch.rand((), generator=g)) >= p:
                break
            accepted += 1
        policy.update(len(confs), accepted)
        lengths.append(len(confs))
    return lengths


def test_beta_ts_posterior_converges_and_length_rises_with_the_rate():
    means, lengths = [], []
    for rate in (0.2, 0.5, 0.8, 0.95):
        policy = ThompsonLength(num_tokens=12, seed=1)
        drafted = _simulate(policy, rate, 400, seed=2)
        assert abs(policy.posterior_mean() - rate) < 0.04, (rate, policy.posterior_mean())
        means.append(policy.posterior_mean())
        lengths.append(sum(drafted[-200:]) / 200)
        # the chosen lengths follow the posterior: mean length ~ (1 - theta^K) / (1 - theta)
        assert abs(lengths[-1] - expected_draft_length(rate, 12)) < 0.25 * expected_draft_length(rate, 12) + 0.2
    assert lengths == sorted(lengths) and lengths[-1] > 3 * lengths[0], lengths


def test_beta_ts_update_counts_accepted_and_first_rejection():
    policy = ThompsonLength(num_tokens=6, alpha=2.0, beta=3.0, seed=0)
    policy.update(num_drafted=5, num_accepted=2)
    assert (policy.alpha, policy.beta) == (4.0, 4.0)
    policy.update(num_drafted=3, num_accepted=3)  # fully accepted: no failure observed
    assert (policy.alpha, policy.beta) == (7.0, 4.0)
    policy.begin()  # transient: a new generate() call starts from the prior
    assert (policy.alpha, policy.beta) == (2.0, 3.0)
    keep = ThompsonLength(num_tokens=6, transient=False)
    keep.update(4, 4)
    keep.begin()
    assert keep.alpha == 5.0
    with pytest.raises(ValueError, match="num_accepted"):
        policy.update(2, 3)


def test_seeded_controller_is_reproducible():
    a = _simulate(ThompsonLength(num_tokens=8, seed=7), 0.6, 50)
    b = _simulate(ThompsonLength(num_tokens=8, seed=7), 0.6, 50)
    assert a == b


def test_calibrated_ts_learns_acceptance_per_confidence_bin():
    policy = ThompsonLength(num_tokens=8, mode="calibration", bins=2, seed=3)
    _simulate(policy, None, 600, seed=4, confidence=lambda g: 0.9 if float(torch.rand((), generator=g)) < 0.5
              else 0.1, accept=lambda c: 0.9 if c > 0.5 else 0.2)
    assert abs(policy.posterior_mean(0.9) - 0.9) < 0.05
    assert abs(policy.posterior_mean(0.1) - 0.2) < 0.07
    # a confident token is followed by another draft more often
    hi = sum(not policy.stop(0.9) for _ in range(400)) / 400
    lo = sum(not policy.stop(0.1) for _ in range(400)) / 400
    assert hi > lo + 0.4


def test_controller_arguments_are_validated():
    for kwargs, match in [({"num_tokens": 0}, "num_tokens"), ({"alpha": 0}, "alpha"), ({"beta": -1.0}, "beta"),
                          ({"mode": "ucb"}, "mode"), ({"bins": 0}, "bins"), ({"seed": "x"}, "seed")]:
        with pytest.raises(ValueError, match=match):
            ThompsonLength(**kwargs)
    with pytest.raises(ValueError, match="probability"):
        ThompsonLength().stop(1.5)
    with pytest.raises(ValueError, match="controller"):
        EESDDrafter(head=None, controller="fixed")
    with pytest.raises(ValueError, match="num_tokens"):
        EESDDrafter(head=None, num_tokens=0)
    with pytest.raises(ValueError, match="exit_layer"):
        EESDDrafter(head=None, exit_layer=0)
    with pytest.raises(ValueError, match="head"):
        EESDDrafter(head=3)


def _generate(model, ids, drafter, **kw):
    loop = SpeculativeDecoding(drafter)
    out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=24, do_sample=False,
                         custom_generate=loop, pad_token_id=0, **kw)
    return out, loop


def test_lossless_on_tiny_models(tiny_llama, tiny_qwen2):
    for model in (tiny_llama, tiny_qwen2):
        perturbed = ExitHead.from_base(model, exit_layer=1, init_from_layer=1)
        with torch.no_grad():
            for p in perturbed.layer.mlp.parameters():
                p.mul_(1.3)
        combos = [(None, "beta"), ("untrained", "calibration"), (ExitHead.from_base(model, exit_layer=1,
                  init_from_layer=0), "constant"), (perturbed, "beta"), (perturbed, "calibration")]
        for seed in range(2):
            g = torch.Generator().manual_seed(seed)
            ids = torch.randint(1, model.config.vocab_size, (1, 5 + 3 * seed), generator=g)
            ref = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=24, do_sample=False,
                                 pad_token_id=0)
            for head, controller in combos:
                drafter = EESDDrafter(head=head, exit_layer=1, controller=controller, num_tokens=4, seed=seed)
                out, _ = _generate(model, ids, drafter)
                assert torch.equal(out, ref), (type(model).__name__, seed, head, controller)


def test_exit_equal_to_the_model_has_every_draft_accepted(tiny_llama):
    # extra layer = the model's last layer: the draft is the target itself; a wrong extra-layer cache would diverge
    head = ExitHead.from_base(tiny_llama, exit_layer=1, init_from_layer=1)
    ids = torch.randint(1, 128, (1, 7), generator=torch.Generator().manual_seed(5))
    drafter = EESDDrafter(head=head, controller="constant", num_tokens=3)
    out, loop = _generate(tiny_llama, ids, drafter)
    stats = loop.last_stats
    assert all(s.accepted == s.draft_size for s in stats), [(s.draft_size, s.accepted) for s in stats]
    assert sum(s.appended for s in stats) == 24 and len(stats) == 6  # 3 drafted + 1 bonus per forward
    # Beta-TS grows its posterior mean with full acceptance
    thompson = EESDDrafter(head=head, controller="beta", num_tokens=8, seed=0)
    _generate(tiny_llama, ids, thompson, max_length=None)
    assert thompson.policy.posterior_mean() > 0.8
    assert thompson.summary()["mean_accepted"] == thompson.summary()["mean_drafted"]


def test_head_built_inside_inference_mode(tiny_llama):
    ids = torch.randint(1, 128, (1, 6), generator=torch.Generator().manual_seed(2))
    ref = tiny_llama.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=24, do_sample=False,
                              pad_token_id=0)
    with torch.inference_mode():  # e.g. the parity helpers: the untrained head is built inside generate()
        out, _ = _generate(tiny_llama, ids, EESDDrafter("untrained", exit_layer=1, controller="constant",
                                                        num_tokens=2))
    assert torch.equal(out, ref)


def test_sampling_runs_with_draft_probabilities(tiny_llama):
    ids = torch.randint(1, 128, (1, 6), generator=torch.Generator().manual_seed(1))
    head = ExitHead.from_base(tiny_llama, exit_layer=1, init_from_layer=1)
    loop = SpeculativeDecoding(EESDDrafter(head=head, controller="constant", num_tokens=3), seed=0)
    torch.manual_seed(0)
    out = tiny_llama.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=12, do_sample=True,
                              custom_generate=loop, pad_token_id=0)
    assert out.shape[1] == ids.shape[1] + 12
    assert sum(s.accepted for s in loop.last_stats) > 0  # the exact target as draft: p = q, always accepted


def test_cost_and_break_even(tiny_llama):
    c = draft_cost_fraction(tiny_llama, 1)
    assert 0 < c < 1.5
    assert break_even_acceptance(0.0, 4, 1.0) == pytest.approx(0.0, abs=1e-6)
    a = break_even_acceptance(0.4, 4, 1.1)
    assert (1 - a ** 5) / (1 - a) == pytest.approx(4 * 0.4 + 1.1, rel=1e-6)
    assert break_even_acceptance(0.4, 3) < break_even_acceptance(0.5, 3)
    assert break_even_acceptance(1.0, 4, 1.0) == 1.0


def _real_parity(smollm, n_prompts, n_tokens):
    from hf_decoding_ext.bench.parity import greedy_parity, greedy_references, near_tie_tally
    from hf_decoding_ext.bench.prompts import interleaved_prompts

    model, tokenizer = smollm
    refs = greedy_references(model, tokenizer, interleaved_prompts(n_prompts), n_tokens)
    drafter = EESDDrafter("shipped", controller="beta", seed=0)
    report = greedy_parity(model, {"custom_generate": SpeculativeDecoding(drafter), "do_sample": False}, refs,
                           n_tokens)
    near_tie_tally(model, refs, report.diverged)
    return report


@pytest.mark.real_model
def test_lossless_with_the_shipped_head_real_model(smollm):
    assert draft_cost_fraction(smollm[0], 6) == pytest.approx((7 * 3.54 + 28.3) / 134.5, abs=0.01)
    _real_parity(smollm, 2, 32)


@pytest.mark.slow
@pytest.mark.real_model
def test_lossless_with_the_shipped_head_more_prompts_real_model(smollm):
    report = _real_parity(smollm, 6, 48)
    assert report.tokens_per_forward > 1.0  # the trained exit's drafts are accepted at times
