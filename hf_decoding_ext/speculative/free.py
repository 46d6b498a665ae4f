"""FREE: shallow-deep early exit with synchronised parallel decoding and an adaptive (Beta-mixture) confidence
threshold (Bae et al., arXiv 2310.05424), as a ``custom_generate`` decoding loop."""

from __future__ import annotations

import inspect
import weakref
from collections.abc import Callable, Sequence

import numpy as np
import torch

from hf_decoding_ext.core.anatomy import (
    LayerSubsetCache,
    OutputCapture,
    decoder,
    decoder_layers,
    layer_parameters,
    layer_subset_model,
    lm_head,
    num_layers,
)
from hf_decoding_ext.core.loop import DecodingLoop, GenerationState

CONFIDENCE_MEASURES = ("softmax",)


def softmax_confidence(logits: torch.Tensor) -> torch.Tensor:
    """The official code's ``softmax`` confidence measure: the gap between the two largest softmax probabilities
    (``top1 - top2``, in ``[0, 1]``) of ``logits`` ``(..., vocab)``."""
    top = torch.softmax(logits.float(), dim=-1).topk(2, dim=-1).values
    return top[..., 0] - top[..., 1]


# ------------------------------------------------------------------------------------------------ the Beta mixture
def _fit_beta_moments(x: np.ndarray) -> tuple[float, float] | None:
    """Method-of-moments Beta fit of samples ``x`` in ``(0, 1)``; ``None`` when it is undefined (fewer than two
    samples, zero variance, or a variance too large for a Beta distribution)."""
    if x.size < 2:
        return None
    mean, var = float(x.mean()), float(x.var())
    if var <= 0.0 or not 0.0 < mean < 1.0:
        return None
    common = mean * (1.0 - mean) / var - 1.0
    if common <= 0.0:
        return None
    return mean * common, (1.0 - mean) * common


