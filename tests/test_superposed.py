"""Superposed Decoding (arXiv:2405.18400) and its n-gram LM."""

import math

import pytest
import torch
from transformers import LogitsProcessor, LogitsProcessorList
from transformers.generation.utils import GenerateDecoderOnlyOutput

from hf_decoding_ext.sampling.superposed import SuperposedDecoding
from hf_decoding_ext.core.ngram_lm import NGramLM

# ----------------------------------------------------------------------------------------------------- n-gram LM


def _toy_lm(order=3):
    return NGramLM.train([[5, 6, 7, 5, 6, 8, 5, 6, 7], [1, 2, 3]], order=order, vocab_size=10)


def test_ngram_probabilities_sum_to_one():
    lm = _toy_lm(order=4)
    for ctx in ([], [5], [5, 6], [6, 5, 6], [9, 9, 9], [1, 2], [4, 4, 5, 6]):
        orders = lm.order_probs(ctx)
        assert orders.shape == (4, 10)
        assert torch.allclose(orders.sum(-1), torch.ones(4), atol=1e-6)
        assert (orders > 0).all()  # smoothed: never zero


def test_ngram_witten_bell_values():
    lm = _toy_lm(order=3)
    # unigram: N = 12 tokens, T0 = 7 types, V = 10
    p1_7 = (2 + 7 / 10) / (12 + 7)
    assert lm.order_probs([], [7])[0, 0].item() == pytest.approx(p1_7)
    # bigram after 6: counts {7: 2, 8: 1}, total 3, 2 types
    p2_7 = (2 + 2 * p1_7) / (3 + 2)
    assert lm.order_probs([6], [7])[1, 0].item() == pytest.approx(p2_7)
    # trigram after (5, 6): counts {7: 2, 8: 1}
    assert lm.prob([5, 6], 7) == pytest.approx((2 + 2 * p2_7) / (3 + 2))
    assert lm.count([5, 6, 7]) == 2 and lm.count([5, 6]) == 3 and lm.count([7, 5]) == 1 and lm.count([3, 1]) == 0


def test_ngram_back_off_for_unseen_contexts():
    lm = _toy_lm(order=3)
    # (9, 6) was never seen: the trigram estimate backs off to the bigram estimate after 6
    assert torch.allclose(lm.order_probs([9, 6])[2], lm.order_probs([6])[1])
    # (9,) was never seen either: everything backs off to the unigram distribution
    orders = lm.order_probs([9, 9])
    assert torch.allclose(orders[1], orders[0]) and torch.allclose(orders[2], orders[0])
    # n-grams never cross sequence borders: (7, 1) spans the two training sequences
    assert lm.count([7, 1]) == 0
    # a seen context concentrates mass on its continuations
    assert lm.prob([5, 6], 7) > lm.prob([5, 6], 8) > lm.prob([5, 6], 0)


def test_ngram_save_load_roundtrip(tmp_path):
    lm = _toy_lm(order=4)
    path = tmp_path / "lm.safetensors"
    lm.save(path)
    back = NGramLM.load(path)
    assert back.order == 4 and back.vocab_size == 10
    for ctx in ([5, 6], [1, 2], [9]):
        assert torch.allclose(back.order_probs(ctx), lm.order_probs(ctx))


def test_ngram_bad_arguments():
    with pytest.raises(ValueError):
        NGramLM.train([], order=3)
    with pytest.raises(ValueError):
        NGramLM.train([[1, 2, 30]], order=3, vocab_size=10)
    with pytest.raises(ValueError):
        _toy_lm().order_probs([1], [12])


# ----------------------------------------------------------------------------------------------- tiny models


@pytest.fixture(scope="module")
def tiny_lm():
    g = torch.Generator().manual_seed(0)
    seqs = [torch.randint(3, 128, (200,), generator=g).tolist() for _ in range(5)]
    return NGramLM.train(seqs, order=6, vocab_size=128)


