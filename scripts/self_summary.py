"""Self-speculation and early exit (issue 20): one JSON + plot joining, per method of the registry family ``self``,
the measured acceptance, the draft cost by each method's own parameter accounting, the break-even, the layers per
token and quality change of the lossy loops, and the committed wall-clock speed vs same-kernel greedy.

    nohup python scripts/self_summary.py --prompts 6 --max-new-tokens 48 --threads 1 > /tmp/self_summary.log 2>&1 &
    python scripts/self_summary.py --methods swift --merge --threads 1   # re-run one method into the same JSON
    python scripts/self_summary.py --plot-only                            # re-plot results/self_summary.json

What is measured here (SmolLM2-135M-Instruct, fp32, plain ``generate()`` kernels, greedy, ``interleaved_prompts(6)``,
one drafter/loop object per method kept across the prompts, as ``generate_kwargs`` builds it with the registry
defaults; nothing is timed):

- greedy reference per prompt (plain ``generate(do_sample=False)``); every output is compared with it (new tokens up
  to and including the first eos);
- lossless drafters (speculative engine): tokens per target forward = committed tokens / engine steps summed over
  the prompts (``SpeculativeDecoding.summary()``, the first step being the prompt's verification), mean drafted and
  accepted tokens per step, per-token conditional acceptance of the chain drafters (accepted / (accepted + rounds
  cut by a rejection)), the draft cost per draft token as a fraction of a full forward in parameters touched, from
  the method's own accounting (SWIFT ``stats["draft_cost"] / stats["draft_forwards"]`` via ``cost_fraction``; CLaSp
  ``cost_fractions``; DEL ``cost_fraction[E]`` weighted by the tokens drafted at each exit ``E``; EESD
  ``draft_cost_fraction``; Sparse-to-Dense has no parameter accounting in its code: its draft is the full model,
  1.0, and the draft cache's KV positions are reported against the context's), the break-even
  (``policies.draft_length.break_even_acceptance`` at the mean draft length, and the tokens per forward at which the
  parameter-weighted cost equals greedy's, ``1 + draft cost per step``) and the extra per-method overheads their
  code counts (SWIFT's optimisation forwards, CLaSp's DP, DEL's shadow-token head pass);
- lossy loops: FREE ``stats`` (shallow fraction, ``layers_per_token``, ``weight_fraction``, shallow pass parameters
  over a full forward's), D^3 layer counts and :func:`~hf_decoding_ext.speculative.d3.d3_cost`; quality against
  greedy on the same prompts: exact match, positional token agreement, token-level ROUGE-L (as in
  ``tests/test_free.py``) and the mean full-model log-probability of the continuation (nats per token);
- wall-clock speed vs same-kernel greedy is *read* from ``results/self_speed.json`` (fp32) and
  ``results/self_speed_bfloat16.json`` (bf16), written by ``scripts/bench_self.py`` (not re-measured).

Writes ``<out>/self_summary.json`` and ``.png``.
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

import torch
from tqdm import tqdm

from hf_decoding_ext.bench.prompts import interleaved_prompts
from hf_decoding_ext.bench.quality import continuation_surprise
from hf_decoding_ext.bench.run import write_json
from hf_decoding_ext.bench.speed import GREEDY_KWARGS, cut_at_eos, encode_prompt, eos_token_ids, result_header
from hf_decoding_ext.core.models import load_model
from hf_decoding_ext.core.scoring import rouge_l
from hf_decoding_ext.plug import generate_kwargs
from hf_decoding_ext.registry import get_method, list_methods
from hf_decoding_ext.speculative.d3 import d3_cost
from hf_decoding_ext.speculative.drafters.eesd import draft_cost_fraction
from hf_decoding_ext.speculative.policies.draft_length import break_even_acceptance, expected_tokens

SPEED_FILES = {"float32": "results/self_speed.json", "bfloat16": "results/self_speed_bfloat16.json"}
SPEED_KEYS = ("speed_ratio_same_kernel", "speed_ratio_same_kernel_min", "speed_ratio_same_kernel_max",
              "speed_ratio", "tokens_per_s", "tokens_per_forward", "match_baseline_rate")


def mean_log_prob(model, prompt_ids, tokens) -> float | None:
    """Mean full-model log-probability (nats per token) of ``tokens`` after ``prompt_ids``."""
    if not tokens:
        return None
    bits = continuation_surprise(model, prompt_ids, tokens)
    return float(-bits.mean()) * math.log(2.0)


def read_speed() -> dict:
    out = {}
    for dtype, path in SPEED_FILES.items():
        p = Path(path)
        if not p.exists():
            out[dtype] = {"file": path, "missing": True}
            continue
        data = json.loads(p.read_text())
        methods = {name: {k: m["overall"].get(k) for k in SPEED_KEYS} for name, m in data["methods"].items()}
        out[dtype] = {"file": path, "created": data.get("created"), "settings": data.get("settings"),
                      "methods": methods}
    return out


# ------------------------------------------------------------------------------------------------ per-method accounting
class ChainAcceptance:
    """Per-token conditional acceptance over engine steps that drafted a chain."""

    def __init__(self):
        self.accepted = self.trials = self.drafted = self.draft_steps = 0

    def add(self, last_stats) -> None:
        for s in last_stats:
            if s.draft_size > 0:
                self.draft_steps += 1
                self.drafted += s.draft_size
                self.accepted += s.accepted
                self.trials += s.accepted + (1 if s.accepted < s.draft_size else 0)

    def rate(self) -> float | None:
        return self.accepted / self.trials if self.trials else None


def accounting(name, model, drafter, acc: dict) -> None:
    """Accumulate the method's own cost figures of the last ``generate()`` call into ``acc``."""
    if name == "swift":  # stats accumulate until reset(): overwrite with the running totals
        acc.update({k: drafter.stats[k] for k in ("draft_forwards", "draft_cost", "opt_forwards", "opt_tokens",
                                                   "opt_cost", "opt_iter", "bayes_iter")})
        acc["final_cost_fraction"] = drafter.cost_fraction()
        acc["final_skip_sets"] = [list(s) for s in drafter.skip_sets()]
    elif name == "clasp":  # stats are per call
        c = drafter.cost_fractions(model)
        acc["draft_forwards"] = acc.get("draft_forwards", 0) + drafter.stats.get("draft_forwards", 0)
        acc["draft_cost"] = acc.get("draft_cost", 0.0) + c["draft"]
        acc["dp_cost"] = acc.get("dp_cost", 0.0) + c["dp"]
        acc["dp_runs"] = acc.get("dp_runs", 0) + drafter.stats.get("dp_runs", 0)
        acc["draft_token_cost_last"] = c["draft_token"]
        acc["num_skip"] = drafter.m
        acc.setdefault("skip_sets", []).extend(list(s) for s in drafter.skip_sets)
    elif name == "del":  # rounds are per call
        for r in drafter.rounds:
            if r["drafted"]:
                acc["draft_forwards"] = acc.get("draft_forwards", 0) + r["drafted"]
                acc["draft_cost"] = acc.get("draft_cost", 0.0) + r["drafted"] * drafter.cost_fraction[r["exit"]]
                exits = acc.setdefault("drafted_per_exit", {})
                exits[str(r["exit"])] = exits.get(str(r["exit"]), 0) + r["drafted"]
        acc["rounds"] = acc.get("rounds", 0) + len(drafter.rounds)
        p = drafter.param_costs
        acc["head_fraction"] = p["head"] / p["total"]
        acc["cost_mode"] = drafter.cost
        for e, m in drafter.measured().items():
            tot = acc.setdefault("measured_per_exit", {}).setdefault(str(e), {"accepted": 0, "trials": 0})
            tot["accepted"] += m["accepted"]
            tot["trials"] += m["trials"]
    elif name == "eesd":  # round_log is per call
        drafted = sum(d for d, _ in drafter.round_log)
        c = draft_cost_fraction(model, drafter.exit_layer, extra_layers=1 if drafter.head is not None else 0)
        acc["draft_forwards"] = acc.get("draft_forwards", 0) + drafted
        acc["draft_cost"] = acc.get("draft_cost", 0.0) + drafted * c
        acc["exit_layer"] = drafter.exit_layer
        acc["cost_per_draft_token"] = c
    elif name == "sparse-to-dense":
        acc["draft_cache_positions"] = acc.get("draft_cache_positions", 0) + sum(drafter.draft_cache_sizes)
        acc["context_positions"] = acc.get("context_positions", 0) + sum(drafter.context_sizes)
        acc["proposals"] = acc.get("proposals", 0) + len(drafter.context_sizes)


