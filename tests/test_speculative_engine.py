"""Speculative engine: tree masks, KV compaction, lossless greedy, speculative sampling's distribution."""

import itertools

import pytest
import torch
from transformers import DynamicCache

from hf_decoding_ext.speculative import DraftTree, SpeculativeDecoding, SpeculativeSamplingAcceptance
from hf_decoding_ext.speculative.drafters.base import Draft, Drafter
from hf_decoding_ext.speculative.drafters.draft_model import DraftModelDrafter
from hf_decoding_ext.speculative.drafters.prompt_lookup import PromptLookupDrafter
from hf_decoding_ext.core.kv import keep_positions
from hf_decoding_ext.core.tree import VerifyBlock, build_verify_inputs


def test_tree_structure():
    tree = DraftTree.from_sequences([[5, 6, 7], [5, 8], [9]])
    assert tree.tokens.tolist() == [5, 6, 7, 8, 9]
    assert tree.parents.tolist() == [-1, 0, 1, 0, -1]
    assert tree.depth.tolist() == [1, 2, 3, 2, 1]
    assert tree.paths() == [[0, 1, 2], [0, 3], [4]]
    with pytest.raises(ValueError):
        DraftTree(torch.tensor([1, 2]), [1, -1])


def test_tree_forward_equals_per_path_forwards(tiny_model):
    """Logits of one tree forward (cached prefix + tree) equal sequential forwards of every path."""
    prefix = torch.tensor([[3, 4, 5, 6, 7]])
    tree = DraftTree.from_sequences([[10, 11, 12], [10, 13], [14, 15]])
    cache = DynamicCache(config=tiny_model.config)
    tiny_model(prefix[:, :-1], past_key_values=cache, use_cache=True)
    block = VerifyBlock.from_tree(tree)
    ids, mask, pos = build_verify_inputs(prefix[:, -1:], torch.ones_like(prefix), 4, block)
    out = tiny_model(input_ids=ids, attention_mask=mask, position_ids=pos, past_key_values=cache).logits[0]
    for path in tree.paths():
        seq = torch.cat([prefix[0], tree.tokens[path]])[None]
        ref = tiny_model(seq).logits[0]
        torch.testing.assert_close(out[0], ref[4], atol=1e-5, rtol=1e-4)  # root
        for k, node in enumerate(path):
            torch.testing.assert_close(out[1 + node], ref[5 + k], atol=1e-5, rtol=1e-4)


def test_keep_positions_compacts_to_accepted_path(tiny_llama):
    prefix = torch.tensor([[3, 4, 5]])
    tree = DraftTree.from_sequences([[10, 11], [12, 13]])  # nodes 0:10 1:11 2:12 3:13
    cache = DynamicCache(config=tiny_llama.config)
    block = VerifyBlock.from_tree(tree)
    ids, mask, pos = build_verify_inputs(prefix, torch.ones_like(prefix), 0, block)
    tiny_llama(input_ids=ids, attention_mask=mask, position_ids=pos, past_key_values=cache)
    keep_positions(cache, 3, torch.tensor([2, 3]))
    ref = DynamicCache(config=tiny_llama.config)
    tiny_llama(torch.tensor([[3, 4, 5, 12, 13]]), past_key_values=ref)
    for a, b in zip(cache.layers, ref.layers):
        torch.testing.assert_close(a.keys, b.keys, atol=1e-5, rtol=1e-4)
        torch.testing.assert_close(a.values, b.values, atol=1e-5, rtol=1e-4)


class _RandomTreeDrafter(Drafter):
    """Random trees (some branches right by chance): exercises acceptance and compaction on every shape."""

    def __init__(self, seed=0):
        self.g = torch.Generator().manual_seed(seed)

    def propose(self, state):
        n = int(torch.randint(0, 7, (), generator=self.g))
        parents = [int(torch.randint(-1, i, (), generator=self.g)) for i in range(n)]
        tokens = torch.randint(3, 8, (n,), generator=self.g)
        return Draft(DraftTree(tokens, parents))


