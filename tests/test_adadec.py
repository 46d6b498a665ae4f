"""AdaDec (arXiv 2506.08980): fitted entropy threshold, pause-then-rerank with lookahead."""

from __future__ import annotations

import json
import math

import pytest
import torch

from hf_decoding_ext.sampling.adadec import AdaDec, calibration_data
from hf_decoding_ext.core.models import encode_prompts
from hf_decoding_ext.core.entropy import entropy

GREEDY = dict(do_sample=False, temperature=None, top_p=None, top_k=None)


# --------------------------------------------------------------------------------------------- real model
@pytest.fixture(scope="module")
def fitted(smollm, tmp_path_factory):
    model, tokenizer = smollm
    path = tmp_path_factory.mktemp("adadec") / "thresholds.json"
    result = AdaDec.fit_threshold(model, tokenizer, path=path, progress=False)
    return result, path


@pytest.mark.real_model
def test_calibration_data_is_code():
    texts, prompts = calibration_data()
    assert len(texts) == len(prompts) >= 60
    assert sum("def " in p for p in prompts) >= 30  # the shipped snippets: signature + docstring prompts
    assert all(t.strip() for t in texts)


@pytest.mark.real_model
def test_fitted_threshold_is_finite_and_separates(smollm, fitted):
    model, _ = smollm
    result, path = fitted
    print("AdaDec fit:", {k: v for k, v in result.items() if k != "model"})
    assert math.isfinite(result["threshold"]) and result["threshold"] > 0
    assert result["n_positions"] > 1000 and 0 < result["n_errors"] < result["n_positions"]
    # the paper's premise on this model: greedy errors happen at higher entropy; higher entropy -> less correct
    assert result["mean_entropy_error"] > result["mean_entropy_correct"] + 0.5
    assert result["coef"] < 0
    assert result["accuracy"] > 0.6
    # saved under the model's name, loadable, and used by for_model without refitting
    table = json.loads(path.read_text())
    assert table[model.name_or_path]["threshold"] == result["threshold"]
    assert AdaDec.load_threshold(model.name_or_path, path) == result["threshold"]
    loop = AdaDec.for_model(model, None, path=str(path))
    assert loop.threshold == result["threshold"] and (loop.top_k, loop.lookahead_length) == (3, 5)
    assert AdaDec.for_model(model, None, threshold=1.25).threshold == 1.25


@pytest.mark.real_model
def test_infinite_threshold_equals_greedy(smollm):
    model, tokenizer = smollm
    inputs = encode_prompts(tokenizer, ["Write a Python function that adds two numbers.", "Hi"])  # left padding
    ref = model.generate(**inputs, max_new_tokens=20, return_dict_in_generate=True, output_scores=True, **GREEDY)
    out = model.generate(**inputs, max_new_tokens=20, custom_generate=AdaDec(float("inf")),
                         return_dict_in_generate=True, output_scores=True, **GREEDY)
    assert torch.equal(out.sequences, ref.sequences)
    assert len(out.scores) == len(ref.scores)
    assert all(torch.allclose(a, b, atol=1e-4) for a, b in zip(out.scores, ref.scores))
    assert not any(any(s["paused"]) for s in out.adadec_trace)


@torch.no_grad()
def _rollout_score(model, prefix: list[int], cand: int, length: int, eos: int) -> float:
    """Independent lookahead score: full forwards without cache."""
    ids, lps = list(prefix), []
    tok = cand
    for j in range(length + 1):
        logp = torch.log_softmax(model(input_ids=torch.tensor([ids])).logits[0, -1].float(), -1)
        if j == 0:
            lps.append(float(logp[cand]))
        else:
            tok = int(logp.argmax())
            lps.append(float(logp[tok]))
        ids.append(tok)
        if tok == eos:
            break
    return sum(lps) / len(lps)


@pytest.mark.real_model
def test_reranks_exactly_above_threshold(smollm, fitted):
    model, tokenizer = smollm
    thr = fitted[0]["threshold"]
    loop = AdaDec(thr)
    prompts = [('def count_primes(n):\n    """Return the number of prime numbers smaller than n."""\n', False),
               ("Write a Python function that returns the median of a list.", True)]
    n_paused, n_changed = 0, 0
    for prompt, chat in prompts:
        inputs = encode_prompts(tokenizer, prompt, chat=chat)
        plen = inputs.input_ids.shape[1]
        out = model.generate(**inputs, max_new_tokens=24, custom_generate=loop, return_dict_in_generate=True,
                             **GREEDY)
        seq = out.sequences[0]
        trace = out.adadec_trace
        assert len(trace) == seq.shape[0] - plen
        with torch.no_grad():
            logits = model(input_ids=seq[None]).logits[0].float()
        for t, step in enumerate(trace):
            pos_logits = logits[plen + t - 1]
            ent = float(entropy(pos_logits[None])[0])
            assert step["entropy"][0] == pytest.approx(ent, abs=1e-3)
            assert step["paused"][0] == (step["entropy"][0] >= thr)
            tok = int(seq[plen + t])
            if not step["paused"][0]:
                assert tok == int(pos_logits.argmax())
                continue
            n_paused += 1
            cands, scores = step["candidates"][0], step["scores"][0]
            assert cands == pos_logits.topk(3).indices.tolist()
            assert tok == cands[max(range(3), key=lambda i: scores[i])]
            n_changed += tok != cands[0]
            prefix = seq[:plen + t].tolist()
            ref = [_rollout_score(model, prefix, c, 5, tokenizer.eos_token_id) for c in cands]
            assert scores == pytest.approx(ref, abs=2e-3)
            assert tok == cands[max(range(3), key=lambda i: ref[i])]
    print(f"AdaDec: {n_paused} paused steps, {n_changed} where reranking changed the greedy token")
    # measured: 3 paused steps, 2 where the lookahead chose another token than greedy's (a no-op AdaDec fails)
    assert n_paused >= 1 and n_changed >= 1


