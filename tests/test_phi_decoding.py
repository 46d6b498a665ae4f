"""φ-Decoding (arXiv 2503.13288): decision rules on scripted values, the search's mechanics on tiny models, and one
short real-model run. The accuracy comparison with best-of-N is ``scripts/eval_phi_decoding.py``."""

from __future__ import annotations

import copy
import math

import pytest
import torch

from hf_decoding_ext.search.phi_decoding import (
    PhiDecoding,
    cluster_texts,
    normalized_logprob,
    select_final,
    select_steps,
    width_prune,
)

PROMPT = "hello world, this"


def _softmax(xs, t=1.0):
    return torch.softmax(torch.tensor(xs, dtype=torch.float64) / t, 0).tolist()


# ------------------------------------------------------------------------------------------ decision rules
def test_width_prune_drops_below_mean_minus_sigma_and_never_on_equal_values():
    x = [-1.0, -1.2, -0.8, -4.0, -1.1]
    m = sum(x) / len(x)
    sd = math.sqrt(sum((v - m) ** 2 for v in x) / len(x))
    kept, pruned = width_prune(x, 1.0, min_keep=2)
    assert pruned == [i for i, v in enumerate(x) if v < m - sd] == [3]
    assert kept == [0, 1, 2, 4]
    assert width_prune([-2.5] * 6, 1.0, min_keep=3) == (list(range(6)), [])  # equal log-probs: no pruning
    assert width_prune([-1.0, -1.0, -9.0], 0.0, min_keep=1) == ([0, 1], [2])  # sigma 0: below the mean


def test_width_prune_refills_to_the_beam_size_by_softmax_of_the_pruned():
    x = [-0.1, -0.1, -0.1, -9.0, -1.0, -8.0]  # mean - std = about -5.9: pruned {3, 5}
    kept, pruned = width_prune(x, 1.0, min_keep=5, generator=torch.Generator().manual_seed(0))
    assert len(kept) == 5 and set(kept) >= {0, 1, 2, 4} and len(pruned) == 1
    # softmax(logp / 0.1) over {-9, -8}: -8 is e^10 times likelier; over 200 draws it nearly always wins
    wins = sum(width_prune(x, 1.0, min_keep=5, generator=torch.Generator().manual_seed(s))[1] == [3]
               for s in range(200))
    assert wins >= 195


def test_step_selection_mixes_cluster_size_and_advantage_weights():
    texts = ["the answer is twelve"] * 3 + ["another route via thirty", "zebra quantum lattice"]
    adv = [0.3, 0.1, 0.2, 0.5, 0.05]
    chosen, info = select_steps(adv, texts, 3, cluster_num=3, threshold=0.7, generator=torch.Generator().manual_seed(1))
    assert info["state"] == "success" and len(set(chosen)) == 3
    labels = info["labels"]
    sizes = [labels.count(lab) for lab in labels]
    assert sorted(sizes) == [1, 1, 3, 3, 3]
    expected = [0.5 * c + 0.5 * a for c, a in zip(_softmax([s / 5 for s in sizes]), _softmax(adv, 0.1))]
    assert info["weights"] == pytest.approx(expected, abs=1e-12)
    assert info["early_stop"] is False  # largest cluster 3/5 = 0.6 <= 0.7
    _, info = select_steps(adv, texts, 3, cluster_num=3, threshold=0.5, generator=torch.Generator().manual_seed(1))
    assert info["early_stop"] is True


