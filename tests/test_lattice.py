"""Lattice decoding: best-first search with path recombination (Xu & Durrett, arXiv 2112.07660)."""

from __future__ import annotations

import math
import random

import pytest
import torch

from hf_decoding_ext.search.lattice import Lattice, LatticeDecoding

PROMPT = torch.tensor([[5, 17, 33, 9, 41, 12]])


def _bigram_llama(seed=0):
    """A tiny Llama whose next-token distribution depends on the last token only (attention output zeroed): paths
    that share their last token share their future, so recombination happens often."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                      bos_token_id=1, eos_token_id=2, pad_token_id=0)
    model = LlamaForCausalLM(cfg).eval()
    with torch.no_grad():
        model.model.layers[0].self_attn.o_proj.weight.zero_()
        model.lm_head.weight.mul_(8.0)  # sharper distributions
    return model


def _run(model, loop, ids=PROMPT, new=12, **kw):
    return model.generate(ids, custom_generate=loop, max_new_tokens=new, do_sample=False, pad_token_id=0,
                          return_dict_in_generate=True, **kw)


def _brute_force_paths(lat):
    return [lat.tokens_of(p) for p in lat.paths()]


def _spells(lat, tokens):
    """Nodes reached from the root along a path spelling ``tokens``."""
    frontier = {0}
    for t in tokens:
        frontier = {c for i in frontier for c in lat.nodes[i].children if lat.nodes[c].token == t}
    return frontier


# ----------------------------------------------------------------------------------------------- the lattice object
def _diamonds(k):
    """k diamonds in a row: 2**k paths of length 2k + 1."""
    tokens, edges, last, nid = {}, [], 0, 1
    for d in range(k):
        a, b, join = nid, nid + 1, nid + 2
        tokens.update({a: 10 + d, b: 50 + d, join: 90 + d})
        edges += [(last, a), (last, b), (a, join), (b, join)]
        last, nid = join, nid + 3
    tokens[nid] = 2
    edges.append((last, nid))
    rng = random.Random(0)
    logprobs = {e: -rng.random() for e in edges}  # distinct path scores
    return Lattice.from_edges(tokens, edges, finished=[nid], logprobs=logprobs)


def test_handmade_lattice_counts_kbest_and_ngrams_match_brute_force():
    lat = _diamonds(6)
    assert lat.count_paths() == 2 ** 6 == len(list(lat.paths()))
    assert lat.count_paths(max_length=12) == 0 and lat.count_paths(max_length=13) == 64
    paths = list(lat.paths())
    brute = sorted(((lat.path_logprob(p) / len(p), lat.tokens_of(p)) for p in paths), reverse=True)
    best = lat.k_best(5)
    assert [h.tokens for h in best] == [t for _, t in brute[:5]]
    assert all(math.isclose(h.score, s) for h, (s, _) in zip(best, brute))
    grams = {t[i:i + 4] for t in _brute_force_paths(lat) for i in range(len(t) - 3)}
    assert lat.ngrams(4) == grams
    # an extra end in the middle: paths of two lengths; max_length filters by length
    lps = {(0, 1): -1.0, (1, 2): -1.0, (2, 3): -1.0, (1, 3): -3.0, (3, 4): -0.5}
    lat2 = Lattice.from_edges({1: 5, 2: 6, 3: 7, 4: 2}, list(lps), finished=[2, 4], logprobs=lps)
    assert lat2.count_paths() == 3 == len(list(lat2.paths()))
    assert lat2.count_paths(max_length=3) == 2
    assert [h.tokens for h in lat2.k_best(3)] == [(5, 6, 7, 2), (5, 6), (5, 7, 2)]
    assert [h.tokens for h in lat2.k_best(3, length_penalty=0.0)] == [(5, 6), (5, 6, 7, 2), (5, 7, 2)]
    assert [h.tokens for h in lat2.k_best(3, max_length=3)] == [(5, 6), (5, 7, 2)]
    assert [h.logprob for h in lat2.k_best(3)] == [-3.5, -2.0, -4.5]


def test_arguments_are_validated():
    for kw in ({"beam_size": 0}, {"k_best": 0}, {"ngram_suffix": 0}, {"len_diff": 0}, {"budget": 0},
               {"merge": "both"}, {"avg_score": float("nan")}, {"num_hypotheses": 0}, {"beam_size": 2.5}):
        with pytest.raises(ValueError, match="got"):
            LatticeDecoding(**kw)


def test_sampling_and_short_budgets_are_refused(tiny_llama):
    with pytest.raises(ValueError, match="do_sample=False"):
        tiny_llama.generate(PROMPT, custom_generate=LatticeDecoding(), max_new_tokens=4, do_sample=True)
    with pytest.raises(ValueError, match="budget must be at least max_new_tokens"):
        _run(tiny_llama, LatticeDecoding(budget=3), new=8)


# ----------------------------------------------------------------------------------------------- the search
def test_recombination_off_first_completed_hypothesis_is_greedy(tiny_model):
    new = 10
    greedy = tiny_model.generate(PROMPT, max_new_tokens=new, do_sample=False, pad_token_id=0)[0, PROMPT.shape[1]:]
    out = _run(tiny_model, LatticeDecoding(beam_size=3, merge="none"), new=new)
    assert list(out.completed[0][0]) == greedy.tolist()
    lat = out.lattices[0]
    assert not lat.merges
    # without recombination the lattice is a tree: one path per end
    assert lat.count_paths() == len(lat.ends) == len(out.completed[0])
    # the output is the best complete path of the lattice
    best = out.hypotheses[0][0]
    assert out.sequences[0, PROMPT.shape[1]:PROMPT.shape[1] + len(best.tokens)].tolist() == list(best.tokens)


@pytest.mark.parametrize("merge", ["zip", "imp"])
def test_search_lattice_mechanics(merge):
    """On a model with recombination opportunities: merges happen; every edge's token is in the top-k at the context it
    was scored in (with that log-probability); merged nodes share their last n tokens and the dropped hypothesis is
    still spelled by a path ending at the kept node; the exact path count, k-best and n-grams equal brute force."""
    model = _bigram_llama()
    k_best, n = 3, 2
    loop = LatticeDecoding(beam_size=3, k_best=k_best, ngram_suffix=n, merge=merge, num_hypotheses=6)
    new = 10
    out = _run(model, loop, new=new)
    lat = out.lattices[0]
    assert lat.merges, "expected recombinations on the bigram model"
    assert out.model_calls[0] == 3 * new

    # every edge token is in the top-k at its scoring context, with the recorded log-probability
    checked = 0
    with torch.no_grad():
        for node in lat.nodes.values():
            if node.token is None:
                continue
            contexts = [(node.history[:-1], node.logprob)] + list(zip(node.edge_contexts, node.parent_logprobs))
            for ctx, lp in contexts:
                ids = torch.cat([PROMPT, torch.tensor([ctx], dtype=torch.long)], dim=1) if ctx else PROMPT
                logp = torch.log_softmax(model(ids).logits[0, -1].float(), dim=-1)
                assert node.token in logp.topk(k_best).indices.tolist()
                assert abs(float(logp[node.token]) - lp) < 1e-4
                checked += 1
            assert node.token == int(torch.log_softmax(model(torch.cat(
                [PROMPT, torch.tensor([node.history[:-1]], dtype=torch.long)], dim=1) if len(node.history) > 1
                else PROMPT).logits[0, -1], -1).topk(k_best).indices[node.rank])
    assert checked > lat.num_nodes

    # merged nodes share their last n tokens; the dropped hypothesis stays in the lattice, ending at the kept node
    for rec in lat.merges:
        assert rec.matched_tokens[-n:] == rec.dropped_history[-n:]
        assert lat.nodes[rec.kept].token == rec.dropped_history[-1]
        assert rec.kept in _spells(lat, rec.dropped_history)
        chain = rec.matched_nodes
        assert tuple(lat.nodes[i].token for i in reversed(chain)) == rec.matched_tokens[-len(chain):]
        assert all(chain[j + 1] in lat.nodes[chain[j]].parents for j in range(len(chain) - 1))
    # a DAG with more complete paths than completed hypotheses
    assert lat.count_paths() > len(out.completed[0])

    # exact counts equal brute-force enumeration
    paths = list(lat.paths())
    assert lat.count_paths() == len(paths)
    for cap in (new - 2, new, new + 3):
        assert lat.count_paths(max_length=cap) == sum(len(p) <= cap for p in paths)
    token_paths = [lat.tokens_of(p) for p in paths]
    assert lat.ngrams(4) == {t[i:i + 4] for t in token_paths for i in range(len(t) - 3)}
    brute = sorted((lat.path_logprob(p) / len(p) for p in paths if len(p) <= new), reverse=True)[:6]
    assert [round(h.score, 9) for h in out.hypotheses[0]] == [round(s, 9) for s in brute]
    # the generate() output is the best hypothesis
    best = out.hypotheses[0][0].tokens
    assert out.sequences[0, PROMPT.shape[1]:].tolist()[:len(best)] == list(best)


def test_model_calls_are_counted_exactly(tiny_llama):
    forwards = []
    handle = tiny_llama.register_forward_pre_hook(lambda mod, args, kw: forwards.append(kw["input_ids"].shape[0]),
                                                  with_kwargs=True)
    try:
        out = _run(tiny_llama, LatticeDecoding(beam_size=2, merge="zip"), new=8)
    finally:
        handle.remove()
    # one prompt forward (the root's distribution) + one forward per further model call, all of one row
    assert out.model_calls == [16]
    assert len(forwards) == out.forwards == 16 and set(forwards) == {1}


def test_batch_rows_are_searched_independently(tiny_llama):
    a = torch.tensor([[5, 17, 33, 9, 41, 12]])
    b = torch.tensor([[0, 0, 8, 21, 30, 7]])
    mask = torch.tensor([[1] * 6, [0, 0, 1, 1, 1, 1]])
    loop = LatticeDecoding(beam_size=2, ngram_suffix=2)
    both = _run(tiny_llama, loop, ids=torch.cat([a, b]), attention_mask=mask, new=8)
    alone = [_run(tiny_llama, loop, ids=x, new=8) for x in (a, b[:, 2:])]
    for row, single in enumerate(alone):
        assert both.hypotheses[row][0].tokens == single.hypotheses[0][0].tokens
        assert both.lattices[row].count_paths() == single.lattices[0].count_paths()
        assert both.model_calls[row] == single.model_calls[0]


def test_stateful_processor_is_refused(tiny_llama):
    from hf_decoding_ext.sampling.mirostat import MirostatLogitsProcessor

    with pytest.raises(ValueError, match="stateful"):
        _run(tiny_llama, LatticeDecoding(beam_size=2), new=4, logits_processor=[MirostatLogitsProcessor(tau=3.0)])


# ----------------------------------------------------------------------------------------------- real model
def _beam_calls(model, inputs, num_beams, new):
    """transformers' beam search with its model calls counted (rows of every forward)."""
    rows = []
    handle = model.register_forward_pre_hook(lambda mod, args, kw: rows.append(kw["input_ids"].shape[0]),
                                             with_kwargs=True)
    try:
        out = model.generate(**inputs, num_beams=num_beams, num_return_sequences=num_beams, max_new_tokens=new,
                             do_sample=False, early_stopping=False, return_dict_in_generate=True)
    finally:
        handle.remove()
    return out, sum(rows)