def _prompt():
    return torch.tensor([[5, 9, 17, 33, 4]])


class _ForceEOSAt(LogitsProcessor):
    def __init__(self, length, eos):
        self.length, self.eos = length, eos

    def __call__(self, input_ids, scores):
        if input_ids.shape[1] == self.length:
            scores = torch.full_like(scores, float("-inf"))
            scores[:, self.eos] = 0.0
        return scores


def test_tiny_returns_k_distinct_drafts_with_one_forward_per_position(tiny_model, tiny_lm):
    loop = SuperposedDecoding(tiny_lm, num_drafts=3)
    calls = []
    hook = tiny_model.register_forward_hook(lambda *a: calls.append(1))
    try:
        out = tiny_model.generate(_prompt(), max_new_tokens=12, do_sample=False, custom_generate=loop,
                                  eos_token_id=None, return_dict_in_generate=True, output_scores=True)
    finally:
        hook.remove()
    assert isinstance(out, GenerateDecoderOnlyOutput)
    assert out.sequences.shape == (3, 5 + 12)
    assert (out.sequences[:, :5] == _prompt()).all()
    assert len({tuple(r.tolist()) for r in out.sequences}) == 3
    assert len(calls) == 12  # prefill + one superposed pass per later position
    assert len(out.scores) == 12 and out.scores[0].shape == (3, 128)
    assert out.draft_scores.shape == (3,)
    assert torch.all(out.draft_scores[:-1] >= out.draft_scores[1:])  # rows ordered by draft score
    # the recorded scores are those the chosen tokens were ranked by
    for step, sc in enumerate(out.scores):
        chosen = out.sequences[:, 5 + step]
        assert torch.isfinite(sc.gather(1, chosen[:, None])).all()


def test_tiny_single_draft_without_ngram_is_greedy(tiny_model):
    loop = SuperposedDecoding(None, num_drafts=1, alpha=0.0)
    ref = tiny_model.generate(_prompt(), max_new_tokens=15, do_sample=False, eos_token_id=None)
    out = tiny_model.generate(_prompt(), max_new_tokens=15, do_sample=False, eos_token_id=None, custom_generate=loop)
    assert torch.equal(ref, out)


def test_tiny_eos_and_stopping(tiny_llama, tiny_lm):
    loop = SuperposedDecoding(tiny_lm, num_drafts=3)
    procs = LogitsProcessorList([_ForceEOSAt(5 + 3, eos=2)])
    out = tiny_llama.generate(_prompt(), max_new_tokens=12, do_sample=False, custom_generate=loop,
                              logits_processor=procs, eos_token_id=2, pad_token_id=0)
    assert out.shape == (3, 5 + 4)  # every draft was forced to end at its 4th token
    assert (out[:, -1] == 2).all()
    assert (out[:, 5:8] != 2).all()


def test_tiny_finished_draft_keeps_its_row_and_is_padded(tiny_llama, tiny_lm):
    loop = SuperposedDecoding(tiny_lm, num_drafts=3)
    free = tiny_llama.generate(_prompt(), max_new_tokens=8, do_sample=False, eos_token_id=None, custom_generate=loop)
    eos = int(free[1, 5 + 2])  # a token some draft emits at its 3rd position
    out = tiny_llama.generate(_prompt(), max_new_tokens=8, do_sample=False, eos_token_id=eos, pad_token_id=0,
                              custom_generate=loop)
    assert out.shape[0] == 3 and out.shape[1] <= 5 + 8
    assert (out[:, 5:] == eos).any()
    for row in out[:, 5:]:
        hits = (row == eos).nonzero()
        if hits.numel():
            assert (row[int(hits[0]) + 1:] == 0).all()  # padded after its eos


