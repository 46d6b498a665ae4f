"""S2D: Sorted Speculative Decoding (Kavehzadeh, Pourreza, Valipour, Zhu, Bai, Ghodsi, Chen, Rezagholizadeh, "S2D:
Sorted Speculative Decoding For More Efficient Deployment of Nested Large Language Models", arXiv 2407.01955; no
official code).

One draft model holds several nested drafters: sub-model ``l`` is the draft's first ``l`` decoder layers followed by
the shared final norm and LM head. **Sorted fine-tuning** (SoFT) trains all of them at once (the loss is the mean over
the sub-models of their next-token cross-entropy), so that each is a usable drafter; at draft time an **adaptive,
confidence-based exit** picks, for every drafted token, the shallowest sub-model whose confidence (its top
probability) reaches a threshold. The same sorted draft serves several targets sharing the tokenizer (multi-target
deployment); verification by the target keeps decoding lossless.

On this library's terms (the only pretrained weights offline are SmolLM2-135M's, 30 layers):

* the sorted draft is the default model's first ``max(depths)`` layers (copied) with its final norm, and its
  embeddings and LM head (shared); :data:`DEFAULT_DEPTHS` ``(6, 9, 12)``;
* SoFT is a fine-tune of the default model itself through the shared entry point
  (``hf-decoding-ext finetune --objective s2d``, :func:`soft_loss` / :func:`s2d_batches`, registered at import in
  ``OBJECTIVES["s2d"]``), LoRA (rank 16 on the attention and MLP projections) so that only an adapter ships: the
  loss runs the first ``max(depths)`` layers only, so the adapters of the layers above receive no gradient and stay
  zero (:func:`export_sorted_adapter` drops them); the self-distillation data are the default model's own greedy
  responses, so the labels are the target's greedy tokens;
* :func:`load_s2d_draft` builds the sorted draft from the original model and the adapter;
  :class:`S2DDrafter` is a candidate generator on :mod:`hf_decoding_ext.speculative.engine` (the library's one
  verification loop): greedy exact match or the engine's exact speculative sampling rule, so the output is the
  target's, whichever target it is (the default model or a fine-tuned variant sharing the tokenizer).
"""

from __future__ import annotations

import itertools
import json
import math
import os
import re
from pathlib import Path

import torch
import torch.nn.functional as F

from hf_decoding_ext.core import lifecycle
from hf_decoding_ext.core.tree import DraftTree
from hf_decoding_ext.speculative.drafters.base import Draft, Drafter, pick_draft_token

DEFAULT_DEPTHS = (6, 9, 12)
"""Sub-model depths of the sorted draft: the paper's 12-layer draft has sub-models at 6, 9 and 12 layers ("SoFT
6,9,12", in the authors' public review responses); kept as absolute numbers on the 30-layer default model."""
DEFAULT_THRESHOLD = 0.8
"""Confidence (top probability) a sub-model needs to emit the token (the paper's value not read; our choice)."""
DEFAULT_NUM_TOKENS = 5
"""Draft tokens per step (the paper's value not read; our choice)."""

CITATION = ("Parsa Kavehzadeh, Mohammadreza Pourreza, Mojtaba Valipour, Tianshu Zhu, Haoli Bai, Ali Ghodsi, Boxing "
            "Chen, Mehdi Rezagholizadeh. S2D: Sorted Speculative Decoding For More Efficient Deployment of Nested "
            "Large Language Models. arXiv:2407.01955, 2024.")

