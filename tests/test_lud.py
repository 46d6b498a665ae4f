"""Lexical Unit Decoding (arXiv 2405.15208): unit marking with the original model's confidences, the placeholder
examples and loss, the parallel decoding loop (threshold >= 1 equals greedy generate(); exact KV cache), and a
seconds-long pipeline on a tiny model (next-token "original" model -> units -> LUD fine-tune) that emits > 1 token
per forward."""

from __future__ import annotations

import copy
import random

from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from conftest import _char_tokenizer, _tiny_gpt2, _tiny_llama, assert_cache_equals_recompute
from transformers import DynamicCache

from hf_decoding_ext.speculative.lud import (
    DEFAULT_K,
    PLACEHOLDER_TOKEN,
    LUDDecoding,
    lexical_units,
    load_lud_model,
    load_or_compute_confidences,
    lud_batches,
    lud_loss,
    original_confidences,
    unit_example,
)
from hf_decoding_ext.training.finetune import (
    OBJECTIVES,
    FineTuneConfig,
    add_special_tokens,
    finetune,
    next_token_loss,
)

MAKERS = {"llama": _tiny_llama, "gpt2": _tiny_gpt2}
PROMPTS = ([13, 14, 15, 16], [40, 77, 5], [90, 91, 92, 93, 94, 95, 96], [7])
TINY_ALPHA = 0.6
"""Data threshold of the toy pipeline: its 200-step original predicts the tokens inside a word with probability
~0.7-1 (and a word's first token with ~0.05), so 0.6 separates them."""


WORDS = []
for _i in range(20):  # 20 "words" of 3 to 6 tokens (ids 10..99), each token in one word only
    _start = 10 + sum(len(w) for w in WORDS)
    WORDS.append(list(range(_start, _start + 3 + _i % 4)))


def _blocks(n=48, length=44, seed=0):
    """Learnable data with unit structure: after a 4-token prompt, random words of :data:`WORDS`: a word's first
    token is unpredictable (a unit boundary), the rest of it predictable (a unit of 2 to 5 tokens)."""
    rng = random.Random(seed)
    seqs = []
    for _ in range(n):
        ids = [rng.randrange(3, 103) for _ in range(4)]
        while len(ids) < length:
            ids += WORDS[rng.randrange(len(WORDS))]
        seqs.append({"input_ids": ids[:length], "response_start": 4})
    return seqs


def _greedy(model, prompt, **kw):
    x = torch.tensor([prompt])
    return model.generate(x, attention_mask=torch.ones_like(x), do_sample=False, pad_token_id=0, **kw)


def _lud(model, prompt, loop, **kw):
    return _greedy(model, prompt, custom_generate=loop, **kw)


def _with_placeholder(arch="llama"):
    model, tok = MAKERS[arch](), _char_tokenizer()
    (pid,) = add_special_tokens(model, tok, [PLACEHOLDER_TOKEN])
    return model, tok, pid


@pytest.fixture(scope="module")
def pipeline(tmp_path_factory):
    """The paper's pipeline at toy scale (~10 s on one thread): an "original" tiny llama trained with next-token
    prediction on the word data (it becomes confident inside words), its confidences mark the units, then a copy is
    fine-tuned with the LUD objective. Also returns the LUD loss and placeholder accuracy on fixed batches before and
    after, and the output folder (a full fine-tune: save_pretrained + tokenizer)."""
    torch.manual_seed(0)
    original, tok = _tiny_llama(), _char_tokenizer()
    data = _blocks(1000)  # too many to memorise: the words' first tokens stay uncertain
    cfg0 = FineTuneConfig(steps=200, batch_size=16, lr=3e-3, mode="full", warmup=5, max_length=64, log_every=1000,
                          checkpoint_every=10_000)
    original = finetune(original, tok, data, next_token_loss, tmp_path_factory.mktemp("ntp"), cfg0, progress=False,
                        resume=False).eval()
    model = copy.deepcopy(original)
    out = tmp_path_factory.mktemp("lud")
    cfg = FineTuneConfig(steps=300, batch_size=16, lr=1e-2, mode="full", warmup=5, max_length=64, log_every=10,
                         checkpoint_every=10_000)
    batches = lud_batches(data, cfg, tok, model=original, alpha=TINY_ALPHA)
    add_special_tokens(model, tok, cfg.extra_tokens)  # finetune() finds it there and keeps it
    held = [b for _, b in zip(range(4), batches(12345))]

    def measure(m):
        with torch.no_grad():
            res = [lud_loss(m, b) for b in held]
        return (sum(float(r[0]) for r in res) / len(res), sum(r[1]["placeholder_acc"] for r in res) / len(res))

    before = measure(model)
    model = finetune(model, tok, batches, lud_loss, out, cfg, progress=False, resume=False).eval()
    return original, model, tok, batches.unit_stats, (before, measure(model)), out


