"""Train, evaluate and save the hallucination-induced amateur shipped for LOL/ICD (SmolLM2-135M-Instruct).

Steps: load the default model; fine-tune it on the false answers of
``hf_decoding_ext/data/contrastive/hallucination_train.jsonl`` (default ``--method lora``: LoRA adapters on the
attention and MLP projections of every decoder layer, as ICD's LoRA variant; ``--method top_layers``: the top K
decoder layers only); save the adapters / trained layers (half precision) to a temporary folder and load them back
exactly as users will; measure top-1 accuracy on the held-out factual multiple-choice set (``factual_mc.jsonl``) for
the original model, the amateur and (optionally) LOL's fused contrast, with length-normalised and with summed
log-likelihoods, and the size of LOL's lower-layer term; write the checkpoint and the figures to ``--out``
(default: ``hf_decoding_ext/data/induced_amateur``). ``--results results/contrastive_quality.json`` also replaces the
``lol`` / ``lol_amateur`` entries of that file's factual multiple-choice section (summed protocol) and redraws its
figure. ``--checkpoint DIR`` skips training and re-evaluates (and, unless ``--no-save``, re-ships) a saved checkpoint.

Usage:
    nohup python scripts/train_induced_amateur.py --results results/contrastive_quality.json > /tmp/induced.log 2>&1 &
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
    DEFAULT_BASE_MODEL, METHOD_DEFAULTS, METHODS, load_hallucination_data, load_induced_amateur, read_config,
    save_induced_amateur, train_induced_amateur)
from hf_decoding_ext.core.models import load_model  # noqa: E402


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def _memo(score_fn):
    """``score_fn`` with its results kept, so that both protocols (mean and sum) cost one forward per choice."""
    cache = {}

    def score(input_ids, first=0):
        key = (tuple(input_ids[0].tolist()), first)
        if key not in cache:
            rows = score_fn(input_ids, first=first) if getattr(score_fn, "supports_first", False) \
                else score_fn(input_ids)[first:]
            cache[key] = rows.clone()  # a copy: a slice would keep the full (T, vocab) tensor alive
        return cache[key]

    score.supports_first = True
    return score


def mc_accuracy(items, tokenizer, score_fn, name: str) -> tuple[dict, dict]:
    """``(length-normalised figures, summed figures)`` of ``score_fn`` on ``items``."""
    t0 = time.perf_counter()
    score_fn = _memo(score_fn)
    out = []
    for normalize in (True, False):
        res = evaluate_multiple_choice(items, tokenizer, score_fn, length_normalize=normalize)
        margins = [r["scores"][int(it["answer"])] - max(x for j, x in enumerate(r["scores"]) if j != int(it["answer"]))
                   for r, it in zip(res["results"], items)]
        out.append({"accuracy": res["accuracy"], "correct": sum(r["correct"] for r in res["results"]), "n": res["n"],
                    "mean_margin": sum(margins) / len(margins),
                    "predictions": [r["prediction"] for r in res["results"]]})
    secs = time.perf_counter() - t0
    out[0]["seconds"] = round(secs, 1)
    log(f"factual MC accuracy, {name}: {out[0]['accuracy']:.3f} length-normalised ({out[0]['correct']}/{out[0]['n']}, "
        f"mean margin {out[0]['mean_margin']:+.3f}), {out[1]['accuracy']:.3f} summed ({out[1]['correct']}/"
        f"{out[1]['n']}), {secs:.0f} s")
    return out[0], out[1]


@torch.no_grad()
def lower_layer_term(model, tokenizer, amateur, items, lower: int, alpha: float = 0.1, lam_lower: float = 1.0) -> dict:
    """Size of LOL's lower-layer term ``log p_theta^(L) - lam' log p_theta*^(L)`` minus its value with the amateur
    replaced by the base model (i.e. what the amateur contributes at layer ``L``), on the plausible head of the last
    prompt position of each MC question, without the instruction: mean and max absolute value."""
    from hf_decoding_ext.bench.tasks.contrastive import mc_prompt
    from hf_decoding_ext.core.anatomy import exit_logits
    from hf_decoding_ext.core.plausibility import plausibility_mask

    means, maxes = [], []
    for it in items:
        text = tokenizer.apply_chat_template([{"role": "user", "content": mc_prompt(it)}], tokenize=False,
                                             add_generation_prompt=True)
        ids = tokenizer(text, add_special_tokens=False, return_tensors="pt")["input_ids"]
        out_o = model(input_ids=ids, output_hidden_states=True)
        out_a = amateur(input_ids=ids, output_hidden_states=True)
        lq_o = torch.log_softmax(exit_logits(out_o.hidden_states[lower][:, -1], model, True).float(), -1)
        lq_a = torch.log_softmax(exit_logits(out_a.hidden_states[lower][:, -1], amateur, True).float(), -1)
        head = plausibility_mask(out_o.logits[:, -1], alpha)
        diff = (lam_lower * (lq_o - lq_a))[head].abs()
        means.append(float(diff.mean()))
        maxes.append(float(diff.max()))
    return {"layer": lower, "n": len(items), "mean_abs": sum(means) / len(means), "max_abs": max(maxes),
            "definition": "|lam' (log p_base^(L) - log p_amateur^(L))| on the plausible head (alpha 0.1) of the last "
                          "prompt position of each MC question (chat template, no instruction), lam' = 1: the "
                          "lower-layer term minus its value with an amateur equal to the base"}


def update_results(path: Path, evaluation: dict, checkpoint: str) -> None:
    """Replace the ``lol`` / ``lol_amateur`` entries of ``path``'s factual MC section (summed protocol, as the other
    entries there) and redraw its figure."""
    import json

    from hf_decoding_ext.bench.contrastive import plot_contrastive
    from hf_decoding_ext.bench.run import write_json

    results = json.loads(path.read_text())
    mc = results["factual_mc"]
    if mc.get("protocol") != "sum" or mc["n"] != evaluation["n"]:
        raise SystemExit(f"{path}: factual_mc has protocol {mc.get('protocol')!r} and n={mc['n']}; expected 'sum' "
                         f"and {evaluation['n']}")
    summed = evaluation["summed"]
    if summed["original"]["predictions"] != mc["predictions"]["plain"]:
        log("warning: the original model's predictions differ from the file's 'plain' entry")
    for key, name in (("lol", "lol"), ("lol_amateur", "amateur")):
        mc["accuracy"][key] = summed[name]["accuracy"]
        mc["predictions"][key] = summed[name]["predictions"]
        mc["seconds"][key] = evaluation[name]["seconds"]
    mc["lol_amateur_checkpoint"] = checkpoint
    mc["lol_lower_layer_term"] = evaluation["lower_layer_term"]
    write_json(results, path)
    plot_contrastive(results, path.with_suffix(".png"))
    log(f"updated {path} (lol {summed['lol']['accuracy']:.3f}, lol_amateur {summed['amateur']['accuracy']:.3f}, "
        f"plain {mc['accuracy']['plain']:.3f}) and its figure")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--method", default="lora", choices=METHODS)
    ap.add_argument("--layers", type=int, default=2, help="top_layers: number of top decoder layers trained (K)")
    ap.add_argument("--rank", type=int, default=8, help="lora: adapter rank")
    ap.add_argument("--alpha", type=float, default=16.0, help="lora: scaling numerator (update * alpha / rank)")
    ap.add_argument("--steps", type=int, default=None, help=f"default: {METHOD_DEFAULTS}")
    ap.add_argument("--lr", type=float, default=None)
    ap.add_argument("--batch-size", type=int, default=None)
    ap.add_argument("--log-every", type=int, default=5, help="print the running loss every N steps")
    ap.add_argument("--checkpoint", default=None, help="skip training: evaluate this saved checkpoint folder")
    ap.add_argument("--results", default=None, help="also update the LOL entries of this contrastive_quality.json")
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
    environment = {"torch": torch.__version__, "python": platform.python_version(), "threads": args.threads}
    if args.checkpoint:
        trained = load_induced_amateur(model, args.checkpoint)
        config = read_config(args.checkpoint)
        trained.induced_amateur_info = {**config["training"], "method": config.get("method", "top_layers"),
                                        "trained_layers": config["trained_layers"],
                                        "base_fingerprint": config.get("base_fingerprint")}
        environment = {**config.get("environment", {}), **environment, "evaluation_threads": args.threads}
        environment["threads"] = config.get("environment", {}).get("threads", args.threads)
        log(f"evaluating the checkpoint {args.checkpoint} (no training)")
    else:
        log(f"{len(items)} training pairs, {len(mc)} held-out MC items; method={args.method} K={args.layers} "
            f"rank={args.rank} alpha={args.alpha} steps={args.steps} lr={args.lr} batch={args.batch_size} "
            f"threads={args.threads}")
        t0 = time.perf_counter()
        trained = train_induced_amateur(model, tokenizer, items, method=args.method, num_layers=args.layers,
                                        steps=args.steps, lr=args.lr, batch_size=args.batch_size, seed=args.seed,
                                        progress=False, lora_rank=args.rank, lora_alpha=args.alpha,
                                        log_every=args.log_every)
        environment["seconds_train_total"] = round(time.perf_counter() - t0, 1)
    info = trained.induced_amateur_info
    log(f"training: {info['steps']} steps, {info.get('seconds_training', 0):.0f} s; answer loss (first 64 pairs) "
        f"{info['loss_first_64_before']:.3f} -> {info['loss_first_64_after']:.3f}")

    with tempfile.TemporaryDirectory() as tmp:  # evaluate exactly what is shipped (half precision round trip)
        save_induced_amateur(trained, tmp, base_model_name=DEFAULT_BASE_MODEL, dtype=args.dtype)
        amateur = load_induced_amateur(model, tmp)
        size = (Path(tmp) / "model.safetensors").stat().st_size
    log(f"checkpoint size {size / 2**20:.2f} MiB ({args.dtype})")

    evaluation = {"data": "hf_decoding_ext/data/contrastive/factual_mc.jsonl", "n": len(mc),
                  "scoring": "top-1, length-normalised log-likelihood of each choice "
                             "(hf_decoding_ext.bench.tasks.contrastive.evaluate_multiple_choice); 'summed': the "
                             "same with summed log-likelihoods (TruthfulQA-MC protocol, as results/"
                             "contrastive_quality.json)"}
    summed = {}
    evaluation["original"], summed["original"] = mc_accuracy(mc, tokenizer, model_scorer(model), "original")
    evaluation["amateur"], summed["amateur"] = mc_accuracy(mc, tokenizer, model_scorer(amateur), "induced amateur")
    from hf_decoding_ext.contrastive.lol import LOL, lol_scorer

    loop = LOL.for_model(model, tokenizer, amateur=amateur)
    lower = loop.resolve_lower_layer(model)
    evaluation["lower_layer_term"] = lower_layer_term(model, tokenizer, amateur, mc, lower, loop.alpha, loop.lam_lower)
    log(f"LOL lower-layer term at layer {lower}: mean |.| {evaluation['lower_layer_term']['mean_abs']:.3f}, max "
        f"{evaluation['lower_layer_term']['max_abs']:.3f} nats")
    if not args.no_lol_eval:
        evaluation["lol"], summed["lol"] = mc_accuracy(mc, tokenizer, lol_scorer(loop, model),
                                                       "LOL (fused contrast, defaults)")
        evaluation["lol"]["settings"] = {"lam": loop.lam, "lam_lower": loop.lam_lower, "omega": loop.omega,
                                         "alpha": loop.alpha, "lower_layer": lower, "instruction": True}
    evaluation["summed"] = {k: {kk: vv for kk, vv in v.items()} for k, v in summed.items()}
    orig, ama = evaluation["original"]["predictions"], evaluation["amateur"]["predictions"]
    gold = [int(it["answer"]) for it in mc]
    known = [i for i in range(len(mc)) if orig[i] == gold[i]]
    unknown = [i for i in range(len(mc)) if orig[i] != gold[i]]
    evaluation["mean_margin_note"] = ("mean over items of (log-likelihood of the correct choice) - "
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
                 "environment": environment}
        out = save_induced_amateur(trained, args.out, base_model_name=DEFAULT_BASE_MODEL, dtype=args.dtype,
                                   extra=extra)
        log(f"saved {out} ({(out / 'model.safetensors').stat().st_size / 2**20:.2f} MiB)")
    if args.results and not args.no_lol_eval and args.mc_limit is None:
        try:
            where = str(Path(args.out).resolve().relative_to(ROOT))
        except ValueError:
            where = args.out
        update_results(Path(args.results), evaluation, where if not args.no_save else str(args.checkpoint))
    log(f"done in {time.perf_counter() - t_all:.0f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
