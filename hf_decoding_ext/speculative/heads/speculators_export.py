"""Export of :class:`~hf_decoding_ext.speculative.heads.eagle.EagleDrafterModel` to the ``speculators`` format.

``speculators`` (vllm-project/speculators, formerly neuralmagic/speculators) stores a drafter as a folder with a
``config.json`` and a ``model.safetensors``; ``vllm serve <folder>`` reads the ``speculators_config`` and loads the
drafter next to its verifier. Papers: EAGLE (Li et al., arXiv 2401.15077), HASS (Zhang et al., arXiv 2408.15766),
EAGLE-3 (Li et al., "EAGLE-3: Scaling up Inference Acceleration of Large Language Models via Training-Time Test",
arXiv 2503.01840), FSPAD (Gui et al., arXiv 2408.15562).

**Default type: ``"eagle"`` (EAGLE-1).** The drafter reads *one* feature (the verifier's last hidden state) and
fuses it with the next token's embedding through one ``Linear(2H -> H)``: that is EAGLE-1's architecture, so the
export is speculators' EAGLE-1/HASS type (``EagleSpeculatorConfig``) unless asked otherwise. ``"eagle3"`` is kept
only as an explicitly requested *storage layout* (EAGLE-3's key names, draft-vocabulary maps and base weights) with
the caveat below: it is not an EAGLE-3 drafter, and exporting it logs a warning.

**Compatibility, stated plainly.** Our drafter is an EAGLE-1/HASS-style drafter with FSPAD additions: ``fc`` fuses
``[embedding(x_{p+1}), f_p]`` (``2H -> H``, with bias) where ``f_p`` is the verifier's *last* hidden state after
its final norm; one standard ``LlamaDecoderLayer`` (its ``input_layernorm`` applied to the fused vector); no final
norm; the verifier's lm_head rows of the draft vocabulary. No runtime executes that exactly:

- EAGLE-3 (``speculators_model_type="eagle3"``) fuses *three* verifier layers (``fc``: ``3H -> H``, no bias), its
  first decoder layer attends over ``[input_layernorm(embedding), hidden_norm(hidden)]`` (``q/k/v_proj`` take
  ``2H`` inputs) and a final ``norm`` precedes its ``lm_head``. Our ``fc.weight`` is ``(H, 2H)`` and our
  ``q/k/v_proj`` take ``H`` inputs, so vLLM's ``Eagle3LlamaForCausalLM`` should refuse the checkpoint at weight
  loading rather than run something else (from reading its ``load_weights``, not run here: ``fc`` is a
  ``ReplicatedLinear(3H, H)`` whose loader asserts equal shapes, and ``hf_decoding_ext.*`` keys have no parameter).
  The ``"eagle3"``
  export is the EAGLE-3 family *storage layout* (key names, draft-vocabulary convention, base weights), not a
  runnable EAGLE-3 drafter.
- EAGLE-1/HASS (``speculators_model_type="eagle"``) is the honest architectural classification: the same
  ``[embedding, feature]`` fusion (HASS: ``fusion_bias=True``), one Llama decoder layer, the verifier's lm_head.
  It still differs: with ``layernorms=False`` speculators replaces the decoder's ``input_layernorm`` by the identity
  (we keep it; ``layernorms=True`` would add ``embedding_layernorm`` and ``pre_lm_head_layernorm`` that we lack), it
  has no draft vocabulary, and vLLM's speculators loader registers only ``eagle3`` (and newer non-EAGLE types).
- FSPAD's feature sampler (``fs_*``) and logit adapter (``logit_adapter``) have no counterpart in either format;
  they are stored under the ``hf_decoding_ext.`` key prefix, which a strict loader rejects and
  :func:`load_speculators` restores. Zeroed (untrained) they are the identity, but a trained drafter needs them.

So: ``"eagle"`` (the default) is the honest type; ``"eagle3"`` (only when requested) is the EAGLE-3 family layout
with the draft vocabulary maps and base weights, a faithful container but not an EAGLE-3 drafter. Either way
:func:`load_speculators` restores the exact drafter.

**config.json** (field names of ``speculators.config.SpeculatorModelConfig`` / ``SpeculatorsConfig`` /
``VerifierConfig``, ``speculators.proposals.greedy.GreedyTokenProposalConfig`` and, per type,
``speculators.models.eagle3.Eagle3SpeculatorConfig`` or ``speculators.models.eagle.EagleSpeculatorConfig``):

==============================================  =====================================================================
field                                           value
==============================================  =====================================================================
``speculators_model_type``                      ``"eagle"`` (default) or ``"eagle3"`` (when requested)
``architectures``                               ``["Eagle3Speculator"]`` / ``["EagleSpeculator", "LlamaDecoderLayer"]``
``transformer_layer_config``                    ``config.llama_config()`` as a dict (``model_type: "llama"``,
                                                ``num_hidden_layers: 1``, ``vocab_size`` = verifier vocab, plus
                                                ``rope_theta`` for readers older than ``rope_parameters``)
``draft_vocab_size`` (eagle3)                   ``config.draft_vocab_size`` (the verifier vocab if untrimmed)
``norm_before_residual`` (eagle3)               ``false`` (written: vLLM defaults to ``true`` when absent)
``target_hidden_size`` (eagle3)                 ``config.hidden_size``
``eagle_aux_hidden_state_layer_ids`` (eagle3)   ``null``: we read one feature, the last layer after the final norm
``transformer_layer_architecture`` (eagle)      ``"LlamaDecoderLayer"``
``layernorms`` / ``fusion_bias`` (eagle)        ``false`` / ``true`` (HASS-style fusion bias; see the norm caveat)
``speculators_config.algorithm``                the type
``speculators_config.proposal_methods``         ``[{"proposal_type": "greedy", "speculative_tokens": N,
                                                "verifier_accept_k": 1, "accept_tolerance": 0.0}]``,
                                                ``N = config.num_draft_tokens`` unless given (vLLM's
                                                ``num_speculative_tokens``)
``speculators_config.default_proposal_method``  ``"greedy"``
``speculators_config.verifier``                 ``{"name_or_path": config.base_model_name_or_path,
                                                "architectures": [...]}`` (or the arguments)
``speculators_version``                         :data:`SPECULATORS_FORMAT_VERSION`
``hf_decoding_ext``                             our own block: the full ``EagleDrafterConfig``, the true
                                                architecture and the list of extra keys (ignored by speculators/vLLM)
==============================================  =====================================================================

**model.safetensors**, ``"eagle3"`` layout (``H`` hidden size, ``V`` verifier vocab, ``D`` draft vocab):

- ``fc.weight`` ``(H, 2H)``: our ``fc.weight``. EAGLE-3's is ``(H, 3H)`` (three verifier layers).
- ``layers.0.{input_layernorm, post_attention_layernorm, self_attn.{q,k,v,o}_proj, mlp.{gate,up,down}_proj}.weight``:
  our decoder layer, same names as EAGLE-3's first layer; EAGLE-3's ``q/k/v_proj`` take ``2H`` inputs, its
  ``input_layernorm`` normalises the embedding only, and it has a ``hidden_norm`` we lack.
- ``lm_head.weight`` ``(D, H)``: the base lm_head rows of the draft vocabulary in ascending target id (speculators:
  ``verifier_lm_head[t2d]``); only with ``include_base_weights`` and an attached drafter.
- ``embed_tokens.weight`` ``(V, H)``: the base input embeddings (same condition; optional for vLLM, which otherwise
  shares the verifier's).
- ``d2t`` ``(D,)`` int64 and ``t2d`` ``(V,)`` bool: the EAGLE-3 vocabulary maps (below); written only when
  ``D < V`` (speculators keeps no maps when the vocabularies are equal).
- ``hf_decoding_ext.draft_order`` ``(D,)`` int64: the exported row of our draft index ``j`` (our ``d2t`` is in
  frequency order; this restores it exactly).
- ``hf_decoding_ext.fc.bias`` ``(H,)``: our fusion bias (EAGLE-3's ``fc`` has none).
- ``hf_decoding_ext.fs_feature.weight``, ``hf_decoding_ext.fs_embed.weight``, ``hf_decoding_ext.fs_out.weight``
  ``(w, H)``/``(H, w)``: FSPAD's feature sampler (when ``feature_sampling``).
- ``hf_decoding_ext.logit_adapter.linear.{weight,bias}``: FSPAD's partial-alignment adapter (when
  ``partial_alignment``).

EAGLE-3 has a final ``norm.weight`` before ``lm_head``; we have none, so none is written (a runtime would use its
initialisation). Our ``d2t`` buffer holds target ids in frequency order; the EAGLE-3 convention (speculators'
``build_vocab_mappings_from_distribution``) sorts the draft vocabulary by target id, stores ``d2t[i] = target_i - i``
(vLLM: ``targets = arange(D) + d2t``) and ``t2d`` as a boolean mask whose ``True`` positions are the same sorted
ids, so ``lm_head.weight == verifier_lm_head[t2d]``.

``"eagle"`` layout: ``fusion_fc.{weight,bias}`` (= our ``fc``), ``transformer.*`` (= our ``layers.0.*``,
``transformer.input_layernorm.weight`` included although speculators' ``layernorms=False`` model has no such
parameter), no ``embed_tokens``/``lm_head`` (speculators never saves them for EAGLE-1), the draft vocabulary as
``hf_decoding_ext.d2t`` (target ids, our order; EAGLE-1 has no draft vocabulary) and the same FSPAD extras;
``include_base_weights`` does not apply.

Example:
    >>> from hf_decoding_ext.speculative.heads.speculators_export import export_speculators, load_speculators
    >>> export_speculators(drafter, "out/eagle-speculators")  # doctest: +SKIP
    >>> drafter2 = load_speculators("out/eagle-speculators").attach(model)  # doctest: +SKIP
"""