def test_step_selection_falls_back_to_plain_advantage_sampling():
    adv = [0.4, -0.2, -0.3, 0.1]
    texts = ["alpha beta", "gamma delta", "epsilon zeta", "eta theta"]
    # only 2 candidates with positive advantage < beam size 3: softmax(adv / 0.1) over all, as the official code
    chosen, info = select_steps(adv, texts, 3, generator=torch.Generator().manual_seed(0))
    assert info["state"] == "cannot cluster" and info["weights"] == pytest.approx(_softmax(adv, 0.1))
    assert len(set(chosen)) == 3
    _, info = select_steps(adv, texts, 2, clustering=False, generator=torch.Generator().manual_seed(0))
    assert info["state"] == "advantage" and info["weights"] == pytest.approx(_softmax(adv, 0.1))
    # empty foresight texts are never clustered; an empty TF-IDF vocabulary ("1 + 2 = 3") falls back
    _, info = select_steps([1.0, 1.0, 1.0], ["1 + 2 = 3", "4 * 5 = 6", "7"], 3, cluster_num=2,
                           generator=torch.Generator().manual_seed(0))
    assert info["state"] == "fail"


def test_final_selection_draws_from_the_larger_cluster_whatever_its_label():
    texts = ["the answer is twelve"] * 3 + ["zebra quantum lattice"]
    adv = [0.2, 0.3, 0.1, 5.0]  # the outlier has by far the best advantage but sits in the smaller cluster
    larger_labels = set()
    for s in range(30):
        pick, info = select_final(adv, texts, generator=torch.Generator().manual_seed(s))
        assert info["state"] == "success" and pick in (0, 1, 2)
        larger_labels.add(info["labels"][0])
    assert larger_labels == {0, 1}  # both branches of the official code ran (the cluster1 branch fixed)
    # no positive advantage: the official negated softmax over all beams favours the most negative advantage
    picks = [select_final([-0.1, -1.0], ["a b", "c d"], generator=torch.Generator().manual_seed(s))[0]
             for s in range(50)]
    assert picks.count(1) >= 49
    # one eligible beam: clustering into 2 fails, softmax(adv / 0.1) over all beams
    pick, info = select_final([0.5, -3.0], ["only one", "other"], generator=torch.Generator().manual_seed(0))
    assert info["state"] == "fail" and pick == 0


def test_cluster_texts_is_tfidf_kmeans():
    labels = cluster_texts(["red apple pie", "red apple tart", "blue ocean wave", "blue ocean tide"], 2, 0)
    assert labels[0] == labels[1] != labels[2] == labels[3]
    with pytest.raises(ValueError):
        cluster_texts(["one text"], 2, 0)


# ------------------------------------------------------------------------------------------ the loop, tiny models
def _ids(tok):
    return torch.tensor([tok(PROMPT)["input_ids"]])


def _generate(model, tok, max_new_tokens=24, **params):
    params = {"tokenizer": tok, "seed": 0, "record_process": True, **params}
    loop = PhiDecoding(**params)
    out = model.generate(_ids(tok), custom_generate=loop, max_new_tokens=max_new_tokens, do_sample=True, top_k=0,
                         pad_token_id=0, return_dict_in_generate=True)
    return out, out.search_stats[0], out.phi_trace[0]


@pytest.fixture(scope="module")
def uniform_llama(tiny_llama):
    """The tiny Llama with a zero LM head: every token has log-probability -log(128), so every step has the same
    length-normalised log-probability."""
    model = copy.deepcopy(tiny_llama)
    model.config.tie_word_embeddings = False
    model.lm_head = torch.nn.Linear(model.config.hidden_size, model.config.vocab_size, bias=False)
    torch.nn.init.zeros_(model.lm_head.weight)
    return model


