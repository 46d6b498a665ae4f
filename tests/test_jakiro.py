"""Jakiro (arXiv 2502.06282): MoE drafter layer, decoupled siblings, hybrid (parallel last depth) drafting."""

import json
from pathlib import Path

import pytest
import torch

from hf_decoding_ext.speculative import SpeculativeDecoding
from hf_decoding_ext.speculative.drafters.jakiro import JakiroDrafter
from hf_decoding_ext.speculative.heads.jakiro import (
    PAPER_FIDELITY,
    JakiroConfig,
    JakiroDrafterModel,
    JakiroMoE,
)
from hf_decoding_ext.training.trainer import TrainConfig, evaluate_head, train_head

ROOT = Path(__file__).resolve().parents[1]
PROMPTS = [[1, 5, 9, 13], [1, 40, 41, 42, 43, 7], [1, 99]]


def tiny_jakiro(model, **options):
    """A randomly initialised Jakiro head for a tiny model (also used by ``TINY_COMPONENT_PARAMS``)."""
    torch.manual_seed(0)
    cfg = JakiroConfig(hidden_size=model.config.hidden_size, vocab_size=model.config.vocab_size,
                       **{"num_draft_tokens": 3, **options})
    cfg.from_base_config(model.config)
    return JakiroDrafterModel(cfg)


def _scrambled(model, **options):
    head = tiny_jakiro(model, **options)
    with torch.no_grad():  # random heads whose drafts are sometimes right, sometimes wrong
        for p in head.parameters():
            if p.dim() == 2:
                p.normal_(0, 0.3)
    return head


def test_moe_replaces_the_layer_mlp_and_streams_are_consistent(tiny_llama):
    head = tiny_jakiro(tiny_llama).attach(tiny_llama)
    moe = head.layers[0].mlp
    assert isinstance(moe, JakiroMoE) and len(moe.experts) == 2 and moe.gate.out_features == 4
    assert moe.experts[0].gate_proj.out_features == tiny_llama.config.hidden_size  # expert width = hidden (official)
    x = torch.randn(2, 5, tiny_llama.config.hidden_size)
    mixed = moe(x)
    aux = moe.aux
    w = torch.softmax(aux["router"].topk(2, -1).values, -1)
    assert torch.allclose(mixed, (w[..., None] * aux["experts"]).sum(-2), atol=1e-6)
    # contrastive stream: s * (v_a e_a - v_b e_b) with v from the router's extra pair of logits
    pair = moe.gate(x)[..., 2:]
    v = torch.softmax(pair, -1)
    s = torch.where(pair[..., 0] > pair[..., 1], 1.0, -1.0)[..., None]
    ref = s * (v[..., :1] * aux["experts"][..., 0, :] - v[..., 1:] * aux["experts"][..., 1, :])
    assert torch.allclose(aux["contrastive"], ref, atol=1e-6)
    # experts are in router order
    sel = aux["router"].argmax(-1)
    outs = torch.stack([e(x) for e in moe.experts], -2)
    assert torch.allclose(aux["experts"][..., 0, :], outs.gather(-2, sel[..., None, None].expand(2, 5, 1, 32))[..., 0, :])
    assert head.num_own_parameters() == sum(p.numel() for p in head.parameters())
    assert not any(p is tiny_llama.lm_head.weight or p is tiny_llama.model.embed_tokens.weight
                   for p in head.parameters())


def test_decoupled_siblings_come_from_different_experts(tiny_llama):
    head = tiny_jakiro(tiny_llama).attach(tiny_llama)
    torch.manual_seed(3)
    mixed, experts = torch.randn(6, 32), torch.randn(6, 2, 32)
    got = head.decoupled_topk(mixed, experts, 4)
    lm, le = head.logits_from(mixed), head.logits_from(experts)
    for r in range(6):
        row = got[r].tolist()
        assert len(set(row)) == 4
        assert row[0] == int(lm[r].argmax())
        e0 = [t for t in le[r, 0].topk(4).indices.tolist() if t != row[0]]
        assert row[1] == e0[0]  # rank 1 from the router's first expert
        e1 = [t for t in le[r, 1].topk(4).indices.tolist() if t not in row[:2]]
        assert row[2] == e1[0]  # rank 2 from the second expert


@pytest.mark.parametrize("parallel", [1, 0])
@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_greedy_is_token_identical(arch, parallel, tiny_llama, tiny_gpt2):
    model = tiny_llama if arch == "llama" else tiny_gpt2
    drafter = JakiroDrafter(_scrambled(model), max_nodes=8, parallel_depths=parallel)
    for ids in PROMPTS:
        x = torch.tensor([ids])
        ref = model.generate(x, max_new_tokens=20, do_sample=False)
        loop = SpeculativeDecoding(drafter)
        assert torch.equal(model.generate(x, max_new_tokens=20, do_sample=False, custom_generate=loop), ref)
        assert all(s.draft_size <= 8 for s in loop.last_stats)