def finish_lossless(name, acc: dict, chain: ChainAcceptance, steps: int, tokens: int) -> dict:
    """Turn the accumulated figures into the per-method summary (costs in full-forward units)."""
    out: dict = {"steps": steps, "tokens": tokens, "tokens_per_forward": tokens / steps if steps else None,
                 "draft_steps": chain.draft_steps, "drafted_tokens": chain.drafted,
                 "accepted_tokens": chain.accepted,
                 "mean_drafted_per_draft_step": chain.drafted / chain.draft_steps if chain.draft_steps else None,
                 "mean_accepted_per_step": chain.accepted / steps if steps else None}
    extras = 0.0
    if name == "sparse-to-dense":
        # no parameter accounting in sparse_to_dense.py: the draft calls the full model (all weights)
        draft_forwards = chain.drafted
        cost = 1.0
        out["cost_source"] = ("sparse_to_dense.py propose(): the draft is model(...) itself (every weight read); no "
                              "parameter or memory-traffic accounting in the code")
        out["draft_kv_positions_mean"] = acc["draft_cache_positions"] / acc["proposals"] if acc.get("proposals") \
            else None
        out["context_positions_mean"] = acc["context_positions"] / acc["proposals"] if acc.get("proposals") else None
        draft_cost = draft_forwards * cost
    else:
        draft_forwards = acc.get("draft_forwards", 0)
        draft_cost = acc.get("draft_cost", 0.0)
        cost = draft_cost / draft_forwards if draft_forwards else None
    out["draft_forwards"] = draft_forwards
    out["draft_cost_per_draft_token"] = cost
    out["draft_cost_per_step"] = draft_cost / steps if steps else None
    if name == "swift":
        out["cost_source"] = ("SWIFTDrafter.stats['draft_cost'] / stats['draft_forwards'] (cost_fraction of the "
                              "current skipped sub-layers: LM head + norm + kept attention/MLP sub-layers, "
                              "core.anatomy.sublayer_parameters)")
        out["final_cost_fraction"] = acc.get("final_cost_fraction")
        out["final_skip_sets"] = {"attention": acc["final_skip_sets"][0], "mlp": acc["final_skip_sets"][1]}
        out["optimisation"] = {k: acc.get(k) for k in ("opt_forwards", "opt_tokens", "opt_cost", "opt_iter",
                                                       "bayes_iter")}
        opt = out["optimisation"]
        opt["opt_cost_weights_once_per_forward"] = (opt["opt_forwards"] * opt["opt_cost"] / opt["opt_tokens"]
                                                    if opt.get("opt_tokens") else 0.0)
        out["overheads_note"] = ("opt_cost is SWIFT's own count: every token of the optimisation's parallel forwards "
                                 "x cost_fraction; the break-even 'with overheads' uses "
                                 "opt_cost_weights_once_per_forward = opt_forwards x mean cost_fraction (a parallel "
                                 "forward reads the weights once, as CLaSp's cost_fractions counts its DP calls)")
        extras = opt["opt_cost_weights_once_per_forward"]
    elif name == "clasp":
        out["cost_source"] = ("CLaSpDrafter.cost_fractions(model)['draft'] summed over calls / draft forwards "
                              "(kept layers + final norm + LM head over a full forward)")
        out["num_skip"] = acc.get("num_skip")
        out["dp_runs"] = acc.get("dp_runs")
        out["dp_cost"] = acc.get("dp_cost")
        out["dp_cost_per_step"] = acc["dp_cost"] / steps if steps else None
        out["skip_sets_last"] = acc.get("skip_sets", [])[-3:]
        out["overheads_note"] = "dp_cost: CLaSp's DP, each batched layer call counted as one mean layer's weights"
        extras = acc.get("dp_cost", 0.0)
    elif name == "del":
        out["cost_source"] = ("DELDrafter.cost_fraction[E] (first E layers + LM head over all layers + head, "
                              "dynamic_exit_layer.parameter_costs) weighted by the tokens drafted at each exit E; "
                              f"the exit is chosen with cost={acc.get('cost_mode')!r}")
        out["drafted_per_exit"] = acc.get("drafted_per_exit", {})
        out["measured_acceptance_per_exit"] = {
            e: {**m, "rate": m["accepted"] / m["trials"] if m["trials"] else None}
            for e, m in sorted(acc.get("measured_per_exit", {}).items(), key=lambda kv: int(kv[0]))}
        shadow = acc.get("rounds", 0) * acc.get("head_fraction", 0.0)
        out["shadow_head_cost"] = shadow
        out["overheads_note"] = ("shadow_head_cost: one LM-head pass per round for the shadow tokens (DEL's "
                                 "cost='parameters' verify cost 1 + head/total), head fraction "
                                 f"{acc.get('head_fraction')}")
        extras = shadow
    elif name == "eesd":
        out["cost_source"] = ("eesd.draft_cost_fraction(model, exit_layer, extra_layers=1): first N layers + the "
                              "exit head's layer + LM head over the model's parameters")
        out["exit_layer"] = acc.get("exit_layer")
    out["per_token_acceptance"] = chain.rate() if name != "swift" else None
    if name == "swift":
        out["per_token_acceptance_note"] = "tree drafts: no chain acceptance rate; see mean_accepted_per_step"
    d = max(1, round(out["mean_drafted_per_draft_step"])) if out["mean_drafted_per_draft_step"] else 1
    if name == "swift":  # the tree's depth is the number of draft forwards of a step
        d = max(1, round(draft_forwards / chain.draft_steps)) if chain.draft_steps else 1
    if cost is not None:
        a = break_even_acceptance(cost, d)
        out["break_even"] = {"draft_length": d, "per_token_acceptance": a,
                             "tokens_per_round_at_break_even": expected_tokens(a, d),
                             "tokens_per_forward": 1.0 + (draft_cost / steps if steps else 0.0),
                             "tokens_per_forward_with_overheads": 1.0 + ((draft_cost + extras) / steps
                                                                         if steps else 0.0),
                             "source": "policies.draft_length.break_even_acceptance(cost, d) / expected_tokens at "
                                       "d = mean draft length (draft forwards per drafting step); tokens_per_forward "
                                       "= 1 + measured draft cost per step (parameter-weighted forward units: "
                                       "verification 1, each draft token its cost)"}
        units = steps + draft_cost
        out["parameter_speed_ratio"] = tokens / units if units else None
        out["parameter_speed_ratio_with_overheads"] = tokens / (units + extras) if units else None
    return out


