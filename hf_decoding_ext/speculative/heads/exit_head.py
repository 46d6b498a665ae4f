"""A trainable early-exit head: one extra decoder layer (plus a norm) after the first ``N`` layers of a frozen causal
LM, read out through the base model's LM head, trained by self-distillation.

The early-exiting structure of EESD (Liu, Wang, Wang, Cai, "Speculative Decoding via Early-exiting for Faster LLM
Inference with Thompson Sampling Control Mechanism", Findings of ACL 2024, arXiv 2406.03853): the draft is the first
``N`` layers of the LLM plus an "early-exiting layer" (a Transformer layer and an LM head) trained by distilling the
full model's outputs, the base model frozen. FREE (arXiv 2310.05424) uses the same kind of shallow exit.

The head owns only its extra decoder layer and its norm (``exit_layer``-th layer shape of the base model; 3.5 M
parameters for SmolLM2-135M). It borrows, without copying, the base model's rotary embedding and LM head (set
``own_lm_head=True`` to train a copy of the LM head as the paper does; the checkpoint then holds it too).

API (what a drafter or a decoding loop needs):

- ``ExitHeadConfig(exit_layer=N, ...)``; :meth:`ExitHeadConfig.for_model` fills the shapes from a base model;
- :meth:`ExitHead.from_base` builds a head for a base model, the extra layer initialised from one of its layers;
- ``head.attach(model)`` borrows the base rotary embedding and LM head (done by :meth:`from_base`; needed after
  ``from_pretrained``);
- ``head(hidden_states, position_ids=None, attention_mask=None, cache=None, use_cache=True, logits_to_keep=0)``
  maps the base model's layer-``N`` hidden states ``(batch, seq, hidden)`` (``output_hidden_states[N]``, the output
  of the first ``N`` layers, before any norm) to :class:`ExitHeadOutput` (``logits`` float32, ``cache`` the extra
  layer's KV cache: pass it back to continue; cut it back after a rejection with ``cache.crop(-k)`` or
  :func:`hf_decoding_ext.core.anatomy.crop_layers` ``(cache, length)``);
- ``save_pretrained(dir)`` (``config.json`` + ``model.safetensors``; the borrowed modules are not saved) and
  ``ExitHead.from_pretrained(dir).attach(model)`` (local folder, no network);
- :func:`distill_features`, :func:`train_exit_head`, :func:`distill_kl`: the self-distillation trainer (KL from the
  full model's next-token distribution to the head's), used by ``scripts/train_exit_head.py``.

Example:
    >>> from hf_decoding_ext.speculative.heads.exit_head import ExitHead
    >>> head = ExitHead.from_base(model, exit_layer=6)  # doctest: +SKIP
    >>> out = model(input_ids, output_hidden_states=True)  # doctest: +SKIP
    >>> head(out.hidden_states[6]).logits.shape  # (batch, seq, vocab)  # doctest: +SKIP
"""

from __future__ import annotations

import copy
import json
import math
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from transformers import DynamicCache, PretrainedConfig, PreTrainedModel

__all__ = ["ExitHead", "ExitHeadConfig", "ExitHeadOutput", "distill_features", "distill_kl", "plain_exit_kl", "shipped_exit_head_path",
           "train_exit_head", "SHIPPED_EXIT_HEAD"]

SHIPPED_EXIT_HEAD = "exit_head_smollm2_l6"
"""Folder (under ``hf_decoding_ext/data/heads/``) of the exit head shipped for SmolLM2-135M-Instruct (``N = 6``)."""


def shipped_exit_head_path(name: str = SHIPPED_EXIT_HEAD) -> Path:
    """Path of a shipped exit-head folder (``hf_decoding_ext/data/heads/<name>``)."""
    return Path(__file__).resolve().parents[2] / "data" / "heads" / name