PAPER_FIDELITY = (
    ("Source", ("the paper's full text was not readable offline: the design follows its abstract and the authors' "
     "public review responses (a 12-layer 'SoFT Draft' with sub-models at 6, 9 and 12 layers, 'SoFT 6,9,12', one "
     "draft for Vicuna-7B/13B and LLaMA-2-Chat-70B, confidence-based draft selection). Values not read are marked "
     "'our choice' below.")),
    ("Draft model", ("the paper's draft is a separate 12-layer model; here it is the default model's first 12 of 30 "
     "layers (copied) with its final norm, sharing its embeddings and LM head (the only pretrained weights "
     "offline), sub-models at 6, 9 and 12 layers (the paper's absolute depths). Draft pre-training and feature "
     "alignment (ablated in the paper) are not done.")),
    ("SoFT", ("the mean over the sub-models of the next-token cross-entropy on the labels (Sorted fine-tuning; mean "
     "or sum not read: our choice, equal up to the learning rate); the data are the default model's own greedy "
     "responses (self-distillation), not the paper's instruction data. LoRA (the shipped draft: rank 32, alpha "
     "64, on the attention and MLP projections; only the draft's 12 layers get gradients) instead of a full "
     "fine-tune, so the draft ships as a 7.8 MB adapter (a full fine-tune of 12 layers would ship 42 M "
     "parameters); the final norm and the shared head stay frozen. Small budget: 150 steps x 8 sequences (lr 2e-3, "
     "22 minutes on 2 CPU cores); the sub-models' cross-entropy ends near 4.7 (from 16-23 untrained), so the draft "
     "is weak (acceptance a few percent, results/s2d_eval.json).")),
    ("Adaptive exit", ("per drafted token the sub-models are tried shallowest first and the first whose top "
     "probability (of its raw logits) reaches `threshold` emits the token; the deepest emits when none does. "
     "Threshold 0.8 and draft length 5 are our choices (not read; the eval sweeps the threshold).")),
    ("KV of early exits", ("a token that exits at depth l has no keys/values in the layers above l yet; they are "
     "computed lazily, exactly, in the same forward as the next token that goes deeper (its hidden state at depth "
     "l is kept), so every sub-model sees the full-depth context of the draft. How the paper fills these entries "
     "was not read.")),
    ("Multi-target", ("the paper serves Vicuna-7B/13B and LLaMA-2-Chat-70B with one draft; here the second target is "
     "a fine-tuned 135M variant sharing the tokenizer (e.g. the SPACE model; a target vocabulary extended by added "
     "tokens is accepted: the draft never proposes them).")),
    ("Tree attention", ("the paper's tree-attention variant is not implemented: chain drafts (the engine verifies "
     "a chain).")),
)

ADAPTER_FILE = "adapter.safetensors"
_LAYER_RE = re.compile(r"(?:^|\.)(?:layers|h|blocks)\.(\d+)\.")


def _check_depths(depths) -> tuple[int, ...]:
    try:
        items = tuple(depths)
    except TypeError:
        raise ValueError(f"depths must be a sequence of increasing positive layer counts, got {depths!r}") from None
    if not items or any(isinstance(d, bool) or not isinstance(d, int) or d < 1 for d in items) \
            or any(b <= a for a, b in itertools.pairwise(items)):
        raise ValueError(f"depths must be a non-empty, strictly increasing sequence of positive ints, got {depths!r}")
    return items


# ------------------------------------------------------------------------------------------------------ SoFT
def soft_exit_logits(model, input_ids, attention_mask=None, depths=DEFAULT_DEPTHS, positions=None):
    """The sub-models' logits: ``{l: (n, vocab) float32}`` for each depth ``l`` in ``depths``, at the ``positions``
    (a boolean ``(batch, seq)`` mask; ``None``: every position, flattened). One forward through the first
    ``max(depths)`` layers of ``model`` (a view, no copy, gradients flow), then ``lm_head(final_norm(h_l))`` per
    depth on the selected rows only."""
    from hf_decoding_ext.core.anatomy import (
        decoder_layers,
        early_exit,
        exit_logits,
        num_layers,
    )

    depths = _check_depths(depths)
    total = num_layers(model)
    if depths[-1] > total:
        raise ValueError(f"depths {depths} exceed the model's {total} layers")
    layers = decoder_layers(model)
    captured: dict[int, torch.Tensor] = {}
    handles = []
    for d in depths:
        def hook(module, args, output, d=d):
            captured[d] = output[0] if isinstance(output, tuple) else output
        handles.append(layers[d - 1].register_forward_hook(hook))
    try:
        early_exit(model, depths[-1])(input_ids=input_ids, attention_mask=attention_mask, use_cache=False,
                                      logits_to_keep=1)
    finally:
        for h in handles:
            h.remove()
    out = {}
    for d in depths:
        h = captured[d]
        h = h[positions] if positions is not None else h.reshape(-1, h.shape[-1])
        out[d] = exit_logits(h, model)
    return out


