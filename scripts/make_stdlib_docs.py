"""Build hf_decoding_ext/data/stdlib_docs.jsonl: docstrings of Python standard-library objects (PSF license)."""
import importlib, inspect, json
mods = ["json","collections","itertools","functools","os.path","pathlib","re","string","textwrap","datetime",
        "heapq","bisect","statistics","random","math","shutil","tempfile","csv","argparse","logging",
        "subprocess","threading","queue","hashlib","base64","urllib.parse","email.message","http.client",
        "sqlite3","zipfile","tarfile","gzip","io","enum","dataclasses","typing","contextlib","unittest",
        "difflib","fractions","decimal","copy","pprint","operator","uuid","glob","fnmatch","time","calendar","secrets"]
out = []
for name in mods:
    mod = importlib.import_module(name)
    doc = inspect.getdoc(mod)
    if doc and len(doc) > 200:
        out.append({"source": name, "kind": "module", "text": doc})
    for attr, obj in sorted(vars(mod).items()):
        if attr.startswith("_") or getattr(obj, "__module__", None) != mod.__name__:
            continue
        if not (inspect.isclass(obj) or inspect.isfunction(obj)):
            continue
        d = inspect.getdoc(obj)
        if d and len(d) >= 200:
            out.append({"source": f"{name}.{attr}", "kind": "class" if inspect.isclass(obj) else "function", "text": d})
with open("hf_decoding_ext/data/stdlib_docs.jsonl", "w") as f:
    for r in out:
        f.write(json.dumps(r) + "\n")
print(len(out), sum(len(r["text"]) for r in out))