class BetaMixture1D:
    """Two-component Beta mixture over shallow-exit confidences, FREE's adaptive threshold estimator (the official
    ``util/bmm.py``: ``BetaMixture1D`` fitted with labels, ``predict_proba``).

    Component 0 models the confidences of tokens whose shallow prediction *disagreed* with the deep model's, component 1
    those that *agreed*. :meth:`fit` refits both components by the method of moments on all the calibration samples
    (hard labels; the official supervised fit, one EM iteration). :meth:`threshold` evaluates, on ``resolution`` evenly
    spaced points of ``[low, high]``, the posterior of the component with the larger mean (the "agree" one) under equal
    priors, ``p_agree / (p_agree + p_other)``, counts the ``c`` points where it exceeds ``zeta``, and returns grid point
    ``resolution - c`` (clamped to the grid): the smallest confidence above which the agree component dominates when
    the posterior is increasing, as in the official ``predict_proba``.

    Args:
        alphas, betas: initial Beta parameters of the (disagree, agree) components (official: ``(1, 2)``, ``(2, 1)``).
        zeta: posterior level (official 0.4).
        resolution: grid points (official 10).
        low, high: grid range (official ``predict_proba(0.3, 0.9)``).
        eps: confidences are clipped to ``[eps, 1 - eps]`` before fitting (official 1e-4).

    Example:
        >>> import numpy as np
        >>> bmm = BetaMixture1D()
        >>> conf = np.r_[np.random.default_rng(0).beta(2, 8, 200), np.random.default_rng(1).beta(8, 2, 200)]
        >>> bmm.fit(conf, np.r_[np.zeros(200), np.ones(200)]).threshold()  # doctest: +SKIP
        0.5
    """

    def __init__(self, alphas: Sequence[float] = (1.0, 2.0), betas: Sequence[float] = (2.0, 1.0), zeta: float = 0.4,
                 resolution: int = 10, low: float = 0.3, high: float = 0.9, eps: float = 1e-4):
        if not 0.0 < zeta < 1.0:
            raise ValueError(f"zeta must be in (0, 1), got {zeta!r}")
        if isinstance(resolution, bool) or not isinstance(resolution, int) or resolution < 2:
            raise ValueError(f"resolution must be an int >= 2, got {resolution!r}")
        if not 0.0 <= low < high <= 1.0:
            raise ValueError(f"the grid must satisfy 0 <= low < high <= 1, got low={low!r}, high={high!r}")
        self.alphas = np.array(alphas, dtype=np.float64)
        self.betas = np.array(betas, dtype=np.float64)
        if self.alphas.shape != (2,) or self.betas.shape != (2,) or (self.alphas <= 0).any() or (self.betas <= 0).any():
            raise ValueError(f"alphas and betas must be two positive numbers each, got {alphas!r}, {betas!r}")
        self.zeta, self.resolution, self.low, self.high, self.eps = float(zeta), resolution, low, high, eps

    def likelihood(self, x, component: int) -> np.ndarray:
        from scipy import stats

        return stats.beta.pdf(np.asarray(x, dtype=np.float64), self.alphas[component], self.betas[component])

    def agree_component(self) -> int:
        """Index of the component with the larger mean (the official code's choice of the "agree" component)."""
        return int(np.argmax(self.alphas / (self.alphas + self.betas)))

    def posterior_agree(self, x) -> np.ndarray:
        """Equal-prior posterior of the agree component at confidences ``x``."""
        i = self.agree_component()
        a, b = self.likelihood(x, i), self.likelihood(x, 1 - i)
        with np.errstate(invalid="ignore", divide="ignore"):
            return a / (a + b)

    def fit(self, x, y) -> BetaMixture1D:
        """Refit both components on confidences ``x`` with agreement labels ``y`` (1 agree, 0 disagree); a component
        whose samples admit no Beta fit (fewer than two, no spread) keeps its parameters."""
        x = np.clip(np.asarray(x, dtype=np.float64).reshape(-1), self.eps, 1.0 - self.eps)
        y = np.asarray(y).reshape(-1).astype(bool)
        if x.shape != y.shape:
            raise ValueError(f"x and y must have the same length, got {x.shape[0]} and {y.shape[0]}")
        for component, rows in ((0, ~y), (1, y)):
            fitted = _fit_beta_moments(x[rows])
            if fitted is not None:
                self.alphas[component], self.betas[component] = fitted
        return self

    def grid(self) -> np.ndarray:
        return np.linspace(self.low, self.high, self.resolution)

    def threshold(self) -> float:
        """The confidence threshold on the grid (see the class docstring)."""
        count = int((self.posterior_agree(self.grid()) > self.zeta).sum())
        return float(self.grid()[min(max(0, self.resolution - count), self.resolution - 1)])

    def __repr__(self) -> str:
        return f"BetaMixture1D(alphas={self.alphas.tolist()}, betas={self.betas.tolist()}, zeta={self.zeta})"


# ------------------------------------------------------------------------------------------------ exits
def _shipped_exit_head(model):
    """The shipped trained exit head (``hf_decoding_ext/data/heads/exit_head_smollm2_l6``, the shared
    :class:`~hf_decoding_ext.speculative.heads.exit_head.ExitHead`), attached to ``model``, or ``None`` when the
    module or its weights are absent or the head was trained for a model of another shape (hidden size, vocabulary,
    number of layers)."""
    try:
        from hf_decoding_ext.speculative.heads.exit_head import (
            ExitHead,
            shipped_exit_head_path,
        )
    except ImportError:
        return None
    path = shipped_exit_head_path()
    if not (path / "config.json").is_file() or not any(path.glob("*.safetensors")):
        return None
    head = ExitHead.from_pretrained(str(path))
    base = head.config.base_config or {}
    if any(base.get(k) != getattr(model.config, k, None) for k in ("hidden_size", "vocab_size",
                                                                      "num_hidden_layers")):
        return None
    return head.attach(model).eval()


def _is_stateful(head) -> bool:
    """Whether ``head`` keeps a KV cache of its own (the shared ``ExitHead``: an extra decoder layer), so that every
    position must pass through it once, with positions and the attention mask."""
    return callable(getattr(head, "new_cache", None))


def _head_layer(head) -> int | None:
    """The number of decoder layers whose output ``head`` reads (``exit_layer`` / ``num_layers`` on it or its
    config), or ``None`` when it does not say."""
    for owner in (head, getattr(head, "config", None)):
        for name in ("exit_layer", "early_exit_layer", "num_draft_layers", "num_layers"):
            value = getattr(owner, name, None)
            if isinstance(value, int) and not isinstance(value, bool):
                return value
    return None


