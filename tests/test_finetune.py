"""The shared fine-tuning recipe (issue 24) on tiny random models: in-house LoRA (starts identical, only adapter and
new-token rows train, merge, exact and small adapter round trip), extra special tokens, the fine-tuning loop (loss
goes down in both modes, JSON-lines log, resumable checkpoints with the same final weights, safetensors only) and
greedy agreement with the original model."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import _char_tokenizer, _tiny_gpt2, _tiny_llama, perturbed_copy

from hf_decoding_ext.training.finetune import (
    FineTuneConfig,
    LoRALinear,
    NewRowsEmbedding,
    add_special_tokens,
    agreement_with,
    apply_lora,
    collate_lm,
    finetune,
    load_lora,
    lora_state_dict,
    merge_lora,
    next_token_loss,
    save_lora,
)

MAKERS = {"llama": _tiny_llama, "gpt2": _tiny_gpt2}
TARGETS = {"llama": ("q_proj", "v_proj"), "gpt2": ("c_attn",)}
MASK = "<|mask|>"
MASK_ID = 128  # its id once added to the 128-token tiny tokenizer


def _ids(n=2, length=12, seed=0):
    return torch.randint(4, 127, (n, length), generator=torch.Generator().manual_seed(seed))


def _logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids).logits


def _randomize_adapter(model, seed=1):
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in [p for n, p in model.named_parameters() if n.endswith((".lora_B", ".new_rows"))]:
            p.add_(0.1 * torch.randn(p.shape, generator=gen))


@pytest.mark.parametrize("arch", sorted(MAKERS))
def test_lora_wrap_starts_identical(arch):
    model = MAKERS[arch]()
    ids = _ids()
    before = _logits(model, ids)
    apply_lora(model, TARGETS[arch], rank=4, alpha=8)
    assert sum(isinstance(m, LoRALinear) for m in model.modules()) == 2 * len(TARGETS[arch])  # 2 layers
    assert torch.equal(_logits(model, ids), before)


@pytest.mark.parametrize("arch", sorted(MAKERS))
def test_only_lora_and_new_token_rows_get_gradients(arch):
    model, tok = MAKERS[arch](), _char_tokenizer()
    (mask_id,) = add_special_tokens(model, tok, [MASK])
    apply_lora(model, TARGETS[arch], rank=4, alpha=8)
    ids = torch.cat([_ids(), torch.full((2, 1), mask_id)], 1)
    model(input_ids=ids).logits.sum().backward()
    with_grad = {n for n, p in model.named_parameters() if p.grad is not None}
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert with_grad == trainable == set(lora_state_dict(model))
    assert any(n.endswith(".new_rows") for n in with_grad)
    assert all(n.endswith((".lora_A", ".lora_B", ".new_rows")) for n in with_grad)


@pytest.mark.parametrize("arch", sorted(MAKERS))
def test_merge_gives_the_wrapped_logits(arch):
    model, tok = MAKERS[arch](), _char_tokenizer()
    (mask_id,) = add_special_tokens(model, tok, [MASK])
    apply_lora(model, TARGETS[arch], rank=4, alpha=8)
    _randomize_adapter(model)
    ids = torch.cat([_ids(), torch.full((2, 1), mask_id)], 1)
    wrapped = _logits(model, ids)
    merge_lora(model)
    assert not any(isinstance(m, (LoRALinear, NewRowsEmbedding)) for m in model.modules())
    torch.testing.assert_close(_logits(model, ids), wrapped, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("arch", sorted(MAKERS))
def test_adapter_round_trip_is_exact_and_small(arch, tmp_path):
    model, tok = MAKERS[arch](), _char_tokenizer()
    (mask_id,) = add_special_tokens(model, tok, [MASK])
    apply_lora(model, TARGETS[arch], rank=4, alpha=8)
    _randomize_adapter(model)
    ids = torch.cat([_ids(), torch.full((2, 1), mask_id)], 1)
    expected = _logits(model, ids)
    save_lora(model, tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adapter.safetensors", "adapter_config.json"]
    fresh, tok2 = MAKERS[arch](), _char_tokenizer()
    assert add_special_tokens(fresh, tok2, [MASK]) == [mask_id]
    load_lora(fresh, tmp_path)
    assert torch.equal(_logits(fresh, ids), expected)
    model_bytes = sum(p.numel() * p.element_size() for p in fresh.parameters())
    adapter_bytes = (tmp_path / "adapter.safetensors").stat().st_size
    assert adapter_bytes < 0.1 * model_bytes, (adapter_bytes, model_bytes)
    # a model without the added token is refused; loaded merged: the same logits up to float rounding
    fresh3 = MAKERS[arch]()
    add_special_tokens(fresh3, _char_tokenizer(), [MASK])
    with pytest.raises(ValueError, match="vocabulary"):
        load_lora(MAKERS[arch](), tmp_path)
    merged = load_lora(fresh3, tmp_path, merge=True)
    torch.testing.assert_close(_logits(merged, ids), expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("arch", sorted(MAKERS))
def test_add_special_tokens_grows_embeddings(arch):
    model, tok = MAKERS[arch](), _char_tokenizer()
    tied = model.get_output_embeddings().weight is model.get_input_embeddings().weight
    old_in = model.get_input_embeddings().weight.detach().clone()
    old_out = model.get_output_embeddings().weight.detach().clone()
    ids = add_special_tokens(model, tok, [MASK, "<|block|>"], init="mean")
    assert ids == [128, 129]
    emb, out = model.get_input_embeddings().weight, model.get_output_embeddings().weight
    assert emb.shape[0] == out.shape[0] == model.config.vocab_size == 130
    assert (out is emb) == tied
    assert torch.equal(emb[:128], old_in) and torch.equal(out[:128], old_out)
    torch.testing.assert_close(emb[128], old_in.mean(0))
    torch.testing.assert_close(emb[129], old_in.mean(0))
    torch.testing.assert_close(out[129], old_out.mean(0))
    assert tok(f"ab{MASK}c", add_special_tokens=False)["input_ids"] == [tok.convert_tokens_to_ids("a"),
                                                                         tok.convert_tokens_to_ids("b"), 128,
                                                                         tok.convert_tokens_to_ids("c")]
    assert model.config.decoding_ext_added_tokens == {MASK: 128, "<|block|>": 129}
    assert add_special_tokens(model, tok, [MASK]) == [128]  # idempotent
    fresh = MAKERS[arch]()  # a tokenizer that already has the tokens (saved by a run) and a fresh original model
    assert add_special_tokens(fresh, tok, [MASK, "<|block|>"]) == [128, 129]
    assert fresh.get_input_embeddings().weight.shape[0] == 130 and fresh.config.decoding_ext_added_tokens[MASK] == 128
    assert model.get_input_embeddings().weight.shape[0] == 130
    assert model(input_ids=torch.tensor([[5, 128, 129]])).logits.shape[-1] == 130
    # other initialisations
    m2, t2 = MAKERS[arch](), _char_tokenizer()
    add_special_tokens(m2, t2, [MASK], init=2)
    assert torch.equal(m2.get_input_embeddings().weight[128], old_in[2])
    m3, t3 = MAKERS[arch](), _char_tokenizer()
    add_special_tokens(m3, t3, [MASK], init="zeros")
    assert not m3.get_input_embeddings().weight[128].any()


def _eval_loss(model, batch):
    model.eval()
    with torch.no_grad():
        return float(next_token_loss(model, batch)[0])


def _no_pickles(path):
    bad = [p for p in path.rglob("*") if p.suffix in (".bin", ".pt", ".pth", ".pkl", ".ckpt")]
    assert not bad, bad


@pytest.mark.parametrize("mode", ["full", "lora"])
def test_finetune_lowers_the_loss(mode, tiny_distill_data, tmp_path):
    _, data = tiny_distill_data
    model, tok = _tiny_llama(), _char_tokenizer()
    probe = collate_lm([(s.input_ids, s.response_start) for s in data.train[:16]])
    before = _eval_loss(model, probe)
    cfg = FineTuneConfig(steps=20, batch_size=8, lr=3e-3 if mode == "full" else 2e-2, warmup=2, mode=mode,
                         lora_rank=4, lora_alpha=8, lora_target_modules=("q_proj", "v_proj", "down_proj"),
                         extra_tokens=(MASK,), log_every=5, checkpoint_every=8)
    model = finetune(model, tok, data, next_token_loss, tmp_path / "out", cfg, progress=False)
    after = _eval_loss(model, probe)
    assert after < before - 0.1, (before, after)
    lines = [json.loads(line) for line in (tmp_path / "out" / "train_log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in lines] == [5, 10, 15, 20]
    assert all({"loss", "lr", "positions", "elapsed_s", "tokens"} <= set(r) for r in lines)
    out = tmp_path / "out"
    _no_pickles(out)
    assert (out / "checkpoint" / "trainable.safetensors").exists()
    summary = json.loads((out / "finetune.json").read_text())
    assert summary["steps"] == 20 and summary["added_tokens"] == {MASK: 128}
    if mode == "full":
        from transformers import AutoModelForCausalLM

        assert (out / "model.safetensors").exists()
        reloaded = AutoModelForCausalLM.from_pretrained(out).eval()
        assert torch.equal(_logits(reloaded, probe["input_ids"]), _logits(model, probe["input_ids"]))
    else:
        assert summary["trainable_parameters"] < 0.2 * summary["parameters"]
        assert (out / "adapter.safetensors").exists() and not (out / "model.safetensors").exists()
        fresh, tok2 = _tiny_llama(), _char_tokenizer()
        add_special_tokens(fresh, tok2, [MASK])
        assert torch.equal(_logits(load_lora(fresh, out), probe["input_ids"]), _logits(model, probe["input_ids"]))
        # the wrapped model generates, and its merged copy gives the same greedy output
        import copy

        prompts = ["hello", [5, MASK_ID, 7]]
        merged = merge_lora(copy.deepcopy(model))
        assert agreement_with(model, merged, tok, prompts, max_new_tokens=6) == 1.0
    d = agreement_with(_tiny_llama(), model, tok, ["hello", "the cat"], max_new_tokens=6, details=True)
    assert 0.0 <= d["agreement"] <= 1.0


def _random_mask_loss(model, batch):
    """Next-token loss on a random half of the positions: the objective uses the RNG, as SPACE's masking does."""
    batch = dict(batch)
    labels = batch["labels"].clone()
    labels[torch.rand(labels.shape, device=labels.device) < 0.5] = -100
    batch["labels"] = labels
    return next_token_loss(model, batch)