def test_tiny_applies_caller_processors(tiny_llama, tiny_lm):
    loop = SuperposedDecoding(tiny_lm, num_drafts=3)
    free = tiny_llama.generate(_prompt(), max_new_tokens=10, do_sample=False, eos_token_id=None, custom_generate=loop)
    banned = sorted(set(free[:, 5:].flatten().tolist()))[:4]
    out = tiny_llama.generate(_prompt(), max_new_tokens=10, do_sample=False, eos_token_id=None,
                              suppress_tokens=banned, custom_generate=loop)
    assert not any(t in banned for t in out[:, 5:].flatten().tolist())


def test_tiny_refuses_batch_sampling_and_bad_arguments(tiny_llama, tiny_lm):
    loop = SuperposedDecoding(tiny_lm)
    with pytest.raises(ValueError, match="batch size 1"):
        tiny_llama.generate(torch.tensor([[5, 6], [7, 8]]), max_new_tokens=3, do_sample=False, custom_generate=loop)
    with pytest.raises(ValueError, match="do_sample=False"):
        tiny_llama.generate(_prompt(), max_new_tokens=3, do_sample=True, custom_generate=loop)
    with pytest.raises(ValueError, match="n-gram LM"):
        SuperposedDecoding(None, alpha=0.5)
    with pytest.raises(ValueError):
        SuperposedDecoding(tiny_lm, num_drafts=0)
    with pytest.raises(ValueError):
        SuperposedDecoding(tiny_lm, alpha=1.5)
    with pytest.raises(ValueError):
        SuperposedDecoding(tiny_lm, temperature=0.0)
    with pytest.raises(ValueError):
        SuperposedDecoding(tiny_lm, num_drafts=4, num_tokens=3)
    with pytest.raises(ValueError):
        SuperposedDecoding(NGramLM.train([[1, 2, 3]], order=3), alpha=0.5)  # orders 2..6 need order >= 6


# ------------------------------------------------------------------------------------------------ real model

PROMPTS = ["What does the json module do?", "Explain what a Python list is.",
           "Write one sentence about the sea."]
NEW = 20


def _until_eos(ids, eos):
    """``ids`` cut after the first eos (kept), as the text a user sees."""
    hits = (ids == eos).nonzero()
    return ids if not hits.numel() else ids[: int(hits[0]) + 1]


def _nll(model, prompt_ids, new_ids):
    """Mean negative log-likelihood of ``new_ids`` given the prompt (teacher forcing)."""
    ids = torch.cat([prompt_ids, new_ids])[None]
    with torch.no_grad():
        logp = torch.log_softmax(model(ids).logits[0, :-1].float(), -1)
    p = prompt_ids.numel()
    tgt = ids[0, p:]
    return -logp[p - 1:].gather(1, tgt[:, None]).mean().item()


@pytest.mark.real_model
def test_ngram_lm_for_tokenizer_is_cached(smollm, tmp_path, monkeypatch):
    _, tok = smollm
    monkeypatch.setenv("HF_DECODING_EXT_CACHE", str(tmp_path))
    lm = NGramLM.for_tokenizer(tok, corpus="shipped")
    files = list((tmp_path / "ngram").glob("*.safetensors"))
    assert len(files) == 1
    again = NGramLM.for_tokenizer(tok, corpus="shipped")
    ctx = tok("Return a new list", add_special_tokens=False)["input_ids"]
    assert torch.allclose(lm.order_probs(ctx, list(range(100))), again.order_probs(ctx, list(range(100))))
    assert lm.vocab_size == len(tok) and lm.num_tokens > 30_000
    assert math.isclose(float(lm.probs(ctx).sum()), 1.0, rel_tol=1e-5)


