"""Fine-tuning of the base model itself (issue 24): the shared recipe of the methods that teach the model new skills
(SPACE's mask groups, lexical units, set block decoding, sorted nested drafts).

One entry point, :func:`finetune`, optimises a causal LM with a *caller-supplied* objective
(``loss_fn(model, batch) -> (loss, metrics)``), so each method brings its own loss and keeps the rest: AdamW with
warmup + cosine, progress bar and JSON-lines log, resumable safetensors checkpoints (trainable weights, optimizer
state, RNG state, step: a resumed run ends on the same weights as an uninterrupted one), and a final save, all on the
model's device (the same code runs on CPU and on a GPU machine).

Two modes: ``"full"`` (every weight trains; saved with ``save_pretrained`` as safetensors) and ``"lora"`` (an
in-house LoRA, no peft: frozen base, trainable low-rank ``A``/``B`` with ``B = 0`` so training starts from the original
model; saved as a small safetensors adapter plus a JSON config). Methods that need extra tokens (a mask token...) add
them with :func:`add_special_tokens`; in LoRA mode their embedding (and output) rows train and ship with the adapter.

The schedule and checkpoint helpers are those of the draft-head trainer (:mod:`hf_decoding_ext.training.trainer`:
``_lr_factor``, ``save_optimizer``, ``load_optimizer``); its loop (``train_head``) is tied to heads (their batches,
``training_loss``, held-out top-k evaluation and tree), so this module has its own short loop.

Example:
    >>> from hf_decoding_ext.training.finetune import FineTuneConfig, finetune, next_token_loss
    >>> cfg = FineTuneConfig(steps=500, mode="lora", extra_tokens=("<|mask|>",))  # doctest: +SKIP
    >>> data = DistillData("features.safetensors")  # doctest: +SKIP
    >>> finetune(model, tokenizer, data, next_token_loss, "out/space", cfg)  # doctest: +SKIP
"""

from __future__ import annotations

import inspect
import json
import math
import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from types import SimpleNamespace

import torch
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import nn
from tqdm.auto import tqdm

from hf_decoding_ext.training.budget import TrainingBudget, resolve_budget
from hf_decoding_ext.training.trainer import _lr_factor, load_optimizer, save_optimizer

ADAPTER_FILE = "adapter.safetensors"
ADAPTER_CONFIG = "adapter_config.json"
MODES = ("full", "lora")
NEW_TOKENS_ATTR = "decoding_ext_added_tokens"
"""Config attribute recording the tokens :func:`add_special_tokens` added: ``{token: id}``."""


# ------------------------------------------------------------------------------------------------------ configuration
@dataclass
class FineTuneConfig:
    """Hyper-parameters of :func:`finetune`.

    ``budget`` (a :class:`~hf_decoding_ext.training.budget.TrainingBudget`, a name from ``BUDGETS`` or a number of
    supervised positions) replaces ``steps`` when given: the steps are set from the positions the first batches carry
    (labels other than -100). ``batch_size`` counts sequences (ignored when the caller passes ready batches);
    ``grad_accum`` micro-batches make one optimizer step. ``extra_tokens`` are added to the tokenizer and the
    embeddings before training (:func:`add_special_tokens` with ``new_token_init``). ``save_dtype`` (e.g.
    ``"bfloat16"``) is the dtype of the final saved weights (training stays in the model's dtype).
    """

    steps: int = 1000
    budget: TrainingBudget | str | int | None = None
    batch_size: int = 8
    grad_accum: int = 1
    max_length: int = 512
    lr: float = 2e-4
    weight_decay: float = 0.0
    warmup: int = 20
    grad_clip: float = 1.0
    mode: str = "lora"
    lora_rank: int = 16
    lora_alpha: float = 32.0
    lora_target_modules: tuple[str, ...] = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj",
                                            "down_proj")
    extra_tokens: tuple[str, ...] = ()
    new_token_init: str | int = "mean"
    train_on_prompt: bool = False
    log_every: int = 10
    checkpoint_every: int = 100
    seed: int = 0
    save_dtype: str | None = None

    def __post_init__(self):
        for name in ("steps", "batch_size", "grad_accum", "max_length", "lora_rank", "log_every", "checkpoint_every"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)!r}")
        if self.lr <= 0:
            raise ValueError("lr must be > 0")
        if self.mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {self.mode!r}")
        if self.save_dtype is not None and not isinstance(getattr(torch, str(self.save_dtype), None), torch.dtype):
            raise ValueError(f"save_dtype must name a torch dtype, got {self.save_dtype!r}")
        self.lora_target_modules = tuple(self.lora_target_modules)
        self.extra_tokens = tuple(self.extra_tokens)

    def to_json(self) -> dict:
        d = asdict(self)
        b = self.budget
        d["budget"] = b.positions if isinstance(b, TrainingBudget) else b
        return d


# ------------------------------------------------------------------------------------------------------ extra tokens
def added_token_ids(model) -> list[int]:
    """The ids :func:`add_special_tokens` added to ``model`` (sorted)."""
    return sorted(set((getattr(model.config, NEW_TOKENS_ATTR, None) or {}).values()))


def _init_rows(weight: torch.Tensor, ids: list[int], n_old: int, init) -> None:
    with torch.no_grad():
        if init == "mean":
            row = weight[:n_old].float().mean(0).to(weight.dtype)
        elif init == "zeros":
            row = torch.zeros_like(weight[0])
        elif isinstance(init, int) and not isinstance(init, bool):
            row = weight[init].clone()
        else:
            raise ValueError(f"init must be 'mean', 'zeros' or a token id to copy, got {init!r}")
        for i in ids:
            weight[i] = row