class _Interrupt(Exception):
    pass


@pytest.mark.parametrize("mode,arch", [("lora", "llama"), ("full", "gpt2")])  # gpt2: dropout on in training
def test_resume_gives_the_same_final_weights(mode, arch, tiny_distill_data, tmp_path):
    _, data = tiny_distill_data
    cfg = FineTuneConfig(steps=10, batch_size=4, lr=1e-2, warmup=3, mode=mode, lora_rank=4,
                         lora_target_modules=TARGETS[arch], extra_tokens=(MASK,), log_every=1, checkpoint_every=4)
    ref = finetune(MAKERS[arch](), _char_tokenizer(), data, _random_mask_loss, tmp_path / "a", cfg, progress=False)
    calls = {"n": 0}

    def dies_at_step_7(model, batch):
        calls["n"] += 1
        if calls["n"] == 7:
            raise _Interrupt
        return _random_mask_loss(model, batch)

    with pytest.raises(_Interrupt):
        finetune(MAKERS[arch](), _char_tokenizer(), data, dies_at_step_7, tmp_path / "b", cfg, progress=False)
    state = json.loads((tmp_path / "b" / "checkpoint" / "trainer_state.json").read_text())
    assert state["step"] == 4
    resumed = finetune(MAKERS[arch](), _char_tokenizer(), data, _random_mask_loss, tmp_path / "b", cfg,
                       progress=False)
    a, b = dict(ref.named_parameters()), dict(resumed.named_parameters())
    assert a.keys() == b.keys()
    for n, value in a.items():
        assert torch.equal(value, b[n]), n
    log_b = [json.loads(line)["step"] for line in (tmp_path / "b" / "train_log.jsonl").read_text().splitlines()]
    assert log_b == list(range(1, 7)) + list(range(5, 11))  # steps 5-6 ran twice: before the crash and after resume
    _no_pickles(tmp_path / "b")


