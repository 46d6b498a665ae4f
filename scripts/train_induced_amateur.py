"""Train, evaluate and save the hallucination-induced amateur shipped for LOL/ICD (SmolLM2-135M-Instruct).

Steps: load the default model; fine-tune its top K decoder layers on the false answers of
``hf_decoding_ext/data/contrastive/hallucination_train.jsonl``; save the trained layers (half precision) to a
temporary folder and load them back exactly as users will; measure top-1 accuracy on the held-out factual
multiple-choice set (``factual_mc.jsonl``, length-normalised log-likelihood) for the original model, the amateur and
(optionally) LOL's fused contrast; write the checkpoint and the figures to ``--out``
(default: ``hf_decoding_ext/data/induced_amateur``).

Usage:
    nohup python scripts/train_induced_amateur.py > /tmp/induced.log 2>&1 &
"""

from __future__ import annotations

import argparse
import platform
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from hf_decoding_ext.bench.tasks.contrastive import evaluate_multiple_choice, load_factual_mc, model_scorer  # noqa: E402
from hf_decoding_ext.contrastive.induced_amateur import (  # noqa: E402
    DEFAULT_BASE_MODEL, load_hallucination_data, load_induced_amateur, save_induced_amateur, train_induced_amateur)
from hf_decoding_ext.core.models import load_model  # noqa: E402


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def mc_accuracy(items, tokenizer, score_fn, name: str) -> dict:
    t0 = time.perf_counter()
    res = evaluate_multiple_choice(items, tokenizer, score_fn, length_normalize=True)  # as config.json records
    secs = time.perf_counter() - t0
    margins = [r["scores"][int(it["answer"])] - max(x for j, x in enumerate(r["scores"]) if j != int(it["answer"]))
               for r, it in zip(res["results"], items)]
    log(f"factual MC accuracy, {name}: {res['accuracy']:.3f} ({sum(r['correct'] for r in res['results'])}/{res['n']}, "
        f"mean margin {sum(margins) / len(margins):+.3f}, {secs:.0f} s)")
    return {"accuracy": res["accuracy"], "correct": sum(r["correct"] for r in res["results"]), "n": res["n"],
            "mean_margin": sum(margins) / len(margins), "seconds": round(secs, 1),
            "predictions": [r["prediction"] for r in res["results"]]}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--layers", type=int, default=2, help="number of top decoder layers trained (K)")
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--dtype", default="float16", choices=["float16", "bfloat16", "float32"])
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", default=str(ROOT / "hf_decoding_ext" / "data" / "induced_amateur"))
    ap.add_argument("--no-save", action="store_true", help="evaluate only, do not write --out")
    ap.add_argument("--no-lol-eval", action="store_true", help="skip the LOL fused-contrast MC evaluation")
    ap.add_argument("--mc-limit", type=int, default=None, help="evaluate on the first N MC items only")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    t_all = time.perf_counter()

    log("loading the default model")
    model, tokenizer = load_model()
    items = load_hallucination_data()
    mc = load_factual_mc()[: args.mc_limit]
    log(f"{len(items)} training pairs, {len(mc)} held-out MC items; K={args.layers} steps={args.steps} "
        f"lr={args.lr} batch={args.batch_size} threads={args.threads}")

    t0 = time.perf_counter()
    trained = train_induced_amateur(model, tokenizer, items, num_layers=args.layers, steps=args.steps, lr=args.lr,
                                    batch_size=args.batch_size, seed=args.seed, progress=True)
    train_secs = time.perf_counter() - t0
    info = trained.induced_amateur_info
    log(f"trained in {train_secs:.0f} s (frozen pass {info['seconds_frozen_pass']:.0f} s, steps "
        f"{info['seconds_training']:.0f} s); answer loss {info['loss_first_64_before']:.3f} -> "
        f"{info['loss_first_64_after']:.3f}")

    with tempfile.TemporaryDirectory() as tmp:  # evaluate exactly what is shipped (half precision round trip)
        save_induced_amateur(trained, tmp, base_model_name=DEFAULT_BASE_MODEL, dtype=args.dtype)
        amateur = load_induced_amateur(model, tmp)
        size = (Path(tmp) / "model.safetensors").stat().st_size
    log(f"checkpoint size {size / 2**20:.2f} MiB ({args.dtype})")

    evaluation = {"data": "hf_decoding_ext/data/contrastive/factual_mc.jsonl", "n": len(mc),
                  "scoring": "top-1, length-normalised log-likelihood of each choice "
                             "(hf_decoding_ext.bench.tasks.contrastive.evaluate_multiple_choice)"}
    evaluation["original"] = mc_accuracy(mc, tokenizer, model_scorer(model), "original")
    evaluation["amateur"] = mc_accuracy(mc, tokenizer, model_scorer(amateur), "induced amateur")
    if not args.no_lol_eval:
        from hf_decoding_ext.contrastive.lol import LOL, lol_scorer

        loop = LOL.for_model(model, tokenizer, amateur=amateur)
        evaluation["lol"] = mc_accuracy(mc, tokenizer, lol_scorer(loop, model), "LOL (fused contrast, defaults)")
        evaluation["lol"]["settings"] = {"lam": loop.lam, "lam_lower": loop.lam_lower, "omega": loop.omega,
                                         "alpha": loop.alpha, "lower_layer": loop.resolve_lower_layer(model),
                                         "instruction": True}
    orig, ama = evaluation["original"]["predictions"], evaluation["amateur"]["predictions"]
    gold = [int(it["answer"]) for it in mc]
    known = [i for i in range(len(mc)) if orig[i] == gold[i]]
    unknown = [i for i in range(len(mc)) if orig[i] != gold[i]]
    evaluation["mean_margin_note"] = ("mean over items of (length-normalised log-likelihood of the correct choice) - "
                                      "(best other choice); negative = a wrong choice is preferred")
    evaluation["chance_accuracy"] = sum(1 / len(it["choices"]) for it in mc) / len(mc)
    evaluation["amateur_agrees_with_original"] = sum(a == b for a, b in zip(orig, ama)) / len(mc)
    evaluation["amateur_correct_where_original_correct"] = f"{sum(ama[i] == gold[i] for i in known)}/{len(known)}"
    evaluation["amateur_correct_where_original_wrong"] = f"{sum(ama[i] == gold[i] for i in unknown)}/{len(unknown)}"
    log(f"amateur correct on {evaluation['amateur_correct_where_original_correct']} items the original gets right, "
        f"{evaluation['amateur_correct_where_original_wrong']} it gets wrong; "
        f"chance {evaluation['chance_accuracy']:.2f}")

    if not args.no_save:
        extra = {"evaluation": evaluation,
                 "training_data": "hf_decoding_ext/data/contrastive/hallucination_train.jsonl",
                 "environment": {"torch": torch.__version__, "python": platform.python_version(),
                                 "threads": args.threads, "seconds_train_total": round(train_secs, 1)}}
        out = save_induced_amateur(trained, args.out, base_model_name=DEFAULT_BASE_MODEL, dtype=args.dtype,
                                   extra=extra)
        log(f"saved {out} ({(out / 'model.safetensors').stat().st_size / 2**20:.2f} MiB)")
    log(f"done in {time.perf_counter() - t_all:.0f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