def soft_loss(model, batch, depths=None):
    """SoFT objective (``OBJECTIVES["s2d"]``): the mean over the sub-models (first ``l`` layers + final norm + LM head,
    ``l`` in ``depths``; default ``batch["s2d_depths"]``, else :data:`DEFAULT_DEPTHS`) of the shifted next-token
    cross-entropy on ``batch["labels"]`` (-100 ignored). Metrics: ``tokens`` and ``loss_l{l}`` per sub-model."""
    if depths is None:
        depths = tuple(int(d) for d in batch["s2d_depths"].tolist()) if "s2d_depths" in batch else DEFAULT_DEPTHS
    depths = _check_depths(depths)
    labels = batch["labels"][:, 1:]
    keep = labels != -100
    n = int(keep.sum())
    if n == 0:
        raise ValueError("the batch has no supervised positions (labels are all -100)")
    positions = torch.cat([keep, torch.zeros_like(keep[:, :1])], dim=1)  # the input position predicting each label
    logits = soft_exit_logits(model, batch["input_ids"], batch.get("attention_mask"), depths, positions)
    target = labels[keep]
    losses = {d: F.cross_entropy(lg, target) for d, lg in logits.items()}
    loss = torch.stack(list(losses.values())).mean()
    metrics = {"tokens": n, **{f"loss_l{d}": float(v.detach()) for d, v in losses.items()}}
    return loss, metrics


def s2d_batches(data, config, tokenizer, *, depths=DEFAULT_DEPTHS):
    """Batch builder of ``OBJECTIVES["s2d"]``: ``seed -> endless iterator`` of next-token batches over ``data`` (a
    ``DistillData`` (its train split) or sequences with ``input_ids``/``response_start``: the target's greedy
    responses), each carrying ``s2d_depths`` (the sub-model depths :func:`soft_loss` trains)."""
    from hf_decoding_ext.training.finetune import sequence_batches

    depths = _check_depths(depths)
    seqs = list(data.train if hasattr(data, "train") and hasattr(data, "heldout") else data)
    if not seqs:
        raise ValueError("no training sequences")
    pad = getattr(tokenizer, "pad_token_id", None)
    pad = 0 if pad is None else int(pad)

    def stream(seed: int):
        for batch in sequence_batches(seqs, config.batch_size, seed=seed, pad_id=pad, max_length=config.max_length,
                                      train_on_prompt=config.train_on_prompt):
            batch["s2d_depths"] = torch.tensor(depths)
            yield batch

    return stream


def _register() -> None:
    from hf_decoding_ext.training import finetune as ft

    ft.OBJECTIVES.setdefault("s2d", (soft_loss, s2d_batches))


_register()


# ------------------------------------------------------------------------------------------------------ the draft
def _adapter_file(path) -> Path:
    path = Path(path)
    return path / ADAPTER_FILE if path.is_dir() else path


def _read_adapter(path):
    from safetensors import safe_open
    from safetensors.torch import load_file

    file = _adapter_file(path)
    if not file.exists():
        raise ValueError(f"no S2D adapter at {path} (expected {ADAPTER_FILE}, as written by `hf-decoding-ext "
                         "finetune --objective s2d --mode lora`)")
    with safe_open(str(file), "pt") as f:
        cfg = json.loads((f.metadata() or {}).get("lora_config", "{}"))
    if not cfg.get("rank"):
        raise ValueError(f"{file} is not a LoRA adapter of hf_decoding_ext.training.finetune (no lora_config)")
    return cfg, load_file(str(file))