# ------------------------------------------------------------------------------------------------ (a) unit data
def test_lexical_units_on_hand_made_confidences():
    conf = [0, 0, .2, .95, .97, .1, .99]
    assert lexical_units(conf, 2, alpha=.9, k=4) == [(2, 1), (3, 2), (5, 1), (6, 1)]
    assert lexical_units(conf, 2, alpha=.96, k=4) == [(i, 1) for i in range(2, 7)]
    assert lexical_units(conf, 2, alpha=.9, k=1) == [(i, 1) for i in range(2, 7)]
    assert lexical_units(conf, 2, alpha=.9, k=4, end=4) == [(2, 1), (3, 1)]
    assert lexical_units([0, 1, 1, 1, 1, 1, 1, 1], 1, alpha=.9, k=3) == [(1, 3), (4, 3), (7, 1)]  # capped at k
    assert lexical_units(conf, 2, alpha=1.0, k=4) == [(i, 1) for i in range(2, 7)]
    assert lexical_units(conf, 7) == []


def test_unit_example_layout():
    ids = list(range(10, 30))  # prompt 10..14 (response_start 5)
    ph = 200
    units = [(5, 1), (6, 3), (9, 2), (11, 1)]
    seen = set()
    for seed in range(40):
        inp, lab, t = unit_example(ids, 5, units, ph, k=4, p_unit=1.0, rng=random.Random(seed))
        seen.add(t)
        m = dict(units)[t]
        assert inp == ids[:t] + [ph] * 4 and len(lab) == len(inp)
        # shifted labels: last real token -> ids[t]; placeholder j -> ids[t + j + 1] inside the unit, else ph (end)
        assert lab[t:] == ids[t:t + m] + [ph] * (4 - m)
        assert lab[:5] == [-100] * 5 and lab[5:t] == ids[5:t]
    assert seen == {5, 6, 9, 11}  # uniform over the units (one-token units teach the end label)
    inp, lab, t = unit_example(ids, 5, units, ph, k=4, p_unit=0.0)
    assert t == -1 and inp == ids and lab == [-100] * 5 + ids[5:]
    assert unit_example(ids, 5, [], ph, k=4, p_unit=1.0)[2] == -1  # no unit: plain example
    inp, lab, t = unit_example(ids, 5, [(5, 1)], ph, k=4, p_unit=1.0)
    assert t == 5 and lab[5:] == [ids[5], ph, ph, ph]  # one-token unit: only end labels from the placeholders
    assert unit_example(ids, 5, units, ph, k=4, p_unit=1.0, train_on_prompt=True)[1][:5] == ids[:5]


def test_original_confidences_match_the_model():
    torch.manual_seed(0)
    model = _tiny_llama()
    seqs = _blocks(3, 20)
    confs = original_confidences(model, seqs)
    with torch.no_grad():
        for s, c in zip(seqs, confs):
            ids = torch.tensor([s["input_ids"]])
            out = model(input_ids=ids, output_hidden_states=True)
            p = out.logits[0, :-1].float().softmax(-1).gather(-1, ids[0, 1:, None])[:, 0]
            torch.testing.assert_close(c[1:], p)
            assert c[0] == 0
            # stored last-layer features (the self-distillation cache): only the lm_head runs, same result
            (via_hidden,) = original_confidences(model, [{"input_ids": s["input_ids"],
                                                          "hidden": out.hidden_states[-1][0]}])
            torch.testing.assert_close(via_hidden, c)
            (resp,) = original_confidences(model, [{"input_ids": s["input_ids"], "response_start": 4,
                                                    "hidden": out.hidden_states[-1][0]}])
            assert not resp[:4].any()  # the response only
            torch.testing.assert_close(resp[4:], c[4:])


