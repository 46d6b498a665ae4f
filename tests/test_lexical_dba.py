"""Lexically constrained decoding with Dynamic Beam Allocation (Post & Vilar, arXiv 1804.06609)."""

from __future__ import annotations

import random

import pytest
import torch

from hf_decoding_ext.core.models import encode_prompts
from hf_decoding_ext.structured.lexical_dba import (ConstraintState, DynamicBeamAllocation, _select, allocate_banks,
                                                    constraint_state_of)

GREEDY = dict(do_sample=False, temperature=None, top_p=None, top_k=None)


def contains(seq, phrase) -> bool:
    """``phrase`` occurs in ``seq`` as a contiguous run of tokens."""
    seq, phrase = list(seq), list(phrase)
    return any(seq[i:i + len(phrase)] == phrase for i in range(len(seq) - len(phrase) + 1))


def generated(seq: torch.Tensor, plen: int, stop_ids=()) -> list[int]:
    """The generated tokens of a returned row, up to (excluding) the first stop token."""
    out = []
    for t in seq[plen:].tolist():
        if t in stop_ids:
            break
        out.append(t)
    return out


# ----------------------------------------------------------------------------------------------- bookkeeping
def test_phrase_progress_and_completion():
    s = ConstraintState([(5, 6, 7), (9,)])
    assert s.num_tokens == 4 and s.met_tokens == 0 and set(s.allowed()) == {5, 9}
    s = s.advance(5)
    assert (s.active, s.progress, s.met_tokens) == (0, 1, 1)
    assert s.allowed() == (6,)  # in the middle of a phrase only its next token is offered
    s = s.advance(6)
    assert s.met_tokens == 2 and s.allowed() == (7,)
    s = s.advance(7)
    assert s.met == (True, False) and s.active == -1 and s.met_tokens == 3 and s.allowed() == (9,)
    s = s.advance(3).advance(9)
    assert s.all_met and s.met_tokens == 4 and s.allowed() == ()
    assert s.advance(5) is s  # nothing left to track


def test_abandoned_phrase_resets_progress():
    s = constraint_state_of([(5, 6, 7)], [5, 6])
    assert s.met_tokens == 2
    s = s.advance(8)  # abandons the phrase: progress is lost (the hypothesis drops from bank 2 to bank 0)
    assert s.met_tokens == 0 and s.active == -1 and not s.all_met
    assert constraint_state_of([(5, 6, 7)], [5, 6, 8, 7]).met_tokens == 0  # a late "7" does not resume it
    assert constraint_state_of([(5, 6, 7)], [5, 6, 8, 5, 6, 7]).all_met  # a fresh, contiguous occurrence counts
    # a single-token constraint met during an unrelated detour stays met
    s = constraint_state_of([(5, 6, 7), (9,)], [5, 9])
    assert s.met == (False, True) and s.met_tokens == 1


def test_reset_keeps_the_longest_restart():
    # "a a b": after "a a a" the last two a's are still a valid prefix
    assert constraint_state_of([(1, 1, 2)], [1, 1, 1]).progress == 2
    assert constraint_state_of([(1, 1, 2)], [1, 1, 1, 2]).all_met
    # "New York" vs "New Jersey": "New" starts the first, "Jersey" switches to (and completes) the second
    s = constraint_state_of([(10, 11), (10, 12)], [10, 12])
    assert s.met == (False, True) and s.met_tokens == 2 and s.allowed() == (10,)
    # two identical phrases need two occurrences
    s = constraint_state_of([(4,), (4,)], [4])
    assert s.met_tokens == 1 and not s.all_met
    assert constraint_state_of([(4,), (4,)], [4, 3, 4]).all_met


def test_bookkeeping_is_sound_on_random_streams():
    """Whenever the state says a phrase set is met, the phrases really occur (disjointly, contiguously)."""
    rng = random.Random(0)
    for _ in range(300):
        phrases = [tuple(rng.randint(0, 3) for _ in range(rng.randint(1, 3))) for _ in range(rng.randint(1, 3))]
        stream = [rng.randint(0, 3) for _ in range(rng.randint(0, 15))]
        s = constraint_state_of(phrases, stream)
        for p, m in zip(phrases, s.met):
            if m:
                assert contains(stream, p)
        if s.active >= 0:  # the tracked progress is the true tail of the stream
            assert tuple(stream[len(stream) - s.progress:]) == phrases[s.active][:s.progress]