def export_sorted_adapter(src, dst, depths=DEFAULT_DEPTHS) -> Path:
    """Write the SoFT adapter at ``src`` (a fine-tune output folder) to ``dst`` keeping only the layers below
    ``max(depths)`` (the others received no gradient and are zero: ``ValueError`` otherwise) and recording
    ``s2d_depths`` (read by :func:`load_s2d_draft`). Same format as ``save_lora`` (``adapter.safetensors`` with its
    config in the metadata, ``adapter_config.json``)."""
    from safetensors.torch import save_file

    depths = _check_depths(depths)
    cfg, tensors = _read_adapter(src)
    kept = {}
    for name, t in tensors.items():
        m = _LAYER_RE.search(name)
        if m and int(m.group(1)) >= depths[-1]:
            if name.endswith(".lora_B") and bool(t.ne(0).any()):
                raise ValueError(f"{name} is non-zero although its layer is above depth {depths[-1]}: not an S2D "
                                 "adapter for these depths")
            continue
        kept[name] = t
    cfg = {**cfg, "s2d_depths": list(depths), "method": "s2d", "arxiv": "2407.01955"}
    dst = Path(dst)
    dst.mkdir(parents=True, exist_ok=True)
    save_file(kept, str(dst / ADAPTER_FILE), metadata={"lora_config": json.dumps(cfg)})
    (dst / "adapter_config.json").write_text(json.dumps(cfg, indent=1))
    return dst


def build_sorted_draft(base, depths=DEFAULT_DEPTHS, adapter=None):
    """The sorted draft of ``base`` (the *original* model the SoFT adapter was trained on): a causal LM of
    ``base``'s class made of copies of its first ``max(depths)`` decoder layers and of its final norm, and of its
    embeddings and LM head (shared with ``base``, not copied), with the LoRA ``adapter`` (a folder or file written
    by the ``s2d`` fine-tune or :func:`export_sorted_adapter`; ``None``: untrained, i.e. plain truncations) folded
    into the copied layers. ``base`` is not modified. ``draft.config.s2d`` records the depths and the adapter."""
    from hf_decoding_ext.core.anatomy import decoder_layers, num_layers
    from hf_decoding_ext.speculative.drafters.direct_alignment import init_draft

    depths = _check_depths(depths)
    total = num_layers(base)
    if depths[-1] > total:
        raise ValueError(f"depths {depths} exceed the base model's {total} layers")
    if depths[-1] < total:
        draft = init_draft(base, depths[-1])
    else:  # the whole model is the deepest sub-model: a full copy (embeddings and head included)
        import copy

        draft = copy.deepcopy(base)
    info = {"depths": list(depths), "adapter": None}
    if adapter is not None:
        cfg, tensors = _read_adapter(adapter)
        scaling = float(cfg["alpha"]) / int(cfg["rank"])
        if any(n.endswith(".new_rows") for n in tensors):
            raise ValueError("the adapter trains new token rows: not an S2D (SoFT) adapter")
        layers = decoder_layers(draft)
        prefix = next(name for name, module in draft.named_modules() if module is layers) + "."
        applied = 0
        with torch.no_grad():
            for name, a in tensors.items():
                if not name.endswith(".lora_A"):
                    continue
                module_name = name[: -len(".lora_A")]
                b = tensors[module_name + ".lora_B"]
                m = _LAYER_RE.search(name)
                if m is None:
                    raise ValueError(f"adapter entry {name} is outside the decoder layers")
                layer = int(m.group(1))
                if layer >= depths[-1]:
                    if bool(b.ne(0).any()):
                        raise ValueError(f"the adapter changes layer {layer}, above the draft's {depths[-1]} layers")
                    continue
                rest = module_name[m.end():]
                target = draft.get_submodule(f"{prefix}{layer}.{rest}")
                delta = (b.float() @ a.float()) * scaling
                w = target.weight
                w += (delta.T if type(target).__name__ == "Conv1D" else delta).to(device=w.device, dtype=w.dtype)
                applied += 1
        if applied == 0:
            raise ValueError(f"the adapter at {adapter} changes none of the draft's layers")
        info["adapter"] = str(adapter)
    for p in draft.parameters():
        p.requires_grad_(False)
    draft.config.s2d = info
    return draft.eval()


