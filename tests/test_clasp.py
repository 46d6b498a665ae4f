"""CLaSp (arXiv 2505.24196): the layer DP's single-token layer calls, the DP against a reference recurrence and an
exhaustive search, the drafter's losslessness on tiny models, its persistence schedule, and on the real model its
parity with greedy and its acceptance against a fixed evenly spread skip set."""

from __future__ import annotations

import copy
import itertools
import math

import pytest
import torch

from hf_decoding_ext.core.anatomy import (
    OutputCapture,
    crop_layers,
    decoder_layers,
    final_norm,
    skip_layers,
)
from hf_decoding_ext.speculative import SpeculativeDecoding
from hf_decoding_ext.speculative.drafters.clasp import (
    CLaSpDrafter,
    layer_dp,
    run_layers,
    uniform_skip_set,
)


def _six_layers(arch: str):
    torch.manual_seed(0)
    if arch == "llama":
        from transformers import LlamaConfig, LlamaForCausalLM

        cfg = LlamaConfig(vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=6,
                          num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                          bos_token_id=1, eos_token_id=2, pad_token_id=0)
        return LlamaForCausalLM(cfg).eval()
    from transformers import GPT2Config, GPT2LMHeadModel

    cfg = GPT2Config(vocab_size=128, n_embd=32, n_layer=6, n_head=4, n_positions=512, bos_token_id=1,
                     eos_token_id=2, pad_token_id=0)
    return GPT2LMHeadModel(cfg).eval()


@pytest.fixture(scope="module", params=["llama", "gpt2"])
def six(request):
    return _six_layers(request.param)


@pytest.fixture(scope="module")
def six_llama():
    return _six_layers("llama")


def _context(model, seed: int, n: int = 12):
    """A prompt's full forward: the last token's hidden states at every layer, the cache, the token."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, 128, (1, n), generator=g)
    with torch.no_grad():
        out = model(input_ids=ids, output_hidden_states=True, use_cache=True)
    return [h[0, -1] for h in out.hidden_states], out.past_key_values, ids


def _snapshot(cache):
    return [(layer.keys.clone(), layer.values.clone()) for layer in cache.layers]


def _unchanged(cache, snap):
    return all(torch.equal(layer.keys, k) and torch.equal(layer.values, v) for layer, (k, v) in zip(cache.layers, snap))


# --------------------------------------------------------------------------------------------- layer calls
@torch.no_grad()
def test_single_token_layer_calls_reproduce_the_full_model_and_leave_the_cache(six):
    """Executing every layer on the embedding with the context's cached KV gives the full model's hidden states
    (rotary position and mask right); rows of one call do not see each other; the cache is never written."""
    targets, cache, ids = _context(six, 0)
    n = ids.shape[1]
    snap = _snapshot(cache)
    h = targets[0][None]
    for i, layer in enumerate(decoder_layers(six)):
        h = run_layers(six, i, h, cache, n - 1, n - 1)
        want = targets[i + 1] if i + 1 < len(targets) - 1 else None
        if want is not None:
            torch.testing.assert_close(h[0], want, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(final_norm(six)(h)[0], targets[-1], rtol=1e-4, atol=1e-5)
    # three rows in one call = three separate calls (each row attends to the context and itself only)
    rows = torch.stack([targets[0], targets[2], torch.randn_like(targets[0])])
    together = run_layers(six, 3, rows, cache, n - 1, n - 1)
    apart = torch.cat([run_layers(six, 3, r[None], cache, n - 1, n - 1) for r in rows])
    torch.testing.assert_close(together, apart, rtol=1e-4, atol=1e-5)
    # the wrong position (rotary) or a shorter context changes the result (llama) / the context matters (both)
    assert not torch.allclose(run_layers(six, 3, rows, cache, n - 3, n - 1), together, atol=1e-4)
    assert _unchanged(cache, snap) and all(layer.get_seq_length() == n for layer in cache.layers)


@torch.no_grad()
def test_dp_without_skips_is_the_full_model(six):
    targets, cache, ids = _context(six, 1)
    out = layer_dp(six, targets, cache, ids.shape[1] - 1, ids.shape[1] - 1, 0)
    assert out.skip == () and out.keep == tuple(range(6))
    torch.testing.assert_close(out.scores[:, 0], torch.ones(7), rtol=0, atol=1e-5)
    assert (out.layer_calls, out.rows) == (6, 6)


# --------------------------------------------------------------------------------------------- the DP
def _oracle(model, cache, length, token, executed):
    """The token's hidden state after running only the ``executed`` layers (in order) on a copy of the full model's
    cache cropped to the context: through the library's layer-skip view (an independent code path)."""
    if not executed:
        return None
    work = copy.deepcopy(cache)
    crop_layers(work, length)
    view = skip_layers(model, executed, share_cache=True)
    with OutputCapture(decoder_layers(model)[executed[-1]]) as cap:
        view(input_ids=token, attention_mask=torch.ones(1, length + 1, dtype=torch.long),
             position_ids=torch.tensor([[length]]), past_key_values=work)
    return cap.output[0, -1]


