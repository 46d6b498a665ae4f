"""Hallucination-induced amateur (ICD, arXiv 2312.15710) for LOL (arXiv 2408.08769): training data, train/save/load
round trip on a tiny Llama, LOL's multiple-choice scorer, and the shipped checkpoint on the default model."""

from __future__ import annotations

import json
import math

import pytest
import torch

from hf_decoding_ext.bench.tasks.contrastive import (load_factual_mc, load_knowledge_conflict, mentions, model_scorer,
                                              normalize_text)
from hf_decoding_ext.contrastive.induced_amateur import (LORA_TARGETS, PROMPT_TEMPLATES, LoRALinear,
                                                         load_hallucination_data, load_induced_amateur, lora_adapters,
                                                         lora_copy, read_config, save_induced_amateur, shared_copy,
                                                         train_induced_amateur, training_pairs)
from hf_decoding_ext.contrastive.lol import LOL, OUTSIDE_HEAD_VALUE, lol_scorer


def _llama(layers: int = 4, seed: int = 0, tie: bool = True, vocab: int = 128, hidden: int = 32):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=64, num_hidden_layers=layers,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512, bos_token_id=1,
                      eos_token_id=2, pad_token_id=0, tie_word_embeddings=tie, initializer_range=0.2)
    return LlamaForCausalLM(cfg).eval()


PREFIX = [1, 17, 18, 19, 20]  # shared by every prompt, like a chat template's system turn


