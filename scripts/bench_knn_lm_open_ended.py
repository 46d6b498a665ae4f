"""Measure "KNN-LM Does Not Improve Open-ended Text Generation" (Wang et al., 2023, arXiv:2305.14625) at this scale.

The kNN-LM is the registered one (``KNNLMLogitsProcessor`` with its defaults k=1024, lambda=0.25, T=1). Its default
datastore is built from every docstring of the shipped ``hf_decoding_ext/data/stdlib_docs.jsonl`` (Python
standard-library docstrings), and the package ships no held-out text of that corpus, so two held-out settings:

* ``--held-out split`` (default, the paper's setting of test text from the datastore's distribution): the datastore
  is built from 80% of the shipped docstrings (index % 5 != 0, the split of ``tests/test_knn_lm.py``; cached next to
  the default datastore) and the other 20% are cut into consecutive non-overlapping prefix + continuation windows;
* ``--held-out other-modules``: the default datastore, and held-out docstrings of the installed standard library's
  other top-level modules (``core.ngram_lm.stdlib_source_docstrings``, minus any overlapping a shipped one), one
  window per docstring (a domain shift: ``results/knn_lm_open_ended_other_modules.json`` was made with
  ``--held-out other-modules --num-prefixes 128 --seeds 0 --out results/knn_lm_open_ended_other_modules.json``).

Each window's first ``--prefix-tokens`` tokens are the prefix, the next ``--new-tokens`` the human continuation.

Measured, for the paper's three findings:

1. open-ended quality: for each seed, the base model and the kNN-LM sample a continuation of every prefix with the
   same nucleus sampling (``--top-p`` 0.9, temperature 1, no top-k, exactly ``--new-tokens`` tokens) and the same
   seed; MAUVE (``hf_decoding_ext.bench.mauve``, c=5, ``round(n / 10)`` k-means buckets) of the generated
   continuations against the human ones, with features from this model's final hidden state at the continuation's
   last token, because GPT-2 large, the reference featuriser, is not available offline (a deviation: the featuriser
   is the generator itself); the MAUVE of four other k-means seeds and a paired bootstrap over the examples of the
   difference kNN-LM minus base give its noise; plus rep-n and distinct-n;
2. per-token perplexity: on the human prefix + continuation windows, the share of tokens whose loss the
   interpolation raises, the perplexities, and how the overall change splits between improved and worsened tokens;
3. exposure bias: teacher-forced over prefix + continuation, the entropy of the retrieval distribution ``p_kNN`` and
   of ``p_LM`` at each continuation position, for the kNN-LM's own generations (first seed) and for the human text
   (least-squares slope per token, and mean of the last quarter minus the first).

Sizes: the defaults (all 146 held-out windows of 24 + 40 tokens, two seeds, two decoders) took 15 minutes on a shared
2-core CPU with one torch thread (more threads oversubscribe a shared CPU); the paper scores thousands of
WikiText-103 / Wikipedia prefixes with longer continuations, so MAUVE here (15 buckets) is much noisier: read the
per-seed figures, the k-means seeds and the bootstrap interval. Run in the background:

    nohup python -u scripts/bench_knn_lm_open_ended.py > /tmp/knn_bench.log 2>&1 &

Writes ``results/knn_lm_open_ended.json`` and ``results/knn_lm_open_ended.png``.
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import statistics
import sys
import time
from pathlib import Path

import torch
from tqdm.auto import tqdm

from hf_decoding_ext.bench.mauve import mauve, text_features
from hf_decoding_ext.core.models import load_model
from hf_decoding_ext.core.ngram import distinct_n, rep_n
from hf_decoding_ext.core.ngram_lm import stdlib_source_docstrings
from hf_decoding_ext.sampling.knn_lm import (
    KNNDatastore,
    KNNLMLogitsProcessor,
    default_datastore_path,
    stdlib_docs_texts,
    token_scores,
)

ROOT = Path(__file__).resolve().parent.parent


def split_texts() -> tuple[list[str], list[str]]:
    """The shipped corpus split by document as in ``tests/test_knn_lm.py``: every fifth docstring is held out."""
    texts = stdlib_docs_texts()
    return [t for i, t in enumerate(texts) if i % 5], [t for i, t in enumerate(texts) if i % 5 == 0]


def split_datastore(model, tokenizer) -> KNNDatastore:
    """The datastore of the 80% training split (cached next to the default datastore)."""
    path = default_datastore_path(model)
    path = path.with_name(path.name.replace("stdlib_docs", "stdlib_docs_split80"))
    if path.exists():
        return KNNDatastore.load(path)
    store = KNNDatastore.build(model, tokenizer, split_texts()[0])
    store.save(path)
    return store


def split_examples(tokenizer, prefix_tokens: int, new_tokens: int, limit: int) -> tuple[list[list[int]], int]:
    """Consecutive non-overlapping ``prefix + continuation`` windows of the held-out 20% docstrings (at most
    ``limit``, spread evenly)."""
    need = prefix_tokens + new_tokens
    windows = []
    for doc in split_texts()[1]:
        ids = tokenizer(doc, add_special_tokens=False)["input_ids"]
        windows += [ids[s:s + need] for s in range(0, len(ids) - need + 1, need)]
    return _spread(windows, limit), len(windows)


def _spread(windows: list[list[int]], limit: int) -> list[list[int]]:
    if len(windows) <= limit:
        return windows
    step = len(windows) / limit
    return [windows[int(i * step)] for i in range(limit)]


def held_out_examples(tokenizer, prefix_tokens: int, new_tokens: int, limit: int) -> tuple[list[list[int]], int]:
    """``limit`` token windows of ``prefix + continuation`` from stdlib docstrings outside the shipped corpus."""
    shipped = stdlib_docs_texts()
    heads = {t[:80] for t in shipped}

    def overlaps(doc: str) -> bool:
        return doc[:80] in heads or any(h in doc for h in heads) or any(doc[:80] in t for t in shipped)

    need = prefix_tokens + new_tokens
    windows = []
    for doc in stdlib_source_docstrings():
        ids = tokenizer(doc, add_special_tokens=False)["input_ids"]
        if len(ids) >= need and not overlaps(doc):
            windows.append(ids[:need])
    return _spread(windows, limit), len(windows)


def sample(model, prefixes: torch.Tensor, new_tokens: int, top_p: float, seed: int, processors) -> torch.Tensor:
    torch.manual_seed(seed)
    out = model.generate(input_ids=prefixes, attention_mask=torch.ones_like(prefixes), do_sample=True, top_p=top_p,
                         top_k=0, temperature=1.0, max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                         logits_processor=processors, pad_token_id=model.generation_config.pad_token_id)
    return out[:, prefixes.shape[1]:]


def repetition(rows: list[list[int]]) -> dict[str, float]:
    out = {f"rep_{n}": statistics.fmean(rep_n(r, n) for r in rows) for n in (2, 3, 4)}
    out.update({f"distinct_{n}": distinct_n(rows, n) for n in (1, 2, 3)})
    return out


def slope(values: list[float]) -> float:
    """Least-squares slope of ``values`` against their index."""
    n = len(values)
    mx, my = (n - 1) / 2, statistics.fmean(values)
    return sum((i - mx) * (v - my) for i, v in enumerate(values)) / sum((i - mx) ** 2 for i in range(n))


def teacher_forced(model, proc, windows: torch.Tensor, batch_size: int) -> dict[str, torch.Tensor]:
    """:func:`token_scores` with entropies over all ``windows`` (``(n, seq - 1)`` tensors)."""
    parts = [token_scores(model, proc, windows[s:s + batch_size], entropies=True)
             for s in tqdm(range(0, windows.shape[0], batch_size), desc="teacher-forced", file=sys.stdout,
                           mininterval=5)]
    return {name: torch.cat([p[name] for p in parts]) for name in parts[0]}


def entropy_profile(scores: dict[str, torch.Tensor], prefix_tokens: int) -> dict[str, list]:
    """Mean entropy (nats) of p_kNN and p_LM at each continuation position (``scores`` of :func:`teacher_forced`)."""
    # position t scores token t + 1: the continuation's tokens are the targets of positions prefix_tokens - 1 ...
    prof = {name: scores[name][:, prefix_tokens - 1:].double().mean(0).tolist()
            for name in ("entropy_knn", "entropy_lm")}
    q = max(1, len(prof["entropy_knn"]) // 4)
    for name in list(prof):
        vals = prof[name]
        prof[f"{name}_slope_per_token"] = slope(vals)
        prof[f"{name}_last_minus_first_quarter"] = statistics.fmean(vals[-q:]) - statistics.fmean(vals[:q])
    return prof


def per_token_perplexity(scores: dict[str, torch.Tensor]) -> dict[str, float]:
    """Finding (2) from the gold-token log-probabilities of :func:`teacher_forced` on human text."""
    lm, knn = scores["log_p_lm"].flatten().double(), scores["log_p_knn_lm"].flatten().double()
    delta = knn - lm  # > 0: the interpolation lowers the gold token's loss
    worse, better = delta < 0, delta > 0
    return {
        "tokens": int(lm.numel()),
        "ppl_lm": math.exp(-float(lm.mean())),
        "ppl_knn_lm": math.exp(-float(knn.mean())),
        "share_tokens_loss_up": float(worse.double().mean()),
        "share_tokens_loss_down": float(better.double().mean()),
        "mean_loss_change_where_up": float(-delta[worse].mean()) if bool(worse.any()) else 0.0,
        "mean_loss_change_where_down": float(-delta[better].mean()) if bool(better.any()) else 0.0,
        "total_nll_change_from_up_tokens": float(-delta[worse].sum()),
        "total_nll_change_from_down_tokens": float(-delta[better].sum()),
        "delta_log_prob_quantiles": {str(q): float(torch.quantile(delta, q)) for q in (0.05, 0.25, 0.5, 0.75, 0.95)},
        "delta_log_prob_histogram": torch.histc(delta.clamp(-3, 3).float(), bins=60, min=-3, max=3).tolist(),
    }


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(16, 4.5))
    ax = axes[0]
    for i, method in enumerate(("base", "knn-lm")):
        vals = [r["mauve"] for r in result["generation"][method]["per_seed"]]
        ax.bar(i, statistics.fmean(vals), color=("tab:blue", "tab:orange")[i], alpha=0.6)
        ax.scatter([i] * len(vals), vals, color="k", zorder=3, s=12)
    ax.set_xticks([0, 1], ["base LM", "kNN-LM"])
    ax.set_ylabel("MAUVE vs human continuations")
    ax.set_title("(1) open-ended quality (points: seeds)")
    ax = axes[1]
    ppl = result["per_token"]
    edges = torch.linspace(-3, 3, 61)
    ax.bar(((edges[:-1] + edges[1:]) / 2).tolist(), ppl["delta_log_prob_histogram"], width=0.1, color="tab:gray")
    ax.axvline(0, color="k", lw=0.8)
    ax.set_yscale("log")
    ax.set_xlabel("log p_kNN-LM(gold) - log p_LM(gold), clamped to [-3, 3]")
    ax.set_title(f"(2) loss up on {ppl['share_tokens_loss_up']:.0%} of tokens; "
                 f"ppl {ppl['ppl_lm']:.2f} -> {ppl['ppl_knn_lm']:.2f}")
    ax = axes[2]
    for name, style in (("knn-lm generations", "-"), ("human continuations", ":")):
        prof = result["entropy"][name]
        ax.plot(prof["entropy_knn"], style, color="tab:orange", label=f"p_kNN, {name}")
        ax.plot(prof["entropy_lm"], style, color="tab:blue", label=f"p_LM, {name}")
    ax.set_xlabel("continuation position")
    ax.set_ylabel("entropy (nats)")
    ax.set_title("(3) entropy along the continuation")
    ax.legend(fontsize=6)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def paired_bootstrap(human: torch.Tensor, base: torch.Tensor, knn: torch.Tensor, rounds: int) -> dict:
    """MAUVE difference (kNN-LM minus base) over ``rounds`` resamples of the examples (same indices for all three)."""
    gen = torch.Generator().manual_seed(1234)
    diffs = []
    for _ in tqdm(range(rounds), desc="bootstrap", file=sys.stdout, mininterval=5):
        idx = torch.randint(human.shape[0], (human.shape[0],), generator=gen)
        diffs.append(mauve(human[idx], knn[idx]).mauve - mauve(human[idx], base[idx]).mauve)
    diffs.sort()
    return {"rounds": rounds, "mean": statistics.fmean(diffs),
            "ci90": [diffs[int(0.05 * (rounds - 1))], diffs[round(0.95 * (rounds - 1))]],
            "share_knn_better": sum(d > 0 for d in diffs) / rounds}


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--held-out", choices=("split", "other-modules"), default="split",
                        help="split: datastore of 80%% of the shipped docstrings, held-out text the other 20%% (the "
                             "paper's setting: test text from the datastore's distribution); other-modules: the "
                             "default datastore (all shipped docstrings), held-out text the docstrings of other "
                             "stdlib modules (a domain shift)")
    parser.add_argument("--num-prefixes", type=int, default=160)
    parser.add_argument("--prefix-tokens", type=int, default=24)
    parser.add_argument("--new-tokens", type=int, default=40)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    parser.add_argument("--top-p", type=float, default=0.9)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--bootstrap", type=int, default=20, help="paired bootstrap rounds of the MAUVE difference")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (1 avoids oversubscription on a "
                                                               "shared CPU)")
    parser.add_argument("--out", default=str(ROOT / "results" / "knn_lm_open_ended.json"))
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    start = time.time()
    model, tokenizer = load_model()
    if args.held_out == "split":
        proc = KNNLMLogitsProcessor.for_model(model, tokenizer, datastore=split_datastore(model, tokenizer))
        rows, available = split_examples(tokenizer, args.prefix_tokens, args.new_tokens, args.num_prefixes)
        datastore_source = "hf_decoding_ext/data/stdlib_docs.jsonl, the 80% of docstrings with index % 5 != 0"
        held_out_source = ("hf_decoding_ext/data/stdlib_docs.jsonl, the 20% of docstrings with index % 5 == 0, cut "
                           "into consecutive non-overlapping prefix + continuation windows")
    else:
        proc = KNNLMLogitsProcessor.for_model(model, tokenizer)  # registered defaults, default datastore
        rows, available = held_out_examples(tokenizer, args.prefix_tokens, args.new_tokens, args.num_prefixes)
        datastore_source = "hf_decoding_ext/data/stdlib_docs.jsonl (all docstrings)"
        held_out_source = ("installed stdlib top-level module docstrings not overlapping the shipped corpus "
                           f"(Python {platform.python_version()})")
    print(f"{len(rows)} examples of {available} available; datastore {len(proc.datastore)} entries", flush=True)
    windows = torch.tensor(rows)
    prefixes, human = windows[:, :args.prefix_tokens], windows[:, args.prefix_tokens:]
    human_rows = human.tolist()
    human_features = text_features(model, human_rows)
    generation = {"base": {"per_seed": []}, "knn-lm": {"per_seed": []}}
    generated, features = {}, {}
    batches = range(0, len(rows), args.batch_size)
    with tqdm(total=len(args.seeds) * len(batches) * 2, desc="sampling", file=sys.stdout, mininterval=5) as bar:
        for seed in args.seeds:
            for method, processors in (("base", []), ("knn-lm", [proc])):
                outs = []
                for b, s in enumerate(batches):
                    outs.append(sample(model, prefixes[s:s + args.batch_size], args.new_tokens, args.top_p,
                                       seed * 100_003 + b, processors))
                    bar.update(1)
                conts = torch.cat(outs)
                generated[(method, seed)] = conts
                cont_rows = conts.tolist()
                features[(method, seed)] = text_features(model, cont_rows)
                res = mauve(human_features, features[(method, seed)])
                entry = {"seed": seed, "mauve": res.mauve, "num_buckets": res.num_buckets,
                         "mauve_kmeans_seeds": [mauve(human_features, features[(method, seed)], seed=k).mauve
                                                for k in range(1, 5)]}
                entry.update(repetition(cont_rows))
                generation[method]["per_seed"].append(entry)
                print(f"seed {seed} {method}: MAUVE {entry['mauve']:.3f} rep-2 {entry['rep_2']:.3f} "
                      f"distinct-2 {entry['distinct_2']:.3f}", flush=True)
    for method, g in generation.items():
        for key in ("mauve", "rep_2", "rep_3", "rep_4", "distinct_1", "distinct_2", "distinct_3"):
            vals = [r[key] for r in g["per_seed"]]
            g[key] = statistics.fmean(vals)
            g[f"{key}_std_over_seeds"] = statistics.stdev(vals) if len(vals) > 1 else None
    seed0 = args.seeds[0]
    bootstrap = paired_bootstrap(human_features, features[("base", seed0)], features[("knn-lm", seed0)],
                                 args.bootstrap)
    print("teacher-forced scores: human text (findings 2 and 3), kNN-LM generations (finding 3) ...", flush=True)
    human_scores = teacher_forced(model, proc, windows, args.batch_size)
    per_token = per_token_perplexity(human_scores)
    knn_windows = torch.cat([prefixes, generated[("knn-lm", seed0)]], 1)
    entropy = {"knn-lm generations": entropy_profile(teacher_forced(model, proc, knn_windows, args.batch_size),
                                                     args.prefix_tokens),
               "human continuations": entropy_profile(human_scores, args.prefix_tokens)}
    proc.remove()
    diffs = [k["mauve"] - b["mauve"] for k, b in zip(generation["knn-lm"]["per_seed"], generation["base"]["per_seed"])]
    gen_k, hum = entropy["knn-lm generations"], entropy["human continuations"]
    verdict = {
        "perplexity_improves": per_token["ppl_knn_lm"] < per_token["ppl_lm"],
        "mauve_knn_minus_base_per_seed": diffs,
        # an improvement must hold on every seed and on the bootstrap's 90% interval
        "mauve_improves": all(d > 0 for d in diffs) and bootstrap["ci90"][0] > 0,
        "loss_up_for_majority_of_tokens": per_token["share_tokens_loss_up"] > 0.5,
        "retrieval_entropy_grows_faster_on_generated_text": (
            gen_k["entropy_knn_slope_per_token"] > gen_k["entropy_lm_slope_per_token"]),
        "retrieval_entropy_grows_faster_on_human_text": (
            hum["entropy_knn_slope_per_token"] > hum["entropy_lm_slope_per_token"]),
    }
    verdict["finding_1_reproduced"] = verdict["perplexity_improves"] and not verdict["mauve_improves"]
    result = {
        "paper": "KNN-LM Does Not Improve Open-ended Text Generation (Wang et al., 2023, arXiv:2305.14625)",
        "model": Path(str(getattr(model, "name_or_path", ""))).name,
        "held_out_mode": args.held_out,
        "datastore": {"source": datastore_source,
                      "entries": len(proc.datastore), "k": proc.k, "lmbda": proc.lmbda,
                      "temperature": proc.temperature},
        "held_out": {"source": held_out_source, "windows_available": available, "examples": len(rows)},
        "settings": {"prefix_tokens": args.prefix_tokens, "new_tokens": args.new_tokens, "top_p": args.top_p,
                     "top_k": 0, "temperature": 1.0, "seeds": args.seeds,
                     "mauve": "hf_decoding_ext.bench.mauve: c=5, 25 mixture weights, PCA 0.9, k-means 5 restarts, "
                              "buckets round(n/10); features = this model's final hidden state at the last token "
                              "of the continuation alone, not GPT-2 large"},
        "generation": generation,
        "mauve_difference_bootstrap": bootstrap,
        "human_continuations": repetition(human_rows),
        "per_token": per_token,
        "entropy": entropy,
        "verdict": verdict,
        "wall_s": round(time.time() - start, 1),
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    plot(result, out.with_suffix(".png"))
    print(json.dumps({"verdict": verdict, "base_mauve": generation["base"]["mauve"],
                      "knn_mauve": generation["knn-lm"]["mauve"], "bootstrap": bootstrap,
                      "ppl": [per_token["ppl_lm"], per_token["ppl_knn_lm"]],
                      "share_up": per_token["share_tokens_loss_up"], "wall_s": result["wall_s"]}, indent=2))
    return result


if __name__ == "__main__":
    main()