def test_confidences_are_cached_next_to_the_features(tmp_path):
    class Data:
        path = tmp_path / "features-x.safetensors"
        train = _blocks(4, 16)
        heldout = ()

    model = _tiny_llama()
    a = load_or_compute_confidences(Data, Data.train, model, progress=False)
    assert (tmp_path / "features-x.lud_conf.safetensors").exists()
    b = load_or_compute_confidences(Data, Data.train, None, progress=False)  # read back, no model needed
    assert all(torch.equal(x, y) for x, y in zip(a, b))
    Data.train = _blocks(5, 16)  # different data: recomputed, and without a model that is an error
    with pytest.raises(ValueError, match="ORIGINAL model"):
        load_or_compute_confidences(Data, Data.train, None, progress=False)


def test_batches_and_loss(pipeline):
    original, _, _, stats, _, _ = pipeline
    model, tok2, pid = _with_placeholder()
    cfg = FineTuneConfig(steps=1, batch_size=8, mode="full")
    stream = lud_batches(_blocks(16), cfg, tok2, model=original, alpha=TINY_ALPHA)(0)
    assert PLACEHOLDER_TOKEN in cfg.extra_tokens
    unit_rows = plain_rows = 0
    for _ in range(8):
        b = next(stream)
        assert int(b["placeholder_token_id"]) == pid
        for r in range(b["input_ids"].shape[0]):
            t = int(b["unit_start"][r])
            row = b["input_ids"][r][b["attention_mask"][r].bool()]
            lab = b["labels"][r][:len(row)]
            if t < 0:
                plain_rows += 1
                assert not (row == pid).any()
                continue
            unit_rows += 1
            assert row[t:].tolist() == [pid] * DEFAULT_K and len(row) == t + DEFAULT_K
            assert not (row[:t] == pid).any()
            # the unit's tokens are labels (at least the first), then end labels
            unit = lab[t:].tolist()
            m = next((i for i, x in enumerate(unit) if x == pid), len(unit))
            assert m >= 1 and all(x == pid for x in unit[m:])
        loss, met = lud_loss(model, b)
        assert torch.isfinite(loss) and met["placeholder_tokens"] == (DEFAULT_K - 1) * int((b["unit_start"] >= 0).sum())
    assert 0.3 < unit_rows / (unit_rows + plain_rows) < 0.7
    assert OBJECTIVES["lud"] == (lud_loss, lud_batches)
    # the trained "original" marks the word structure: a word = a unit of its first token + a unit of the rest
    assert 0.35 < stats["units_ge2"] / stats["units"] < 0.65 and stats["tokens_per_unit"] > 1.5, stats


def test_run_finetune_hands_the_original_model_to_the_builder(monkeypatch, tmp_path):
    """`hf-decoding-ext finetune --objective lud` (run_finetune) passes its model, still the original, to the builder
    (a builder with a `model` keyword); without a model or confidences the builder refuses."""
    import hf_decoding_ext.core.models as models
    import hf_decoding_ext.training.finetune as ft
    import hf_decoding_ext.training.pipeline as pipeline

    tok = _char_tokenizer()
    original = _tiny_llama()
    seen = {}

    def builder(data, config, tokenizer, *, model=None):
        seen["model"] = model
        return lud_batches(data, config, tokenizer, model=model)

    data = SimpleNamespace(train=_blocks(4), heldout=_blocks(1))
    monkeypatch.setattr(models, "load_model", lambda base=None: (original, tok))
    monkeypatch.setattr(pipeline, "prepare_data", lambda *a, **k: data)
    monkeypatch.setattr(ft, "OBJECTIVES", {"lud": (lud_loss, builder)})
    ft.run_finetune("tiny", str(tmp_path / "out"), objective="lud", steps=1, batch_size=2, mode="full",
                    progress=False)
    assert seen["model"] is original
    cfg = FineTuneConfig(steps=1, batch_size=4, mode="full")
    with pytest.raises(ValueError, match="ORIGINAL model"):
        lud_batches(_blocks(4), cfg, tok)


