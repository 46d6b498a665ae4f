"""The trainable early-exit head (EESD's early-exiting layer, arXiv 2406.03853; also used by FREE):

- initialised from base layer ``N`` it is exactly the plain early exit after ``N + 1`` layers, with and without its
  own KV cache (incremental decoding equals the cache-free forward);
- the save/load round trip is exact (safetensors, the borrowed LM head not stored; with ``own_lm_head`` it is);
- self-distillation reduces the KL to the full model's next-token distribution on held-out sequences (tiny model),
  and the shipped SmolLM2 head is closer to the full model than the plain and the untrained exits on held-out
  distillation prompts (real model).
"""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from hf_decoding_ext.speculative.heads.exit_head import (
    ExitHead,
    ExitHeadConfig,
    distill_features,
    distill_kl,
    plain_exit_kl,
    shipped_exit_head_path,
    train_exit_head,
)


def _ids(model, n=11, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(1, model.config.vocab_size, (1, n), generator=g)


def test_untrained_head_is_the_early_exit_after_n_plus_one_layers(tiny_llama):
    head = ExitHead.from_base(tiny_llama, exit_layer=1)  # extra layer = a copy of base layer 1
    ids = _ids(tiny_llama)
    with torch.no_grad():
        out = tiny_llama(ids, output_hidden_states=True)
        full = head(out.hidden_states[1])
        # extra layer = base layer 1, the last: the exit after N + 1 = 2 layers is the model itself
        assert torch.allclose(full.logits, out.logits.float(), atol=1e-5)
        other = ExitHead.from_base(tiny_llama, exit_layer=1, init_from_layer=0)
        assert not torch.allclose(other(out.hidden_states[1]).logits, out.logits.float(), atol=1e-3)
        # incremental with the head's own cache == cache-free
        a = head(out.hidden_states[1][:, :6])
        b = head(out.hidden_states[1][:, 6:], cache=a.cache)
        assert b.cache.get_seq_length() == ids.shape[1]
        assert torch.allclose(b.logits, full.logits[:, 6:], atol=1e-5)
        last = head(out.hidden_states[1], logits_to_keep=1, use_cache=False)
        assert last.cache is None and last.logits.shape == (1, 1, tiny_llama.config.vocab_size)
    assert head.num_own_parameters() == sum(p.numel() for p in tiny_llama.model.layers[1].parameters()) + 32


def test_save_load_round_trip_is_exact(tiny_llama, tmp_path):
    head = ExitHead.from_base(tiny_llama, exit_layer=1, init_from_layer=0)
    with torch.no_grad():
        for p in head.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    head.save_pretrained(tmp_path / "h")
    stored = load_file(str(tmp_path / "h" / "model.safetensors"))
    assert not any("lm_head" in k for k in stored)  # the base LM head is borrowed, not stored
    cfg = json.loads((tmp_path / "h" / "config.json").read_text())
    assert cfg["exit_layer"] == 1 and cfg["init_from_layer"] == 0
    loaded = ExitHead.from_pretrained(str(tmp_path / "h")).attach(tiny_llama)
    for (n1, p1), (n2, p2) in zip(head.state_dict().items(), loaded.state_dict().items()):
        assert n1 == n2 and torch.equal(p1, p2), n1
    h = tiny_llama(_ids(tiny_llama), output_hidden_states=True).hidden_states[1]
    assert torch.equal(head(h).logits, loaded(h).logits)
    # own LM head: trained copy stored and restored
    own = ExitHead.from_base(tiny_llama, exit_layer=1, own_lm_head=True)
    with torch.no_grad():
        own.lm_head.weight.add_(1.0)
    own.save_pretrained(tmp_path / "o")
    back = ExitHead.from_pretrained(str(tmp_path / "o")).attach(tiny_llama)
    assert torch.equal(back.lm_head.weight, own.lm_head.weight)
    assert not torch.equal(back.lm_head.weight, tiny_llama.lm_head.weight)


def test_arguments_are_validated(tiny_llama):
    with pytest.raises(ValueError, match="exit_layer"):
        ExitHead.from_base(tiny_llama, exit_layer=2)  # the model has 2 layers
    with pytest.raises(ValueError, match="exit_layer"):
        ExitHeadConfig(exit_layer=0)
    head = ExitHead.from_base(tiny_llama, exit_layer=1)
    with pytest.raises(ValueError, match="logits_to_keep"):
        head(torch.zeros(1, 2, 32), logits_to_keep=-1)
    with pytest.raises(ValueError, match="batch, seq, hidden"):
        head(torch.zeros(2, 32))
    with pytest.raises(RuntimeError, match="attach"):
        ExitHead(head.config)(torch.zeros(1, 2, 32))


def test_self_distillation_reduces_heldout_kl(tiny_llama):
    torch.manual_seed(0)
    model = tiny_llama
    # the model's own sampled continuations (the tiny model's "generations")
    prompts = [_ids(model, 4, seed=s) for s in range(24)]
    seqs = [model.generate(p, attention_mask=torch.ones_like(p), do_sample=True, max_new_tokens=28,
                           pad_token_id=0)[0].tolist() for p in prompts]
    feats = distill_features(model, seqs, exit_layer=1, progress=False)
    off = feats["offsets"].tolist()

    def part(ix):
        out = {k: torch.cat([feats[k][off[i]:off[i + 1]] for i in ix]) for k in ("input_ids", "hidden_in",
                                                                                 "hidden_out")}
        out["offsets"] = torch.tensor([0] + [off[i + 1] - off[i] for i in ix]).cumsum(0)
        return out

    train, heldout = part(range(20)), part(range(20, 24))
    head = ExitHead.from_base(model, exit_layer=1, init_from_layer=0)  # not the last layer: an imperfect exit
    before = distill_kl(head, heldout)
    stats = train_exit_head(head, train, steps=40, batch_size=4, lr=3e-3, warmup=5, progress=False)
    after = distill_kl(head, heldout)
    assert stats["steps"] == 40 and stats["last_loss"] < stats["first_loss"]
    assert after["kl"] < 0.8 * before["kl"], (before, after)
    plain = plain_exit_kl(model, heldout, 1)
    assert plain["positions"] == before["positions"] and plain["kl"] > 0
    with pytest.raises(ValueError, match="steps"):
        train_exit_head(head, train, steps=0)


@pytest.mark.real_model
def test_shipped_head_is_closer_to_the_full_model_on_heldout_prompts_real_model(smollm):
    from hf_decoding_ext.bench.prompts import CATEGORIES, load_distill_prompts
    from hf_decoding_ext.training.data import _chat_ids

    model, tokenizer = smollm
    path = shipped_exit_head_path()
    if not (path / "model.safetensors").exists():
        pytest.fail(f"the shipped exit head is missing at {path}")
    head = ExitHead.from_pretrained(str(path)).attach(model)
    n = head.exit_layer
    record = head.config.training
    assert record["heldout_trained"]["kl"] < record["heldout_untrained"]["kl"]
    # distillation prompts far past those the training run reached (round-robin from the start of each category)
    rows = [load_distill_prompts(categories=[c])[-1 - i] for c in CATEGORIES for i in range(1)]
    seqs = [_chat_ids(tokenizer, r["prompt"])[:64] for r in rows]
    feats = distill_features(model, seqs, n, progress=False)
    trained = distill_kl(head, feats)
    untrained = distill_kl(ExitHead.from_base(model, exit_layer=n), feats)
    plain = plain_exit_kl(model, feats, n)
    assert trained["kl"] < untrained["kl"] and trained["kl"] < plain["kl"], (trained, untrained, plain)
    assert trained["agreement"] > plain["agreement"]
