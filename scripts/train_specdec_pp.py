"""SpecDec++ (arXiv 2405.19715): train the acceptance prediction head of the shipped distilled draft, measure the draft
lengths it picks, ship it.

    python scripts/train_specdec_pp.py --wait 2400 --ship --sweep

Stages (the data stage is cached in ``--work``, a rerun reuses it):

1. data: the committed Direct-Alignment distillation responses (``results/direct_alignment/responses-{greedy,
   sampled}.jsonl.gz``, the target's own responses; every 10th prompt in id order held out with both of its
   responses, as ``scripts/train_direct_alignment.py`` does); ``--train-sequences`` of the training responses are
   used (evenly spaced); acceptance labels and draft features as the official data generation
   (:func:`~hf_decoding_ext.speculative.heads.specdec_pp.acceptance_dataset`);
2. training of the head (:func:`~hf_decoding_ext.speculative.heads.specdec_pp.train_acceptance_head`), held-out AUC
   logged and compared with the draft's own probability of its token as a predictor;
3. ``--sweep``: on ``--sweep-prompts`` held-out prompts, the fixed draft lengths K = 1..6 and SpecDec++ over
   thresholds (greedy, and T = 1 with ``--sweep-sample``): drafted, accepted and rejected tokens, verification
   rounds; stored in the head's config (``training["sweep"]``) and in the model card;
4. ``--ship``: the head (float16 safetensors + config.json) to ``hf_decoding_ext/data/specdec_pp_head/`` and the
   model card ``model_cards/specdec_pp_head.md``.

``--wait S`` polls up to S seconds for the distilled draft (``hf_decoding_ext/data/draft_model/``) when
``--assistant distilled`` (the default). Progress goes to stdout and ``<work>/train.log``.
"""

from __future__ import annotations

import argparse
import gzip
import json
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
THRESHOLDS = {1: (0.3, 0.5, 0.7, 0.9, 0.95, 0.98), 2: (0.3, 0.9)}
"""Thresholds swept per lower bound K_min (upper bound 20). The head's predictions sit well below the acceptance
rate (the rejection class weighs 6 in the loss), so the interesting thresholds are high."""


def load_rows(folder: Path) -> tuple[list[dict], list[dict]]:
    """(train, held-out) response rows, ids suffixed ``#greedy`` / ``#sampled``; every 10th prompt held out."""
    rows = []
    for kind in ("greedy", "sampled"):
        with gzip.open(folder / f"responses-{kind}.jsonl.gz", "rt") as f:
            for line in f:
                if line.strip():
                    r = json.loads(line)
                    rows.append({**r, "id": f"{r['id']}#{kind}"})
    rows = [r for r in rows if r["response_ids"]]
    ordered = sorted({r["id"].split("#")[0] for r in rows})
    held = set(ordered[9::10])
    train = sorted((r for r in rows if r["id"].split("#")[0] not in held), key=lambda r: r["id"])
    heldout = sorted((r for r in rows if r["id"].split("#")[0] in held), key=lambda r: r["id"])
    return train, heldout


def evenly(rows: list, n: int | None) -> list:
    if n is None or n >= len(rows):
        return list(rows)
    step = len(rows) / n
    return [rows[int(i * step)] for i in range(n)]