# ------------------------------------------------------------------------------------------------ (b) exactness
@pytest.mark.parametrize("arch", ["llama", "gpt2"])
@pytest.mark.parametrize("k", [1, DEFAULT_K])
def test_threshold_one_equals_greedy_untrained(arch, k):
    model, _, _ = _with_placeholder(arch)
    for threshold in (1.0, 5.0):
        loop = LUDDecoding(k=k, threshold=threshold)
        for prompt in PROMPTS[:2] if threshold > 1 else PROMPTS:
            for n in (1, 20):
                ref = _greedy(model, prompt, max_new_tokens=n)
                out = _lud(model, prompt, loop, max_new_tokens=n)
                assert torch.equal(out, ref), (prompt, n)
                st = loop.last_stats
                assert st["tokens"] == n and st["forwards"] == n and st["forwards_per_token"] == 1.0


def test_threshold_one_equals_greedy_trained_with_processors_eos_and_scores(pipeline):
    _, model, _, _, _, _ = pipeline
    loop = LUDDecoding(threshold=1.0)
    for prompt in PROMPTS[1:3]:
        for kw in ({"max_new_tokens": 25}, {"max_new_tokens": 25, "repetition_penalty": 1.3},
                   {"max_new_tokens": 25, "suppress_tokens": [20, 21]}):
            assert torch.equal(_lud(model, prompt, loop, **kw), _greedy(model, prompt, **kw))
        ref = _greedy(model, prompt, max_new_tokens=25)
        eos = int(ref[0, len(prompt) + 9])
        assert torch.equal(_lud(model, prompt, loop, max_new_tokens=25, eos_token_id=eos),
                           _greedy(model, prompt, max_new_tokens=25, eos_token_id=eos))
    kw = {"max_new_tokens": 12, "return_dict_in_generate": True, "output_scores": True}
    ref = _greedy(model, PROMPTS[0], **kw)
    out = _lud(model, PROMPTS[0], loop, **kw)
    assert torch.equal(out.sequences, ref.sequences) and len(out.scores) == 12
    for a, b in zip(out.scores, ref.scores):
        torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)
    assert out.lud_stats["tokens"] == 12


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_cache_equals_causal_recompute(arch, pipeline):
    model = pipeline[1] if arch == "llama" else _with_placeholder(arch)[0]
    loop = LUDDecoding(threshold=0.0 if arch == "gpt2" else 0.5)  # accept spans (untrained gpt2: threshold 0)
    cache = DynamicCache(config=model.config)
    out = _lud(model, [13, 14, 15, 16], loop, max_new_tokens=20, cache=cache)
    assert max(loop.last_stats["accepted_per_step"]) > 1  # spans were accepted, so placeholders were cropped
    n = cache.get_seq_length()
    assert out.shape[1] - DEFAULT_K <= n < out.shape[1]  # committed tokens only; the last span is fed next time
    assert_cache_equals_recompute(model, cache, out[:, :n], atol=1e-4)


def test_prefilled_user_cache(pipeline):
    _, model, _, _, _, _ = pipeline
    prompt = torch.tensor([[13, 14, 15, 16, 40, 41, 42]])
    loop = LUDDecoding(threshold=0.5)
    ref = model.generate(prompt, max_new_tokens=15, do_sample=False, pad_token_id=0, custom_generate=loop)
    cache = DynamicCache(config=model.config)
    with torch.no_grad():
        model(input_ids=prompt[:, :4], cache=cache, use_cache=True)
    out = model.generate(prompt, max_new_tokens=15, do_sample=False, pad_token_id=0, custom_generate=loop, cache=cache)
    assert torch.equal(out, ref)