class ExitHeadConfig(PretrainedConfig):
    """Configuration of :class:`ExitHead`.

    Args:
        exit_layer: ``N``, the number of base-model layers the head reads after (its input is
            ``output_hidden_states[N]``); ``1 <= N < num_hidden_layers``.
        base_config: the base model's config as a dict (``model.config.to_dict()``); the extra layer is a decoder
            layer of that architecture (Llama-style decoder layers: Llama, SmolLM, Qwen2, Mistral, ...).
        own_lm_head: keep and train a copy of the LM head (the paper's early-exiting layer has its own LM head);
            ``False`` (default): borrow the base model's frozen LM head (a checkpoint of ~3.5 M parameters).
        init_from_layer: the base layer the extra layer was initialised from (record only).
        base_model_name_or_path: the base model the head was trained for.
        training: free-form record of the training run (data, steps, losses), for the model card.
    """

    model_type = "hf_decoding_ext_exit_head"

    def __init__(self, exit_layer: int = 6, base_config: dict | None = None, own_lm_head: bool = False,
                 init_from_layer: int | None = None, base_model_name_or_path: str | None = None,
                 training: dict | None = None, **kwargs):
        super().__init__(**kwargs)
        if isinstance(exit_layer, bool) or not isinstance(exit_layer, int) or exit_layer < 1:
            raise ValueError(f"exit_layer must be an int >= 1, got {exit_layer!r}")
        if base_config is not None:
            total = int(base_config.get("num_hidden_layers", base_config.get("n_layer", 0)))  # GPT-2: n_layer
            if exit_layer >= total:
                raise ValueError(f"exit_layer must be below the base model's {total} layers, got {exit_layer!r}")
        self.exit_layer = exit_layer
        self.base_config = base_config
        self.own_lm_head = bool(own_lm_head)
        self.init_from_layer = init_from_layer
        self.base_model_name_or_path = base_model_name_or_path
        self.training = training or {}

    @classmethod
    def for_model(cls, model, exit_layer: int, **kwargs) -> ExitHeadConfig:
        """The config of a head after ``exit_layer`` layers of ``model``."""
        base = model.config.to_dict()
        base.pop("_name_or_path", None)
        name = getattr(model.config, "_name_or_path", None) or getattr(model, "name_or_path", None)
        return cls(exit_layer=exit_layer, base_config=base, base_model_name_or_path=name or None, **kwargs)

    def layer_config(self):
        """The base architecture's config with one hidden layer (the extra layer's ``layer_idx`` is 0)."""
        from transformers import AutoConfig

        if not self.base_config:
            raise ValueError("ExitHeadConfig.base_config is empty: build the config with ExitHeadConfig.for_model")
        cfg_dict = dict(self.base_config)
        model_type = cfg_dict.pop("model_type", None)
        if model_type is None:
            raise ValueError("ExitHeadConfig.base_config has no model_type")
        cfg = AutoConfig.for_model(model_type, **cfg_dict)
        layer_types = getattr(cfg, "layer_types", None)
        cfg.num_hidden_layers = 1
        if layer_types is not None:
            cfg.layer_types = [list(layer_types)[min(self.exit_layer, len(layer_types) - 1)]]
        return cfg


@dataclass
class ExitHeadOutput:
    """Output of :meth:`ExitHead.forward`: ``logits`` (float32, ``(batch, kept, vocab)``), ``cache`` (the extra
    layer's KV cache, or ``None`` without ``use_cache``) and ``hidden`` (the normed features the LM head read)."""

    logits: torch.Tensor
    cache: DynamicCache | None
    hidden: torch.Tensor