def run_config(model, drafter, prompts: list[list[int]], max_new_tokens: int, do_sample: bool, seed: int) -> dict:
    """Drafted, accepted, rejected tokens and verification rounds of ``drafter`` over ``prompts``."""
    from hf_decoding_ext.speculative import SpeculativeDecoding

    loop = SpeculativeDecoding(drafter, seed=seed, kernels="pytorch")
    drafted = accepted = rounds = generated = 0
    drafts = []
    propose = drafter.propose

    def spy(state):
        d = propose(state)
        drafts.append(d)
        return d
    drafter.propose = spy
    scores, own, events = [], [], []  # per verified draft token: predicted acceptance, draft probability, accepted
    for ids in prompts:
        drafts.clear()
        x = torch.tensor([ids])
        kwargs = {"do_sample": True, "top_k": 0, "top_p": 1.0, "temperature": 1.0} if do_sample else {
            "do_sample": False}
        if do_sample:
            torch.manual_seed(seed)
        out = model.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=max_new_tokens,
                             custom_generate=loop, pad_token_id=model.generation_config.eos_token_id, **kwargs)
        generated += out.shape[1] - x.shape[1]
        for s, d in zip(loop.last_stats, drafts):
            drafted += s.draft_size
            accepted += s.accepted
            rounds += 1
            acc = d.info.get("acceptance", [])
            probs = d.tree.draft_probs
            for k, a in enumerate(acc[: s.accepted + 1]):  # the tokens verification reached
                if k >= len(d.tree):
                    break
                scores.append(a)
                own.append(float(probs[k, d.tree.tokens[k]]) if probs is not None else float("nan"))
                events.append(float(k < s.accepted))
    rejected = drafted - accepted
    return {"drafted": drafted, "accepted": accepted, "rejected": rejected, "rounds": rounds,
            "generated": generated, "rejected_per_accepted": rejected / max(1, accepted),
            "accepted_per_round": accepted / max(1, rounds), "tokens_per_round": generated / max(1, rounds),
            "drafted_per_round": drafted / max(1, rounds), "scored": (scores, own, events)}


def sweep(model, draft, head, prompts, max_new_tokens: int, do_sample: bool, log, seeds=(0,)) -> dict:
    from hf_decoding_ext.speculative.drafters.draft_model import DraftModelDrafter
    from hf_decoding_ext.speculative.drafters.specdec_pp import SpecDecPPDrafter

    def total(make):
        from hf_decoding_ext.speculative.heads.specdec_pp import soft_auc

        parts = [run_config(model, make(), prompts, max_new_tokens, do_sample, s) for s in seeds]
        keys = ("drafted", "accepted", "rejected", "rounds", "generated")
        out = {k: sum(p[k] for p in parts) for k in keys}
        scores = [x for p in parts for x in p["scored"][0]]
        if scores:  # the head's AUC on the draft tokens verification reached (accepted or the first rejected)
            own = torch.tensor([x for p in parts for x in p["scored"][1]])
            events = torch.tensor([x for p in parts for x in p["scored"][2]])
            out["verified_tokens"] = len(scores)
            out["head_auc_in_decoding"] = soft_auc(torch.tensor(scores), events)
            if not own.isnan().any():
                out["draft_prob_auc_in_decoding"] = soft_auc(own, events)
        out.update(rejected_per_accepted=out["rejected"] / max(1, out["accepted"]),
                   accepted_per_round=out["accepted"] / max(1, out["rounds"]),
                   tokens_per_round=out["generated"] / max(1, out["rounds"]),
                   drafted_per_round=out["drafted"] / max(1, out["rounds"]))
        return out

    result = {"mode": "sample T=1" if do_sample else "greedy", "prompts": len(prompts),
              "max_new_tokens": max_new_tokens, "seeds": list(seeds) if do_sample else None, "fixed": {},
              "specdec_pp": {}}
    for k in range(1, 7):
        r = total(lambda k=k: DraftModelDrafter(draft, num_tokens=k, confidence_threshold=0.0, schedule="constant"))
        result["fixed"][str(k)] = r
        log(f"[{result['mode']}] fixed K={k}: rejected/accepted {r['rejected_per_accepted']:.3f}, accepted/round "
            f"{r['accepted_per_round']:.3f}, tokens/round {r['tokens_per_round']:.3f}")
    for min_tokens, thresholds in THRESHOLDS.items():
        for h in thresholds:
            r = total(lambda h=h, m=min_tokens: SpecDecPPDrafter(draft, head=head, threshold=h, min_tokens=m,
                                                                  max_tokens=20))
            result["specdec_pp"][f"h={h},K=[{min_tokens},20]"] = r
            log(f"[{result['mode']}] SpecDec++ h={h} bounds [{min_tokens}, 20]: rejected/accepted "
                f"{r['rejected_per_accepted']:.3f}, accepted/round {r['accepted_per_round']:.3f}, tokens/round "
                f"{r['tokens_per_round']:.3f}, drafted/round {r['drafted_per_round']:.2f}, head AUC in decoding "
                f"{r.get('head_auc_in_decoding', float('nan')):.3f} (draft probability "
                f"{r.get('draft_prob_auc_in_decoding', float('nan')):.3f})")
    r = total(lambda: SpecDecPPDrafter(draft, head=head, threshold=0.3, min_tokens=2, max_tokens=20,
                                       count_last=False))
    result["specdec_pp"]["h=0.3,K=[2,20],official-loop"] = r
    log(f"[{result['mode']}] SpecDec++ official loop h=0.3 [2, 20]: rejected/accepted "
        f"{r['rejected_per_accepted']:.3f}, accepted/round {r['accepted_per_round']:.3f}")
    return result


