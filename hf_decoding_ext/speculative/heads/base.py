"""Shared base of trained draft heads: a ``PreTrainedModel`` that borrows the base model's embeddings and lm_head.

A draft head (Medusa, Hydra, MLP speculator, EAGLE-style drafter) reads the target model's last-layer features
(after the final norm, the lm_head's input) and proposes future tokens through the *base model's* frozen lm_head,
so a checkpoint holds only the head's own weights (a few MB). The head is a regular ``PreTrainedModel``:
``save_pretrained`` writes ``config.json`` + ``model.safetensors``, ``from_pretrained`` loads a folder or a Hub id
(through the Hugging Face cache, so it works offline once cached) and ``push_to_hub`` publishes it.

Draft vocabulary (VocabTrim, arXiv 2506.22694; EAGLE-3's ``d2t``): the head may score only the ``draft_vocab_size``
most frequent tokens of its training data, rows of the base lm_head picked by the saved ``d2t`` buffer (draft index
-> target token id). On CPU the full 49152-row lm_head costs ~20% of a SmolLM2-135M forward per draft call; a
trimmed head costs a fraction of that. Tokens outside the draft vocabulary are never drafted (drafting is lossless
either way: the target verifies every token).

Attach the base model before use: ``head.attach(model)`` (the drafters do it). The base weights are referenced, not
copied, and are not part of the head's ``state_dict``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from transformers import PretrainedConfig, PreTrainedModel


class DraftHeadConfig(PretrainedConfig):
    """Configuration shared by the draft heads.

    Args:
        hidden_size: the base model's hidden size (feature width).
        vocab_size: the base model's vocabulary size.
        draft_vocab_size: rows of the lm_head the head scores (``None``: the full vocabulary).
        base_model_name_or_path: the base (target) model the head was trained for.
        tree_choices: the default draft tree, a list of candidate-rank paths (``[[0], [1], [0, 0], ...]``), derived
            from the measured per-depth accuracies (:func:`~hf_decoding_ext.core.tree.choices_from_accuracies`).
        head_accuracies: measured top-k accuracies per depth on held-out data: ``head_accuracies[d][i]`` is the
            probability that the rank-``i`` candidate at depth ``d + 1`` is the target's greedy token given a correct
            prefix.
        training: free-form record of the training run (data, steps, losses), kept for the model card.
    """

    model_type = "hf_decoding_ext_draft_head"

    def __init__(self, hidden_size: int = 576, vocab_size: int = 49152, draft_vocab_size: int | None = None,
                 base_model_name_or_path: str | None = None, tree_choices: list | None = None,
                 head_accuracies: list | None = None, training: dict | None = None, **kwargs):
        super().__init__(**kwargs)
        self.hidden_size = hidden_size
        self.vocab_size = vocab_size
        self.draft_vocab_size = draft_vocab_size
        self.base_model_name_or_path = base_model_name_or_path
        self.tree_choices = [list(c) for c in tree_choices] if tree_choices else None
        self.head_accuracies = head_accuracies
        self.training = training or {}


class DraftHeadModel(PreTrainedModel):
    """Base class of draft heads (see the module docstring).

    Each head class declares what the rest of the library needs to know about its kind, as class attributes; the
    training pipeline, the ``train`` command, the shipped-checkpoint table
    (:data:`~hf_decoding_ext.speculative.drafters.feature_head.SHIPPED`) and the model-card writer read them
    (:func:`hf_decoding_ext.speculative.heads.head_classes` lists the head classes by kind).
    """

    config_class = DraftHeadConfig
    base_model_prefix = "draft_head"
    main_input_name = "hidden_states"
    _no_split_modules: list[str] = []

    # ------------------------------------------------------------------------------------------------ declarations
    head_kind: str = ""
    """The kind's name: ``hf-decoding-ext train <kind>``, ``publish <kind>``, ``shipped_head_path(kind)``."""
    display_name: str = ""
    """What the head is, in a few words (the model card's first line)."""
    method: str = ""
    """The registry name of the method the head drafts for (:func:`~hf_decoding_ext.registry.get_method`)."""
    drafter: str = ""
    """``"module:Class"`` of the drafter that runs the head in the speculative engine."""
    shipped_name: str | None = None
    """Folder of the checkpoint shipped in ``hf_decoding_ext/data/heads/`` (``None``: none shipped)."""
    training_defaults: dict = {}
    """:class:`~hf_decoding_ext.training.trainer.TrainConfig` fields this kind trains with by default (the
    ``train`` command's options override them)."""
    shipped_recipe: dict = {}
    """The options the shipped checkpoint was trained with (``train <kind> --recipe shipped``): ``TrainConfig``
    fields, plus ``head_options`` (head config options) and ``save_dtype``."""
    card_config_keys: tuple[str, ...] = ()
    """Config attributes describing the head's shape, quoted by the model card."""
    feature_layers: tuple[int, ...] = ()
    """Intermediate hidden states the head trains on besides the last-layer features (``hidden_states`` indices:
    ``i`` = output of decoder layer ``i - 1``); the pipeline caches them once
    (:func:`~hf_decoding_ext.training.data.extract_layer_features`) and batches carry them as ``layer<i>``."""

    @classmethod
    def load_drafter_class(cls) -> type:
        """Import and return the class named by :attr:`drafter`."""
        from hf_decoding_ext.registry import import_target

        return import_target(cls.drafter)

    def __init__(self, config: DraftHeadConfig):
        super().__init__(config)
        n = config.draft_vocab_size or config.vocab_size
        if not 0 < n <= config.vocab_size:
            raise ValueError(f"draft_vocab_size must be in [1, {config.vocab_size}], got {n}")
        self.register_buffer("d2t", torch.arange(n, dtype=torch.long), persistent=True)
        self._base: dict = {}

    def _init_weights(self, module):
        if isinstance(module, nn.Linear):
            nn.init.normal_(module.weight, std=0.02)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.LayerNorm):
            nn.init.ones_(module.weight)
            nn.init.zeros_(module.bias)

    # ------------------------------------------------------------------------------------------------ base model
    def attach(self, base_model) -> DraftHeadModel:
        """Borrow ``base_model``'s input embeddings and lm_head (frozen, not copied); move the head to the base
        model's device and dtype. Returns ``self``."""
        emb = base_model.get_input_embeddings()
        head = base_model.get_output_embeddings()
        if emb is None or head is None:
            raise ValueError(f"{type(base_model).__name__} has no input embeddings or lm_head to share")
        if head.weight.shape[1] != self.config.hidden_size:
            raise ValueError(f"the head was built for hidden size {self.config.hidden_size}, the base model has "
                             f"{head.weight.shape[1]}")
        if head.weight.shape[0] < int(self.d2t.max()) + 1 or head.weight.shape[0] != self.config.vocab_size:
            raise ValueError(f"the head was built for a vocabulary of {self.config.vocab_size}, the base model has "
                             f"{head.weight.shape[0]}")
        p = next(iter(base_model.parameters()))
        self.to(device=p.device, dtype=p.dtype)
        self._base = {"model_id": id(base_model), "embedding": emb, "lm_head": head, "weight": None,
                      "model": base_model}
        return self

    def target_model(self):
        """The base model the head is attached to (held by reference: never a submodule, so the head's
        ``state_dict`` and parameters stay its own). For heads that run part of the target themselves."""
        return self._require_base()["model"]

    @property
    def attached(self) -> bool:
        return bool(self._base)

    def _require_base(self):
        if not self._base:
            raise RuntimeError(f"{type(self).__name__} is not attached to a base model: call head.attach(model)")
        return self._base

    def embed(self, ids: torch.Tensor) -> torch.Tensor:
        """Base-model embeddings of ``ids`` (no gradient to the base)."""
        with torch.no_grad():
            return self._require_base()["embedding"](ids)

    def draft_weight(self) -> torch.Tensor:
        """The lm_head rows of the draft vocabulary ``(draft_vocab, hidden)`` (cached, detached)."""
        base = self._require_base()
        w = base["weight"]
        if w is None or w.device != self.d2t.device or w.shape[0] != self.d2t.shape[0]:
            full = base["lm_head"].weight.detach()
            w = full if self.d2t.shape[0] == full.shape[0] else full[self.d2t.to(full.device)]
            base["weight"] = w
        return w

    def draft_logits(self, features: torch.Tensor) -> torch.Tensor:
        """Logits over the draft vocabulary ``(..., draft_vocab)`` for features ``(..., hidden)``."""
        w = self.draft_weight()
        return F.linear(features.to(w.dtype), w)

    def to_target(self, draft_ids: torch.Tensor) -> torch.Tensor:
        """Map draft-vocabulary indices to target token ids."""
        return self.d2t[draft_ids]

    def set_draft_vocab(self, token_ids: torch.Tensor) -> None:
        """Restrict the head to ``token_ids`` (target ids, most frequent first); updates the config."""
        token_ids = torch.as_tensor(token_ids, dtype=torch.long).reshape(-1)
        if token_ids.numel() == 0 or token_ids.unique().numel() != token_ids.numel():
            raise ValueError("the draft vocabulary must be non-empty and without repeats")
        if int(token_ids.max()) >= self.config.vocab_size or int(token_ids.min()) < 0:
            raise ValueError("draft vocabulary ids must be valid target token ids")
        self.d2t = token_ids.to(self.d2t.device)
        self.config.draft_vocab_size = int(token_ids.numel())
        if self._base:
            self._base["weight"] = None

    def target_to_draft(self) -> torch.Tensor:
        """``(vocab,)`` map target id -> draft index, ``-100`` for ids outside the draft vocabulary."""
        t2d = torch.full((self.config.vocab_size,), -100, dtype=torch.long, device=self.d2t.device)
        t2d[self.d2t] = torch.arange(self.d2t.shape[0], device=self.d2t.device)
        return t2d

    def num_own_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())

    # ------------------------------------------------------------------------------------------------ training data
    depth_key: str = "num_heads"
    """Config attribute holding the number of tokens the head drafts (each head class names its own)."""

    @property
    def depth(self) -> int:
        """Number of tokens the head drafts after the root (tree depth)."""
        return int(getattr(self.config, self.depth_key))

    def train_batches(self, seqs, batch_size: int, seed: int = 0):
        """Endless random mini-batches for :meth:`training_loss`. Position heads (the default) train on single
        positions: ``{"hidden": (B, hidden), "tokens": (B, 1 + depth)}`` (see
        :func:`~hf_decoding_ext.training.data.position_examples`)."""
        from hf_decoding_ext.training.data import position_examples

        hidden, tokens = position_examples(seqs, self.depth)
        g = torch.Generator().manual_seed(seed)
        n = hidden.shape[0]
        while True:
            perm = torch.randperm(n, generator=g)
            for i in range(0, n - batch_size + 1 if n >= batch_size else 1, batch_size):
                idx = perm[i:i + batch_size]
                yield {"hidden": hidden[idx].to(self.device), "tokens": tokens[idx].to(self.device)}

    def batch_positions(self, batch: dict) -> int:
        """Supervised target positions in a training batch (what a
        :class:`~hf_decoding_ext.training.budget.TrainingBudget` counts): position batches count examples with a
        depth-1 target, sequence batches their valid positions after the first; a head with another batch format
        overrides this."""
        if "tokens" in batch:
            return int((batch["tokens"][:, 1] >= 0).sum())
        if "valid" in batch:
            return int(batch["valid"][:, 1:].sum())
        raise NotImplementedError(f"{type(self).__name__} must say how many positions a batch supervises")

    def eval_batches(self, seqs, batch_size: int):
        from hf_decoding_ext.training.data import position_examples

        hidden, tokens = position_examples(seqs, self.depth)
        for i in range(0, hidden.shape[0], batch_size):
            yield {"hidden": hidden[i:i + batch_size].to(self.device), "tokens": tokens[i:i + batch_size].to(self.device)}


class ResBlock(nn.Module):
    """``x + SiLU(W x + b)`` (Medusa, Cai et al. 2024)."""

    def __init__(self, hidden_size: int):
        super().__init__()
        self.linear = nn.Linear(hidden_size, hidden_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + F.silu(self.linear(x))
