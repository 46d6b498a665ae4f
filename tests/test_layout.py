"""The package layout: core imports nothing above it, the face exports resolve, old import paths still work."""

from __future__ import annotations

import ast
import importlib
import pathlib
import subprocess
import sys
import warnings

import pytest

import hf_decoding_ext
from hf_decoding_ext import _legacy

PACKAGE = pathlib.Path(hf_decoding_ext.__file__).parent


def _imported_modules(path: pathlib.Path) -> set[str]:
    tree = ast.parse(path.read_text(encoding="utf-8"))
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # relative import: resolve against the file's package
                base = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)[:-node.level]
                names.add(".".join(base + ([node.module] if node.module else [])))
            elif node.module:
                names.add(node.module)
    return names


def test_core_imports_nothing_above_core():
    offenders = {}
    for path in (PACKAGE / "core").rglob("*.py"):
        above = {m for m in _imported_modules(path)
                 if m.startswith("hf_decoding_ext") and not m.startswith("hf_decoding_ext.core")}
        if above:
            offenders[str(path.relative_to(PACKAGE))] = sorted(above)
    assert offenders == {}


def test_no_family_imports_the_legacy_paths():
    old = set(_legacy.MOVED)
    offenders = {}
    for path in PACKAGE.rglob("*.py"):
        if path.name == "_legacy.py":
            continue
        used = {m for m in _imported_modules(path) if m in old}
        if used:
            offenders[str(path.relative_to(PACKAGE))] = sorted(used)
    assert offenders == {}


@pytest.mark.parametrize("name", hf_decoding_ext.__all__)
def test_face_names_resolve(name):
    assert getattr(hf_decoding_ext, name) is not None


def test_face_is_the_same_object_as_its_home():
    from hf_decoding_ext.core.loop import DecodingLoop
    from hf_decoding_ext.plug import generate_kwargs

    assert hf_decoding_ext.DecodingLoop is DecodingLoop
    assert hf_decoding_ext.generate_kwargs is generate_kwargs
    with pytest.raises(AttributeError, match="no attribute 'nope'"):
        hf_decoding_ext.nope  # noqa: B018


def test_old_import_paths_alias_the_new_modules_with_a_warning():
    # a fresh interpreter, so that no old name is already in sys.modules
    code = (
        "import warnings, importlib\n"
        "import hf_decoding_ext\n"
        "from hf_decoding_ext._legacy import MOVED\n"
        "for old, new in sorted(MOVED.items()):\n"
        "    with warnings.catch_warnings(record=True) as caught:\n"
        "        warnings.simplefilter('always')\n"
        "        module = importlib.import_module(old)\n"
        "    assert module is importlib.import_module(new), (old, new)\n"
        "    assert any(issubclass(w.category, DeprecationWarning) and new in str(w.message) for w in caught), old\n"
        "print(len(MOVED))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True)
    assert out.stdout.strip() == str(len(_legacy.MOVED))


def test_old_from_import_gives_the_same_class():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        old = importlib.import_module("hf_decoding_ext.processors.mirostat")
    from hf_decoding_ext.sampling.mirostat import MirostatV2LogitsProcessor

    assert old.MirostatV2LogitsProcessor is MirostatV2LogitsProcessor


def test_every_module_imports():
    import pkgutil

    for info in pkgutil.walk_packages(hf_decoding_ext.__path__, "hf_decoding_ext."):
        if info.name.endswith("__main__"):
            continue
        importlib.import_module(info.name)
