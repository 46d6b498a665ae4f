"""Build the DReSD datastore shipped for the default model (issue 19).

    python scripts/build_dresd_datastore.py [--responses results/direct_alignment/responses-greedy.jsonl.gz]

The keys are SmolLM2-135M-Instruct's last-layer hidden states at every position of its own greedy responses to the
360 distillation prompts (``hf_decoding_ext/data/prompts/distill.jsonl``, never the benchmark prompts; the responses
were generated for the Direct Alignment draft, see ``results/direct_alignment/README.md``), reduced by PCA to 64
dimensions and normalised; each key stores the 20 tokens that followed (the official DReSD README's defaults).
Writes ``hf_decoding_ext/data/dresd/datastore.safetensors`` (progress on stderr).
"""

from __future__ import annotations

import argparse
import gzip
import json
from pathlib import Path

from hf_decoding_ext.core.models import load_model
from hf_decoding_ext.core.resources import data_path
from hf_decoding_ext.speculative.drafters.dresd import DATASTORE_NAME, DReSDDatastore


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--responses", default="results/direct_alignment/responses-greedy.jsonl.gz")
    ap.add_argument("--pca-dim", type=int, default=64)
    ap.add_argument("--stored", type=int, default=20)
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    rows = [json.loads(line) for line in gzip.open(args.responses, "rt") if line.strip()]
    model, _ = load_model()
    store = DReSDDatastore.build(model, [(r["prompt_ids"], r["response_ids"]) for r in rows], pca_dim=args.pca_dim,
                                 stored=args.stored,
                                 meta={"source": f"{Path(args.responses).name}: greedy responses to {len(rows)} "
                                                 "distillation prompts"})
    out = store.save(args.out or data_path(*DATASTORE_NAME))
    print(f"{len(store)} keys, {store.keys.shape[1]} dims -> {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