from __future__ import annotations

import json
import os

import torch
from safetensors.torch import load_file, save_file
from transformers.utils import logging

from hf_decoding_ext.speculative.heads.eagle import _LAYER_KEYS, EagleDrafterConfig, EagleDrafterModel

logger = logging.get_logger(__name__)

SPECULATORS_FORMAT_VERSION = "0.3.0"
"""The speculators release whose config layout this export follows (``speculators_version``)."""

EXTRA_PREFIX = "hf_decoding_ext."
_TYPES = ("eagle", "eagle3")  # the first is the default
_EXTRA_MODULES = ("fs_feature.", "fs_embed.", "fs_out.", "logit_adapter.")
_ARCHITECTURES = {"eagle3": ["Eagle3Speculator"], "eagle": ["EagleSpeculator", "LlamaDecoderLayer"]}
_EXTRA_DOCS = {
    "fc.bias": "bias of the fusion Linear(2H -> H) over [embedding, feature] (EAGLE-3's fc has none)",
    "fs_feature.weight": "FSPAD feature sampling W_f: s = W_d((W_f f) * (W_e e)), fused input f + s",
    "fs_embed.weight": "FSPAD feature sampling W_e",
    "fs_out.weight": "FSPAD feature sampling W_d (zero: plain EAGLE input)",
    "logit_adapter.linear.weight": "FSPAD partial alignment: logits = lm_head(g(f^)), g(x) = x + SiLU(W x + b)",
    "logit_adapter.linear.bias": "FSPAD partial alignment adapter bias",
    "draft_order": "row of the exported (ascending target id) draft vocabulary holding our draft index j",
    "d2t": "draft vocabulary as target ids in our (frequency) order; EAGLE-1 has no draft vocabulary",
}


