"""Isotropic and Proximal Search (arXiv:2310.08130)."""

import pytest
import torch
import torch.nn.functional as F
from transformers.generation.utils import GenerateDecoderOnlyOutput

from hf_decoding_ext.sampling.ips import IsotropicProximalSearch


def _cos(a, b):
    return float(F.cosine_similarity(a.double(), b.double(), dim=-1))


def _ips_score_reference(prob, cand, prev, ctx, alpha):
    """Eq. 3-5 of the paper, written out with plain loops (independent of the library's vectorised version)."""
    p_value = sum(_cos(cand, h) for h in prev) / len(prev)
    h_rt = (torch.stack(list(prev)).double().sum(0) + cand.double()) / (len(prev) + 1)
    i_value = sum(_cos(h_rt, u) for u in ctx) / len(ctx)
    return alpha * float(prob) + (1 - alpha) * (p_value - i_value)


def _check_trace(out, prompt_len, first_steps, alpha, rows, eos=None, response_for=None, context_for=None,
                 tol=1e-5):
    """Every IPS step chose the candidate that maximises the independently recomputed IPS score.

    ``response_for(b)`` / ``context_for(b)`` give the representations of row ``b``'s generated tokens and context
    utterances (default: those of the trace).
    """
    seqs = out.sequences
    n_checked = 0
    for s in range(out.ips_candidate_ids.shape[0]):
        t = first_steps + s  # 0-based index of the generated token chosen at this step
        for b in rows:
            if eos is not None and (seqs[b, prompt_len:prompt_len + t] == eos).any():
                continue  # the row had finished
            chosen = int(seqs[b, prompt_len + t])
            cands = out.ips_candidate_ids[s, b].tolist()
            assert chosen in cands
            prev = (response_for(b) if response_for else out.ips_response_hidden[b])[:t]
            ctx = context_for(b) if context_for else out.ips_context_hidden[b][out.ips_context_mask[b]]
            scores = [_ips_score_reference(out.ips_candidate_probs[s, b, j], out.ips_candidate_hidden[s, b, j], prev,
                                           ctx, alpha) for j in range(len(cands))]
            assert scores[cands.index(chosen)] >= max(scores) - tol, (s, b, scores)
            n_checked += 1
    return n_checked


# ----------------------------------------------------------------------------------------------- tiny models


def _batch():
    ids = torch.tensor([[0, 0, 5, 2, 6, 7], [3, 4, 2, 5, 6, 7]])
    mask = torch.tensor([[0, 0, 1, 1, 1, 1], [1, 1, 1, 1, 1, 1]])
    return ids, mask


def test_alpha_one_is_greedy_with_left_padding(tiny_model):
    ids, mask = _batch()
    ref = tiny_model.generate(ids, attention_mask=mask, max_new_tokens=16, do_sample=False)
    out = tiny_model.generate(ids, attention_mask=mask, max_new_tokens=16, do_sample=False,
                              custom_generate=IsotropicProximalSearch(alpha=1.0))
    assert torch.equal(ref, out)


def test_batch_rows_equal_single_runs(tiny_model):
    ids, mask = _batch()
    loop = IsotropicProximalSearch(alpha=0.6, top_k=5)
    batched = tiny_model.generate(ids, attention_mask=mask, max_new_tokens=12, do_sample=False, eos_token_id=None,
                                  custom_generate=loop)
    for b in range(2):
        row = ids[b][mask[b].bool()][None]
        alone = tiny_model.generate(row, max_new_tokens=12, do_sample=False, eos_token_id=None, custom_generate=loop)
        assert torch.equal(alone[0, row.shape[1]:], batched[b, ids.shape[1]:])


def test_trace_chosen_token_maximises_ips_score(tiny_model):
    ids, mask = _batch()
    out = tiny_model.generate(ids, attention_mask=mask, max_new_tokens=10, do_sample=False, eos_token_id=None,
                              custom_generate=IsotropicProximalSearch(alpha=0.3, top_k=6, first_steps=2),
                              return_dict_in_generate=True, output_scores=True)
    assert isinstance(out, GenerateDecoderOnlyOutput)
    assert out.sequences.shape == (2, 6 + 10)
    assert len(out.scores) == 10
    assert out.ips_candidate_ids.shape == (8, 2, 6)
    assert out.ips_candidate_hidden.shape[:3] == (8, 2, 6)
    # utterances end with the eos token (2); row 0 has one inside its prompt, row 1 one as well
    assert out.ips_context_mask.sum(1).tolist() == [1, 1]
    assert _check_trace(out, 6, 2, 0.3, rows=[0, 1]) == 16