def add_special_tokens(model, tokenizer, tokens, init: str | int = "mean") -> list[int]:
    """Add ``tokens`` (e.g. ``["<|mask|>"]``) to ``tokenizer`` as special tokens, grow the model's input embeddings
    and its output layer (tied or untied) to cover them, and return their ids (in the order given).

    Initialisation of the new rows (input embedding and, when untied, lm_head): ``"mean"`` the mean of the rows that
    existed before (the usual choice: the new token starts as an "average" token, and its logit as the mean logit),
    ``"zeros"``, or an int: a copy of that token's rows. Existing rows are unchanged. ``model.config.vocab_size`` is
    updated, and the added tokens are recorded in ``model.config.decoding_ext_added_tokens`` (``{token: id}``).
    Tokens the tokenizer already has are not added again (their ids are returned, their rows left as they are,
    unless the model lacks them: a saved fine-tuning tokenizer with a fresh original model gets the rows added).
    When the embedding matrix is already larger than the tokenizer (padded vocabularies) the new ids reuse the
    unused rows, which are re-initialised.
    """
    tokens = [tokens] if isinstance(tokens, str) else list(tokens)
    if not tokens:
        return []
    vocab = tokenizer.get_vocab()
    fresh = [t for t in tokens if t not in vocab]
    if fresh:
        tokenizer.add_tokens(fresh, special_tokens=True)
    ids = [int(tokenizer.convert_tokens_to_ids(t)) for t in tokens]
    emb = model.get_input_embeddings()
    n_old = emb.weight.shape[0]
    # rows to (re)initialise: tokens new to the tokenizer, and tokens the tokenizer has but the model does not (a
    # tokenizer saved by an earlier run, paired with a fresh copy of the original model)
    new_ids = sorted({i for t, i in zip(tokens, ids) if t in fresh or i >= n_old})
    need = max([n_old] + [i + 1 for i in new_ids])
    if need > n_old:
        model.resize_token_embeddings(need, mean_resizing=False)
    emb = model.get_input_embeddings()
    out = model.get_output_embeddings()
    n_ref = min(n_old, min(new_ids)) if new_ids else n_old  # rows that were in use before
    if new_ids:
        _init_rows(emb.weight, new_ids, n_ref, init)
        if out is not None and out.weight is not emb.weight:
            _init_rows(out.weight, new_ids, n_ref, init)
            if getattr(out, "bias", None) is not None:
                with torch.no_grad():
                    out.bias[new_ids] = out.bias[:n_ref].mean() if init == "mean" else 0.0
    model.config.vocab_size = model.get_input_embeddings().weight.shape[0]
    text_config = getattr(model.config, "get_text_config", lambda: None)()
    if text_config is not None and text_config is not model.config and hasattr(text_config, "vocab_size"):
        text_config.vocab_size = model.config.vocab_size
    recorded = dict(getattr(model.config, NEW_TOKENS_ATTR, None) or {})
    recorded.update({t: i for t, i in zip(tokens, ids) if i in new_ids or t in recorded})
    setattr(model.config, NEW_TOKENS_ATTR, recorded)
    return ids


# --------------------------------------------------------------------------------------------------------------- LoRA
def _is_conv1d(module) -> bool:
    return type(module).__name__ == "Conv1D" and hasattr(module, "nf")  # GPT-2's transposed linear


class LoRALinear(nn.Module):
    """``base(x) + (alpha / rank) * B(A(x))`` around a frozen ``nn.Linear`` (or GPT-2 ``Conv1D``).

    ``A`` is Kaiming-uniform and ``B`` zero, so a freshly wrapped model computes exactly what the base does.
    """

    def __init__(self, base: nn.Module, rank: int = 16, alpha: float = 32.0):
        super().__init__()
        if isinstance(base, nn.Linear):
            d_in, d_out = base.in_features, base.out_features
        elif _is_conv1d(base):
            d_in, d_out = base.weight.shape
        else:
            raise TypeError(f"LoRALinear wraps nn.Linear or Conv1D, got {type(base).__name__}")
        self.base = base
        for p in base.parameters():
            p.requires_grad_(False)
        self.rank, self.alpha, self.scaling = int(rank), float(alpha), float(alpha) / int(rank)
        w = base.weight
        self.lora_A = nn.Parameter(torch.empty(rank, d_in, dtype=w.dtype, device=w.device))
        self.lora_B = nn.Parameter(torch.zeros(d_out, rank, dtype=w.dtype, device=w.device))
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))

    @property
    def weight(self):
        return self.base.weight

    @property
    def bias(self):
        return self.base.bias

    def delta(self) -> torch.Tensor:
        """The weight update ``(out, in)``."""
        return (self.lora_B @ self.lora_A) * self.scaling

    def forward(self, x):
        update = F.linear(F.linear(x.to(self.lora_A.dtype), self.lora_A), self.lora_B)
        return self.base(x) + update.to(x.dtype) * self.scaling

    def merged(self) -> nn.Module:
        """The base layer with the update folded in."""
        with torch.no_grad():
            d = self.delta().to(self.base.weight.dtype)
            self.base.weight += d.T if _is_conv1d(self.base) else d
        return self.base


class _NewRows(nn.Module):
    """A frozen layer (embedding or output projection) whose rows ``ids`` are replaced by a trainable ``new_rows``
    parameter (LoRA mode); ``new_rows`` is shared between the two when the embeddings are tied."""

    def __init__(self, base: nn.Module, ids: list[int], new_rows: nn.Parameter | None = None):
        super().__init__()
        self.base = base
        for p in base.parameters():
            p.requires_grad_(False)
        self.register_buffer("ids", torch.tensor(ids, dtype=torch.long, device=base.weight.device), persistent=False)
        self.tied = new_rows is not None
        self.new_rows = new_rows if new_rows is not None else nn.Parameter(base.weight[self.ids].detach().clone())

    @property
    def weight(self):
        return self.base.weight

    def merged(self) -> nn.Module:
        """The base layer with the new rows written into it."""
        with torch.no_grad():
            self.base.weight[self.ids] = self.new_rows.to(self.base.weight.dtype)
        return self.base


