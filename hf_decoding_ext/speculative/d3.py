"""D^3: Position-Aware Depth Decay Decoding, a training-free dynamic-depth decoding loop whose number of decoder
layers decays with the position of the generated token."""

from __future__ import annotations

import math

from hf_decoding_ext.core.anatomy import (
    LayerSkipView,
    crop_layers,
    decoder_layers,
    num_layers,
    skip_layers,
)
from hf_decoding_ext.core.loop import DecodingLoop, GenerationState

DROP_ORDERS = ("deep_first", "shallow_first")


def d3_layer_count(total: int, alpha: float, i: int, floor: int = 1) -> int:
    """Layers kept for the ``i``-th generated token (``i = 0`` for the first): ``max(floor, floor(L * alpha ** i))``.

    >>> [d3_layer_count(30, 0.9, i, floor=4) for i in range(6)]
    [30, 27, 24, 21, 19, 17]
    >>> d3_layer_count(30, 1.0, 1000)
    30
    """
    kept = math.floor(total * alpha ** i + 1e-9)  # 1e-9: 30 * 0.9 ** 1 must give 27, not 26 by rounding
    return max(int(floor), min(int(total), kept))


def d3_layer_set(total: int, kept: int, flex_start: int, tail_layers: int, drop_order: str = "shallow_first"
                 ) -> tuple[int, ...]:
    """The decoder layers (increasing) run when ``kept`` layers are kept: the head core ``0 .. flex_start - 1`` and the
    tail core (the last ``tail_layers`` layers) always, plus ``kept - flex_start - tail_layers`` flex layers (the flex
    layers are ``flex_start .. total - tail_layers - 1``). ``drop_order="deep_first"`` drops the deepest flex layers
    first (keeps the shallowest ones), ``"shallow_first"`` the shallowest first. Either order is nested: a set for
    fewer layers is a subset of the set for more.

    >>> d3_layer_set(10, 6, 2, 1)
    (0, 1, 6, 7, 8, 9)
    >>> d3_layer_set(10, 6, 2, 1, "deep_first")
    (0, 1, 2, 3, 4, 9)
    """
    core = flex_start + tail_layers
    if not core <= kept <= total:
        raise ValueError(f"kept must lie between the {core} core layers and the {total} layers, got {kept!r}")
    n_flex = kept - core
    flex_end = total - tail_layers  # exclusive
    if drop_order == "deep_first":
        flex = range(flex_start, flex_start + n_flex)
    elif drop_order == "shallow_first":
        flex = range(flex_end - n_flex, flex_end)
    else:
        raise ValueError(f"drop_order must be one of {DROP_ORDERS}, got {drop_order!r}")
    return tuple(range(flex_start)) + tuple(flex) + tuple(range(flex_end, total))


def d3_cost(model, layer_sets) -> dict[str, float]:
    """Machine-independent cost of the forwards that produced the generated tokens, given their layer sets (the
    ``d3_layer_sets`` a :class:`D3Decoding` call returns): ``layer_units`` (mean decoder layers run per token),
    ``depth_fraction`` (that over the model's depth) and ``param_fraction`` (mean fraction of the model's parameters
    touched per token: every parameter except the skipped decoder layers'; embeddings and LM head counted once, as they
    are stored, tied or not).

    Example:
        >>> d3_cost(model, [tuple(range(30)), tuple(range(20)) + (29,)])  # doctest: +SKIP
        {'layer_units': 25.5, 'depth_fraction': 0.85, 'param_fraction': 0.87...}
    """
    layer_sets = [tuple(s) for s in layer_sets]
    if not layer_sets:
        raise ValueError("layer_sets is empty: nothing was generated")
    layers = decoder_layers(model)
    sizes = [sum(p.numel() for p in layer.parameters()) for layer in layers]
    total = sum(p.numel() for p in model.parameters())
    units = [len(s) for s in layer_sets]
    params = [total - sum(sizes[j] for j in range(len(layers)) if j not in set(s)) for s in layer_sets]
    return {"layer_units": sum(units) / len(units), "depth_fraction": sum(units) / len(units) / len(layers),
            "param_fraction": sum(params) / len(params) / total}


