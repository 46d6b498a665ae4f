"""Model anatomy: where a causal LM keeps its decoder layers, final norm, LM head and embeddings, early-exit logits of
an intermediate hidden state, and a layer-skip / early-exit *view* of a model.

One implementation for every method that looks inside a model (DoLa and LOL's early exits, kNN-LM's final
representation, the induced amateur's top layers, truncated models, and the self-speculative layer-skip drafters:
"Draft & Verify", Zhang et al., arXiv 2309.08168; "LayerSkip", Elhoushi et al., arXiv 2404.16710; "SWIFT", Xia et
al., arXiv 2410.06916). Supported layouts (the decoder container, its layer list and its final norm):

* Llama-style (Llama, Mistral, Qwen2/3, Gemma, SmolLM, Phi-3, OLMo, ...): ``model.model.layers``, ``model.model.norm``;
* GPT-2-style (GPT-2, GPT-J, GPT-Neo, Falcon, BLOOM, CodeGen): ``model.transformer.h``, ``model.transformer.ln_f``;
* GPT-NeoX / Pythia: ``model.gpt_neox.layers``, ``final_layer_norm``; OPT: ``model.model.decoder.layers``;
  ``final_layernorm`` (Phi), ``norm_f`` (Mamba-style ``backbone``) are recognised too.

Any other architecture gets a ``ValueError`` naming its class.

Example:
    >>> from hf_decoding_ext.core.anatomy import decoder_layers, exit_logits, skip_layers
    >>> from hf_decoding_ext.core.models import load_model
    >>> model, tokenizer = load_model()  # doctest: +SKIP
    >>> len(decoder_layers(model))  # doctest: +SKIP
    30
    >>> out = model(**tokenizer("Paris is", return_tensors="pt"), output_hidden_states=True)  # doctest: +SKIP
    >>> layer_12 = exit_logits(out.hidden_states[12][:, -1], model)  # (batch, vocab), float32  # doctest: +SKIP
    >>> draft = skip_layers(model, keep=range(0, 30, 2))  # every other layer, weights shared  # doctest: +SKIP
"""

from __future__ import annotations

import copy
import inspect
from collections.abc import Iterable, Sequence

import torch
from transformers import Cache, DynamicCache

_DECODER_PATHS = ("model.decoder", "model", "transformer", "gpt_neox", "backbone")
"""Attribute paths, from the causal LM, of the module holding the decoder layers (first match wins)."""
_LAYER_NAMES = ("layers", "h", "blocks")
_NORM_NAMES = ("norm", "ln_f", "final_layer_norm", "final_layernorm", "norm_f", "final_norm")


# ------------------------------------------------------------------------------------------------------ accessors
def _get_path(module, path: str):
    for name in path.split("."):
        module = getattr(module, name, None)
        if not isinstance(module, torch.nn.Module):
            return None
    return module


def _locate(model) -> tuple[str, torch.nn.Module, str]:
    """``(path of the decoder container, the container, attribute name of its layer list)``."""
    for path in _DECODER_PATHS:
        owner = _get_path(model, path)
        if owner is None:
            continue
        for name in _LAYER_NAMES:
            if isinstance(getattr(owner, name, None), torch.nn.ModuleList):
                return path, owner, name
    raise ValueError(
        f"unsupported architecture {type(model).__name__}: cannot find its decoder layers (looked for "
        f"{' / '.join(_LAYER_NAMES)} under {', '.join(_DECODER_PATHS)})"
    )


def decoder(model) -> torch.nn.Module:
    """The module holding the decoder layers (``model.model`` for Llama-style models, ``model.transformer`` for
    GPT-2, ``model.model.decoder`` for OPT, ...): the base model whose output is the last hidden state after the final
    norm."""
    return _locate(model)[1]


def decoder_layers(model) -> torch.nn.ModuleList:
    """The decoder layers of ``model`` (``model.model.layers`` for Llama-style models, ``model.transformer.h`` for
    GPT-2, ...), the module list itself (not a copy).

    Raises:
        ValueError: for an architecture whose layers are not found (the message names its class).

    Example:
        >>> decoder_layers(model) is model.model.layers  # Llama-style  # doctest: +SKIP
        True
    """
    return getattr(*_locate(model)[1:])


def num_layers(model) -> int:
    """Number ``N`` of decoder layers (``output_hidden_states`` gives ``N + 1`` states: embeddings, then one per
    layer, the last one after the final norm)."""
    return len(decoder_layers(model))