class NewRowsEmbedding(_NewRows):
    """A frozen embedding whose rows ``ids`` come from a trainable ``new_rows`` parameter (LoRA mode)."""

    def __init__(self, base: nn.Embedding, ids: list[int]):
        super().__init__(base, ids)
        slot = torch.full((base.weight.shape[0],), -1, dtype=torch.long, device=base.weight.device)
        slot[self.ids] = torch.arange(len(ids), device=base.weight.device)
        self.register_buffer("slot", slot, persistent=False)

    @property
    def num_embeddings(self):
        return self.base.num_embeddings

    @property
    def embedding_dim(self):
        return self.base.embedding_dim

    def forward(self, input_ids):
        out = self.base(input_ids)
        slot = self.slot[input_ids]
        hit = slot >= 0
        return torch.where(hit[..., None], self.new_rows[slot.clamp(min=0)].to(out.dtype), out)


class NewRowsLinear(_NewRows):
    """A frozen output layer whose logits of ``ids`` use the trainable ``new_rows`` (shared with the input embedding
    wrapper when the embeddings are tied)."""

    @property
    def bias(self):
        return self.base.bias

    def forward(self, x):
        logits = self.base(x)
        new = F.linear(x, self.new_rows.to(x.dtype))
        if self.base.bias is not None:
            new = new + self.base.bias[self.ids]
        return logits.index_copy(-1, self.ids, new.to(logits.dtype))


def _set_module(model, name: str, module: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, module)


def _module_name(model, target) -> str | None:
    return next((n for n, m in model.named_modules() if m is target), None)


def apply_lora(model, target_modules=("q_proj", "v_proj"), rank: int = 16, alpha: float = 32.0,
               new_token_ids: list[int] | None = None):
    """Freeze ``model`` and wrap every ``nn.Linear`` / ``Conv1D`` whose name ends with one of ``target_modules``
    (e.g. ``q_proj``, or ``c_attn`` for GPT-2) in a :class:`LoRALinear`. The rows of ``new_token_ids`` (default:
    the tokens :func:`add_special_tokens` added) in the input embeddings and the output layer become trainable
    (one shared parameter when they are tied). Returns ``model``, changed in place."""
    if any(isinstance(m, LoRALinear) for m in model.modules()):
        raise ValueError("model already has LoRA layers (merge_lora first)")
    for p in model.parameters():
        p.requires_grad_(False)
    targets = tuple(target_modules)
    names = [n for n, m in model.named_modules()
             if n and n.split(".")[-1] in targets and (isinstance(m, nn.Linear) or _is_conv1d(m))]
    if not names:
        raise ValueError(f"no linear layer named {targets} in {type(model).__name__}")
    for n in names:
        _set_module(model, n, LoRALinear(model.get_submodule(n), rank, alpha))
    ids = added_token_ids(model) if new_token_ids is None else sorted({int(i) for i in new_token_ids})
    if ids:
        emb, out = model.get_input_embeddings(), model.get_output_embeddings()
        tied = out is not None and out.weight is emb.weight
        emb_name = _module_name(model, emb)
        out_name = _module_name(model, out) if out is not None else None
        wrapped = NewRowsEmbedding(emb, ids)
        _set_module(model, emb_name, wrapped)
        if out is not None:
            _set_module(model, out_name, NewRowsLinear(out, ids, wrapped.new_rows if tied else None))
    model.lora_config = {"rank": int(rank), "alpha": float(alpha), "target_modules": list(targets),
                         "new_token_ids": ids}
    return model


def merge_lora(model):
    """Fold every LoRA update (and trained new-token rows) into the base weights and remove the wrappers; the
    merged model computes the same logits as the wrapped one. Returns ``model``."""
    for name, m in list(model.named_modules()):
        if isinstance(m, (LoRALinear, NewRowsEmbedding, NewRowsLinear)):
            _set_module(model, name, m.merged())
    if hasattr(model, "lora_config"):
        del model.lora_config
    for p in model.parameters():
        p.requires_grad_(True)
    return model


def lora_state_dict(model) -> dict[str, torch.Tensor]:
    """The adapter: every LoRA ``A``/``B`` and the new-token rows, by parameter name (tied rows once)."""
    return {n: p.detach().cpu().contiguous() for n, p in model.named_parameters()
            if n.endswith((".lora_A", ".lora_B", ".new_rows"))}