@pytest.mark.parametrize("drafter_name", ["prompt_lookup", "random_tree", "self_draft"])
def test_greedy_lossless_on_tiny_models(tiny_model, drafter_name):
    drafter = {"prompt_lookup": PromptLookupDrafter(num_tokens=4), "random_tree": _RandomTreeDrafter(),
               "self_draft": DraftModelDrafter(tiny_model, num_tokens=3, confidence_threshold=0.0)}[drafter_name]
    loop = SpeculativeDecoding(drafter)
    for prompt in ([3, 4, 5, 3, 4, 5, 3, 4], [7, 6, 5, 4, 3, 9, 9]):
        ids = torch.tensor([prompt])
        ref = tiny_model.generate(ids, max_new_tokens=30, do_sample=False)
        out = tiny_model.generate(ids, max_new_tokens=30, do_sample=False, custom_generate=loop)
        assert torch.equal(ref, out)
    if drafter_name == "self_draft":  # drafting with the target itself: every draft token is accepted
        assert loop.summary()["tokens_per_forward"] > 2.5


def test_eos_inside_accepted_run_and_exact_length(tiny_llama):
    ids = torch.tensor([[3, 4, 5]])
    free = tiny_llama.generate(ids, max_new_tokens=12, do_sample=False)
    eos = int(free[0, 8])  # an eos in the middle of what a self-draft accepts in one run
    loop = SpeculativeDecoding(DraftModelDrafter(tiny_llama, num_tokens=8, confidence_threshold=0.0))
    ref = tiny_llama.generate(ids, max_new_tokens=12, do_sample=False, eos_token_id=eos, pad_token_id=0)
    out = tiny_llama.generate(ids, max_new_tokens=12, do_sample=False, eos_token_id=eos, pad_token_id=0,
                              custom_generate=loop)
    assert torch.equal(ref, out)
    for n in (1, 5, 7):
        out = tiny_llama.generate(ids, max_new_tokens=n, do_sample=False, custom_generate=loop)
        assert out.shape[1] == 3 + n


def test_return_dict_stats_and_batch_refusal(tiny_llama):
    loop = SpeculativeDecoding(PromptLookupDrafter())
    out = tiny_llama.generate(torch.tensor([[3, 4, 3, 4, 3]]), max_new_tokens=10, do_sample=False,
                              return_dict_in_generate=True, output_scores=True, custom_generate=loop)
    assert len(out.scores) == 10 and sum(s.appended for s in out.spec_stats) == 10
    with pytest.raises(ValueError, match="batch size 1"):
        tiny_llama.generate(torch.tensor([[3, 4], [5, 6]]), max_new_tokens=3, custom_generate=loop)
    with pytest.raises(ValueError, match="Drafter"):
        SpeculativeDecoding(object())


def _peaky_tiny_llama(seed, vocab=6):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=vocab, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                      num_attention_heads=2, num_key_value_heads=2, bos_token_id=0, eos_token_id=None,
                      pad_token_id=0, tie_word_embeddings=False)
    model = LlamaForCausalLM(cfg).eval()
    with torch.no_grad():
        model.lm_head.weight.mul_(8.0)  # peaky, model-specific distributions so that wrong rules are detectable
    return model


def _exact_sequence_distribution(model, prompt, length, vocab):
    probs = {}
    for seq in itertools.product(range(vocab), repeat=length):
        ids = torch.tensor([prompt + list(seq)])
        logp = torch.log_softmax(model(ids).logits[0].float(), -1)
        probs[seq] = float(sum(logp[len(prompt) - 1 + i, t] for i, t in enumerate(seq)).exp())
    return probs