def final_norm(model) -> torch.nn.Module:
    """The decoder's final norm, applied to the last layer's output before the LM head (``model.model.norm``,
    ``model.transformer.ln_f``, ``final_layer_norm``, ``final_layernorm``, ``norm_f``).

    Raises:
        ValueError: for an architecture without a recognisable final norm (early-exit through the LM head only with
            ``exit_logits(..., norm=False)``).
    """
    owners = []
    try:
        owners.append(_locate(model)[1])
    except ValueError:
        pass
    owners += [_get_path(model, path) for path in _DECODER_PATHS]
    for owner in owners:
        if owner is None:
            continue
        for name in _NORM_NAMES:
            module = getattr(owner, name, None)
            if isinstance(module, torch.nn.Module):
                return module
    raise ValueError(
        f"unsupported architecture {type(model).__name__}: cannot find the decoder's final norm (looked for "
        f"{', '.join(_NORM_NAMES)} on the decoder). Early-exit through the LM head only (norm=False / "
        "final_norm=False)."
    )


def lm_head(model) -> torch.nn.Module:
    """The LM head (output embeddings) of ``model``."""
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if not isinstance(head, torch.nn.Module):
        raise ValueError(f"unsupported architecture {type(model).__name__}: it has no output embeddings (LM head)")
    return head


def embeddings(model) -> torch.nn.Module:
    """The token embeddings (input embeddings) of ``model``."""
    emb = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    if not isinstance(emb, torch.nn.Module):
        raise ValueError(f"unsupported architecture {type(model).__name__}: it has no input embeddings")
    return emb


def exit_logits(hidden: torch.Tensor, model, norm: bool = True) -> torch.Tensor:
    """Early-exit vocabulary logits (float32) of an intermediate hidden state: ``lm_head(final_norm(hidden))``.

    ``hidden`` is the output of a decoder layer before the final norm, e.g. ``output_hidden_states[j]`` for
    ``j < N`` (``[..., hidden]``, any leading shape); at the last layer (its output before the final norm) this is the
    model's own logits. ``norm=False`` applies the LM head only (the DoLa reference code's early exit).

    Example:
        >>> out = model(input_ids, output_hidden_states=True)  # doctest: +SKIP
        >>> exit_logits(out.hidden_states[4][:, -1], model).shape  # (batch, vocab)  # doctest: +SKIP
    """
    if norm:
        hidden = final_norm(model)(hidden)
    return lm_head(model)(hidden).float()


# ------------------------------------------------------------------------------------------------------ the view
def _check_keep(keep, total: int) -> tuple[int, ...]:
    try:
        items = list(keep)
    except TypeError:
        raise ValueError(f"keep must be a sequence of layer indices, got {keep!r}") from None
    for i in items:
        if isinstance(i, bool) or not isinstance(i, int):
            raise ValueError(f"keep must hold integer layer indices, got {i!r} in {keep!r}")
        if not 0 <= i < total:
            raise ValueError(f"layer index {i} out of range: this model has {total} decoder layers (0 to "
                             f"{total - 1}), keep={keep!r}")
    if not items:
        raise ValueError(f"keep must name at least one decoder layer, got {keep!r}")
    if len(set(items)) != len(items) or items != sorted(items):
        raise ValueError(f"keep must be increasing layer indices without repeats, got {keep!r}")
    return tuple(items)


def _graft(shell: torch.nn.Module, original: torch.nn.Module, path: list[str], layers_name: str,
           keep: Sequence[int]) -> None:
    """Make ``shell`` (built on the meta device) use ``original``'s modules, parameters and buffers, except along
    ``path`` (rebuilt recursively) and the decoder's layer list (the kept layers only)."""
    for name, p in original._parameters.items():
        shell._parameters[name] = p
    for name, b in original._buffers.items():
        shell._buffers[name] = b
    shell._non_persistent_buffers_set = set(original._non_persistent_buffers_set)
    for name, child in original.named_children():
        if not path and name == layers_name:
            setattr(shell, name, torch.nn.ModuleList([child[i] for i in keep]))
        elif path and name == path[0]:
            _graft(getattr(shell, name), child, path[1:], layers_name, keep)
        else:
            setattr(shell, name, child)
    shell.training = original.training


