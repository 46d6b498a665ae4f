"""Collect the held-out top-1 accuracy per depth of trained draft heads into one committed JSON (issue 23).

Every checkpoint written by ``hf-decoding-ext train`` stores, in ``config.json["training"]``, the trainer's
teacher-forced held-out evaluation (``heldout_top1`` per depth, over the same 120 held-out distillation sequences) and
the number of training positions. This script gathers them, for the shipped heads and for the comparison baselines
(Medusa / EAGLE trained at the same budget on the same data, which are not shipped), so that an equal-budget
comparison is one committed file rather than figures copied by hand:

    python scripts/heldout_accuracy_table.py clover=hf_decoding_ext/data/heads/smollm2-135m-instruct-clover \\
        medusa-600k=/work/distill/baselines/medusa-600k --out results/trained_heads_heldout.json

Existing entries of ``--out`` are kept (a later run adds or replaces named entries).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

FIELDS = ("heldout_top1", "positions", "steps", "batch_size", "lr", "heldout_sequences", "train_seconds")


def entry(path: Path) -> dict:
    config = json.loads((path / "config.json").read_text())
    training = config.get("training", {})
    if "heldout_top1" not in training:
        raise ValueError(f"{path}/config.json has no training.heldout_top1: not a checkpoint of `hf-decoding-ext train`")
    out = {"model_type": config.get("model_type"), "draft_vocab_size": config.get("draft_vocab_size")}
    out.update({k: training[k] for k in FIELDS if k in training})
    out["budget"] = training.get("budget", {}).get("positions")
    return out


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("runs", nargs="+", help="NAME=CHECKPOINT_DIR")
    parser.add_argument("--out", default="results/trained_heads_heldout.json")
    args = parser.parse_args(argv)
    out = Path(args.out)
    table = json.loads(out.read_text()) if out.exists() else {}
    table.setdefault("about", "trainer's teacher-forced held-out top-1 per depth (120 held-out distillation "
                              "sequences, 8192-token draft vocabulary, seed 0); scripts/heldout_accuracy_table.py")
    heads = table.setdefault("heads", {})
    for item in args.runs:
        name, _, path = item.partition("=")
        if not path:
            raise ValueError(f"expected NAME=CHECKPOINT_DIR, got {item!r}")
        heads[name] = entry(Path(path))
        print(name, heads[name]["heldout_top1"], heads[name].get("positions"))
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(table, indent=1) + "\n")


if __name__ == "__main__":
    main()
