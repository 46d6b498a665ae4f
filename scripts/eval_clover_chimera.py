"""Properties of Clover and Chimera at an equal training budget (issue 23), against the Medusa / EAGLE baselines
trained on the same self-distillation data, held-out split, draft vocabulary (8192) and positions (600k).

1. Clover: held-out top-1 accuracy at depth >= 2 (teacher-forced, :func:`evaluate_head` at the end of training,
   stored in each checkpoint's ``config.head_accuracies``) against the Medusa baseline's.
2. Chimera: accepted length = tokens per target forward (greedy, token-identical to greedy generate()) on interleaved
   benchmark prompts (measurement only: never used for training or tuning), pinned tree budgets ``max_nodes`` 5 and
   16, against the EAGLE baseline; Clover and Medusa measured alike for reference.

Run through the training queue (one run, about 5-10 minutes on 2 CPU cores):

    python scripts/eval_clover_chimera.py   # -> results/clover_chimera_eval.json
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

ROOT = Path(__file__).resolve().parents[1]
HEADS = ROOT / "hf_decoding_ext" / "data" / "heads"


def _default(kind: str) -> str:
    shipped = HEADS / f"smollm2-135m-instruct-{kind}"
    return str(shipped if (shipped / "config.json").exists() else Path("/work/distill/runs") / kind)


def drafters():
    from hf_decoding_ext.speculative.drafters.chimera import ChimeraDrafter
    from hf_decoding_ext.speculative.drafters.clover import CloverDrafter
    from hf_decoding_ext.speculative.drafters.eagle import EagleDrafter
    from hf_decoding_ext.speculative.drafters.medusa import MedusaDrafter
    from hf_decoding_ext.speculative.heads.chimera import ChimeraModel
    from hf_decoding_ext.speculative.heads.clover import CloverModel
    from hf_decoding_ext.speculative.heads.eagle import EagleDrafterModel
    from hf_decoding_ext.speculative.heads.medusa import MedusaHeads

    return {"clover": (CloverModel, CloverDrafter), "chimera": (ChimeraModel, ChimeraDrafter),
            "medusa": (MedusaHeads, MedusaDrafter), "eagle": (EagleDrafterModel, EagleDrafter)}


def run(model, refs, make, max_new_tokens):
    per, identical = [], True
    for row, enc, ref in refs:
        loop = SpeculativeDecoding(make())
        out = model.generate(**enc, max_new_tokens=max_new_tokens, do_sample=False, custom_generate=loop)
        identical &= bool(torch.equal(out, ref))
        s = loop.summary()
        per.append({"id": row["id"], "category": row.get("category"), "tpf": round(s["tokens_per_forward"], 4),
                    "steps": s["steps"], "tokens": s["tokens"]})
    tpf = [p["tpf"] for p in per]
    return {"tokens_per_forward": round(sum(p["tokens"] for p in per) / sum(p["steps"] for p in per), 4),
            "tpf_mean": round(statistics.mean(tpf), 4), "tpf_sd": round(statistics.pstdev(tpf), 4),
            "token_identical": identical, "per_prompt": per}


def main():
    ap = argparse.ArgumentParser()
    for kind, default in (("clover", _default("clover")), ("chimera", _default("chimera")),
                          ("medusa", "/work/distill/baselines/medusa-600k"),
                          ("eagle", "/work/distill/baselines/eagle-600k")):
        ap.add_argument(f"--{kind}", default=default)
    ap.add_argument("--prompts", type=int, default=12)
    ap.add_argument("--max-new-tokens", type=int, default=64)
    ap.add_argument("--nodes", default="5,16")
    ap.add_argument("--out", default=str(ROOT / "results" / "clover_chimera_eval.json"))
    args = ap.parse_args()
    torch.set_num_threads(2)
    t0 = time.time()
    model, tok = load_model()
    classes = drafters()
    heads, record = {}, {}
    for kind, (head_cls, _) in classes.items():
        path = getattr(args, kind)
        heads[kind] = head_cls.from_pretrained(path).attach(model).eval()
        tr = heads[kind].config.training or {}
        record[kind] = {"path": path, "positions": tr.get("positions"), "steps": tr.get("steps"),
                        "train_seconds": tr.get("train_seconds"), "heldout_positions": tr.get("heldout_positions"),
                        "heldout_top1": [round(a[0], 4) for a in heads[kind].config.head_accuracies],
                        "own_parameters": heads[kind].num_own_parameters(),
                        "draft_vocab_size": heads[kind].config.draft_vocab_size}
    refs = greedy_references(model, tok, interleaved_prompts(args.prompts), args.max_new_tokens)
    nodes = [int(n) for n in args.nodes.split(",")]
    accepted = {}
    for n in nodes:
        accepted[str(n)] = {}
        for kind, (_, drafter_cls) in classes.items():
            accepted[str(n)][kind] = run(model, refs, lambda: drafter_cls(heads[kind], max_nodes=n),
                                         args.max_new_tokens)
            print(n, kind, accepted[str(n)][kind]["tokens_per_forward"], flush=True)

    def later(kind):
        acc = record[kind]["heldout_top1"]
        return round(statistics.mean(acc[1:4]), 4)

    tpf = {n: {k: v["tokens_per_forward"] for k, v in row.items()} for n, row in accepted.items()}
    summary = {
        "clover": {"depth2plus_top1_clover": record["clover"]["heldout_top1"][1:4],
                   "depth2plus_top1_medusa": record["medusa"]["heldout_top1"][1:4],
                   "mean_depth2_4_clover": later("clover"), "mean_depth2_4_medusa": later("medusa"),
                   "positions_clover": record["clover"]["positions"], "positions_medusa": record["medusa"]["positions"],
                   "reproduced": all(c > m for c, m in zip(record["clover"]["heldout_top1"][1:4],
                                                           record["medusa"]["heldout_top1"][1:4])),
                   "tokens_per_forward": {n: {"clover": v["clover"], "medusa": v["medusa"]} for n, v in tpf.items()}},
        "chimera": {"tokens_per_forward": {n: {"chimera": v["chimera"], "eagle": v["eagle"]} for n, v in tpf.items()},
                    "tpf_sd": {n: {k: accepted[n][k]["tpf_sd"] for k in ("chimera", "eagle")} for n in accepted},
                    "positions_chimera": record["chimera"]["positions"], "positions_eagle": record["eagle"]["positions"],
                    "heldout_top1_chimera": record["chimera"]["heldout_top1"],
                    "heldout_top1_eagle": record["eagle"]["heldout_top1"],
                    "reproduced": all(v["chimera"] > v["eagle"] for v in tpf.values())},
        "all_token_identical": all(r["token_identical"] for row in accepted.values() for r in row.values()),
    }
    out = {"settings": {"prompts": args.prompts, "max_new_tokens": args.max_new_tokens, "nodes": nodes,
                        "prompt_source": "interleaved_prompts (benchmark prompts, measurement only)",
                        "acceptance": "greedy", "threads": 2},
           "heads": record, "accepted": accepted, "summary": summary, "seconds": round(time.time() - t0, 1)}
    Path(args.out).write_text(json.dumps(out, indent=1) + "\n")
    print(json.dumps(summary, indent=1))


if __name__ == "__main__":
    main()