def layer_subset_model(model, keep: Iterable[int]):
    """A causal LM of ``model``'s class and config, with ``num_hidden_layers = len(keep)`` and the decoder layer list
    ``[layers[i] for i in keep]``, built without allocating weights.

    Every module is ``model``'s own (shared objects, no copy); only the containers on the way to the layer list (the
    causal LM and its decoder) are new, so replacing one of *their* children (e.g. a frozen copy of the final norm)
    leaves ``model`` unchanged. The kept layers keep their attention ``layer_idx``: with a cache they read and write
    slot ``i`` of ``model``'s layer numbering, which :class:`LayerSubsetCache` provides (:class:`LayerSkipView` does
    this); without a cache (``use_cache=False``) it is a plain model.

    Raises:
        ValueError: for an unsupported architecture or a bad ``keep`` (quoted).

    Example:
        >>> top = decoder(layer_subset_model(model, [28, 29]))  # the top two layers as a decoder  # doctest: +SKIP
        >>> top(inputs_embeds=hidden, use_cache=False).last_hidden_state  # doctest: +SKIP
    """
    path, _, layers_name = _locate(model)
    keep = _check_keep(keep, len(decoder_layers(model)))
    cfg = copy.deepcopy(model.config)
    cfg.num_hidden_layers = len(keep)
    if getattr(cfg, "layer_types", None) is not None:
        cfg.layer_types = [list(cfg.layer_types)[i] for i in keep]
    with torch.device("meta"):
        shell = type(model)(cfg)
    _graft(shell, model, path.split("."), layers_name, keep)
    left = [n for n, t in list(shell.named_parameters()) + list(shell.named_buffers()) if t.is_meta]
    if left:
        raise ValueError(f"unsupported architecture {type(model).__name__}: cannot build a layer-subset view "
                         f"(modules outside the decoder layers: {left[:4]})")
    if getattr(model, "generation_config", None) is not None:
        shell.generation_config = copy.deepcopy(model.generation_config)
    return shell


def crop_layers(cache: Cache, length: int, layers: Iterable[int] | None = None) -> None:
    """Crop each of ``layers`` (default: all) of ``cache`` to at most ``length`` positions (an absolute length).

    Unlike ``Cache.crop(-k)``, which removes ``k`` positions from every layer, this suits a ragged cache, e.g. the full
    model's cache after a ``share_cache=True`` view appended drafts to its kept layers only:
    ``crop_layers(cache, prefix_length)`` restores it. Layers already shorter are left as they are.

    Example:
        >>> crop_layers(cache, 12)  # every layer now holds at most 12 positions  # doctest: +SKIP
    """
    if isinstance(length, bool) or not isinstance(length, int) or length < 0:
        raise ValueError(f"length must be a non-negative integer, got {length!r}")
    for i in range(len(cache.layers)) if layers is None else layers:
        if i >= len(cache.layers):
            continue
        extra = cache.layers[i].get_seq_length() - length
        if extra > 0:
            cache.layers[i].crop(-extra)


class LayerSubsetCache(Cache):
    """A KV cache addressed with the full model's layer numbering, of which only the ``kept`` layers are used.

    It wraps ``base`` (its layer entries *are* ``base``'s: writes go to ``base``). A kept layer ``i`` reads and
    writes ``base``'s slot ``i``; the other slots are never touched. Sequence-length and mask-size queries about a
    skipped slot are answered from a kept one (of the same attention kind, full or sliding), so ``get_seq_length()``
    is the length the kept layers hold. ``crop(-k)`` removes ``k`` positions from the kept layers (``crop(n)``,
    ``n > 0``: crops them to ``n`` positions); the other slots are never cropped.
    """

    def __init__(self, base: Cache, kept: Sequence[int]):  # no Cache.__init__: the state is base's
        if isinstance(base, LayerSubsetCache):
            base = base.base
        self.base = base
        self.kept = tuple(kept)

    @property
    def layers(self):
        return self.base.layers

    def __getattr__(self, name):
        if name in ("base", "kept") or name.startswith("__"):
            raise AttributeError(name)
        return getattr(self.base, name)

    def _slot(self, layer_idx: int) -> int:
        if layer_idx in self.kept:
            return layer_idx
        layers = self.base.layers
        sliding = bool(getattr(layers[layer_idx], "is_sliding", False)) if layer_idx < len(layers) else False
        for j in self.kept:
            if j < len(layers) and bool(getattr(layers[j], "is_sliding", False)) == sliding:
                return j
        return self.kept[0]

    def update(self, key_states, value_states, layer_idx: int, *args, **kwargs):
        return self.base.update(key_states, value_states, layer_idx, *args, **kwargs)

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return self.base.get_seq_length(self._slot(layer_idx))

    def get_mask_sizes(self, query_length: int, layer_idx: int = 0):
        return self.base.get_mask_sizes(query_length, self._slot(layer_idx))

    def get_query_offset(self, layer_idx: int = 0):
        return self.base.get_query_offset(self._slot(layer_idx))

    def crop(self, tokens: int) -> None:
        length = max(0, self.get_seq_length() + tokens) if tokens <= 0 else tokens
        crop_layers(self.base, length, self.kept)


