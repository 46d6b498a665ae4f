"""The engine with the caller's logits processors, streamers, tree drafts under speculative sampling, and the typical
acceptance rule."""

from __future__ import annotations

import itertools

import pytest
import torch
from transformers import LogitsProcessorList, TemperatureLogitsWarper, TopKLogitsWarper

from hf_decoding_ext.speculative import SpeculativeDecoding
from hf_decoding_ext.speculative.acceptance import TypicalAcceptance
from hf_decoding_ext.speculative.drafters.base import Draft, Drafter
from hf_decoding_ext.speculative.drafters.prompt_lookup import PromptLookupDrafter
from hf_decoding_ext.core.tree import DraftTree


class _FixedTreeDrafter(Drafter):
    """Random deterministic trees with several children per node (exercises recursive rejection on trees)."""

    def __init__(self, vocab, seed=0, width=3, depth=2):
        self.g = torch.Generator().manual_seed(seed)
        self.vocab, self.width, self.depth = vocab, width, depth

    def propose(self, state):
        seqs = []
        for _ in range(self.width):
            seqs.append(torch.randint(0, self.vocab, (self.depth,), generator=self.g).tolist())
        return Draft(DraftTree.from_sequences(seqs))


@pytest.mark.parametrize("drafter", ["prompt_lookup", "tree"])
def test_greedy_with_processors_equals_generate(tiny_model, drafter):
    flags = dict(repetition_penalty=1.6, no_repeat_ngram_size=3, bad_words_ids=[[7]], min_new_tokens=5)
    for prompt in ([3, 4, 5, 3, 4, 5, 3, 4], [9, 8, 7, 9, 8, 7, 9]):
        ids = torch.tensor([prompt])
        d = PromptLookupDrafter(num_tokens=4) if drafter == "prompt_lookup" else _FixedTreeDrafter(128, width=4)
        ref = tiny_model.generate(ids, max_new_tokens=25, do_sample=False, **flags)
        out = tiny_model.generate(ids, max_new_tokens=25, do_sample=False, custom_generate=SpeculativeDecoding(d),
                                  **flags)
        assert torch.equal(ref, out)
        assert 7 not in out[0, len(prompt):].tolist()


def test_streamer_receives_exactly_the_output(tiny_llama):
    class Collect:
        def __init__(self):
            self.tokens, self.ended = [], False

        def put(self, value):
            self.tokens.extend(value.reshape(-1).tolist())

        def end(self):
            self.ended = True

    ids = torch.tensor([[3, 4, 5, 3, 4, 5, 3]])
    streamer = Collect()
    loop = SpeculativeDecoding(PromptLookupDrafter(num_tokens=4))
    out = tiny_llama.generate(ids, max_new_tokens=17, do_sample=False, streamer=streamer, custom_generate=loop)
    assert streamer.ended and streamer.tokens == out[0].tolist()  # prompt first (as generate() does), then tokens
    assert any(s.appended > 1 for s in loop.last_stats)


def test_tree_speculative_sampling_with_temperature_and_top_k_matches_target():
    """Deterministic trees (3 children per node), recursive rejection, temperature 0.7 + top-k 4: the sampled
    2-token sequences follow the target's *processed* distribution (chi-square); plain ``generate()`` is the
    reference for how processors combine."""
    from scipy.stats import chi2
    from transformers import LlamaConfig, LlamaForCausalLM

    vocab, n = 6, 3000
    torch.manual_seed(3)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=vocab, hidden_size=16, intermediate_size=32,
                                         num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=2,
                                         bos_token_id=0, eos_token_id=None, pad_token_id=0,
                                         tie_word_embeddings=False)).eval()
    with torch.no_grad():
        model.lm_head.weight.mul_(6.0)
    prompt = [1, 2, 3]
    procs = LogitsProcessorList([TemperatureLogitsWarper(0.7), TopKLogitsWarper(4)])
    probs = {}
    with torch.no_grad():
        for seq in itertools.product(range(vocab), repeat=2):
            ids = torch.tensor([prompt + list(seq)])
            logits = model(ids).logits[0]
            p = 1.0
            for i, t in enumerate(seq):
                pos = len(prompt) - 1 + i
                scores = procs(ids[:, : pos + 1], logits[pos][None].clone())
                p *= float(torch.softmax(scores, -1)[0, t])
            probs[seq] = p
    loop = SpeculativeDecoding(_FixedTreeDrafter(vocab, seed=1, width=3, depth=2))
    torch.manual_seed(0)
    counts: dict = {}
    for _ in range(n):
        out = model.generate(torch.tensor([prompt]), max_new_tokens=2, do_sample=True, temperature=0.7, top_k=4,
                             pad_token_id=0, custom_generate=loop)
        seq = tuple(out[0, len(prompt):].tolist())
        counts[seq] = counts.get(seq, 0) + 1
    assert all(probs[s] > 0 for s in counts), "a token outside the top-k was sampled"
    stat, dof = 0.0, -1
    for s, p in probs.items():
        if p > 1e-9:
            stat += (counts.get(s, 0) - n * p) ** 2 / (n * p)
            dof += 1
    assert chi2.sf(stat, dof) > 1e-3, (stat, dof)


def test_typical_acceptance_follows_its_rule():
    rule = TypicalAcceptance(epsilon=0.09, sample_bonus=False)
    tree = DraftTree(torch.tensor([0, 1, 2, 3]), [-1, -1, 0, 1])  # root -> 0 -> 2, root -> 1 -> 3
    scores = {
        -1: torch.log(torch.tensor([0.05, 0.6, 0.2, 0.1, 0.05])),  # 0 fails (0.05 < 0.09), 1 passes
        0: torch.log(torch.tensor([0.2] * 5)),
        1: torch.log(torch.tensor([0.01, 0.01, 0.01, 0.96, 0.01])),  # 3 passes (peaked: low threshold)
        3: torch.log(torch.tensor([0.1, 0.1, 0.6, 0.1, 0.1])),
    }
    accepted, bonus = rule.accept(tree, lambda node: scores[node])
    assert accepted == [1, 3] and bonus == 2
    # a flatter distribution lowers the threshold to delta * exp(-H) (~0.068 here): 0.15 passes, 0.05 does not
    flat = torch.tensor([0.15, 0.05, 0.3, 0.3, 0.2])
    assert rule._passes(flat, 0) and not rule._passes(flat, 1)
    assert not rule.lossless
    with pytest.raises(ValueError):
        TypicalAcceptance(epsilon=0)
