"""SPACE (arXiv 2402.11809): SAR batches and loss, the auto-correct decoding loop (lossless w.r.t. the model's own
greedy generate()), and a seconds-long SAR fine-tune of a tiny model that makes it emit > 1 token per forward."""

from __future__ import annotations

import sys

import random
from pathlib import Path

import pytest
import torch
from conftest import _char_tokenizer, _tiny_gpt2, _tiny_llama, assert_cache_equals_recompute

from hf_decoding_ext.speculative.space import (
    DEFAULT_K,
    DEFAULT_P_SAR,
    MASK_TOKEN,
    SPACEDecoding,
    sar_example,
    space_batches,
    space_loss,
)
from hf_decoding_ext.training.finetune import (
    OBJECTIVES,
    FineTuneConfig,
    add_special_tokens,
    finetune,
)

MAKERS = {"llama": _tiny_llama, "gpt2": _tiny_gpt2}
PROMPTS = ([13, 14, 15, 16], [40, 77, 5], [90, 91, 92, 93, 94, 95, 96], [7])


def _with_mask(arch="llama"):
    model, tok = MAKERS[arch](), _char_tokenizer()
    (mid,) = add_special_tokens(model, tok, [MASK_TOKEN])
    return model, tok, mid


def _counting(n=64, length=40):
    """Learnable synthetic data: counting sequences (token 3 + (start + j) mod 100)."""
    return [{"input_ids": [3 + ((i * 7) + j) % 100 for j in range(length)], "response_start": 4} for i in range(n)]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A tiny llama SAR-fine-tuned (full, 400 steps, ~4 s on one CPU thread) on counting sequences."""
    model, tok = _tiny_llama(), _char_tokenizer()
    cfg = FineTuneConfig(steps=400, batch_size=16, lr=3e-3, mode="full", warmup=5, max_length=64, log_every=1000,
                         checkpoint_every=10_000)
    torch.manual_seed(0)
    model = finetune(model, tok, space_batches(_counting(), cfg, tok), space_loss,
                     tmp_path_factory.mktemp("space"), cfg, progress=False, resume=False)
    return model.eval(), tok


def _greedy(model, prompt, **kw):
    x = torch.tensor([prompt])
    return model.generate(x, attention_mask=torch.ones_like(x), do_sample=False, pad_token_id=0, **kw)


def _space(model, prompt, loop, **kw):
    return _greedy(model, prompt, custom_generate=loop, **kw)


# ------------------------------------------------------------------------------------------------ (a) lossless
@pytest.mark.parametrize("arch", ["llama", "gpt2"])
@pytest.mark.parametrize("k", [1, 3, DEFAULT_K])
def test_lossless_untrained(arch, k):
    model, _, _ = _with_mask(arch)
    loop = SPACEDecoding(k=k)
    for prompt in PROMPTS:
        for n in (1, 2, 7, 25):
            ref = _greedy(model, prompt, max_new_tokens=n)
            out = _space(model, prompt, loop, max_new_tokens=n)
            assert torch.equal(out, ref), (prompt, n)
            assert out.shape[1] == len(prompt) + n  # max_new_tokens exact
            assert loop.last_stats["tokens"] == n


def test_lossless_trained_and_eos(trained):
    model, _ = trained
    loop = SPACEDecoding()
    for prompt in PROMPTS:
        for n in (3, 11, 30):
            ref = _greedy(model, prompt, max_new_tokens=n)
            assert torch.equal(_space(model, prompt, loop, max_new_tokens=n), ref)
        ref = _greedy(model, prompt, max_new_tokens=30)
        eos = int(ref[0, len(prompt) + 9])  # a token the greedy output produces mid-run (inside an accepted run)
        ref_eos = _greedy(model, prompt, max_new_tokens=30, eos_token_id=eos)
        out = _space(model, prompt, loop, max_new_tokens=30, eos_token_id=eos)
        assert torch.equal(out, ref_eos)
        assert int(out[0, -1]) == eos


def test_output_scores_match(trained):
    model, _ = trained
    kw = {"max_new_tokens": 12, "return_dict_in_generate": True, "output_scores": True}
    ref = _greedy(model, PROMPTS[0], **kw)
    out = _space(model, PROMPTS[0], SPACEDecoding(), **kw)
    assert torch.equal(out.sequences, ref.sequences)
    assert len(out.scores) == len(ref.scores) == 12
    for a, b in zip(out.scores, ref.scores):
        torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)
    assert out.space_stats["tokens"] == 12


# ------------------------------------------------------------------------------------------------ (b) cache
@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_cache_equals_recomputation(arch, trained):
    from transformers import DynamicCache

    model = trained[0] if arch == "llama" else _with_mask(arch)[0]
    prompt = PROMPTS[0]
    cache = DynamicCache(config=model.config)
    out = _space(model, prompt, SPACEDecoding(), max_new_tokens=20, cache=cache)
    n = cache.get_seq_length()
    assert out.shape[1] - 2 <= n <= out.shape[1]  # committed tokens only (the last one is fed next step)
    assert_cache_equals_recompute(model, cache, out[:, :n], atol=1e-4)


# ------------------------------------------------------------------------------------------------ (c) speed-up
def test_sar_finetune_gives_tokens_per_forward_above_one(trained):
    """Measured (400 steps, ~4 s): 4.29 tokens per forward on the three counting prompts (mask accuracy 1.0 at the
    end of training); the untrained model with a mask token: 1.03. Thresholds: > 2.5 trained, < 1.3 untrained."""
    model, _ = trained
    loop = SPACEDecoding()
    tpf = []
    for prompt in ([13, 14, 15, 16], [53, 54, 55], [90, 91, 92, 93, 94]):
        _space(model, prompt, loop, max_new_tokens=30)
        st = loop.last_stats
        assert st["tokens"] == 30 and st["forwards"] == len(st["accepted_per_step"])
        assert max(st["accepted_per_step"]) <= DEFAULT_K
        tpf.append(st["tokens_per_forward"])
    assert sum(tpf) / len(tpf) > 2.5, tpf
    untrained, _, _ = _with_mask()
    _space(untrained, [13, 14, 15, 16], loop, max_new_tokens=30)
    assert loop.last_stats["tokens_per_forward"] < 1.3


# ------------------------------------------------------------------------------------------------ (d) SAR data
def test_sar_example_masks_consecutive_group():
    ids = list(range(10, 40))
    mid, k = 200, DEFAULT_K
    for seed in range(20):
        inp, lab, start = sar_example(ids, 5, mid, k=k, p_sar=1.0, rng=random.Random(seed))
        assert start >= 5
        # official layout: the response is cut after k + 1 mask tokens labelled with the true tokens; the token
        # before the group predicts ids[start] (AR), mask j predicts ids[start + j + 1] (k mask predictions)
        assert inp[:start] == ids[:start] and inp[start:] == [mid] * (k + 1)
        assert lab[start:] == ids[start:start + k + 1]
        assert lab[:5] == [-100] * 5 and lab[5:start] == ids[5:start]
    inp, lab, start = sar_example(ids, 5, mid, k=k, p_sar=0.0)
    assert start == -1 and inp == ids and lab == [-100] * 5 + ids[5:]
    short = list(range(10, 19))  # response of 4 < k + 1 tokens: AR example
    assert sar_example(short, 5, mid, k=k, p_sar=1.0)[2] == -1


def test_space_batches_and_loss():
    model, tok, mid = _with_mask()
    cfg = FineTuneConfig(steps=1, batch_size=8, mode="full")
    stream = space_batches(_counting(16), cfg, tok)(0)
    assert MASK_TOKEN in cfg.extra_tokens
    sar_rows = ar_rows = 0
    for _ in range(10):
        b = next(stream)
        assert int(b["mask_token_id"]) == mid
        for r in range(b["input_ids"].shape[0]):
            s = int(b["mask_start"][r])
            row = b["input_ids"][r][b["attention_mask"][r].bool()]
            if s < 0:
                ar_rows += 1
                assert not (row == mid).any()
                continue
            sar_rows += 1
            assert row[s:].tolist() == [mid] * (DEFAULT_K + 1) and len(row) == s + DEFAULT_K + 1
            assert not (row[:s] == mid).any()
        loss, m = space_loss(model, b)
        assert torch.isfinite(loss) and m["mask_tokens"] == DEFAULT_K * int((b["mask_start"] >= 0).sum())
    assert 0.3 < sar_rows / (sar_rows + ar_rows) < 0.7  # official mask_prob 0.5
    assert DEFAULT_P_SAR == 0.5
    assert OBJECTIVES["space"] == (space_loss, space_batches)


# ------------------------------------------------------------------------------------------------ (e) validation
def test_validation_and_refusals():
    for bad in (0, -1, 1.5, True):
        with pytest.raises(ValueError, match="k must"):
            SPACEDecoding(k=bad)
    with pytest.raises(ValueError, match="mask_token_id"):
        SPACEDecoding(mask_token_id=-3)
    plain = _tiny_llama()
    with pytest.raises(ValueError, match="no SPACE mask token"):
        _space(plain, [5, 6], SPACEDecoding(), max_new_tokens=3)
    with pytest.raises(ValueError, match="outside"):
        _space(plain, [5, 6], SPACEDecoding(mask_token_id=10_000), max_new_tokens=3)
    assert torch.equal(_space(plain, [5, 6], SPACEDecoding(mask_token_id=4), max_new_tokens=5),
                       _greedy(plain, [5, 6], max_new_tokens=5))  # explicit id: any model
    model, _, _ = _with_mask()
    x = torch.tensor([[5, 6, 7], [8, 9, 10]])
    with pytest.raises(ValueError, match="batch size 1"):
        model.generate(x, attention_mask=torch.ones_like(x), do_sample=False, max_new_tokens=3, pad_token_id=0,
                       custom_generate=SPACEDecoding())
    with pytest.raises(ValueError, match="greedy only"):
        model.generate(torch.tensor([[5, 6]]), do_sample=True, max_new_tokens=3, pad_token_id=0,
                       custom_generate=SPACEDecoding())
    with pytest.raises(ValueError, match="k must"):
        space_batches(_counting(4), FineTuneConfig(), _char_tokenizer(), k=0)
    with pytest.raises(ValueError, match="p_sar"):
        space_batches(_counting(4), FineTuneConfig(), _char_tokenizer(), p_sar=1.5)


def test_run_finetune_finds_the_space_objective(monkeypatch):
    """`hf-decoding-ext finetune --objective space` reaches SPACE's objective through the lazy import, even when
    nothing imported the method module first."""
    from hf_decoding_ext.training import finetune as ft

    monkeypatch.setattr(ft, "OBJECTIVES", {"ntp": ft.next_token_loss})
    monkeypatch.delitem(sys.modules, "hf_decoding_ext.speculative.space", raising=False)
    loss_fn, batches = ft.resolve_objective("space")
    assert loss_fn.__name__ == "space_loss" and batches.__name__ == "space_batches"
    with pytest.raises(ValueError, match="'nope'"):
        ft.resolve_objective("nope")


# ------------------------------------------------------------------------------------------------ (e) real model
RESULTS = Path(__file__).resolve().parents[1] / "results" / "space_eval.json"


@pytest.mark.real_model
def test_real_model_shipped_finetune_lossless_above_one_token_per_forward():
    """The shipped SAR fine-tune of the default model (hf_decoding_ext/data/finetuned/space): SPACE's output equals
    the fine-tune's own greedy generate() on 2 benchmark prompts x 24 tokens and it takes more than one token per
    forward (measured 48 tokens in 40 forwards, 1.20; threshold 1.05; the 18-prompt evaluation measured 1.23, and 1.16 for the untrained
    mask token: results/space_eval.json decides the comparison); the same loop on the untrained mask token stays near 1."""
    from hf_decoding_ext.bench.prompts import load_prompts
    from hf_decoding_ext.core.models import encode_prompts
    from hf_decoding_ext.speculative.space import load_space_model

    model, tok = load_space_model()
    loop = SPACEDecoding(tokenizer=tok)
    tokens = forwards = 0
    for row in load_prompts(per_category=1)[:2]:
        x = encode_prompts(tok, row["prompt"])["input_ids"]
        kw = dict(attention_mask=torch.ones_like(x), do_sample=False, max_new_tokens=24, pad_token_id=tok.pad_token_id)
        ref = model.generate(x, **kw)
        out = model.generate(x, custom_generate=loop, **kw)
        assert torch.equal(out, ref)
        tokens += loop.last_stats["tokens"]
        forwards += loop.last_stats["forwards"]
    assert tokens / forwards > 1.05, (tokens, forwards)


def test_committed_results_decide_the_registry_verdict():
    """results/space_eval.json (scripts/eval_space.py): SPACE identical to the fine-tune's greedy output on every
    prompt. The registry's effect (the paper's claim: more tokens per forward at maintained quality) is "reproduced"
    exactly when SPACE's tokens per forward beat the control (the same loop on the original model with an untrained
    mask token) by more than two standard errors of the paired per-prompt difference AND the fine-tune keeps the
    original's quality within the tolerance stated for issue 24: greedy agreement with the original >= 0.5 and the
    task metric within 1 answer of the original's."""
    import json

    from hf_decoding_ext.registry import get_method

    res = json.loads(RESULTS.read_text())
    assert res["space"]["identical_to_greedy"] == 1.0
    a = res["space"]["per_prompt_tokens_per_forward"]
    b = res["control_untrained_mask"]["per_prompt_tokens_per_forward"]
    assert len(a) == len(b) == res["settings"]["prompts"]
    diffs = [x - y for x, y in zip(a, b)]
    mean = sum(diffs) / len(diffs)
    se = (sum((d - mean) ** 2 for d in diffs) / (len(diffs) - 1) / len(diffs)) ** 0.5
    ft = res["finetuned_greedy"]
    quality = (ft["agreement_with_original"]["agreement"] >= 0.5
               and ft["task"]["correct"] >= res["original"]["task"]["correct"] - 1)
    assert get_method("space").effect == ("reproduced" if mean > 2 * se and quality else "not reproduced")
