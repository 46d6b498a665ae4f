"""The CPU kernel feature (hf_decoding_ext.core.kernels.fast_kernels / hf_decoding_ext.fast_generate): every kernel
computes the same product, the plan dispatches by row count, the automatic plan is measured once and cached,
prepacked weights follow in-place weight changes, and greedy decoding is unchanged."""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn

from hf_decoding_ext.core import kernels as K
from hf_decoding_ext.core.kernels import KERNELS, KernelPlan, available_kernels, fast_kernels
from hf_decoding_ext.plug import fast_generate


@pytest.fixture
def fresh_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_DECODING_EXT_CACHE", str(tmp_path))
    monkeypatch.delenv("HF_DECODING_EXT_KERNELS", raising=False)
    monkeypatch.setattr(K, "_MEMO", {})
    monkeypatch.setattr(K, "_SHARED", {})
    return tmp_path


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("rows", [1, 2, 5, 33, 300])
def test_every_kernel_computes_the_same_product(dtype, bias, rows):
    torch.manual_seed(0)
    layer = nn.Linear(48, 80, bias=bias).to(dtype)
    x = torch.randn(1, rows, 48).to(dtype)
    ref = nn.functional.linear(x.float(), layer.weight.float(), None if layer.bias is None else layer.bias.float())
    tol = 1e-4 if dtype == torch.float32 else 0.1
    for kernel in available_kernels(dtype, rows):
        with torch.no_grad(), fast_kernels(layer, plan=kernel) as report:
            y = layer(x)
        assert y.shape == ref.shape and y.dtype == dtype and y.is_contiguous(), kernel
        torch.testing.assert_close(y.float(), ref, atol=tol, rtol=tol, msg=kernel)
        assert report.patched == (0 if kernel == "pytorch" else 1), kernel
    assert "forward" not in layer.__dict__ and not hasattr(layer, "_hk_table")


def test_plan_dispatches_by_row_count(monkeypatch):
    """A dict plan: each call runs the kernel of the smallest listed row count >= its rows."""
    layer = nn.Linear(16, 8)
    plan = {"float32:8x16": {1: "padded_weight_left", 4: "weight_left", 8: "pytorch", 64: "onednn"}}
    used = []
    real = K._run

    def spy(kind, x2, weight, bias, packed):
        used.append((x2.shape[0], KERNELS[kind]))
        return real(kind, x2, weight, bias, packed)

    monkeypatch.setattr(K, "_run", spy)
    with torch.no_grad(), fast_kernels(layer, plan=plan):
        for rows in (1, 3, 4, 6, 9, 100):
            layer(torch.randn(rows, 16))
    onednn = "onednn" if "onednn" in available_kernels() else None
    expected = [(1, "padded_weight_left"), (3, "weight_left"), (4, "weight_left")]
    if onednn:
        expected += [(9, "onednn"), (100, "onednn")]  # 6 rows -> pytorch: not routed through _run
    assert used == expected
    assert KernelPlan(plan).kernel("float32:8x16", 7) == "pytorch"


def test_plan_validation():
    with pytest.raises(ValueError, match="'fastest'"):
        KernelPlan.coerce("fastest")
    with pytest.raises(ValueError, match="'gemm'"):
        KernelPlan({"float32:2x2": {1: "gemm"}})
    with pytest.raises(ValueError, match="-1"):
        KernelPlan({"float32:2x2": {-1: "pytorch"}})
    with pytest.raises(ValueError, match="max_rows"):
        with fast_kernels(nn.Linear(2, 2), max_rows=0):
            pass


def test_auto_plan_is_measured_once_and_cached(fresh_cache):
    layer, other = nn.Linear(24, 40), nn.Linear(24, 40)  # same shape: one measurement
    with torch.no_grad(), fast_kernels(layer, other) as first:
        pass
    assert first.measured == ["float32:40x24"]
    (path,) = (fresh_cache / "kernel_plans").glob("*.json")
    stored = json.loads(path.read_text())["shapes"]["float32:40x24"]
    assert set(map(int, stored["choices"])) == set(K.ROW_BUCKETS)
    assert all(set(ms) >= {"pytorch", "weight_left"} for ms in stored["ms"].values())
    K._MEMO.clear()  # a new process reads the file instead of measuring again
    K._SHARED.clear()
    with torch.no_grad(), fast_kernels(layer) as second:
        pass
    assert second.measured == [] and second.plan.choices["float32:40x24"] == {
        int(r): k for r, k in stored["choices"].items()}


