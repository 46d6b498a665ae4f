"""Set Block Decoding (arXiv 2509.04185): the SBD training rows and loss (NTP + MATP with a bidirectional future
block), the Entropy-Bounded sampler, the decoding loop (exact KV caching of committed blocks, equality with a naive
cache-free reference, gamma=0 one reveal per forward, eos inside a block) and a seconds-long SBD fine-tune of a tiny
model that lowers the MATP loss and brings the forwards per token below 1."""

from __future__ import annotations

import random
from pathlib import Path

import pytest
import torch
from conftest import _char_tokenizer, _tiny_gpt2, _tiny_llama, assert_cache_equals_recompute
from transformers import DynamicCache

from hf_decoding_ext.core.entropy import entropy
from hf_decoding_ext.core.tree import additive_mask
from hf_decoding_ext.speculative.set_block_decoding import (
    MASK_TOKEN,
    SetBlockDecoding,
    collate_sbd,
    eb_select,
    sbd_batches,
    sbd_example,
    sbd_loss,
)
from hf_decoding_ext.training.finetune import (
    OBJECTIVES,
    FineTuneConfig,
    add_special_tokens,
    finetune,
    next_token_loss,
    resolve_objective,
)

MAKERS = {"llama": _tiny_llama, "gpt2": _tiny_gpt2}
PROMPTS = ([13, 14, 15, 16], [40, 77, 5], [90, 91, 92, 93, 94, 95, 96])


def _with_mask(arch="llama", peaked=True):
    """A tiny model with the mask token; ``peaked``: lm_head scaled up so that positions' entropies are well apart
    (an untrained model's near-uniform distributions make the EB order hinge on float noise), and no eos."""
    model, tok = MAKERS[arch](), _char_tokenizer()
    (mid,) = add_special_tokens(model, tok, [MASK_TOKEN])
    if peaked:
        with torch.no_grad():
            model.get_output_embeddings().weight.mul_(6.0)
    model.generation_config.eos_token_id = None
    return model.eval(), tok, mid


def _counting(n=64, length=40):
    """Learnable synthetic data: counting sequences (token 3 + (start + j) mod 100)."""
    return [{"input_ids": [3 + ((i * 7) + j) % 100 for j in range(length)], "response_start": 4} for i in range(n)]


def _gen(model, prompt, loop=None, **kw):
    x = torch.tensor([prompt])
    kw.setdefault("do_sample", False)
    if loop is not None:
        kw["custom_generate"] = loop
    return model.generate(x, attention_mask=torch.ones_like(x), pad_token_id=0, **kw)


# ------------------------------------------------------------------------------------------------ training rows
def test_sbd_example_is_hand_computable():
    """block_size 2, every noisy token masked (eta=1): the copy starts at the block holding the response start."""
    ids, rs, mid = [10, 11, 12, 20, 21, 22], 3, 99
    ex = sbd_example(ids, rs, mid, 2, random.Random(0), eta=1.0)
    assert ex["start"] == 2  # blocks [0, 2) [2, 4) [4, 6); the response starts inside [2, 4)
    assert ex["input_ids"] == ids + [99, 99, 99, 99]
    assert ex["position_ids"] == [0, 1, 2, 3, 4, 5, 2, 3, 4, 5]
    assert ex["labels"] == [-100, -100, -100, 20, 21, 22, -100, -100, -100, -100]
    assert ex["mask_labels"] == [-100] * 6 + [-100, 20, 21, 22]  # token 12 is prompt: masked but not a target
    expected = torch.zeros(10, 10, dtype=torch.bool)
    expected[:6, :6] = torch.tril(torch.ones(6, 6, dtype=torch.bool))
    expected[6:8, :2] = True  # block [2, 4): the clean tokens before position 2, and itself
    expected[6:8, 6:8] = True
    expected[8:10, :4] = True  # block [4, 6)
    expected[8:10, 8:10] = True
    assert torch.equal(ex["allowed"], expected)
    clean = sbd_example(ids, rs, mid, 2, random.Random(0), eta=0.0)  # no mask: no MATP target
    assert clean["input_ids"] == ids + ids[2:] and set(clean["mask_labels"]) == {-100}
    whole = sbd_example(ids, rs, mid, 4, random.Random(0), train_on_prompt=True, eta=1.0)
    assert whole["start"] == 0 and whole["mask_labels"][6:] == ids and whole["labels"][:6] == ids