def test_width_pruning_saves_rollouts_when_step_logprobs_vary(tiny_llama, char_tokenizer):
    _, st, trace = _generate(tiny_llama, char_tokenizer, step_beam_size=2, num_rollout=4, num_foresight=3,
                             max_step_tokens=4, depth_pruning=False)
    assert st["width_pruned"] > 0
    assert st["foresight_rollouts"] + st["width_pruned"] + st["complete_candidates"] == st["candidates"]
    assert st["total_rollouts"] == st["rollouts"]  # sampled steps + foresight + final completions
    for it in trace[:-1]:
        sampled = [i for i, c in enumerate(it["carried"]) if not c]
        x = [it["step_nlp"][i] for i in sampled]
        mean = sum(x) / len(x)
        sd = math.sqrt(sum((v - mean) ** 2 for v in x) / len(x))
        below = {i for i in sampled if it["step_nlp"][i] < mean - sd - 1e-9}
        pruned = set(sampled) - set(it["pool"])
        # the pruned candidates are those below mean - std, less any refilled to keep the beam size
        assert pruned <= below
        if len(sampled) - len(below) >= 2 - (len(it["carried"]) - len(sampled)):
            assert pruned == below
        assert len(it["foresight_values"]) == len(it["pool"])


def test_width_pruning_never_fires_on_equal_logprobs(uniform_llama, char_tokenizer):
    _, st, trace = _generate(uniform_llama, char_tokenizer, step_beam_size=2, num_rollout=4, num_foresight=3,
                             max_step_tokens=4, depth_pruning=False)
    nlp = [v for it in trace[:-1] for v in it["step_nlp"]]
    assert nlp and all(v == pytest.approx(-math.log(128), abs=1e-5) for v in nlp)
    assert st["width_pruned"] == 0 and st["candidates"] > 0
    for it in trace[:-1]:  # every sampled candidate is kept for foresight
        assert {i for i, c in enumerate(it["carried"]) if not c} <= set(it["pool"])


def test_depth_pruning_fires_when_all_beams_agree(tiny_llama, char_tokenizer):
    common = dict(step_beam_size=3, num_rollout=2, num_foresight=5, max_step_tokens=3, step_temperature=1e-4,
                  threshold=1.0, least_foresight_num=1)
    _, st, trace = _generate(tiny_llama, char_tokenizer, max_new_tokens=40, **common)
    assert all(len(set(it["step_texts"])) == 1 for it in trace[:-1])  # near-greedy steps: every beam agrees
    assert st["depth_stop"] == "agreement"
    assert st["iterations"] == 2 and st["depth_pruned_iterations"] == 3  # from iteration index 1 on
    _, st_off, _ = _generate(tiny_llama, char_tokenizer, max_new_tokens=40, depth_pruning=False, **common)
    assert st_off["depth_stop"] is None and st_off["iterations"] == 5
    assert st_off["generated_tokens"] > st["generated_tokens"]


@torch.no_grad()
def _mean_logprob(model, prefix, continuation):
    ids = torch.tensor([prefix + continuation])
    logp = torch.log_softmax(model(ids).logits[0].float(), -1)
    return sum(float(logp[len(prefix) - 1 + j, t]) for j, t in enumerate(continuation)) / len(continuation)


def test_without_pruning_it_is_foresight_advantage_step_sampling(tiny_llama, char_tokenizer):
    out, st, trace = _generate(tiny_llama, char_tokenizer, step_beam_size=2, num_rollout=3, num_foresight=3,
                               max_step_tokens=3, max_new_tokens=30, width_pruning=False, depth_pruning=False,
                               clustering=False)
    prompt = _ids(char_tokenizer)[0].tolist()
    assert st["width_pruned"] == 0 and st["depth_stop"] is None and st["iterations"] == 3
    assert st["foresight_rollouts"] + st["complete_candidates"] == st["candidates"] == 3 * 2 * 3
    checked = 0
    for it in trace[:-1]:
        assert it["pool"] == list(range(len(it["step_texts"])))  # every candidate is foreseen
        assert it["selection"]["state"] == "advantage"
        assert it["selection"]["weights"] == pytest.approx(_softmax(it["advantages"], 0.1))
        for toks, fore, value, adv, parent in zip(it["candidate_tokens"], it["foresight_tokens"],
                                                  it["foresight_values"], it["advantages"], it["parent_values"]):
            # the foresight value is the rollout's mean log-probability under the model, the advantage its gain
            # over the value of the beam it extends
            assert adv == pytest.approx(value - parent, abs=1e-12)
            if fore:  # (a step that ended the trace has nothing to foresee)
                assert value == pytest.approx(_mean_logprob(tiny_llama, prompt + toks, fore), abs=1e-4)
                checked += 1
    assert checked >= 6
    final = trace[-1]
    assert final["selection"]["state"] == "advantage"
    # the output is the chosen beam followed by its final completion
    gen = out.sequences[0, len(prompt):].tolist()
    assert gen[:len(final["beam_tokens"][final["chosen"]])] == final["beam_tokens"][final["chosen"]]


