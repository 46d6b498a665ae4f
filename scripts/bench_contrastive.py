"""Contrastive and guidance family on the default model: writes results/contrastive_quality.{json,png}.

Usage: python scripts/bench_contrastive.py [--limit N] [--sections knowledge_conflict factual_mc ...] [--no-lol]
"""

import argparse

import torch

from hf_decoding_ext.bench.contrastive import SECTIONS, run_contrastive_quality


def main():
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--limit", type=int, default=None, help="first N items of each data set")
    ap.add_argument("--sections", nargs="*", choices=SECTIONS, default=None)
    ap.add_argument("--no-lol", action="store_true")
    ap.add_argument("--out", default="results")
    ap.add_argument("--threads", type=int, default=None)
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    res = run_contrastive_quality(out_dir=args.out, limit=args.limit, lol=not args.no_lol, sections=args.sections)
    for key in SECTIONS:
        if key in res:
            sec = res[key]
            print(key, sec.get("rates") or sec.get("accuracy") or sec.get("metrics"))


if __name__ == "__main__":
    main()
