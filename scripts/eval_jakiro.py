"""Evaluate the Jakiro drafter against the EAGLE baseline trained at the same budget (600k positions, same data).

Writes ``results/jakiro_eval.json``:

- ``acceptance``: tokens per target forward and mean accepted length on interleaved benchmark prompts (12 x 64
  tokens) at pinned tree budgets (5 and 16 nodes), greedy (T=0, with a token-identity check against plain greedy)
  and T=1 (speculative sampling, seeds 0-2), for Jakiro, EAGLE, and Jakiro with coupled siblings / without the
  parallel last depth (ablations, T=0 at 16 nodes);
- ``siblings``: on held-out distillation positions (true features, depth 1), how often the target's token is among
  a node's k children (hit@k), how often rank 1 is right when rank 0 is wrong, and the share of identical top-1
  tokens between Jakiro's two experts.

Run through the training queue: ``python scripts/eval_jakiro.py [--head DIR] [--eagle DIR]``.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch

from hf_decoding_ext.bench.parity import greedy_references
from hf_decoding_ext.bench.prompts import interleaved_prompts
from hf_decoding_ext.core.models import load_model
from hf_decoding_ext.speculative import SpeculativeDecoding
from hf_decoding_ext.speculative.drafters.eagle import EagleDrafter
from hf_decoding_ext.speculative.drafters.jakiro import JakiroDrafter
from hf_decoding_ext.speculative.heads.eagle import EagleDrafterModel
from hf_decoding_ext.speculative.heads.jakiro import JakiroDrafterModel
from hf_decoding_ext.training.data import DistillData

ROOT = Path(__file__).resolve().parents[1]
SHIPPED = ROOT / "hf_decoding_ext" / "data" / "heads" / "smollm2-135m-instruct-jakiro"


def run(model, refs, make, max_new_tokens, do_sample, seed=None):
    per = []
    identical = True
    for row, enc, ref in refs:
        loop = SpeculativeDecoding(make(), seed=seed)
        if do_sample:
            torch.manual_seed(seed)
            out = model.generate(**enc, max_new_tokens=max_new_tokens, do_sample=True, temperature=1.0, top_k=0,
                                 top_p=1.0, custom_generate=loop)
        else:
            out = model.generate(**enc, max_new_tokens=max_new_tokens, do_sample=False, custom_generate=loop)
            identical &= bool(torch.equal(out, ref))
        s = loop.summary()
        per.append({"category": row.get("category"), "tpf": round(s["tokens_per_forward"], 4),
                    "accepted": round(s["mean_accepted"], 4), "steps": s["steps"]})
    tpf = [p["tpf"] for p in per]
    res = {"tokens_per_forward": round(statistics.mean(tpf), 4), "tpf_sd": round(statistics.pstdev(tpf), 4),
           "mean_accepted": round(statistics.mean(p["accepted"] for p in per), 4), "per_prompt": per}
    if not do_sample:
        res["token_identical"] = identical
    return res


@torch.no_grad()
def siblings(jakiro, eagle, data, k_values=(2, 3, 4), max_seqs=60):
    """Depth-1 sibling statistics on held-out positions with the target's true features."""
    stats = {name: {f"hit@{k}": [0, 0] for k in k_values} | {"rank1_given_rank0_miss": [0, 0]}
             for name in ("jakiro", "jakiro_coupled", "eagle")}
    agree = [0, 0]
    kmax = max(k_values)
    for s in data.heldout[:max_seqs]:
        ids = s.input_ids[None]
        hid = s.hidden[None].float()
        t = ids.shape[1]
        if t < 4:
            continue
        pos = torch.arange(t - 1)[None]
        target = s.labels[1:-1] if getattr(s, "labels", None) is not None else ids[0, 2:]
        start = max(s.response_start - 1, 0)
        cands = {}
        for name, head in (("jakiro", jakiro), ("eagle", eagle)):
            mask = head._causal_mask(torch.ones(1, t - 1, dtype=torch.bool))
            pred = head(hid[:, :-1].to(head.dtype), ids[:, 1:], pos, mask)[0, :-1]
            if name == "jakiro":
                experts = head.aux_out["experts"][0, :-1]
                cands["jakiro"] = head.to_target(head.decoupled_topk(pred[start:], experts[start:], kmax))
                cands["jakiro_coupled"] = head.to_target(head.logits_from(pred[start:]).topk(kmax, -1).indices)
                tops = head.logits_from(experts[start:]).argmax(-1)
                agree[0] += int((tops[:, 0] == tops[:, 1]).sum())
                agree[1] += tops.shape[0]
            else:
                cands["eagle"] = head.to_target(head.logits_from(pred[start:]).topk(kmax, -1).indices)
        tgt = target[start:]
        for name, c in cands.items():
            for k in k_values:
                hit = (c[:, :k] == tgt[:, None]).any(-1)
                stats[name][f"hit@{k}"][0] += int(hit.sum())
                stats[name][f"hit@{k}"][1] += hit.numel()
            miss0 = c[:, 0] != tgt
            stats[name]["rank1_given_rank0_miss"][0] += int((c[miss0, 1] == tgt[miss0]).sum())
            stats[name]["rank1_given_rank0_miss"][1] += int(miss0.sum())
    out = {name: {key: round(a / max(b, 1), 4) for key, (a, b) in d.items()} for name, d in stats.items()}
    out["positions"] = stats["eagle"]["hit@2"][1]
    out["jakiro_expert_top1_identical_share"] = round(agree[0] / max(agree[1], 1), 4)
    return out


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--head", default=str(SHIPPED if (SHIPPED / "config.json").exists() else "/work/distill/runs/jakiro"))
    ap.add_argument("--eagle", default="/work/distill/baselines/eagle-600k")
    ap.add_argument("--work-dir", default="/work/distill/work")
    ap.add_argument("--prompts", type=int, default=12)
    ap.add_argument("--max-new-tokens", type=int, default=64)
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--sibling-seqs", type=int, default=60)
    ap.add_argument("--out", default=str(ROOT / "results" / "jakiro_eval.json"))
    args = ap.parse_args()
    torch.set_num_threads(2)
    t0 = time.time()
    model, tok = load_model()
    jakiro = JakiroDrafterModel.from_pretrained(args.head).attach(model).eval()
    eagle = EagleDrafterModel.from_pretrained(args.eagle).attach(model).eval()
    rows = interleaved_prompts(args.prompts)
    refs = greedy_references(model, tok, rows, args.max_new_tokens)
    arms = {
        "jakiro": lambda n: (lambda: JakiroDrafter(jakiro, max_nodes=n)),
        "eagle": lambda n: (lambda: EagleDrafter(eagle, max_nodes=n)),
    }
    ablations = {
        "jakiro_coupled_siblings": lambda n: (lambda: JakiroDrafter(jakiro, max_nodes=n, decoupled=False)),
        "jakiro_no_parallel_depth": lambda n: (lambda: JakiroDrafter(jakiro, max_nodes=n, parallel_depths=0)),
    }
    acceptance = {}
    for n in (5, 16):
        for name, mk in arms.items():
            key = f"{name}@{n}"
            acceptance[key] = {"T0": run(model, refs, mk(n), args.max_new_tokens, False)}
            t1 = [run(model, refs, mk(n), args.max_new_tokens, True, seed) for seed in range(args.seeds)]
            acceptance[key]["T1"] = {"tokens_per_forward": round(statistics.mean(r["tokens_per_forward"] for r in t1), 4),
                                     "per_seed": [r["tokens_per_forward"] for r in t1],
                                     "mean_accepted": round(statistics.mean(r["mean_accepted"] for r in t1), 4)}
            print(key, acceptance[key]["T0"]["tokens_per_forward"], acceptance[key]["T1"]["per_seed"],
                  f"{time.time() - t0:.0f}s", flush=True)
    for name, mk in ablations.items():
        acceptance[f"{name}@16"] = {"T0": run(model, refs, mk(16), args.max_new_tokens, False)}
        print(name, acceptance[f"{name}@16"]["T0"]["tokens_per_forward"], flush=True)
    try:
        feats = sorted(Path(args.work_dir).glob("features-*.safetensors"))
        feats = [f for f in feats if ".layer" not in f.name and ".labels" not in f.name]
        data = DistillData(feats[0])
        sib = siblings(jakiro, eagle, data, max_seqs=args.sibling_seqs)
    except (OSError, IndexError, KeyError, ValueError) as err:  # the sibling statistics need the distillation cache
        sib = {"error": repr(err)}
    summary = {}
    for n in (5, 16):
        j, e = acceptance[f"jakiro@{n}"], acceptance[f"eagle@{n}"]
        summary[f"nodes{n}"] = {
            "T0_jakiro_minus_eagle": round(j["T0"]["tokens_per_forward"] - e["T0"]["tokens_per_forward"], 4),
            "T1_jakiro_minus_eagle": round(j["T1"]["tokens_per_forward"] - e["T1"]["tokens_per_forward"], 4),
            "T1_per_seed_jakiro_wins": sum(a > b for a, b in zip(j["T1"]["per_seed"], e["T1"]["per_seed"])),
            "lossless_T0": j["T0"]["token_identical"],
        }
    out = {
        "settings": {"prompts": args.prompts, "max_new_tokens": args.max_new_tokens, "seeds": args.seeds,
                     "tree_budgets": [5, 16], "temperature_T1": 1.0, "head": args.head, "eagle": args.eagle,
                     "jakiro_training": jakiro.config.training, "eagle_training": eagle.config.training,
                     "jakiro_heldout_top1": jakiro.config.head_accuracies and [round(a[0], 4) for a in jakiro.config.head_accuracies],
                     "eagle_heldout_top1": eagle.config.head_accuracies and [round(a[0], 4) for a in eagle.config.head_accuracies]},
        "acceptance": acceptance, "siblings": sib, "summary": summary, "seconds": round(time.time() - t0, 1),
    }
    Path(args.out).write_text(json.dumps(out, indent=1))
    print(json.dumps({"summary": summary, "siblings": sib}, indent=1))


if __name__ == "__main__":
    main()