def test_budget_sets_the_steps(tiny_distill_data, tmp_path):
    _, data = tiny_distill_data
    cfg = FineTuneConfig(budget=300, batch_size=4, mode="lora", lora_rank=2, lora_target_modules=("q_proj",),
                         log_every=100, checkpoint_every=100)
    finetune(_tiny_llama(), None, data, None, tmp_path, cfg, progress=False)
    summary = json.loads((tmp_path / "finetune.json").read_text())
    assert summary["budget"]["positions"] == 300
    assert 300 <= summary["positions"] < 300 + 4 * 40 and summary["steps"] >= 2


def test_agreement_with(char_tokenizer):
    model = _tiny_llama()
    prompts = ["hello", "the cat", [5, 6, 7, 8]]
    assert agreement_with(model, model, char_tokenizer, prompts, max_new_tokens=8) == 1.0
    other = perturbed_copy(model, 0.5)
    d = agreement_with(model, other, char_tokenizer, prompts, max_new_tokens=8, details=True)
    assert d["agreement"] < 1.0 and 0 <= d["prefix_agreement"] <= 1 and len(d["per_prompt"]) == 3


def test_config_validation():
    with pytest.raises(ValueError, match="mode"):
        FineTuneConfig(mode="qlora")
    with pytest.raises(ValueError, match="steps"):
        FineTuneConfig(steps=0)
    with pytest.raises(ValueError, match="no linear layer"):
        apply_lora(_tiny_llama(), ("nope",))