def _cos(a, b):
    return float(torch.nn.functional.cosine_similarity(a.float(), b.float(), dim=0))


def _reference_dp(model, targets, cache, length, token, m):
    """The paper's recurrence written plainly: every state (i, j), j <= min(i, M), one path at a time."""
    total = len(targets) - 1
    norm = final_norm(model)
    g = {(0, 0): (targets[0], [])}
    table, choice = {}, {}
    for i in range(1, total + 1):
        for j in range(min(i, m) + 1):
            cands = []
            if j <= i - 1 and (i - 1, j) in g:
                path = g[(i - 1, j)][1] + [i - 1]
                cands.append(("execute", _oracle(model, cache, length, token, path), path))
            if j >= 1 and (i - 1, j - 1) in g:
                cands.append(("skip",) + g[(i - 1, j - 1)])
            sims = [_cos(norm(c[1]) if i == total else c[1], targets[i]) for c in cands]
            best = max(range(len(cands)), key=lambda r: (sims[r], -r))
            g[(i, j)] = cands[best][1:]
            table[(i, j)], choice[(i, j)] = sims[best], cands[best][0]
    executed = g[(total, m)][1]
    return tuple(i for i in range(total) if i not in executed), table


@pytest.mark.parametrize("seed", [0, 1, 2])
@torch.no_grad()
def test_dp_matches_the_reference_recurrence(six_llama, seed):
    targets, cache, ids = _context(six_llama, seed)
    n = ids.shape[1]
    snap = _snapshot(cache)
    out = layer_dp(six_llama, targets, cache, n - 1, n - 1, 2)
    ref_skip, table = _reference_dp(six_llama, targets, cache, n - 1, ids[:, -1:], 2)
    assert out.skip == ref_skip and len(out.skip) == 2
    computed = ~torch.isnan(out.scores)
    for (i, j), sim in table.items():
        if computed[i, j]:
            assert abs(float(out.scores[i, j]) - sim) < 1e-4, (i, j)
    # pruned states are exactly those that cannot reach (6, 2); the DP's own layer calls are 6 of <= 3 rows
    assert all(computed[i, j] == (j >= 2 - (6 - i)) for (i, j) in table)
    assert out.layer_calls == 6 and out.rows == sum(min(i - 1, 2) - max(0, 2 - 6 + i) + 1 for i in range(1, 7))
    assert _unchanged(cache, snap)


