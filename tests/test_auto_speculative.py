"""The merged best-available accelerator (``auto-speculative``): prompt lookup + token recycling in one tree."""

import pytest
import torch

from hf_decoding_ext.speculative import SpeculativeDecoding
from hf_decoding_ext.speculative.drafters.auto_speculative import GAINS_NAME, AutoSpeculativeDrafter
from hf_decoding_ext.speculative.drafters.prompt_lookup import PromptLookupDrafter
from hf_decoding_ext.speculative.drafters.token_recycling import TokenRecyclingDrafter
from hf_decoding_ext.speculative.policies.tree_policy import VerifyCostCurve, node_budget
from hf_decoding_ext.speculative.policies.tuning import shipped_gains
from hf_decoding_ext.core.models import encode_prompts


def test_arguments_are_validated():
    with pytest.raises(ValueError, match="-3"):
        AutoSpeculativeDrafter(max_nodes=-3)
    with pytest.raises(ValueError, match="0"):
        AutoSpeculativeDrafter(num_tokens=0)
    d = AutoSpeculativeDrafter(max_nodes=7)
    assert [type(x) for x in d.drafters] == [PromptLookupDrafter, TokenRecyclingDrafter]
    assert d.drafters[0].num_tokens == 16 and d.drafters[1].max_nodes is None


def test_auto_size_is_the_budget_of_the_measured_curve_and_the_merged_gains(tiny_llama, monkeypatch):
    """``max_nodes="auto"`` resolves, at begin(), to node_budget(device curve, the shipped merged gains)."""
    from hf_decoding_ext.speculative.policies import tuning

    gains = shipped_gains(GAINS_NAME)
    assert gains is not None and len(gains) > 16
    curve = VerifyCostCurve([1, 4, 8, 16, 32], [1.0, 1.0, 1.3, 2.0, 4.0])
    monkeypatch.setattr(tuning, "device_curve", lambda model, kernels="auto": curve)
    d = AutoSpeculativeDrafter()
    loop = SpeculativeDecoding(d, kernels="pytorch")
    ids = torch.tensor([[1, 2, 3, 1, 2, 3, 1, 2]])
    tiny_llama.generate(ids, max_new_tokens=4, do_sample=False, custom_generate=loop)
    assert d._cap == node_budget(curve, gains) and 1 <= d._cap < len(gains)


def test_lossless_on_tiny_model(tiny_llama):
    ids = torch.tensor([[5, 6, 7, 8, 5, 6, 7, 8, 5, 6]])
    ref = tiny_llama.generate(ids, max_new_tokens=24, do_sample=False)
    loop = SpeculativeDecoding(AutoSpeculativeDrafter(max_nodes=6), kernels="pytorch")
    out = tiny_llama.generate(ids, max_new_tokens=24, do_sample=False, custom_generate=loop)
    assert torch.equal(out, ref)


@pytest.mark.real_model
def test_merged_tree_accepts_more_than_either_drafter_on_real_model(smollm):
    """Lossless, and the merged whole tree commits more tokens per forward than either drafter's whole tree."""
    from hf_decoding_ext.bench.prompts import load_prompts

    model, tokenizer = smollm
    rows = load_prompts(categories=["summarization", "qa"], per_category=1)
    encs = [encode_prompts(tokenizer, row["prompt"]) for row in rows]
    refs = [model.generate(**enc, max_new_tokens=48, do_sample=False) for enc in encs]
    per_forward = {}
    for name, drafter in (("merged", AutoSpeculativeDrafter(max_nodes=None)),
                          ("pld", PromptLookupDrafter(num_tokens=16)),
                          ("tr", TokenRecyclingDrafter(max_nodes=None))):
        loop = SpeculativeDecoding(drafter)
        tokens = forwards = 0
        for row, enc, ref in zip(rows, encs, refs):
            out = model.generate(**enc, max_new_tokens=48, do_sample=False, custom_generate=loop)
            assert torch.equal(out, ref), (name, row["id"])
            s = loop.summary()
            tokens, forwards = tokens + s["tokens"], forwards + s["steps"]
        per_forward[name] = tokens / forwards
    assert per_forward["merged"] > max(per_forward["pld"], per_forward["tr"]), per_forward
