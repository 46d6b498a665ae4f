"""Shared fixtures: tiny random models of two architectures (fast unit tests) and the real default model."""

from __future__ import annotations

import os

import pytest
import torch

# One intra-op thread: on the 2-core CI machine batch-1 generation of the default model is as fast with one thread as
# with two (measured: 2.78-2.95 s vs 2.87-2.99 s for 40 tokens), and two threads collapse (7-16x slower) as soon as
# anything else runs on the machine (the suite runs on two xdist workers). The notebooks' kernels inherit the
# environment variable.
torch.set_num_threads(1)
os.environ["OMP_NUM_THREADS"] = "1"


def _tiny_llama():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                      bos_token_id=1, eos_token_id=2, pad_token_id=0)
    return LlamaForCausalLM(cfg).eval()


def _tiny_gpt2():
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    cfg = GPT2Config(vocab_size=128, n_embd=32, n_layer=2, n_head=4, n_positions=512,
                     bos_token_id=1, eos_token_id=2, pad_token_id=0)
    return GPT2LMHeadModel(cfg).eval()


@pytest.fixture(scope="session")
def tiny_llama():
    return _tiny_llama()


@pytest.fixture(scope="session")
def tiny_gpt2():
    return _tiny_gpt2()


@pytest.fixture(scope="session", params=["llama", "gpt2"])
def tiny_model(request):
    """A tiny random causal LM, parametrised over two architectures (vocab 128, eos 2, pad 0)."""
    return _tiny_llama() if request.param == "llama" else _tiny_gpt2()


@pytest.fixture(scope="session")
def smollm():
    """``(model, tokenizer)`` of the embedded default model SmolLM2-135M-Instruct (fp32, CPU)."""
    from hf_decoding_ext.core.models import load_model

    return load_model()


# ------------------------------------------------------------------------------------- more architectures (issue 15)
MISTRAL_SLIDING_WINDOW = 6
"""Sliding window of the tiny Mistral: prompts of the architecture tests run past it within a few tokens."""


def _tiny_qwen2():
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(0)
    cfg = Qwen2Config(vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                      bos_token_id=1, eos_token_id=2, pad_token_id=0)
    return Qwen2ForCausalLM(cfg).eval()


def _tiny_mistral():
    from transformers import MistralConfig, MistralForCausalLM

    torch.manual_seed(0)
    cfg = MistralConfig(vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                        sliding_window=MISTRAL_SLIDING_WINDOW, bos_token_id=1, eos_token_id=2, pad_token_id=0)
    return MistralForCausalLM(cfg).eval()


def assert_cache_equals_recompute(model, cache, ids, atol: float = 1e-4):
    """A decoding loop's KV ``cache`` holds exactly what a causal forward over ``ids`` (``(1, n)``) computes."""
    from transformers import DynamicCache

    ref = DynamicCache(config=model.config)
    with torch.no_grad():
        model(input_ids=ids, cache=ref, use_cache=True)
    for la, lb in zip(cache.layers, ref.layers):
        torch.testing.assert_close(la.keys, lb.keys, atol=atol, rtol=atol)
        torch.testing.assert_close(la.values, lb.values, atol=atol, rtol=atol)


