"""The small/large router loop (hf_decoding_ext.core.router): catch-up of both caches, per-model accounting,
spans, processors and sampling, refusals. Tiny random models only."""

from __future__ import annotations

import pytest
import torch

from hf_decoding_ext.core.router import RouterLoop

PROMPT = torch.tensor([[1, 5, 9, 20, 7]])


def small_twin(arch: str, seed: int = 1, sharpen: float = 40.0):
    """A tiny model of the fixtures' architecture and vocabulary (128) with another seed; its LM head scaled by
    ``sharpen`` so its next-token entropies vary (a random tiny model is near uniform)."""
    from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    if arch == "llama":
        model = LlamaForCausalLM(LlamaConfig(vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                             num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                                             bos_token_id=1, eos_token_id=2, pad_token_id=0))
    else:
        model = GPT2LMHeadModel(GPT2Config(vocab_size=128, n_embd=32, n_layer=2, n_head=4, n_positions=512,
                                           bos_token_id=1, eos_token_id=2, pad_token_id=0, tie_word_embeddings=False))
    with torch.no_grad():
        model.get_output_embeddings().weight.mul_(sharpen)
    return model.eval()


class Scripted(RouterLoop):
    """Routes by a fixed script of decisions (strings or spans), repeating the last one."""

    def __init__(self, small, script, every_step=False):
        super().__init__(small)
        self.script = list(script)
        self.small_logits_every_step = every_step
        self.asked = 0

    def choose(self, state, run, small_logits):
        assert (small_logits is not None) == self.small_logits_every_step
        decision = self.script[min(self.asked, len(self.script) - 1)]
        self.asked += 1
        return decision


def reference(large, small, prompt, models):
    """Greedy tokens where token i comes from ``models[i]``, each computed from scratch (no cache)."""
    ids = prompt.clone()
    for name in models:
        with torch.no_grad():
            logits = (small if name == "small" else large)(ids).logits[:, -1]
        ids = torch.cat([ids, logits.argmax(-1, keepdim=True)], dim=1)
    return ids


def fresh_cache(model, ids):
    with torch.no_grad():
        return model(ids, use_cache=True).past_key_values


def assert_cache_equal(cache, expected, length):
    assert cache.get_seq_length() == length == expected.get_seq_length()
    for got, want in zip(cache.layers, expected.layers):
        torch.testing.assert_close(got.keys, want.keys, atol=1e-5, rtol=1e-4)
        torch.testing.assert_close(got.values, want.values, atol=1e-5, rtol=1e-4)


@pytest.fixture(scope="module", params=["llama", "gpt2"])
def pair(request, tiny_llama, tiny_gpt2):
    large = tiny_llama if request.param == "llama" else tiny_gpt2
    return large, small_twin(request.param)


SCRIPT = [("small", 3), ("large", 2), "small", ("large", 4), ("small", 2), "large"]
ROUTE = ["small"] * 3 + ["large"] * 2 + ["small"] + ["large"] * 4 + ["small"] * 2 + ["large"] * 4  # 16 tokens


@pytest.mark.parametrize("every_step", [False, True])
def test_spans_match_recomputation_from_scratch(pair, every_step):
    """Tokens follow the script's spans and equal each model's greedy choice on the full sequence recomputed without
    a cache; after the run both caches equal a from-scratch forward on the prefix they cover."""
    large, small = pair
    loop = Scripted(small, SCRIPT, every_step=every_step)
    out = large.generate(PROMPT, max_new_tokens=len(ROUTE), do_sample=False, pad_token_id=0, custom_generate=loop,
                         return_dict_in_generate=True)
    assert [r["model"] for r in out.router_steps] == ROUTE
    expected = reference(large, small, PROMPT, ROUTE)
    assert torch.equal(out.sequences, expected)
    assert loop.asked == 9  # once per span: 5 scripted spans, then 4 single-token decisions
    seq = out.sequences
    # the large model last produced the final token: it has seen everything but that token
    assert_cache_equal(out.past_key_values, fresh_cache(large, seq[:, :-1]), seq.shape[1] - 1)
    small_len = seq.shape[1] - 1 if every_step else PROMPT.shape[1] + 12 - 1  # last small token is the 12th
    assert_cache_equal(loop.last_run.small_cache, fresh_cache(small, seq[:, :small_len]), small_len)
    # and the caught-up caches predict what recomputation predicts
    with torch.no_grad():
        for model in (large, small):
            want = model(seq).logits[:, -1]
            cache = out.past_key_values if model is large else loop.last_run.small_cache
            n = cache.get_seq_length()
            got = model(seq[:, n:], past_key_values=cache, position_ids=torch.arange(n, seq.shape[1])[None]).logits
            torch.testing.assert_close(got[:, -1], want, atol=1e-4, rtol=1e-4)


def test_accounting_exact(pair):
    """Forwards, tokens fed and produced per model, spans and hand-overs for a known script."""
    large, small = pair
    loop = Scripted(small, SCRIPT)
    out = large.generate(PROMPT, max_new_tokens=len(ROUTE), do_sample=False, pad_token_id=0, custom_generate=loop,
                         return_dict_in_generate=True)
    s = out.router
    p = PROMPT.shape[1]
    assert s["small"] == {"forwards": 6, "tokens_fed": p + 11, "tokens_produced": 6}
    assert s["large"] == {"forwards": 10, "tokens_fed": p + 15, "tokens_produced": 10}
    assert s["generated"] == 16 and s["large_fraction"] == 10 / 16
    assert s["spans"] == {"small": 3, "large": 3} and s["handovers"] == 5
    assert loop.summary() == s
    # catch-up: the first forward of each span feeds the tokens the model missed, the others one token
    fed_large = [r["fed"]["large"] for r in out.router_steps if r["model"] == "large"]
    assert fed_large == [p + 3, 1, 2, 1, 1, 1, 3, 1, 1, 1]
    fed_small = [r["fed"]["small"] for r in out.router_steps if r["model"] == "small"]
    assert fed_small == [p, 1, 1, 3, 5, 1]
    assert all(r["fed"]["small"] == 0 for r in out.router_steps if r["model"] == "large")