class LayerSkipView(torch.nn.Module):
    """A causal LM that runs a chosen subset of ``model``'s decoder layers (embeddings, the kept layers in order, the
    final norm, the LM head); see :func:`skip_layers`.

    Called like a causal LM: ``view(input_ids, attention_mask=None, position_ids=None, past_key_values=None,
    use_cache=True, logits_to_keep=0, output_hidden_states=False, inputs_embeds=None)`` returns the model's output
    object (``logits``; ``past_key_values`` when ``use_cache``; ``hidden_states``: the input of the first kept layer,
    each kept layer's output, the last after the final norm). Transformers itself runs the forward (masks, rotary
    embeddings, attention kernels), on a shell of ``model``'s class whose modules are ``model``'s (no copy).

    Cache modes (the layers always address the cache with ``model``'s layer numbering):

    * ``share_cache=False`` (default), the view's own cache: ``past_key_values=None`` starts a new one; pass back
      the ``past_key_values`` the view returned (a :class:`LayerSubsetCache`) to continue. Incremental decoding with
      it equals a cache-free forward of the view over the whole sequence. Any other cache is refused.
    * ``share_cache=True``, the full model's cache: pass ``model``'s cache (``past_key_values``, required); the kept
      layers read the prefix from their own entries (computed by the full model) and append the new positions to
      them; the skipped layers' entries are left untouched, so the cache is ragged afterwards. The returned
      ``past_key_values`` is the caller's cache object. Before the full model runs on it again, crop it back to an
      absolute length with :func:`crop_layers` (``crop_layers(cache, prefix_length)``, e.g. by a speculative engine
      after drafting; a plain ``cache.crop(-k)`` would also cut the untouched layers).

    The view changes nothing in ``model``. As its modules are ``model``'s, hooks registered on them fire for the view
    too, and ``view.train()``/``view.eval()`` switch ``model``'s modules.
    """

    def __init__(self, model, keep: Iterable[int], share_cache: bool = False):
        super().__init__()
        total = num_layers(model)
        self.keep = _check_keep(keep, total)
        self.share_cache = bool(share_cache)
        self.total_layers = total
        self.shell = layer_subset_model(model, self.keep)
        self.__dict__["model"] = model  # not a submodule: the view owns nothing
        params = inspect.signature(type(self.shell).forward).parameters
        self._cache_arg = "cache" if "cache" in params else "past_key_values"
        self._hidden_ready = False

    @property
    def config(self):
        """The view's config: ``model``'s, with ``num_hidden_layers = len(keep)``."""
        return self.shell.config

    @property
    def device(self) -> torch.device:
        return self.shell.device

    @property
    def dtype(self) -> torch.dtype:
        return self.shell.dtype

    def extra_repr(self) -> str:
        return f"keep={list(self.keep)}, of {self.total_layers} layers, share_cache={self.share_cache}"

    def _share_capture_hooks(self) -> None:
        """transformers installs its hidden-state capturing hooks once per model, on the layer modules, which the view
        shares with ``model``: install ``model``'s (if not done yet) and mark the shell's models as hooked, so that
        no layer ever carries two sets."""
        try:
            from transformers.utils.output_capturing import maybe_install_capturing_hooks
        except ImportError:  # pragma: no cover - other transformers versions capture per call
            return
        parts = _locate(self.model)[0].split(".")
        paths = [".".join(parts[:k]) for k in range(len(parts) + 1)]  # "", "model", ... down to the decoder
        originals = [self.model] + [_get_path(self.model, p) for p in paths[1:]]
        if not any(getattr(m, "_output_capturing_hooks_installed", False) for m in originals):
            maybe_install_capturing_hooks(originals[-1])
        for p in paths:
            (_get_path(self.shell, p) if p else self.shell)._output_capturing_hooks_installed = True
        self._hidden_ready = True

    def _cache_for(self, past_key_values, use_cache: bool):
        if not use_cache:
            if past_key_values is not None:
                raise ValueError("past_key_values given with use_cache=False")
            return None
        if self.share_cache:
            if past_key_values is None or isinstance(past_key_values, LayerSubsetCache):
                raise ValueError("share_cache=True runs on the full model's cache: pass it as past_key_values (got "
                                 f"{type(past_key_values).__name__})")
            return LayerSubsetCache(past_key_values, self.keep)
        if past_key_values is None:
            return LayerSubsetCache(DynamicCache(config=self.model.config), self.keep)
        if not isinstance(past_key_values, LayerSubsetCache) or past_key_values.kept != self.keep:
            raise ValueError(f"this view keeps its own cache: pass the past_key_values it returned, not a "
                             f"{type(past_key_values).__name__} (use share_cache=True to run on the full model's "
                             "cache)")
        return past_key_values

    def forward(self, input_ids=None, attention_mask=None, position_ids=None, past_key_values=None,
                use_cache: bool = True, logits_to_keep: int | torch.Tensor = 0, output_hidden_states: bool = False,
                inputs_embeds=None, cache=None, **kwargs):
        if cache is not None:
            if past_key_values is not None:
                raise ValueError("pass the cache once (past_key_values or cache)")
            past_key_values = cache
        use_cache = bool(use_cache)
        view_cache = self._cache_for(past_key_values, use_cache)
        if output_hidden_states and not self._hidden_ready:
            self._share_capture_hooks()
        out = self.shell(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                         inputs_embeds=inputs_embeds, use_cache=use_cache, logits_to_keep=logits_to_keep,
                         output_hidden_states=output_hidden_states, return_dict=True,
                         **{self._cache_arg: view_cache}, **kwargs)
        if use_cache:
            returned = past_key_values if self.share_cache else view_cache
            for name in ("cache", "past_key_values"):
                if name in out:
                    out[name] = returned
        return out


