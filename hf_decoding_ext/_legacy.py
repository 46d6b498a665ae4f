"""Old import paths (before the core/family layout), kept for one release.

``hf_decoding_ext.processors.mirostat``, ``hf_decoding_ext.loops.cautious``, ``hf_decoding_ext.generation.loop``,
``hf_decoding_ext.utils.*``, ``hf_decoding_ext.models``, ``hf_decoding_ext.api``, ``hf_decoding_ext.speculative.tree``,
``hf_decoding_ext.speculative.kv``, ``hf_decoding_ext.contrastive.eval`` and ``hf_decoding_ext.structured.constrained``
still import: a meta-path finder maps
each old name to the module that now holds the code (the same module object, so classes compare equal) and emits a
``DeprecationWarning``. This file goes in the next release; new code imports the new paths.
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.machinery
import sys
import warnings

MOVED = {
    "hf_decoding_ext.api": "hf_decoding_ext.plug",
    "hf_decoding_ext.models": "hf_decoding_ext.core.models",
    "hf_decoding_ext.generation": "hf_decoding_ext.core",
    "hf_decoding_ext.generation.loop": "hf_decoding_ext.core.loop",
    "hf_decoding_ext.utils": "hf_decoding_ext.core",
    "hf_decoding_ext.utils.entropy": "hf_decoding_ext.core.entropy",
    "hf_decoding_ext.utils.ngram": "hf_decoding_ext.core.ngram",
    "hf_decoding_ext.utils.ngram_lm": "hf_decoding_ext.core.ngram_lm",
    "hf_decoding_ext.utils.rows": "hf_decoding_ext.core.rows",
    "hf_decoding_ext.utils.small_batch_linear": "hf_decoding_ext.core.kernels",
    "hf_decoding_ext.speculative.tree": "hf_decoding_ext.core.tree",
    "hf_decoding_ext.speculative.kv": "hf_decoding_ext.core.kv",
    "hf_decoding_ext.processors": "hf_decoding_ext.sampling",
    "hf_decoding_ext.processors.mirostat": "hf_decoding_ext.sampling.mirostat",
    "hf_decoding_ext.processors.adaptive_topk": "hf_decoding_ext.sampling.adaptive_topk",
    "hf_decoding_ext.processors.momentum": "hf_decoding_ext.sampling.momentum",
    "hf_decoding_ext.processors.knn_lm": "hf_decoding_ext.sampling.knn_lm",
    "hf_decoding_ext.loops": "hf_decoding_ext.sampling",
    "hf_decoding_ext.loops.adadec": "hf_decoding_ext.sampling.adadec",
    "hf_decoding_ext.loops.cautious": "hf_decoding_ext.sampling.cautious",
    "hf_decoding_ext.loops.superposed": "hf_decoding_ext.sampling.superposed",
    "hf_decoding_ext.loops.ips": "hf_decoding_ext.sampling.ips",
    "hf_decoding_ext.contrastive.eval": "hf_decoding_ext.bench.tasks.contrastive",
    "hf_decoding_ext.structured.constrained": "hf_decoding_ext.structured.json_schema",
}


class _AliasLoader(importlib.abc.Loader):
    def __init__(self, target: str):
        self.target = target

    def create_module(self, spec):
        return importlib.import_module(self.target)

    def exec_module(self, module):  # the target module is already executed
        pass


class _MovedModuleFinder(importlib.abc.MetaPathFinder):
    """Resolves an old module name in :data:`MOVED` to its new module, with a ``DeprecationWarning``."""

    def find_spec(self, fullname, path=None, target=None):
        new = MOVED.get(fullname)
        if new is None:
            return None
        warnings.warn(f"{fullname} moved to {new}; the old path goes in the next release", DeprecationWarning,
                      stacklevel=2)
        return importlib.machinery.ModuleSpec(fullname, _AliasLoader(new), is_package=new.count(".") < 2)


def install() -> None:
    """Put the finder on ``sys.meta_path`` once."""
    if not any(isinstance(f, _MovedModuleFinder) for f in sys.meta_path):
        sys.meta_path.insert(0, _MovedModuleFinder())
