"""CPU kernels for linear layers while decoding: the fastest product per layer shape and row count, by measurement.

PyTorch computes ``nn.Linear`` as ``x @ W.T`` (``addmm`` with a transposed weight). On CPU that is not always the
fastest way to compute the same product for the few rows of a decoding step (1 row) or of a speculative verification
forward (2 to a few dozen rows). On the 2-core development machine (MKL on AMD) the 1-row product of the default
model's lm_head (49152 x 576, float32) ran at a fraction of the memory bandwidth, and 2-8 rows cost 2-3x one row.
Other CPU paths PyTorch offers compute the same product faster there:

* ``"pytorch"``: ``torch.nn.functional.linear`` (PyTorch's default layout);
* ``"weight_left"``: ``(W @ x.T).T``, the weight as the left, row-major operand;
* ``"padded_weight_left"``: for 1 row only, the row padded to 2 rows in the weight-left layout (MKL's matrix-vector
  kernel is the slow path, a 2-column product is not);
* ``"onednn"``: oneDNN's linear with the weight prepacked once (``torch.ops.mkldnn._reorder_linear_weight`` and
  ``torch.ops.mkldnn._linear_pointwise``, the kernels inductor's CPU backend emits for linear layers), float32 and
  bfloat16 (AVX512-BF16 / AMX where the CPU has them).

:func:`fast_kernels` patches a model's eligible linear layers for the duration of a ``with`` block (instance
attributes only, restored on exit; no global state). Each layer then dispatches every call, by its number of rows, to
the kernel of a :class:`KernelPlan`. ``plan="auto"`` (default) measures the candidates on each distinct
``(dtype, out_features, in_features)`` shape at a few row counts the first time the shape is seen on this machine (a
short interleaved microbenchmark with the layer's own weights, a few seconds for the default model) and caches the
choice in ``$HF_DECODING_EXT_CACHE/kernel_plans/`` per machine (CPU model, thread count, torch version) and dtype;
later runs read the cache. ``plan="pytorch"`` (or any kernel name) forces one kernel; a :class:`KernelPlan` or a
dict overrides the choice; the environment variable ``HF_DECODING_EXT_KERNELS`` (a kernel name) replaces ``"auto"``
everywhere, e.g. ``HF_DECODING_EXT_KERNELS=pytorch`` to switch the feature off.

All kernels compute the same product up to the summation order (logits differ in the last bits, ~1e-5 for the
default model): greedy decoding with them equals PyTorch's greedy decoding token for token except at floating-point
near-ties of the top-2 logits (the lossless tests tally them). Layers that are not a plain ``nn.Linear`` (GPT-2's
``Conv1D``, quantised or LoRA layers), not on CPU, not float32/bfloat16, wrapped by accelerate hooks, or with their
forward already overridden are left alone; with autograd enabled a call planned for ``"onednn"`` keeps PyTorch's
kernel (the prepacked weight carries no gradient); on GPU :func:`fast_kernels` is a no-op.

Memory: a layer whose plan uses ``"onednn"`` at some row count gets a prepacked copy of its weight, built at the
first ``with`` block and kept (weakly, per weight tensor) for later ones, so a generation does not pay the repacking
(about 0.2 s for the default model); :attr:`PatchReport.extra_bytes` says how much is held (for the default model in
float32 about 0.5 GB, a second copy of the linear weights) and :func:`release_packed` frees it.

``plan="lean"`` (the automatic plan's choices, one copy of the weights): a layer planned for oneDNN at some row count
runs oneDNN at every row count, and for the duration of the block its ``weight`` is an empty tensor while the packed
copy does the work, so no second copy is resident:

* weights memory-mapped from a checkpoint file (``from_pretrained``'s safetensors loading): the original tensor is
  kept aside and its pages are handed back to the kernel (``madvise(MADV_PAGEOUT)``, Linux 5.4+; clean file pages
  are dropped, never lost, and read back from the file when the weight is used after the block); on exit the original
  tensor is put back unchanged;
* weights in anonymous memory: the dense storage is freed (and returned to the system with glibc's ``malloc_trim``),
  and rebuilt bit-exactly from the packed weight on exit.

It costs the packing at every block (about 0.2-0.3 s per ``generate()`` call for the default model) and is meant for
long inputs, where memory matters. Output embeddings and weights shared with another module (a tied lm_head) keep the
two-copy scheme. Code reading a lean layer's ``weight`` inside the block gets an empty tensor and fails loudly, and
calls with autograd enabled raise: it is for inference only.

Deviation note for benchmarks: this is a kernel choice, not part of any paper's method. Every speed table of this
library reports the method against greedy decoding *with the same kernels* (the method's own speed-up) beside stock
greedy ``generate()``.

Example:
    >>> import torch
    >>> from hf_decoding_ext.core.kernels import fast_kernels
    >>> layer = torch.nn.Linear(8, 4)
    >>> x = torch.randn(3, 8)
    >>> with torch.no_grad(), fast_kernels(layer, plan="weight_left") as report:
    ...     y = layer(x)
    >>> report.patched, torch.allclose(y, torch.nn.functional.linear(x, layer.weight, layer.bias), atol=1e-5)
    (1, True)
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import statistics
import time
import types
import weakref
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

__all__ = [
    "KERNELS", "ROW_BUCKETS", "KernelPlan", "PatchReport", "available_kernels", "eligible", "fast_kernels",
    "measure_plan", "release_packed", "small_batch_linear",
]

KERNELS = ("pytorch", "weight_left", "padded_weight_left", "onednn")
"""The kernels a plan can choose from (see the module docstring)."""

_CODE = {name: i for i, name in enumerate(KERNELS)}

ROW_BUCKETS = (1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 48, 64, 256)
"""Row counts the automatic plan measures; a call with ``r`` rows uses the choice of the smallest bucket ``>= r``
(above the last bucket: the last bucket's choice)."""

DTYPES = (torch.float32, torch.bfloat16)
"""Weight dtypes the kernels are used for (others keep PyTorch's kernel)."""

DEFAULT_MAX_ROWS = 32
"""Row limit of the legacy :func:`small_batch_linear` (weight-left for 2 to this many rows)."""

_PLAN_VERSION = 3

LEAN = "lean"
"""The plan name of the single-copy mode (see the module docstring)."""

_SHARED: dict = {}
"""Plans shared within the process: one per kernel name, one automatic plan per cache folder and thread count."""


def _onednn_ok(dtype: torch.dtype) -> bool:
    if not (torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise")
            and hasattr(torch.ops.mkldnn, "_reorder_linear_weight")):
        return False
    if dtype == torch.bfloat16:
        check = getattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", None)
        try:
            return bool(check()) if check is not None else False
        except Exception:  # noqa: BLE001 - a build without the query
            return False
    return dtype == torch.float32


def available_kernels(dtype: torch.dtype = torch.float32, rows: int = 2) -> tuple[str, ...]:
    """Kernels that can run a ``rows``-row product in ``dtype`` on this CPU build (``padded_weight_left`` is a 1-row
    kernel; ``onednn`` needs oneDNN, and AVX512-BF16 support for bfloat16)."""
    names = ["pytorch", "weight_left"]
    if rows == 1:
        names.append("padded_weight_left")
    if _onednn_ok(dtype):
        names.append("onednn")
    return tuple(names)


def eligible(module: nn.Module) -> bool:
    """Whether ``module`` is a plain float32/bfloat16 ``nn.Linear`` on CPU without accelerate hooks or a forward
    override (the layers :func:`fast_kernels` may patch)."""
    return (type(module) is nn.Linear and module.weight.device.type == "cpu" and module.weight.dtype in DTYPES
            and not hasattr(module, "_hf_hook") and "forward" not in module.__dict__)


def _shape_key(layer: nn.Linear) -> str:
    dtype = str(layer.weight.dtype).removeprefix("torch.")
    return f"{dtype}:{layer.out_features}x{layer.in_features}"


_PACKED: dict[int, tuple] = {}
"""Prepacked oneDNN weights kept across ``with`` blocks: ``id(weight) -> (weakref, (data_ptr, version), packed)``;
an entry dies with its weight and is rebuilt when the weight changes in place."""


def _prepack(layer: nn.Linear) -> torch.Tensor:
    """The layer's weight prepacked for oneDNN's linear (cached per weight tensor, see :func:`release_packed`)."""
    weight = layer.weight
    stamp = (weight.data_ptr(), weight._version)
    hit = _PACKED.get(id(weight))
    if hit is not None and hit[0]() is weight and hit[1] == stamp:
        return hit[2]
    packed = torch.ops.mkldnn._reorder_linear_weight(weight.detach(), None)
    key = id(weight)
    _PACKED[key] = (weakref.ref(weight, lambda _ref, key=key: _PACKED.pop(key, None)), stamp, packed)
    return packed


def release_packed(*modules: nn.Module) -> int:
    """Drop the cached prepacked weights of ``modules``' layers (all of them when called without arguments); returns
    the bytes released. They are rebuilt at the next :func:`fast_kernels` block that needs them."""
    if modules:
        keys = {id(m.weight) for root in modules for m in root.modules() if isinstance(m, nn.Linear)}
    else:
        keys = set(_PACKED)
    freed = 0
    for key in keys & set(_PACKED):
        ref, _, packed = _PACKED.pop(key)
        freed += packed.numel() * packed.element_size() if ref() is not None else 0
    return freed


_MADV_PAGEOUT = 21


def _libc():
    import ctypes

    try:
        return ctypes.CDLL(None, use_errno=True)
    except OSError:
        return None


def _file_mappings() -> list[tuple[int, int]]:
    """``(start, end)`` of this process's memory mappings backed by a file (Linux ``/proc/self/maps``; empty
    elsewhere)."""
    spans = []
    try:
        with open("/proc/self/maps", encoding="utf-8", errors="replace") as f:
            for line in f:
                parts = line.split(maxsplit=5)
                if len(parts) == 6 and parts[5].startswith("/"):
                    start, end = (int(x, 16) for x in parts[0].split("-"))
                    spans.append((start, end))
    except OSError:
        return []
    return spans


def _in_file_mapping(tensor: torch.Tensor, spans) -> bool:
    ptr, size = tensor.data_ptr(), tensor.numel() * tensor.element_size()
    return any(start <= ptr and ptr + size <= end for start, end in spans)


def _page_out(tensor: torch.Tensor, libc) -> None:
    """Ask the kernel to reclaim the whole pages under ``tensor`` (a hint: clean file pages are dropped and re-read
    on the next access; nothing is lost)."""
    import ctypes
    import mmap

    ptr, size = tensor.data_ptr(), tensor.numel() * tensor.element_size()
    start = -(-ptr // mmap.PAGESIZE) * mmap.PAGESIZE
    end = (ptr + size) // mmap.PAGESIZE * mmap.PAGESIZE
    if libc is not None and end > start:
        libc.madvise(ctypes.c_void_p(start), ctypes.c_size_t(end - start), _MADV_PAGEOUT)


def _trim(libc) -> None:
    """Return freed heap memory to the system (glibc only; a no-op elsewhere)."""
    trim = getattr(libc, "malloc_trim", None) if libc is not None else None
    if trim is not None:
        trim(0)


def _run(kind: int, x2: torch.Tensor, weight: torch.Tensor, bias, packed) -> torch.Tensor:
    """The ``(rows, out)`` product of a 2-D ``x2`` with kernel ``kind`` (an index into :data:`KERNELS`)."""
    if kind == 3:
        return torch.ops.mkldnn._linear_pointwise(x2, packed, bias, "none", [], "")
    if kind == 1 or (kind == 2 and x2.shape[0] != 1):
        y = (weight @ x2.T).T.contiguous()
    elif kind == 2:
        y = (weight @ torch.cat([x2, x2]).T).T[:1].contiguous()
    else:
        return nn.functional.linear(x2, weight, bias)
    if bias is not None:
        y += bias
    return y


def _forward(self, x: torch.Tensor) -> torch.Tensor:
    features = x.shape[-1]
    rows = x.numel() // features if features else 0
    table = self._hk_table
    kind = table[rows] if rows < len(table) else table[-1]
    if kind == 0 or rows == 0 or x.dtype != self.weight.dtype or (kind == 3 and torch.is_grad_enabled()):
        weight = self.weight
        if self._hk_lean:  # the dense weight is out of memory (a lean layer is oneDNN at every row count)
            if torch.is_grad_enabled():
                raise RuntimeError("fast_kernels(plan='lean') frees the dense weights during the block: it is for "
                                   "inference only (run under torch.no_grad() or torch.inference_mode())")
            weight = self._hk_packed.to_dense()
        return nn.functional.linear(x, weight, self.bias)
    y = _run(kind, x.reshape(rows, features), self.weight, self.bias, self._hk_packed)
    return y.reshape(*x.shape[:-1], y.shape[-1])


@dataclass
class KernelPlan:
    """Which kernel each linear shape uses at each row count.

    Args:
        choices: ``{shape_key: {rows: kernel}}`` with ``shape_key = "<dtype>:<out>x<in>"`` (e.g.
            ``"float32:576x576"``), ``rows`` a bucket of :data:`ROW_BUCKETS` (or any positive int) and ``kernel`` a
            name of :data:`KERNELS`. A call with ``r`` rows uses the entry of the smallest listed row count ``>= r``
            (above the largest: the largest's).
        default: the kernel for shapes not in ``choices`` (``None``: measure them when ``auto``, else PyTorch's).
        auto: measure unknown shapes on first use and store them in the machine's cache file.
        timings: the measured milliseconds ``{shape_key: {rows: {kernel: ms}}}`` behind automatic choices.
        lean: one copy of the weights (``plan="lean"``, see the module docstring): layers planned for oneDNN at some
            row count use it at every row count, with their dense weight freed during the block.

    Example:
        >>> plan = KernelPlan({"float32:4x8": {1: "pytorch", 8: "weight_left"}})
        >>> plan.table("float32:4x8", 10)
        ['pytorch', 'pytorch', 'weight_left', 'weight_left', 'weight_left', 'weight_left', 'weight_left', \
'weight_left', 'weight_left', 'weight_left']
    """

    choices: dict = field(default_factory=dict)
    default: str | None = None
    auto: bool = False
    timings: dict = field(default_factory=dict)
    lean: bool = False

    def __post_init__(self):
        if self.default is not None and self.default not in KERNELS:
            raise ValueError(f"default must be one of {KERNELS} or None, got {self.default!r}")
        clean = {}
        for key, per_rows in dict(self.choices).items():
            if not isinstance(per_rows, dict) or not per_rows:
                raise ValueError(f"choices[{key!r}] must be a non-empty dict rows -> kernel, got {per_rows!r}")
            entry = {}
            for rows, kernel in per_rows.items():
                r = int(rows)
                if r < 1:
                    raise ValueError(f"row counts must be >= 1, got {rows!r} for {key!r}")
                if kernel not in KERNELS:
                    raise ValueError(f"unknown kernel {kernel!r} for {key!r} (choose from {KERNELS})")
                entry[r] = kernel
            clean[str(key)] = dict(sorted(entry.items()))
        self.choices = clean

    @classmethod
    def coerce(cls, plan) -> KernelPlan:
        """A plan from ``"auto"``, ``"lean"``, a kernel name, a dict of choices or a :class:`KernelPlan`."""
        if isinstance(plan, KernelPlan):
            return plan
        if plan == LEAN:  # the automatic plan's choices (shared, measured once), with one copy of the weights
            key = (LEAN,) + _auto_key()
            if key not in _SHARED:
                auto = cls.coerce("auto")
                if not auto.auto:
                    raise ValueError(f"plan 'lean' needs the automatic plan, but HF_DECODING_EXT_KERNELS forces "
                                     f"{os.environ.get('HF_DECODING_EXT_KERNELS')!r}")
                _SHARED[key] = lean = cls(auto=True, lean=True)
                lean.choices, lean.timings = auto.choices, auto.timings
            return _SHARED[key]
        if plan == "auto":
            forced = os.environ.get("HF_DECODING_EXT_KERNELS", "auto")
            if forced != "auto":
                if forced not in KERNELS:
                    raise ValueError(f"HF_DECODING_EXT_KERNELS must be 'auto' or one of {KERNELS}, got {forced!r}")
                plan = forced
            else:  # one shared automatic plan per process and cache file (its tables are memoised)
                key = ("auto",) + _auto_key()
                if key not in _SHARED:
                    _SHARED[key] = cls(auto=True)
                return _SHARED[key]
        if isinstance(plan, str):
            if plan not in KERNELS:
                raise ValueError(f"plan must be 'auto', 'lean', a kernel name {KERNELS}, a dict or a KernelPlan, "
                                 f"got {plan!r}")
            if plan not in _SHARED:
                _SHARED[plan] = cls(default=plan)
            return _SHARED[plan]
        if isinstance(plan, dict):
            return cls(plan)
        raise ValueError(f"plan must be 'auto', 'lean', a kernel name {KERNELS}, a dict or a KernelPlan, got "
                         f"{plan!r}")

    def kernel(self, key: str, rows: int) -> str:
        """The kernel for a call of ``rows`` rows on shape ``key``."""
        per_rows = self.choices.get(key)
        if per_rows is None:
            kernel = self.default or "pytorch"
            return "pytorch" if kernel == "padded_weight_left" and rows != 1 else kernel
        for r, kernel in per_rows.items():
            if rows <= r:
                return kernel
        return per_rows[max(per_rows)]

    def codes(self, key: str, length: int, onednn: bool = True) -> list[int]:
        """:meth:`table` as kernel indices (``onednn=False``: oneDNN calls replaced by PyTorch's), memoised."""
        memo = self.__dict__.setdefault("_codes", {})
        hit = memo.get((key, length, onednn))
        if hit is None:
            hit = [_CODE[n] if onednn or n != "onednn" else 0 for n in self.table(key, length)]
            memo[(key, length, onednn)] = hit
        return hit

    def table(self, key: str, length: int) -> list[str]:
        """Kernels for ``0 .. length - 1`` rows (``0`` rows: PyTorch's); memoised per shape and length (a plan is
        not meant to be edited after its first use)."""
        memo = self.__dict__.setdefault("_tables", {})
        hit = memo.get((key, length))
        if hit is None:
            hit = memo[(key, length)] = ["pytorch"] + [self.kernel(key, r) for r in range(1, length)]
        return hit


def _auto_key() -> tuple:
    from hf_decoding_ext.core.models import cache_dir

    return (str(cache_dir()), torch.get_num_threads())


def _machine_fingerprint() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text(encoding="utf-8", errors="replace").splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{cpu}|threads={torch.get_num_threads()}|torch={torch.__version__}"


def plan_cache_file() -> Path:
    """The JSON file holding this machine's measured kernel choices (per CPU model, thread count and torch
    version) under ``$HF_DECODING_EXT_CACHE/kernel_plans/``."""
    from hf_decoding_ext.core.models import cache_dir

    digest = hashlib.sha256(_machine_fingerprint().encode()).hexdigest()[:16]
    return cache_dir() / "kernel_plans" / f"{digest}.json"


_MEMO: dict[str, dict] = {}
"""The machine cache file's content as read or written by this process (path -> data)."""


def _read_cache(path: Path) -> dict:
    if str(path) in _MEMO:
        return _MEMO[str(path)]
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    data = data if data.get("version") == _PLAN_VERSION else {}
    _MEMO[str(path)] = data
    return data


def _write_cache(path: Path, shapes: dict) -> None:
    _MEMO.pop(str(path), None)  # re-read: another process may have added shapes
    data = _read_cache(path)
    merged = {**data.get("shapes", {}), **shapes}
    data = {"version": _PLAN_VERSION, "machine": _machine_fingerprint(), "shapes": merged}
    _MEMO[str(path)] = data
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".{os.getpid()}.tmp")
    tmp.write_text(json.dumps(data, indent=1), encoding="utf-8")
    os.replace(tmp, path)


def _median_ms(fn, reps: int) -> float:
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times) * 1e3


