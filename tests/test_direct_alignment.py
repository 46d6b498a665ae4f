"""Direct Alignment of Draft Model (arXiv 2403.00858): the draft's initialisation, the TVD++ / TVD / forward-KL
objectives against their definitions, resumable training on a tiny model, and the safetensors round trip."""

from __future__ import annotations

import json

import pytest
import torch

from hf_decoding_ext.speculative.drafters import direct_alignment as DA


def test_init_draft_shares_the_head_copies_the_layers_and_leaves_the_target_alone(tiny_llama):
    before = {k: v.clone() for k, v in tiny_llama.state_dict().items()}
    draft = DA.init_draft(tiny_llama, 1)
    assert draft.get_input_embeddings().weight.data_ptr() == tiny_llama.get_input_embeddings().weight.data_ptr()
    own = DA.trainable_parameters(draft)
    assert own and all(p.requires_grad for p in own)
    assert not draft.get_input_embeddings().weight.requires_grad
    target_ids = {id(p) for p in tiny_llama.parameters()}
    assert not any(id(p) in target_ids for p in own)  # the layers are copies
    ids = torch.tensor([[3, 4, 5, 6]])
    from hf_decoding_ext.core.models import truncated_model

    torch.testing.assert_close(draft(ids).logits, truncated_model(tiny_llama, 1)(ids).logits)
    with torch.no_grad():
        own[0].add_(1.0)
    assert all(torch.equal(v, tiny_llama.state_dict()[k]) for k, v in before.items())


def test_expected_acceptance_and_tvd_match_their_definitions():
    torch.manual_seed(0)
    a, b = torch.randn(5, 11), torch.randn(5, 11)
    p, q = a.softmax(-1), b.softmax(-1)
    torch.testing.assert_close(DA.expected_acceptance(b, a), 1 - 0.5 * (p - q).abs().sum(-1))
    torch.testing.assert_close(DA.tvd_loss(b, a), (0.5 * (p - q).abs().sum(-1)).mean())
    kl = (p * (p.log() - q.log())).sum(-1).mean()
    torch.testing.assert_close(DA.forward_kl_loss(b, a), kl)
    assert float(DA.tvd_loss(a, a)) == pytest.approx(0, abs=1e-6)


def test_tvd_plus_plus_is_a_policy_gradient_of_tvd():
    """Unnormalised, the sampled surrogate's expected gradient is the exact TVD gradient; normalised (TVD++) it
    points the same way; a mutant with the reward flipped points the other way."""
    torch.manual_seed(0)
    target = torch.randn(3, 7)
    logits = torch.randn(3, 7, requires_grad=True)
    exact = torch.autograd.grad(DA.tvd_loss(logits, target) * 3, logits)[0]  # summed over the 3 positions
    g = torch.Generator().manual_seed(1)
    est = torch.autograd.grad(DA.tvd_plus_plus_loss(logits, target, samples=200_000, normalise=False,
                                                    generator=g) * 3, logits)[0]
    # -E[r grad log q] = grad(-sum min(p, q)) = grad TVD
    torch.testing.assert_close(est, exact, atol=3e-3, rtol=0.05)
    pp = torch.autograd.grad(DA.tvd_plus_plus_loss(logits, target, samples=50_000, generator=g), logits)[0]
    cos = torch.nn.functional.cosine_similarity(pp.flatten(), exact.flatten(), dim=0)
    assert cos > 0.95
    # mutant (negative control): the reward flipped to 1[q > p]
    logq = torch.log_softmax(logits, -1)
    q, p = logq.detach().exp(), target.softmax(-1)
    x = torch.multinomial(q, 50_000, replacement=True, generator=g)
    r = (q.gather(-1, x) > p.gather(-1, x)).float()
    mutant = torch.autograd.grad(-(((r - r.mean()) / r.std()) * logq.gather(-1, x)).mean(), logits)[0]
    assert torch.nn.functional.cosine_similarity(mutant.flatten(), exact.flatten(), dim=0) < 0
    with pytest.raises(ValueError, match="samples"):
        DA.tvd_plus_plus_loss(logits, target, samples=0)
    with pytest.raises(ValueError, match="loss"):
        DA.alignment_loss("kl", logits, target)


def _rows(n=12, seed=0):
    g = torch.Generator().manual_seed(seed)
    rows = []
    for i in range(n):
        prompt = torch.randint(3, 128, (int(torch.randint(3, 6, (1,), generator=g)),), generator=g).tolist()
        resp = torch.randint(3, 128, (int(torch.randint(4, 9, (1,), generator=g)),), generator=g).tolist()
        rows.append({"id": f"r{i:02d}", "prompt_ids": prompt, "response_ids": resp})
    return rows


