"""Diverse Beam Search (Vijayakumar et al., arXiv 1610.02424): one group is transformers' beam search token for
token, a zero penalty gives copies of a narrower beam search, a large penalty keeps groups apart, and on the real
model the returned lists get more diverse as the penalty grows."""

from __future__ import annotations

import math

import pytest
import torch
from transformers import GenerationConfig, LogitsProcessor, LogitsProcessorList, StoppingCriteriaList
from transformers.generation.stopping_criteria import MaxLengthCriteria

from hf_decoding_ext.core.beam import BeamSearchBank
from hf_decoding_ext.search.diverse_beam_search import (DiverseBeamSearch, cumulative_diversity, embedding_diversity,
                                                        hamming_diversity, ngram_diversity)

BEAM = dict(do_sample=False, pad_token_id=0)


def _prompts(n, length=6, seed=0, vocab=128):
    gen = torch.Generator().manual_seed(seed)
    return [torch.randint(3, vocab, (length,), generator=gen) for _ in range(n)]


def _padded(prompts):
    """Left-padded batch (pad 0) and its attention mask."""
    width = max(len(p) for p in prompts)
    ids = torch.zeros(len(prompts), width, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, p in enumerate(prompts):
        ids[i, width - len(p):] = p
        mask[i, width - len(p):] = 1
    return ids, mask


def _likely_eos(model, ids, mask=None):
    """A token the model's beams will meet soon (the second greedy token of the first prompt), used as eos so that
    hypotheses finish at different lengths."""
    out = model.generate(ids[:1], attention_mask=None if mask is None else mask[:1], max_new_tokens=3, **BEAM)
    return int(out[0, ids.shape[1] + 1])


def _strip(seq, plen, fill_ids):
    out = []
    for t in seq[plen:].tolist():
        out.append(t)
        if t in fill_ids:
            break
    return out


class Recorder(LogitsProcessor):
    """Keeps the sequences of every call: the last token of each row is what each beam chose at the previous step."""

    def __init__(self):
        self.calls = []

    def __call__(self, input_ids, scores):
        self.calls.append(input_ids.clone())
        return scores


# ----------------------------------------------------------------------------------------------- diversity terms
def test_diversity_terms_exact_values():
    assert hamming_diversity(torch.tensor([[3, 3, 1]]), 2, 5).tolist() == [[[0, 1, 0, 2, 0]] * 2]
    pen = cumulative_diversity(torch.tensor([[4, 4]]), torch.tensor([[[1, 2], [1, 3]]]),
                               torch.tensor([[[1, 2], [5, 5]]]), vocab=6, temperature=2.0)
    # beam 0 equals earlier beam 0 (d=0) and differs from beam 1 once; beam 1 differs from both twice
    assert pen[0, 0, 4].item() == pytest.approx(1 + math.exp(-0.5))
    assert pen[0, 1, 4].item() == pytest.approx(2 * math.exp(-1.0))
    assert pen[..., :4].abs().sum() == 0 and pen[..., 5].abs().sum() == 0
    prev = torch.tensor([[[5, 6, 5, 7], [6, 5, 6, 5]]])  # bigrams: (5,6) x2 ... counted over both earlier beams
    pen = ngram_diversity(prev, torch.tensor([[[1, 2, 5]]]), vocab=8, n=2)
    assert pen[0, 0].tolist() == [0, 0, 0, 0, 0, 0, 2, 1]
    trigram = ngram_diversity(prev, torch.tensor([[[1, 6, 5]]]), vocab=8, n=3)  # (6,5,x): (6,5,7), (6,5,6)
    assert trigram[0, 0].tolist() == [0, 0, 0, 0, 0, 0, 1, 1]
    first = ngram_diversity(torch.tensor([[[3], [3]]]), torch.zeros(1, 2, 0, dtype=torch.long), vocab=5, n=2)
    assert torch.equal(first, hamming_diversity(torch.tensor([[3, 3]]), 2, 5))  # step 1: Hamming
    emb = torch.tensor([[1.0, 0.0], [1.0, 1.0], [0.0, 1.0], [-1.0, 0.0]])
    pen = embedding_diversity(torch.tensor([[0, 2]]), emb, emb.norm(dim=-1), 1, 4)
    assert pen[0, 0].tolist() == pytest.approx([1.0, 2 * math.sqrt(0.5), 1.0, 0.0])


def test_arguments_are_validated():
    for bad in (dict(num_beams=0), dict(num_beams=4, num_beam_groups=3), dict(diversity_penalty=-1.0),
                dict(diversity="levenshtein"), dict(ngram_size=0), dict(temperature=0.0),
                dict(diversity_penalty=float("nan")), dict(num_beam_groups=True)):
        with pytest.raises(ValueError):
            DiverseBeamSearch(**bad)
    with pytest.raises(ValueError, match="levenshtein"):
        DiverseBeamSearch(diversity="levenshtein")


def test_refusals(tiny_llama):
    ids = _prompts(1)[0][None]
    loop = DiverseBeamSearch(num_beams=4, num_beam_groups=2)
    with pytest.raises(ValueError, match="num_return_sequences"):
        tiny_llama.generate(ids, custom_generate=loop, max_new_tokens=3, num_beams=4, num_return_sequences=5, **BEAM)
    cfg = GenerationConfig(max_length=12, do_sample=False)
    cfg.num_return_sequences = 5  # after construction: transformers' own validation would refuse it first
    cfg._pad_token_tensor = cfg._eos_token_tensor = None
    with pytest.raises(ValueError, match=r"num_return_sequences \(5\) must be <= num_beams \(4\)"):  # the loop's
        loop(tiny_llama, ids.repeat(5, 1), LogitsProcessorList(), StoppingCriteriaList([MaxLengthCriteria(12)]), cfg)
    with pytest.raises(ValueError, match="divisible"):
        tiny_llama.generate(ids, custom_generate=DiverseBeamSearch(4, 4), num_beams=6, max_new_tokens=3, **BEAM)
    with pytest.raises(ValueError, match="do_sample=False"):
        tiny_llama.generate(ids, custom_generate=loop, max_new_tokens=3, do_sample=True, pad_token_id=0)


# ----------------------------------------------------------------------------------------------- equivalences
@pytest.mark.parametrize("setting", [
    dict(),
    dict(length_penalty=0.0, early_stopping=True),
    dict(length_penalty=2.0, early_stopping="never"),
    dict(length_penalty=-1.0, num_return_sequences=3),
])
def test_one_group_is_beam_search(tiny_model, setting):
    prompts = _prompts(3, seed=1)
    for with_eos in (True, False):
        for batch in ([prompts[0]], [prompts[1], prompts[2][:4]]):  # batch of 2 with left padding
            ids, mask = _padded(batch)
            eos = _likely_eos(tiny_model, ids, mask) if with_eos else 127
            kw = dict(attention_mask=mask, max_new_tokens=10, eos_token_id=eos, **BEAM, **setting)
            ref = tiny_model.generate(ids, num_beams=3, return_dict_in_generate=True, output_scores=True, **kw)
            # B given to generate() or to the constructor
            paths = [(DiverseBeamSearch(num_beams=3, num_beam_groups=1), dict(num_beams=3))]
            if "num_return_sequences" not in setting:  # transformers needs num_beams for several return sequences
                paths.append((DiverseBeamSearch(num_beams=3, num_beam_groups=1), {}))
            for loop, extra in paths:
                out = tiny_model.generate(ids, custom_generate=loop, return_dict_in_generate=True,
                                          output_scores=True, **extra, **kw)
                assert torch.equal(out.sequences, ref.sequences), (setting, with_eos, len(batch))
                assert torch.allclose(out.sequences_scores, ref.sequences_scores)
                assert len(out.scores) == len(ref.scores)


class EosBoost(LogitsProcessor):
    """Adds ``bonus`` to eos (2) on rows whose token sum is a multiple of 4: hypotheses end at many lengths."""

    def __init__(self, bonus=3.0):
        self.bonus = bonus

    def __call__(self, input_ids, scores):
        scores = scores.clone()
        scores[:, 2] += self.bonus * (input_ids.sum(-1) % 4 == 0).float()
        return scores


@pytest.mark.parametrize("setting", [dict(), dict(length_penalty=0.0, early_stopping=True),
                                     dict(length_penalty=2.0, early_stopping="never")])
def test_one_group_is_beam_search_with_finishing_hypotheses(tiny_model, setting):
    ids, mask = _padded(_prompts(2, seed=4))
    kw = dict(attention_mask=mask, max_new_tokens=12, eos_token_id=2, num_return_sequences=4,
              logits_processor=LogitsProcessorList([EosBoost()]), **BEAM, **setting)
    ref = tiny_model.generate(ids, num_beams=4, **kw)
    out = tiny_model.generate(ids, custom_generate=DiverseBeamSearch(4, 1, 0.7), num_beams=4, **kw)
    assert torch.equal(out, ref)
    if setting.get("early_stopping") != "never":
        lengths = {len(_strip(s, ids.shape[1], {2})) for s in ref}
        assert len(lengths) > 2  # the test covers hypotheses of several lengths


def test_one_group_is_beam_search_on_every_architecture(tiny_arch):
    # Llama, GPT-2, Qwen2 and the sliding-window Mistral, left padding, prompts past Mistral's window
    _, model = tiny_arch
    ids, mask = _padded([p[:n] for p, n in zip(_prompts(2, length=10, seed=8), (10, 7))])
    kw = dict(attention_mask=mask, max_new_tokens=8, num_beams=3, num_return_sequences=3,
              logits_processor=LogitsProcessorList([EosBoost()]), **BEAM)
    assert torch.equal(model.generate(ids, custom_generate=DiverseBeamSearch(3, 1), **kw),
                       model.generate(ids, **kw))


def test_zero_penalty_groups_are_narrow_beam_searches(tiny_model):
    ids, mask = _padded(_prompts(2, seed=4))
    eos = 2
    kw = dict(attention_mask=mask, max_new_tokens=10, eos_token_id=eos,
              logits_processor=LogitsProcessorList([EosBoost()]), **BEAM)
    narrow = tiny_model.generate(ids, num_beams=2, num_return_sequences=2, return_dict_in_generate=True,
                                 output_scores=True, **kw)
    out = tiny_model.generate(ids, custom_generate=DiverseBeamSearch(6, 3, 0.0), num_beams=6, num_return_sequences=6,
                              return_dict_in_generate=True, **kw)
    plen = ids.shape[1]
    fill = {eos, 0}
    for b in range(2):
        expected = [_strip(narrow.sequences[2 * b + j], plen, fill) for j in range(2)]
        for g in range(3):
            got = [_strip(out.group_sequences[b, g, j], plen, fill) for j in range(2)]
            assert got == expected
            assert torch.allclose(out.group_scores[b, g], narrow.sequences_scores[2 * b:2 * b + 2])
    # the returned list: each narrow hypothesis three times, best first (ties in group order)
    assert out.sequence_groups.tolist() == [0, 1, 2, 0, 1, 2] * 2


def test_penalty_is_applied_to_later_groups(tiny_llama):
    ids = _prompts(1, seed=3)[0][None]
    lam = 0.75
    out = tiny_llama.generate(ids, custom_generate=DiverseBeamSearch(3, 3, lam), max_new_tokens=4,
                              return_dict_in_generate=True, output_scores=True, output_logits=True, **BEAM)
    for step in range(4):
        raw = torch.log_softmax(out.logits[step], dim=-1)
        # group 0 is unpenalised; at step 0 each group has one live beam and the chosen tokens are the argmaxes
        assert torch.equal(out.scores[step][0], raw[0])
    raw0 = torch.log_softmax(out.logits[0], dim=-1)
    t0 = int(raw0[0].argmax())
    expected1 = raw0[1].clone()
    expected1[t0] -= lam
    assert torch.allclose(out.scores[0][1], expected1)
    t1 = int(expected1.argmax())
    expected2 = raw0[2].clone()
    expected2[t0] -= lam
    expected2[t1] -= lam
    assert torch.allclose(out.scores[0][2], expected2)
    # sequences_logprobs are the unpenalised sums of the returned hypotheses
    rec = tiny_llama(out.sequences).logits.float().log_softmax(-1)
    plen = ids.shape[1]
    for i, seq in enumerate(out.sequences):
        lp = 0.0
        for t in range(plen, seq.shape[0]):
            lp += rec[i, t - 1, seq[t]].item()
            if int(seq[t]) == 2:  # eos: the rest is filler
                break
        assert out.sequences_logprobs[i].item() == pytest.approx(lp, abs=1e-4)


@pytest.mark.parametrize("diversity", ["hamming", "cumulative", "ngram", "embedding"])
def test_large_penalty_keeps_groups_apart(tiny_llama, diversity):
    ids = _prompts(2, seed=5)
    ids, mask = _padded(ids)
    groups, width, steps = 3, 2, 6
    rec = Recorder()
    tiny_llama.generate(ids, attention_mask=mask, custom_generate=DiverseBeamSearch(groups * width, groups, 1e4,
                                                                                   diversity=diversity),
                        logits_processor=LogitsProcessorList([rec]), max_new_tokens=steps, eos_token_id=None, **BEAM)
    chosen = [c[:, -1].reshape(2, groups, width) for c in rec.calls[1:]]  # the beams' tokens after each step
    assert len(chosen) == steps - 1
    if diversity == "ngram":  # n-grams differ once the prefixes do: only the first step is the Hamming term
        chosen = chosen[:1]
    for tok in chosen:
        for b in range(2):
            sets = [set(tok[b, g].tolist()) for g in range(groups)]
            for g in range(groups):
                for h in range(g):
                    assert not sets[g] & sets[h], (diversity, sets)
    # without the penalty the groups are identical: the check above is not vacuous
    rec0 = Recorder()
    tiny_llama.generate(ids, attention_mask=mask, custom_generate=DiverseBeamSearch(groups * width, groups, 0.0),
                        logits_processor=LogitsProcessorList([rec0]), max_new_tokens=steps, eos_token_id=None, **BEAM)
    tok = rec0.calls[1][:, -1].reshape(2, groups, width)
    assert set(tok[0, 0].tolist()) == set(tok[0, 1].tolist())


def test_generate_flags_take_precedence(tiny_llama):
    ids = _prompts(1, seed=6)[0][None]
    kw = dict(max_new_tokens=6, num_return_sequences=4, **BEAM)
    ref = tiny_llama.generate(ids, custom_generate=DiverseBeamSearch(4, 2, 1.5), num_beams=4, **kw)
    out = tiny_llama.generate(ids, custom_generate=DiverseBeamSearch(2, 1, 0.1), num_beams=4, num_beam_groups=2,
                              diversity_penalty=1.5, **kw)
    assert torch.equal(out, ref)
    assert not torch.equal(tiny_llama.generate(ids, custom_generate=DiverseBeamSearch(4, 2, 0.0), num_beams=4, **kw),
                           ref)


def test_cumulative_with_infinite_temperature_is_hamming(tiny_gpt2):
    ids, mask = _padded(_prompts(2, seed=7))
    kw = dict(attention_mask=mask, max_new_tokens=6, num_beams=4, num_return_sequences=4, **BEAM)
    ham = tiny_gpt2.generate(ids, custom_generate=DiverseBeamSearch(4, 2, 0.3), **kw)
    cum = tiny_gpt2.generate(ids, custom_generate=DiverseBeamSearch(4, 2, 0.3, diversity="cumulative",
                                                                   temperature=1e30), **kw)
    assert torch.equal(ham, cum)


def test_bank_matches_a_hand_computed_step():
    from transformers.generation.stopping_criteria import EosTokenCriteria

    bank = BeamSearchBank(1, 2, prompt_length=1, max_length=4, num_eos=1, fill_value=0)
    crit = StoppingCriteriaList([MaxLengthCriteria(4), EosTokenCriteria(2)])
    lp = torch.log(torch.tensor([[[0.1, 0.25, 0.5, 0.15], [0.25] * 4]]))  # eos (2) is the best first token
    src, tok = bank.step(torch.tensor([0]), lp, torch.tensor([[[7], [7]]]), crit)
    assert tok.tolist() == [[1, 3]] and src.tolist() == [[0, 0]]  # the eos candidate left for the pool
    assert bank.is_finished[0].tolist() == [True, False]
    assert bank.sequences[0, 0, :2].tolist() == [7, 2] and bank.lengths[0, 0] == 1
    assert bank.scores[0, 0].item() == pytest.approx(math.log(0.5))
    assert not bank.done


# ----------------------------------------------------------------------------------------------- real model
def _generated(seqs, plen, stop_ids):
    out = []
    for seq in seqs:
        toks = []
        for t in seq[plen:].tolist():
            if t in stop_ids:
                break
            toks.append(t)
        out.append(toks)
    return out


@pytest.mark.real_model
def test_real_model_one_group_is_beam_search_and_diversity_grows(smollm):
    from hf_decoding_ext.core.models import encode_prompts
    from hf_decoding_ext.core.ngram import distinct_n

    model, tok = smollm
    prompts = ["Give me a name for a pet turtle.", "Describe the colour of the sky in one sentence.",
               "Suggest a title for a short story about a lighthouse."]
    stop = {tok.eos_token_id, tok.pad_token_id}
    kw = dict(do_sample=False, pad_token_id=tok.pad_token_id)
    inputs = encode_prompts(tok, prompts[:2])
    ref = model.generate(**inputs, num_beams=4, max_new_tokens=10, **kw)
    out = model.generate(**inputs, custom_generate=DiverseBeamSearch(4, 1), max_new_tokens=10, **kw)
    assert torch.equal(out, ref)

    inputs = encode_prompts(tok, prompts)
    plen = inputs.input_ids.shape[1]
    kw.update(max_new_tokens=12, num_beams=4, num_return_sequences=4)

    def diversity(seqs):
        gen = _generated(seqs, plen, stop)
        return sum(distinct_n(gen[4 * i:4 * i + 4], 2) for i in range(len(prompts))) / len(prompts)

    beam = diversity(model.generate(**inputs, **kw))
    by_lambda = {lam: diversity(model.generate(**inputs, custom_generate=DiverseBeamSearch(4, 4, lam), **kw))
                 for lam in (0.5, 2.0)}
    print(f"distinct-2 over the 4 returned: beam search {beam:.3f}, DBS G=4 by lambda {by_lambda}")
    # measured: beam search 0.394, lambda 0.5: 0.739, lambda 2.0: 0.835 (lambda 0 gives 4 greedy copies: 0.25)
    assert beam < by_lambda[0.5] < by_lambda[2.0], (beam, by_lambda)