# ----------------------------------------------------------------------------------------------- bank allocation
def test_bank_allocation_even_split_remainder_to_top():
    assert allocate_banks([10, 10, 10], 9) == [3, 3, 3]
    assert allocate_banks([10, 10, 10], 10) == [3, 3, 4]  # remainder to the top bank
    assert allocate_banks([10], 5) == [5]  # no constraints: one bank, plain beam search


def test_bank_allocation_hands_unused_slots_down():
    assert allocate_banks([10, 10, 0], 9) == [3, 6, 0]  # empty top bank: its slots go to the bank below
    assert allocate_banks([10, 1, 0], 9) == [8, 1, 0]
    assert allocate_banks([0, 10, 10], 9) == [0, 3, 6]  # bank 0 empty: its slots go back to the top
    assert allocate_banks([0, 10, 1], 9) == [0, 8, 1]
    assert allocate_banks([1, 1, 1], 9) == [1, 1, 1]  # fewer candidates than slots
    # more banks than beam slots: the beam goes to the highest banks that have candidates
    assert allocate_banks([5, 5, 5, 5, 5], 2) == [0, 0, 0, 0, 2]
    assert allocate_banks([5, 5, 5, 0, 0], 2) == [0, 0, 2, 0, 0]
    rng = random.Random(0)
    for _ in range(500):
        counts = [rng.randint(0, 6) for _ in range(rng.randint(1, 6))]
        k = rng.randint(1, 12)
        alloc = allocate_banks(counts, k)
        assert all(0 <= a <= c for a, c in zip(alloc, counts))
        assert sum(alloc) == min(k, sum(counts))


def test_select_keeps_best_per_bank():
    # (score, beam, token, bank): bank 1 would lose every slot to bank 0 by score alone
    cands = [(-1.0, 0, 1, 0), (-1.1, 0, 2, 0), (-1.2, 0, 3, 0), (-1.3, 0, 4, 0), (-5.0, 0, 5, 1), (-6.0, 0, 6, 1)]
    assert _select(cands, 2, 4) == [0, 1, 4, 5]
    assert _select([(-1.0, 0, 1, 0), (-2.0, 0, 2, 0), (-3.0, 0, 3, 0)], 1, 2) == [0, 1]  # one bank: top-k


def test_bad_allocation_arguments():
    with pytest.raises(ValueError):
        allocate_banks([1, 2], 0)
    with pytest.raises(ValueError):
        allocate_banks([], 3)
    with pytest.raises(ValueError):
        allocate_banks([1, -1], 3)


# ----------------------------------------------------------------------------------------------- tiny models
def _inputs(batch: int = 2):
    torch.manual_seed(1)
    ids = torch.randint(3, 128, (batch, 6))
    mask = torch.ones_like(ids)
    if batch > 1:  # left padding on the second row
        ids[1, :2] = 0
        mask[1, :2] = 0
    return ids, mask


def _frequent_token(model, ids, mask, pos: int = 2) -> int:
    """A token greedy decoding emits at step ``pos``, used as eos so that beams finish at different lengths."""
    g = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=pos + 1, pad_token_id=0, **GREEDY)
    return int(g[0, ids.shape[1] + pos])


@pytest.mark.parametrize("k,lp,es,nrs", [(3, 1.0, False, 1), (4, 0.0, True, 2), (2, 2.0, "never", 2),
                                         (4, -1.0, False, 1)])
def test_no_constraints_equals_hf_beam_search(tiny_model, k, lp, es, nrs):
    ids, mask = _inputs(2)
    eos = _frequent_token(tiny_model, ids, mask)
    kw = dict(input_ids=ids, attention_mask=mask, num_beams=k, max_new_tokens=10, length_penalty=lp, early_stopping=es,
              num_return_sequences=nrs, eos_token_id=eos, pad_token_id=0, return_dict_in_generate=True,
              output_scores=True, **GREEDY)
    ref = tiny_model.generate(**kw)
    out = tiny_model.generate(**kw, custom_generate=DynamicBeamAllocation([]))
    assert torch.equal(out.sequences, ref.sequences)
    torch.testing.assert_close(out.sequences_scores, ref.sequences_scores)
    assert bool(out.constraints_met.all())