def test_parallel_last_depth_uses_the_contrastive_feature(tiny_llama):
    """With the hybrid switch on, the last depth costs no drafter forward: the drafter cache grows by the fed nodes
    of depths 1..D-1 only, and the last depth's candidates are the contrastive feature's top-k."""
    head = _scrambled(tiny_llama).attach(tiny_llama)
    drafter = JakiroDrafter(head, tree_choices=[(0,), (1,), (0, 0), (0, 0, 0), (0, 0, 1)])
    loop = SpeculativeDecoding(drafter)
    tiny_llama.generate(torch.tensor([PROMPTS[0]]), max_new_tokens=6, do_sample=False, custom_generate=loop)
    assert drafter.fed and all(len(drafter.ancestors[n]) < 2 for n in drafter.fed)  # depth-3 parents never fed
    deep = [n for n, a in drafter.ancestors.items() if len(a) == 2]
    parent = drafter.ancestors[deep[0]][-1]
    grand = drafter.ancestors[parent][-1]
    with torch.inference_mode():
        want = head.to_target(head.logits_from(drafter.out_parallel[grand]).topk(2).indices).tolist()
    assert [drafter.token[n] for n in sorted(deep)] == want


def test_bad_arguments(tiny_llama):
    with pytest.raises(ValueError, match="num_experts"):
        JakiroConfig(num_experts=1)
    with pytest.raises(ValueError, match="experts_per_token"):
        JakiroConfig(num_experts=2, experts_per_token=3)
    with pytest.raises(ValueError, match="parallel_depths"):
        JakiroConfig(parallel_depths=2)
    with pytest.raises(ValueError, match="parallel_depths"):
        JakiroDrafter(tiny_jakiro(tiny_llama, contrastive=False), parallel_depths=1)


def test_smoke_training_improves_and_round_trips(tiny_distill_data, tmp_path):
    model, data = tiny_distill_data
    head = tiny_jakiro(model).attach(model)
    before = evaluate_head(head, data.heldout, topk=1)["top1"][0]
    cfg = TrainConfig(steps=40, batch_size=8, lr=1e-2, log_every=5, checkpoint_every=1000, tree_nodes=6)
    head = train_head(head, data, tmp_path / "j", cfg, progress=False)
    after = head.config.training["heldout_top1"][0]
    assert after > before + 0.05, (before, after)
    log = [json.loads(line) for line in (tmp_path / "j" / "train_log.jsonl").read_text().splitlines()]
    assert log[-1]["loss"] < log[0]["loss"]
    assert {"ce_experts", "balance", "ce_parallel", "reg_parallel"} <= set(log[-1])
    loaded = JakiroDrafterModel.from_pretrained(tmp_path / "j")
    skip = {"_name_or_path", "dtype", "torch_dtype", "transformers_version", "architectures"}
    a, b = loaded.config.to_dict(), head.config.to_dict()
    assert {k: v for k, v in a.items() if k not in skip} == {k: v for k, v in b.items() if k not in skip}
    assert a["num_experts"] == 2 and a["parallel_depths"] == 1 and a["contrastive"] is True
    for (n, a), (_, b) in zip(head.state_dict().items(), loaded.state_dict().items()):
        assert torch.equal(a, b), n
    drafter = JakiroDrafter(loaded, max_nodes=None)
    s = data.heldout[0]
    x = s.input_ids[: s.response_start][None]
    ref = model.generate(x, max_new_tokens=16, do_sample=False)
    loop = SpeculativeDecoding(drafter)
    assert torch.equal(model.generate(x, max_new_tokens=16, do_sample=False, custom_generate=loop), ref)
    assert loop.summary()["mean_accepted"] > 0


def test_fidelity_list_reaches_the_docs():
    import hf_decoding_ext.speculative.heads.jakiro as module

    assert {v for _, v, _, _ in PAPER_FIDELITY} == {"follows", "own reading"}
    for name, *_ in PAPER_FIDELITY:
        assert name in module.__doc__ and name in JakiroDrafterModel.card_sections()


@pytest.mark.slow
def test_sampling_is_exact_in_distribution():
    """T=1: the engine's speculative-sampling acceptance of Jakiro's deterministic decoupled tree keeps the target's
    exact distribution over 2 tokens (chi-square against the enumerated joint)."""
    from tests.test_speculative_engine import (
        _chi_square_pvalue,
        _exact_sequence_distribution,
        _peaky_tiny_llama,
        _sample_counts,
    )

    target = _peaky_tiny_llama(seed=4, vocab=6)
    prompt = [1, 2, 3, 1, 2]
    exact = _exact_sequence_distribution(target, prompt, length=2, vocab=6)
    loop = SpeculativeDecoding(JakiroDrafter(_scrambled(target), max_nodes=4))
    n = 1500
    counts = _sample_counts(target, prompt, 2, n, loop)
    assert _chi_square_pvalue(counts, exact, n) > 1e-3


def test_committed_eval_matches_the_registry():
    """The committed run of scripts/eval_jakiro.py decides the registry's verdict."""
    from hf_decoding_ext.registry import get_method

    path = ROOT / "results" / "jakiro_eval.json"
    spec = get_method("jakiro")
    res = json.loads(path.read_text())
    assert res["settings"]["prompts"] >= 12 and res["settings"]["tree_budgets"] == [5, 16]
    assert all(v["lossless_T0"] for v in res["summary"].values())
    wins = all(v["T0_jakiro_minus_eagle"] > 0 and v["T1_jakiro_minus_eagle"] > 0 for v in res["summary"].values())
    assert spec.effect == ("reproduced" if wins else "not reproduced") and "results/jakiro_eval.json" in spec.effect_note