# ---------------------------------------------------------------------------------------------------- names
def _export_name(name: str, layout: str) -> str:
    """Our state-dict key -> the exported key (``d2t`` is handled separately)."""
    if name.startswith(_EXTRA_MODULES):
        return EXTRA_PREFIX + name
    if layout == "eagle3":
        if name == "fc.bias":
            return EXTRA_PREFIX + name
        return name  # fc.weight, layers.0.*
    if name.startswith("fc."):
        return "fusion_fc." + name[len("fc."):]
    if name.startswith("layers.0."):
        return "transformer." + name[len("layers.0."):]
    raise ValueError(f"no speculators name for drafter weight {name!r}")


def _import_name(key: str, layout: str) -> str | None:
    """Exported key -> our state-dict key; ``None`` for keys that are not drafter weights (base weights, vocab maps)."""
    if key.startswith(EXTRA_PREFIX):
        name = key[len(EXTRA_PREFIX):]
        return None if name in ("draft_order", "d2t") else name
    if key in ("lm_head.weight", "embed_tokens.weight", "d2t", "t2d"):
        return None
    if layout == "eagle3":
        if key == "fc.weight" or key.startswith("layers.0."):
            return key
    else:
        if key.startswith("fusion_fc."):
            return "fc." + key[len("fusion_fc."):]
        if key.startswith("transformer."):
            return "layers.0." + key[len("transformer."):]
    raise ValueError(f"unexpected weight {key!r} in a {layout!r} export of EagleDrafterModel")