def test_no_constraints_beams_do_finish_early(tiny_llama):
    """Equality also holds when hypotheses end at different lengths (eos inside the generated part)."""
    ids, mask = _inputs(2)
    eos = _frequent_token(tiny_llama, ids, mask, pos=0)  # the best first token of row 0 ends a hypothesis at once
    kw = dict(input_ids=ids, attention_mask=mask, num_beams=4, num_return_sequences=3, max_new_tokens=10,
              eos_token_id=eos, pad_token_id=0, **GREEDY)
    ref = tiny_llama.generate(**kw)
    out = tiny_llama.generate(**kw, custom_generate=DynamicBeamAllocation([]))
    assert torch.equal(out, ref)
    lengths = [row[ids.shape[1]:].tolist().index(eos) + 1 if eos in row[ids.shape[1]:].tolist() else 10
               for row in out]
    assert min(lengths) < 10 and len(set(lengths)) > 1


def test_own_beam_size_when_generate_has_none(tiny_gpt2):
    ids, mask = _inputs(1)
    ref = tiny_gpt2.generate(input_ids=ids, attention_mask=mask, num_beams=3, max_new_tokens=8, pad_token_id=0,
                             **GREEDY)
    out = tiny_gpt2.generate(input_ids=ids, attention_mask=mask, max_new_tokens=8, pad_token_id=0,
                             custom_generate=DynamicBeamAllocation([], num_beams=3), **GREEDY)
    assert torch.equal(out, ref)