def save_lora(model, path: str | os.PathLike, dtype: torch.dtype | None = None, extra: dict | None = None) -> Path:
    """Write the adapter to ``path/adapter.safetensors`` (with its config in the metadata) and
    ``path/adapter_config.json``. Returns the folder."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    cfg = {**getattr(model, "lora_config", {}), "base_model": getattr(model.config, "_name_or_path", None),
           "vocab_size": int(model.get_input_embeddings().weight.shape[0]),
           "added_tokens": dict(getattr(model.config, NEW_TOKENS_ATTR, None) or {}), **(extra or {})}
    sd = lora_state_dict(model)
    if dtype is not None:
        sd = {k: v.to(dtype) for k, v in sd.items()}
    save_file(sd, str(path / ADAPTER_FILE), metadata={"lora_config": json.dumps(cfg)})
    (path / ADAPTER_CONFIG).write_text(json.dumps(cfg, indent=1))
    return path


def load_lora(model, path: str | os.PathLike, merge: bool = False):
    """Load an adapter written by :func:`save_lora` (a folder or the ``.safetensors`` file) into ``model``, wrapping
    it first when needed. The model must already have the adapter's vocabulary (for added tokens: load the saved
    tokenizer, or call :func:`add_special_tokens` with the same tokens). ``merge=True`` folds it in. Returns
    ``model``."""
    path = Path(path)
    file = path / ADAPTER_FILE if path.is_dir() else path
    with safe_open(str(file), "pt") as f:
        cfg = json.loads(f.metadata()["lora_config"])
    vocab = model.get_input_embeddings().weight.shape[0]
    if cfg.get("vocab_size") not in (None, vocab):
        raise ValueError(f"adapter is for a vocabulary of {cfg['vocab_size']} tokens, the model has {vocab}: add "
                         f"its tokens {cfg.get('added_tokens')} first (add_special_tokens)")
    if not hasattr(model, "lora_config"):
        if cfg.get("added_tokens"):
            recorded = dict(getattr(model.config, NEW_TOKENS_ATTR, None) or {})
            setattr(model.config, NEW_TOKENS_ATTR, {**recorded, **cfg["added_tokens"]})
        apply_lora(model, cfg["target_modules"], cfg["rank"], cfg["alpha"], new_token_ids=cfg["new_token_ids"])
    params = dict(model.named_parameters())
    tensors = load_file(str(file))
    missing = sorted(set(lora_state_dict(model)) - set(tensors))
    unexpected = sorted(set(tensors) - set(params))
    if missing or unexpected:
        raise ValueError(f"adapter does not match the model: missing {missing[:5]}, unexpected {unexpected[:5]}")
    with torch.no_grad():
        for k, v in tensors.items():
            params[k].copy_(v.to(params[k].dtype))
    return merge_lora(model) if merge else model


# --------------------------------------------------------------------------------------------------------------- data
def sequence_batches(seqs, batch_size: int, *, seed: int = 0, pad_id: int = 0, max_length: int = 512,
                     train_on_prompt: bool = False):
    """Endless next-token batches over self-distillation sequences (:class:`~hf_decoding_ext.training.data.Sequence`
    or ``{"input_ids", "response_start"}``), shuffled per epoch from ``seed``: right-padded ``input_ids``,
    ``attention_mask``, ``labels`` (-100 on padding and, unless ``train_on_prompt``, on the prompt) and
    ``response_start``. The stream depends only on ``seed``, so a resumed run sees the same batches."""
    seqs = list(seqs)
    if not seqs:
        raise ValueError("no training sequences")
    epoch = 0
    while True:
        order = torch.randperm(len(seqs), generator=torch.Generator().manual_seed(seed * 100_003 + epoch)).tolist()
        for i in range(0, len(order), batch_size):
            chunk = [seqs[j] for j in order[i:i + batch_size]]
            yield collate_lm([(_get(s, "input_ids"), _get(s, "response_start")) for s in chunk], pad_id, max_length,
                             train_on_prompt)
        epoch += 1


def load_finetuned(path: str | os.PathLike, tokens=(), base: str | None = None, dtype=torch.float32, device=None,
                   what: str = "fine-tune", hint: str = ""):
    """``(model, tokenizer)`` of a fine-tuned variant at ``path``: a LoRA adapter (:data:`ADAPTER_FILE` in the folder,
    or a ``.safetensors`` file) loaded into ``base`` (``None``: the embedded default model) after adding ``tokens``
    (:func:`add_special_tokens`), then merged; or a full checkpoint (``config.json``, ``finetune --mode full``).
    ``ValueError`` naming ``what`` (and ``hint``) when ``path`` holds neither."""
    from hf_decoding_ext.core.models import load_model

    path = Path(path)
    if (path / ADAPTER_FILE).exists() or path.suffix == ".safetensors":
        model, tokenizer = load_model(base, dtype=dtype, device=device)
        add_special_tokens(model, tokenizer, list(tokens))
        load_lora(model, path, merge=True)
    elif (path / "config.json").exists():
        model, tokenizer = load_model(str(path), dtype=dtype, device=device)
    else:
        raise ValueError(f"no {what} at {str(path)!r} (neither {ADAPTER_FILE} nor config.json){hint}")
    return model.eval(), tokenizer


def added_token_id(model, tokenizer, token: str, *, explicit: int | None = None, config_attr: str | None = None,
                   what: str = "added token", hint: str = "") -> int:
    """The id of an added ``token`` in ``model``: ``explicit`` when given, else
    ``model.config.decoding_ext_added_tokens[token]`` (set by :func:`add_special_tokens`), else
    ``model.config.<config_attr>``, else the tokenizer's id for ``token``. ``ValueError`` (naming ``what``, with
    ``hint``) when none is found or the id is outside the model's vocabulary."""
    tid = explicit
    if tid is None:
        tid = (getattr(model.config, NEW_TOKENS_ATTR, None) or {}).get(token)
    if tid is None and config_attr is not None:
        tid = getattr(model.config, config_attr, None)
    if tid is None and tokenizer is not None:
        tid = tokenizer.get_vocab().get(token)
    if tid is None:
        raise ValueError(f"the model has no {what} ({token!r}){hint}")
    vocab = model.get_input_embeddings().weight.shape[0]
    if not 0 <= int(tid) < vocab:
        raise ValueError(f"{what} id {tid} is outside the model's vocabulary ({vocab})")
    return int(tid)


def _get(s, key):
    return s[key] if isinstance(s, dict) else getattr(s, key)