def test_context_without_utterance_boundary_uses_last_token(tiny_llama):
    ids = torch.tensor([[0, 5, 6, 7], [8, 9, 10, 11]])
    mask = torch.tensor([[0, 1, 1, 1], [1, 1, 1, 1]])
    out = tiny_llama.generate(ids, attention_mask=mask, max_new_tokens=4, do_sample=False, eos_token_id=None,
                              custom_generate=IsotropicProximalSearch(), return_dict_in_generate=True)
    assert out.ips_context_mask.sum(1).tolist() == [1, 1]
    # a pad token equal to the eos token is not an utterance boundary
    out = tiny_llama.generate(torch.tensor([[2, 2, 5, 6, 2, 7]]), attention_mask=torch.tensor([[0, 0, 1, 1, 1, 1]]),
                              max_new_tokens=4, do_sample=False, eos_token_id=2, pad_token_id=2,
                              custom_generate=IsotropicProximalSearch(), return_dict_in_generate=True)
    assert out.ips_context_mask.sum().item() == 1


def test_eos_and_max_new_tokens(tiny_llama):
    ids, mask = _batch()
    loop = IsotropicProximalSearch()
    free = tiny_llama.generate(ids, attention_mask=mask, max_new_tokens=9, do_sample=False, eos_token_id=None,
                               custom_generate=loop)
    assert free.shape == (2, 6 + 9)
    eos = int(free[0, 6 + 4])  # the 5th token of row 0 (an IPS step) becomes the eos
    out = tiny_llama.generate(ids, attention_mask=mask, max_new_tokens=9, do_sample=False, eos_token_id=eos,
                              pad_token_id=0, custom_generate=loop)
    assert torch.equal(out[0, :6 + 5], free[0, :6 + 5])
    assert (out[0, 6 + 5:] == 0).all()


def test_sampling_first_steps_and_bad_arguments(tiny_llama):
    ids, mask = _batch()
    torch.manual_seed(0)
    out = tiny_llama.generate(ids, attention_mask=mask, max_new_tokens=6, do_sample=True, top_k=7,
                              custom_generate=IsotropicProximalSearch())
    assert out.shape[0] == 2
    for kwargs in ({"alpha": -0.1}, {"alpha": 1.1}, {"top_k": 0}, {"first_steps": 0}, {"eou_token_id": -3}):
        with pytest.raises(ValueError):
            IsotropicProximalSearch(**kwargs)


# ------------------------------------------------------------------------------------------------ real model

CHATS = [
    [{"role": "user", "content": "Hi! Do you have any plans for the weekend?"},
     {"role": "assistant", "content": "Not yet. I might go hiking if the weather is nice."},
     {"role": "user", "content": "Where would you go hiking?"}],
    [{"role": "user", "content": "I just adopted a puppy."},
     {"role": "assistant", "content": "Congratulations! What breed is it?"},
     {"role": "user", "content": "A golden retriever. Any tips for training?"}],
    [{"role": "user", "content": "Can you recommend a good book?"},
     {"role": "assistant", "content": "Sure. Do you like science fiction?"},
     {"role": "user", "content": "Yes, I love it."}],
    [{"role": "user", "content": "I'm learning to cook."},
     {"role": "assistant", "content": "That's great! What have you made so far?"},
     {"role": "user", "content": "Only pasta. What should I try next?"}],
]
NEW = 24


def _teacher_forced(model, tok, seq, mask):
    """Last-layer hidden states of one finished (unpadded) sequence, and its utterance-end positions."""
    ids = seq[mask.bool()][None]
    with torch.no_grad():
        h = model(ids, output_hidden_states=True).hidden_states[-1][0]
    return ids[0], h


def _response_geometry(h_resp, h_ctx):
    """(mean pairwise cosine similarity of the response tokens, mean cosine of the response mean to the context)."""
    n = h_resp.shape[0]
    r = F.normalize(h_resp.double(), dim=-1)
    sim = r @ r.T
    proximity = float((sim.sum() - sim.diag().sum()) / (n * (n - 1)))
    isotropy_value = float((F.normalize(h_resp.double().mean(0), dim=-1) @ F.normalize(h_ctx.double(), dim=-1).T)
                           .mean())
    return proximity, isotropy_value


@pytest.fixture(scope="module")
def chat_runs(smollm):
    from hf_decoding_ext.core.models import encode_prompts

    model, tok = smollm
    enc = encode_prompts(tok, CHATS)
    ips = model.generate(**enc, custom_generate=IsotropicProximalSearch(), do_sample=False, max_new_tokens=NEW,
                         return_dict_in_generate=True)
    greedy = model.generate(**enc, do_sample=False, max_new_tokens=NEW)
    return enc, ips, greedy


def _response(seq, prompt_len, eos):
    new = seq[prompt_len:]
    stop = (new == eos).nonzero()
    return new[: int(stop[0])] if stop.numel() else new