@torch.no_grad()
def test_dp_against_exhaustive_search(six_llama):
    """The DP is approximate (one state per (i, j)): its set scores within a small gap of the best of the C(6, 2)
    = 15 sets, and its own score is the score of its set. Gap recorded over 6 contexts."""
    norm = final_norm(six_llama)
    gaps, optimal = [], 0
    for seed in range(6):
        targets, cache, ids = _context(six_llama, 10 + seed)
        n = ids.shape[1]
        out = layer_dp(six_llama, targets, cache, n - 1, n - 1, 2)
        score = {}
        for skip in itertools.combinations(range(6), 2):
            keep = [i for i in range(6) if i not in skip]
            score[skip] = _cos(norm(_oracle(six_llama, cache, n - 1, ids[:, -1:], keep)), targets[-1])
        assert abs(score[out.skip] - out.score) < 1e-4
        best = max(score.values())
        assert out.score <= best + 1e-6
        gaps.append(best - out.score)
        optimal += out.skip == max(score, key=score.get)
        assert out.score >= sorted(score.values())[len(score) // 2] - 1e-6  # at least the median set
    print(f"\nCLaSp DP vs exhaustive (L=6, M=2, 6 contexts): optimal {optimal}/6, mean gap "
          f"{sum(gaps) / len(gaps):.4f}, max gap {max(gaps):.4f} (cosine)")


def test_uniform_skip_set():
    assert uniform_skip_set(30, 14) == tuple(range(1, 29, 2))
    assert uniform_skip_set(6, 2) == (1, 3)
    assert uniform_skip_set(30, 9) == (1, 4, 7, 10, 13, 16, 19, 22, 25)
    s = uniform_skip_set(30, 20)
    assert len(s) == 20 and 0 not in s and 29 not in s
    with pytest.raises(ValueError, match="29"):
        uniform_skip_set(30, 29)


# --------------------------------------------------------------------------------------------- the drafter
def _generate(model, drafter, prompt, n=24, do_sample=False, **kw):
    loop = SpeculativeDecoding(drafter)
    out = model.generate(prompt, max_new_tokens=n, min_new_tokens=n, do_sample=do_sample, custom_generate=loop,
                         **kw)
    return out, loop


@pytest.mark.parametrize("m,interval", [(2, 1), (3, 3)])
@torch.no_grad()
def test_lossless_on_tiny_models(six, m, interval):
    accepted = drafted = 0
    for seed in range(2):
        torch.manual_seed(seed)
        prompt = torch.randint(3, 128, (1, 6 + seed))
        ref = six.generate(prompt, max_new_tokens=20, min_new_tokens=20, do_sample=False)
        drafter = CLaSpDrafter(num_skip=m, update_interval=interval, num_tokens=4, confidence_threshold=0.0)
        out, loop = _generate(six, drafter, prompt, n=20)
        assert torch.equal(out, ref)
        st = drafter.stats
        assert st["dp_runs"] == math.ceil(st["rounds"] / interval) and st["dp_runs"] == len(drafter.skip_sets)
        assert all(len(s) == m for s in drafter.skip_sets)
        assert loop.last_stats[0].draft_size == 0  # the first round only prefills (no set yet)
        assert all(s.draft_size > 0 for s in loop.last_stats[1:-1])
        accepted += sum(s.accepted for s in loop.last_stats)
        drafted += st["drafted"]
        assert st["draft_layer_calls"] == st["draft_forwards"] * (6 - m)
    assert drafted > 0 and accepted > 0


@torch.no_grad()
def test_the_drafters_dp_reads_the_last_accepted_token_at_its_position(six):
    """With M = 0 the draft is the full model (every draft token accepted) and the DP after each verification must
    rebuild the last accepted token's hidden states exactly: right row, right context length, right rotary
    position even when accepted tokens follow the committed ones in the cache."""
    torch.manual_seed(5)
    prompt = torch.randint(3, 128, (1, 9))
    drafter = CLaSpDrafter(num_skip=0, update_interval=1, num_tokens=3, confidence_threshold=0.0)
    _, loop = _generate(six, drafter, prompt, n=16)
    assert sum(s.accepted for s in loop.last_stats) >= 8
    assert len(drafter.dp_scores) == len(loop.last_stats) and min(drafter.dp_scores) > 1 - 1e-5


@torch.no_grad()
def test_lossless_on_the_two_layer_fixtures(tiny_model):
    for seed in range(2):
        torch.manual_seed(seed)
        prompt = torch.randint(3, 128, (1, 7))
        ref = tiny_model.generate(prompt, max_new_tokens=16, min_new_tokens=16, do_sample=False)
        out, _ = _generate(tiny_model, CLaSpDrafter(num_skip=1, update_interval=1, confidence_threshold=0.0), prompt,
                           n=16)
        assert torch.equal(out, ref)


@torch.no_grad()
def test_drafts_use_the_latest_dp_set_and_a_fixed_set_never_runs_the_dp(six_llama):
    seen = []

    class Spy(CLaSpDrafter):
        def propose(self, state):
            draft = super().propose(state)
            seen.append((draft.info.get("skip"), tuple(self.skip_sets)))
            return draft

    torch.manual_seed(3)
    prompt = torch.randint(3, 128, (1, 8))
    _generate(six_llama, Spy(num_skip=2, update_interval=3, confidence_threshold=0.0), prompt)
    for skip, sets in seen[1:]:
        assert skip == sets[-1]
    fixed = CLaSpDrafter(fixed_skip=[1, 3], confidence_threshold=0.0)
    out, loop = _generate(six_llama, fixed, prompt)
    assert fixed.stats["dp_runs"] == 0 and fixed.skip_sets == [] and loop.last_stats[0].draft_size > 0
    assert torch.equal(out, six_llama.generate(prompt, max_new_tokens=24, min_new_tokens=24, do_sample=False))
    costs = fixed.cost_fractions(six_llama)
    assert 0 < costs["draft_token"] < 1 and costs["dp"] == 0
    assert math.isclose(costs["draft"], fixed.stats["draft_forwards"] * costs["draft_token"])


@torch.no_grad()
def test_sampling_runs_with_draft_distributions(six_llama):
    torch.manual_seed(0)
    prompt = torch.randint(3, 128, (1, 8))
    drafter = CLaSpDrafter(num_skip=2, confidence_threshold=0.0)
    out, loop = _generate(six_llama, drafter, prompt, n=16, do_sample=True, top_k=0)
    assert out.shape[1] == prompt.shape[1] + 16 and drafter.stats["drafted"] > 0
    assert sum(s.accepted for s in loop.last_stats) > 0  # sampled drafts, speculative-sampling acceptance


def test_argument_validation(tiny_llama):
    for kw, bad in [({"num_skip": -1}, "-1"), ({"num_skip": 1.5}, "1.5"), ({"skip_ratio": 1.0}, "1.0"),
                    ({"update_interval": 0}, "0"), ({"num_tokens": 0}, "0"), ({"confidence_threshold": 1.0}, "1.0"),
                    ({"fixed_skip": [1, 1]}, r"\[1, 1\]"), ({"fixed_skip": 3}, "3"),
                    ({"num_skip": 2, "fixed_skip": [1]}, "2")]:
        with pytest.raises(ValueError, match=bad):
            CLaSpDrafter(**kw)
    with pytest.raises(ValueError, match="num_skip"):
        _generate(tiny_llama, CLaSpDrafter(num_skip=2), torch.tensor([[5, 6, 7]]), n=2)
    with pytest.raises(ValueError, match="fixed_skip"):
        _generate(tiny_llama, CLaSpDrafter(fixed_skip=[5]), torch.tensor([[5, 6, 7]]), n=2)
    targets, cache, _ = _context(tiny_llama, 0)
    with pytest.raises(ValueError, match="num_skip"):
        layer_dp(tiny_llama, targets, cache, 11, 11, 2)
    with pytest.raises(ValueError, match="targets"):
        layer_dp(tiny_llama, targets[:-1], cache, 11, 11, 1)


# --------------------------------------------------------------------------------------------- real model
def _real_run(model, refs, drafter_kw, n):
    from hf_decoding_ext.bench.parity import greedy_parity

    loop = SpeculativeDecoding(CLaSpDrafter(**drafter_kw))
    report = greedy_parity(model, {"custom_generate": loop, "do_sample": False}, refs, n)
    return report, loop


@pytest.mark.real_model
def test_real_model_lossless_and_acceptance_against_an_evenly_spread_set(smollm):
    """3 benchmark prompts x 32 tokens: CLaSp's DP sets are token-identical to greedy (up to near-ties) and accept at
    least as many tokens per target forward as the same number of layers skipped evenly (fixed)."""
    from hf_decoding_ext.bench.parity import greedy_references, near_tie_tally
    from hf_decoding_ext.bench.prompts import interleaved_prompts

    model, tokenizer = smollm
    refs = greedy_references(model, tokenizer, interleaved_prompts(3), 32)
    dp, loop = _real_run(model, refs, {}, 32)
    near_tie_tally(model, refs, dp.diverged)
    m = loop.drafter.m
    fixed, _ = _real_run(model, refs, {"fixed_skip": uniform_skip_set(30, m)}, 32)
    print(f"\nCLaSp M={m}: {dp.tokens_per_forward:.2f} tokens/forward (DP sets) vs {fixed.tokens_per_forward:.2f} "
          f"(evenly spread fixed set)")
    assert dp.tokens_per_forward >= fixed.tokens_per_forward


@pytest.mark.real_model
@pytest.mark.slow
@pytest.mark.parametrize("m", [6, 14])
def test_real_model_acceptance_slow(smollm, m):
    from hf_decoding_ext.bench.parity import greedy_references, near_tie_tally
    from hf_decoding_ext.bench.prompts import interleaved_prompts

    model, tokenizer = smollm
    refs = greedy_references(model, tokenizer, interleaved_prompts(12), 32)
    dp, _ = _real_run(model, refs, {"num_skip": m}, 32)
    near_tie_tally(model, refs, dp.diverged)
    fixed, _ = _real_run(model, refs, {"fixed_skip": uniform_skip_set(30, m)}, 32)
    print(f"\nCLaSp M={m}, 12 prompts: {dp.tokens_per_forward:.3f} tokens/forward (DP) vs "
          f"{fixed.tokens_per_forward:.3f} (evenly spread)")
    assert dp.tokens_per_forward >= fixed.tokens_per_forward