# --------------------------------------------------------------------------------------------- tiny models
def test_batch_left_padding_matches_single_rows(tiny_model):
    rows = [[5, 6, 7, 8, 9, 10], [11, 12, 13]]
    ids = torch.tensor([rows[0], [0, 0, 0] + rows[1]])
    mask = torch.tensor([[1] * 6, [0, 0, 0, 1, 1, 1]])
    loop = AdaDec(threshold=4.0, top_k=3, lookahead_length=3)  # tiny random models: entropy ~ log(128) = 4.85
    kw = dict(max_new_tokens=8, pad_token_id=0, eos_token_id=2, return_dict_in_generate=True, output_scores=True,
              **GREEDY)
    out = tiny_model.generate(input_ids=ids, attention_mask=mask, custom_generate=loop, **kw)
    assert out.sequences.shape == (2, 6 + 8) and len(out.scores) == 8
    assert any(any(s["paused"]) for s in out.adadec_trace)
    for b, row in enumerate(rows):
        single = tiny_model.generate(input_ids=torch.tensor([row]), custom_generate=loop, **kw)
        gen = single.sequences[0, len(row):]
        assert torch.equal(out.sequences[b, 6:6 + gen.shape[0]], gen)
    # threshold inf == greedy generate, with padding
    ref = tiny_model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=8, pad_token_id=0, eos_token_id=2,
                              **GREEDY)
    plain = tiny_model.generate(input_ids=ids, attention_mask=mask, custom_generate=AdaDec(math.inf),
                                max_new_tokens=8, pad_token_id=0, eos_token_id=2, **GREEDY)
    assert torch.equal(plain, ref)


def test_pauses_change_tokens_and_other_steps_stay_greedy(tiny_model):
    """Checked from scratch (cache-free forwards, independent lookahead), not from the trace: with a threshold
    between the entropies of a greedy run, AdaDec pauses at some steps and not at others; where it does not pause
    the token is the argmax, where it pauses it is the best lookahead candidate, and at least one paused step takes
    a token other than greedy's argmax (a no-op AdaDec, i.e. greedy decoding, fails here)."""
    ids = torch.tensor([[5, 6, 7, 8]])
    kw = dict(max_new_tokens=12, pad_token_id=0, eos_token_id=2, **GREEDY)
    greedy = tiny_model.generate(input_ids=ids, **kw)
    with torch.no_grad():
        ent = entropy(tiny_model(input_ids=greedy).logits[0, 3:-1].float()).sort().values
    thr = float(ent[len(ent) // 2 - 1] + ent[len(ent) // 2]) / 2  # between two measured entropies
    out = tiny_model.generate(input_ids=ids, custom_generate=AdaDec(thr, top_k=3, lookahead_length=3), **kw)
    seq = out[0]
    assert not torch.equal(out, greedy)
    n_paused = n_plain = n_changed = 0
    for t in range(4, seq.shape[0]):
        with torch.no_grad():
            logits = tiny_model(input_ids=seq[None, :t]).logits[0, -1].float()
        h, tok = float(entropy(logits[None])[0]), int(seq[t])
        assert abs(h - thr) > 1e-5  # no step sits on the threshold
        if h < thr:
            n_plain += 1
            assert tok == int(logits.argmax())
            continue
        n_paused += 1
        cands = logits.topk(3).indices.tolist()
        ref = [_rollout_score(tiny_model, seq[:t].tolist(), c, 3, 2) for c in cands]
        assert tok in cands and ref[cands.index(tok)] == pytest.approx(max(ref), abs=1e-5)
        n_changed += tok != cands[0]
    assert n_paused >= 1 and n_plain >= 1 and n_changed >= 1, (n_paused, n_plain, n_changed)


def test_zero_threshold_pauses_every_step(tiny_llama):
    ids = torch.tensor([[5, 6, 7]])
    out = tiny_llama.generate(input_ids=ids, max_new_tokens=10, pad_token_id=0, eos_token_id=2,
                              custom_generate=AdaDec(0.0, top_k=5, lookahead_length=4),
                              return_dict_in_generate=True, output_scores=True, **GREEDY)
    n_new = out.sequences.shape[1] - 3
    assert n_new == 10 or int(out.sequences[0, -1]) == 2  # max_new_tokens exact unless eos
    assert len(out.scores) == len(out.adadec_trace) == n_new
    for s in out.adadec_trace:
        assert s["paused"][0]  # threshold 0: every step pauses
        sc = s["scores"][0]
        assert len(s["candidates"][0]) == 5
        assert s["tokens"][0] == s["candidates"][0][sc.index(max(sc))]


def test_argument_errors(tiny_llama):
    with pytest.raises(ValueError, match="top_k"):
        AdaDec(1.0, top_k=0)
    with pytest.raises(ValueError, match="lookahead_length"):
        AdaDec(1.0, lookahead_length=-1)
    with pytest.raises(ValueError, match="threshold"):
        AdaDec("high")
    with pytest.raises(ValueError, match="threshold"):
        AdaDec(float("nan"))
    with pytest.raises(ValueError, match="do_sample=False"):
        tiny_llama.generate(input_ids=torch.tensor([[5, 6]]), custom_generate=AdaDec(1.0), do_sample=True,
                            max_new_tokens=2, pad_token_id=0)
    with pytest.raises(ValueError, match="tokenizer"):
        AdaDec.for_model(tiny_llama, None, path="/nonexistent/dir/thresholds.json")