@pytest.mark.real_model
def test_superposed_k_fluent_drafts_for_one_pass(smollm):
    from hf_decoding_ext.core.models import encode_prompts

    model, tok = smollm
    loop = SuperposedDecoding.for_model(model, tok)  # paper defaults: k=3, alpha=0.54, temperature 0.06
    assert loop.num_drafts == 3
    nll_drafts, nll_nucleus = [], []  # mean per-token NLL of each draft / each nucleus sample, per prompt
    for prompt in PROMPTS:
        enc = encode_prompts(tok, prompt)
        p = enc["input_ids"].shape[1]
        calls = []

        def hook_fn(module, args, kwargs, output):
            emb = kwargs.get("inputs_embeds")
            calls.append(None if emb is None else tuple(emb.shape))

        hook = model.register_forward_hook(hook_fn, with_kwargs=True)
        try:
            out = model.generate(**enc, custom_generate=loop, do_sample=False, max_new_tokens=NEW,
                                 return_dict_in_generate=True)
            sp_forwards = len(calls)
            # after the prompt, every pass feeds one superposed embedding for all drafts (batch 1, one KV cache)
            assert calls[0] is None and all(c == (1, 1, model.config.hidden_size) for c in calls[1:])
            calls.clear()
            greedy = model.generate(**enc, do_sample=False, max_new_tokens=NEW)
            greedy_forwards = len(calls)
        finally:
            hook.remove()
        seqs = out.sequences
        n_new = seqs.shape[1] - p
        assert seqs.shape[0] == 3
        assert len({tuple(r.tolist()) for r in seqs}) == 3  # k distinct drafts
        assert sp_forwards == n_new  # exactly one model forward per generated position ...
        assert greedy_forwards == greedy.shape[1] - p  # ... as for one greedy run
        nll_drafts.append([_nll(model, enc["input_ids"][0], _until_eos(r[p:], tok.eos_token_id)) for r in seqs])
        nucleus = []
        for seed in range(4):  # the paper's baseline: nucleus sampling (top_p 0.9), same prompt and length
            torch.manual_seed(seed)
            s = model.generate(**enc, do_sample=True, top_p=0.9, top_k=None, temperature=1.0, max_new_tokens=NEW)
            nucleus.append(_nll(model, enc["input_ids"][0], _until_eos(s[0, p:], tok.eos_token_id)))
        nll_nucleus.append(nucleus)
        nll_greedy = _nll(model, enc["input_ids"][0], greedy[0, p:])
        print(f"\n{prompt!r}: forwards SPD {sp_forwards} greedy {greedy_forwards}; ppl drafts "
              f"{[round(math.exp(x), 2) for x in nll_drafts[-1]]} greedy {math.exp(nll_greedy):.2f} nucleus "
              f"{[round(math.exp(x), 2) for x in nucleus]}")
        for r in seqs:
            print("   ", repr(tok.decode(r[p:], skip_special_tokens=True)))
    # The paper's claim (abstract and its perplexity comparison): the k drafts are at least as coherent (perplexity
    # under the model) as nucleus sampling. Measured here (3 prompts x 20 tokens, geometric-mean perplexity over
    # the prompts): nucleus p=0.9 3.47 (4 seeds); draft 1 3.12, best of the 3 drafts 1.97, all 3 drafts 3.79 (the
    # later drafts pay for the superposed inputs of a 135M model, e.g. merged words), greedy 1.84.
    def ppl(nlls):
        return math.exp(sum(nlls) / len(nlls))

    nucleus_ppl = ppl([x for row in nll_nucleus for x in row])
    first_ppl = ppl([row[0] for row in nll_drafts])
    best_ppl = ppl([min(row) for row in nll_drafts])
    all_ppl = ppl([x for row in nll_drafts for x in row])
    print(f"perplexity: nucleus {nucleus_ppl:.2f}, draft 1 {first_ppl:.2f}, best draft {best_ppl:.2f}, "
          f"all drafts {all_ppl:.2f}")
    assert first_ppl <= nucleus_ppl  # the most likely draft: at least as coherent as nucleus sampling
    assert best_ppl <= 0.75 * nucleus_ppl  # best of k: clearly more coherent than one nucleus sample
    assert all_ppl <= 1.25 * nucleus_ppl  # every draft: comparable to nucleus sampling (within 25%)
