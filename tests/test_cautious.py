"""Cautious Next Token Prediction (arXiv 2507.03038): entropy-driven trial counts, lowest-perplexity trials."""

from __future__ import annotations

import math

import pytest
import torch

from hf_decoding_ext.sampling.cautious import CautiousNTP, punctuation_token_ids
from hf_decoding_ext.core.models import encode_prompts
from hf_decoding_ext.core.entropy import entropy

SAMPLE = dict(do_sample=True, temperature=1.0, top_p=None, top_k=None)
PROMPTS = ["Tell me a short story about a cat.", "Give me three tips for learning to cook.",
           "Why do leaves change colour in autumn?"]
MAX_NEW = 16


def formula(h: float) -> int:
    """The paper's trial count (defaults N_min=1, N_max=10, H_low=0.01, H_high=1.5), written out independently."""
    return int(1 + 9 * min(max((h - 0.01) / (1.5 - 0.01), 0.0), 1.0))


@torch.no_grad()
def token_logprobs(model, seq: torch.Tensor, plen: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Teacher-forced log-probs of the generated tokens and the logits predicting them."""
    logits = model(input_ids=seq[None]).logits[0].float()[plen - 1:-1]
    lp = torch.log_softmax(logits, -1).gather(1, seq[plen:, None]).squeeze(1)
    return lp, logits


@pytest.fixture(scope="module")
def runs(smollm):
    """CNTP and plain sampling (same temperature, same seeds) on a few prompts."""
    model, tokenizer = smollm
    loop = CautiousNTP(tokenizer)
    results = []
    for i, prompt in enumerate(PROMPTS):
        inputs = encode_prompts(tokenizer, prompt)
        torch.manual_seed(i)
        out = model.generate(**inputs, custom_generate=loop, max_new_tokens=MAX_NEW, return_dict_in_generate=True,
                             output_scores=True, **SAMPLE)
        torch.manual_seed(i)
        plain = model.generate(**inputs, max_new_tokens=MAX_NEW, **SAMPLE)
        results.append((inputs.input_ids.shape[1], out, plain))
    return results


@pytest.mark.real_model
def test_trial_count_follows_entropy_formula(smollm, runs):
    model, _ = smollm
    n_multi = n_single = 0
    for plen, out, _ in runs:
        seq = out.sequences[0]
        _, logits = token_logprobs(model, seq, plen)
        pos = 0
        for step in out.cntp_trace:
            h = float(entropy(logits[pos][None])[0])  # independent entropy at the step's start
            assert step["entropy"] == pytest.approx(h, abs=1e-3)
            assert step["n_trials"] == formula(step["entropy"]) == len(step["trials"])
            # more than one trial exactly at high-entropy steps: H >= H_low + (H_high - H_low) / (N_max - N_min)
            assert (step["n_trials"] > 1) == (step["entropy"] >= 0.01 + 1.49 / 9 - 1e-9)
            n_multi += step["n_trials"] > 1
            n_single += step["n_trials"] == 1
            pos += len(step["appended"])
        assert pos == seq.shape[0] - plen
    print(f"CNTP: {n_multi} multi-trial steps, {n_single} single-token steps")
    assert n_multi >= 3


@pytest.mark.real_model
def test_confident_steps_take_one_token(smollm):
    model, tokenizer = smollm
    inputs = encode_prompts(tokenizer, "Write a Python function that adds two numbers.")
    torch.manual_seed(0)
    out = model.generate(**inputs, custom_generate=CautiousNTP(tokenizer), max_new_tokens=24,
                         return_dict_in_generate=True, **SAMPLE)
    trace = out.cntp_trace
    single = [s for s in trace if s["n_trials"] == 1]
    print("CNTP code prompt (entropy, trials):", [(round(s["entropy"], 3), s["n_trials"]) for s in trace])
    assert single and len(single) < len(trace), "expected both confident and uncertain steps"
    for s in trace:
        assert s["n_trials"] == formula(s["entropy"])
        if s["n_trials"] == 1:
            assert s["entropy"] < 0.01 + 1.49 / 9 and len(s["appended"]) == 1


@pytest.mark.real_model
def test_appends_lowest_perplexity_trial(smollm, runs):
    model, tokenizer = smollm
    punct = punctuation_token_ids(tokenizer)
    for plen, out, _ in runs:
        seq = out.sequences[0]
        lp, _ = token_logprobs(model, seq, plen)
        pos = 0
        for step in out.cntp_trace:
            n_app = len(step["appended"])
            if step["n_trials"] > 1:
                ppl = step["perplexities"]
                best = min(range(len(ppl)), key=lambda i: ppl[i])
                assert step["chosen"] == best
                trial = step["trials"][best]
                assert step["appended"] == trial[:n_app]
                assert seq[plen + pos: plen + pos + n_app].tolist() == trial[:n_app]
                if n_app == len(trial):  # whole trial appended: its perplexity, judged by the model, matches
                    ref = math.exp(-float(lp[pos:pos + n_app].mean()))
                    assert ppl[best] == pytest.approx(ref, rel=1e-3)
                # every trial ends at its first punctuation token unless a stopping criterion cut it
                for t, end in zip(step["trials"], step["ends"]):
                    assert not any(x in punct for x in t[:-1])
                    assert end in ("punct", "stop")
                    assert (end == "punct") == (t[-1] in punct) or end == "stop"
                # the appended segment ends at punctuation unless eos / max_new_tokens cut it
                if step["appended"][-1] not in punct:
                    assert step["ends"][best] == "stop" or n_app < len(trial)
                    assert pos + n_app == MAX_NEW or step["appended"][-1] == tokenizer.eos_token_id
            pos += n_app
        # max_new_tokens exact (unless eos)
        assert seq.shape[0] - plen == MAX_NEW or int(seq[-1]) == tokenizer.eos_token_id
        assert len(out.scores) == seq.shape[0] - plen


@pytest.mark.real_model
def test_lower_perplexity_than_plain_sampling(smollm, runs):
    model, _ = smollm
    cntp, plain = [], []
    for plen, out, ref in runs:
        cntp.append(-float(token_logprobs(model, out.sequences[0], plen)[0].mean()))
        plain.append(-float(token_logprobs(model, ref[0], plen)[0].mean()))
    print(f"mean per-token NLL: CNTP {sum(cntp) / len(cntp):.3f} vs sampling {sum(plain) / len(plain):.3f}",
          [round(x, 3) for x in cntp], [round(x, 3) for x in plain])
    assert sum(cntp) / len(cntp) < sum(plain) / len(plain) - 0.3


@pytest.mark.real_model
def test_max_new_tokens_cuts_a_trial(smollm):
    model, tokenizer = smollm
    inputs = encode_prompts(tokenizer, PROMPTS[0])
    for n in (1, 4):
        torch.manual_seed(0)
        out = model.generate(**inputs, custom_generate=CautiousNTP(tokenizer), max_new_tokens=n,
                             return_dict_in_generate=True, output_scores=True, output_logits=True, **SAMPLE)
        assert out.sequences.shape[1] - inputs.input_ids.shape[1] == n
        assert len(out.scores) == len(out.logits) == n


@pytest.mark.real_model
def test_punctuation_set_from_tokenizer(smollm):
    _, tokenizer = smollm
    ids = punctuation_token_ids(tokenizer)
    assert punctuation_token_ids(tokenizer) is ids  # cached per tokenizer instance
    for text in [".", ",", "?", "!", ":", ";", "\n", ")"]:
        tok = tokenizer.encode(text, add_special_tokens=False)
        assert len(tok) == 1 and tok[0] in ids, text
    for i in list(ids)[:200]:
        t = tokenizer.decode([i])
        assert t.rstrip(" \t")[-1] in ".,;:!?)]}\n"  # trailing spaces (e.g. indentation after \n) ignored
    for word in [" the", " cat", "def"]:
        assert tokenizer.encode(word, add_special_tokens=False)[0] not in ids
    assert punctuation_token_ids(tokenizer, ".") < ids


# --------------------------------------------------------------------------------------------- tiny models
def test_tiny_model_cap_and_exact_length(tiny_model):
    loop = CautiousNTP(punctuation_ids=[7, 8], max_trial_tokens=3)
    torch.manual_seed(0)
    out = tiny_model.generate(input_ids=torch.tensor([[5, 6, 9]]), custom_generate=loop, max_new_tokens=11,
                              pad_token_id=0, eos_token_id=2, return_dict_in_generate=True, output_scores=True,
                              **SAMPLE)
    n_new = out.sequences.shape[1] - 3
    assert n_new == 11 or int(out.sequences[0, -1]) == 2
    assert len(out.scores) == n_new and out.scores[0].shape == (1, 128)
    # a random tiny model is uncertain (entropy ~ log 128): every step samples max_trials trials
    for step in out.cntp_trace:
        assert step["n_trials"] == 10
        for t, end in zip(step["trials"], step["ends"]):
            assert len(t) <= 3
            assert end == "punct" if t[-1] in (7, 8) else end in ("cap", "stop")


def test_greedy_single_trial_steps(tiny_llama):
    # entropy_low/high above log(128): every step gets one trial -> plain greedy when do_sample=False
    loop = CautiousNTP(punctuation_ids=[7], entropy_low=10.0, entropy_high=11.0)
    ids = torch.tensor([[5, 6, 9]])
    kw = dict(max_new_tokens=6, pad_token_id=0, eos_token_id=2, do_sample=False, temperature=None, top_p=None,
              top_k=None)
    assert torch.equal(tiny_llama.generate(input_ids=ids, custom_generate=loop, **kw),
                       tiny_llama.generate(input_ids=ids, **kw))


def test_batch_refused_and_argument_errors(tiny_llama):
    loop = CautiousNTP(punctuation_ids=[7])
    with pytest.raises(ValueError, match="batch size 1"):
        tiny_llama.generate(input_ids=torch.tensor([[5, 6], [7, 8]]), custom_generate=loop, max_new_tokens=2,
                            pad_token_id=0, **SAMPLE)
    with pytest.raises(ValueError, match="tokenizer"):
        CautiousNTP()
    with pytest.raises(ValueError, match="min_trials"):
        CautiousNTP(punctuation_ids=[7], min_trials=0)
    with pytest.raises(ValueError, match="max_trials"):
        CautiousNTP(punctuation_ids=[7], min_trials=3, max_trials=2)
    with pytest.raises(ValueError, match="entropy_low"):
        CautiousNTP(punctuation_ids=[7], entropy_low=1.5, entropy_high=0.5)
    with pytest.raises(ValueError, match="max_trial_tokens"):
        CautiousNTP(punctuation_ids=[7], max_trial_tokens=0)
    with pytest.raises(ValueError, match="empty"):
        CautiousNTP(punctuation_ids=[])
    assert [CautiousNTP(punctuation_ids=[7]).num_trials(h) for h in (0.0, 0.17, 0.18, 0.76, 1.5, 9.0)] == \
        [formula(h) for h in (0.0, 0.17, 0.18, 0.76, 1.5, 9.0)] == [1, 1, 2, 5, 10, 10]