def collate_lm(items, pad_id: int = 0, max_length: int = 512, train_on_prompt: bool = False) -> dict:
    """``[(ids, response_start), ...]`` -> a right-padded causal-LM batch (see :func:`sequence_batches`)."""
    ids = [torch.as_tensor(i, dtype=torch.long)[:max_length] for i, _ in items]
    n = max(len(i) for i in ids)
    input_ids = torch.full((len(ids), n), pad_id, dtype=torch.long)
    mask = torch.zeros((len(ids), n), dtype=torch.long)
    labels = torch.full((len(ids), n), -100, dtype=torch.long)
    for r, (seq, (_, start)) in enumerate(zip(ids, items)):
        input_ids[r, :len(seq)] = seq
        mask[r, :len(seq)] = 1
        first = 0 if train_on_prompt else min(int(start), len(seq))
        labels[r, first:len(seq)] = seq[first:]
    return {"input_ids": input_ids, "attention_mask": mask, "labels": labels,
            "response_start": torch.tensor([int(s) for _, s in items])}


def _batch_stream(source, cfg: FineTuneConfig, pad_id: int):
    """A fresh, deterministic batch iterator over ``source``: ``DistillData`` (its training split), a list of
    sequences, a list of ready batches (dicts, cycled in order) or a callable ``seed -> iterator``."""
    if callable(source) and not isinstance(source, (list, tuple)):
        return iter(source(cfg.seed))
    if hasattr(source, "train") and hasattr(source, "heldout"):
        source = source.train
    source = list(source)
    if source and isinstance(source[0], dict) and "input_ids" in source[0] and torch.is_tensor(source[0]["input_ids"]) \
            and source[0]["input_ids"].dim() == 2:
        def cycle():
            while True:
                yield from source
        return cycle()
    return sequence_batches(source, cfg.batch_size, seed=cfg.seed, pad_id=pad_id, max_length=cfg.max_length,
                            train_on_prompt=cfg.train_on_prompt)


def batch_positions(batch) -> int:
    """Supervised positions of a batch: labels other than -100 (shifted: the first label never counts), else
    attended tokens."""
    if "labels" in batch:
        return int((batch["labels"][:, 1:] != -100).sum())
    if "attention_mask" in batch:
        return int(batch["attention_mask"].sum())
    return int(batch["input_ids"].numel())


def _to_device(batch, device):
    return {k: (v.to(device) if torch.is_tensor(v) else v) for k, v in batch.items()}


def next_token_loss(model, batch, marker: str | None = None):
    """The plain causal-LM objective (mean cross-entropy of ``labels`` shifted by one): the control every method's
    objective is compared with, and the objective of the tests.

    With ``marker`` (e.g. ``"mask"``) and ``batch[f"{marker}_token_id"]`` present, the positions whose input is that
    added token are also reported: ``{marker}_tokens`` (how many carry a label) and ``{marker}_acc`` (their argmax
    accuracy), for the objectives that teach the model a new token (SPACE's mask, LUD's placeholder)."""
    logits = model(input_ids=batch["input_ids"], attention_mask=batch.get("attention_mask")).logits[:, :-1]
    labels = batch["labels"][:, 1:]
    loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), labels.reshape(-1), ignore_index=-100)
    metrics = {"tokens": int((labels != -100).sum())}
    if marker is not None and f"{marker}_token_id" in batch:
        marked = (batch["input_ids"][:, :-1] == batch[f"{marker}_token_id"]) & (labels != -100)
        n = int(marked.sum())
        metrics[f"{marker}_tokens"] = n
        if n:
            metrics[f"{marker}_acc"] = float((logits.argmax(-1)[marked] == labels[marked]).float().mean())
    return loss, metrics


def training_sequences(data) -> list:
    """The sequences a batch builder trains on: the train split of a ``DistillData`` (anything with ``train`` and
    ``heldout``), else ``data`` itself (sequences with ``input_ids``/``response_start``); ``ValueError`` when empty."""
    seqs = list(data.train if hasattr(data, "train") and hasattr(data, "heldout") else data)
    if not seqs:
        raise ValueError("no training sequences")
    return seqs


def added_token_stream(seqs, config: FineTuneConfig, tokenizer, token: str, make_batch):
    """The ``seed -> endless iterator`` batch stream of an objective that adds ``token`` to the model.

    ``token`` is appended to ``config.extra_tokens`` when missing, so :func:`finetune` adds it to the tokenizer and
    the model before the stream starts; its id is read from the tokenizer when the stream starts. Each epoch shuffles
    ``seqs`` (seeded by ``seed`` and the epoch) and cuts them into chunks of ``config.batch_size`` sequence indices;
    ``make_batch(indices, token_id, pad_id, rng)`` builds each batch (``rng``: a ``random.Random(seed)``)."""
    import random

    if token not in config.extra_tokens:
        config.extra_tokens = tuple(config.extra_tokens) + (token,)

    def stream(seed: int):
        if token not in tokenizer.get_vocab():
            raise ValueError(f"the tokenizer has no {token!r}: add it first (add_special_tokens)")
        token_id = int(tokenizer.convert_tokens_to_ids(token))
        pad = getattr(tokenizer, "pad_token_id", None)
        pad = 0 if pad is None else int(pad)
        rng = random.Random(seed)
        epoch = 0
        while True:
            order = torch.randperm(len(seqs), generator=torch.Generator().manual_seed(seed * 100_003 + epoch)).tolist()
            for i in range(0, len(order), config.batch_size):
                yield make_batch(order[i:i + config.batch_size], token_id, pad, rng)
            epoch += 1

    return stream


# ---------------------------------------------------------------------------------------------------------- training
def _trainable(model) -> list[tuple[str, nn.Parameter]]:
    return [(n, p) for n, p in model.named_parameters() if p.requires_grad]