def _architecture(cfg):
    """``(decoder layer class, norm module)`` of ``cfg``'s architecture, from a weightless (meta) 1-layer model."""
    from transformers import AutoModelForCausalLM

    from hf_decoding_ext.core.anatomy import decoder_layers, final_norm

    with torch.device("meta"):
        shell = AutoModelForCausalLM.from_config(cfg)
    layer = decoder_layers(shell)[0]
    params = list(__import__("inspect").signature(type(layer).__init__).parameters)
    if params[1:3] != ["config", "layer_idx"] or "position_embeddings" not in str(
            __import__("inspect").signature(type(layer).forward)):
        raise ValueError(f"unsupported architecture {type(shell).__name__} for ExitHead: it supports Llama-style "
                         f"decoder layers (config, layer_idx; rotary position "
                         f"embeddings), not {type(layer).__name__}")
    return type(layer), final_norm(shell)


class ExitHead(PreTrainedModel):
    """EESD's early-exiting layer: an extra decoder layer and a norm after the first ``exit_layer`` layers of a frozen
    base model, read out through the base model's LM head (see the module docstring for the API).

    Args:
        config: an :class:`ExitHeadConfig` (``exit_layer`` = ``N``).

    Deviations from the paper (arXiv 2406.03853): (1) by default the LM head is the base model's, shared and frozen
    (``own_lm_head=False``), where the paper's early-exiting layer trains its own LM head; SmolLM2's tied LM head is
    28.3 M parameters (113 MB in fp32), eight times the extra layer, so a trained copy would not fit a small shipped
    checkpoint; the head's own norm (trained) absorbs part of the adaptation. ``own_lm_head=True`` trains a copy.
    (2) The extra layer is initialised from base layer ``init_from_layer`` (default ``exit_layer``, the layer the
    exit replaces); the paper's initialisation was not confirmed offline. (3) The head keeps its own KV cache for its
    one layer (``cache``), the first ``N`` layers' KV being the base model's (EESD's drafts share them, as the
    first ``N`` layers are the base model's own).

    Example:
        >>> head = ExitHead.from_base(model, exit_layer=6)  # doctest: +SKIP
        >>> out = head(hidden_n, position_ids=pos)  # hidden_n: (1, seq, hidden)  # doctest: +SKIP
        >>> out2 = head(hidden_next, cache=out.cache)  # continue with the extra layer's KV  # doctest: +SKIP
    """

    config_class = ExitHeadConfig
    base_model_prefix = "exit_head"
    main_input_name = "hidden_states"
    _no_split_modules: list[str] = []
    _keys_to_ignore_on_load_unexpected = None

    def __init__(self, config: ExitHeadConfig):
        super().__init__(config)
        cfg = config.layer_config()
        layer_cls, norm = _architecture(cfg)
        self.layer = layer_cls(cfg, 0)
        self.norm = copy.deepcopy(norm).to_empty(device="cpu")
        with torch.no_grad():
            if getattr(self.norm, "weight", None) is not None:
                self.norm.weight.fill_(1.0)
        self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False) if config.own_lm_head else None
        self.__dict__["_layer_config"] = cfg
        self.__dict__["_base"] = {}
        self.post_init()

    def _init_weights(self, module):  # weights come from the base model (from_base) or a checkpoint
        pass

    # ------------------------------------------------------------------------------------------------ base model
    @classmethod
    def from_base(cls, model, exit_layer: int, init_from_layer: int | None = None, own_lm_head: bool = False,
                  **kwargs) -> ExitHead:
        """A head after ``exit_layer`` layers of ``model``: the extra layer a copy of base layer ``init_from_layer``
        (default ``exit_layer``, the first layer the exit skips), the norm a copy of the base final norm, the LM head
        borrowed (or copied with ``own_lm_head``); attached to ``model``, on its device and dtype.

        Example:
            >>> head = ExitHead.from_base(model, exit_layer=6)  # doctest: +SKIP
        """
        from hf_decoding_ext.core.anatomy import decoder_layers, final_norm, lm_head

        total = len(decoder_layers(model))
        if isinstance(exit_layer, bool) or not isinstance(exit_layer, int) or not 1 <= exit_layer < total:
            raise ValueError(f"exit_layer must be an int in [1, {total - 1}] for this {total}-layer model, got "
                             f"{exit_layer!r}")
        init = exit_layer if init_from_layer is None else init_from_layer
        if isinstance(init, bool) or not isinstance(init, int) or not 0 <= init < total:
            raise ValueError(f"init_from_layer must be an int in [0, {total - 1}], got {init_from_layer!r}")
        config = ExitHeadConfig.for_model(model, exit_layer, own_lm_head=own_lm_head, init_from_layer=init,
                                          **kwargs)
        head = cls(config)
        src = decoder_layers(model)[init].state_dict()
        head.layer.load_state_dict(src)
        head.norm.load_state_dict(final_norm(model).state_dict())
        if own_lm_head:
            head.lm_head.weight.data.copy_(lm_head(model).weight.detach())
        return head.attach(model)

    def attach(self, model) -> ExitHead:
        """Borrow ``model``'s rotary embedding and LM head (not copied, not saved); move the head to ``model``'s device
        and dtype. Returns ``self``."""
        from hf_decoding_ext.core.anatomy import decoder, decoder_layers, lm_head

        base = self.config.base_config or {}
        if model.config.hidden_size != base.get("hidden_size") or model.config.vocab_size != base.get("vocab_size"):
            raise ValueError(f"this exit head was built for hidden size {base.get('hidden_size')} and vocabulary "
                             f"{base.get('vocab_size')}; the model has {model.config.hidden_size} and "
                             f"{model.config.vocab_size}")
        if self.config.exit_layer >= len(decoder_layers(model)):
            raise ValueError(f"exit_layer {self.config.exit_layer} is not below the model's "
                             f"{len(decoder_layers(model))} layers")
        rotary = getattr(decoder(model), "rotary_emb", None)
        if rotary is None:
            raise ValueError(f"{type(model).__name__} has no rotary embedding on its decoder; ExitHead needs one")
        p = next(iter(model.parameters()))
        self.to(device=p.device, dtype=p.dtype)
        self.__dict__["_base"] = {"rotary": rotary, "lm_head": lm_head(model), "model_id": id(model)}
        return self

    @property
    def attached(self) -> bool:
        return bool(self._base)

    @property
    def exit_layer(self) -> int:
        return int(self.config.exit_layer)

    def output_head(self) -> nn.Module:
        if self.lm_head is not None:
            return self.lm_head
        if not self._base:
            raise RuntimeError("ExitHead is not attached to a base model: call head.attach(model)")
        return self._base["lm_head"]

    def new_cache(self) -> DynamicCache:
        """An empty KV cache for the extra layer."""
        return DynamicCache(config=self._layer_config)

    # ------------------------------------------------------------------------------------------------ forward
    def features(self, hidden_states: torch.Tensor, position_ids: torch.Tensor | None = None,
                 attention_mask: torch.Tensor | None = None, cache: DynamicCache | None = None,
                 use_cache: bool = True) -> tuple[torch.Tensor, DynamicCache | None]:
        """The normed output of the extra layer ``(batch, seq, hidden)`` and the cache (see :meth:`forward`)."""
        from transformers.masking_utils import create_causal_mask

        if not self._base:
            raise RuntimeError("ExitHead is not attached to a base model: call head.attach(model)")
        if hidden_states.dim() != 3:
            raise ValueError(f"hidden_states must be (batch, seq, hidden), got shape {tuple(hidden_states.shape)}")
        if use_cache and cache is None:
            cache = self.new_cache()
        if not use_cache and cache is not None:
            raise ValueError("cache given with use_cache=False")
        past = cache.get_seq_length() if cache is not None else 0
        if position_ids is None:
            position_ids = torch.arange(past, past + hidden_states.shape[1], device=hidden_states.device)[None]
        hidden_states = hidden_states.to(self.norm.weight.dtype)
        mask = create_causal_mask(config=self._layer_config, inputs_embeds=hidden_states, attention_mask=attention_mask,
                                  cache=cache, position_ids=position_ids)
        pos_emb = self._base["rotary"](hidden_states, position_ids=position_ids)
        out = self.layer(hidden_states, attention_mask=mask, position_ids=position_ids, cache=cache,
                         use_cache=use_cache, position_embeddings=pos_emb)
        if isinstance(out, tuple):
            out = out[0]
        return self.norm(out), cache

    def forward(self, hidden_states: torch.Tensor, position_ids: torch.Tensor | None = None,
                attention_mask: torch.Tensor | None = None, cache: DynamicCache | None = None, use_cache: bool = True,
                logits_to_keep: int = 0) -> ExitHeadOutput:
        """Logits of the exit at the layer-``N`` hidden states.

        Args:
            hidden_states: ``(batch, seq, hidden)``, the output of the base model's first ``N`` layers
                (``output_hidden_states[N]``) at consecutive positions.
            position_ids: ``(batch, seq)`` positions (default: continuing the cache, from 0).
            attention_mask: optional 2D padding mask ``(batch, past + seq)`` (1 = attend).
            cache: the extra layer's KV cache returned by a previous call (``None``: a new one).
            use_cache: keep the extra layer's KV (``False``: a cache-free forward, e.g. for training).
            logits_to_keep: compute logits only at the last ``logits_to_keep`` positions (0: all).

        Returns:
            :class:`ExitHeadOutput`.
        """
        if isinstance(logits_to_keep, bool) or not isinstance(logits_to_keep, int) or logits_to_keep < 0:
            raise ValueError(f"logits_to_keep must be an int >= 0, got {logits_to_keep!r}")
        feats, cache = self.features(hidden_states, position_ids, attention_mask, cache, use_cache)
        kept = feats[:, -logits_to_keep:] if logits_to_keep else feats
        logits = self.output_head()(kept).float()
        return ExitHeadOutput(logits=logits, cache=cache, hidden=feats)

    def num_own_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())