@pytest.mark.real_model
def test_real_trace_matches_model_and_every_step_maximises_ips(smollm, chat_runs):
    model, tok = smollm
    enc, out, _ = chat_runs
    p = enc["input_ids"].shape[1]
    loop = IsotropicProximalSearch()
    n_checked = 0
    for b in range(len(CHATS)):
        seq = out.sequences[b]
        full_mask = torch.cat([enc["attention_mask"][b], torch.ones(seq.shape[0] - p, dtype=torch.long)])
        ids, h = _teacher_forced(model, tok, seq, full_mask)
        pb = int(enc["attention_mask"][b].sum())
        n_resp = out.ips_response_hidden.shape[1]
        # the trace holds the model's own representations: generated tokens and context utterances (<|im_end|>)
        torch.testing.assert_close(out.ips_response_hidden[b], h[pb:pb + n_resp], atol=2e-3, rtol=2e-3)
        eou = (ids[:pb] == tok.eos_token_id).nonzero().squeeze(1)
        assert eou.numel() == len(CHATS[b]) + 1  # system prompt + the three turns
        ctx = h[eou]
        torch.testing.assert_close(out.ips_context_hidden[b][out.ips_context_mask[b]], ctx, atol=2e-3, rtol=2e-3)
        # every candidate of the first IPS step, fed after the prefix, has the representation in the trace
        t0 = loop.first_steps
        cands = out.ips_candidate_ids[0, b]
        prefix = ids[: pb + t0]
        batch = torch.cat([prefix.expand(cands.numel(), -1), cands[:, None]], 1)
        with torch.no_grad():
            hc = model(batch, output_hidden_states=True).hidden_states[-1][:, -1]
        torch.testing.assert_close(out.ips_candidate_hidden[0, b], hc, atol=2e-3, rtol=2e-3)
        # the chosen token maximises the IPS score recomputed from the teacher-forced representations
        n_checked += _check_trace(out, p, t0, loop.alpha, rows=[b], eos=tok.eos_token_id,
                                  response_for=lambda _: h[pb:], context_for=lambda _: ctx, tol=1e-4)
    assert n_checked >= len(CHATS) * 10


@pytest.mark.real_model
def test_real_response_is_proximal_and_isotropic_vs_greedy(smollm, chat_runs):
    """The paper's two properties, measured on the final responses (teacher-forced representations)."""
    model, tok = smollm
    enc, out, greedy = chat_runs
    p = enc["input_ids"].shape[1]
    rows = []
    for b in range(len(CHATS)):
        res = {}
        for name, seq in (("ips", out.sequences[b]), ("greedy", greedy[b])):
            resp = _response(seq, p, tok.eos_token_id)
            full_mask = torch.cat([enc["attention_mask"][b], torch.ones(resp.numel(), dtype=torch.long)])
            ids, h = _teacher_forced(model, tok, torch.cat([seq[:p], resp]), full_mask)
            pb = int(enc["attention_mask"][b].sum())
            ctx = h[(ids[:pb] == tok.eos_token_id).nonzero().squeeze(1)]
            res[name] = _response_geometry(h[pb:], ctx)
        rows.append(res)
        print(f"\nchat {b}: proximity IPS {res['ips'][0]:.3f} greedy {res['greedy'][0]:.3f}; "
              f"similarity to context IPS {res['ips'][1]:.3f} greedy {res['greedy'][1]:.3f}")
        print("   IPS   :", repr(tok.decode(_response(out.sequences[b], p, tok.eos_token_id))))
        print("   greedy:", repr(tok.decode(_response(greedy[b], p, tok.eos_token_id))))

    def mean(name, i):
        return sum(r[name][i] for r in rows) / len(rows)

    gap_ips = mean("ips", 0) - mean("ips", 1)
    gap_greedy = mean("greedy", 0) - mean("greedy", 1)
    print(f"mean proximity - context similarity: IPS {gap_ips:.3f} greedy {gap_greedy:.3f}")
    # proximity: response tokens closer to each other than greedy's; isotropy: the search objective
    # (proximity - similarity to the context utterances) is higher for IPS than for greedy
    assert mean("ips", 0) > mean("greedy", 0)
    assert gap_ips > gap_greedy
    # IPS departs from greedy (it is not a re-ranking that always agrees with the model)
    assert any(not torch.equal(out.sequences[b], greedy[b]) for b in range(len(CHATS)))


@pytest.mark.real_model
def test_real_alpha_one_equals_greedy(smollm):
    from hf_decoding_ext.core.models import encode_prompts

    model, tok = smollm
    enc = encode_prompts(tok, CHATS[:2])  # a left-padded batch of two multi-turn chats
    ref = model.generate(**enc, do_sample=False, max_new_tokens=16)
    out = model.generate(**enc, do_sample=False, max_new_tokens=16, custom_generate=IsotropicProximalSearch(alpha=1.0))
    assert torch.equal(ref, out)
