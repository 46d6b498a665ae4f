"""Copy the JSONSchemaBench sample from the shared reference folder into the package (run once, at development time).

    python scripts/import_jsonschemabench.py --source <folder of the JSONSchemaBench sample>

Writes ``hf_decoding_ext/data/jsonschemabench/{schemas,maskbench}.jsonl.gz`` (compact JSON, one record per line) and
copies the provenance note. The package never reads the shared folder at run or test time.
"""

from __future__ import annotations

import argparse
import gzip
import json
import shutil
from pathlib import Path

OUT = Path(__file__).resolve().parents[1] / "hf_decoding_ext" / "data" / "jsonschemabench"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--source", required=True, help="folder with data/<subset>/*.json and maskbench/data/*.json")
    args = ap.parse_args(argv)
    src = Path(args.source)
    OUT.mkdir(parents=True, exist_ok=True)
    rows = []
    for subset in ("Glaiveai2K", "Github_easy"):
        for f in sorted((src / "data" / subset).glob("*.json")):
            rows.append({"subset": subset, "id": f.stem, "schema": json.loads(f.read_text())})
    _write(OUT / "schemas.jsonl.gz", rows)
    rows = []
    for f in sorted((src / "maskbench" / "data").glob("*.json")):
        subset, _, ident = f.stem.partition("---")
        d = json.loads(f.read_text())
        rows.append({"subset": subset, "id": ident, "description": d.get("description"),
                     "features": (d.get("meta") or {}).get("features", []), "schema": d["schema"], "tests": d["tests"]})
    _write(OUT / "maskbench.jsonl.gz", rows)
    shutil.copy(src / "PROVENANCE.md", OUT / "UPSTREAM_PROVENANCE.md")
    shutil.copy(src / "SOURCE_COMMIT.txt", OUT / "SOURCE_COMMIT.txt")
    print(f"wrote {OUT}")
    return 0


def _write(path: Path, rows: list[dict]) -> None:
    text = "\n".join(json.dumps(r, separators=(",", ":"), ensure_ascii=False) for r in rows) + "\n"
    path.write_bytes(gzip.compress(text.encode(), 9, mtime=0))
    print(f"{path.name}: {len(rows)} records, {path.stat().st_size / 1e6:.2f} MB")


if __name__ == "__main__":
    raise SystemExit(main())