@pytest.mark.parametrize("seed", range(12))
def test_sbd_example_blocks_masks_and_attention(seed):
    ids, rs, mid, k = list(range(10, 40)), 5, 99, 4
    ex = sbd_example(ids, rs, mid, k, random.Random(seed))
    n, start = len(ids), ex["start"]
    assert start == 4 and ex["labels"] == [-100] * rs + ids[rs:] + [-100] * (n - start)
    noisy = ex["input_ids"][n:]
    assert len(noisy) == n - start and ex["position_ids"][n:] == list(range(start, n))
    for j, p in enumerate(range(start, n)):
        assert noisy[j] in (mid, ids[p])
        assert ex["mask_labels"][n + j] == (ids[p] if noisy[j] == mid and p >= rs else -100)
        b0 = (p // k) * k
        row = ex["allowed"][n + j]
        assert row[:b0].all() and not row[b0:n].any()  # the clean past before the block only
        same = [n + q - start for q in range(b0, min(b0 + k, n))]
        assert row[same].all() and row[n:].sum() == len(same)  # its whole block, no other block
    rates = [sum(v == mid for v in sbd_example(ids, rs, mid, k, random.Random(s))["input_ids"][n:]) / (n - start)
             for s in range(200)]
    assert 0.4 < sum(rates) / len(rates) < 0.6  # eta ~ U(0, 1) per sequence: half masked on average
    assert min(rates) < 0.15 and max(rates) > 0.85
    with pytest.raises(ValueError, match="block_size"):
        sbd_example(ids, rs, mid, 0)
    with pytest.raises(ValueError, match="response_start"):
        sbd_example(ids, 31, mid, 4)


def test_collate_pads_with_isolated_positions():
    mid = 99
    rows = [sbd_example(list(range(10, 20)), 4, mid, 3, random.Random(1)),
            sbd_example(list(range(10, 15)), 2, mid, 3, random.Random(2))]
    b = collate_sbd(rows, pad_id=0)
    t = len(rows[0]["input_ids"])
    assert b["input_ids"].shape == (2, t) and b["allowed"].shape == (2, t, t)
    n1 = len(rows[1]["input_ids"])
    assert (b["input_ids"][1, n1:] == 0).all() and (b["labels"][1, n1:] == -100).all()
    assert (b["mask_labels"][1, n1:] == -100).all()
    assert not b["allowed"][1, :n1, n1:].any() and torch.equal(b["allowed"][1, n1:, n1:], torch.eye(t - n1).bool())


def test_loss_parts_match_causal_and_inference_layouts():
    """NTP part = the plain causal loss on the clean sequence (clean tokens never see the noisy copy); the loss is one
    mean over NTP and MATP targets; the logits of a noisy block = those of the decoding forward (clean prefix
    causal, then the block bidirectionally)."""
    model, _, mid = _with_mask()
    ids, rs, k = [3 + (j * 5) % 90 for j in range(24)], 6, 4
    ex = sbd_example(ids, rs, mid, k, random.Random(3), eta=0.5)
    batch = collate_sbd([ex], pad_id=0)
    with torch.no_grad():
        loss, metrics = sbd_loss(model, batch)
        x = torch.tensor([ids])
        labels = torch.tensor([[-100] * rs + ids[rs:]])
        ntp, _ = next_token_loss(model, {"input_ids": x, "attention_mask": torch.ones_like(x), "labels": labels})
        assert metrics["ntp_loss"] == pytest.approx(float(ntp), abs=1e-5)
        n_ntp, n_mask = metrics["tokens"], metrics["mask_tokens"]
        assert n_ntp == len(ids) - rs and n_mask == sum(1 for v in ex["mask_labels"] if v != -100) > 0
        mean = (n_ntp * metrics["ntp_loss"] + n_mask * metrics["matp_loss"]) / (n_ntp + n_mask)
        assert float(loss) == pytest.approx(mean, abs=1e-5)
        full = model(input_ids=batch["input_ids"], attention_mask=additive_mask(batch["allowed"]),
                     position_ids=batch["position_ids"]).logits[0]
        n, start = len(ids), ex["start"]
        for b0 in range(start, n, k):
            b1 = min(b0 + k, n)
            inp = ids[:b0] + ex["input_ids"][n + b0 - start:n + b1 - start]
            t = len(inp)
            allowed = torch.tril(torch.ones(t, t, dtype=torch.bool))
            allowed[b0:, b0:] = True
            ref = model(input_ids=torch.tensor([inp]), attention_mask=additive_mask(allowed),
                        position_ids=torch.arange(t)[None]).logits[0, b0:]
            torch.testing.assert_close(full[n + b0 - start:n + b1 - start], ref, atol=1e-4, rtol=1e-4)


def test_objective_registered_and_batches_add_the_mask_token():
    assert resolve_objective("sbd") is OBJECTIVES["sbd"]
    loss_fn, make = OBJECTIVES["sbd"]
    assert loss_fn is sbd_loss and make is sbd_batches
    cfg = FineTuneConfig(batch_size=4, max_length=16)
    tok = _char_tokenizer()
    stream = sbd_batches(_counting(8), cfg, tok, block_size=(2, 16))
    assert MASK_TOKEN in cfg.extra_tokens
    with pytest.raises(ValueError, match="no '<\\|sbd_mask\\|>'"):
        next(iter(stream(0)))
    model = _tiny_llama()
    add_special_tokens(model, tok, list(cfg.extra_tokens))
    b = next(iter(stream(0)))
    it = iter(stream(0))
    starts = set()
    for _ in range(12):  # the copy starts at the block holding position 4: 16 - (4 // k) * k noisy tokens
        b = next(it)
        assert b["input_ids"].shape[0] == 4 and 16 + 12 <= b["input_ids"].shape[1] <= 16 + 16
        starts.add(b["input_ids"].shape[1] - 16)
    assert len(starts) > 1  # the block size varies per batch
    assert torch.equal(next(iter(stream(0)))["input_ids"], next(iter(stream(0)))["input_ids"])  # deterministic
    for bad in (0, (3, 2), (0, 4), (2, 3, 4), 2.0):
        with pytest.raises(ValueError, match="block_size"):
            sbd_batches(_counting(8), cfg, tok, block_size=bad)
    with pytest.raises(ValueError, match="no training sequences"):
        sbd_batches([], cfg, tok)


# ------------------------------------------------------------------------------------------------ EB sampler
def test_eb_select():
    h = torch.tensor([0.3, 0.1, 2.0, 0.2])
    assert eb_select(h, 0.0) == [1]
    assert eb_select(h, 0.15) == [1, 3]  # 0.1 + 0.2 - 0.2 = 0.1
    assert eb_select(h, 0.35) == [1, 3, 0]  # 0.6 - 0.3 = 0.3
    assert eb_select(h, 100.0) == [1, 3, 0, 2]
    # zero-entropy positions add nothing to sum - max: with gamma=0 they come with the one positive-entropy position
    assert eb_select(torch.tensor([0.0, 0.5, 0.0, 0.7]), 0.0) == [0, 2, 1]
    assert eb_select(torch.tensor([1.0, 1.0]), 0.5) == [0]  # ties: left first; 2.0 - 1.0 > 0.5
    assert eb_select(torch.tensor([7.0]), 0.0) == [0]


# ------------------------------------------------------------------------------------------------ decoding loop
def _eb_reference(h, gamma):
    """Independent EB rule: the largest m such that the m lowest entropies sum to at most gamma + their max."""
    order = sorted(range(len(h)), key=lambda i: (h[i], i))
    for m in range(len(h), 0, -1):
        sel = order[:m]
        if m == 1 or sum(h[i] for i in sel) - max(h[i] for i in sel) <= gamma:
            return sel
    return order[:1]


@torch.no_grad()
def _reference_sbd(model, prompt, k, gamma, max_new, mask_id):
    """Cache-free SBD: every forward re-reads the whole committed sequence (causal) plus the block (bidirectional)."""
    seq, forwards = list(prompt), 0
    while len(seq) - len(prompt) < max_new:
        kk = min(k, max_new - (len(seq) - len(prompt)))
        toks, rev = [mask_id] * kk, [False] * kk
        while not all(rev):
            inp = seq + toks
            t, n = len(inp), len(seq)
            allowed = torch.tril(torch.ones(t, t, dtype=torch.bool))
            allowed[n:, n:] = True
            logits = model(input_ids=torch.tensor([inp]), attention_mask=additive_mask(allowed),
                           position_ids=torch.arange(t)[None]).logits[0, n:].float()
            forwards += 1
            open_pos = [j for j in range(kk) if not rev[j]]
            h = [float(entropy(logits[j])) for j in open_pos]
            for i in _eb_reference(h, gamma):
                toks[open_pos[i]] = int(logits[open_pos[i]].argmax())
                rev[open_pos[i]] = True
        seq += toks
    return seq, forwards


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
@pytest.mark.parametrize("k,gamma", [(1, 0.0), (3, 0.0), (4, 2.0), (5, 5.0), (6, 100.0)])
def test_loop_equals_cache_free_reference(arch, k, gamma):
    model, _, mid = _with_mask(arch)
    loop = SetBlockDecoding(block_size=k, gamma=gamma)
    for prompt in PROMPTS[:2]:
        for n in (1, 9):
            ref, forwards = _reference_sbd(model, prompt, k, gamma, n, mid)
            out = _gen(model, prompt, loop, max_new_tokens=n)
            assert out[0].tolist() == ref, (prompt, n)
            assert loop.last_stats["forwards"] == forwards and loop.last_stats["tokens"] == n
            assert sum(loop.last_stats["revealed_per_forward"]) == n


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
@pytest.mark.parametrize("gamma", [0.0, 3.0])
def test_committed_blocks_are_cached_exactly(arch, gamma):
    """The KV cache after decoding equals a causal forward over the same tokens (no bidirectional keys/values)."""
    model, _, _ = _with_mask(arch)
    cache = DynamicCache(config=model.config)
    out = _gen(model, PROMPTS[0], SetBlockDecoding(block_size=4, gamma=gamma), max_new_tokens=14, cache=cache)
    n = cache.get_seq_length()
    assert out.shape[1] - 4 <= n < out.shape[1]  # everything but the last block, which is never fed back
    assert n > len(PROMPTS[0]) + 4  # at least two generated blocks are cached
    assert_cache_equals_recompute(model, cache, out[:, :n], atol=1e-5)


def test_gamma_zero_reveals_one_position_per_forward():
    model, _, _ = _with_mask()
    loop = SetBlockDecoding(block_size=8, gamma=0.0)
    _gen(model, PROMPTS[0], loop, max_new_tokens=20)
    st = loop.last_stats
    assert st["revealed_per_forward"] == [1] * 20 and st["nfe_per_token"] == 1.0 and st["blocks"] == 3
    wide = SetBlockDecoding(block_size=8, gamma=1e9)  # everything at once: one forward per block
    _gen(model, PROMPTS[0], wide, max_new_tokens=20)
    assert wide.last_stats["revealed_per_forward"] == [8, 8, 4] and wide.last_stats["forwards"] == 3


def test_eos_inside_a_block_ends_it():
    model, _, _ = _with_mask()
    loop = SetBlockDecoding(block_size=6, gamma=1e9)
    ref = _gen(model, PROMPTS[0], loop, max_new_tokens=18)[0, 4:].tolist()
    eos = ref[8]  # inside the second block
    first = ref.index(eos)
    out = _gen(model, PROMPTS[0], loop, max_new_tokens=18, eos_token_id=eos)
    assert out[0, 4:].tolist() == ref[:first + 1]
    assert loop.last_stats["tokens"] == first + 1


def test_sampling_and_scores():
    model, _, _ = _with_mask()
    loop = SetBlockDecoding(block_size=4, gamma=1.0)
    greedy = _gen(model, PROMPTS[1], loop, max_new_tokens=10)
    torch.manual_seed(0)
    assert torch.equal(_gen(model, PROMPTS[1], loop, max_new_tokens=10, do_sample=True, top_k=1), greedy)
    torch.manual_seed(1)
    a = _gen(model, PROMPTS[1], loop, max_new_tokens=10, do_sample=True, top_k=0)
    torch.manual_seed(1)
    b = _gen(model, PROMPTS[1], loop, max_new_tokens=10, do_sample=True, top_k=0)
    assert torch.equal(a, b) and not torch.equal(a, greedy)
    out = _gen(model, PROMPTS[1], loop, max_new_tokens=10, return_dict_in_generate=True, output_scores=True)
    assert torch.equal(out.sequences, greedy) and len(out.scores) == 10
    assert [int(s.argmax()) for s in out.scores] == greedy[0, 3:].tolist()
    assert out.sbd_stats["tokens"] == 10


def test_argument_validation_and_refusals():
    for bad in (0, -1, 2.0, True, "4"):
        with pytest.raises(ValueError, match="block_size"):
            SetBlockDecoding(block_size=bad)
    for bad in (-0.1, float("nan"), "1", None, True):
        with pytest.raises(ValueError, match="gamma"):
            SetBlockDecoding(gamma=bad)
    with pytest.raises(ValueError, match="mask_token_id"):
        SetBlockDecoding(mask_token_id=-3)
    plain = _tiny_llama()
    with pytest.raises(ValueError, match="no SBD mask token"):
        _gen(plain, PROMPTS[0], SetBlockDecoding(), max_new_tokens=3)
    with pytest.raises(ValueError, match="outside the model's vocabulary"):
        _gen(plain, PROMPTS[0], SetBlockDecoding(mask_token_id=500), max_new_tokens=3)
    assert _gen(plain, PROMPTS[0], SetBlockDecoding(mask_token_id=3), max_new_tokens=3).shape == (1, 7)
    model, _, _ = _with_mask()
    x = torch.tensor([[5, 6, 7], [8, 9, 10]])
    with pytest.raises(ValueError, match="batch size 1"):
        model.generate(x, max_new_tokens=3, custom_generate=SetBlockDecoding(), pad_token_id=0)


# ------------------------------------------------------------------------------------------------ smoke fine-tune
@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A tiny llama SBD-fine-tuned (full, 300 steps, block sizes 2..16 as the paper, ~8 s on one CPU thread) on
    counting sequences."""
    model, tok = _tiny_llama(), _char_tokenizer()
    cfg = FineTuneConfig(steps=300, batch_size=16, lr=3e-3, mode="full", warmup=5, max_length=40, log_every=10,
                         checkpoint_every=10_000)
    torch.manual_seed(0)
    out = tmp_path_factory.mktemp("sbd")
    model = finetune(model, tok, sbd_batches(_counting(), cfg, tok), sbd_loss, out, cfg,
                     progress=False, resume=False)
    import json

    log = [json.loads(line) for line in (out / "train_log.jsonl").read_text().splitlines()]
    return model.eval(), tok, log, out


def test_finetune_lowers_matp_and_cuts_forwards_per_token(trained):
    """Measured (300 steps, training block sizes 2..16, ~8 s): MATP loss 4.65 (step 10) -> 0.54, mask accuracy
    0.90; decoding blocks of 8 on three counting prompts x 24 tokens: forwards per token 1.0 at gamma 0, 0.79 at
    gamma 0.5, 0.51 at gamma 1 (0.46 0.58 0.50) with token agreement 1.0 / 0.96 / 1.0 with the fine-tuned model's
    own AR greedy output. Thresholds: MATP halves, < 0.7 forwards per token and > 0.75 mean agreement at gamma 1."""
    model, _, log, _ = trained
    assert log[-1]["matp_loss"] < 0.5 * log[0]["matp_loss"] and log[-1]["mask_acc"] > 0.5
    loop = SetBlockDecoding(block_size=8, gamma=1.0)
    nfe, agree = [], []
    for prompt in ([13, 14, 15, 16], [53, 54, 55], [90, 91, 92, 93, 94]):
        out = _gen(model, prompt, loop, max_new_tokens=24)
        assert loop.last_stats["tokens"] == 24
        nfe.append(loop.last_stats["nfe_per_token"])
        ar = _gen(model, prompt, max_new_tokens=24)  # the fine-tuned model's own greedy output
        agree.append(float((out[0] == ar[0]).float().mean()))
    assert sum(nfe) / len(nfe) < 0.7, nfe
    assert sum(agree) / len(agree) > 0.75, agree
    one = SetBlockDecoding(block_size=8, gamma=0.0)  # one (positive-entropy) reveal per forward
    _gen(model, [13, 14, 15, 16], one, max_new_tokens=24)
    assert one.last_stats["nfe_per_token"] > 0.9


def test_load_sbd_model_full_and_lora(trained, tmp_path):
    from hf_decoding_ext.speculative.set_block_decoding import (
        load_sbd_model,
        resolve_mask_token_id,
    )

    model, _, _, out = trained
    x = torch.tensor([[13, 14, 15, 16]])
    loaded, tok = load_sbd_model(out)  # a full fine-tune folder
    assert resolve_mask_token_id(loaded) == tok.convert_tokens_to_ids(MASK_TOKEN) == 128
    with torch.no_grad():
        torch.testing.assert_close(loaded(x).logits, model(x).logits)
    base_dir = tmp_path / "base"  # a LoRA adapter over a base folder (the shipped form over the default model)
    base, ctok = _tiny_llama(), _char_tokenizer()
    base.save_pretrained(base_dir)
    ctok.save_pretrained(base_dir)
    cfg = FineTuneConfig(steps=3, batch_size=4, lr=1e-2, mode="lora", lora_rank=4, warmup=1, max_length=24,
                         log_every=1, checkpoint_every=10_000, lora_target_modules=("q_proj", "v_proj"))
    adapted = finetune(base, ctok, sbd_batches(_counting(8), cfg, ctok), sbd_loss, tmp_path / "lora", cfg,
                       progress=False, resume=False)
    from hf_decoding_ext.training.finetune import merge_lora

    merge_lora(adapted)
    lora_model, _ = load_sbd_model(tmp_path / "lora", base=str(base_dir))
    with torch.no_grad():
        torch.testing.assert_close(lora_model(x).logits, adapted.eval()(x).logits, atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="no SBD fine-tune"):
        load_sbd_model(tmp_path / "empty")


# ------------------------------------------------------------------------------------------------ real model
RESULTS = Path(__file__).resolve().parents[1] / "results"


@pytest.mark.real_model
def test_real_model_shipped_finetune_reveals_several_tokens_per_forward():
    """The shipped SBD fine-tune (hf_decoding_ext/data/finetuned/set-block-decoding) on 2 benchmark prompts x 32
    tokens, blocks of 16: the mask token is there, at gamma 1 the Entropy-Bounded sampler reveals several positions
    in some forwards (fewer forwards than committed tokens; measured 30 forwards for 34 tokens), and gamma 0 (one
    reveal per forward) needs at least as many forwards per token. Whether this pays off (the paper's claim) is
    the results verdict below."""
    from hf_decoding_ext.bench.prompts import load_prompts
    from hf_decoding_ext.core.models import encode_prompts
    from hf_decoding_ext.speculative.set_block_decoding import load_sbd_model

    model, tok = load_sbd_model()
    assert MASK_TOKEN in tok.get_vocab()
    totals = {0.0: [0, 0], 1.0: [0, 0]}
    for row in load_prompts(per_category=1)[:2]:
        x = encode_prompts(tok, row["prompt"])["input_ids"]
        kw = dict(attention_mask=torch.ones_like(x), do_sample=False, max_new_tokens=32, pad_token_id=tok.pad_token_id)
        for gamma, acc in totals.items():
            loop = SetBlockDecoding(gamma=gamma, tokenizer=tok)
            out = model.generate(x, custom_generate=loop, **kw)
            assert out.shape[1] - x.shape[1] == loop.last_stats["tokens"] >= 1
            acc[0] += loop.last_stats["forwards"]
            acc[1] += loop.last_stats["tokens"]
    print("SBD real model (forwards, tokens) per gamma", totals)
    assert totals[1.0][0] < totals[1.0][1], totals
    assert totals[0.0][0] / totals[0.0][1] >= totals[1.0][0] / totals[1.0][1], totals


def test_committed_results_decide_the_registry_verdict():
    """results/set_block_decoding_eval.json (scripts/eval_set_block_decoding.py): forwards per token never rise as
    gamma grows, gamma 0 needs about one forward per token. The registry's effect (the paper's claim: 3-5x fewer
    forwards than next-token decoding without loss of accuracy against the NTP-fine-tuned control) is "reproduced"
    exactly when the default gamma needs at most 0.5 forwards per token (at least 2x fewer) AND quality holds within
    the tolerance stated for issue 24: the task answer rate within 1 answer of the NTP control's and greedy agreement
    with the SBD model's own autoregressive output >= 0.5."""
    import json

    from hf_decoding_ext.registry import get_method

    ev = json.loads((RESULTS / "set_block_decoding_eval.json").read_text())
    arms = ev["arms"]
    sweep = sorted((float(k.rsplit("_", 1)[1]), a) for k, a in arms.items() if k.startswith("sbd_gamma_"))
    nfe = [a["nfe_per_token"] for _, a in sweep]
    assert nfe == sorted(nfe, reverse=True), nfe
    assert sweep[0][0] == 0 and sweep[0][1]["nfe_per_token"] > 0.9
    spec = get_method("set-block-decoding")
    row = arms[f"sbd_gamma_{spec.defaults['gamma']:g}"]
    one_answer = 1 / ev["task_prompts"]
    quality = (row["task_answer_rate"] >= arms["ntp"]["task_answer_rate"] - one_answer - 1e-9
               and row["agreement_with_own_ar"] >= 0.5)
    assert spec.effect == ("reproduced" if row["nfe_per_token"] <= 0.5 and quality else "not reproduced")