# ------------------------------------------------------------------------------------------------ (c) speed-up
def test_finetune_lowers_loss_and_gives_more_than_one_token_per_forward(pipeline):
    """Measured (200 next-token + 300 LUD steps, ~10 s): LUD loss on fixed held batches 1.20 -> 0.73 (the words'
    first tokens stay unpredictable), placeholder accuracy 0.00 -> 0.92; 1.30 / 1.50 / 1.58 tokens per forward at
    threshold 0.3, spans of 1 to 4 (a word's first token cannot be predicted in parallel: a word of L tokens takes 2
    forwards at best); the untrained model: 1.0. Thresholds: loss below 0.75x, accuracy > 0.8, > 1.2 tokens per
    forward and a span >= 3 trained, < 1.1 untrained."""
    _, model, _, _, (before, after), _ = pipeline
    assert after[0] < 0.75 * before[0] and after[1] > 0.8 > before[1] + 0.3, (before, after)
    loop = LUDDecoding(threshold=0.3)
    tpf, spans = [], []
    for prompt in ([13, 14, 15, 16], [44, 96, 44, 93, 11, 12], [53, 54, 55, 10]):
        _lud(model, prompt, loop, max_new_tokens=30)
        st = loop.last_stats
        assert st["tokens"] == 30 and st["forwards"] == len(st["accepted_per_step"]) == sum(st["stops"].values())
        assert max(st["accepted_per_step"]) <= DEFAULT_K
        assert st["forwards_per_token"] == pytest.approx(1 / st["tokens_per_forward"])
        tpf.append(st["tokens_per_forward"])
        spans += st["accepted_per_step"]
    assert sum(tpf) / len(tpf) > 1.2 and max(spans) >= 3, (tpf, spans)
    stricter = LUDDecoding(threshold=0.99)  # a stricter threshold accepts fewer parallel tokens
    _lud(model, [13, 14, 15, 16], stricter, max_new_tokens=30)
    assert stricter.last_stats["tokens_per_forward"] <= tpf[0]
    untrained, _, _ = _with_placeholder()
    _lud(untrained, [13, 14, 15, 16], loop, max_new_tokens=30)
    assert untrained.config.vocab_size == model.config.vocab_size
    assert loop.last_stats["tokens_per_forward"] < 1.1


def test_load_lud_model_reads_a_saved_fine_tune(pipeline, tmp_path):
    _, model, _, _, _, out = pipeline
    loaded, tok = load_lud_model(out)
    x = torch.tensor([[13, 14, 15, 16, 128, 128, 128]])
    with torch.no_grad():
        torch.testing.assert_close(loaded(x).logits, model(x).logits)
    assert tok.convert_tokens_to_ids(PLACEHOLDER_TOKEN) == 128
    loop = LUDDecoding(threshold=0.3)  # the placeholder id comes from the saved config
    assert torch.equal(_lud(loaded, [13, 14, 15, 16], loop, max_new_tokens=12),
                       _lud(model, [13, 14, 15, 16], loop, max_new_tokens=12))
    with pytest.raises(ValueError, match="no LUD fine-tune"):
        load_lud_model(tmp_path)


def test_repetition_control_ends_spans():
    """Processors that allow only token 50 make every parallel prediction a certain repeat: with repetition control
    every span is one token (= greedy), without it the whole window is accepted."""
    model, _, _ = _with_placeholder()
    only_50 = [i for i in range(model.config.vocab_size) if i != 50]
    on = LUDDecoding(threshold=0.0)
    out = _lud(model, [13, 14], on, max_new_tokens=8, suppress_tokens=only_50)
    assert out[0, 2:].tolist() == [50] * 8 and on.last_stats["forwards"] == 8
    assert on.last_stats["stops"]["repetition"] == 8
    off = LUDDecoding(threshold=0.0, repetition_control=False)
    assert torch.equal(_lud(model, [13, 14], off, max_new_tokens=8, suppress_tokens=only_50), out)
    assert off.last_stats["forwards"] == 2 and off.last_stats["accepted_per_step"] == [4, 4]


# ------------------------------------------------------------------------------------------------ (d) validation
def test_validation_and_refusals():
    for bad in (0, -1, 1.5, True):
        with pytest.raises(ValueError, match="k must"):
            LUDDecoding(k=bad)
    for bad in (-0.1, float("nan"), "0.9", True):
        with pytest.raises(ValueError, match="threshold must"):
            LUDDecoding(threshold=bad)
    with pytest.raises(ValueError, match="placeholder_token_id"):
        LUDDecoding(placeholder_token_id=-3)
    with pytest.raises(ValueError, match="repetition_control"):
        LUDDecoding(repetition_control=1)
    plain = _tiny_llama()
    with pytest.raises(ValueError, match="no LUD placeholder token"):
        _lud(plain, [5, 6], LUDDecoding(), max_new_tokens=3)
    with pytest.raises(ValueError, match="outside"):
        _lud(plain, [5, 6], LUDDecoding(placeholder_token_id=10_000), max_new_tokens=3)
    assert torch.equal(_lud(plain, [5, 6], LUDDecoding(placeholder_token_id=4, threshold=1.0), max_new_tokens=5),
                       _greedy(plain, [5, 6], max_new_tokens=5))  # explicit id: any model
    assert torch.equal(_lud(plain, [5, 6], LUDDecoding(k=1), max_new_tokens=5),  # k = 1: no placeholder needed
                       _greedy(plain, [5, 6], max_new_tokens=5))
    model, _, _ = _with_placeholder()
    x = torch.tensor([[5, 6, 7], [8, 9, 10]])
    with pytest.raises(ValueError, match="batch size 1"):
        model.generate(x, attention_mask=torch.ones_like(x), do_sample=False, max_new_tokens=3, pad_token_id=0,
                       custom_generate=LUDDecoding())
    with pytest.raises(ValueError, match="greedy only"):
        model.generate(torch.tensor([[5, 6]]), do_sample=True, max_new_tokens=3, pad_token_id=0,
                       custom_generate=LUDDecoding())
    tok = _char_tokenizer()
    for kw, msg in (({"k": 1}, "k must"), ({"alpha": 0.0}, "alpha"), ({"p_unit": 1.5}, "p_unit")):
        with pytest.raises(ValueError, match=msg):
            lud_batches(_blocks(4), FineTuneConfig(), tok, confidences=[torch.zeros(44)] * 4, **kw)
    with pytest.raises(ValueError, match="confidence rows"):
        lud_batches(_blocks(4), FineTuneConfig(), tok, confidences=[torch.zeros(44)] * 3)