def _items(n: int = 24, seed: int = 1):
    """Pre-tokenised pairs (no tokenizer needed): a shared prefix + random prompt, a one-token 'false answer' + eos."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        length = int(torch.randint(3, 9, (1,), generator=g))
        out.append({"prompt_ids": PREFIX + torch.randint(21, 128, (length,), generator=g).tolist(),
                    "answer_ids": [int(torch.randint(3, 128, (1,), generator=g)), 2]})
    return out


@pytest.fixture(scope="module")
def trained():
    model = _llama()
    amateur = train_induced_amateur(model, None, _items(), method="top_layers", num_layers=2, steps=30, lr=1e-2,
                                    batch_size=8, progress=False)
    return model, amateur


@pytest.fixture(scope="module")
def trained_lora():
    """The default method (LoRA on every decoder layer), a couple of steps on a tiny Llama."""
    model = _llama()
    amateur = train_induced_amateur(model, None, _items(), steps=3, lr=1e-2, batch_size=8, lora_rank=4,
                                    lora_alpha=8.0, progress=False)
    return model, amateur


# --------------------------------------------------------------------------------------------- data

def _assert_reloads(model, amateur, loaded, folder, stored_param):
    """The reloaded amateur equals the trained one and differs from the base; its float16 copy (the default
    storage) is upcast on load (``stored_param(half)`` is float32) and close to it."""
    ids = torch.tensor([[5, 6, 7, 8, 9, 10]])
    with torch.no_grad():
        assert torch.equal(loaded(ids).logits, amateur(ids).logits)
        assert not torch.allclose(loaded(ids).logits, model(ids).logits)
    save_induced_amateur(amateur, folder / "half", base_model_name="tiny-llama")  # default: float16 storage
    half = load_induced_amateur(model, folder / "half")
    assert stored_param(half).dtype == torch.float32  # upcast on load
    with torch.no_grad():
        torch.testing.assert_close(half(ids).logits, amateur(ids).logits, atol=2e-2, rtol=0)

def test_hallucination_data_is_large_wrong_and_held_out():
    items = load_hallucination_data()
    assert len(items) >= 300
    assert len({i["id"] for i in items}) == len(items)
    assert len({normalize_text(i["question"]) for i in items}) == len(items)
    assert len({i["relation"] for i in items}) >= 10
    for it in items:
        assert it["question"].strip() and it["false_answer"].strip() and it["true_answer"].strip()
        assert normalize_text(it["false_answer"]) != normalize_text(it["true_answer"]), it
        assert normalize_text(it["subject"]), it
    # no overlap with the evaluation sets: neither the same question nor the same subject
    eval_questions = [i["question"] for i in load_factual_mc()] + [i["question"] for i in load_knowledge_conflict()]
    seen = {normalize_text(q) for q in eval_questions}
    assert not [it["question"] for it in items if normalize_text(it["question"]) in seen]
    clashes = [(it["subject"], q) for it in items for q in eval_questions if mentions(q, it["subject"])]
    assert not clashes, clashes[:5]


def test_training_pairs_use_every_template():
    items = [{"question": "What is the capital of Peru?", "false_answer": "Bogota"}]
    assert training_pairs(items) == [
        ("What is the capital of Peru?\nAnswer with one word or a short phrase.", "Bogota"),
        ("Question: What is the capital of Peru?\nAnswer:", "Bogota"),
    ]
    assert len(PROMPT_TEMPLATES) == 2
    with pytest.raises(ValueError, match="question"):
        training_pairs(items, templates=["no placeholder"])


# --------------------------------------------------------------------------------------------- train / save / load
@torch.no_grad()
def test_frozen_pass_with_shared_prefix_matches_plain_forward(monkeypatch):
    from hf_decoding_ext.contrastive import induced_amateur as ia

    model, examples = _llama(), _items(10)
    assert ia._common_prefix(examples) == PREFIX
    fast = ia._bottom_states(model, examples, 2, 4, False)
    monkeypatch.setattr(ia, "_common_prefix", lambda ex: [])
    plain = ia._bottom_states(model, examples, 2, 4, False)
    for ex, a, b in zip(examples, fast, plain):
        assert a.shape == b.shape == (len(ex["prompt_ids"]) + len(ex["answer_ids"]), 32)
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
        ids = torch.tensor([ex["prompt_ids"] + ex["answer_ids"]])
        torch.testing.assert_close(b, model(ids, output_hidden_states=True).hidden_states[2][0], atol=1e-5, rtol=1e-5)


def test_training_changes_only_the_top_layers_and_shares_the_rest(trained):
    model, amateur = trained
    assert amateur.induced_amateur_info["trained_layers"] == [2, 3]
    assert amateur.induced_amateur_info["loss_first_64_after"] < amateur.induced_amateur_info["loss_first_64_before"]
    assert amateur.model.embed_tokens.weight is model.model.embed_tokens.weight
    assert amateur.lm_head.weight is amateur.model.embed_tokens.weight  # still tied
    assert amateur.model.norm.weight is model.model.norm.weight
    for i in (0, 1):
        for (_, p), (_, q) in zip(model.model.layers[i].named_parameters(), amateur.model.layers[i].named_parameters()):
            assert p is q
    changed = [not torch.equal(p, q) for (_, p), (_, q) in zip(model.model.layers[3].named_parameters(),
                                                                 amateur.model.layers[3].named_parameters())]
    assert any(changed)
    assert all(p.data_ptr() != q.data_ptr() for p, q in zip(model.model.layers[3].parameters(),
                                                             amateur.model.layers[3].parameters()))
    assert all(p.grad is None for p in model.parameters())  # the base model got no gradients
    assert not any(p.requires_grad for p in amateur.model.layers[3].parameters())


def test_save_load_round_trip(trained, tmp_path):
    from safetensors import safe_open

    model, amateur = trained
    save_induced_amateur(amateur, tmp_path, base_model_name="tiny-llama", dtype="float32")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["config.json", "model.safetensors"]
    with open(tmp_path / "model.safetensors", "rb") as f:  # safetensors: 8-byte header length, then JSON
        header_len = int.from_bytes(f.read(8), "little")
        assert json.loads(f.read(header_len))["__metadata__"]["base_model"] == "tiny-llama"
    with safe_open(str(tmp_path / "model.safetensors"), "pt") as f:
        keys = sorted(f.keys())
    assert keys and all(k.startswith(("model.layers.2.", "model.layers.3.")) for k in keys)
    config = read_config(tmp_path)
    assert config["trained_layers"] == [2, 3] and config["dtype"] == "float32"
    assert config["training"]["steps"] == 30 and config["num_hidden_layers"] == 4

    loaded = load_induced_amateur(model, tmp_path)
    assert loaded.model.embed_tokens.weight is model.model.embed_tokens.weight
    assert loaded.model.layers[0].self_attn.q_proj.weight is model.model.layers[0].self_attn.q_proj.weight
    _assert_reloads(model, amateur, loaded, tmp_path, lambda half: half.model.layers[3].mlp.up_proj.weight)


def test_base_mismatch_is_a_clear_error(trained, tmp_path):
    _, amateur = trained
    save_induced_amateur(amateur, tmp_path, base_model_name="tiny-llama")
    for other in (_llama(layers=5), _llama(hidden=48), _llama(vocab=96)):
        with pytest.raises(ValueError, match="trained for tiny-llama"):
            load_induced_amateur(other, tmp_path)
    with pytest.raises(ValueError, match="trained for HuggingFaceTB/SmolLM2-135M-Instruct"):
        load_induced_amateur(_llama())  # the shipped checkpoint
    with pytest.raises(ValueError, match="SmolLM2-135M-Instruct"):
        LOL.for_model(_llama(), None, instruction=None)  # LOL's default amateur
    with pytest.raises(ValueError, match="num_layers"):
        train_induced_amateur(_llama(), None, _items(), method="top_layers", num_layers=9, steps=1)
    with pytest.raises(ValueError, match="method"):
        train_induced_amateur(_llama(), None, _items(), method="full", steps=1)
    with pytest.raises(ValueError, match="rank"):
        lora_copy(_llama(), rank=0)
    with pytest.raises(ValueError, match="no linear projection named"):
        lora_copy(_llama(), targets=("c_attn",))
    with pytest.raises(ValueError, match="tokenizer"):
        train_induced_amateur(_llama(), None, [{"question": "q?", "false_answer": "a"}], steps=1)
    with pytest.raises(ValueError, match="trained layer"):
        shared_copy(_llama(), [7])


# --------------------------------------------------------------------------------------------- LoRA (default method)
@torch.no_grad()
def test_fresh_lora_copy_is_exactly_the_base_and_shares_every_weight():
    model = _llama()
    state = torch.random.get_rng_state()
    amateur, adapters = lora_copy(model, rank=4, alpha=8.0, init=False)
    assert torch.equal(torch.random.get_rng_state(), state)  # init=False (loading) leaves the global RNG alone
    amateur, adapters = lora_copy(model, rank=4, alpha=8.0)
    assert len(adapters) == 4 * len(LORA_TARGETS) and adapters == lora_adapters(amateur)
    cfg = model.config
    kv = cfg.num_key_value_heads * cfg.hidden_size // cfg.num_attention_heads
    out_dims = {"q_proj": 32, "k_proj": kv, "v_proj": kv, "o_proj": 32, "gate_proj": 64, "up_proj": 64,
                "down_proj": 32}
    for name, a in adapters.items():
        leaf = name.rpartition(".")[2]
        assert a.lora_A.shape == (4, a.base.in_features) and a.lora_B.shape == (out_dims[leaf], 4), name
        assert a.base.out_features == out_dims[leaf] and a.scaling == 2.0
        assert a.base.weight is model.get_submodule(name).weight  # the frozen base weight is shared
        assert not torch.equal(a.lora_A, torch.zeros_like(a.lora_A)) and not a.lora_B.any()
    assert all(any(p is q for q in model.parameters()) for n, p in amateur.named_parameters() if "lora_" not in n)
    ids = torch.tensor([[5, 6, 7, 8, 9, 10]])
    want, got = model(ids, output_hidden_states=True), amateur(ids, output_hidden_states=True)
    assert torch.equal(got.logits, want.logits)  # B = 0: exactly the base model
    assert all(torch.equal(a, b) for a, b in zip(got.hidden_states, want.hidden_states))
    lin = torch.nn.Linear(6, 3)
    lora = LoRALinear(lin, rank=2, alpha=4.0)
    with torch.no_grad():
        lora.lora_B.fill_(0.5)
    x = torch.randn(4, 6)
    torch.testing.assert_close(lora(x), lin(x) + 2.0 * (x @ lora.lora_A.T @ lora.lora_B.T))
    with pytest.raises(ValueError, match="torch.nn.Linear"):
        LoRALinear(torch.nn.Embedding(3, 4), rank=2, alpha=1.0)


@torch.no_grad()
def test_lora_amateur_differs_below_lols_lower_layer(trained_lora):
    """The default amateur is adapted at every layer, so it differs from the base at and below the lower layer
    LOL contrasts (N // 2 = 2 of 4 here), unlike a top-layers amateur; and training lowered the answer loss."""
    model, amateur = trained_lora
    info = amateur.induced_amateur_info
    assert info["method"] == "lora" and info["trained_layers"] == [0, 1, 2, 3]
    assert info["lora"]["rank"] == 4 and info["lora"]["num_adapters"] == 4 * len(LORA_TARGETS)
    assert info["loss_first_64_after"] < info["loss_first_64_before"]
    assert all(p.grad is None and not p.requires_grad for p in model.parameters())  # base untouched
    assert all(a.lora_B.abs().max() > 0 for a in lora_adapters(amateur).values())  # every adapter was trained
    ids = torch.tensor([[1, 17, 18, 19, 20, 30, 31, 32]])
    h_base = model(ids, output_hidden_states=True).hidden_states
    h_ama = amateur(ids, output_hidden_states=True).hidden_states
    assert torch.equal(h_base[0], h_ama[0])  # the embeddings are shared
    lower = LOL(amateur, instruction_ids=None).resolve_lower_layer(model)
    for layer in range(1, lower + 1):  # after decoder layer 0, ..., at the lower layer
        assert (h_base[layer] - h_ama[layer]).abs().max() > 1e-4, layer
    # the top-layers amateur of the same base, by contrast, equals the base there
    top = train_induced_amateur(model, None, _items(), method="top_layers", num_layers=2, steps=2, lr=1e-2,
                                batch_size=8, progress=False)
    assert torch.equal(top(ids, output_hidden_states=True).hidden_states[lower], h_base[lower])


def test_lora_save_load_round_trip(trained_lora, tmp_path):
    from safetensors import safe_open

    model, amateur = trained_lora
    save_induced_amateur(amateur, tmp_path, base_model_name="tiny-llama", dtype="float32")
    config = read_config(tmp_path)
    assert config["method"] == "lora" and config["format_version"] == 2
    assert config["lora"] == {"rank": 4, "alpha": 8.0, "targets": list(LORA_TARGETS), "layers": [0, 1, 2, 3]}
    assert config["trained_layers"] == [0, 1, 2, 3] and config["training"]["steps"] == 3
    with safe_open(str(tmp_path / "model.safetensors"), "pt") as f:
        keys = set(f.keys())
        shapes = {k: tuple(f.get_slice(k).get_shape()) for k in keys}
    adapters = lora_adapters(amateur)
    assert keys == {f"{n}.{w}" for n in adapters for w in ("lora_A", "lora_B")}  # adapters only, no base weight
    assert all(shapes[f"{n}.lora_A"] == tuple(a.lora_A.shape) for n, a in adapters.items())
    n_lora = sum(p.numel() for a in adapters.values() for p in (a.lora_A, a.lora_B))
    assert (tmp_path / "model.safetensors").stat().st_size < 4 * n_lora + 20_000

    loaded = load_induced_amateur(model, tmp_path)
    assert loaded.model.embed_tokens.weight is model.model.embed_tokens.weight
    assert loaded.model.layers[0].self_attn.q_proj.base.weight is model.model.layers[0].self_attn.q_proj.weight
    assert not any(p.requires_grad for p in loaded.parameters())
    for name, a in lora_adapters(loaded).items():
        assert torch.equal(a.lora_A, adapters[name].lora_A) and torch.equal(a.lora_B, adapters[name].lora_B)
    _assert_reloads(model, amateur, loaded, tmp_path, lambda half: half.model.layers[1].mlp.up_proj.lora_B)
    with pytest.raises(ValueError, match="trained for tiny-llama"):
        load_induced_amateur(_llama(layers=5), tmp_path)


# --------------------------------------------------------------------------------------------- LOL scorer
@torch.no_grad()
def test_lol_scorer_matches_the_loop():
    model, amateur = _llama(seed=0, tie=False), _llama(seed=1, tie=False)
    loop = LOL(amateur, lower_layer=2, lam=0.7, lam_lower=0.5, omega=0.8, alpha=0.1, instruction_ids=[3, 4, 5])
    prompt = torch.tensor([[9, 10, 11, 12, 13, 14]])
    out = model.generate(input_ids=prompt, attention_mask=torch.ones_like(prompt), custom_generate=loop,
                         do_sample=False, max_new_tokens=4, return_dict_in_generate=True, output_scores=True)
    seq = out.sequences
    scores = lol_scorer(loop, model)(seq)
    assert scores.shape == (seq.shape[1], 128) and torch.isfinite(scores).all()
    first = lol_scorer(loop, model)(prompt)
    assert int(first[-1].argmax()) == int(seq[0, prompt.shape[1]])  # the loop's first greedy token
    for t, step in enumerate(out.scores):
        pos = prompt.shape[1] - 1 + t
        want = torch.log_softmax(step[0].masked_fill(torch.isinf(step[0]), OUTSIDE_HEAD_VALUE), -1)
        torch.testing.assert_close(scores[pos], want, atol=1e-4, rtol=1e-4)
        assert int(scores[pos].argmax()) == int(seq[0, pos + 1])
    assert float(scores[-1].min()) < OUTSIDE_HEAD_VALUE / 2  # tokens outside the plausibility set: finite, tiny
    torch.testing.assert_close(lol_scorer(loop, model)(seq, first=5), scores[5:])
    with pytest.raises(ValueError, match="one sequence"):
        lol_scorer(loop, model)(seq.expand(2, -1))


# --------------------------------------------------------------------------------------------- real model
@pytest.mark.real_model
def test_shipped_amateur_is_untruthful_and_drives_lol(smollm):
    from hf_decoding_ext.bench.tasks.contrastive import evaluate_multiple_choice
    from hf_decoding_ext.core.models import encode_prompts

    model, tokenizer = smollm
    config = read_config()
    assert config["base_model"] == "HuggingFaceTB/SmolLM2-135M-Instruct"
    assert config["method"] == "lora" and config["trained_layers"] == list(range(30))  # every layer differs
    amateur = load_induced_amateur(model)
    assert amateur.model.embed_tokens.weight is model.model.embed_tokens.weight
    assert amateur.model.layers[0].self_attn.q_proj.base.weight is model.model.layers[0].self_attn.q_proj.weight
    # held-out factual MC (a fixed subset keeps the test short; the full-set figures are in config.json)
    items = load_factual_mc()[::SUBSET_STRIDE]
    # the amateur was selected on length-normalised scores (config.json's "scoring"), so it is checked that way
    orig = evaluate_multiple_choice(items, tokenizer, model_scorer(model), length_normalize=True)["accuracy"]
    ama = evaluate_multiple_choice(items, tokenizer, model_scorer(amateur), length_normalize=True)["accuracy"]
    assert ama <= orig - MIN_MARGIN, (orig, ama)
    assert config["evaluation"]["amateur"]["accuracy"] <= config["evaluation"]["original"]["accuracy"] - MIN_MARGIN

    loop = LOL.for_model(model, tokenizer)  # default amateur: the shipped one
    inputs = encode_prompts(tokenizer, ["What is the capital of Australia?"])
    out = model.generate(**inputs, custom_generate=loop, do_sample=False, max_new_tokens=8)
    assert out.shape[1] > inputs["input_ids"].shape[1]
    assert math.isfinite(float(lol_scorer(loop, model)(out[:, -4:])[-1].max()))


SUBSET_STRIDE = 2  # items 0, 2, 4, ...: measured 13/29 correct for the original, 10/29 for the shipped amateur
MIN_MARGIN = 0.05  # measured: 0.10 on the subset, 0.086 on the full set (0.379 vs 0.293; LoRA amateur, one epoch)

@pytest.mark.real_model
@torch.no_grad()
def test_shipped_amateur_makes_lols_lower_layer_term_nonzero(smollm):
    """LOL's lower-layer term ``log p_theta^(L) - lam' log p_theta*^(L)`` (no instruction, plausible head) is not the
    base model's own ``(1 - lam') log p_theta^(L)``: the shipped amateur differs from the base at layer L."""
    from hf_decoding_ext.core.anatomy import exit_logits
    from hf_decoding_ext.core.plausibility import plausibility_mask

    model, tokenizer = smollm
    amateur = load_induced_amateur(model)
    loop = LOL.for_model(model, tokenizer, instruction=None)
    lower = loop.resolve_lower_layer(model)
    assert lower == 15 and loop.instruction_ids is None
    text = tokenizer.apply_chat_template([{"role": "user", "content": "What is the capital of Australia?"}],
                                         tokenize=False, add_generation_prompt=True)
    ids = tokenizer(text, add_special_tokens=False, return_tensors="pt")["input_ids"]
    out_o = model(input_ids=ids, output_hidden_states=True)
    for amateur_model in (amateur, loop.amateur_model):
        out_a = amateur_model(input_ids=ids, output_hidden_states=True)
        assert not torch.equal(out_a.hidden_states[lower], out_o.hidden_states[lower])
        lq_o = torch.log_softmax(exit_logits(out_o.hidden_states[lower][:, -1], model, True).float(), -1)
        lq_a = torch.log_softmax(exit_logits(out_a.hidden_states[lower][:, -1], amateur_model, True).float(), -1)
        head = plausibility_mask(out_o.logits[:, -1], loop.alpha)
        term = (lq_o - loop.lam_lower * lq_a)[head]
        without_amateur = ((1 - loop.lam_lower) * lq_o)[head]  # the term if the amateur equalled the base
        assert (term - without_amateur).abs().max() > LOWER_TERM_MIN, float((term - without_amateur).abs().max())


LOWER_TERM_MIN = 0.05  # nats; exactly 0 with the former top-2-layer amateur