def skip_layers(model, keep: Iterable[int], share_cache: bool = False) -> LayerSkipView:
    """A view of ``model`` that runs only the decoder layers ``keep`` (increasing indices), callable like a causal LM.

    With every layer kept it computes exactly the full model's logits; with ``keep = range(n)`` it is the early exit
    after ``n`` layers (:func:`early_exit`, the same logits as :func:`hf_decoding_ext.core.models.truncated_model`).
    Weights are shared, never copied. See :class:`LayerSkipView` for the two cache modes: the view's own cache
    (default) or, with ``share_cache=True``, the full model's cache, whose skipped layers are left untouched and which
    the caller crops back afterwards (the self-speculative drafting of Draft & Verify, arXiv 2309.08168, and SWIFT,
    arXiv 2410.06916).

    Args:
        model: a causal LM of a supported architecture (see the module docstring).
        keep: the decoder layers to run (``0 .. N - 1``), increasing, at least one.
        share_cache: run on the full model's cache instead of the view's own.

    Raises:
        ValueError: for an unsupported architecture or a bad ``keep`` (quoted).

    Example:
        >>> import torch
        >>> from hf_decoding_ext.core.anatomy import skip_layers
        >>> draft = skip_layers(model, keep=[0, 1, 2, 3, 5, 7, 9])  # doctest: +SKIP
        >>> out = draft(input_ids=torch.tensor([[1, 2, 3]]))  # own cache  # doctest: +SKIP
        >>> out = draft(input_ids=torch.tensor([[4]]), past_key_values=out.past_key_values)  # doctest: +SKIP
    """
    return LayerSkipView(model, keep, share_cache=share_cache)


def early_exit(model, n: int, share_cache: bool = False) -> LayerSkipView:
    """The view running the first ``n`` decoder layers, then the final norm and LM head: ``skip_layers(model,
    range(n))`` (``1 <= n <= N``; ``n = N`` is the full model).

    Example:
        >>> draft = early_exit(model, 8)  # LayerSkip-style early exit after 8 layers  # doctest: +SKIP
    """
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ValueError(f"n must be a positive number of layers, got {n!r}")
    return skip_layers(model, range(n), share_cache=share_cache)


def cache_keys(cache: Cache, layer_idx: int) -> torch.Tensor:
    """The cached keys ``(batch, kv_heads, length, head_dim)`` of layer ``layer_idx`` (RoPE already applied, as
    transformers caches them)."""
    layers = getattr(cache, "layers", None)
    if layers is not None:
        return layers[layer_idx].keys
    return cache.key_cache[layer_idx]  # older transformers