def shipped_s2d_path() -> Path:
    """Where the library ships its SoFT adapter (``hf_decoding_ext/data/finetuned/s2d``)."""
    return Path(__file__).resolve().parents[1] / "data" / "finetuned" / "s2d"


def load_s2d_draft(base=None, path: str | os.PathLike | None = None, depths=None):
    """The shipped sorted draft (or the adapter at ``path``) on ``base`` (the original default model; ``None``: loaded
    with :func:`~hf_decoding_ext.core.models.load_model`). To serve a fine-tuned variant of the default model, pass
    the *original* model as ``base`` (the draft's layers come from it), not the variant. ``depths``: default the
    adapter's recorded ``s2d_depths``, else :data:`DEFAULT_DEPTHS`."""
    path = Path(path) if path is not None else shipped_s2d_path()
    if not _adapter_file(path).exists():
        raise ValueError(f"no S2D adapter at {path}: train one with `python -m hf_decoding_ext finetune --objective "
                         "s2d --mode lora ...` (see the S2DDrafter docstring), or use draft='self'")
    if base is None:
        from hf_decoding_ext.core.models import load_model

        base, _ = load_model()
    if depths is None:
        cfg, _ = _read_adapter(path)
        depths = tuple(cfg.get("s2d_depths") or DEFAULT_DEPTHS)
    return build_sorted_draft(base, depths, path)