def test_constraints_met_on_tiny_model_batch(tiny_model):
    """Per-row constraints, batch 2 with left padding; eos (a token the model likes) only after all are met."""
    ids, mask = _inputs(2)
    eos = _frequent_token(tiny_model, ids, mask)
    rows = [[[10, 11, 12], [50]], [[77, 78]]]
    plen = ids.shape[1]
    plain = tiny_model.generate(input_ids=ids, attention_mask=mask, num_beams=4, max_new_tokens=12,
                                eos_token_id=eos, pad_token_id=0, num_return_sequences=2, **GREEDY)
    for r, row in enumerate(plain):
        b = r // 2
        assert not all(contains(generated(row, plen, {eos}), p) for p in rows[b])
    out = tiny_model.generate(input_ids=ids, attention_mask=mask, num_beams=4, max_new_tokens=12, eos_token_id=eos,
                              pad_token_id=0, num_return_sequences=2, return_dict_in_generate=True,
                              custom_generate=DynamicBeamAllocation(rows), **GREEDY)
    assert out.sequences.shape[0] == 4 and bool(out.constraints_met.all())
    for r, row in enumerate(out.sequences):
        gen = generated(row, plen, {eos})
        for p in rows[r // 2]:
            assert contains(gen, p), (r, gen, p)
        assert constraint_state_of(rows[r // 2], gen).all_met  # bookkeeping agrees with a recount
    # rows with shared constraints, num_beams from generate(), more banks (C = 4) than beam slots
    shared = [[10, 11, 12], [50]]
    out = tiny_model.generate(input_ids=ids, attention_mask=mask, num_beams=3, max_new_tokens=12, pad_token_id=0,
                              custom_generate=DynamicBeamAllocation(shared), **GREEDY)
    for row in out:
        assert all(contains(generated(row, plen, {2}), p) for p in shared)


def test_max_new_tokens_too_small_warns(tiny_llama):
    ids, mask = _inputs(1)
    with pytest.warns(UserWarning, match="do not contain every constraint"):
        out = tiny_llama.generate(input_ids=ids, attention_mask=mask, num_beams=2, max_new_tokens=2, pad_token_id=0,
                                  return_dict_in_generate=True,
                                  custom_generate=DynamicBeamAllocation([[10, 11, 12]]), **GREEDY)
    assert out.sequences.shape[1] == ids.shape[1] + 2 and not bool(out.constraints_met.any())


# ----------------------------------------------------------------------------------------------- bad arguments
@pytest.mark.parametrize("constraints", [[""], [[5], []], [["a"], "b"], [[1, "x"]], 3, [[-1]], [[[1], 2]]])
def test_bad_constraints(constraints):
    with pytest.raises(ValueError):
        DynamicBeamAllocation(constraints, tokenizer=lambda text, add_special_tokens=False: {"input_ids": [1]})


def test_bad_arguments(tiny_llama):
    with pytest.raises(ValueError, match="num_beams"):
        DynamicBeamAllocation([[5]], num_beams=0)
    with pytest.raises(ValueError, match="tokenizer"):
        DynamicBeamAllocation(["umbrella"])  # strings need a tokenizer
    ids, mask = _inputs(2)
    kw = dict(input_ids=ids, attention_mask=mask, max_new_tokens=4, pad_token_id=0)
    with pytest.raises(ValueError, match="do_sample=False"):
        tiny_llama.generate(**kw, num_beams=2, do_sample=True, custom_generate=DynamicBeamAllocation([[5]]))
    with pytest.raises(ValueError, match="per-row"):
        tiny_llama.generate(**kw, num_beams=2, custom_generate=DynamicBeamAllocation([[[5]], [[6]], [[7]]]), **GREEDY)
    with pytest.raises(ValueError, match="num_return_sequences"):
        tiny_llama.generate(**kw, num_return_sequences=3, custom_generate=DynamicBeamAllocation([[5]], num_beams=2),
                            **GREEDY)
    with pytest.raises(ValueError, match="end-of-sequence"):
        tiny_llama.generate(**kw, num_beams=2, custom_generate=DynamicBeamAllocation([[5, 2]]), **GREEDY)
    with pytest.raises(ValueError, match="vocabulary"):
        tiny_llama.generate(**kw, num_beams=2, custom_generate=DynamicBeamAllocation([[500]]), **GREEDY)


# ----------------------------------------------------------------------------------------------- real model
WEATHER = "Write one sentence about the weather."


@pytest.mark.real_model
def test_real_model_every_hypothesis_contains_the_constraints(smollm):
    model, tokenizer = smollm
    inputs = encode_prompts(tokenizer, WEATHER)
    plen = inputs.input_ids.shape[1]
    dba = DynamicBeamAllocation.for_model(model, tokenizer, constraints=["umbrella", "Tuesday"])
    phrases = dba.phrases[0]
    assert phrases == [tuple(tokenizer(" umbrella", add_special_tokens=False).input_ids),
                       tuple(tokenizer(" Tuesday", add_special_tokens=False).input_ids)]
    eos = {tokenizer.eos_token_id}
    # neither greedy nor plain beam search produces the constraints by themselves
    greedy = model.generate(**inputs, max_new_tokens=40, **GREEDY)
    beam = model.generate(**inputs, num_beams=4, max_new_tokens=40, **GREEDY)
    for row in (greedy[0], beam[0]):
        gen = generated(row, plen, eos)
        assert not any(contains(gen, p) for p in phrases)
    out = model.generate(**inputs, custom_generate=dba, num_beams=4, num_return_sequences=3, max_new_tokens=40,
                         return_dict_in_generate=True, output_scores=True, **GREEDY)
    assert bool(out.constraints_met.all())
    texts = []
    for row in out.sequences:
        gen = generated(row, plen, eos)
        assert all(contains(gen, p) for p in phrases)
        text = tokenizer.decode(gen)
        assert "umbrella" in text and "Tuesday" in text
        texts.append(text)
    # fluency-ish: mean log-probability per token under the model (plain beam search: about -0.75, DBA: about -1.6)
    def mean_logprob(row):
        gen = generated(row, plen, eos)
        seq = torch.cat([inputs.input_ids[0], torch.tensor(gen)])[None]
        with torch.no_grad():
            lp = torch.log_softmax(model(input_ids=seq).logits[0, plen - 1:-1].float(), -1)
        return float(lp.gather(1, torch.tensor(gen)[:, None]).mean())

    base_lp = mean_logprob(beam[0])
    dba_lp = [mean_logprob(r) for r in out.sequences]
    print("\nplain beam:", repr(tokenizer.decode(generated(beam[0], plen, eos))), f"mean logp {base_lp:.3f}")
    for text, lp in zip(texts, dba_lp):
        print("DBA:", repr(text), f"mean logp {lp:.3f}")
    assert min(dba_lp) > -2.5 and min(dba_lp) > base_lp - 1.5
    assert len(set(texts)) == len(texts)


@pytest.mark.real_model
def test_real_model_batch_per_row_phrasal_constraints(smollm):
    model, tokenizer = smollm
    prompts = [WEATHER, "Describe your breakfast in one sentence."]
    constraints = [["umbrella"], ["pancakes with maple syrup"]]
    inputs = encode_prompts(tokenizer, prompts)
    plen = inputs.input_ids.shape[1]
    dba = DynamicBeamAllocation.for_model(model, tokenizer, constraints=constraints)
    assert len(dba.phrases[1][0]) >= 4  # a multi-token phrase
    out = model.generate(**inputs, custom_generate=dba, num_beams=4, max_new_tokens=24, **GREEDY)
    eos = {tokenizer.eos_token_id}
    for b, row in enumerate(out):
        gen = generated(row, plen, eos)
        print(f"\nrow {b}:", repr(tokenizer.decode(gen)))
        assert all(contains(gen, p) for p in dba.phrases[b])
        assert constraints[b][0] in tokenizer.decode(gen)