def query_attention(model, hidden_in: torch.Tensor, position: int, cache: Cache, layer: int = -1) -> torch.Tensor:
    """The attention distribution ``(length,)`` (float32, mean over heads) of one query over the keys a layer has
    cached: the layer's input hidden state ``hidden_in`` ``(hidden,)`` at sequence position ``position`` is normed,
    projected to queries, rotated (RoPE) and scored against ``cache``'s keys of that layer, as the layer's own
    attention would score them (full causal attention over the cached positions).

    Llama-style attention (``input_layernorm``, ``self_attn.q_proj``, the decoder's ``rotary_emb``; Qwen3's
    ``q_norm`` is applied) and GPT-2's (``ln_1``, ``attn.c_attn``); anything else gets a ``ValueError``. Used by SpecExtend to rank context chunks by the
    target's attention.

    Example:
        >>> out = model(ids, output_hidden_states=True, use_cache=True)  # doctest: +SKIP
        >>> attn = query_attention(model, out.hidden_states[-2][0, -1], ids.shape[1] - 1,
        ...                        out.past_key_values)  # doctest: +SKIP
    """
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

    layers = decoder_layers(model)
    idx = layer % len(layers)
    block = layers[idx]
    attn = getattr(block, "self_attn", None) or getattr(block, "attn", None)
    cfg = model.config
    with torch.no_grad():
        if attn is not None and hasattr(attn, "c_attn") and hasattr(block, "ln_1"):  # GPT-2: no rotation
            n_heads = cfg.n_head
            head_dim = cfg.n_embd // n_heads
            x = block.ln_1(hidden_in.reshape(1, 1, -1))
            q = attn.c_attn(x)[..., : cfg.n_embd].view(1, 1, n_heads, head_dim).transpose(1, 2)
            scaling = head_dim ** -0.5 if getattr(cfg, "scale_attn_weights", True) else 1.0
        else:
            rotary = getattr(decoder(model), "rotary_emb", None)
            if attn is None or not hasattr(attn, "q_proj") or not hasattr(block, "input_layernorm") or rotary is None:
                raise ValueError(f"query_attention supports Llama-style (input_layernorm, self_attn.q_proj, "
                                 f"rotary_emb) and GPT-2 attention, not {type(model).__name__}")
            n_heads = cfg.num_attention_heads
            head_dim = getattr(attn, "head_dim", None) or cfg.hidden_size // n_heads
            x = block.input_layernorm(hidden_in.reshape(1, 1, -1))
            q = attn.q_proj(x).view(1, 1, n_heads, head_dim)
            if getattr(attn, "q_norm", None) is not None:
                q = attn.q_norm(q)
            q = q.transpose(1, 2)
            cos, sin = rotary(x, torch.tensor([[int(position)]], device=x.device))
            q, _ = apply_rotary_pos_emb(q, q, cos, sin)
            scaling = getattr(attn, "scaling", head_dim ** -0.5)
        keys = cache_keys(cache, idx)
        keys = keys.repeat_interleave(n_heads // keys.shape[1], dim=1)
        scores = (q.float() @ keys.float().transpose(-1, -2))[0, :, 0] * scaling
        return torch.softmax(scores, dim=-1).mean(0)


class OutputCapture:
    """Captures a module's output during the forwards run inside ``with`` (the last call's output in ``.output``;
    the first element when the module returns a tuple; ``module=None`` captures nothing). ``OutputCapture(final_norm(model))`` captures the lm_head's
    input: the features trained heads and acceptance predictors read.

    Example:
        >>> with OutputCapture(final_norm(model)) as cap:  # doctest: +SKIP
        ...     logits = model(ids).logits
        >>> cap.output.shape  # (batch, seq, hidden)  # doctest: +SKIP
    """

    def __init__(self, module: torch.nn.Module | None):
        self.module = module  # None: captures nothing
        self.output = None
        self._handle = None

    def _hook(self, module, args, output):
        self.output = output[0] if isinstance(output, tuple) else output

    def __enter__(self):
        if self.module is not None:
            self._handle = self.module.register_forward_hook(self._hook)
        return self

    def __exit__(self, *exc):
        if self._handle is not None:
            self._handle.remove()
            self._handle = None
        return False


# ------------------------------------------------------------------------------------------------------ sub-layers
_LLAMA_SUBLAYERS = frozenset({"self_attn", "mlp", "input_layernorm", "post_attention_layernorm"})
"""The children of a Llama-style pre-norm decoder layer (Llama, Mistral, Qwen2/3, SmolLM): ``h + attn(norm1(h))``,
then ``h + mlp(norm2(h))``. A layer with any other child (extra norms, dropouts, MoE blocks) is refused."""


def _check_sublayer_model(model) -> None:
    layers = decoder_layers(model)
    for i, layer in enumerate(layers):
        names = {name for name, _ in layer.named_children()}
        if names != _LLAMA_SUBLAYERS:
            raise ValueError(
                f"unsupported architecture {type(model).__name__} for sub-layer skipping: decoder layer {i} "
                f"({type(layer).__name__}) has the children {sorted(names)}, not the Llama-style pre-norm "
                f"{sorted(_LLAMA_SUBLAYERS)} (use skip_layers() to skip whole layers)")


def _check_skip_set(indices, total: int, what: str) -> frozenset[int]:
    try:
        items = list(indices)
    except TypeError:
        raise ValueError(f"{what} must be a sequence of layer indices, got {indices!r}") from None
    for i in items:
        if isinstance(i, bool) or not isinstance(i, int):
            raise ValueError(f"{what} must hold integer layer indices, got {i!r} in {indices!r}")
        if not 0 <= i < total:
            raise ValueError(f"layer index {i} out of range in {what}={indices!r}: this model has {total} decoder "
                             f"layers (0 to {total - 1})")
    if len(set(items)) != len(items):
        raise ValueError(f"{what} repeats a layer index: {indices!r}")
    return frozenset(items)


class PartialDecoderLayer(torch.nn.Module):
    """A Llama-style decoder layer with its attention and/or MLP sub-layer switched off (see
    :func:`skip_sublayers`). A skipped sub-layer is never called: it adds nothing to the residual stream, and a
    skipped attention neither reads nor writes the layer's KV cache. Its modules are the original layer's."""

    def __init__(self, layer: torch.nn.Module, attention: bool, mlp: bool):
        super().__init__()
        self.layer = layer
        self.run_attention = bool(attention)
        self.run_mlp = bool(mlp)

    def extra_repr(self) -> str:
        return f"attention={self.run_attention}, mlp={self.run_mlp}"

    def forward(self, hidden_states: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        if args:
            raise ValueError("PartialDecoderLayer takes the hidden states positionally and everything else by name")
        layer = self.layer
        if self.run_attention:  # the same kwargs the decoder hands the layer, as the layer hands its attention
            out = layer.self_attn(hidden_states=layer.input_layernorm(hidden_states), **kwargs)
            hidden_states = hidden_states + (out[0] if isinstance(out, tuple) else out)
        if self.run_mlp:
            out = layer.mlp(layer.post_attention_layernorm(hidden_states))
            if isinstance(out, tuple):
                raise ValueError(f"sub-layer skipping needs an MLP returning a tensor, not {type(layer.mlp).__name__}")
            hidden_states = hidden_states + out
        return hidden_states


class SubLayerSkipView(LayerSkipView):
    """A causal LM that runs ``model`` with chosen attention and MLP sub-layers skipped; see :func:`skip_sublayers`.

    A layer with both sub-layers skipped is left out entirely (as in :class:`LayerSkipView`); a layer with one of
    them skipped runs as a :class:`PartialDecoderLayer`; the other layers are ``model``'s own modules. Everything
    else (call signature, the two cache modes, ``crop_layers``) is :class:`LayerSkipView`'s, with the cache
    addressed by the layers whose *attention* runs (:attr:`attention_layers`): only they read and write KV.
    """

    def __init__(self, model, attention: Iterable[int] = (), mlp: Iterable[int] = (), share_cache: bool = False):
        total = num_layers(model)
        _check_sublayer_model(model)
        skip_attention = _check_skip_set(attention, total, "attention")
        skip_mlp = _check_skip_set(mlp, total, "mlp")
        keep = [i for i in range(total) if i not in skip_attention or i not in skip_mlp]
        if not keep:
            raise ValueError(f"every sub-layer of the {total} decoder layers is skipped (attention={attention!r}, "
                             f"mlp={mlp!r}): at least one must run")
        super().__init__(model, keep, share_cache=share_cache)
        self.skip_attention = tuple(sorted(skip_attention))
        self.skip_mlp = tuple(sorted(skip_mlp))
        self.attention_layers = tuple(i for i in range(total) if i not in skip_attention)
        originals = decoder_layers(model)
        shell_layers = decoder_layers(self.shell)
        self._partial = []
        for j, i in enumerate(self.keep):
            if i in skip_attention or i in skip_mlp:
                block = PartialDecoderLayer(originals[i], attention=i not in skip_attention, mlp=i not in skip_mlp)
                shell_layers[j] = block
                self._partial.append(block)

    def extra_repr(self) -> str:
        return (f"skip attention={list(self.skip_attention)}, skip mlp={list(self.skip_mlp)}, of "
                f"{self.total_layers} layers, share_cache={self.share_cache}")

    def _share_capture_hooks(self) -> None:
        super()._share_capture_hooks()
        try:
            from transformers.utils.output_capturing import install_output_capuring_hook
        except ImportError:  # pragma: no cover - other transformers versions
            return
        for block in self._partial:  # the partial layers are new modules: give them the layers' capturing hook
            if not getattr(block, "_hidden_hook_installed", False):
                install_output_capuring_hook(block, "hidden_states", 0)
                block._hidden_hook_installed = True

    def _cache_for(self, past_key_values, use_cache: bool):
        if not use_cache:
            if past_key_values is not None:
                raise ValueError("past_key_values given with use_cache=False")
            return None
        # no attention runs at all: nothing reads or writes the cache; lengths are answered from the first layer's
        kept = self.attention_layers or (0,)
        if self.share_cache:
            if past_key_values is None or isinstance(past_key_values, LayerSubsetCache):
                raise ValueError("share_cache=True runs on the full model's cache: pass it as past_key_values (got "
                                 f"{type(past_key_values).__name__})")
            return LayerSubsetCache(past_key_values, kept)
        if past_key_values is None:
            return LayerSubsetCache(DynamicCache(config=self.model.config), kept)
        if not isinstance(past_key_values, LayerSubsetCache) or past_key_values.kept != kept:
            raise ValueError(f"this view keeps its own cache: pass the past_key_values it returned, not a "
                             f"{type(past_key_values).__name__} (use share_cache=True to run on the full model's "
                             "cache)")
        return past_key_values


def skip_sublayers(model, attention: Iterable[int] = (), mlp: Iterable[int] = (),
                   share_cache: bool = False) -> SubLayerSkipView:
    """A view of ``model`` whose decoder layers ``attention`` skip their attention sub-layer and whose layers ``mlp``
    skip their MLP sub-layer (SWIFT's layer sets, Xia et al., arXiv 2410.06916), callable like a causal LM.

    Llama-style pre-norm layers only (each layer is ``h + attn(norm1(h))`` then ``h + mlp(norm2(h))``; the layer's
    children must be exactly ``self_attn``, ``mlp``, ``input_layernorm``, ``post_attention_layernorm``). A skipped
    sub-layer is not run at all (no compute, not compute-then-zero): a skipped MLP adds nothing to the residual
    stream; a skipped attention adds nothing and neither reads nor writes its layer's KV cache, so with
    ``share_cache=True`` the full model's cache is ragged after the view appended positions (only the layers whose
    attention runs grow) and the caller crops it back with :func:`crop_layers` (the speculative engine does this
    for drafters that declare the ``"target_cache"`` need). Skipping nothing is the full model (the same modules,
    bit for bit); skipping both sub-layers of a layer is :func:`skip_layers` without that layer.

    Args:
        model: a Llama-style causal LM.
        attention: indices of the layers whose attention sub-layer is skipped.
        mlp: indices of the layers whose MLP sub-layer is skipped.
        share_cache: run on the full model's cache instead of the view's own (see :class:`LayerSkipView`).

    Raises:
        ValueError: for an architecture other than Llama-style pre-norm layers (GPT-2, Gemma's extra norms, MoE
            blocks, ...), bad indices (quoted), or every sub-layer skipped.

    Example:
        >>> from hf_decoding_ext.core.anatomy import skip_sublayers, crop_layers
        >>> draft = skip_sublayers(model, attention=[1, 3, 5], mlp=[2, 3], share_cache=True)  # doctest: +SKIP
        >>> out = model(ids, use_cache=True)  # doctest: +SKIP
        >>> step = draft(input_ids=next_id, past_key_values=out.past_key_values)  # doctest: +SKIP
        >>> crop_layers(out.past_key_values, ids.shape[1])  # back to the full model's cache  # doctest: +SKIP
    """
    return SubLayerSkipView(model, attention=attention, mlp=mlp, share_cache=share_cache)


def layer_parameters(model) -> list[int]:
    """Parameter count of each decoder layer of ``model``, in order: the unit of the self-drafting methods' cost
    accounting in parameters touched (a weight-bandwidth-bound decode step reads each layer's weights once).

    Example:
        >>> layer_parameters(model)[0]  # about 3.54M for SmolLM2-135M  # doctest: +SKIP
        3540096
    """
    return [sum(p.numel() for p in layer.parameters()) for layer in decoder_layers(model)]


def sublayer_parameters(model) -> dict[str, int]:
    """Parameter counts of ``model``'s parts, for the cost of a sub-layer-skipping view in parameters touched:
    ``{"head": LM head (the embeddings too when untied), "norm": final norm, "attention": [per layer, with its
    input norm], "mlp": [per layer, with its post-attention norm], "total": ...}`` (tied weights counted once).

    Example:
        >>> sizes = sublayer_parameters(model)  # doctest: +SKIP
        >>> sizes["head"] / sizes["total"]  # about 0.21 for SmolLM2-135M  # doctest: +SKIP
    """
    _check_sublayer_model(model)
    seen: set[int] = set()

    def count(module) -> int:
        n = 0
        for p in module.parameters():
            if id(p) not in seen:
                seen.add(id(p))
                n += p.numel()
        return n

    head = count(lm_head(model)) + count(embeddings(model))
    norm = count(final_norm(model))
    attention = [count(layer.self_attn) + count(layer.input_layernorm) for layer in decoder_layers(model)]
    mlp = [count(layer.mlp) + count(layer.post_attention_layernorm) for layer in decoder_layers(model)]
    return {"head": head, "norm": norm, "attention": attention, "mlp": mlp,
            "total": head + norm + sum(attention) + sum(mlp)}