# ---------------------------------------------------------------------------------------------------- training
@torch.inference_mode()
def distill_features(model, sequences: list[list[int]], exit_layer: int, *, batch_size: int = 4,
                     progress: bool = True) -> dict:
    """One base-model forward per sequence: the layer-``N`` hidden states (the head's input) and the last-layer
    features after the final norm (the LM head's input, from which the teacher distribution is recomputed), fp16.

    Returns a dict of tensors ``hidden_in (T, hidden)``, ``hidden_out (T, hidden)``, ``input_ids (T,)``,
    ``offsets (n + 1,)`` (sequence boundaries), for :func:`train_exit_head` / :func:`distill_kl`.
    """
    from tqdm.auto import tqdm

    device = next(model.parameters()).device
    ins, outs, ids_all, lengths = [], [], [], []
    order = sorted(range(len(sequences)), key=lambda i: len(sequences[i]))
    rows: dict[int, tuple] = {}
    for start in tqdm(range(0, len(order), batch_size), desc="features", disable=not progress):
        chunk = order[start:start + batch_size]
        width = max(len(sequences[i]) for i in chunk)
        ids = torch.zeros(len(chunk), width, dtype=torch.long)
        mask = torch.zeros(len(chunk), width, dtype=torch.long)
        for j, i in enumerate(chunk):  # right padding: positions 0..len-1
            ids[j, :len(sequences[i])] = torch.tensor(sequences[i])
            mask[j, :len(sequences[i])] = 1
        out = model(input_ids=ids.to(device), attention_mask=mask.to(device), output_hidden_states=True,
                    logits_to_keep=1, use_cache=False)
        h_in = out.hidden_states[exit_layer].to(torch.float16).cpu()
        h_out = out.hidden_states[-1].to(torch.float16).cpu()
        for j, i in enumerate(chunk):
            n = len(sequences[i])
            rows[i] = (ids[j, :n], h_in[j, :n].clone(), h_out[j, :n].clone())
    for i in range(len(sequences)):
        ids_all.append(rows[i][0])
        ins.append(rows[i][1])
        outs.append(rows[i][2])
        lengths.append(len(sequences[i]))
    return {"input_ids": torch.cat(ids_all), "hidden_in": torch.cat(ins), "hidden_out": torch.cat(outs),
            "offsets": torch.tensor([0] + lengths).cumsum(0)}