def sweep_table(result: dict) -> str:
    lines = [f"{result['mode']}, {result['prompts']} held-out prompts x {result['max_new_tokens']} new tokens"
             + (f", seeds {result['seeds']}" if result.get("seeds") else "") + ":", "",
             "| drafter | rejected / accepted | accepted / round | tokens / round | drafted / round | head AUC in "
             "decoding |", "|---|---|---|---|---|---|"]
    for k, r in result["fixed"].items():
        lines.append(f"| fixed K={k} | {r['rejected_per_accepted']:.3f} | {r['accepted_per_round']:.3f} | "
                     f"{r['tokens_per_round']:.3f} | {r['drafted_per_round']:.2f} | |")
    for name, r in result["specdec_pp"].items():
        auc = f"{r['head_auc_in_decoding']:.3f} ({r['verified_tokens']} tokens)" if "head_auc_in_decoding" in r else ""
        lines.append(f"| SpecDec++ {name} | {r['rejected_per_accepted']:.3f} | {r['accepted_per_round']:.3f} | "
                     f"{r['tokens_per_round']:.3f} | {r['drafted_per_round']:.2f} | {auc} |")
    return "\n".join(lines) + "\n"


def effect_summary(result: dict) -> str:
    """One sentence: the fewest rejected draft tokens per accepted token of the fixed lengths and of SpecDec++, and
    where SpecDec++ stands against the fixed-length frontier (linear between neighbouring K) at its accepted tokens
    per round."""
    points = [(int(k), r) for k, r in result["fixed"].items()]
    # the Pareto frontier of the fixed lengths (more accepted per round, fewer rejected per accepted)
    fixed = sorted(((k, r) for k, r in points if not any(
        o["accepted_per_round"] >= r["accepted_per_round"] and o["rejected_per_accepted"] <= r["rejected_per_accepted"]
        and o is not r and (o["accepted_per_round"], o["rejected_per_accepted"]) != (
            r["accepted_per_round"], r["rejected_per_accepted"]) for _, o in points)),
        key=lambda kr: kr[1]["accepted_per_round"])
    best_k, best_f = min(result["fixed"].items(), key=lambda kr: kr[1]["rejected_per_accepted"])
    name, best_s = min(result["specdec_pp"].items(), key=lambda kr: kr[1]["rejected_per_accepted"])
    below = []
    for n, r in result["specdec_pp"].items():
        x = r["accepted_per_round"]
        for (_, a), (_, b) in zip(fixed, fixed[1:]):
            if a["accepted_per_round"] <= x <= b["accepted_per_round"] and b["accepted_per_round"] > a[
                    "accepted_per_round"]:
                t = (x - a["accepted_per_round"]) / (b["accepted_per_round"] - a["accepted_per_round"])
                frontier = a["rejected_per_accepted"] + t * (b["rejected_per_accepted"] - a["rejected_per_accepted"])
                if r["rejected_per_accepted"] < frontier * (1 - 1e-6):
                    below.append(f"{n} ({r['rejected_per_accepted']:.3f} vs {frontier:.3f})")
                break
    text = (f"{result['mode']}: fewest rejected per accepted, fixed K={best_k} {best_f['rejected_per_accepted']:.3f}, "
            f"SpecDec++ {name} {best_s['rejected_per_accepted']:.3f} "
            f"({'fewer' if best_s['rejected_per_accepted'] < best_f['rejected_per_accepted'] else 'not fewer'}); ")
    text += ("below the fixed-K Pareto frontier at the same accepted tokens per round: " + ", ".join(below)
             if below else "no SpecDec++ setting below the fixed-K Pareto frontier at the same accepted tokens per "
             "round")
    return text + "."


