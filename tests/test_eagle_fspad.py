"""EAGLE / FSPAD on tiny random models: the ablation arms switch FSPAD's components off exactly (plain EAGLE fusion,
plain EAGLE loss), the paper-fidelity list covers every component, and the registry note and model card report the
committed ablation (``results/eagle_fspad_ablation.json``)."""

from __future__ import annotations

import json
from pathlib import Path

import torch
import torch.nn.functional as F

from hf_decoding_ext.speculative.heads.eagle import (
    ABLATION_ARMS,
    FSPAD_COMPONENTS,
    PAPER_FIDELITY,
    EagleDrafterConfig,
    EagleDrafterModel,
    fidelity_markdown,
)

ROOT = Path(__file__).resolve().parents[1]


def _drafter(model, arm: str, **kw) -> EagleDrafterModel:
    torch.manual_seed(0)
    cfg = EagleDrafterConfig(hidden_size=model.config.hidden_size, vocab_size=model.config.vocab_size,
                             num_draft_tokens=3, **ABLATION_ARMS[arm], **kw)
    cfg.from_base_config(model.config)
    drafter = EagleDrafterModel(cfg).attach(model)
    with torch.no_grad():  # trained-looking weights: FSPAD's zero-initialised parts become non-zero
        for p in drafter.parameters():
            p.add_(torch.randn_like(p) * 0.2)
    return drafter.eval()


def _batch(model, b=3, t=9, seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, model.config.vocab_size, (b, t), generator=g)
    with torch.no_grad():
        hid = model(ids, output_hidden_states=True).hidden_states[-1]
    valid = torch.ones(b, t, dtype=torch.bool)
    valid[1, 6:] = False
    resp = torch.zeros(b, t, dtype=torch.bool)
    resp[:, 3:] = True
    return {"input_ids": ids, "hidden": hid.to(torch.float16), "valid": valid, "response": resp & valid,
            "labels": None}


def test_ablation_arms_differ_only_in_fspad_components():
    """The two arms set exactly FSPAD's options, EAGLE's arm all off; on top of the shipped recipe (as the ablation
    script runs them) every other head option is shared."""
    from hf_decoding_ext.training.pipeline import recipe_options

    assert set(FSPAD_COMPONENTS) == {"feature_sampling", "partial_alignment"}
    assert ABLATION_ARMS["eagle"] == {name: False for name in FSPAD_COMPONENTS}
    assert ABLATION_ARMS["fspad"] == {name: True for name in FSPAD_COMPONENTS}
    shipped = recipe_options("eagle", "shipped")["head_options"]
    cfgs = {arm: EagleDrafterConfig(hidden_size=8, vocab_size=16, **{**shipped, **opts}).to_dict()
            for arm, opts in ABLATION_ARMS.items()}
    differ = {k for k in cfgs["eagle"] if cfgs["eagle"][k] != cfgs["fspad"][k]}
    assert differ == set(FSPAD_COMPONENTS)
    # the shipped head is the FSPAD arm
    shipped_cfg = EagleDrafterConfig(hidden_size=8, vocab_size=16, **shipped)
    assert all(getattr(shipped_cfg, name) for name in FSPAD_COMPONENTS)


def test_plain_eagle_fusion_has_no_feature_sampling(tiny_llama):
    """feature_sampling=False: no sampler weights and the fused input is EAGLE's fc(concat(embedding, feature))
    exactly; the FSPAD arm's (trained) sampler changes it."""
    eagle, fspad = _drafter(tiny_llama, "eagle"), _drafter(tiny_llama, "fspad")
    assert not any(n.startswith("fs_") for n, _ in eagle.named_parameters())
    assert {n.split(".")[0] for n, _ in fspad.named_parameters() if n.startswith("fs_")} == {
        "fs_feature", "fs_embed", "fs_out"}
    g = torch.Generator().manual_seed(1)
    h = tiny_llama.config.hidden_size
    feats, embeds = torch.randn(2, 5, h, generator=g), torch.randn(2, 5, h, generator=g)
    with torch.no_grad():
        assert torch.equal(eagle.fuse(feats, embeds), eagle.fc(torch.cat([embeds, feats], -1)))
        plain = fspad.fc(torch.cat([embeds, feats], -1))
        assert (fspad.fuse(feats, embeds) - plain).abs().max() > 1e-3  # negative control


