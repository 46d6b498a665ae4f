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


LAYER_KEYS = ("hidden_size", "intermediate_size", "num_attention_heads", "num_key_value_heads", "head_dim",
              "rms_norm_eps", "max_position_embeddings", "hidden_act")
"""Base-config keys of one Llama decoder layer's geometry (:meth:`DecoderLayerConfig.from_base_config`)."""


class DecoderLayerConfig(DraftHeadConfig):
    """Configuration of heads that run Llama decoder layers with the base model's layer geometry (EAGLE, Jakiro,
    LongSpec, Clover, Chimera).

    Args:
        layer_config: keyword arguments of the Llama decoder layer (``hidden_size``, ``intermediate_size``,
            ``num_attention_heads``, ``num_key_value_heads``, ``head_dim``, ``rms_norm_eps``, ``rope_theta``,
            ``max_position_embeddings``); by default copied from the base model (:meth:`from_base_config`).
    """

    layer_keys = LAYER_KEYS
    """The base-config keys :meth:`from_base_config` copies (a subclass may add some)."""

    def __init__(self, layer_config: dict | None = None, **kwargs):
        super().__init__(**kwargs)
        self.layer_config = dict(layer_config or {})

    def from_base_config(self, base_config) -> None:
        """Copy the decoder-layer geometry of the base model (entries already in ``layer_config`` win)."""
        d = base_config.to_dict()
        layer = {k: d[k] for k in self.layer_keys if d.get(k) is not None}
        layer["hidden_size"] = self.hidden_size
        rope = d.get("rope_parameters") or {}
        theta = rope.get("rope_theta", d.get("rope_theta"))
        if theta is not None:
            layer["rope_theta"] = float(theta)
        self.layer_config = {**layer, **self.layer_config}

    def llama_config(self):
        """A one-layer ``LlamaConfig`` of this geometry (SDPA attention)."""
        from transformers import LlamaConfig

        lc = {k: v for k, v in self.layer_config.items() if k != "num_hidden_layers"}
        lc.setdefault("hidden_size", self.hidden_size)
        lc.setdefault("intermediate_size", 4 * self.hidden_size)
        lc.setdefault("num_attention_heads", max(1, self.hidden_size // 64))
        theta = lc.pop("rope_theta", 10000.0)
        cfg = LlamaConfig(vocab_size=self.vocab_size, num_hidden_layers=1,
                          rope_parameters={"rope_type": "default", "rope_theta": theta}, **lc)
        cfg._attn_implementation = "sdpa"
        return cfg


class SequenceHeadConfig(DecoderLayerConfig):
    """Configuration of heads trained on whole sequences with a fixed number of drafted tokens (Clover, Chimera).

    Args:
        layer_config: see :class:`DecoderLayerConfig`.
        num_heads: tokens drafted after the root (tree depth).
        sequence_length: training sequences are cut to their last ``sequence_length`` tokens.
    """

    def __init__(self, layer_config: dict | None = None, num_heads: int = 4, sequence_length: int = 512, **kwargs):
        super().__init__(layer_config=layer_config, **kwargs)
        if isinstance(num_heads, bool) or not isinstance(num_heads, int) or num_heads < 1:
            raise ValueError(f"num_heads must be an integer >= 1, got {num_heads!r}")
        if isinstance(sequence_length, bool) or not isinstance(sequence_length, int) or sequence_length < 4:
            raise ValueError(f"sequence_length must be an integer >= 4, got {sequence_length!r}")
        self.num_heads = num_heads
        self.sequence_length = sequence_length


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

    @classmethod
    def untrained(cls, model, noise: float = 0.0, seed: int = 0, **options):
        """A new head of this class sized for ``model`` (config ``options``; the base decoder-layer geometry where
        the config copies it) and attached to it; ``noise > 0`` perturbs every weight by a seeded Gaussian (a
        trained-looking head for mechanism tests). The global random state is left untouched.

        Example:
            >>> head = CloverModel.untrained(model, num_heads=3)  # doctest: +SKIP
        """
        cfg = cls.config_class(hidden_size=model.config.hidden_size,
                               vocab_size=model.get_output_embeddings().weight.shape[0], **options)
        if isinstance(cfg, DecoderLayerConfig):
            cfg.from_base_config(model.config)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            head = cls(cfg).attach(model)
            if noise:
                with torch.no_grad():
                    for p in head.parameters():
                        p.add_(torch.randn_like(p) * noise)
        return head.eval()

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


class SequenceBatchesMixin:
    """Whole-sequence batches (:func:`~hf_decoding_ext.training.data.collate_sequences`, right-padded, cut to the
    last ``max_length`` tokens: by default the config's ``sequence_length``, else 512) for heads trained by teacher
    forcing over sequences (EAGLE, Jakiro, LongSpec, Clover, Chimera), with the target helpers they share."""

    def _max_length(self, max_length: int | None) -> int:
        return int(max_length or getattr(self.config, "sequence_length", 512))

    def sequence_batches(self, seqs, batch_size: int, generator: torch.Generator, max_length: int | None = None):
        """Endless batches of ``batch_size`` sequences in an order reshuffled each pass by ``generator``."""
        while True:
            perm = torch.randperm(len(seqs), generator=generator).tolist()
            for i in range(0, len(perm) - batch_size + 1 if len(perm) >= batch_size else 1, batch_size):
                yield self._collate([seqs[j] for j in perm[i:i + batch_size]], max_length)

    def train_batches(self, seqs, batch_size: int, seed: int = 0, max_length: int | None = None):
        return self.sequence_batches(seqs, batch_size, torch.Generator().manual_seed(seed), max_length)

    def eval_batches(self, seqs, batch_size: int, max_length: int | None = None):
        per = max(1, batch_size // 128)
        for i in range(0, len(seqs), per):
            yield self._collate(seqs[i:i + per], max_length)

    def _collate(self, seqs, max_length: int | None = None) -> dict:
        from hf_decoding_ext.training.data import collate_sequences

        return collate_sequences(seqs, self._max_length(max_length), self.config.hidden_size, self.device,
                                 self.feature_layers)

    @staticmethod
    def depth_targets(batch: dict, d: int) -> torch.Tensor:
        """``(B, T)`` target of depth ``d`` at anchor ``j``: the target's greedy token after ``x_{j+d}``
        (``labels[j + d]``), ``-100`` past the end or where absent."""
        labels, valid = batch["labels"], batch["valid"]
        b, t = labels.shape
        out = torch.full_like(labels, -100)
        if d < t:
            ok = valid[:, d:] & valid[:, :t - d] & (labels[:, d:] >= 0)
            out[:, :t - d] = torch.where(ok, labels[:, d:], torch.full_like(labels[:, d:], -100))
        return out

    @staticmethod
    def shifted_ids(ids: torch.Tensor, d: int) -> torch.Tensor:
        """``ids[:, j + d]`` at anchor ``j`` (zeros past the end)."""
        out = torch.zeros_like(ids)
        if d < ids.shape[1]:
            out[:, : ids.shape[1] - d] = ids[:, d:]
        return out


class ResBlock(nn.Module):
    """``x + SiLU(W x + b)`` (Medusa, Cai et al. 2024)."""

    def __init__(self, hidden_size: int):
        super().__init__()
        self.linear = nn.Linear(hidden_size, hidden_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + F.silu(self.linear(x))