def _call_head(head, hidden: torch.Tensor) -> torch.Tensor:
    """Logits ``(..., vocab)`` (float32) of a stateless exit head on layer-``S`` hidden states."""
    out = head(hidden)
    logits = getattr(out, "logits", out)
    if isinstance(logits, tuple):
        logits = logits[0]
    return logits.float()


class _InputOverride:
    """Replaces the hidden-state input of ``module`` (a decoder layer) on its next calls inside ``with``: the deep
    layers of the synchronised pass start from the stacked layer-``S`` states whatever the decoder does to its
    ``inputs_embeds`` (scaling, added position embeddings)."""

    def __init__(self, module: torch.nn.Module, hidden: torch.Tensor):
        self.module, self.hidden, self.handle = module, hidden, None

    def _hook(self, module, args, kwargs):
        if args:
            return (self.hidden, *args[1:]), kwargs
        return args, {**kwargs, "hidden_states": self.hidden}

    def __enter__(self):
        self.handle = self.module.register_forward_pre_hook(self._hook, with_kwargs=True)
        return self

    def __exit__(self, *exc):
        self.handle.remove()
        return False


def _run_base(base, cache_arg: str, cache, keep, **kwargs):
    """Run a layer-subset decoder ``base`` (no LM head) on the full model's cache (kept layers only)."""
    return base(**kwargs, use_cache=True, return_dict=True, **{cache_arg: LayerSubsetCache(cache, keep)})