def test_plain_eagle_loss_has_no_partial_alignment(tiny_llama):
    """partial_alignment=False: no adapter; the training loss is EAGLE's Smooth-L1(f^, f) + w * CE(lm_head(f^))
    recomputed by hand. With the FSPAD arm the same hand formula misses its adapter and differs, while routing the
    logits through the adapter recovers its loss."""
    batch = _batch(tiny_llama)
    for arm in ("eagle", "fspad"):
        d = _drafter(tiny_llama, arm, feature_noise=0.0, cls_weight=0.3)
        assert hasattr(d, "logit_adapter") == (arm == "fspad")
        t2d = d.target_to_draft()
        with torch.no_grad():
            loss, _ = d.training_loss(batch, t2d)
            pred = d._teacher_forced(batch, noise=False)
            hid, valid, resp, ids = batch["hidden"].float(), batch["valid"], batch["response"], batch["input_ids"]
            mask = (valid & resp)[:, 1:]
            reg = (F.smooth_l1_loss(pred, hid[:, 1:], reduction="none").mean(-1) * mask).sum() / mask.sum()
            tmask = (valid & resp)[:, 2:]
            tgt = torch.where(tmask, t2d[ids[:, 2:]], torch.full_like(ids[:, 2:], -100)).reshape(-1)

            def hand(logits, reg=reg, tgt=tgt):
                return reg + 0.3 * F.cross_entropy(logits.reshape(-1, logits.shape[-1]), tgt, ignore_index=-100)

            plain = hand(d.draft_logits(pred[:, :-1]))
        if arm == "eagle":
            torch.testing.assert_close(loss, plain)
        else:
            assert (loss - plain).abs() > 1e-4  # the partial-alignment adapter is in the FSPAD loss
            with torch.no_grad():
                torch.testing.assert_close(loss, hand(d.draft_logits(d.logit_adapter(pred[:, :-1]))))


def test_fidelity_list_covers_every_component_and_reaches_the_docs():
    names = [name for name, *_ in PAPER_FIDELITY]
    assert len(set(names)) == len(names)
    assert {v for _, v, _, _ in PAPER_FIDELITY} == {"follows", "own reading"}
    for required in ("feature + token fusion", "one decoder layer", "token loss", "draft tree", "training data",
                     "FSPAD feature sampling", "FSPAD partial alignment"):
        assert any(n.startswith(required) for n in names), required
    assert all(len(source) > 20 and len(ours) > 20 for _, _, source, ours in PAPER_FIDELITY)
    text = fidelity_markdown()
    assert text.index("Follows the papers") < text.index("This library's reading")
    import hf_decoding_ext.speculative.heads.eagle as module

    assert text in module.__doc__
    card = (ROOT / "model_cards" / "smollm2-135m-instruct-eagle-fspad.md").read_text()
    assert text in card


# ---------------------------------------------------------------------------------------------- committed ablation
def _ablation():
    path = ROOT / "results" / "eagle_fspad_ablation.json"
    assert path.exists(), "results/eagle_fspad_ablation.json is committed (scripts/ablate_eagle_fspad.py writes it)"
    return json.loads(path.read_text())


def test_committed_ablation_compares_the_arms_at_the_same_budget():
    res = _ablation()
    arms = res["arms"]
    assert set(arms) == {"eagle", "fspad"}
    for arm, figures in arms.items():
        assert {k: figures["head_options"][k] for k in FSPAD_COMPONENTS} == ABLATION_ARMS[arm]
        assert len(figures["heldout_top1"]) == len(figures["heldout_top3"]) == figures["head_options"]["num_draft_tokens"]
        assert all(t1 <= t3 for t1, t3 in zip(figures["heldout_top1"], figures["heldout_top3"]))
    shared = {k: v for k, v in arms["eagle"]["head_options"].items() if k not in FSPAD_COMPONENTS + ("fs_expansion",)}
    assert shared == {k: v for k, v in arms["fspad"]["head_options"].items() if k in shared}
    assert arms["eagle"]["heldout_positions"] == arms["fspad"]["heldout_positions"]  # same held-out data
    diff = res["fspad_minus_eagle"]
    assert diff["top1"] == [round(a - b, 4) for a, b in zip(arms["fspad"]["heldout_top1"], arms["eagle"]["heldout_top1"])]


def test_registry_note_and_card_report_the_ablation():
    from hf_decoding_ext.registry import get_method

    res = _ablation()
    f, e = res["arms"]["fspad"], res["arms"]["eagle"]
    note = get_method("eagle-fspad").effect_note
    assert "results/eagle_fspad_ablation.json" in note
    assert f"depth-1 top-1 {f['heldout_top1'][0]:.3f} vs {e['heldout_top1'][0]:.3f}" in note
    helped = f["expected_accepted_chain"] > e["expected_accepted_chain"]
    assert ("FSPAD's components helped" if helped else "FSPAD's components did not help") in note
    assert f"{f['expected_accepted_chain']:.2f} vs {e['expected_accepted_chain']:.2f}" in note
    card = (ROOT / "model_cards" / "smollm2-135m-instruct-eagle-fspad.md").read_text()
    assert "## Ablation: plain EAGLE vs EAGLE + FSPAD" in card
    for arm in (f, e):
        assert f"{arm['heldout_top1'][0]:.3f}" in card and f"{arm['heldout_top3'][-1]:.3f}" in card