def _save_checkpoint(model, optimizer, ckpt: Path, step: int, state: dict) -> None:
    ckpt.mkdir(parents=True, exist_ok=True)
    tmp = ckpt / "trainer_state.json.tmp"
    save_file({n: p.detach().cpu().contiguous() for n, p in _trainable(model)}, str(ckpt / "trainable.safetensors"))
    save_optimizer(optimizer, ckpt / "optimizer.safetensors", step)
    rng = {"cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        rng.update({f"cuda{i}": s for i, s in enumerate(torch.cuda.get_rng_state_all())})
    save_file(rng, str(ckpt / "rng.safetensors"))
    tmp.write_text(json.dumps({"step": step, **state}))
    tmp.replace(ckpt / "trainer_state.json")  # written last: a checkpoint counts only once complete


def _load_checkpoint(model, optimizer, ckpt: Path) -> dict:
    params = dict(_trainable(model))
    tensors = load_file(str(ckpt / "trainable.safetensors"))
    if set(tensors) != set(params):
        raise ValueError(f"checkpoint {ckpt} does not match the model's trainable parameters (another mode or "
                         "LoRA configuration?): delete it or use another out_dir")
    with torch.no_grad():
        for n, v in tensors.items():
            params[n].copy_(v.to(params[n].device, params[n].dtype))
    load_optimizer(optimizer, ckpt / "optimizer.safetensors")
    rng = load_file(str(ckpt / "rng.safetensors"))
    torch.set_rng_state(rng["cpu"])
    if torch.cuda.is_available():
        states = [rng[k] for k in sorted(k for k in rng if k.startswith("cuda"))]
        if len(states) == torch.cuda.device_count():
            torch.cuda.set_rng_state_all(states)
    return json.loads((ckpt / "trainer_state.json").read_text())


def _steps_from_budget(budget: TrainingBudget, source, cfg: FineTuneConfig, pad_id: int, probe: int = 16) -> int:
    stream = _batch_stream(source, cfg, pad_id)
    seen = []
    for _ in range(probe):
        b = next(stream, None)
        if b is None:
            break
        seen.append(batch_positions(b))
    per_step = cfg.grad_accum * sum(seen) / max(1, len(seen))
    if per_step <= 0:
        raise ValueError("the batches carry no supervised positions")
    return max(1, math.ceil(budget.positions / per_step))


def finetune(model, tokenizer, batches_or_data, loss_fn=None, out_dir: str | os.PathLike = "finetuned",
             config: FineTuneConfig | None = None, *, log: str | os.PathLike | None = None, resume: bool = True,
             progress: bool = True):
    """Fine-tune ``model`` with ``loss_fn(model, batch) -> (loss, metrics)`` (default :func:`next_token_loss`) and
    save it to ``out_dir``. Returns the trained model (LoRA-wrapped in ``"lora"`` mode: :func:`merge_lora` folds it).

    ``batches_or_data``: a :class:`~hf_decoding_ext.training.data.DistillData` (its training sequences, batched by
    :func:`sequence_batches`), a list of sequences, a list of ready batches (dicts of tensors, cycled) or a callable
    ``seed -> iterator of batches`` (methods that build their own batches, e.g. with mask groups). Batches are moved
    to the model's device. ``config.extra_tokens`` are added first (:func:`add_special_tokens`; needs ``tokenizer``).

    Writes ``log`` (default ``out_dir/train_log.jsonl``: one JSON line per ``log_every`` steps and the last one),
    checkpoints every ``checkpoint_every`` steps to ``out_dir/checkpoint`` (trainable weights, AdamW state, RNG state
    and step, all safetensors / JSON: a rerun with ``resume=True`` continues and ends on the same weights as an
    uninterrupted run), and the result: ``"full"``: ``save_pretrained`` (safetensors); ``"lora"``:
    ``adapter.safetensors`` + ``adapter_config.json``; the tokenizer when given, and ``finetune.json`` (config and
    summary) in both modes.
    """
    cfg = config or FineTuneConfig()
    loss_fn = loss_fn or next_token_loss
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    ckpt = out_dir / "checkpoint"
    log_path = Path(log) if log else out_dir / "train_log.jsonl"
    log_path.parent.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(cfg.seed)
    if cfg.extra_tokens:
        if tokenizer is None:
            raise ValueError("extra_tokens need the tokenizer")
        add_special_tokens(model, tokenizer, cfg.extra_tokens, init=cfg.new_token_init)
    if cfg.mode == "lora":
        if not hasattr(model, "lora_config"):
            apply_lora(model, cfg.lora_target_modules, cfg.lora_rank, cfg.lora_alpha)
    else:
        if hasattr(model, "lora_config"):
            raise ValueError("mode 'full' on a LoRA-wrapped model: merge_lora first")
        for p in model.parameters():
            p.requires_grad_(True)
    pad_id = getattr(tokenizer, "pad_token_id", None)
    pad_id = pad_id if pad_id is not None else (getattr(model.config, "pad_token_id", None) or 0)
    budget = resolve_budget(cfg.budget)
    steps = _steps_from_budget(budget, batches_or_data, cfg, pad_id) if budget is not None else cfg.steps
    sched = SimpleNamespace(steps=steps, warmup=cfg.warmup)
    named = _trainable(model)
    params = [p for _, p in named]
    decay = [p for p in params if p.dim() >= 2]
    no_decay = [p for p in params if p.dim() < 2]
    groups = [g for g in ({"params": decay, "weight_decay": cfg.weight_decay},
                          {"params": no_decay, "weight_decay": 0.0}) if g["params"]]
    optimizer = torch.optim.AdamW(groups, lr=cfg.lr)
    device = next(model.parameters()).device
    start, positions = 0, 0
    if resume and (ckpt / "trainer_state.json").exists():
        state = _load_checkpoint(model, optimizer, ckpt)
        start, positions = state["step"], state.get("positions", 0)
        if state.get("steps", steps) != steps:
            raise ValueError(f"checkpoint was for {state['steps']} steps, this run has {steps}")
    elif not resume and log_path.exists():
        log_path.unlink()
    batches = _batch_stream(batches_or_data, cfg, pad_id)
    for _ in range(start * cfg.grad_accum):  # the same batch stream as an uninterrupted run
        next(batches)
    model.train()
    total = sum(p.numel() for p in model.parameters())
    n_train = sum(p.numel() for p in params)
    bar = tqdm(total=steps, initial=start, desc=f"finetune {cfg.mode}", disable=not progress)
    t0 = time.time()
    loss_value = float("nan")
    with open(log_path, "a") as logf:
        for step in range(start, steps):
            for g in optimizer.param_groups:
                g["lr"] = cfg.lr * _lr_factor(step, sched)
            optimizer.zero_grad(set_to_none=True)
            loss_value, metrics = 0.0, {}
            for _ in range(cfg.grad_accum):
                batch = _to_device(next(batches), device)
                positions += batch_positions(batch)
                loss, m = loss_fn(model, batch)
                (loss / cfg.grad_accum).backward()
                loss_value += float(loss.detach()) / cfg.grad_accum
                for k, v in (m or {}).items():
                    v = float(v.detach()) if torch.is_tensor(v) else v
                    metrics[k] = metrics.get(k, 0) + v / cfg.grad_accum if isinstance(v, (int, float)) else v
            grad_norm = None
            if cfg.grad_clip:
                grad_norm = float(torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip))
            optimizer.step()
            bar.update(1)
            bar.set_postfix(loss=f"{loss_value:.3f}")
            if (step + 1) % cfg.log_every == 0 or step + 1 == steps:
                row = {"step": step + 1, "loss": loss_value, "lr": optimizer.param_groups[0]["lr"],
                       "positions": positions, "elapsed_s": round(time.time() - t0, 2), **metrics}
                if grad_norm is not None:
                    row["grad_norm"] = grad_norm
                logf.write(json.dumps(row) + "\n")
                logf.flush()
            if (step + 1) % cfg.checkpoint_every == 0 and step + 1 < steps:
                _save_checkpoint(model, optimizer, ckpt, step + 1, {"steps": steps, "positions": positions,
                                                                    "config": cfg.to_json()})
    bar.close()
    model.eval()
    summary = {"mode": cfg.mode, "steps": steps, "positions": positions, "final_loss": loss_value,
               "trainable_parameters": n_train, "parameters": total,
               "added_tokens": dict(getattr(model.config, NEW_TOKENS_ATTR, None) or {}),
               "budget": None if budget is None else {"positions": budget.positions, "label": budget.label},
               "train_seconds": round(time.time() - t0, 1), "device": str(device), "config": cfg.to_json()}
    dtype = getattr(torch, cfg.save_dtype) if cfg.save_dtype else None
    if cfg.mode == "lora":
        save_lora(model, out_dir, dtype=dtype, extra={"training": {k: v for k, v in summary.items() if k != "config"}})
    else:
        sd = None
        if dtype is not None:
            sd = {k: (v.to(dtype) if v.is_floating_point() else v) for k, v in model.state_dict().items()}
        model.save_pretrained(out_dir, state_dict=sd)
        if dtype is not None:  # save_pretrained writes the in-memory dtype: state the stored one
            conf = json.loads((out_dir / "config.json").read_text())
            conf["dtype"] = cfg.save_dtype
            (out_dir / "config.json").write_text(json.dumps(conf, indent=2, sort_keys=True) + "\n")
    if tokenizer is not None and hasattr(tokenizer, "save_pretrained"):
        tokenizer.save_pretrained(out_dir)
    (out_dir / "finetune.json").write_text(json.dumps(summary, indent=1))
    return model


