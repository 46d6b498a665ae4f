"""The weight-left CPU kernel layout for linear layers fed a few rows (engine option ``small_batch_linear``)."""

import pytest
import torch
from torch import nn

from hf_decoding_ext.speculative import SpeculativeDecoding
from hf_decoding_ext.speculative.drafters.prompt_lookup import PromptLookupDrafter
from hf_decoding_ext.core.kernels import eligible, small_batch_linear


@pytest.mark.parametrize("rows", [1, 2, 5, 16, 32, 33, 64])
def test_same_product_and_restored(rows):
    torch.manual_seed(0)
    layer = nn.Linear(24, 40)
    x = torch.randn(1, rows, 24)
    ref = layer(x)
    with small_batch_linear(layer) as n:
        assert n.patched == 1 and "forward" in layer.__dict__
        y = layer(x)
    assert "forward" not in layer.__dict__ and not hasattr(layer, "_sbl_max_rows")
    assert y.shape == ref.shape and y.is_contiguous()
    torch.testing.assert_close(y, ref, atol=1e-5, rtol=1e-5)


def test_single_row_keeps_pytorch_kernel():
    """One row (plain decoding) runs PyTorch's own linear: bit-identical."""
    layer = nn.Linear(32, 48, bias=False)
    x = torch.randn(1, 1, 32)
    ref = layer(x)
    with small_batch_linear(layer):
        assert torch.equal(layer(x), ref)


def test_ineligible_layers_left_alone(tiny_gpt2):
    class Sub(nn.Linear):
        pass

    hooked = nn.Linear(4, 4)
    hooked._hf_hook = object()  # an accelerate-dispatched layer
    model = nn.Sequential(nn.Linear(4, 4), Sub(4, 4), nn.Linear(4, 4).double(), hooked)
    assert [eligible(m) for m in model] == [True, False, False, False]
    with small_batch_linear(model, model[0], None) as n:  # a layer reached twice is patched once
        assert n.patched == 1
    with small_batch_linear(tiny_gpt2) as n:  # GPT-2's blocks use Conv1D: only its lm_head is a Linear
        assert n.patched == 1 and "forward" in tiny_gpt2.lm_head.__dict__
    with small_batch_linear(model, enabled=False) as n:
        assert n.patched == 0 and "forward" not in model[0].__dict__


def test_restored_after_error():
    layer = nn.Linear(4, 4)
    with pytest.raises(RuntimeError), small_batch_linear(layer):
        raise RuntimeError("boom")
    assert "forward" not in layer.__dict__


def test_bad_arguments():
    with pytest.raises(ValueError, match="max_rows"), small_batch_linear(nn.Linear(2, 2), max_rows=1):
        pass
    with pytest.raises(ValueError, match="small_batch_linear"):
        SpeculativeDecoding(PromptLookupDrafter(), small_batch_linear="yes")


def test_engine_patches_during_decoding_only(tiny_llama):
    """The engine runs the target's linears patched while decoding, restores them after, and stays lossless."""
    prompt = torch.tensor([[5, 6, 7, 8, 5, 6, 7, 8, 5, 6]])
    ref = tiny_llama.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=24, do_sample=False)
    patched_during = []

    class Probe(PromptLookupDrafter):
        def propose(self, state):
            patched_during.append("forward" in state.model.lm_head.__dict__)
            return super().propose(state)

    for flag in (True, False):
        patched_during.clear()
        loop = SpeculativeDecoding(Probe(), small_batch_linear=flag)
        out = tiny_llama.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=24,
                                  do_sample=False, custom_generate=loop)
        assert torch.equal(out, ref)
        assert patched_during and all(p == flag for p in patched_during)
        assert not any("forward" in m.__dict__ for m in tiny_llama.modules())