def _ngrams(seqs, n=4):
    return {s[i:i + n] for s in seqs for i in range(len(s) - n + 1)}


@pytest.mark.real_model
def test_real_model_lattice_encodes_more_paths_than_beam_search_at_equal_budget(smollm):
    """At beam search's exact model-call budget the lattice holds more complete paths and more unique 4-grams than
    beam search returns (small default-run version: 4 beams, 16 tokens; the full comparison with 16 beams is
    scripts/eval_lattice.py); with recombination off its first completed hypothesis is greedy's output."""
    from hf_decoding_ext import encode_prompts

    model, tok = smollm
    new, beams = 16, 4
    eos = model.generation_config.eos_token_id
    eos = set(eos if isinstance(eos, list) else [eos])
    inputs = encode_prompts(tok, "Write one sentence about the sea.")
    plen = inputs.input_ids.shape[1]
    beam, calls = _beam_calls(model, inputs, beams, new)
    beam_seqs = set()
    for s in beam.sequences[:, plen:].tolist():
        cut = next((j + 1 for j, t in enumerate(s) if t in eos), len(s))
        beam_seqs.add(tuple(s[:cut]))
    out = model.generate(**inputs, custom_generate=LatticeDecoding(budget=calls, tokenizer=tok),
                         max_new_tokens=new, do_sample=False, return_dict_in_generate=True)
    lat = out.lattices[0]
    assert out.model_calls[0] == calls == beams * new
    paths = lat.count_paths(max_length=new)
    assert paths >= 2 * len(beam_seqs), (paths, len(beam_seqs))
    assert len(lat.ngrams(4)) > len(_ngrams(beam_seqs)), (len(lat.ngrams(4)), len(_ngrams(beam_seqs)))
    greedy = model.generate(**inputs, max_new_tokens=new, do_sample=False)[0, plen:].tolist()
    off = model.generate(**inputs, custom_generate=LatticeDecoding(budget=new + 2, merge="none"),
                         max_new_tokens=new, do_sample=False, return_dict_in_generate=True)
    assert list(off.completed[0][0]) == greedy


@pytest.mark.slow
@pytest.mark.real_model
def test_full_equal_budget_comparison_with_16_beams(tmp_path):
    """The full comparison (scripts/eval_lattice.py, one prompt per task, 16 beams, 24 tokens): the lattice encodes
    at least 5x more complete paths and more unique 4-grams than beam search's 16 outputs at the same model calls."""
    import importlib.util
    import json
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "scripts" / "eval_lattice.py"
    spec = importlib.util.spec_from_file_location("eval_lattice", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    out = tmp_path / "lattice_eval.json"
    assert module.main(["--limit", "1", "--merges", "zip", "--out", str(out)]) == 0
    for record in json.loads(out.read_text())["per_prompt"]:
        beam, lat = record["beam"], record["lattice-zip"]
        assert lat["model_calls"] == beam["model_calls"]
        assert lat["complete_paths"] >= 5 * beam["complete_paths"]
        assert lat["unique_4grams"] > beam["unique_4grams"]