COLD_BYTES = 128 * 2**20
"""Weight bytes :func:`measure_plan` cycles through so each timed product reads its weights from memory, as inside
a model forward (a single weight timed in a loop stays in the CPU cache and flatters the 1-row kernels 3-7x)."""


def measure_plan(layer: nn.Linear, buckets=ROW_BUCKETS, reps: int = 7, budget_s: float = 1.0,
                 tolerance: float = 0.03, cold_bytes: int = COLD_BYTES,
                 onednn_margin: float = 0.25) -> tuple[dict, dict]:
    """Measure the candidate kernels on ``layer``'s weights at each row count of ``buckets`` (interleaved
    repetitions, median); return ``({rows: kernel}, {rows: {kernel: ms}})``. PyTorch's kernel is kept unless another
    is faster by more than ``tolerance``, and oneDNN's (where available) unless another is faster by more than
    ``onednn_margin``: inside a model forward oneDNN's prepacked product measured faster than the isolated timings
    say (greedy decoding of the default model, 128 tokens: 3.3-3.7 s with oneDNN for every shape, 4.7 s with the
    isolated per-shape winners, which mixed in the weight-left kernels); ``budget_s`` caps the repetitions for large
    layers (at least 3).

    Every timed call uses the next of several copies of the weights (``cold_bytes`` in all, at most 256 copies), so
    the weights come from memory as they do in a forward through the whole model, not from the cache."""
    dtype = layer.weight.dtype
    weight, bias = layer.weight.detach(), None if layer.bias is None else layer.bias.detach()
    nbytes = weight.numel() * weight.element_size()
    n_copies = max(1, min(256, -(-int(cold_bytes) // max(nbytes, 1))))
    weights = [weight] + [weight.clone() for _ in range(n_copies - 1)]
    onednn = _onednn_ok(dtype)
    packs = [torch.ops.mkldnn._reorder_linear_weight(w, None) for w in weights] if onednn else [None] * n_copies
    turn = [0]

    def call(code, x):
        i = turn[0] = (turn[0] + 1) % n_copies
        return _run(code, x, weights[i], bias, packs[i])

    gen = torch.Generator().manual_seed(0)
    choices, timings = {}, {}
    with torch.no_grad():
        for rows in buckets:
            x = torch.randn(rows, layer.in_features, generator=gen).to(dtype)
            names = available_kernels(dtype, rows)
            fns = {n: (lambda k=_CODE[n]: call(k, x)) for n in names}
            for fn in fns.values():  # warm-up, and a first estimate of the cost
                fn()
            probe = _median_ms(fns["pytorch"], 1) / 1e3
            n_reps = max(3, min(reps, int(budget_s / max(probe * len(fns) * len(buckets), 1e-9))))
            samples = {n: [] for n in names}
            for _ in range(n_reps):
                for n, fn in fns.items():
                    samples[n].append(_median_ms(fn, 1))
            ms = {n: statistics.median(v) for n, v in samples.items()}
            best = min(ms, key=ms.get)
            if ms[best] > (1 - tolerance) * ms["pytorch"]:
                best = "pytorch"
            if "onednn" in ms and ms[best] > (1 - onednn_margin) * ms["onednn"]:
                best = "onednn"
            choices[rows], timings[rows] = best, {n: round(v, 5) for n, v in ms.items()}
    return choices, timings


@dataclass
class PatchReport:
    """What :func:`fast_kernels` did: ``patched`` layers, the ``plan`` used (with any new measurements), the
    ``extra_bytes`` of prepacked weights held, and ``measured`` shape keys measured in this call."""

    patched: int = 0
    plan: KernelPlan | None = None
    extra_bytes: int = 0
    measured: list = field(default_factory=list)

    def __int__(self) -> int:
        return self.patched


def _resolve_auto(plan: KernelPlan, layers: list[nn.Linear]) -> list[str]:
    """Fill ``plan.choices`` for the layers' shapes from the machine cache, measuring (and caching) the missing."""
    path = plan_cache_file()
    cached = _read_cache(path).get("shapes", {})
    new, measured = {}, []
    for layer in layers:
        key = _shape_key(layer)
        if key in plan.choices:
            continue
        if key in cached:
            plan.choices[key] = {int(r): k for r, k in cached[key]["choices"].items()}
            continue
        choices, timings = measure_plan(layer)
        plan.choices[key] = choices
        plan.timings[key] = timings
        new[key] = {"choices": choices, "ms": timings}
        measured.append(key)
    if new:
        try:
            _write_cache(path, new)
        except OSError:  # a read-only cache folder: keep the plan for this call only
            pass
    return measured


@contextmanager
def fast_kernels(*modules: nn.Module | None, plan="auto", max_rows: int = ROW_BUCKETS[-1], enabled: bool = True):
    """Run the eligible linear layers inside ``modules`` with the kernels of ``plan`` (see the module docstring);
    restore them on exit (also on errors). ``None`` entries are skipped; a layer shared by several modules is
    patched once. Yields a :class:`PatchReport`.

    Args:
        modules: models or layers.
        plan: ``"auto"`` (measured per machine, cached), a kernel name of :data:`KERNELS` for every call, a dict
            ``{shape_key: {rows: kernel}}`` or a :class:`KernelPlan`.
        max_rows: calls with more rows than this use the largest row count's choice (the table's length).
        enabled: ``False`` patches nothing (a convenience for callers with an on/off option).

    Example:
        >>> from hf_decoding_ext.core.models import load_model, encode_prompts  # doctest: +SKIP
        >>> model, tokenizer = load_model()  # doctest: +SKIP
        >>> with fast_kernels(model):  # doctest: +SKIP
        ...     out = model.generate(**encode_prompts(tokenizer, "Hi"), max_new_tokens=32, do_sample=False)
    """
    plan = KernelPlan.coerce(plan)
    if isinstance(max_rows, bool) or not isinstance(max_rows, int) or max_rows < 1:
        raise ValueError(f"max_rows must be an integer >= 1, got {max_rows!r}")
    report = PatchReport(plan=plan)
    patched: list[nn.Linear] = []
    lean_layers: list[nn.Linear] = []
    spans = libc = None
    try:
        if enabled:
            seen: set[int] = set()
            layers = []
            for root in modules:
                if root is None:
                    continue
                for m in root.modules():
                    if id(m) not in seen and eligible(m):
                        seen.add(id(m))
                        layers.append(m)
            if plan.auto and layers:
                report.measured = _resolve_auto(plan, layers)
            packs: dict[int, torch.Tensor] = {}
            uses: dict[int, int] = {}
            if plan.lean:  # a weight shared by several modules (a tied lm_head) keeps its dense copy, and so does
                for root in modules:  # an output embedding (its shape gives the vocabulary size)
                    if root is not None:
                        for _, prm in root.named_parameters(remove_duplicate=False):
                            uses[id(prm)] = uses.get(id(prm), 0) + 1
                        head = root.get_output_embeddings() if hasattr(root, "get_output_embeddings") else None
                        if head is not None and getattr(head, "weight", None) is not None:
                            uses[id(head.weight)] = 2
            for m in layers:
                codes = plan.codes(_shape_key(m), max_rows + 1, _onednn_ok(m.weight.dtype))
                if not any(codes):
                    continue
                packed = None
                lean = plan.lean and _CODE["onednn"] in codes and uses.get(id(m.weight)) == 1
                if lean:  # oneDNN at every row count, the dense copy out of memory until the block ends
                    if spans is None:
                        spans, libc = _file_mappings(), _libc()
                    codes = [0] + [_CODE["onednn"]] * (len(codes) - 1)
                    release_packed(m)
                    dense = m.weight.data
                    packed = torch.ops.mkldnn._reorder_linear_weight(dense, None)
                    m._hk_packed = packed
                    m._hk_orig = dense if _in_file_mapping(dense, spans) else None
                    lean_layers.append(m)
                    m.weight.data = torch.empty(0, dtype=dense.dtype)
                    if m._hk_orig is not None:
                        _page_out(dense, libc)
                    del dense
                elif _CODE["onednn"] in codes:
                    wid = id(m.weight)
                    if wid not in packs:
                        packs[wid] = _prepack(m)
                        report.extra_bytes += m.weight.numel() * m.weight.element_size()
                    packed = packs[wid]
                m._hk_table = codes
                m._hk_packed = packed
                m._hk_lean = lean
                m.forward = types.MethodType(_forward, m)
                patched.append(m)
            if lean_layers:
                _trim(libc)
        report.patched = len(patched)
        yield report
    finally:
        for m in lean_layers:  # the original (file-backed) tensor, or the exact dense weight from the packed one
            orig = m.__dict__.get("_hk_orig")
            m.weight.data = orig if orig is not None else m._hk_packed.to_dense()
        for m in patched + lean_layers:
            for attr in ("forward", "_hk_table", "_hk_packed", "_hk_lean", "_hk_orig"):
                m.__dict__.pop(attr, None)
        if lean_layers:
            _trim(libc)


def small_batch_linear(*modules: nn.Module | None, max_rows: int = DEFAULT_MAX_ROWS, enabled: bool = True):
    """The weight-left layout for calls of 2 to ``max_rows`` rows, PyTorch's kernel otherwise (the engine's kernel
    before :func:`fast_kernels` chose per shape; kept for comparisons). Yields a :class:`PatchReport`."""
    if isinstance(max_rows, bool) or not isinstance(max_rows, int) or max_rows < 2:
        raise ValueError(f"max_rows must be an integer >= 2, got {max_rows!r}")

    class _Legacy(KernelPlan):
        def kernel(self, key, rows):
            return "weight_left" if 2 <= rows <= max_rows else "pytorch"

    return fast_kernels(*modules, plan=_Legacy(), max_rows=max_rows + 1, enabled=enabled)