# ---------------------------------------------------------------------------------------------------------- quality
@torch.no_grad()
def greedy_tokens(model, tokenizer, prompts, max_new_tokens: int = 64) -> list[list[int]]:
    """Greedy continuations (new tokens only) of ``prompts`` (strings, or lists of token ids), one prompt at a time
    (no padding, so the result does not depend on batching)."""
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    outs = []
    try:
        for p in prompts:
            ids = tokenizer(p, add_special_tokens=False)["input_ids"] if isinstance(p, str) else list(p)
            x = torch.tensor([ids], dtype=torch.long, device=device)
            pad = getattr(tokenizer, "pad_token_id", None) if tokenizer is not None else None
            y = model.generate(x, attention_mask=torch.ones_like(x), do_sample=False, max_new_tokens=max_new_tokens,
                               pad_token_id=pad if pad is not None else model.config.pad_token_id,
                               num_beams=1, temperature=None, top_p=None, top_k=None)
            outs.append(y[0, x.shape[1]:].tolist())
    finally:
        model.train(was_training)
    return outs


def agreement_with(original, finetuned, tokenizer, prompts, max_new_tokens: int = 64, *,
                   details: bool = False):
    """Share of the original model's greedy tokens that the fine-tuned model's greedy output reproduces, position by
    position (each prompt's continuation compared up to the longer of the two; a missing token counts as a
    mismatch). 1.0 means identical greedy output. With ``details=True`` returns ``{"agreement", "prefix_agreement"
    (mean share of the original's tokens before the first mismatch), "per_prompt"}``."""
    a = greedy_tokens(original, tokenizer, prompts, max_new_tokens)
    b = greedy_tokens(finetuned, tokenizer, prompts, max_new_tokens)
    d = token_agreement(a, b)
    return d if details else d["agreement"]


