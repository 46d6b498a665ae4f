"""MBR decoding (search/mbr.py): the argmax of mean pairwise utility, on fixed pools with scripted utilities, inside
generate() on tiny models, and its effect on the real model (chrF against a reference)."""

from __future__ import annotations

import pytest
import torch

from hf_decoding_ext.core.candidates import CandidatePool
from hf_decoding_ext.core.scoring import chrf
from hf_decoding_ext.search.mbr import MBRDecoding, build_utility_scorer, mbr_select

SAMPLE = dict(do_sample=True, pad_token_id=0, eos_token_id=2, top_k=None, top_p=None)


def _pool(tokens, prompt=(5, 6)):
    n = len(tokens)
    return CandidatePool(tokens=[list(t) for t in tokens], logprobs=torch.zeros(n, dtype=torch.float64),
                         proposal_logprobs=torch.zeros(n, dtype=torch.float64), ends=["eos"] * n,
                         prompt=torch.tensor(prompt))


def _text_pool(tokenizer, texts):
    return _pool([tokenizer.encode(t, add_special_tokens=False) for t in texts])


def test_mbr_returns_the_argmax_of_mean_utility():
    # scripted utility: a fixed table by first token, asymmetric on purpose
    table = torch.tensor([[0.0, 0.2, 0.9, 0.1], [0.6, 0.0, 0.5, 0.4], [0.3, 0.9, 0.0, 0.2], [0.8, 0.1, 0.1, 0.0]])
    util = lambda h, r: float(table[h[0], r[0]])
    loop = MBRDecoding(n=4, utility=util)
    pool = _pool([[0, 9], [1, 9], [2, 9], [3, 9]])
    sel = loop.rerank(pool)
    means = table.sum(1) / 3
    assert sel.index == int(torch.argmax(means)) == 1
    torch.testing.assert_close(sel.scores, means.float())
    torch.testing.assert_close(sel.extra["utility_matrix"], table.double())
    assert sel.extra["utility_calls"] == 12 and sel.extra["pseudo_references"] == [0, 1, 2, 3]
    # candidate order invariance: the same sequence is chosen from any permutation of the pool
    for perm in ([3, 2, 1, 0], [2, 0, 3, 1]):
        permuted = _pool([pool.tokens[i] for i in perm])
        assert permuted.tokens[MBRDecoding(n=4, utility=util).rerank(permuted).index] == [1, 9]


def test_mbr_picks_from_the_consensus_cluster(char_tokenizer):
    paraphrases = ["The capital of France is Paris.", "Paris is the capital of France.",
                   "The capital city of France is Paris.", "France's capital is Paris.", "It is Paris, the capital."]
    off_topic = ["I like green apples and bananas.", "Quantum physics is hard to learn.", "Dogs bark at night."]
    texts = [off_topic[0], paraphrases[0], off_topic[1], paraphrases[1], paraphrases[2], off_topic[2],
             paraphrases[3], paraphrases[4]]
    pool = _text_pool(char_tokenizer, texts)
    for utility in ("chrf", "bleu", "rougeL", "rouge1", "token_f1"):
        sel = MBRDecoding(n=8, utility=utility, tokenizer=char_tokenizer).rerank(pool)
        assert texts[sel.index] in paraphrases, utility
        worst = int(torch.argmin(sel.scores))
        assert texts[worst] in off_topic, utility


def test_two_candidates_with_a_symmetric_utility_tie_to_the_first():
    sel = MBRDecoding(n=2, utility="rouge_l").rerank(_pool([[4, 5, 6], [4, 5, 7, 8]]))
    assert sel.scores[0] == sel.scores[1] and sel.index == 0


def test_subsampled_mbr_equals_full_mbr_on_the_whole_pool(char_tokenizer):
    texts = ["le chat dort", "le chat dort bien", "un chien", "le chien dort", "chat", "le chat mange"]
    pool = _text_pool(char_tokenizer, texts)
    full = MBRDecoding(n=6, utility="chrf", tokenizer=char_tokenizer).rerank(pool)
    whole = MBRDecoding(n=6, utility="chrf", tokenizer=char_tokenizer, num_pseudo_references=6, seed=1).rerank(pool)
    assert whole.index == full.index and torch.equal(whole.scores, full.scores)
    sub = MBRDecoding(n=6, utility="chrf", tokenizer=char_tokenizer, num_pseudo_references=3, seed=1).rerank(pool)
    refs = sub.extra["pseudo_references"]
    assert len(refs) == 3 and sub.extra["utility_calls"] == 6 * 3 - 3
    for i, text in enumerate(texts):
        others = [j for j in refs if j != i]
        assert sub.scores[i].item() == pytest.approx(sum(chrf(text, texts[j]) for j in others) / len(others),
                                                     rel=1e-5)


def test_shortlist_restricts_hypotheses_and_references():
    table = torch.tensor([[0.0, 0.2, 0.9, 0.1], [0.6, 0.0, 0.5, 0.4], [0.3, 0.9, 0.0, 0.2], [0.8, 0.1, 0.1, 0.0]])
    scorer = build_utility_scorer(lambda h, r: float(table[h[0], r[0]]))
    sel = mbr_select(scorer, _pool([[0], [1], [2], [3]]), subset=[0, 2, 3])
    sub = table[[0, 2, 3]][:, [0, 2, 3]]
    expected = sub.sum(1) / 2
    assert sel.index == [0, 2, 3][int(torch.argmax(expected))] == 0
    assert torch.isinf(sel.scores[1]) and sel.scores[[0, 2, 3]].tolist() == pytest.approx(expected.tolist())