# ------------------------------------------------------------------------------------------------------ the drafter
class S2DDrafter(Drafter):
    r"""Sorted speculative decoding (Kavehzadeh et al., "S2D: Sorted Speculative Decoding For More Efficient
    Deployment of Nested Large Language Models", arXiv 2407.01955): chain drafts from the nested sub-models of one
    sorted draft, with an adaptive, confidence-based exit per drafted token.

    For each draft token the draft runs its layers segment by segment (``[0, depths[0])``, ``[depths[0],
    depths[1])``, ...); after segment ``i`` the sub-model of depth ``depths[i]`` (those layers + the final norm + the
    LM head) gives the next-token distribution, and the token is emitted there when its top probability (raw
    logits) is at least ``threshold``; the deepest sub-model always emits. The draft keeps its own KV cache (its
    weights differ from any target's); the layers a token skipped get its keys and values lazily, exactly, in the
    forward of the next token that goes deeper, so each sub-model always sees the full-depth context. The target
    verifies the chain in one forward on :class:`~hf_decoding_ext.speculative.engine.SpeculativeDecoding`: greedy
    exact match, or with ``do_sample=True`` the engine's exact speculative-sampling rule (the token is drawn from the
    chosen sub-model's distribution after the caller's processors, and the choice of sub-model depends on the prefix
    only, so that distribution is the proposal), hence lossless whatever the target.

    Args:
        draft: the sorted draft: a causal LM whose first ``max(depths)`` layers are the nested sub-models (e.g.
            :func:`load_s2d_draft`, :func:`build_sorted_draft`, or a model fine-tuned with :func:`soft_loss`);
            ``"self"`` / ``None``: the target's own first layers, untrained (the ``self:l`` truncations);
            ``"shipped"`` or a path: :func:`load_s2d_draft` on the target (only when the target is the original
            default model; for another target build the draft from the original and pass it).
        depths: sub-model depths, strictly increasing (default: the draft's ``config.s2d["depths"]``, else
            :data:`DEFAULT_DEPTHS`); one depth is a fixed-depth drafter.
        threshold: confidence an exit needs (>= 0; 0: always the shallowest; above 1: always the deepest).
        num_tokens: draft tokens per step (>= 1).

    The target's vocabulary must equal the draft's or extend it (a fine-tuned variant with added tokens: the draft
    never proposes them). Per-call statistics in ``self.last_stats``: ``depth_counts`` (tokens emitted per
    sub-model), ``drafted``, ``layer_runs`` (decoder-layer applications summed over the draft's forwards, one forward
    may carry several rows), ``exits`` (sub-model heads evaluated) and ``rows``. Batch size 1 (the engine's).
    Deviations: :data:`PAPER_FIDELITY`.

    Any architecture of :mod:`hf_decoding_ext.core.anatomy` (Llama-style, Qwen2, GPT-2, ...): a segment's first
    layer gets the kept hidden states through a forward pre-hook, so no embedding-side transform (GPT-2's position
    embeddings) is applied twice; the engine refuses sliding-window models.

    The sorted draft of the default model is a SoFT LoRA fine-tune of it (then :func:`export_sorted_adapter` keeps
    the 12 trained layers, 7.8 MB in bfloat16); the shipped one was made with::

        python -m hf_decoding_ext finetune --objective s2d --mode lora --lora-rank 32 --lora-alpha 64 \
            --prompts 100 --steps 150 --batch-size 8 --max-length 512 --lr 2e-3 --warmup 10 --checkpoint-every 25 \
            --save-dtype bfloat16 --agreement-prompts 0 --work-dir /work/distill/work \
            --out /work/distill/finetune/s2d --log /work/notes/helpers/s2d.progress

    Example:
        >>> from hf_decoding_ext.speculative import SpeculativeDecoding
        >>> from hf_decoding_ext.speculative.s2d import S2DDrafter, load_s2d_draft
        >>> draft = load_s2d_draft(model)  # doctest: +SKIP
        >>> loop = SpeculativeDecoding(S2DDrafter(draft, threshold=0.8))  # doctest: +SKIP
        >>> out = model.generate(**inputs, max_new_tokens=64, do_sample=False, custom_generate=loop)  # doctest: +SKIP
        >>> out2 = variant.generate(**inputs, max_new_tokens=64, custom_generate=loop)  # same draft  # doctest: +SKIP
    """

    def __init__(self, draft=None, depths=None, threshold: float = DEFAULT_THRESHOLD,
                 num_tokens: int = DEFAULT_NUM_TOKENS):
        if draft is not None and not isinstance(draft, (str, os.PathLike, torch.nn.Module)):
            raise ValueError(f"draft must be a causal LM, 'self', 'shipped', a path or None, got {draft!r}")
        if isinstance(draft, str) and not draft:
            raise ValueError("draft must not be an empty string")
        self.depths = None if depths is None else _check_depths(depths)
        if isinstance(threshold, bool) or not isinstance(threshold, (int, float)) or math.isnan(threshold) \
                or threshold < 0:
            raise ValueError(f"threshold must be a number >= 0, got {threshold!r}")
        if isinstance(num_tokens, bool) or not isinstance(num_tokens, int) or num_tokens < 1:
            raise ValueError(f"num_tokens must be an int >= 1, got {num_tokens!r}")
        self.draft_arg = draft
        self.threshold = float(threshold)
        self.num_tokens = num_tokens
        self.draft = None if (draft is None or isinstance(draft, (str, os.PathLike))) else draft
        self.last_stats: dict = {}
        self._views: dict = {}
        self._target = None

    @classmethod
    def for_model(cls, model=None, tokenizer=None, draft="shipped", depths=None, threshold: float = DEFAULT_THRESHOLD,
                  num_tokens: int = DEFAULT_NUM_TOKENS) -> S2DDrafter:
        """Registry/CLI factory: ``draft="shipped"`` loads the shipped SoFT adapter onto ``model`` (the default
        model), ``"self"`` uses ``model``'s own untrained layers, a path loads that adapter."""
        if isinstance(draft, (str, os.PathLike)) and str(draft) not in ("self",):
            draft = load_s2d_draft(model, None if str(draft) == "shipped" else draft)
        return cls(draft, depths=depths, threshold=threshold, num_tokens=num_tokens)

    def kernel_modules(self) -> list:
        """The draft model runs under the target's CPU kernel plan (nothing extra when it is the target)."""
        return [self.draft] if isinstance(self.draft, torch.nn.Module) and self.draft is not self._target else []

    # -------------------------------------------------------------------------------------------- set-up
    def _resolve(self, target):
        arg = self.draft_arg
        if arg is None or (isinstance(arg, str) and arg == "self"):
            return target
        if isinstance(arg, (str, os.PathLike)):
            if self.draft is None:
                self.draft = load_s2d_draft(target, None if str(arg) == "shipped" else arg)
            return self.draft
        return arg

    def begin(self, state) -> None:
        from transformers import DynamicCache

        from hf_decoding_ext.core.anatomy import decoder_layers, num_layers, skip_layers

        target = state.model
        self._target = target
        draft = self._resolve(target)
        self.draft = draft
        decoder_layers(draft)  # ValueError naming an unsupported architecture
        cfg_depths = (getattr(draft.config, "s2d", None) or {}).get("depths")
        depths = self.depths or (tuple(cfg_depths) if cfg_depths else DEFAULT_DEPTHS)
        if draft is target and self.depths is None and not cfg_depths:
            depths = tuple(d for d in DEFAULT_DEPTHS if d <= num_layers(draft)) or (num_layers(draft),)
        total = num_layers(draft)
        if depths[-1] > total:
            raise ValueError(f"depths {depths} exceed the draft's {total} layers")
        t_vocab = target.get_output_embeddings().weight.shape[0]
        d_vocab = draft.get_output_embeddings().weight.shape[0]
        if t_vocab < d_vocab:
            raise ValueError(f"the target's vocabulary ({t_vocab}) is smaller than the draft's ({d_vocab}): a sorted "
                             "draft serves targets sharing (or extending) its tokenizer")
        self._pad = t_vocab - d_vocab
        self._depths = depths
        bounds = (0,) + depths
        key = (id(draft), depths)
        if key not in self._views:
            self._views = {key: [skip_layers(draft, range(a, b), share_cache=True)
                                 for a, b in itertools.pairwise(bounds)]}
        self._segments = self._views[key]
        self._bounds = bounds
        self._cache = DynamicCache(config=draft.config)
        self._ids = state.input_ids.new_zeros((1, 0))
        self._len = [0] * len(depths)  # positions with keys/values in each segment
        self._pending: list[torch.Tensor | None] = [None] * len(depths)  # inputs of segment s at [len[s], len[s-1])
        self.last_stats = {"depth_counts": {d: 0 for d in depths}, "drafted": 0, "layer_runs": 0, "exits": 0,
                           "rows": 0, "depths": list(depths), "threshold": self.threshold}

    def _sync(self, ids: torch.Tensor) -> None:
        """Crop the draft's state to the longest prefix it shares with ``ids``."""
        from hf_decoding_ext.core.anatomy import crop_layers

        n = min(self._ids.shape[1], ids.shape[1] - 1)  # the last token is always fed again (its logits)
        same = (self._ids[0, :n] == ids[0, :n]).long()
        common = int(same.cumprod(0).sum()) if n > 0 else 0
        crop_layers(self._cache, common)
        old = list(self._len)
        self._len = [min(length, common) for length in old]
        for s in range(1, len(old)):  # pending[s]: inputs of segment s at positions [len[s], len[s - 1])
            if self._pending[s] is not None:
                self._pending[s] = self._pending[s][:, : max(0, min(old[s - 1], common) - self._len[s])]
        self._ids = ids[:, :common]

    def _segment(self, s: int, ids: torch.Tensor, mask: torch.Tensor, n: int):
        """Run segment ``s`` over positions ``[len[s], n)``; returns the raw float32 logits of sub-model ``s`` at
        position ``n - 1`` and the segment's output hidden states (``None`` for the last segment)."""
        from hf_decoding_ext.core.anatomy import OutputCapture, decoder_layers

        draft = self.draft
        layers = decoder_layers(draft)
        a, b = self._bounds[s], self._bounds[s + 1]
        start = self._len[s]
        device = draft.device
        rows = ids[:, start:n].to(device)
        pos = (mask.long().cumsum(-1) - 1).clamp(min=0)[:, start:n].to(device)
        handle = None
        if s > 0:
            hidden = self._pending[s]
            if hidden is None or hidden.shape[1] != n - start:
                raise RuntimeError("S2DDrafter: inconsistent pending hidden states")  # an internal invariant

            def feed(module, args, kwargs):
                if args:
                    return (hidden,) + tuple(args[1:]), kwargs
                return args, {**kwargs, "hidden_states": hidden}
            handle = layers[a].register_forward_pre_hook(feed, with_kwargs=True)
        cap = OutputCapture(layers[b - 1] if s + 1 < len(self._segments) else None)
        try:
            with cap:
                out = self._segments[s](input_ids=rows, attention_mask=mask[:, :n].to(device), position_ids=pos,
                                        cache=self._cache, use_cache=True, logits_to_keep=1)
        finally:
            if handle is not None:
                handle.remove()
        self._len[s] = n
        self._pending[s] = None  # consumed (segment 0 has none)
        st = self.last_stats
        st["layer_runs"] += b - a
        st["exits"] += 1
        st["rows"] += n - start
        return out.logits[0, -1].float(), cap.output

    def _push(self, s: int, out_hidden: torch.Tensor) -> None:
        """Append segment ``s``'s output rows to segment ``s + 1``'s pending inputs."""
        prev = self._pending[s + 1]
        self._pending[s + 1] = out_hidden if prev is None else torch.cat([prev, out_hidden], dim=1)

    def propose(self, state) -> Draft:
        ids, mask = state.input_ids, state.attention_mask
        self._sync(ids)
        room = state.generation_config.max_length - ids.shape[1] - 1
        processors = lifecycle.fork(state.logits_processor, caller=type(self).__name__)
        tokens, probs = [], []
        cur_ids, cur_mask = ids, mask
        nseg = len(self._segments)
        with torch.no_grad():
            for _ in range(max(0, min(self.num_tokens, room))):
                n = cur_ids.shape[1]
                logits = None
                for s in range(nseg):
                    logits, hidden = self._segment(s, cur_ids, cur_mask, n)
                    if hidden is not None:
                        self._push(s, hidden)
                    if s + 1 == nseg or float(torch.softmax(logits, -1).max()) >= self.threshold:
                        break
                self.last_stats["depth_counts"][self._depths[s]] += 1
                if self._pad:
                    logits = torch.cat([logits, logits.new_full((self._pad,), float("-inf"))])
                scores = processors(cur_ids, logits[None].to(cur_ids.device))
                tok, _ = pick_draft_token(scores, state.do_sample, probs)
                tokens.append(int(tok))
                cur_ids = torch.cat([cur_ids, tok[:, None].to(cur_ids.device)], dim=1)
                cur_mask = torch.cat([cur_mask, cur_mask.new_ones((1, 1))], dim=1)
        self._ids = cur_ids[:, : self._len[0]]  # the positions segment 0 holds
        self.last_stats["drafted"] += len(tokens)
        draft_probs = torch.stack(probs) if probs else None
        return Draft(DraftTree.chain(torch.tensor(tokens, dtype=torch.long), draft_probs,
                                     "deterministic" if draft_probs is None else "iid"))

    def reset(self) -> None:
        self._views = {}