def model_card(cfg: dict, assistant: str) -> str:
    t = cfg.get("training", {})
    held = t.get("heldout", {})
    data = t.get("data", {})
    sweeps = t.get("sweep", [])
    text = f"""---
license: apache-2.0
library_name: hf-decoding-ext
base_model: HuggingFaceTB/SmolLM2-135M-Instruct
tags:
- speculative-decoding
- specdec++
---

# specdec_pp_head

SpecDec++ acceptance prediction head (Huang, Guo, Wang, "SpecDec++: Boosting Speculative Decoding via Adaptive
Candidate Lengths", COLM 2025, arXiv [2405.19715](https://arxiv.org/abs/2405.19715)) for the target
**SmolLM2-135M-Instruct** and the library's distilled 4-layer draft (Direct Alignment, arXiv 2403.00858,
`hf_decoding_ext/data/draft_model/`, assistant `{assistant}`). The head reads the draft's last hidden state (after its
final norm) at a drafted token and predicts the probability that speculative sampling accepts it, `min(1, p/q)`;
`SpecDecPPDrafter` stops drafting once `1 - prod a_i > threshold`. Verification is unchanged (lossless).

## Usage
```python
from hf_decoding_ext.core.models import load_model, encode_prompts
from hf_decoding_ext.speculative import SpeculativeDecoding
from hf_decoding_ext.speculative.drafters.specdec_pp import SpecDecPPDrafter

model, tokenizer = load_model()
inputs = encode_prompts(tokenizer, "Explain what a hash table is.")
drafter = SpecDecPPDrafter.for_model(model)  # distilled draft + this head, threshold 0.3, bounds [2, 20]
out = model.generate(**inputs, max_new_tokens=128, do_sample=True,
                     custom_generate=SpeculativeDecoding(drafter))
```

## Head
{cfg['num_layers']} residual blocks `x + SiLU(Wx + b)` (hidden size {cfg['hidden_size']}) and a 2-way linear layer,
{t.get('parameters', 0) / 1e6:.2f} M parameters, float16 safetensors.

## Training data
The committed Direct-Alignment distillation responses (`results/direct_alignment/responses-{{greedy,sampled}}.jsonl.gz`:
the target's own greedy and T=1 responses to 360 distillation prompts, never the benchmark prompts); every 10th prompt
(in id order) held out with both of its responses. {data.get('train_sequences')} training sequences (evenly spaced among
the {data.get('train_available')} training responses), {data.get('heldout_sequences')} held-out sequences, at most
{data.get('max_length')} tokens each. As the official data generation: at every response position the draft samples a
token from its distribution after the target's prefix, labelled with its acceptance probability `min(1, p/q)` (a soft
label); the training sequence takes the target's token with probability {cfg['mixing_ratio']} (mixing ratio) and the
draft's otherwise, and the head is trained on the draft-token positions. {t.get('positions')} training positions (mean
label {t.get('mean_label', float('nan')):.3f}).

## Training
Weighted soft-label BCE (rejection class weight {cfg['weight_mismatch']}), AdamW lr {t.get('lr')}, batch
{t.get('batch_size')} positions, {t.get('epochs')} epochs = {t.get('steps')} steps (warmup {t.get('warmup_ratio')},
cosine), {t.get('seconds')} s on CPU for the head (the data stage: {data.get('seconds')} s).
Command: `python scripts/train_specdec_pp.py {data.get('command', '')}`.

## Held-out
AUC of the predicted acceptance against the soft labels (the expected AUC over the acceptance events):
**{held.get('auc', float('nan')):.4f}** over {held.get('positions')} held-out positions (the draft's own probability of its
token as a predictor: {data.get('heldout_draft_prob_auc', float('nan')):.4f}); weighted BCE {held.get('loss', float('nan')):.4f},
binary KL {held.get('kl', float('nan')):.4f}, mean prediction {held.get('mean_prediction', float('nan')):.3f} vs mean
label {held.get('mean_label', float('nan')):.3f}: the rejection weight pulls the predictions down (the weighted loss is
minimised by `y / (y + w (1 - y))` for a label `y`), so the useful thresholds are higher than the paper's 0.3.
"""
    if sweeps:
        text += ("\n## Draft lengths (held-out prompts)\nRejected draft tokens per accepted token, accepted draft "
                 "tokens per verification round (target forward), tokens per round (accepted + the target's own "
                 "token), drafted tokens per round, and the head's AUC on the draft tokens verification reached (accepted, or the "
                 "first rejected one of a draft) while decoding; `scripts/train_specdec_pp.py --sweep`.\n\n")
        for s in sweeps:
            text += sweep_table(s) + "\n"
        text += "\n".join(f"- {effect_summary(s)}" for s in sweeps) + "\n"
    text += """
## Deviations from the paper
- the `num_layers` residual blocks have their own weights (the official code repeats one block instance);
- the head trains on the frozen draft's features computed once, on shuffled positions, in float32 (official: the
  Hugging Face Trainer over whole sequences, bf16, GPU);
- training uses a few hundred responses of a 135M target and its distilled 4-layer draft (the paper: Alpaca with
  Llama-2-chat 7B / 70B).
"""
    return text