def _char_tokenizer():
    """A fast byte-level tokenizer of exactly 128 tokens for the tiny models: ``<pad>`` 0, ``<s>`` 1, ``</s>`` 2,
    ``<unk>`` 3, the printable ASCII characters one token each, then a few multi-character tokens (never produced by
    encoding, which has no merges, but usable by grammars and decoding)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    chars = ["Ġ" if c == 32 else chr(c) for c in range(32, 127)]  # byte-level alphabet: space is "Ġ"
    extra = ["Ċ", '{"', '":', "true", "false", "null", "ĠĠ", "the", "ing", "er", "an", "in", "re", "on", "at", "en",
             "ed", "es", "or", "te", "is", "it", "al", "ar", "st", "to", "nt", "ng", "Ġthe"]
    vocab = (["<pad>", "<s>", "</s>", "<unk>"] + chars + extra)[:128]
    tk = Tokenizer(models.BPE(vocab={s: i for i, s in enumerate(vocab)}, merges=[], unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tk.decoder = decoders.ByteLevel()
    fast = PreTrainedTokenizerFast(tokenizer_object=tk, pad_token="<pad>", bos_token="<s>", eos_token="</s>",
                                   unk_token="<unk>")
    fast.padding_side = "left"
    return fast


@pytest.fixture(scope="session")
def tiny_qwen2():
    return _tiny_qwen2()


@pytest.fixture(scope="session")
def tiny_mistral():
    """Tiny random Mistral with a sliding window of :data:`MISTRAL_SLIDING_WINDOW` tokens (sliding-window cache)."""
    return _tiny_mistral()


ARCHITECTURES = {"llama": _tiny_llama, "gpt2": _tiny_gpt2, "qwen2": _tiny_qwen2, "mistral": _tiny_mistral}


@pytest.fixture(scope="session", params=sorted(ARCHITECTURES))
def tiny_arch(request):
    """``(name, model)``: a tiny random causal LM of each architecture (Llama, GPT-2, Qwen2, sliding-window Mistral),
    vocab 128, eos 2, pad 0."""
    return request.param, ARCHITECTURES[request.param]()


@pytest.fixture(scope="session")
def char_tokenizer():
    """The 128-token byte-level tokenizer of the tiny models (:func:`_char_tokenizer`)."""
    return _char_tokenizer()


class _DistillCharTokenizer:
    """Enough of a tokenizer for the distillation pipeline on tiny models (no chat template)."""

    chat_template = None
    pad_token_id = 0
    eos_token_id = 2

    def __call__(self, text, add_special_tokens=True):
        return {"input_ids": [3 + (ord(c) % 120) for c in text]}


@pytest.fixture(scope="session")
def tiny_distill_data(tmp_path_factory):
    """Self-distillation data of a private tiny Llama (2 layers, hidden 32, vocab 128): 40 prompts, greedy responses
    of up to 20 tokens, last-layer features, base predictions and the layer-1 hidden states (``layers=(1,)``).
    Returns ``(model, DistillData)``; the model is the one the features come from (attach heads to it)."""
    from hf_decoding_ext.training.data import (
        DistillData,
        base_predictions,
        extract_features,
        extract_layer_features,
        generate_responses,
        read_responses,
    )

    model = _tiny_llama()
    d = tmp_path_factory.mktemp("tiny_distill")
    prompts = [{"id": f"p{i}", "prompt": f"prompt {i} about {'abc'[i % 3]}" * (1 + i % 2)} for i in range(40)]
    generate_responses(model, _DistillCharTokenizer(), prompts, d / "r.jsonl", batch_size=8, max_new_tokens=20,
                       progress=False)
    features = extract_features(model, read_responses(d / "r.jsonl"), d / "f.safetensors", progress=False)
    base_predictions(model, features, progress=False)
    extract_layer_features(model, features, (1,), progress=False)
    return model, DistillData(features, layers=(1,))


def _tiny_heads(kind, model):
    from hf_decoding_ext.speculative.heads.eagle import (
        EagleDrafterConfig,
        EagleDrafterModel,
    )
    from hf_decoding_ext.speculative.heads.hydra import HydraConfig, HydraHeads
    from hf_decoding_ext.speculative.heads.medusa import MedusaConfig, MedusaHeads
    from hf_decoding_ext.speculative.heads.mlp_speculator import (
        MLPSpeculator,
        MLPSpeculatorConfig,
    )

    torch.manual_seed(0)
    size = dict(hidden_size=model.config.hidden_size, vocab_size=model.config.vocab_size)
    if kind == "medusa":
        return MedusaHeads(MedusaConfig(num_heads=2, **size))
    if kind == "hydra":
        return HydraHeads(HydraConfig(num_heads=2, **size))
    if kind == "mlp-speculator":
        return MLPSpeculator(MLPSpeculatorConfig(n_predict=2, **size)).attach(model)
    cfg = EagleDrafterConfig(**size)
    cfg.from_base_config(model.config)
    return EagleDrafterModel(cfg)


def _first_layer(model):
    from hf_decoding_ext.core.models import truncated_model

    return truncated_model(model, 1)


_TINY_REGEX = r"[a-z]{1,12}"
def _tiny_acceptance_head(model):
    from hf_decoding_ext.speculative.heads.specdec_pp import AcceptancePredictionHead, SpecDecPPHeadConfig

    torch.manual_seed(0)
    return AcceptancePredictionHead(SpecDecPPHeadConfig(hidden_size=model.config.hidden_size))


def _tiny_dresd_store(model):
    """A DReSD datastore of the tiny model's own greedy continuations of a few random prompts."""
    from hf_decoding_ext.speculative.drafters.dresd import DReSDDatastore

    torch.manual_seed(0)
    vocab = model.get_output_embeddings().weight.shape[0]
    pairs = []
    with torch.no_grad():
        for _ in range(3):
            prompt = torch.randint(1, vocab, (4,))
            out = model.generate(prompt[None], max_new_tokens=12, do_sample=False, pad_token_id=0)
            pairs.append((prompt.tolist(), out[0, 4:].tolist()))
    return DReSDDatastore.build(model, pairs, pca_dim=4, stored=6, progress=False)