def _split(features: dict) -> list[tuple[torch.Tensor, torch.Tensor]]:
    off = features["offsets"].tolist()
    return [(features["hidden_in"][a:b], features["hidden_out"][a:b]) for a, b in zip(off[:-1], off[1:])]


def _kl_loss(head: ExitHead, teacher_head: nn.Module, h_in: torch.Tensor, h_out: torch.Tensor,
             mask: torch.Tensor, temperature: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean per-position KL(p_full || p_exit) over the ``mask``ed positions, and the exit's top-1 agreement."""
    dtype = head.norm.weight.dtype
    student = head(h_in.to(dtype), attention_mask=mask, use_cache=False).logits
    with torch.no_grad():
        teacher = teacher_head(h_out.to(dtype)).float()
    t = temperature
    logp_s = F.log_softmax(student / t, dim=-1)
    logp_t = F.log_softmax(teacher / t, dim=-1)
    kl = (logp_t.exp() * (logp_t - logp_s)).sum(-1)  # (batch, seq)
    m = mask.to(kl.dtype)
    agree = ((student.argmax(-1) == teacher.argmax(-1)).to(kl.dtype) * m).sum() / m.sum()
    return (kl * m).sum() / m.sum() * (t * t), agree


def _batch(seqs, idx, max_len, device):
    width = min(max_len, max(seqs[i][0].shape[0] for i in idx))
    hid = seqs[idx[0]][0].shape[1]
    h_in = torch.zeros(len(idx), width, hid, dtype=torch.float16)
    h_out = torch.zeros(len(idx), width, hid, dtype=torch.float16)
    mask = torch.zeros(len(idx), width, dtype=torch.long)
    for j, i in enumerate(idx):
        a, b = seqs[i]
        n = min(width, a.shape[0])
        h_in[j, :n], h_out[j, :n], mask[j, :n] = a[:n], b[:n], 1
    return h_in.to(device), h_out.to(device), mask.to(device)


@torch.no_grad()
def distill_kl(head: ExitHead, features: dict, *, batch_size: int = 4, max_len: int = 512) -> dict:
    """Mean KL(p_full || p_exit) per position and top-1 agreement of the head with the full model on ``features``
    (:func:`distill_features`), e.g. held-out distillation prompts.

    Example:
        >>> distill_kl(head, heldout)  # {"kl": ..., "agreement": ..., "positions": ...}  # doctest: +SKIP
    """
    seqs = _split(features)
    device = head.norm.weight.device
    teacher = head._base["lm_head"] if head._base else head.output_head()
    tot_kl = tot_agree = tot_n = 0.0
    for start in range(0, len(seqs), batch_size):
        idx = list(range(start, min(start + batch_size, len(seqs))))
        h_in, h_out, mask = _batch(seqs, idx, max_len, device)
        kl, agree = _kl_loss(head, teacher, h_in, h_out, mask)
        n = float(mask.sum())
        tot_kl += float(kl) * n
        tot_agree += float(agree) * n
        tot_n += n
    return {"kl": tot_kl / max(tot_n, 1.0), "agreement": tot_agree / max(tot_n, 1.0), "positions": int(tot_n)}


@torch.no_grad()
def plain_exit_kl(model, features: dict, exit_layer: int, chunk: int = 1024) -> dict:
    """Mean KL(p_full || p_exit) and top-1 agreement of the *plain* early exit at ``exit_layer`` (the base model's final
    norm and LM head applied to the layer-``N`` hidden states, no extra layer) on ``features``."""
    from hf_decoding_ext.core.anatomy import exit_logits, lm_head

    device = next(model.parameters()).device
    head = lm_head(model)
    tot_kl = tot_agree = 0.0
    n = features["hidden_in"].shape[0]
    for i in range(0, n, chunk):
        h_in = features["hidden_in"][i:i + chunk].to(device=device, dtype=torch.float32)
        h_out = features["hidden_out"][i:i + chunk].to(device=device, dtype=torch.float32)
        lp_t = F.log_softmax(head(h_out).float(), -1)
        lp_s = F.log_softmax(exit_logits(h_in, model), -1)
        tot_kl += float((lp_t.exp() * (lp_t - lp_s)).sum(-1).sum())
        tot_agree += float((lp_t.argmax(-1) == lp_s.argmax(-1)).sum())
    return {"kl": tot_kl / max(n, 1), "agreement": tot_agree / max(n, 1), "positions": int(n)}


def train_exit_head(head: ExitHead, features: dict, *, steps: int = 1000, batch_size: int = 4, max_len: int = 512,
                    lr: float = 3e-4, weight_decay: float = 0.0, warmup: int = 30, grad_clip: float = 1.0,
                    temperature: float = 1.0, seed: int = 0, max_seconds: float | None = None,
                    log=None, log_every: int = 10, progress: bool = True) -> dict:
    """Self-distillation of ``head`` (attached to its frozen base model): AdamW on the head's own parameters,
    minimising KL(p_full || p_exit) at every position of the base model's own sequences (``features`` from
    :func:`distill_features`), warmup + cosine learning rate. Stops after ``steps`` or ``max_seconds``.

    Returns ``{"steps", "seconds", "first_loss", "last_loss"}`` (``last_loss``: mean of the last ``log_every``).

    Example:
        >>> stats = train_exit_head(head, distill_features(model, seqs, 6), steps=200)  # doctest: +SKIP
    """
    from tqdm.auto import tqdm

    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise ValueError(f"steps must be an int >= 1, got {steps!r}")
    if not lr > 0:
        raise ValueError(f"lr must be > 0, got {lr!r}")
    seqs = _split(features)
    if not seqs:
        raise ValueError("no training sequences")
    device = head.norm.weight.device
    teacher = head._base["lm_head"]
    params = [p for p in head.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
    g = torch.Generator().manual_seed(seed)
    head.train()
    t0 = time.time()
    losses, first, perm, pos = [], None, torch.randperm(len(seqs), generator=g).tolist(), 0
    bar = tqdm(total=steps, desc="exit head", disable=not progress)
    step = 0
    for step in range(steps):
        if max_seconds is not None and time.time() - t0 > max_seconds:
            break
        factor = (step + 1) / warmup if step < warmup else 0.5 * (1 + math.cos(
            math.pi * min(1.0, (step - warmup) / max(1, steps - warmup))))
        for group in opt.param_groups:
            group["lr"] = lr * factor
        if pos + batch_size > len(perm):
            perm, pos = torch.randperm(len(seqs), generator=g).tolist(), 0
        idx = perm[pos:pos + batch_size]
        pos += batch_size
        h_in, h_out, mask = _batch(seqs, idx, max_len, device)
        loss, agree = _kl_loss(head, teacher, h_in, h_out, mask, temperature)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, grad_clip)
        opt.step()
        value = float(loss.detach())
        first = value if first is None else first
        losses.append(value)
        bar.update(1)
        bar.set_postfix(loss=f"{value:.3f}", agree=f"{float(agree.detach()):.3f}")
        if log is not None and (step % log_every == 0 or step == steps - 1):
            log(json.dumps({"step": step, "loss": round(value, 4), "agreement": round(float(agree.detach()), 4),
                            "lr": lr * factor, "seconds": round(time.time() - t0, 1)}))
    else:
        step = steps
    bar.close()
    head.eval()
    tail = losses[-log_every:] if losses else [float("nan")]
    return {"steps": len(losses), "seconds": round(time.time() - t0, 1), "first_loss": first,
            "last_loss": sum(tail) / len(tail)}