class D3Decoding(DecodingLoop):
    """Position-Aware Depth Decay Decoding, D^3 (Fan, Fang, Xing, Han, Shang and Wang, "Position-Aware Depth Decay
    Decoding (D^3): Boosting Large Language Model Inference Efficiency", Findings of ACL 2025, arXiv 2503.08524), a
    ``custom_generate`` loop. Lossy and training-free.

    The ``i``-th generated token (``i = 0`` for the first token of this ``generate()`` call) is predicted by a forward
    that keeps ``max(core, floor(L * alpha ** i))`` of the ``L`` decoder layers (the paper's power-law decay
    ``floor(L * alpha^i)``, motivated by the lower perplexity of later tokens). The layers are split into *core*
    layers, always run (the head: layers ``0 .. flex_start - 1``; the tail: the last ``tail_layers`` layers) and
    *flex* layers between them, which are dropped one by one in a fixed order as the depth decays. The prompt (and the
    first generated token) runs the full model. The schedule depends on the position only, so it is the same for every
    row of a batch: batches (left-padded) work, as in the paper.

    Because the depth never increases and the drop order is fixed, the layer set of token ``i + 1`` is a subset of that
    of token ``i``: a skipped layer never runs again, every layer that runs holds keys/values for every earlier
    position, and no missing state has to be filled (the paper copies keys/values into the skipped layers so later
    tokens can attend to them; with a nested schedule those copies are never read, so omitting them changes nothing).
    Each step runs :func:`hf_decoding_ext.core.anatomy.skip_layers` with ``share_cache=True`` on ``generate()``'s own
    cache: the kept layers append to their entries and the skipped ones are left as they are (their entries are then
    shorter; the attention mask is sized from a kept layer, all of which hold the same length). At the end the cache
    is cropped to the positions every layer holds, so the returned ``past_key_values`` is a consistent cache of a
    prefix of the sequence (continuing from it recomputes the rest with the full model). A sliding-window cache
    (Mistral-style models) cannot be cropped once its window is full: decoding works, but the cache it returns stays
    ragged (the layers skipped last hold fewer positions) and cannot be passed back to ``generate()``.

    Args:
        alpha: the decay rate, ``0 < alpha <= 1``; ``alpha = 1`` keeps every layer (plain decoding, token-identical to
            ``generate()``).
        flex_start: the first flex layer (the head core is ``0 .. flex_start - 1``), an int ``>= 1``, or a float in
            ``(0, 1)``: a fraction of the depth (``max(1, floor(flex_start * L))``).
        tail_layers: the number of last layers always kept (``>= 1``).
        drop_order: ``"shallow_first"`` (default) drops the flex layer just above the head core first, so the kept
            flex layers are the deepest ones, right below the tail core; ``"deep_first"`` drops the deepest flex layer
            first (the kept flex layers are ``flex_start, flex_start + 1, ...``).

    Every generated token gets the processed scores ``generate()`` would give it (temperature, top-k/top-p,
    repetition penalty, ... through its logits processors), greedy or sampled, and eos / ``max_new_tokens`` /
    stopping criteria are honoured. With ``return_dict_in_generate=True`` the output also holds ``d3_layer_counts``
    (layers run for each generated token) and ``d3_layer_sets`` (which ones); the last call's are also kept in
    ``loop.layer_counts`` / ``loop.layer_sets``; :func:`d3_cost` turns them into layer units and parameter
    fractions.

    Deviations from the paper (no official code was found; the paper's full text was not available offline, only its
    abstract and secondary summaries, so the points marked *unconfirmed* are this library's choices):

    * Drop order (*unconfirmed*): the flex layers are dropped shallowest-first by default (``"deep_first"`` is the
      other nested order); the paper's abstract and summaries state only that the head and tail are kept and the middle
      layers skipped. Chosen by measurement: on SmolLM2-135M (12 distillation prompts, 32 tokens, alpha 0.99,
      flex_start 0.5, about 25 of 30 layers per token) dropping deepest-first collapses the text (mean full-model
      log-probability of the continuation -5.7, greedy -0.84) where shallowest-first keeps it readable (-2.0).
    * Missing state: no key/value copying into skipped layers (never read under a nested schedule; see above).
    * Floor: the kept count never goes below the core layers (``flex_start + tail_layers``); ``floor(L * alpha^i)``
      alone reaches 0 for long outputs.
    * Defaults (*unconfirmed*): the paper grid-searches its two hyper-parameters (alpha and a "start", searched over
      0.2-0.8 per a secondary summary, read here as the flex-layer start as a fraction of the depth) per task on
      Llama-2 models; its values could not be read here. ``alpha = 0.99``, ``flex_start = 0.35`` (layer 10 of
      SmolLM2-135M's 30) and one tail layer are this library's defaults, the best of a small grid on distillation
      prompts (32 tokens, mean full-model log-probability of the continuation: at alpha 0.99, about 25 of 30 layers
      per token, flex_start 0.2 / 0.35 gave -2.6 / -1.5 on 6 prompts, greedy -1.0, and 0.5 gave -2.0 on 12,
      greedy -0.84; at alpha 0.98, 24 layers, 0.7 gave -7.5 on 12); see the registry entry for the
      quality-versus-alpha curve.
    * Position index: ``i`` counts the tokens generated by this call, from 0 (a prompt continued from a cache or
      passed whole restarts the schedule).

    Example:
        >>> from hf_decoding_ext.speculative.d3 import D3Decoding
        >>> loop = D3Decoding(alpha=0.98, flex_start=0.35)
        >>> out = model.generate(**inputs, max_new_tokens=64, do_sample=False, custom_generate=loop)  # doctest: +SKIP
        >>> loop.layer_counts[:4]  # SmolLM2-135M: 30 layers  # doctest: +SKIP
        [30, 29, 28, 28]
    """

    supports_sliding_window = True

    def __init__(self, alpha: float = 0.99, flex_start: float = 0.35, tail_layers: int = 1,
                 drop_order: str = "shallow_first"):
        if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not 0.0 < float(alpha) <= 1.0:
            raise ValueError(f"alpha must be a number with 0 < alpha <= 1, got {alpha!r}")
        if isinstance(flex_start, bool) or not isinstance(flex_start, (int, float)):
            raise ValueError(f"flex_start must be an int >= 1 or a float in (0, 1), got {flex_start!r}")
        if isinstance(flex_start, int) and flex_start < 1:
            raise ValueError(f"flex_start must be an int >= 1 (layer 0 is always kept) or a float in (0, 1), got "
                             f"{flex_start!r}")
        if isinstance(flex_start, float) and not 0.0 < flex_start < 1.0:
            raise ValueError(f"flex_start as a float is a fraction of the depth in (0, 1), got {flex_start!r}")
        if isinstance(tail_layers, bool) or not isinstance(tail_layers, int) or tail_layers < 1:
            raise ValueError(f"tail_layers must be an int >= 1, got {tail_layers!r}")
        if drop_order not in DROP_ORDERS:
            raise ValueError(f"drop_order must be one of {DROP_ORDERS}, got {drop_order!r}")
        self.alpha = float(alpha)
        self.flex_start = flex_start
        self.tail_layers = tail_layers
        self.drop_order = drop_order
        self.layer_counts: list[int] = []  # the last call's layers per generated token
        self.layer_sets: list[tuple[int, ...]] = []

    # ------------------------------------------------------------------------------------------- schedule
    def core(self, total: int) -> tuple[int, int]:
        """``(flex_start, tail_layers)`` for a model of ``total`` decoder layers (``ValueError`` when the core layers
        do not leave the model at least its depth)."""
        start = self.flex_start if isinstance(self.flex_start, int) else max(1, math.floor(self.flex_start * total))
        if start + self.tail_layers > total:
            raise ValueError(f"flex_start={self.flex_start!r} (layer {start}) and tail_layers={self.tail_layers} "
                             f"leave no room in a model of {total} decoder layers: the core layers must number at "
                             f"most {total}")
        return start, self.tail_layers

    def schedule(self, total: int, n_tokens: int) -> list[tuple[int, ...]]:
        """The layer sets of the first ``n_tokens`` generated tokens for a model of ``total`` decoder layers.

        >>> D3Decoding(alpha=0.9, flex_start=2).schedule(10, 4)
        [(0, 1, 2, 3, 4, 5, 6, 7, 8, 9), (0, 1, 3, 4, 5, 6, 7, 8, 9), (0, 1, 4, 5, 6, 7, 8, 9), (0, 1, 5, 6, 7, 8, 9)]
        """
        start, tail = self.core(total)
        return [d3_layer_set(total, d3_layer_count(total, self.alpha, i, start + tail), start, tail,
                             self.drop_order) for i in range(n_tokens)]

    # ------------------------------------------------------------------------------------------- decoding
    @staticmethod
    def _view_forward(state: GenerationState, view: LayerSkipView, cached: int):
        mask = state.attention_mask
        positions = state.position_ids(mask)[:, cached:]
        out = view(input_ids=state.input_ids[:, cached:], attention_mask=mask, position_ids=positions,
                   past_key_values=state.cache, use_cache=True, logits_to_keep=1)
        state.stats["forwards"] += 1
        out.logits = out.logits.float()
        return out

    def run(self, state: GenerationState):
        model = state.model
        total = num_layers(model)
        start, tail = self.core(total)
        full = tuple(range(total))
        views: dict[tuple[int, ...], LayerSkipView] = {}
        counts: list[int] = []
        sets: list[tuple[int, ...]] = []
        self.layer_counts, self.layer_sets = counts, sets
        previous = full
        i = 0
        while not state.done:
            keep = d3_layer_set(total, d3_layer_count(total, self.alpha, i, start + tail), start, tail,
                                self.drop_order)
            if not set(keep) <= set(previous):  # the schedule is nested by construction; guard it
                raise RuntimeError(f"D^3 schedule not nested at token {i}: {keep} after {previous}")
            if keep == full:
                out = state.forward()  # the prompt (i = 0) and every full-depth step: the model itself
            else:
                cached = state.input_ids.shape[1] - 1  # every kept layer holds all positions but the last token
                lengths = {j: state.cache.layers[j].get_seq_length() for j in keep}
                if any(n != cached for n in lengths.values()):
                    raise RuntimeError(f"D^3 expects every kept layer to hold {cached} positions, got {lengths}")
                view = views.get(keep)
                if view is None:
                    view = views[keep] = skip_layers(model, keep, share_cache=True)
                out = self._view_forward(state, view, cached)
            logits = out.logits[:, -1, :]
            scores = state.process(logits)
            state.record(scores, logits)
            tokens = state.select(scores)
            counts.append(len(keep))
            sets.append(keep)
            previous = keep
            state.append(tokens)
            i += 1
        cache_layers = getattr(state.cache, "layers", [])
        sliding = any(getattr(layer, "is_sliding", False) for layer in cache_layers)
        if cache_layers and not sliding:  # skipped layers stopped early: keep the prefix every layer holds
            crop_layers(state.cache, min(layer.get_seq_length() for layer in cache_layers))
        state.stats["d3_layer_counts"] = counts
        return {"d3_layer_counts": counts, "d3_layer_sets": sets}

    def __repr__(self) -> str:
        return (f"D3Decoding(alpha={self.alpha}, flex_start={self.flex_start!r}, tail_layers={self.tail_layers}, "
                f"drop_order={self.drop_order!r})")