TINY_COMPONENT_PARAMS = {
    "adadec": dict(threshold=0.5, lookahead_length=2),
    "cautious-ntp": dict(max_trials=3),
    "superposed": dict(num_drafts=2, alpha=0.0),
    "ips": dict(),
    "prompt-lookup": dict(),
    "token-recycling": dict(),
    "auto-speculative": dict(),
    "lookahead": dict(window_size=3, ngram_size=3),
    "jacobi": dict(),
    "draft-model": dict(assistant="self:1"),
    "direct-alignment": dict(assistant="self:1"),
    "spectr": dict(assistant="self:1", num_drafts=2, num_tokens=2),
    "mcsd": dict(assistant="self:1", branching=[2, 1]),
    "rsd": dict(assistant="self:1", branching=[2, 1]),
    "dyspec": dict(assistant="self:1", num_nodes=4, max_depth=3),
    "staged-speculative": dict(assistant="self:1", num_nodes=4, max_depth=3),
    "pearl": dict(assistant="self:1", gamma=2),
    "reflective-verification": dict(assistant="self:1"),
    "specdec-pp": dict(assistant="self:1", head=lambda m: _tiny_acceptance_head(m)),
    "speculative-jacobi": dict(window=3),
    "stand": dict(persist=False),  # sampled outputs reproducible from the seed across the contract's calls
    "fast-cot": dict(budget=2, answer_prompt=[5, 6]),
    "aded": dict(max_nodes=4, simulations=8),
    "specextend": dict(assistant="self:1", chunk_size=4, top_k_chunks=2, retrieve_every=1),
    "rasd": dict(drafter=lambda m: _tiny_heads("eagle", m), max_nodes=4),
    "dresd": dict(datastore=lambda m: _tiny_dresd_store(m), num_drafts=2, len_drafts=3, max_nodes=4),
    "medusa": dict(heads=lambda m: _tiny_heads("medusa", m), max_nodes=4),
    "hydra": dict(heads=lambda m: _tiny_heads("hydra", m), max_nodes=4),
    "mlp-speculator": dict(heads=lambda m: _tiny_heads("mlp-speculator", m), max_nodes=4),
    "eagle-fspad": dict(drafter=lambda m: _tiny_heads("eagle", m), max_nodes=4),
    "blockwise-parallel": dict(heads=lambda m: __import__("hf_decoding_ext.speculative.heads.blockwise", fromlist=["x"]).random_blockwise_heads(m), max_nodes=3),  # TINY-PARAMS blockwise-parallel (owned by its helper)
    "blockwise-draft-refinement": dict(heads=lambda m: __import__("hf_decoding_ext.speculative.heads.blockwise", fromlist=["x"]).random_blockwise_heads(m), rescorer="ngram", num_paths=2, max_nodes=4),  # TINY-PARAMS blockwise-draft-refinement (owned by its helper)
    "chimera": dict(heads=lambda m: __import__("hf_decoding_ext.speculative.heads.chimera", fromlist=["x"]).untrained_head(m, num_heads=3, noise=0.3), max_nodes=4),  # TINY-PARAMS chimera (owned by its helper)
    "clover": dict(heads=lambda m: __import__("hf_decoding_ext.speculative.heads.clover", fromlist=["x"]).untrained_head(m, num_heads=3, noise=0.3), max_nodes=4),  # TINY-PARAMS clover (owned by its helper)
    "jakiro": dict(heads=lambda m: __import__("hf_decoding_ext.speculative.heads.jakiro", fromlist=["untrained_head"]).untrained_head(m, num_draft_tokens=3), max_nodes=4),  # TINY-PARAMS jakiro (owned by its helper)
    "hidden-transfer": dict(heads=lambda m: __import__("hf_decoding_ext.speculative.heads.hidden_transfer", fromlist=["x"]).untrained_head(m, num_transfer=3, noise=0.3), max_nodes=4),  # TINY-PARAMS hidden-transfer (owned by its helper)
    "ppd": dict(heads="untrained", max_nodes=4, curve="flat"),  # TINY-PARAMS ppd (owned by its helper)
    "longspec": dict(drafter=lambda m: __import__("hf_decoding_ext.speculative.drafters.longspec", fromlist=["x"]).untrained_head(m, num_draft_tokens=3, window=4), max_nodes=4),  # TINY-PARAMS longspec (owned by its helper)
    "online-speculative": dict(assistant="self:1", lr=1e-3),  # TINY-PARAMS online-speculative (owned by its helper)
    "vocab-trim": dict(drafter="self:1", size=64, calibration=lambda m: torch.arange(m.config.vocab_size)),  # TINY-PARAMS vocab-trim (owned by its helper)
    "dola": dict(dola_layers=[0]),
    "lol": dict(amateur=_first_layer, lower_layer=0, instruction=None),
    "speculative-contrastive": dict(amateur="self:1"),
    "asap": dict(grammar=_TINY_REGEX),
    "awrs": dict(constraint=None, regex=_TINY_REGEX),
    "exact-extractive": dict(context="hello world, this is the tiny test"),
    "sketch-guided": dict(sketch="hello", regex=_TINY_REGEX, instruction=None, chat=False),
    "lexical-dba": dict(constraints=["is"], num_beams=2),
    "diverse-beam-search": dict(num_beams=2, num_beam_groups=2, diversity_penalty=0.5),
    "swift": dict(context_window=4, max_draft_len=3),
    "clasp": dict(),
    "del": dict(max_draft_length=3),
    "sparse-to-dense": dict(top_k=4, recent=4, num_tokens=3),
    "d3": dict(),
    "eesd": dict(head="untrained", exit_layer=1),
    "free": dict(exit_layer=1, adaptive=False),  # adaptive: the threshold is refitted between calls by design
    "infalign": dict(n=2, num_reference=3, seed=0),
    "mbr": dict(n=3, utility="chrf", seed=0),
    "quality-aware": dict(n=3, strategy="t-rr+mbr", shortlist=2, seed=0),
    "consensus-game": dict(n=2, iterations=20, seed=0),
    "lattice": dict(beam_size=2, ngram_suffix=2),
    "daemon": dict(n=2, seed=0, weights={"rep": 1.0, "coh": 0.5, "info": 0.1, "len": -0.05}),
    "a-star": dict(k=2, max_step_tokens=2, max_generated_tokens=16, seed=0),  # TINY-PARAMS a-star (owned by its helper)
    "phi-decoding": dict(step_beam_size=2, num_rollout=2, num_foresight=2, delimiter="e", max_step_tokens=3, seed=0),  # TINY-PARAMS phi-decoding (owned by its helper)
    "cards": dict(reward_threshold=0.1, entropy_threshold=4.7, max_rejections=2, seed=0),  # TINY-PARAMS cards (owned by its helper)
    "transfer-q-star": dict(num_candidates=2, horizon=2),  # TINY-PARAMS transfer-q-star (owned by its helper)
    "pg-td": dict(reward=lambda m: lambda p: sum(map(ord, p)) % 9 / 9, rollouts=3, program_format="text"),  # TINY-PARAMS pg-td (owned by its helper)
    "skeleton-graph-decoding": dict(skeleton=[{"summary": "a", "dependency": [], "difficulty": 1}, {"summary": "b", "dependency": [], "difficulty": 3}, {"summary": "c", "dependency": [1, 2], "difficulty": 3}], max_node_tokens=2, stop_strings=(), small_model="self:1"),  # TINY-PARAMS skeleton-graph-decoding (owned by its helper)
    "space": dict(mask_token_id=3, k=2),
    "lexical-unit-decoding": dict(placeholder_token_id=4, k=3, threshold=0.3),  # TINY-PARAMS lexical-unit-decoding (owned by its helper)
    "set-block-decoding": dict(block_size=3, gamma=0.5, mask_token_id=3),  # TINY-PARAMS set-block-decoding (owned by its helper)
    "s2d": dict(draft="self", depths=(1, 2), threshold=0.5, num_tokens=3),  # TINY-PARAMS s2d (owned by its helper)
    "entropy-adaptive-decoding": dict(small="self:1", threshold=4.8, window=2),  # random heads: entropy near ln 128
    "foreal-decoding": dict(small="self:1", n=2, p=0.5, seed=0),
    "speculative-thinking": dict(small="self:1", triggers=(" ", "e"), snippet_tokens=2, verify_tokens=2,
                                 recap_tokens=2, keywords={"verify": ("x",), "negative": ("e", "t"),
                                                           "positive": ("a",)}),
    "speckv": dict(draft="self:1", max_capacity_prompt=8, window_size=2, kernel_size=3),
    "specpc": dict(draft="self:1", max_capacity_prompt=8, window_size=2, kernel_size=2),
}
"""Small parameters for every registered decoding loop and candidate generator on the tiny models with the
:func:`char_tokenizer` (callables receive the model: random heads of the model's size, a one-layer amateur)."""