def test_seeded_rows_are_searched_independently(tiny_llama, char_tokenizer):
    params = dict(step_beam_size=2, num_rollout=2, num_foresight=2, max_step_tokens=3, tokenizer=char_tokenizer,
                  seed=3)
    kw = dict(max_new_tokens=12, do_sample=True, top_k=0, pad_token_id=0)
    a = tiny_llama.generate(_ids(char_tokenizer), custom_generate=PhiDecoding(**params), **kw)
    again = tiny_llama.generate(_ids(char_tokenizer), custom_generate=PhiDecoding(**params), **kw)
    assert torch.equal(a, again)
    twice = _ids(char_tokenizer).repeat(2, 1)
    out = tiny_llama.generate(twice, custom_generate=PhiDecoding(**params), return_dict_in_generate=True, **kw)
    assert torch.equal(out.sequences[0], a[0]) and torch.equal(out.sequences[1], a[0])
    assert len(out.search_stats) == 2 and out.search_stats[0]["generated_tokens"] > 0


def test_arguments_are_validated(tiny_llama, char_tokenizer):
    for bad in (dict(step_beam_size=0), dict(num_rollout=1.5), dict(step_temperature=0), dict(threshold=1.5),
                dict(cluster_num=1), dict(width_pruning="yes"), dict(sigma_rate=-1), dict(seed="x"),
                dict(max_foresight_tokens=0), dict(delimiter="")):
        with pytest.raises(ValueError, match="must"):
            PhiDecoding(tokenizer=char_tokenizer, **bad)
    with pytest.raises(ValueError, match="do_sample=True"):
        tiny_llama.generate(_ids(char_tokenizer), custom_generate=PhiDecoding(tokenizer=char_tokenizer),
                            do_sample=False, max_new_tokens=3, pad_token_id=0)
    with pytest.raises(ValueError, match="tokenizer"):
        tiny_llama.generate(_ids(char_tokenizer), custom_generate=PhiDecoding(), do_sample=True, max_new_tokens=3,
                            pad_token_id=0)
    assert normalized_logprob(-3.0, 3) == pytest.approx(-1.0)


# ------------------------------------------------------------------------------------------ real model
@pytest.mark.real_model
def test_phi_decoding_on_an_arithmetic_problem(smollm):
    from hf_decoding_ext.core.arithmetic import load_problems, problem_prompt
    from hf_decoding_ext.core.models import encode_prompts

    model, tok = smollm
    problem = load_problems("dev")[0]
    enc = encode_prompts(tok, problem_prompt(problem))
    loop = PhiDecoding(step_beam_size=2, num_rollout=2, num_foresight=2, least_foresight_num=1, tokenizer=tok,
                       seed=0, max_foresight_tokens=16)
    out = model.generate(**enc, custom_generate=loop, do_sample=True, top_k=0, max_new_tokens=20,
                         return_dict_in_generate=True)
    st = out.search_stats[0]
    new = out.sequences.shape[1] - enc["input_ids"].shape[1]
    assert 0 < new <= 20
    assert st["candidates"] == st["foresight_rollouts"] + st["width_pruned"] + st["complete_candidates"] >= 4
    assert st["generated_tokens"] > new and st["model_calls"] > 0
    assert st["total_rollouts"] == st["rollouts"]