# ------------------------------------------------------------------------------------------------ the loop
class FREEDecoding(DecodingLoop):
    """FREE (Bae, Ko, Song, Yun, "Fast and Robust Early-Exiting Framework for Autoregressive Language Models with
    Synchronized Parallel Decoding", EMNLP 2023, arXiv 2310.05424), a ``custom_generate`` loop. Lossy.

    Two exits: the *shallow* model (the first ``exit_layer`` decoder layers, then an exit) and the *deep* (full) model.
    Each step runs the shallow layers on the new token and measures the shallow exit's confidence (``softmax``: top-1
    minus top-2 probability, the official ``util/skip_conf.py`` measure). If it exceeds the threshold the token is
    emitted from the shallow exit and its layer-``S`` hidden state is *stacked*; otherwise the deep layers ``S..L-1``
    run once, in parallel, over every stacked position plus the current one (*synchronised parallel decoding*), which
    fills the deep layers' KV cache for the early-exited tokens (no state copying: the deep layers attend to the true
    deep keys/values of every earlier token) and yields the current token from the full model. The shallow layers'
    cache therefore runs ahead of the deep layers' by the stacked positions; each view addresses the shared cache with
    its own length (:class:`~hf_decoding_ext.core.anatomy.LayerSubsetCache`), mask and explicit positions.

    Adaptive threshold (the official ``util/bmm.py`` and ``models/deploying_t5.py``): every synchronised pass that
    contains at least one early-exited token adds, for each of its positions that had a shallow prediction, the shallow
    confidence and whether the shallow and deep predictions agree (argmax) to a calibration set kept by this loop
    object across ``generate()`` calls. At the start of each ``generate()`` call (each sample, as in the official code),
    while fewer than ``max_updates`` updates have been made and the set is not empty, a two-component
    :class:`BetaMixture1D` is refitted to the whole set and the threshold becomes the grid point where the "agree"
    component's posterior exceeds ``zeta``; before the first fit (warm-up) the initial ``threshold`` is used.
    ``refit_every_pass=True`` (an extension) refits after every synchronised pass instead, so one long generation
    adapts.

    Args:
        exit_layer: ``S``, the number of shallow layers (``1 <= S < L``). ``None``: the exit head's layer when the head
            says it, else ``round(L / 4)`` (the paper's 6 of T5-large's 24 decoder layers; 8 for SmolLM2's 30).
        threshold: the confidence threshold, the initial one with ``adaptive`` (official deployment script: 0.9). A
            token exits early when its confidence is strictly above it, so ``1.0`` never exits early (full model).
        adaptive: fit the Beta-mixture threshold (the paper's FREE); ``False`` keeps ``threshold`` fixed.
        exit_head: the shallow exit. ``None``: the shipped trained
            :class:`~hf_decoding_ext.speculative.heads.exit_head.ExitHead` (``data/heads/exit_head_smollm2_l6``,
            an extra decoder layer + norm after 6 layers, read through the model's LM head, self-distilled from the
            full model) when it exists, was trained for a model of this shape and reads layer ``exit_layer`` (or
            ``exit_layer`` is ``None``), else ``"plain"``; ``"plain"``: the
            model's final norm + LM head on the layer-``S`` state (``exit_logits``); an ``ExitHead`` (any head with
            ``new_cache()``: it receives every position's layer-``S`` state once, with positions and the attention
            mask, and keeps its own KV cache); or any other callable mapping layer-``S`` hidden states ``(batch, seq,
            hidden)`` (before any norm) to logits. A head's ``exit_layer`` sets ``S`` (a given head reading another
            layer than ``exit_layer`` is refused).
        confidence: the confidence measure; only ``"softmax"`` (the official default; ``"meta"`` needs a trained
            confidence head and is not provided).
        zeta, grid, resolution: the Beta-mixture posterior level (0.4), grid range ((0.3, 0.9)) and points (10).
        max_updates: threshold refits before it is frozen (official ``bmm_update_max_iter``: 300).
        refit_every_pass: refit after every synchronised pass (extension; default: once per ``generate()`` call).

    Attributes after a call: ``stats`` (emitted tokens, shallow/deep counts, the shallow confidence and threshold of
    every step, synchronised passes and their sizes; per emitted token: ``layers_per_token``, the decoder-layer
    applications, and ``weight_fraction``, the parameters read as a fraction of one full forward: on a
    weight-bandwidth-bound device the saving of FREE is in the weight reads, since the synchronised pass still runs
    the deep layers on the early-exited positions), ``threshold_`` (the threshold used), ``exit_kind`` (``"plain"``,
    ``"head"``), ``bmm`` and the calibration set ``calibration``. ``reset()`` forgets the calibration set and the
    fitted threshold.

    Deviations from the paper / official code (T5, encoder-decoder):

    * Decoder-only models: the prompt is prefilled through the shallow layers and the first token is decided like the
      others (the T5 decoder starts from one start token); the prompt positions are part of the first synchronised
      pass. When generation stops with stacked tokens, one last deep pass over them fills their deep KV, so the cache
      ``generate()`` returns holds every fed position in every layer (the full model's cache; the official code
      discards its state). That pass is not counted in the per-token figures (``stats["final_pass_positions"]``).
    * No training of the backbone: FREE fine-tunes the whole model with the shallow-deep loss (``shallowdeep_kd_dyna``:
      CE at both exits plus layer-wise distillation). Here the backbone stays frozen and the shallow exit is either
      the plain exit or a separately trained exit head (the shared ``ExitHead``, self-distilled from the full model).
      The shipped head exits after 6 of SmolLM2's 30 layers (a fifth; the paper: 6 of T5-large's 24, a quarter).
    * The official supervised Beta fit mixes the labels with the current responsibilities (``lam_r``) but the line
      doing so is overwritten, so its fit uses hard labels: this implementation uses hard labels; a component without
      a valid moment fit (fewer than two samples or no spread) keeps its previous parameters instead of becoming NaN.
    * Sampling (``do_sample=True``) is allowed: the chosen exit's logits go through the caller's logits processors and
      are sampled; confidences and agreement labels are always computed from raw logits / argmax (the paper is greedy).
    * The RollBack policy (``rollback_conf_threshold``, off by default in the official code) is not implemented.
    * With a trained exit head the shallow pass costs the head's extra layer too (counted in ``stats``); a cache
      prefilled by the caller is recomputed so that the head sees every position (``needs_uncached_prompt``).
    * Batch size 1 (the official deployment setting); models with sliding-window attention are refused.

    Example:
        >>> from hf_decoding_ext.speculative.free import FREEDecoding
        >>> loop = FREEDecoding()  # adaptive threshold from 0.9; the shipped ExitHead after 6 layers on SmolLM2
        >>> out = model.generate(**inputs, max_new_tokens=64, do_sample=False, custom_generate=loop)  # doctest: +SKIP
        >>> loop.stats["shallow_fraction"], loop.stats["weight_fraction"]  # doctest: +SKIP
    """

    supports_batch = False
    supports_sliding_window = False

    def __init__(self, exit_layer: int | None = None, threshold: float = 0.9, adaptive: bool = True,
                 exit_head: str | Callable | None = None, confidence: str = "softmax", zeta: float = 0.4,
                 grid: Sequence[float] = (0.3, 0.9), resolution: int = 10, max_updates: int = 300,
                 refit_every_pass: bool = False):
        if exit_layer is not None and (isinstance(exit_layer, bool) or not isinstance(exit_layer, int)
                                       or exit_layer < 1):
            raise ValueError(f"exit_layer must be None or an int >= 1, got {exit_layer!r}")
        if isinstance(threshold, bool) or not isinstance(threshold, (int, float)) or not 0.0 <= threshold <= 1.0:
            raise ValueError(f"threshold must be a number in [0, 1], got {threshold!r}")
        if not isinstance(adaptive, bool):
            raise ValueError(f"adaptive must be a bool, got {adaptive!r}")
        if not (exit_head is None or exit_head == "plain" or callable(exit_head)):
            raise ValueError(f"exit_head must be None, 'plain' or a callable exit head, got {exit_head!r}")
        if confidence not in CONFIDENCE_MEASURES:
            raise ValueError(f"confidence must be one of {CONFIDENCE_MEASURES}, got {confidence!r}")
        try:
            low, high = (float(v) for v in grid)
        except (TypeError, ValueError):
            raise ValueError(f"grid must be a pair (low, high), got {grid!r}") from None
        if isinstance(max_updates, bool) or not isinstance(max_updates, int) or max_updates < 0:
            raise ValueError(f"max_updates must be an int >= 0, got {max_updates!r}")
        if not isinstance(refit_every_pass, bool):
            raise ValueError(f"refit_every_pass must be a bool, got {refit_every_pass!r}")
        self.exit_layer, self.threshold, self.adaptive = exit_layer, float(threshold), adaptive
        self.exit_head, self.confidence = exit_head, confidence
        self.zeta, self.grid, self.resolution = float(zeta), (low, high), resolution
        self.max_updates, self.refit_every_pass = max_updates, refit_every_pass
        self.bmm = BetaMixture1D(zeta=zeta, resolution=resolution, low=low, high=high)  # validates them
        self.stats: dict = {}
        self.exit_kind: str | None = None
        self._bases: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
        self._shipped: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # model -> shipped head or None
        self.reset()

    def reset(self) -> None:
        """Forget the calibration set and the fitted threshold (the next call starts from ``threshold``)."""
        self.calibration: dict[str, list] = {"confidence": [], "agree": []}
        self.updates = 0
        self.fitted_threshold: float | None = None
        self.bmm = BetaMixture1D(zeta=self.zeta, resolution=self.resolution, low=self.grid[0], high=self.grid[1])

    # ------------------------------------------------------------------------------------------- threshold
    def refit(self) -> float | None:
        """Refit the Beta mixture on the calibration set (if any, and fewer than ``max_updates`` refits so far) and
        return the fitted threshold (``None`` while there is none)."""
        if self.calibration["confidence"] and self.updates < self.max_updates:
            self.bmm.fit(np.asarray(self.calibration["confidence"]), np.asarray(self.calibration["agree"]))
            self.fitted_threshold = self.bmm.threshold()
            self.updates += 1
        return self.fitted_threshold

    def current_threshold(self) -> float:
        if self.adaptive and self.fitted_threshold is not None:
            return self.fitted_threshold
        return self.threshold

    # ------------------------------------------------------------------------------------------- set-up
    @property
    def needs_uncached_prompt(self) -> bool:
        """A stateful exit head (an extra decoder layer with its own KV cache) must see every position's layer-``S``
        state, so a cache prefilled by the caller is recomputed (and filled back at the end)."""
        return self.exit_head != "plain"

    def _resolve_exit(self, model):
        head = self.exit_head
        if head is None:
            if model not in self._shipped:
                self._shipped[model] = _shipped_exit_head(model)
            head = self._shipped[model]
            if head is not None and self.exit_layer is not None and _head_layer(head) != self.exit_layer:
                head = None  # the shipped head reads another layer: the plain exit at the layer asked for
        if head is None or head == "plain":
            self.exit_kind = "plain"
            return None, None
        self.exit_kind = "head"
        return head, _head_layer(head)

    def _check_layer(self, layer: int, total: int) -> int:
        if not 1 <= layer < total:
            raise ValueError(f"exit_layer must be in [1, {total - 1}] for this model of {total} decoder layers, got "
                             f"{layer!r}")
        return layer

    # ------------------------------------------------------------------------------------------- the run
    @torch.no_grad()
    def run(self, state: GenerationState):
        model = state.model
        total = num_layers(model)
        head, head_layer = self._resolve_exit(model)
        if self.exit_layer is not None:
            if head_layer is not None and head_layer != self.exit_layer:
                raise ValueError(f"exit_layer={self.exit_layer} but the exit head reads layer {head_layer}")
            layer = self._check_layer(self.exit_layer, total)
        else:
            layer = self._check_layer(head_layer if head_layer is not None else max(1, round(total / 4)), total)
        shallow_keep, deep_keep = tuple(range(layer)), tuple(range(layer, total))
        bases = self._bases.setdefault(model, {})
        if layer not in bases:  # layer-subset decoders sharing the model's modules (built once per model and layer)
            bases[layer] = (decoder(layer_subset_model(model, shallow_keep)),
                            decoder(layer_subset_model(model, deep_keep)))
        shallow_base, deep_base = bases[layer]
        cache_arg = "cache" if "cache" in inspect.signature(type(shallow_base).forward).parameters else \
            "past_key_values"
        layers = decoder_layers(model)
        head_module = lm_head(model)
        if self.adaptive and not self.refit_every_pass:
            self.refit()  # once per sample, before decoding it (the official schedule)

        # weight reads (parameters) of each pass, for the cost accounting
        layer_params = layer_parameters(model)
        head_params = sum(p.numel() for p in head_module.parameters())
        exit_params = head_params
        if head is not None and isinstance(head, torch.nn.Module):
            shared = {id(p) for p in model.parameters()}
            exit_params += sum(p.numel() for p in head.parameters() if id(p) not in shared)
        full_cost = sum(layer_params) + head_params
        shallow_cost = sum(layer_params[:layer]) + exit_params
        deep_cost = sum(layer_params[layer:]) + head_params

        stats = {"exit_layer": layer, "layers": total, "exit_kind": self.exit_kind, "tokens": 0, "shallow_tokens": 0,
                 "deep_tokens": 0, "sync_passes": 0, "pass_sizes": [], "shallow_passes": 0, "weight_reads": 0,
                 "layer_applications": 0, "full_forward_params": full_cost, "shallow_pass_params": shallow_cost,
                 "deep_pass_params": deep_cost, "thresholds": [], "confidences": [], "final_pass_positions": 0}
        self.stats = stats
        cache = state.cache
        stateful = head is not None and _is_stateful(head)
        if stateful and cache.get_seq_length():
            raise ValueError("a stateful exit head needs the whole prompt uncached")  # needs_uncached_prompt
        head_cache = head.new_cache() if stateful else None
        positions_all = state.position_ids(state.attention_mask)
        deep_len = shallow_len = cache.get_seq_length()
        prompt_len = state.input_ids.shape[1]
        pending: list[torch.Tensor] = []  # layer-S states (1, n, hidden) of positions deep_len .. shallow_len - 1
        decisions: dict[int, tuple[float, int]] = {}  # position -> (shallow confidence, shallow argmax) pending
        early_in_stack = 0

        while not state.done:
            threshold = self.current_threshold()
            stats["thresholds"].append(threshold)
            cur = state.input_ids.shape[1]
            if len(positions_all[0]) < cur:
                positions_all = state.position_ids(state.attention_mask)
            # ---- shallow pass over the new token(s)
            with OutputCapture(layers[layer - 1]) as cap:
                out = _run_base(shallow_base, cache_arg, cache, shallow_keep,
                                input_ids=state.input_ids[:, shallow_len:cur],
                                attention_mask=state.attention_mask[:, :cur],
                                position_ids=positions_all[:, shallow_len:cur])
            hidden = cap.output  # (1, n, hidden) before any norm
            stats["shallow_passes"] += 1
            stats["weight_reads"] += shallow_cost
            stats["layer_applications"] += (layer + stateful) * (cur - max(shallow_len, prompt_len - 1))
            pending.append(hidden)
            shallow_len = cur
            if head is None:
                shallow_logits = head_module(out.last_hidden_state[:, -1]).float()
            elif stateful:  # every position passes through the head's extra layer once, keeping its KV
                head_out = head(hidden, position_ids=positions_all[:, cur - hidden.shape[1]:cur],
                                attention_mask=state.attention_mask[:, :cur], cache=head_cache, logits_to_keep=1)
                head_cache = head_out.cache
                shallow_logits = head_out.logits[:, -1].float()
            else:
                shallow_logits = _call_head(head, hidden[:, -1:])[:, -1]
            conf = float(softmax_confidence(shallow_logits)[0])
            decisions[cur - 1] = (conf, int(shallow_logits[0].argmax()))
            stats["confidences"].append(conf)
            if conf > threshold:  # exit: emit the shallow token, stack its state
                self._emit(state, shallow_logits)
                stats["shallow_tokens"] += 1
                early_in_stack += 1
                continue
            # ---- synchronised parallel pass of the deep layers over the stacked positions and the current one
            stacked = torch.cat(pending, dim=1)
            n = stacked.shape[1]
            assert deep_len + n == cur
            with _InputOverride(layers[layer], stacked):
                deep_out = _run_base(deep_base, cache_arg, cache, deep_keep,
                                     inputs_embeds=torch.zeros_like(stacked),
                                     attention_mask=state.attention_mask[:, :cur],
                                     position_ids=positions_all[:, deep_len:cur])
            calibrate = self.adaptive and early_in_stack > 0
            keep = n if calibrate else 1
            deep_logits = head_module(deep_out.last_hidden_state[:, -keep:]).float()
            stats["sync_passes"] += 1
            stats["pass_sizes"].append(n)
            stats["weight_reads"] += deep_cost
            stats["layer_applications"] += (total - layer) * (cur - max(deep_len, prompt_len - 1))
            if calibrate:
                predicted = deep_logits[0].argmax(-1).tolist()
                for offset, position in enumerate(range(cur - keep, cur)):
                    if position in decisions:
                        c, s = decisions[position]
                        self.calibration["confidence"].append(c)
                        self.calibration["agree"].append(int(s == predicted[offset]))
                if self.refit_every_pass:
                    self.refit()
            self._after_sync(state, deep_logits, cur - keep)
            pending, decisions, early_in_stack = [], {}, 0
            deep_len = cur
            self._emit(state, deep_logits[:, -1])
            stats["deep_tokens"] += 1
        if pending:  # the stacked tail: one last deep pass so that the returned cache holds every position
            stacked = torch.cat(pending, dim=1)
            with _InputOverride(layers[layer], stacked):
                _run_base(deep_base, cache_arg, cache, deep_keep, inputs_embeds=torch.zeros_like(stacked),
                          attention_mask=state.attention_mask[:, :shallow_len],
                          position_ids=positions_all[:, deep_len:shallow_len])
            stats["final_pass_positions"] = stacked.shape[1]
        tokens = stats["shallow_tokens"] + stats["deep_tokens"]
        stats["tokens"] = tokens
        stats["shallow_fraction"] = stats["shallow_tokens"] / tokens if tokens else 0.0
        stats["weight_fraction"] = stats["weight_reads"] / (tokens * full_cost) if tokens else 0.0
        stats["layers_per_token"] = stats["layer_applications"] / tokens if tokens else 0.0
        self.threshold_ = stats["thresholds"][-1] if stats["thresholds"] else self.current_threshold()

    def _emit(self, state: GenerationState, logits: torch.Tensor) -> None:
        scores = state.process(logits)
        state.record(scores, logits)
        state.append(state.select(scores))

    def _after_sync(self, state: GenerationState, deep_logits: torch.Tensor, first_position: int) -> None:
        """Called after every synchronised pass with the deep logits ``(1, k, vocab)`` of positions ``first_position
        ..`` (a hook for inspection and tests; does nothing)."""