# ------------------------------------------------------------------------------------------------ plot
def plot(result: dict, path: Path) -> None:
    from hf_decoding_ext.bench.plot import _plt

    plt = _plt()
    ms = result["methods"]
    names = list(ms)
    lossless = [n for n in names if ms[n]["lossless"]]
    lossy = [n for n in names if not ms[n]["lossless"]]
    fig, axes = plt.subplots(2, 2, figsize=(13, 9))

    ax = axes[0][0]
    x = range(len(lossless))
    nan = float("nan")
    tpf = [ms[n].get("tokens_per_forward") or nan for n in lossless]
    be = [(ms[n].get("break_even") or {}).get("tokens_per_forward", nan) for n in lossless]
    beo = [(ms[n].get("break_even") or {}).get("tokens_per_forward_with_overheads", nan) for n in lossless]
    ax.bar([i - 0.2 for i in x], tpf, 0.4, label="measured tokens / target forward")
    ax.bar([i + 0.2 for i in x], be, 0.4, label="break-even (1 + draft cost per step)")
    ax.scatter([i + 0.2 for i in x], beo, marker="_", s=300, color="k", zorder=3,
               label="break-even incl. optimisation / DP / shadow overhead")
    for i, v in enumerate(tpf):
        ax.annotate(f"{v:.2f}", (i - 0.2, v), ha="center", va="bottom", fontsize=7)
    for i, v in enumerate(be):
        ax.annotate(f"{v:.2f}", (i + 0.2, v), ha="center", va="bottom", fontsize=7)
    finite = [v for v in tpf + be + beo if not math.isnan(v)]
    if finite:
        ax.set_ylim(0, max(finite) * 1.15)
    ax.axhline(1.0, color="grey", lw=0.8)
    ax.set_xticks(list(x))
    ax.set_xticklabels(lossless, rotation=20, ha="right", fontsize=8)
    ax.set_ylabel("tokens per target forward")
    ax.set_title("Acceptance vs break-even (parameters touched)", fontsize=10)
    ax.legend(fontsize=7, loc="lower right")

    ax = axes[0][1]
    cost = [ms[n].get("draft_cost_per_draft_token") for n in names]
    bars = ax.bar(range(len(names)), [c or 0 for c in cost], color=["C0" if ms[n]["lossless"] else "C3"
                                                                    for n in names])
    for b, c in zip(bars, cost):
        if c is not None:
            ax.annotate(f"{c:.2f}", (b.get_x() + b.get_width() / 2, c), ha="center", va="bottom", fontsize=7)
    ax.axhline(1.0, color="grey", lw=0.8)
    ax.set_xticks(range(len(names)))
    ax.set_xticklabels(names, rotation=20, ha="right", fontsize=8)
    ax.set_ylabel("fraction of a full forward's parameters")
    ax.set_title("Cost per draft token (lossless) / per shallow token (FREE) / per token (D^3)", fontsize=10)

    ax = axes[1][0]
    for k, (dtype, colour) in enumerate((("float32", "C0"), ("bfloat16", "C1"))):
        vals, lo, hi = [], [], []
        for n in names:
            s = (ms[n].get("speed_vs_same_kernel_greedy") or {}).get(dtype) or {}
            v = s.get("speed_ratio_same_kernel")
            vals.append(v if v is not None else float("nan"))
            lo.append(v - s["speed_ratio_same_kernel_min"] if v is not None else 0)
            hi.append(s["speed_ratio_same_kernel_max"] - v if v is not None else 0)
        xs = [i - 0.2 + 0.4 * k for i in range(len(names))]
        ax.bar(xs, vals, 0.4, yerr=[lo, hi], capsize=2, color=colour, label=dtype)
        for xx, v, h in zip(xs, vals, hi):
            if not math.isnan(v):
                ax.annotate(f"{v:.2f}", (xx, v + h), ha="center", va="bottom", fontsize=6)
    ax.axhline(1.0, color="grey", lw=0.8)
    ax.set_xticks(range(len(names)))
    ax.set_xticklabels(names, rotation=20, ha="right", fontsize=8)
    ax.set_ylabel("tokens/s over same-kernel greedy")
    ax.set_title("Wall clock (committed results/self_speed*.json, min-max over passes)", fontsize=10)
    ax.legend(fontsize=7)

    ax = axes[1][1]
    total = result["settings"]["num_layers"]
    lpt = [ms[n].get("layers_per_token") or 0.0 for n in lossy]
    bars = ax.bar(range(len(lossy)), lpt, color="C3")
    for b, n, v in zip(bars, lossy, lpt):
        q = ms[n]["quality_vs_greedy"]
        ax.annotate(f"{v:.1f} layers\nROUGE-L {q['rouge_l']:.2f}\nexact {q['exact_match']:.2f}",
                    (b.get_x() + b.get_width() / 2, v), ha="center", va="bottom", fontsize=7)
    ax.axhline(total, color="grey", lw=0.8, ls="--", label=f"greedy: {total} layers")
    ax.set_ylim(0, total * 1.3)
    ax.set_xticks(range(len(lossy)))
    ax.set_xticklabels(lossy, fontsize=8)
    ax.set_ylabel("decoder-layer applications per token")
    ax.set_title("Lossy loops: layers per token, quality vs greedy", fontsize=10)
    ax.legend(fontsize=7)

    s = result["settings"]
    fig.suptitle(f"Self-speculation and early exit, {result['model']}, {s['n_prompts']} prompts x "
                 f"{s['max_new_tokens']} greedy tokens (acceptance/cost: fp32, this run)", fontsize=11)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