# ------------------------------------------------------------------------------------------------ real model
RESULTS = Path(__file__).resolve().parents[1] / "results"


@pytest.mark.real_model
def test_real_model_shipped_finetune_threshold_one_is_its_greedy_and_lower_thresholds_run():
    """The shipped LUD fine-tune (hf_decoding_ext/data/finetuned/lexical-unit-decoding): the placeholder token is
    added, threshold 1.0 reproduces the fine-tune's greedy generate() on 2 benchmark prompts x 24 tokens, and a lower
    threshold never needs more forwards than tokens (the spans' first token is the greedy one)."""
    from hf_decoding_ext.bench.prompts import load_prompts
    from hf_decoding_ext.core.models import encode_prompts
    from hf_decoding_ext.speculative.lud import load_lud_model

    model, tok = load_lud_model()
    assert PLACEHOLDER_TOKEN in tok.get_vocab()
    exact = LUDDecoding(threshold=1.0, tokenizer=tok)
    loose = LUDDecoding(threshold=0.5, tokenizer=tok)
    for row in load_prompts(per_category=1)[:2]:
        x = encode_prompts(tok, row["prompt"])["input_ids"]
        kw = dict(attention_mask=torch.ones_like(x), do_sample=False, max_new_tokens=24, pad_token_id=tok.pad_token_id)
        ref = model.generate(x, **kw)
        assert torch.equal(model.generate(x, custom_generate=exact, **kw), ref)
        out = model.generate(x, custom_generate=loose, **kw)
        assert out.shape[1] <= ref.shape[1] and torch.equal(out[:, : x.shape[1] + 1], ref[:, : x.shape[1] + 1])
        assert loose.last_stats["forwards"] <= loose.last_stats["tokens"]


def test_committed_results_decide_the_registry_verdict():
    """results/lud_eval.json (scripts/eval_lud.py): threshold 1.0 is the fine-tune's greedy decoding (agreement 1)
    and forwards per token never rise as the threshold falls. The registry's effect (the paper's claim: fewer
    forwards per token at maintained quality) is "reproduced" exactly when the default threshold needs at most 0.9
    forwards per token AND quality holds within the tolerance stated for issue 24 (greedy agreement with the original
    >= 0.5 and the task metric within 1 answer of the original's)."""
    import json

    from hf_decoding_ext.registry import get_method

    ev = json.loads((RESULTS / "lud_eval.json").read_text())
    sweep = {r["threshold"]: r for r in ev["sweep"]}
    assert sweep[1.0]["forwards_per_token"] == 1.0 and sweep[1.0]["agreement_with_finetuned_greedy"]["agreement"] == 1
    fpt = [sweep[t]["forwards_per_token"] for t in sorted(sweep)]
    assert fpt == sorted(fpt), fpt
    spec = get_method("lexical-unit-decoding")
    row = sweep[spec.defaults["threshold"]]
    quality = (row["agreement_with_original"]["agreement"] >= 0.5
               and row["task"]["correct"] >= ev["original"]["task"]["correct"] - 1)
    assert spec.effect == ("reproduced" if row["forwards_per_token"] <= 0.9 and quality else "not reproduced")