def test_mbr_inside_generate(tiny_model):
    seen = []

    def util(h, r):
        seen.append(1)
        return float(len(set(h) & set(r))) / max(len(set(h) | set(r)), 1)

    prompts = torch.tensor([[0, 5, 6, 7], [3, 4, 9, 5]])
    mask = torch.tensor([[0, 1, 1, 1], [1, 1, 1, 1]])
    loop = MBRDecoding(n=4, utility=util, seed=0)
    out = tiny_model.generate(prompts, attention_mask=mask, custom_generate=loop, max_new_tokens=6,
                              return_dict_in_generate=True, **SAMPLE)
    assert len(out.candidates) == 2 and all(len(c) == 4 for c in out.candidates)
    for row in range(2):
        cands = out.candidates[row]
        n = len(cands)
        means = torch.tensor([sum(util(cands[i], cands[j]) for j in range(n) if j != i) / (n - 1) for i in range(n)])
        torch.testing.assert_close(out.selection_scores[row], means.float())
        best = cands[int(torch.argmax(means))]
        assert out.sequences[row, 4:4 + len(best)].tolist() == best
    again = tiny_model.generate(prompts, attention_mask=mask, custom_generate=MBRDecoding(n=4, utility=util, seed=0),
                                max_new_tokens=6, **SAMPLE)
    assert torch.equal(again, out.sequences)  # reproducible from the seed


def test_self_judge_inside_generate(tiny_llama, char_tokenizer):
    loop = MBRDecoding(n=3, utility="judge", tokenizer=char_tokenizer, seed=0)
    loop.scorer.utility.template = "I:{instruction}\nR:{response}\nA:{reference}\nS:"  # short: tiny context
    out = tiny_llama.generate(torch.tensor([[5, 6, 7]]), custom_generate=loop, max_new_tokens=4,
                              return_dict_in_generate=True, **SAMPLE)
    judge = loop.scorer.utility
    assert judge.model is tiny_llama and judge.calls <= 3 * 2
    scores = out.selection_scores[0]
    assert torch.all((scores >= 1) & (scores <= 5))


def test_bad_arguments(char_tokenizer):
    with pytest.raises(ValueError, match="unknown utility"):
        MBRDecoding(utility="comet")
    with pytest.raises(ValueError, match="tokenizer"):
        MBRDecoding(utility="chrf")
    with pytest.raises(ValueError, match="tokenizer"):
        MBRDecoding(utility="judge")
    with pytest.raises(ValueError, match="judge_model"):
        MBRDecoding(utility="chrf", tokenizer=char_tokenizer, judge_model=torch.nn.Linear(2, 2))
    with pytest.raises(ValueError, match="n must be"):
        MBRDecoding(n=0, utility="token_f1")
    with pytest.raises(ValueError, match="num_pseudo_references"):
        MBRDecoding(utility="token_f1", num_pseudo_references=-1)
    with pytest.raises(ValueError, match="subset"):
        mbr_select(build_utility_scorer("token_f1"), _pool([[1], [2]]), subset=[0, 5])


@pytest.mark.real_model
def test_mbr_chrf_raises_chrf_against_the_reference(smollm):
    """MBR with chrF picks, on average over a few instruction prompts, a candidate whose chrF against the human
    reference answer is at least the pool's mean (the expected chrF of a random sample); results/mbr_eval.json has
    the full comparison (greedy, every utility, the self-judge)."""
    from hf_decoding_ext import encode_prompts
    from hf_decoding_ext.core.resources import read_jsonl

    model, tok = smollm
    items = read_jsonl("search", "instructions.jsonl")[1:4]
    chosen, pool_mean = [], []
    for k, item in enumerate(items):
        ids = encode_prompts(tok, item["instruction"])["input_ids"]
        loop = MBRDecoding(n=6, utility="chrf", tokenizer=tok, seed=k)
        out = model.generate(ids, custom_generate=loop, do_sample=True, max_new_tokens=32, return_dict_in_generate=True,
                             top_k=0, top_p=0.8, temperature=1.0, pad_token_id=tok.pad_token_id)
        texts = [tok.decode(c, skip_special_tokens=True) for c in out.candidates[0]]
        gold = [chrf(t, item["reference"]) for t in texts]
        chosen.append(gold[int(torch.argmax(out.selection_scores[0]))])
        pool_mean.append(sum(gold) / len(gold))
    assert sum(chosen) / len(chosen) >= sum(pool_mean) / len(pool_mean), (chosen, pool_mean)


def _translation_prompt(tok, source):
    from hf_decoding_ext import encode_prompts

    return encode_prompts(tok, f"Translate this English sentence into French.\nEnglish: {source}")["input_ids"]


@pytest.mark.slow
@pytest.mark.real_model
def test_eval_script_writes_results(tmp_path):
    """The full evaluation (scripts/eval_mbr.py) on one instruction prompt: results JSON with the summary."""
    import importlib.util
    import json
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "scripts" / "eval_mbr.py"
    spec = importlib.util.spec_from_file_location("eval_mbr", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    out = tmp_path / "mbr_eval.json"
    module.main(["--n", "4", "--seeds", "1", "--limit", "1", "--max-new-tokens", "16", "--sets", "instructions",
                 "--out", str(out)])
    result = json.loads(out.read_text())
    assert "mbr (judge)" in result["summary"]["instructions"] and len(result["per_item"]) == 1