def test_every_step_accounting(pair):
    """With the small model's logits every step it runs once per token and is never run twice for its own token."""
    large, small = pair
    loop = Scripted(small, SCRIPT, every_step=True)
    out = large.generate(PROMPT, max_new_tokens=16, do_sample=False, pad_token_id=0, custom_generate=loop,
                         return_dict_in_generate=True)
    s = out.router
    assert s["small"] == {"forwards": 16, "tokens_fed": PROMPT.shape[1] + 15, "tokens_produced": 6}
    assert s["large"]["forwards"] == s["large"]["tokens_produced"] == 10


def test_processors_and_sampling_follow_generate(tiny_llama):
    """All-large routing with sampling (temperature, top-k) equals generate()'s own sampling from the same seed; the
    scores returned are the processed ones."""
    small = small_twin("llama")
    kw = {"max_new_tokens": 12, "do_sample": True, "temperature": 0.7, "top_k": 10, "pad_token_id": 0}
    torch.manual_seed(11)
    want = tiny_llama.generate(PROMPT, **kw)
    torch.manual_seed(11)
    out = tiny_llama.generate(PROMPT, custom_generate=Scripted(small, [("large", 1000)]), return_dict_in_generate=True,
                              output_scores=True, **kw)
    assert torch.equal(out.sequences, want)
    assert len(out.scores) == 12
    assert all(int(torch.isfinite(s).sum()) <= 10 for s in out.scores)  # top-k applied
    torch.manual_seed(12)
    want_small = small.generate(PROMPT, **kw)
    torch.manual_seed(12)
    got_small = tiny_llama.generate(PROMPT, custom_generate=Scripted(small, ["small"]), **kw)
    assert torch.equal(got_small, want_small)


def test_left_padding_prompt_and_prefilled_cache(tiny_llama):
    """An attention mask with left padding is honoured (positions from the mask), like generate()'s greedy; a
    caller's prefilled cache for the large model is continued."""
    small = small_twin("llama")
    ids = torch.tensor([[0, 0, 1, 5, 9, 20]])
    mask = torch.tensor([[0, 0, 1, 1, 1, 1]])
    want = tiny_llama.generate(ids, attention_mask=mask, max_new_tokens=8, do_sample=False, pad_token_id=0)
    got = tiny_llama.generate(ids, attention_mask=mask, max_new_tokens=8, do_sample=False, pad_token_id=0,
                              custom_generate=Scripted(small, ["large"]))
    assert torch.equal(got, want)
    want_small = small.generate(ids, attention_mask=mask, max_new_tokens=8, do_sample=False, pad_token_id=0)
    got_small = tiny_llama.generate(ids, attention_mask=mask, max_new_tokens=8, do_sample=False, pad_token_id=0,
                                    custom_generate=Scripted(small, ["small"]))
    assert torch.equal(got_small, want_small)
    cache = fresh_cache(tiny_llama, PROMPT[:, :3])
    loop = Scripted(small, ["large"])
    out = tiny_llama.generate(PROMPT, cache=cache, max_new_tokens=4, do_sample=False, pad_token_id=0,
                              custom_generate=loop, return_dict_in_generate=True)
    assert torch.equal(out.sequences, reference(tiny_llama, small, PROMPT, ["large"] * 4))
    assert out.router_steps[0]["fed"]["large"] == 2  # only the uncached prompt tokens


def test_refusals(tiny_llama):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    other = LlamaForCausalLM(LlamaConfig(vocab_size=100, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                         num_attention_heads=4, num_key_value_heads=2)).eval()
    with pytest.raises(ValueError, match=r"small model's vocabulary \(100 tokens\).*\(128 tokens\)"):
        tiny_llama.generate(PROMPT, max_new_tokens=3, custom_generate=Scripted(other, ["small"]), pad_token_id=0)
    small = small_twin("llama")
    with pytest.raises(ValueError, match="batch size 1 only; got a batch of 2"):
        tiny_llama.generate(PROMPT.repeat(2, 1), max_new_tokens=3, custom_generate=Scripted(small, ["small"]),
                            pad_token_id=0)
    for bad, msg in [("medium", "unknown model 'medium'"), (("large", 0), "span of 0 tokens"), (3, "must return")]:
        with pytest.raises(ValueError, match=msg):
            tiny_llama.generate(PROMPT, max_new_tokens=3, custom_generate=Scripted(small, [bad]), pad_token_id=0)
    with pytest.raises(ValueError, match="causal language model"):
        Scripted(None, ["small"])


def test_core_does_not_import_families():
    import ast
    import inspect

    from hf_decoding_ext.core import router

    tree = ast.parse(inspect.getsource(router))
    names = [n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)]
    names += [a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names]
    families = ("collaboration", "speculative", "contrastive", "sampling", "search", "structured")
    assert not [n for n in names if n and any(f".{f}" in n for f in families)]