def test_auto_plan_is_shared_and_its_tables_memoised(fresh_cache):
    """Entering the kernels per generate() call must not rebuild per-layer tables (it cost 0.37 s per call for
    the default model before the memo)."""
    layer = nn.Linear(8, 8)
    with fast_kernels(layer, plan="weight_left"):
        first = layer._hk_table
    with fast_kernels(layer, plan="weight_left"):
        assert layer._hk_table is first
    assert KernelPlan.coerce("auto") is KernelPlan.coerce("auto")


def test_environment_variable_overrides_auto(fresh_cache, monkeypatch):
    monkeypatch.setenv("HF_DECODING_EXT_KERNELS", "pytorch")
    with fast_kernels(nn.Linear(4, 4)) as report:
        assert report.patched == 0 and report.measured == []
    monkeypatch.setenv("HF_DECODING_EXT_KERNELS", "fastest")
    with pytest.raises(ValueError, match="HF_DECODING_EXT_KERNELS"):
        with fast_kernels(nn.Linear(4, 4)):
            pass


@pytest.mark.skipif("onednn" not in available_kernels(), reason="this PyTorch build has no oneDNN linear")
def test_prepacked_weight_is_reused_and_follows_in_place_changes():
    layer = nn.Linear(32, 16)
    x = torch.randn(4, 32)
    with torch.no_grad(), fast_kernels(layer, plan="onednn") as r1:
        packed = layer._hk_packed
        y1 = layer(x)
    with torch.no_grad(), fast_kernels(layer, plan="onednn"):
        assert layer._hk_packed is packed  # no repacking per generate() call
    torch.testing.assert_close(y1, nn.functional.linear(x, layer.weight, layer.bias), atol=1e-5, rtol=1e-5)
    with torch.no_grad():
        layer.weight.mul_(-2.0)  # an in-place update (training, weight loading)
    with torch.no_grad(), fast_kernels(layer, plan="onednn"):
        assert layer._hk_packed is not packed
        torch.testing.assert_close(layer(x), nn.functional.linear(x, layer.weight, layer.bias), atol=1e-5, rtol=1e-5)
    assert r1.extra_bytes == layer.weight.numel() * 4
    assert K.release_packed(layer) == layer.weight.numel() * 4 and K.release_packed(layer) == 0


def test_autograd_keeps_gradients():
    """With autograd on, oneDNN calls fall back to PyTorch's kernel and weight-left stays differentiable."""
    for kernel in ("onednn", "weight_left"):
        layer = nn.Linear(8, 4)
        x = torch.randn(3, 8, requires_grad=True)
        with fast_kernels(layer, plan=kernel):
            layer(x).sum().backward()
        assert layer.weight.grad is not None and x.grad is not None
        torch.testing.assert_close(layer.weight.grad, torch.ones(4, 3) @ x.detach(), atol=1e-5, rtol=1e-5)


def test_ineligible_layers_left_alone():
    class Sub(nn.Linear):
        pass

    model = nn.Sequential(nn.Linear(4, 4), Sub(4, 4), nn.Linear(4, 4).half(), nn.Linear(4, 4).double())
    with fast_kernels(model, plan="weight_left") as report:
        assert report.patched == 1 and "forward" in model[0].__dict__
        assert not any("forward" in m.__dict__ for m in model[1:])


@pytest.mark.parametrize("kernel", ["auto", "lean", *KERNELS])
def test_greedy_generation_unchanged_on_tiny_models(kernel, tiny_llama, fresh_cache):
    prompt = torch.tensor([[5, 6, 7, 8, 9, 10]])
    kwargs = dict(attention_mask=torch.ones_like(prompt), max_new_tokens=16, do_sample=False)
    ref = tiny_llama.generate(prompt, **kwargs)
    assert torch.equal(fast_generate(tiny_llama, prompt, kernels=kernel, **kwargs), ref)
    assert not any("forward" in m.__dict__ for m in tiny_llama.modules())