def main(argv=None) -> int:
    from hf_decoding_ext.core.models import cache_dir, load_model
    from hf_decoding_ext.speculative.drafters.draft_model import DraftModelDrafter
    from hf_decoding_ext.speculative.heads import specdec_pp as SP

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--assistant", default="distilled", help="draft model: 'distilled', 'self:N' or a path")
    ap.add_argument("--responses", default=str(ROOT / "results" / "direct_alignment"))
    ap.add_argument("--train-sequences", type=int, default=200)
    ap.add_argument("--heldout-sequences", type=int, default=None, help="default: all held-out responses")
    ap.add_argument("--max-length", type=int, default=256)
    ap.add_argument("--num-layers", type=int, default=3)
    ap.add_argument("--weight-mismatch", type=float, default=6.0)
    ap.add_argument("--mixing-ratio", type=float, default=0.15)
    ap.add_argument("--epochs", type=int, default=12)
    ap.add_argument("--batch-size", type=int, default=256)
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--wait", type=float, default=0.0, help="seconds to poll for the distilled draft")
    ap.add_argument("--work", default=None)
    ap.add_argument("--sweep", action="store_true")
    ap.add_argument("--sweep-sample", action="store_true", help="also sweep at T=1 (sampling)")
    ap.add_argument("--sweep-prompts", type=int, default=6)
    ap.add_argument("--sweep-tokens", type=int, default=48)
    ap.add_argument("--head", default=None, help="skip training: sweep/ship the head saved at this folder")
    ap.add_argument("--ship", action="store_true")
    ap.add_argument("--card-only", action="store_true",
                    help="only rewrite model_cards/specdec_pp_head.md from the shipped head's config")
    args = ap.parse_args(argv)
    if args.card_only:
        cfg = json.loads((ROOT / "hf_decoding_ext" / "data" / "specdec_pp_head" / "config.json").read_text())
        (ROOT / "model_cards" / "specdec_pp_head.md").write_text(model_card(cfg, args.assistant))
        return 0
    torch.set_num_threads(args.threads)
    work = Path(args.work) if args.work else cache_dir() / "specdec_pp"
    work.mkdir(parents=True, exist_ok=True)
    logf = open(work / "train.log", "a")

    def log(msg: str) -> None:
        line = f"{time.strftime('%H:%M:%S')} {msg}"
        print(line, flush=True)
        logf.write(line + "\n")
        logf.flush()

    from hf_decoding_ext.speculative.drafters.direct_alignment import shipped_draft_path

    if args.assistant == "distilled":
        deadline = time.time() + args.wait
        while not (shipped_draft_path() / "model.safetensors").exists():
            if time.time() >= deadline:
                log(f"no distilled draft at {shipped_draft_path()}")
                return 1
            log("waiting for the distilled draft ...")
            time.sleep(60)
        time.sleep(5)  # let the writer finish
    model, _ = load_model()
    draft = DraftModelDrafter.load_assistant(model, args.assistant)
    train_all, held_all = load_rows(Path(args.responses))
    train = evenly(train_all, args.train_sequences)
    heldout = evenly(held_all, args.heldout_sequences)
    log(f"{len(train)} of {len(train_all)} training responses, {len(heldout)} of {len(held_all)} held-out; draft "
        f"{args.assistant}")
    stamp = ""
    if args.assistant == "distilled":
        stamp = f"-{int((shipped_draft_path() / 'model.safetensors').stat().st_mtime)}"
    tag = f"{args.assistant.replace(':', '_').replace('/', '_')}{stamp}-n{len(train)}-h{len(heldout)}" \
          f"-L{args.max_length}-r{args.mixing_ratio}-s{args.seed}"
    t0 = time.perf_counter()
    data_path, held_path = work / f"data-{tag}.pt", work / f"heldout-{tag}.pt"
    if data_path.exists() and held_path.exists():
        data, held = torch.load(data_path), torch.load(held_path)
    else:
        data = SP.acceptance_dataset(model, draft, train, mixing_ratio=args.mixing_ratio, seed=args.seed,
                                     max_length=args.max_length, log=log)
        held = SP.acceptance_dataset(model, draft, heldout, mixing_ratio=args.mixing_ratio, seed=args.seed + 1,
                                     max_length=args.max_length, log=log)
        data["seconds"] = round(time.perf_counter() - t0, 1)  # the data stage's time, kept with the cache
        torch.save(data, data_path)
        torch.save(held, held_path)
    data_seconds = data.get("seconds")
    log(f"data: {len(data['labels'])} training positions, {len(held['labels'])} held-out ({data_seconds} s)")
    baseline = SP.soft_auc(held["draft_prob"], held["labels"])
    log(f"held-out AUC of the draft's own probability of its token: {baseline:.4f}")
    if args.head:
        head = SP.load_shipped_head(args.head)
    else:
        head = SP.train_acceptance_head(model, draft, train, num_layers=args.num_layers,
                                        weight_mismatch=args.weight_mismatch, mixing_ratio=args.mixing_ratio,
                                        epochs=args.epochs, batch_size=args.batch_size, lr=args.lr, seed=args.seed,
                                        data=data, heldout_data=held, log=log,
                                        eval_every=max(1, len(data["labels"]) // args.batch_size))
    cfg = head.config
    cfg.base_model_name_or_path = "HuggingFaceTB/SmolLM2-135M-Instruct"
    cfg.draft_model = ("hf_decoding_ext/data/draft_model (Direct Alignment, 4 layers)"
                       if args.assistant == "distilled" else args.assistant)
    training = dict(cfg.training)
    training["parameters"] = sum(p.numel() for p in head.parameters())
    training["data"] = training.get("data") if args.head and training.get("data") else {
                        "responses": "results/direct_alignment/responses-{greedy,sampled}.jsonl.gz",
                        "train_available": len(train_all), "train_sequences": len(train),
                        "heldout_sequences": len(heldout), "max_length": args.max_length, "seconds": data_seconds,
                        "heldout_draft_prob_auc": baseline,
                        "command": " ".join(argv if argv is not None else __import__("sys").argv[1:])}
    if args.sweep:
        prompts = []
        seen = set()
        for r in held_all:
            key = r["id"].split("#")[0]
            if key not in seen:
                seen.add(key)
                prompts.append(r["prompt_ids"])
        prompts = evenly(prompts, args.sweep_prompts)
        sweeps = [sweep(model, draft, head, prompts, args.sweep_tokens, False, log)]
        if args.sweep_sample:
            sweeps.append(sweep(model, draft, head, prompts, args.sweep_tokens, True, log, seeds=(0, 1)))
        training["sweep"] = sweeps
    cfg.training = training
    out = work / f"head-{tag}"
    head.save_pretrained(str(out))
    (work / f"summary-{tag}.json").write_text(json.dumps(training, indent=1) + "\n")
    log(f"saved to {out}")
    if args.ship:
        dest = ROOT / "hf_decoding_ext" / "data" / "specdec_pp_head"
        head.half().save_pretrained(str(dest))
        head.float()
        (ROOT / "model_cards").mkdir(exist_ok=True)
        (ROOT / "model_cards" / "specdec_pp_head.md").write_text(model_card(cfg.to_dict(), args.assistant))
        log(f"shipped to {dest} and model_cards/specdec_pp_head.md")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