@pytest.fixture(scope="session")
def tiny_custom_generate(char_tokenizer):
    """``build(name, model) -> (spec, loop)``: the registered decoding loop, or the speculative engine over the
    registered candidate generator, built with :data:`TINY_COMPONENT_PARAMS` for a tiny model."""
    from hf_decoding_ext.registry import get_method
    from hf_decoding_ext.speculative import SpeculativeDecoding

    def build(name, model):
        spec = get_method(name)
        params = {k: (v(model) if callable(v) else v) for k, v in TINY_COMPONENT_PARAMS[name].items()}
        component = spec.build(model=model, tokenizer=char_tokenizer, **params)
        return spec, SpeculativeDecoding(component, **spec.engine) if spec.kind == "candidate_generator" else component

    return build


def perturbed_copy(model, scale: float, seed: int = 3):
    """A copy of ``model`` with every weight perturbed by ``scale`` times its standard deviation (a draft model that
    agrees with the target most of the time)."""
    import copy

    draft = copy.deepcopy(model)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in draft.parameters():
            p.add_(scale * p.std() * torch.randn(p.shape, generator=gen))
    return draft


class StatefulWithoutLifecycle:
    """A logits processor that declares per-row state (a call counter) without the lifecycle: loops that branch or
    reorder rows must refuse it."""

    stateful = True

    def __init__(self):
        self.calls = 0

    def __call__(self, input_ids, scores):
        self.calls += 1
        return scores