# ------------------------------------------------------------------------------------------------ main
def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--prompts", type=int, default=6, help="interleaved_prompts(n)")
    ap.add_argument("--max-new-tokens", type=int, default=48)
    ap.add_argument("--methods", nargs="*", default=None, help="default: every method of family 'self'")
    ap.add_argument("--tag", default="self_summary")
    ap.add_argument("--out", default="results")
    ap.add_argument("--threads", type=int, default=None, help="torch threads (figures do not depend on it)")
    ap.add_argument("--plot-only", action="store_true", help="re-plot <out>/<tag>.json")
    ap.add_argument("--merge", action="store_true",
                    help="keep the other methods of an existing <out>/<tag>.json (same settings) and replace those run")
    args = ap.parse_args(argv)
    if args.plot_only:
        path = Path(args.out) / f"{args.tag}.json"
        plot(json.loads(path.read_text()), path.with_suffix(".png"))
        return 0
    if args.threads:
        torch.set_num_threads(args.threads)

    names = args.methods or [m.name for m in list_methods(family="self")]
    model, tokenizer = load_model()
    model.eval()
    eos = eos_token_ids(model, tokenizer)
    rows = interleaved_prompts(args.prompts)
    encs = [encode_prompt(r, tokenizer) for r in rows]
    base = {**GREEDY_KWARGS, "pad_token_id": tokenizer.pad_token_id}

    def new_tokens(out, enc):
        seq = out if isinstance(out, torch.Tensor) else out.sequences
        return cut_at_eos(seq[0, enc["input_ids"].shape[1]:].tolist(), eos, include_eos=True)

    total_runs = len(rows) * (1 + len(names))
    bar = tqdm(total=total_runs, desc="self summary", unit="run")
    greedy = []
    for r, enc in zip(rows, encs):
        bar.set_postfix_str(f"greedy {r['id']}")
        with torch.no_grad():
            greedy.append(new_tokens(model.generate(**enc, max_new_tokens=args.max_new_tokens, **base), enc))
        bar.update(1)
    greedy_lp = [mean_log_prob(model, enc["input_ids"][0], g) for enc, g in zip(encs, greedy)]

    out_dir = Path(args.out)

    header = result_header("self_summary", args.tag, model, None)

    def write_result(methods, complete):
        result = {
            **header,
            "settings": {
                "prompts": [r["id"] for r in rows], "n_prompts": len(rows),
                "prompt_source": "hf_decoding_ext.bench.prompts.interleaved_prompts(n), encode_prompt",
                "max_new_tokens": args.max_new_tokens, "decoding": "greedy (do_sample=False)",
                "kernels": "plain generate() (no fast-kernel plan); nothing timed",
                "num_layers": model.config.num_hidden_layers,
                "methods": "registry family 'self', each built once by plug.generate_kwargs(name, model, tokenizer) "
                           "with its registry defaults and kept across the prompts (persistent state as in use)",
                "new_tokens": "generated tokens up to and including the first eos; equals_greedy compares them with "
                              "plain greedy generate() on the same prompt",
                "complete": complete,
                "speed_source": {d: s["file"] for d, s in speed.items()},
                "speed_note": "speed_vs_same_kernel_greedy is copied from the committed bench_self.py results, not "
                              "re-measured; their tokens_per_forward counts every call of the model's forward (a "
                              "forward hook), which includes the drafts of drafters that call the full model "
                              "(sparse-to-dense), unlike the engine-step count here",
            },
            "greedy": {"mean_new_tokens": sum(len(g) for g in greedy) / len(greedy),
                       "mean_log_prob": sum(greedy_lp) / len(greedy_lp)},
            "methods": methods,
        }
        write_json(result, out_dir / f"{args.tag}.json")

    speed = read_speed()
    methods: dict = {}
    previous = out_dir / f"{args.tag}.json"
    if args.merge and previous.exists():
        old = json.loads(previous.read_text())
        same = (old["settings"]["prompts"] == [r["id"] for r in rows]
                and old["settings"]["max_new_tokens"] == args.max_new_tokens)
        if not same:
            raise SystemExit(f"--merge: {previous} was run with other prompts or max_new_tokens")
        order = [m.name for m in list_methods(family="self")]
        methods = {n: e for n, e in old["methods"].items() if n not in names}
        names_all = [n for n in order if n in methods or n in names]
    else:
        names_all = names
    for name in names:
        spec = get_method(name)
        kw = generate_kwargs(spec, model=model, tokenizer=tokenizer)
        kw.pop("top_k", None)
        kw.update(base)
        loop = kw["custom_generate"]
        per_prompt, outs = [], []
        acc: dict = {}
        chain = ChainAcceptance()
        steps = tokens = 0
        free_tot = {"tokens": 0, "shallow_tokens": 0, "layer_applications": 0, "weight_reads": 0}
        free_static: dict = {}
        d3_sets: list = []
        for r, enc, g in zip(rows, encs, greedy):
            bar.set_postfix_str(f"{name} {r['id']}")
            with torch.no_grad():
                out = model.generate(**enc, max_new_tokens=args.max_new_tokens, **kw)
            toks = new_tokens(out, enc)
            outs.append(toks)
            row = {"prompt_id": r["id"], "category": r["category"], "new_tokens": len(toks),
                   "equals_greedy": toks == g}
            if spec.kind == "candidate_generator":
                summ = loop.summary()
                row.update(steps=summ["steps"], tokens=summ["tokens"], tokens_per_forward=summ["tokens_per_forward"])
                steps += summ["steps"]
                tokens += summ["tokens"]
                chain.add(loop.last_stats)
                try:
                    accounting(name, model, loop.drafter, acc)
                except Exception as exc:  # keep the run going; the error is recorded in the entry
                    acc.setdefault("errors", []).append(repr(exc))
            elif name == "free":
                s = loop.stats
                for k in free_tot:
                    free_tot[k] += s[k]
                free_static = {k: s[k] for k in ("exit_layer", "layers", "exit_kind", "full_forward_params",
                                                 "shallow_pass_params", "deep_pass_params")}
                row.update(shallow_fraction=s["shallow_fraction"], layers_per_token=s["layers_per_token"],
                           weight_fraction=s["weight_fraction"], threshold=s["thresholds"][-1] if s["thresholds"]
                           else None)
            elif name == "d3":
                d3_sets.extend(loop.layer_sets)
                row.update(layers_per_token=sum(loop.layer_counts) / len(loop.layer_counts)
                           if loop.layer_counts else None)
            per_prompt.append(row)
            bar.update(1)
        entry: dict = {"kind": spec.kind, "lossless": spec.lossless, "status": spec.status,
                       "defaults": spec.defaults,
                       "equals_greedy_rate": sum(p["equals_greedy"] for p in per_prompt) / len(per_prompt),
                       "all_equal_greedy": all(p["equals_greedy"] for p in per_prompt)}
        if spec.kind == "candidate_generator":
            try:
                entry.update(finish_lossless(name, acc, chain, steps, tokens))
            except Exception as exc:
                entry["error"] = repr(exc)
                entry.update(steps=steps, tokens=tokens, tokens_per_forward=tokens / steps if steps else None)
            entry["raw_accounting"] = {**{k: v for k, v in acc.items() if k not in ("skip_sets", "final_skip_sets")},
                                       "chain": vars(chain)}
            if acc.get("errors"):
                entry["accounting_errors"] = acc["errors"]
            entry["tokens_per_forward_source"] = ("SpeculativeDecoding.summary(): committed tokens / engine steps "
                                                  "(one target verification forward each), summed over the prompts")
        else:
            try:
                lp = [mean_log_prob(model, enc["input_ids"][0], o) for enc, o in zip(encs, outs)]
                quality = {
                    "exact_match": sum(o == g for o, g in zip(outs, greedy)) / len(outs),
                    "positional_agreement": sum(sum(a == b for a, b in zip(o, g)) / max(1, len(g))
                                                for o, g in zip(outs, greedy)) / len(outs),
                    "rouge_l": sum(rouge_l(o, g) for o, g in zip(outs, greedy)) / len(outs),
                    "mean_log_prob": sum(lp) / len(lp),
                    "greedy_mean_log_prob": sum(greedy_lp) / len(greedy_lp),
                    "mean_new_tokens": sum(len(o) for o in outs) / len(outs),
                    "greedy_mean_new_tokens": sum(len(g) for g in greedy) / len(greedy),
                    "source": "this run: token-level ROUGE-L F1 (LCS, as tests/test_free.py), positional agreement "
                              "over greedy's length, mean full-model log-probability of the continuation in nats "
                              "(bench.quality.continuation_surprise), averaged over prompts",
                }
                entry["quality_vs_greedy"] = quality
                if name == "free":
                    t = free_tot["tokens"]
                    entry.update({
                        **free_static,
                        "shallow_fraction": free_tot["shallow_tokens"] / t if t else None,
                        "layers_per_token": free_tot["layer_applications"] / t if t else None,
                        "weight_fraction": free_tot["weight_reads"] / (t * free_static["full_forward_params"])
                        if t else None,
                        "draft_cost_per_draft_token": free_static["shallow_pass_params"]
                        / free_static["full_forward_params"],
                        "deep_pass_cost": free_static["deep_pass_params"] / free_static["full_forward_params"],
                        "cost_source": "FREEDecoding.stats: shallow_pass_params / full_forward_params per shallow pass "
                                       "(first S layers + exit head), deep_pass_params / full_forward_params per deep "
                                       "pass; weight_fraction = weight_reads / (tokens x full_forward_params); "
                                       "layers_per_token = layer_applications / tokens (the exit head's layer counted)",
                        "break_even_note": "FREE's code gives no break-even function (registry: about 28% shallow "
                                           "tokens needed to save weight reads)",
                    })
                else:
                    c = d3_cost(model, d3_sets)
                    entry.update({"layers_per_token": c["layer_units"], "depth_fraction": c["depth_fraction"],
                                  "draft_cost_per_draft_token": c["param_fraction"],
                                  "cost_source": "d3.d3_cost(model, layer_sets of every generated token): mean decoder "
                                                 "layers run and mean parameter fraction touched per token "
                                                 "(draft_cost_per_draft_token is this per-token fraction: D^3 has no "
                                                 "draft)",
                                  "min_layers": min(len(s) for s in d3_sets), "tokens": len(d3_sets)})
            except Exception as exc:  # keep the run going; the error is recorded in the entry
                entry["error"] = repr(exc)

        entry["speed_vs_same_kernel_greedy"] = {
            dtype: (s["methods"].get(name) if not s.get("missing") else None) for dtype, s in speed.items()}
        entry["per_prompt"] = per_prompt
        methods[name] = entry
        methods = {n: methods[n] for n in names_all if n in methods}
        write_result(methods, complete=len(methods) == len(names_all))
        tqdm.write(f"{name}: equals greedy {entry['equals_greedy_rate']:.2f}, tokens/forward "
                   f"{entry.get('tokens_per_forward')}, cost {entry.get('draft_cost_per_draft_token')}, "
                   f"layers/token {entry.get('layers_per_token')}")
    bar.close()

    result = json.loads((out_dir / f"{args.tag}.json").read_text())
    plot(result, out_dir / f"{args.tag}.png")

    print(f"{'method':16s} {'eq.greedy':>9s} {'tok/fwd':>7s} {'cost':>6s} {'b/e tpf':>7s} {'a*':>5s} "
          f"{'a':>5s} {'layers':>6s} {'fp32':>5s} {'bf16':>5s}")
    for name, e in methods.items():
        sp = e["speed_vs_same_kernel_greedy"]
        f = lambda v: "-" if v is None else f"{v:.2f}"  # noqa: E731
        be = e.get("break_even") or {}
        print(f"{name:16s} {e['equals_greedy_rate']:9.2f} {f(e.get('tokens_per_forward')):>7s} "
              f"{f(e.get('draft_cost_per_draft_token')):>6s} {f(be.get('tokens_per_forward')):>7s} "
              f"{f(be.get('per_token_acceptance')):>5s} {f(e.get('per_token_acceptance')):>5s} "
              f"{f(e.get('layers_per_token')):>6s} "
              f"{f((sp.get('float32') or {}).get('speed_ratio_same_kernel')):>5s} "
              f"{f((sp.get('bfloat16') or {}).get('speed_ratio_same_kernel')):>5s}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