def test_run_finetune_end_to_end(tmp_path):
    """The end-to-end entry point (the future ``hf-decoding-ext finetune``) in seconds: a tiny random Llama with the
    default model's tokenizer answers 1 distillation prompt per category, is LoRA-fine-tuned with a mask token added,
    saved as an adapter, and its greedy agreement with the original is recorded."""
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from hf_decoding_ext.core.models import default_model_path
    from hf_decoding_ext.training.finetune import run_finetune

    tok = AutoTokenizer.from_pretrained(default_model_path())
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                      num_attention_heads=4, num_key_value_heads=2, eos_token_id=tok.eos_token_id,
                      pad_token_id=tok.pad_token_id, max_position_embeddings=2048)
    base = tmp_path / "tiny-base"
    LlamaForCausalLM(cfg).save_pretrained(base)
    tok.save_pretrained(base)
    out, log = tmp_path / "out", tmp_path / "ft.log"
    run_finetune(str(base), str(out), prompts=1, max_new_tokens=6, work_dir=tmp_path / "w", log_file=log,
                 progress=False, agreement_prompts=2, steps=3, batch_size=2, mode="lora", lora_rank=2,
                 extra_tokens=(MASK,), checkpoint_every=2)
    summary = json.loads((out / "finetune.json").read_text())
    assert summary["steps"] == 3 and summary["added_tokens"] == {MASK: len(tok)}
    assert 0 <= summary["agreement_with_original"]["agreement"] <= 1
    assert (out / "adapter.safetensors").exists() and "done" in log.read_text()
    assert AutoTokenizer.from_pretrained(out).convert_tokens_to_ids(MASK) == len(tok)
    _no_pickles(out)
    with pytest.raises(ValueError, match="unknown fine-tuning option"):
        run_finetune(str(base), str(out), stepz=3)


def test_full_save_dtype_keeps_the_tie(tmp_path):
    """A full fine-tune of a tied model (GPT-2) saved in bfloat16 with an added token, from ready-made batches:
    the saved model reloads in bfloat16 with the grown, still tied embeddings and the tokenizer knows the token."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    batch = collate_lm([(torch.arange(4, 30), 5), (torch.arange(10, 20), 3)])
    cfg = FineTuneConfig(steps=2, mode="full", save_dtype="bfloat16", extra_tokens=(MASK,))
    model = finetune(_tiny_gpt2(), _char_tokenizer(), [batch], None, tmp_path, cfg, progress=False)
    assert model.dtype == torch.float32  # training dtype unchanged
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path)
    emb = reloaded.get_input_embeddings().weight
    assert reloaded.dtype == torch.bfloat16 and emb.shape[0] == 129 and reloaded.lm_head.weight is emb
    torch.testing.assert_close(emb.float(), model.get_input_embeddings().weight.to(torch.bfloat16).float())
    assert AutoTokenizer.from_pretrained(tmp_path).convert_tokens_to_ids(MASK) == 128
    _no_pickles(tmp_path)


def test_cli_finetune_builds_a_valid_config(monkeypatch):
    """`hf-decoding-ext finetune ...` passes every option it was given, as FineTuneConfig fields, to run_finetune."""
    from hf_decoding_ext import cli
    from hf_decoding_ext.training import finetune as ft

    seen = {}
    monkeypatch.setattr(ft, "run_finetune", lambda base, out, **kw: seen.update(base=base, out=out, **kw))
    args = ["finetune", "--mode", "full", "--out", "x", "--extra-token", "<|mask|>", "--extra-token", "<|blk|>",
            "--steps", "7", "--lr", "1e-4", "--lora-target", "q_proj", "v_proj", "--objective", "ntp"]
    assert cli.main(args) == 0
    assert seen["out"] == "x" and seen["objective"] == "ntp" and seen["agreement_prompts"] == 20
    cfg = ft.FineTuneConfig(**{k: seen[k] for k in ("steps", "lr", "mode", "extra_tokens", "lora_target_modules")})
    assert (cfg.steps, cfg.lr, cfg.mode) == (7, 1e-4, "full")
    assert cfg.extra_tokens == ("<|mask|>", "<|blk|>") and cfg.lora_target_modules == ("q_proj", "v_proj")
    assert "batch_size" not in seen  # options not given keep the config's defaults