def _sample_counts(target, prompt, length, n, loop, seed=0):
    """Counts of the ``length``-token continuations of ``n`` sampled generations with the decoding loop ``loop``."""
    torch.manual_seed(seed)
    ids = torch.tensor([prompt])
    counts = {}
    for _ in range(n):
        out = target.generate(ids, max_new_tokens=length, do_sample=True, top_k=0, pad_token_id=0,
                              custom_generate=loop)
        seq = tuple(out[0, len(prompt):].tolist())
        counts[seq] = counts.get(seq, 0) + 1
    return counts


def _chi_square_pvalue(counts, probs, n):
    from scipy.stats import chi2

    stat, dof = 0.0, -1
    for seq, p in probs.items():
        expected = n * p
        if expected < 1e-9:
            continue
        stat += (counts.get(seq, 0) - expected) ** 2 / expected
        dof += 1
    return float(chi2.sf(stat, dof))


class _AcceptEverything(SpeculativeSamplingAcceptance):
    """A wrong rule (accepts every draft token): the test below must reject it."""

    def accept(self, tree, scores_at, generator=None):
        node, accepted = -1, []
        while tree.children(node):
            node = tree.children(node)[0]
            accepted.append(node)
        p = torch.softmax(scores_at(node), -1)
        return accepted, int(torch.multinomial(p, 1, generator=generator))


@pytest.mark.parametrize("rule", ["speculative", "wrong"])
def test_speculative_sampling_matches_target_distribution(rule):
    vocab, length, n = 6, 2, 3000
    target, draft = _peaky_tiny_llama(1, vocab), _peaky_tiny_llama(2, vocab)
    prompt = [1, 2, 3]
    probs = _exact_sequence_distribution(target, prompt, length, vocab)
    acceptance = "speculative" if rule == "speculative" else _AcceptEverything()
    loop = SpeculativeDecoding(DraftModelDrafter(draft, num_tokens=2), acceptance=acceptance)
    counts = _sample_counts(target, prompt, length, n, loop)
    pvalue = _chi_square_pvalue(counts, probs, n)
    tv = 0.5 * sum(abs(counts.get(s, 0) / n - p) for s, p in probs.items())
    if rule == "speculative":
        assert pvalue > 1e-3, (pvalue, tv)
    else:
        assert pvalue < 1e-6, (pvalue, tv)


# ------------------------------------------------------------------------------------------------ engine options
class _CountingTreeDrafter(Drafter):
    """Proposes ``size``-node random trees of distinct tokens (so no two of its nodes merge) and records, at each
    observe, how many nodes it was shown."""

    def __init__(self, size=6, seed=0):
        self.size, self.g, self.seen = size, torch.Generator().manual_seed(seed), []

    def propose(self, state):
        parents = [int(torch.randint(-1, i, (), generator=self.g)) for i in range(self.size)]
        return Draft(DraftTree(3 + torch.randperm(12, generator=self.g)[: self.size], parents))

    def observe(self, state, result):
        self.seen.append(len(result.draft.tree))
        assert result.tree_logits.shape[0] == len(result.draft.tree) + 1
        assert all(a < len(result.draft.tree) for a in result.accepted)


@pytest.mark.parametrize("k", [0, 1, 3])
def test_max_draft_nodes_with_merged_drafter(tiny_model, k):
    """``SpeculativeDecoding(MergedDrafter(...), max_draft_nodes=k)``: token-identical to greedy, at most ``k``
    draft nodes per step, and every merged drafter observes a result consistent with the tree actually verified."""
    from hf_decoding_ext.speculative.drafters.merged import MergedDrafter
    from hf_decoding_ext.speculative.drafters.token_recycling import TokenRecyclingDrafter

    counting = _CountingTreeDrafter()
    merged = MergedDrafter([PromptLookupDrafter(num_tokens=4), TokenRecyclingDrafter(), counting])
    loop = SpeculativeDecoding(merged, max_draft_nodes=k)
    for prompt in ([3, 4, 5, 3, 4, 5, 3, 4], [7, 6, 5, 4, 3, 9, 9]):
        ids = torch.tensor([prompt])
        ref = tiny_model.generate(ids, max_new_tokens=20, do_sample=False)
        out = tiny_model.generate(ids, max_new_tokens=20, do_sample=False, custom_generate=loop)
        assert torch.equal(ref, out)
        assert loop.last_stats and all(s.draft_size <= k for s in loop.last_stats)
        assert max(s.draft_size for s in loop.last_stats) == k  # the cap binds (every step proposes > k nodes)
    assert counting.seen and max(counting.seen) <= k
    for bad in (-1, 2.5, "3", True):
        with pytest.raises(ValueError, match="max_draft_nodes"):
            SpeculativeDecoding(merged, max_draft_nodes=bad)


