"""Online Speculative Decoding (arXiv 2310.07177) on tiny models (+ the committed results)."""

import json
from pathlib import Path

import pytest
import torch

from hf_decoding_ext.speculative import SpeculativeDecoding
from hf_decoding_ext.speculative.drafters.direct_alignment import init_draft
from hf_decoding_ext.speculative.drafters.online_speculative import (
    OnlineDistillationBuffer,
    OnlineSpeculativeDrafter,
    distillation_loss,
)

RESULTS = Path(__file__).resolve().parents[1] / "results" / "online_speculative_eval.json"


def _stream(n):
    return [torch.tensor([[3 + i % 7, 4, 5 + i % 3, 6, 7]]) for i in range(n)]


def test_arguments_are_validated(tiny_llama):
    draft = init_draft(tiny_llama, 1)
    for bad in (dict(update_interval=0), dict(buffer_size=-1), dict(loss="kl"), dict(lr=0),
                dict(positions="some"), dict(steps=True)):
        with pytest.raises(ValueError):
            OnlineSpeculativeDrafter(draft, **bad)
    with pytest.raises(ValueError, match="own draft"):
        OnlineSpeculativeDrafter(None)
    with pytest.raises(ValueError, match="capacity"):
        OnlineDistillationBuffer(0)


def test_buffer_holds_the_targets_distributions_at_the_rejected_positions(tiny_llama):
    drafter = OnlineSpeculativeDrafter(init_draft(tiny_llama, 1), num_tokens=3, update_interval=100)
    loop = SpeculativeDecoding(drafter)
    ids = torch.tensor([[3, 4, 5, 6, 7]])
    with torch.inference_mode():
        out = tiny_llama.generate(ids, max_new_tokens=12, do_sample=False, pad_token_id=0, custom_generate=loop)
    drafter.buffer.finish_query()
    (q,) = drafter.buffer.queries
    assert torch.equal(q["ids"], out[0])
    rejected = sum(1 for s in loop.last_stats if s.accepted < s.draft_size)
    assert q["positions"].numel() == rejected > 0
    with torch.no_grad():
        full = torch.log_softmax(tiny_llama(out).logits[0].float(), -1)
    torch.testing.assert_close(q["logprobs"].float(), full[q["positions"]], atol=2e-3, rtol=1e-3)
    # the draft disagreed with the target's argmax at every recorded position
    with torch.no_grad():
        d = drafter.assistant_model(out).logits[0].argmax(-1)
    assert (d[q["positions"]] != full[q["positions"]].argmax(-1)).all()


def test_updates_change_the_draft_raise_agreement_stay_lossless_and_reset_restores(tiny_llama):
    target_head = tiny_llama.get_output_embeddings().weight.detach().clone()
    target_layer = next(iter(tiny_llama.model.layers[0].parameters())).detach().clone()
    drafter = OnlineSpeculativeDrafter(init_draft(tiny_llama, 1), num_tokens=3, lr=1e-3, steps=2, positions="all")
    assert drafter.assistant_model.get_output_embeddings().weight.data_ptr() == \
        tiny_llama.get_output_embeddings().weight.data_ptr()  # the head is shared, not copied
    loop = SpeculativeDecoding(drafter)
    initial = [p.detach().clone() for p in drafter.params]
    outs = []
    for ids in _stream(12):
        ref = tiny_llama.generate(ids, max_new_tokens=10, do_sample=False, pad_token_id=0)
        out = tiny_llama.generate(ids, max_new_tokens=10, do_sample=False, pad_token_id=0, custom_generate=loop)
        assert torch.equal(out, ref)
        outs.append(out)
    assert drafter.num_updates == 11 and drafter.queries == 12
    assert any(not torch.equal(a, b) for a, b in zip(initial, drafter.params))
    served = torch.cat(outs[:6])

    def divergence(draft):  # KL(target || draft) on served queries
        with torch.no_grad():
            return float(distillation_loss("fkl", draft(served).logits.reshape(-1, 128),
                                           torch.log_softmax(tiny_llama(served).logits, -1).reshape(-1, 128)))

    assert divergence(drafter.assistant_model) < 0.6 * divergence(init_draft(tiny_llama, 1))
    # the target is never trained
    assert torch.equal(tiny_llama.get_output_embeddings().weight, target_head)
    assert torch.equal(next(iter(tiny_llama.model.layers[0].parameters())), target_layer)
    drafter.reset()
    assert all(torch.equal(a, b) for a, b in zip(initial, drafter.params))
    assert drafter.num_updates == 0 and len(drafter.buffer) == 0


def test_lossless_on_gpt2_across_updates(tiny_gpt2):
    drafter = OnlineSpeculativeDrafter.for_model(tiny_gpt2, assistant="self:1", lr=1e-3, loss="jsd",
                                                positions="all")
    loop = SpeculativeDecoding(drafter)
    for ids in _stream(4):
        ref = tiny_gpt2.generate(ids, max_new_tokens=10, do_sample=False, pad_token_id=0)
        out = tiny_gpt2.generate(ids, max_new_tokens=10, do_sample=False, pad_token_id=0, custom_generate=loop)
        assert torch.equal(out, ref)
    assert drafter.num_updates == 3


@pytest.mark.parametrize("loss", ["fkl", "rkl", "jsd", "tvd"])
def test_losses_vanish_at_equality(loss):
    torch.manual_seed(0)
    x = torch.randn(3, 11)
    assert float(distillation_loss(loss, x, torch.log_softmax(x, -1))) == pytest.approx(0, abs=1e-5)
    assert float(distillation_loss(loss, x, torch.log_softmax(torch.randn(3, 11), -1))) > 0


def test_committed_results_are_lossless():
    data = json.loads(RESULTS.read_text())
    for key, s in data["summary"].items():
        a, b = s["identical_to_greedy"].split("/")
        assert a == b, key