@pytest.mark.parametrize("loss", DA.LOSSES)
def test_training_raises_acceptance_resumes_and_round_trips(tiny_llama, tmp_path, loss):
    rows = _rows()
    before = DA.evaluate_alignment(DA.init_draft(tiny_llama, 1), tiny_llama, rows)["expected_acceptance"]
    kwargs = dict(num_layers=1, loss=loss, batch_size=4, lr=3e-3, warmup=2, checkpoint_every=5, progress=False)
    full = DA.train_direct_alignment(tiny_llama, rows, tmp_path / "full", steps=40, heldout=rows, **kwargs)
    after = DA.evaluate_alignment(full, tiny_llama, rows)["expected_acceptance"]
    assert 1 - after < 0.7 * (1 - before), (before, after)  # TVD to the target down by more than 30%
    # an interrupted run resumes from its checkpoint and ends where the uninterrupted one did (same data order)
    torch.manual_seed(0)
    DA.train_direct_alignment(tiny_llama, rows, tmp_path / "cut", steps=40, stop_after=10, **kwargs)
    assert not (tmp_path / "cut" / "model.safetensors").exists()
    state = json.loads((tmp_path / "cut" / "checkpoint" / "state.json").read_text())
    assert state["step"] == 10
    # the resumed run reproduces the full one (TVD++ draws from one seeded stream per step)
    resumed = DA.train_direct_alignment(tiny_llama, rows, tmp_path / "cut", steps=40, **kwargs)
    for a, b in zip(DA.trainable_parameters(resumed), DA.trainable_parameters(full)):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)
    loaded = DA.load_draft(tiny_llama, tmp_path / "full")
    ids = torch.tensor([[3, 4, 5, 6, 7]])
    torch.testing.assert_close(loaded(ids).logits, full(ids).logits)
    cfg = json.loads((tmp_path / "full" / "config.json").read_text())
    assert cfg["training"]["loss"] == loss and "heldout" in cfg
    from safetensors.torch import load_file

    names = set(load_file(str(tmp_path / "full" / "model.safetensors")))
    assert names and not any("embed" in n or "lm_head" in n for n in names)  # the shared tensors are not stored


def test_load_refuses_a_draft_for_another_model(tiny_llama, tiny_gpt2, tmp_path):
    DA.save_draft(DA.init_draft(tiny_llama, 1), tmp_path)
    cfg = json.loads((tmp_path / "config.json").read_text())
    cfg["hidden_size"] = 64
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="hidden_size"):
        DA.load_draft(tiny_llama, tmp_path)
    with pytest.raises(ValueError, match="steps"):
        DA.train_direct_alignment(tiny_llama, _rows(), tmp_path / "x", steps=0)


def test_distilled_assistant_drafts_losslessly(tiny_llama, tmp_path):
    """A saved draft serves as the draft-model assistant ('distilled:PATH'): greedy output equals plain greedy."""
    from hf_decoding_ext.speculative import SpeculativeDecoding
    from hf_decoding_ext.speculative.drafters.draft_model import DraftModelDrafter

    DA.train_direct_alignment(tiny_llama, _rows(), tmp_path, num_layers=1, steps=3, batch_size=4, progress=False)
    drafter = DraftModelDrafter.for_model(tiny_llama, assistant=f"distilled:{tmp_path}", num_tokens=3)
    ids = torch.tensor([[3, 4, 5, 6, 7]])
    ref = tiny_llama.generate(ids, max_new_tokens=12, do_sample=False, pad_token_id=0)
    out = tiny_llama.generate(ids, max_new_tokens=12, do_sample=False, pad_token_id=0,
                              custom_generate=SpeculativeDecoding(drafter))
    assert torch.equal(out, ref)
    with pytest.raises(ValueError, match="no distilled draft"):
        DA.load_shipped_draft(tiny_llama, tmp_path / "missing")


def test_export_standalone_loads_with_from_pretrained(tiny_llama, tmp_path):
    """The exported draft is an ordinary checkpoint (safetensors, no pickle) with the same logits, loadable with
    ``from_pretrained`` alone; the target is untouched."""
    from transformers import AutoModelForCausalLM

    draft = DA.init_draft(tiny_llama, 1)
    with torch.no_grad():
        for p in DA.trainable_parameters(draft):
            p.add_(0.01 * torch.randn_like(p))
    DA.export_standalone(draft, tmp_path / "standalone")
    assert (tmp_path / "standalone" / "model.safetensors").exists()
    assert not list((tmp_path / "standalone").glob("*.bin"))
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "standalone")
    ids = torch.tensor([[3, 4, 5, 6, 7]])
    torch.testing.assert_close(loaded(ids).logits, draft(ids).logits)
    assert loaded.config.num_hidden_layers == 1
    assert not torch.allclose(draft(ids).logits, tiny_llama(ids).logits)


def test_direct_alignment_drafter_is_the_draft_model_drafter_with_the_shipped_draft(tiny_llama, tmp_path):
    from hf_decoding_ext.speculative.drafters.direct_alignment import DirectAlignmentDrafter

    DA.save_draft(DA.init_draft(tiny_llama, 1), tmp_path)
    drafter = DirectAlignmentDrafter.for_model(tiny_llama, assistant=f"distilled:{tmp_path}")
    assert isinstance(drafter, DirectAlignmentDrafter)
    assert drafter.assistant_model.config.num_hidden_layers == 1


@pytest.mark.real_model
def test_shipped_draft_accepts_more_than_the_untrained_truncation_real_model(smollm):
    """The recipe's effect on the default model: on the target's greedy responses to benchmark prompts (never seen
    in distillation), the shipped distilled draft's expected acceptance ``sum min(p, q)`` is well above that of
    the same 4 layers untrained (``self:4``), and it is a real draft: its greedy drafts get accepted."""
    from hf_decoding_ext.bench.prompts import interleaved_prompts
    from hf_decoding_ext.bench.speed import encode_prompt

    model, tokenizer = smollm
    shipped = DA.load_shipped_draft(model)
    rows = []
    for row in interleaved_prompts(4):
        enc = encode_prompt(row, tokenizer)
        out = model.generate(**enc, max_new_tokens=48, do_sample=False)
        n = enc["input_ids"].shape[1]
        rows.append({"prompt_ids": out[0, :n].tolist(), "response_ids": out[0, n:].tolist()})
    trained = DA.evaluate_alignment(shipped, model, rows)["expected_acceptance"]
    untrained = DA.evaluate_alignment(DA.init_draft(model, 4), model, rows)["expected_acceptance"]
    print(f"expected acceptance on benchmark-prompt responses: distilled {trained:.3f}, untrained {untrained:.3f}")
    assert trained > untrained + 0.05, (trained, untrained)