# ---------------------------------------------------------------------------------------------------- config
def _layer_config_dict(config: EagleDrafterConfig) -> dict:
    lc = config.llama_config()
    d = lc.to_diff_dict()
    d.pop("transformers_version", None)
    d["model_type"] = "llama"
    d["architectures"] = ["LlamaForCausalLM"]
    theta = (d.get("rope_parameters") or {}).get("rope_theta")
    if theta is not None:
        d["rope_theta"] = theta
    return d


def _proposal(speculative_tokens: int) -> dict:
    return {"proposal_type": "greedy", "speculative_tokens": int(speculative_tokens), "verifier_accept_k": 1,
            "accept_tolerance": 0.0}


def export_speculators(drafter: EagleDrafterModel, out_dir: str | os.PathLike, verifier_name_or_path: str | None = None,
                       verifier_architectures: list[str] | None = None, speculative_tokens: int | None = None,
                       include_base_weights: bool = True, speculators_model_type: str = "eagle",
                       speculators_version: str = SPECULATORS_FORMAT_VERSION) -> str:
    """Write ``drafter`` to ``out_dir`` as a speculators checkpoint (``config.json`` + ``model.safetensors``).

    The mapping of every field and weight, and what a speculators/vLLM runtime does with it, is in the module
    docstring.

    Args:
        drafter: the EAGLE/FSPAD drafter (attached to its base model to include base weights).
        out_dir: output folder (created).
        verifier_name_or_path: ``speculators_config.verifier.name_or_path``; default
            ``config.base_model_name_or_path`` (``None`` is written if neither is set: vLLM then needs the verifier
            on its command line).
        verifier_architectures: ``speculators_config.verifier.architectures`` (e.g. ``["LlamaForCausalLM"]``, the
            verifier's ``config.architectures``); default ``[]`` (the attached drafter keeps only the base model's
            embedding and lm_head, not its config).
        speculative_tokens: the greedy proposal's ``speculative_tokens``; default ``config.num_draft_tokens``.
        include_base_weights: ``"eagle3"`` only: write ``lm_head.weight`` (the base lm_head rows of the draft
            vocabulary) and ``embed_tokens.weight`` (the base embeddings); needs an attached drafter.
        speculators_model_type: ``"eagle"`` (default: speculators' EAGLE-1/HASS type, the drafter's architecture:
            one feature layer fused with the token embedding) or ``"eagle3"`` (EAGLE-3 family storage layout, only
            when requested explicitly; not a runnable EAGLE-3 drafter, a warning is logged; see the module
            docstring).
        speculators_version: value of ``speculators_version``.

    Returns:
        ``out_dir`` as a string.
    """
    if not isinstance(drafter, EagleDrafterModel):
        raise ValueError(f"export_speculators expects an EagleDrafterModel, got {type(drafter).__name__}")
    if speculators_model_type not in _TYPES:
        raise ValueError(f"speculators_model_type must be one of {_TYPES}, got {speculators_model_type!r}")
    config = drafter.config
    n_tokens = config.num_draft_tokens if speculative_tokens is None else speculative_tokens
    if int(n_tokens) < 1:
        raise ValueError(f"speculative_tokens must be >= 1, got {n_tokens}")
    base = drafter._base if drafter.attached else {}
    if verifier_name_or_path is None:
        verifier_name_or_path = config.base_model_name_or_path
    if verifier_architectures is None:
        verifier_architectures = []
    layout = speculators_model_type
    if layout == "eagle3":
        logger.warning("export_speculators: 'eagle3' is EAGLE-3's storage layout only; this drafter reads one "
                       "feature layer (EAGLE-1 architecture) and is not a runnable EAGLE-3 drafter (vLLM's "
                       "Eagle3LlamaForCausalLM should refuse its fc shape); use the default 'eagle' type")
    h, vocab = config.hidden_size, config.vocab_size
    d2t = drafter.d2t.detach().cpu()
    n_draft = int(d2t.numel())

    # ---- weights
    tensors: dict[str, torch.Tensor] = {}
    for name, tensor in drafter.state_dict().items():
        if name == "d2t":
            continue
        tensors[_export_name(name, layout)] = tensor.detach().cpu().contiguous().clone()
    sorted_ids, order = torch.sort(d2t)  # EAGLE-3 convention: draft vocabulary in ascending target id
    if layout == "eagle3":
        position = torch.empty_like(order)
        position[order] = torch.arange(n_draft)  # our draft index j sits at exported row position[j]
        tensors[EXTRA_PREFIX + "draft_order"] = position
        if n_draft < vocab:
            tensors["d2t"] = sorted_ids - torch.arange(n_draft)
            t2d = torch.zeros(vocab, dtype=torch.bool)
            t2d[sorted_ids] = True
            tensors["t2d"] = t2d
        if include_base_weights:
            if not base:
                logger.warning("export_speculators: the drafter is not attached, lm_head.weight and "
                               "embed_tokens.weight are not written (a runtime takes them from the verifier)")
            else:
                head = base["lm_head"].weight.detach().cpu()
                tensors["lm_head.weight"] = head[sorted_ids].contiguous().clone()
                tensors["embed_tokens.weight"] = base["embedding"].weight.detach().cpu().contiguous().clone()
    else:
        tensors[EXTRA_PREFIX + "d2t"] = d2t.clone()

    # ---- config
    drafter_config = json.loads(config.to_json_string(use_diff=True))
    extra_keys = {k: _EXTRA_DOCS.get(k[len(EXTRA_PREFIX):], "") for k in tensors if k.startswith(EXTRA_PREFIX)}
    spec = {
        "architectures": list(_ARCHITECTURES[layout]),
        "speculators_model_type": layout,
        "speculators_version": speculators_version,
        "transformer_layer_config": _layer_config_dict(config),
        "speculators_config": {
            "algorithm": layout,
            "proposal_methods": [_proposal(n_tokens)],
            "default_proposal_method": "greedy",
            "verifier": {"name_or_path": verifier_name_or_path, "architectures": list(verifier_architectures)},
        },
        "tie_word_embeddings": False,
        "dtype": str(drafter.dtype).removeprefix("torch."),
    }
    if layout == "eagle3":
        spec.update(draft_vocab_size=n_draft, norm_before_residual=False, target_hidden_size=h,
                    eagle_aux_hidden_state_layer_ids=None)
    else:
        spec.update(transformer_layer_architecture="LlamaDecoderLayer", layernorms=False, fusion_bias=True)
    spec["hf_decoding_ext"] = {
        "format": 1,
        "drafter_class": "EagleDrafterModel",
        "drafter_config": drafter_config,
        "architecture": {
            "feature": "the verifier's last hidden state after its final norm (the lm_head input), one layer",
            "fc": f"Linear({2 * h} -> {h}, bias) over concat(embedding(x_(p+1)), feature f_p)",
            "decoder": "LlamaDecoderLayer with input_layernorm on the fused vector; no final norm",
            "feature_sampling": bool(config.feature_sampling),
            "partial_alignment": bool(config.partial_alignment),
            "runnable_as": "none: see hf_decoding_ext.speculative.heads.speculators_export",
        },
        "extra_weights": extra_keys,
    }
    os.makedirs(out_dir, exist_ok=True)
    with open(os.path.join(out_dir, "config.json"), "w") as f:
        json.dump(spec, f, indent=2, sort_keys=True)
    save_file(tensors, os.path.join(out_dir, "model.safetensors"), metadata={"format": "pt"})
    return str(out_dir)