def token_agreement(reference, outputs) -> dict:
    """The rule of :func:`agreement_with` on ready token lists: ``{"agreement"`` (share of ``reference``'s tokens
    reproduced position by position, each pair compared up to the longer; a missing token is a mismatch),
    ``"prefix_agreement"`` (mean share of the reference before the first mismatch), ``"per_prompt"}``."""
    same, total, per, prefix = 0, 0, [], []
    for x, y in zip(reference, outputs):
        n = max(len(x), len(y))
        s = sum(1 for i in range(min(len(x), len(y))) if x[i] == y[i])
        first = next((i for i in range(min(len(x), len(y))) if x[i] != y[i]), min(len(x), len(y)))
        same, total = same + s, total + n
        per.append(s / n if n else 1.0)
        prefix.append(first / len(x) if x else 1.0)
    agreement = same / total if total else 1.0
    return {"agreement": agreement, "prefix_agreement": sum(prefix) / max(1, len(prefix)), "per_prompt": per}


# ------------------------------------------------------------------------------------------------ end-to-end (CLI)
OBJECTIVES: dict = {"ntp": next_token_loss}
"""Named objectives of :func:`run_finetune` (``hf-decoding-ext finetune --objective NAME``): ``loss_fn`` or
``(loss_fn, batches)`` where ``batches(data, config, tokenizer) -> batches_or_data`` builds the method's own batches
(a builder with a ``model`` keyword also receives the original model, before fine-tuning).
Methods register theirs here (e.g. ``OBJECTIVES["space"] = (space_loss, space_batches)``)."""

OBJECTIVE_MODULES = {"space": "hf_decoding_ext.speculative.space", "s2d": "hf_decoding_ext.speculative.s2d",
                     "sbd": "hf_decoding_ext.speculative.set_block_decoding",
                     "lud": "hf_decoding_ext.speculative.lud"}
"""Objectives registered by a method's module, imported on first use by :func:`run_finetune` (``training`` imports
nothing from the method families at import time)."""


def resolve_objective(name: str):
    """The :data:`OBJECTIVES` entry ``name``, importing the method module that registers it
    (:data:`OBJECTIVE_MODULES`) on first use; ``ValueError`` for an unknown name."""
    if name not in OBJECTIVES and name in OBJECTIVE_MODULES:
        import importlib

        importlib.import_module(OBJECTIVE_MODULES[name])
    if name not in OBJECTIVES:
        raise ValueError(f"objective must be one of {sorted(set(OBJECTIVES) | set(OBJECTIVE_MODULES))}, got {name!r}")
    return OBJECTIVES[name]


def run_finetune(base: str | None = None, out: str = "finetuned", *, objective: str = "ntp",
                 prompts: int | None = None, max_new_tokens: int = 256, gen_batch_size: int = 16, work_dir=None,
                 log_file=None, progress: bool = True, agreement_prompts: int = 0, **config_options):
    """Fine-tune ``base`` (``None``: the embedded default model) on its self-distillation data (the responses cached
    by the head pipeline, :func:`~hf_decoding_ext.training.pipeline.prepare_data`) with a named objective and save
    it to ``out``; ``config_options`` are :class:`FineTuneConfig` fields. A rerun resumes from ``out/checkpoint``.
    With ``agreement_prompts`` > 0, the greedy agreement with the original model on that many held-out prompts is
    written to ``out/finetune.json`` (for the model card). Returns the fine-tuned model (LoRA-wrapped in lora mode).
    """
    from dataclasses import fields

    from hf_decoding_ext.core.models import DEFAULT_MODEL, load_model
    from hf_decoding_ext.training.pipeline import _logger, prepare_data

    valid = {f.name for f in fields(FineTuneConfig)}
    unknown = sorted(set(config_options) - valid)
    if unknown:
        raise ValueError(f"unknown fine-tuning option(s) {unknown}; valid: {sorted(valid)}")
    resolve_objective(objective)
    cfg = FineTuneConfig(**config_options)
    log = _logger(log_file)
    base_name = base or DEFAULT_MODEL
    model, tokenizer = load_model(base)
    model.eval()
    data = prepare_data(model, tokenizer, base_name, prompts=prompts, max_new_tokens=max_new_tokens,
                        batch_size=gen_batch_size, work_dir=work_dir, log=log, progress=progress)
    log(f"data: {len(data.train)} train / {len(data.heldout)} held-out sequences; fine-tuning {cfg}")
    spec = OBJECTIVES[objective]
    loss_fn, make_batches = spec if isinstance(spec, tuple) else (spec, None)
    if make_batches is None:
        source = data
    elif "model" in inspect.signature(make_batches).parameters:  # builders that read the original model
        source = make_batches(data, cfg, tokenizer, model=model)
    else:
        source = make_batches(data, cfg, tokenizer)
    torch.set_grad_enabled(True)
    tuned = finetune(model, tokenizer, source, loss_fn, out, cfg, progress=progress)
    if agreement_prompts:
        original, _ = load_model(base)
        prompts_ids = [s.input_ids[:s.response_start].tolist() for s in data.heldout[:agreement_prompts]]
        d = agreement_with(original, tuned, tokenizer, prompts_ids, max_new_tokens=min(64, max_new_tokens),
                           details=True)
        summary = json.loads((Path(out) / "finetune.json").read_text())
        summary["agreement_with_original"] = {"prompts": len(prompts_ids), "agreement": round(d["agreement"], 4),
                                              "prefix_agreement": round(d["prefix_agreement"], 4)}
        (Path(out) / "finetune.json").write_text(json.dumps(summary, indent=1))
        log(f"greedy agreement with the original: {d['agreement']:.4f}")
    log(f"done: saved to {out}")
    return tuned