@pytest.mark.skipif("onednn" not in available_kernels(), reason="this PyTorch build has no oneDNN linear")
def test_lean_plan_holds_one_copy_and_restores_the_exact_weights(fresh_cache):
    """plan='lean' frees each decoder linear's dense weight during the block (oneDNN's packed weight is the only
    copy), computes exactly what the two-copy oneDNN plan computes, and puts the bitwise-identical weights back."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=96, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, tie_word_embeddings=False)
    model = LlamaForCausalLM(cfg).eval()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    ids = torch.tensor([[5, 6, 7, 8, 9, 10, 11]])
    with torch.no_grad(), fast_kernels(model, plan="onednn"):
        two_copies = model(ids).logits
    lean = KernelPlan(default="onednn", lean=True)
    with torch.no_grad(), fast_kernels(model, plan=lean) as report:
        q = model.model.layers[0].self_attn.q_proj
        assert q.weight.numel() == 0 and q._hk_packed.is_mkldnn  # the dense storage is gone
        assert model.lm_head.weight.shape == (96, 64)  # the output embedding keeps its dense copy
        assert report.patched == 15 and report.extra_bytes == 96 * 64 * 4  # only the lm_head is held twice
        assert torch.equal(model(ids).logits, two_copies)
        with torch.enable_grad(), pytest.raises(RuntimeError, match="inference only"):
            q(torch.randn(2, 64))
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert not any(k.startswith("_hk_") for m in model.modules() for k in m.__dict__)
    assert KernelPlan.coerce("lean").lean and KernelPlan.coerce("lean").choices is KernelPlan.coerce("auto").choices


@pytest.mark.skipif("onednn" not in available_kernels(), reason="this PyTorch build has no oneDNN linear")
def test_lean_plan_keeps_memory_mapped_weights_and_pages_them_out(fresh_cache, tmp_path):
    """Weights loaded memory-mapped from safetensors (from_pretrained) are kept aside during a lean block (their pages
    handed back to the kernel, never copied) and put back as the very same tensors."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=96, hidden_size=256, intermediate_size=512, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True)
    LlamaForCausalLM(cfg).save_pretrained(tmp_path / "m")
    model = LlamaForCausalLM.from_pretrained(tmp_path / "m").eval()
    up = model.model.layers[0].mlp.up_proj
    assert K._in_file_mapping(up.weight, K._file_mappings())  # the premise: a file-backed weight
    ptr, before = up.weight.data_ptr(), up.weight.clone()
    ids = torch.tensor([[5, 6, 7, 8, 9]])
    with torch.no_grad(), fast_kernels(model, plan="onednn"):
        ref = model(ids).logits
    with torch.no_grad(), fast_kernels(model, plan=KernelPlan(default="onednn", lean=True)):
        assert up.weight.numel() == 0 and up._hk_orig.data_ptr() == ptr
        assert model.lm_head.weight.numel() == 96 * 256  # tied to the embeddings: untouched
        assert torch.equal(model(ids).logits, ref)
    assert up.weight.data_ptr() == ptr and torch.equal(up.weight, before)


def test_engine_with_the_lean_plan_is_lossless_and_restores_weights(tiny_llama, fresh_cache):
    from hf_decoding_ext.speculative import SpeculativeDecoding
    from hf_decoding_ext.speculative.drafters.prompt_lookup import PromptLookupDrafter

    prompt = torch.tensor([[5, 6, 7, 8, 9, 5, 6, 7, 8, 9, 5, 6]])
    kwargs = dict(attention_mask=torch.ones_like(prompt), max_new_tokens=16, do_sample=False)
    before = {k: v.clone() for k, v in tiny_llama.state_dict().items()}
    ref = tiny_llama.generate(prompt, **kwargs)
    loop = SpeculativeDecoding(PromptLookupDrafter(), kernels="lean")
    assert torch.equal(tiny_llama.generate(prompt, custom_generate=loop, **kwargs), ref)
    assert all(torch.equal(before[k], v) for k, v in tiny_llama.state_dict().items())
    assert not any(k.startswith("_hk_") for m in tiny_llama.modules() for k in m.__dict__)