class _GeneratorSpy(SpeculativeSamplingAcceptance):
    """Speculative sampling that records the generator it is handed."""

    generators: list = []

    def accept(self, tree, scores_at, generator=None):
        type(self).generators.append(generator)
        return super().accept(tree, scores_at, generator)


def test_seeded_generator_lives_on_the_model_device_and_is_reproducible(tiny_llama):
    ids = torch.tensor([[3, 4, 5, 3, 4, 5, 3]])
    outs = []
    for _ in range(2):
        _GeneratorSpy.generators = []
        loop = SpeculativeDecoding(PromptLookupDrafter(num_tokens=3), acceptance=_GeneratorSpy(), seed=123)
        torch.manual_seed(len(outs))  # a different global state each run: only the seed decides
        outs.append(tiny_llama.generate(ids, max_new_tokens=16, do_sample=True, top_k=0, pad_token_id=0,
                                        custom_generate=loop))
        gens = _GeneratorSpy.generators
        assert gens and all(g is gens[0] for g in gens)  # one generator for the whole call
        assert isinstance(gens[0], torch.Generator) and gens[0].device == tiny_llama.device
    assert torch.equal(outs[0], outs[1])
    other = SpeculativeDecoding(PromptLookupDrafter(num_tokens=3), seed=7)
    diff = [tiny_llama.generate(ids, max_new_tokens=16, do_sample=True, top_k=0, pad_token_id=0,
                                custom_generate=other) for _ in range(2)]
    assert torch.equal(diff[0], diff[1]) and not torch.equal(diff[0], outs[0])  # the seed matters
    assert SpeculativeDecoding(PromptLookupDrafter(), seed=None).generator_for(tiny_llama.device) is None
    with pytest.raises(ValueError, match="seed"):
        SpeculativeDecoding(PromptLookupDrafter(), seed="1")


def test_seeded_generator_is_created_on_a_cuda_model_device(monkeypatch):
    """The CUDA code path without a GPU: the generator is requested on the device the engine is given, not on the
    CPU (a CPU generator fails ``torch.multinomial`` on CUDA probabilities)."""
    made = []

    class FakeGenerator:
        def __init__(self, device="cpu"):
            made.append(torch.device(device))
            self.device = torch.device(device)

        def manual_seed(self, seed):
            self.seed = seed
            return self

    loop = SpeculativeDecoding(PromptLookupDrafter(), seed=5)
    with monkeypatch.context() as m:
        m.setattr(torch, "Generator", FakeGenerator)
        g = loop.generator_for(torch.device("cuda", 0))
    assert made == [torch.device("cuda", 0)] and g.device == torch.device("cuda", 0) and g.seed == 5


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_seeded_speculative_sampling_runs_on_cuda(tiny_llama):
    import copy

    model = copy.deepcopy(tiny_llama).cuda()
    ids = torch.tensor([[3, 4, 5, 3, 4, 5, 3]], device="cuda")
    outs = [model.generate(ids, max_new_tokens=16, do_sample=True, top_k=0, pad_token_id=0,
                           custom_generate=SpeculativeDecoding(PromptLookupDrafter(num_tokens=3), seed=3))
            for _ in range(2)]
    assert torch.equal(outs[0], outs[1])