# ---------------------------------------------------------------------------------------------------- load
def _read_config(out_dir) -> dict:
    path = os.path.join(out_dir, "config.json")
    if not os.path.isfile(path):
        raise ValueError(f"{out_dir} has no config.json")
    with open(path) as f:
        return json.load(f)


def load_speculators(out_dir: str | os.PathLike) -> EagleDrafterModel:
    """Read a folder written by :func:`export_speculators` back into an (unattached) :class:`EagleDrafterModel`.

    The inverse of the export's mapping: weights under their speculators names return to ours, the draft vocabulary
    returns to our order (from ``d2t``/``t2d`` and ``hf_decoding_ext.draft_order``, or ``hf_decoding_ext.d2t``),
    base weights (``lm_head``, ``embed_tokens``) are skipped (attach the base model). ``num_draft_tokens`` and
    ``base_model_name_or_path`` come from the speculators fields (``speculative_tokens``, ``verifier.name_or_path``);
    the mapped geometry (hidden size, vocabularies, decoder layer) is checked against them; every other setting
    comes from the ``hf_decoding_ext`` block. Raises ``ValueError`` for folders this module did not write (a
    genuine EAGLE-3 drafter fuses three layers and has no equivalent here) or inconsistent ones.
    """
    spec = _read_config(out_dir)
    layout = spec.get("speculators_model_type")
    if layout not in _TYPES:
        raise ValueError(f"speculators_model_type must be one of {_TYPES}, got {layout!r}")
    ours = spec.get("hf_decoding_ext")
    if not isinstance(ours, dict) or ours.get("drafter_class") != "EagleDrafterModel":
        raise ValueError(f"{out_dir} was not written by export_speculators (no hf_decoding_ext block): a native "
                         f"{layout} speculator has no EagleDrafterModel equivalent")
    try:
        sc = spec["speculators_config"]
        methods = {m["proposal_type"]: m for m in sc["proposal_methods"]}
        n_tokens = int(methods[sc["default_proposal_method"]]["speculative_tokens"])
        verifier = sc["verifier"]["name_or_path"]
        layer = spec["transformer_layer_config"]
    except (KeyError, TypeError) as e:
        raise ValueError(f"invalid speculators config in {out_dir}: {e!r}") from e

    config = EagleDrafterConfig.from_dict(dict(ours["drafter_config"]))
    config.num_draft_tokens = n_tokens
    config.base_model_name_or_path = verifier
    expected = _layer_config_dict(config)
    for key in ("hidden_size", "vocab_size", "num_hidden_layers", *_LAYER_KEYS, "rope_theta"):
        if layer.get(key) != expected.get(key):
            raise ValueError(f"transformer_layer_config[{key!r}] = {layer.get(key)!r} does not match the drafter "
                             f"config ({expected.get(key)!r})")

    tensors = load_file(os.path.join(out_dir, "model.safetensors"))
    n_draft = config.draft_vocab_size or config.vocab_size
    if layout == "eagle3":
        if spec.get("draft_vocab_size") != n_draft:
            raise ValueError(f"draft_vocab_size {spec.get('draft_vocab_size')} does not match the drafter's {n_draft}")
        if "d2t" in tensors:
            offsets, t2d = tensors["d2t"], tensors["t2d"]
            sorted_ids = torch.arange(offsets.numel()) + offsets.long()
            if t2d.numel() != config.vocab_size or not torch.equal(t2d.nonzero().reshape(-1), sorted_ids):
                raise ValueError("d2t and t2d disagree on the draft vocabulary")
        else:
            sorted_ids = torch.arange(config.vocab_size)
        d2t = sorted_ids[tensors[EXTRA_PREFIX + "draft_order"].long()]
    else:
        d2t = tensors[EXTRA_PREFIX + "d2t"].long()
    if d2t.numel() != n_draft:
        raise ValueError(f"the stored draft vocabulary has {d2t.numel()} ids, the config says {n_draft}")

    state = {"d2t": d2t}
    for key, tensor in tensors.items():
        name = _import_name(key, layout)
        if name is not None:
            state[name] = tensor
    drafter = EagleDrafterModel(config)
    drafter.to(state["fc.weight"].dtype)
    drafter.load_state_dict(state, strict=True)
    return drafter
