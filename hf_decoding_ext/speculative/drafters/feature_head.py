"""Shared drafter machinery for trained heads that read the target model's features (Medusa, Hydra, MLP
speculator, EAGLE-style drafters).

The engine hands the drafter the target's last-layer features of every verified position; the drafter keeps the
features of the committed sequence (all but the last, not yet verified token). At each step the head drafts from
the feature ``h_j`` of the last verified position ``j`` and the known next token ``x_{j+1}`` (the previous step's
bonus token, the root of the draft tree): depth ``d`` of the tree holds candidates for ``x_{j+1+d}``. The tree's
shape is a list of candidate-rank paths (Medusa's "choices"), by default derived from the head's measured
accuracies (:func:`~hf_decoding_ext.core.tree.choices_from_accuracies`), filled depth by depth so that
conditioned heads batch all parents of a depth in one call.
"""

from __future__ import annotations

import abc
from pathlib import Path

import torch

from hf_decoding_ext.core.resources import data_path
from hf_decoding_ext.core.tree import DraftTree, build_choice_tree, choices_from_accuracies, normalize_choices
from hf_decoding_ext.speculative.drafters.base import Draft, Drafter, VerifyResult
from hf_decoding_ext.speculative.heads import head_classes
from hf_decoding_ext.speculative.policies.tree_policy import ACCELERATOR_MAX_NODES, NodeBudget

SHIPPED = {kind: cls.shipped_name for kind, cls in head_classes().items() if cls.shipped_name}
"""Checkpoints shipped in the package (``hf_decoding_ext/data/heads/<name>``), trained on SmolLM2-135M-Instruct:
head kind -> folder name, read from the head classes' ``shipped_name`` declarations."""

CPU_MAX_NODES = 3
"""Fallback tree size of ``max_nodes="auto"`` on CPU, used only when no verify-cost curve can be measured for the
model (``"auto"`` otherwise sizes the tree from the curve measured on the running device and the head's held-out
accuracies, :meth:`FeatureHeadDrafter.expected_gains`). It is the fastest size of an end-to-end sweep made with the
engine's older weight-left kernel (``results/trained-heads_tree_size.json``, 6 prompts x 128 tokens: 3 nodes for all
four heads, against 4 and 10)."""

DEFAULT_MAX_NODES = "auto"
"""Default ``max_nodes`` of the feature-head drafters: sized from the measured verify-cost curve (fallbacks
:data:`CPU_MAX_NODES` on CPU, :data:`ACCELERATOR_MAX_NODES`
elsewhere (:data:`~hf_decoding_ext.speculative.policies.tree_policy.ACCELERATOR_MAX_NODES`, re-exported here))."""


def shipped_head_path(kind: str) -> Path:
    """Folder of the checkpoint shipped for ``kind`` (``"medusa"``, ``"hydra"``, ``"mlp-speculator"``,
    ``"eagle"``)."""
    if kind not in SHIPPED:
        raise ValueError(f"no shipped head of kind {kind!r}; known: {sorted(SHIPPED)}")
    return data_path("heads", SHIPPED[kind])


def load_head(head, head_class, kind: str | None = None, **from_pretrained_kwargs):
    """A head object from an instance, ``None``/``"shipped"`` (the packaged checkpoint of ``kind``, by default the
    class's declared ``head_kind``), a local folder or a Hub id (through the Hugging Face cache; offline once
    cached)."""
    if isinstance(head, head_class):
        return head
    kind = kind or head_class.head_kind
    if head is None or head == "shipped":
        path = shipped_head_path(kind)
        if not (path / "config.json").exists():
            raise ValueError(f"the shipped {kind} checkpoint is missing at {path}")
        return head_class.from_pretrained(str(path), **from_pretrained_kwargs)
    if isinstance(head, (str, Path)):
        return head_class.from_pretrained(str(head), **from_pretrained_kwargs)
    raise ValueError(f"head must be a {head_class.__name__}, a path, a Hub id or 'shipped', got "
                     f"{type(head).__name__}")


class FeatureHeadDrafter(Drafter):
    """Base class of drafters driven by a trained head over the target's features.

    Subclasses implement :meth:`prepare` (per-step work from the last feature and root token) and :meth:`topk`
    (ranked candidates for the children of given tree nodes). ``tree_choices`` overrides the head's default tree;
    ``max_nodes`` trims the default tree (derived from the head's measured accuracies) to that many nodes;
    ``"auto"`` sizes it at each ``generate()`` call from the verify-cost curve measured on the target's device and the
    head's accuracies (:data:`CPU_MAX_NODES` / :data:`ACCELERATOR_MAX_NODES` without a curve); ``None`` keeps the
    head's whole default tree.
    """

    needs = frozenset({"last_hidden_state"})
    head_class = None
    """The :class:`~hf_decoding_ext.speculative.heads.base.DraftHeadModel` subclass the drafter reads: its first
    argument may then be an instance, ``"shipped"`` (the packaged checkpoint of the class's ``head_kind``), a folder
    or a Hub id (:func:`load_head`)."""
    attach_in_for_model = True
    """Whether :meth:`for_model` attaches the head to the model at once (``False``: at the first ``generate()``)."""

    def __init__(self, heads="shipped", tree_choices=None, max_nodes: int | str | None = DEFAULT_MAX_NODES):
        self.budget = NodeBudget(max_nodes, cpu=CPU_MAX_NODES, accelerator=ACCELERATOR_MAX_NODES)
        self.head = heads if self.head_class is None else load_head(heads, self.head_class)
        self.head.eval()
        self.max_nodes = max_nodes
        self.tree_choices = tree_choices
        self._size = self.budget.resolve("cpu")  # "auto": the CPU size until a generate() call sees the device
        self.choices = self._resolve_choices(tree_choices)
        self.last_feature: torch.Tensor | None = None
        self._model_id = None

    @classmethod
    def for_model(cls, model=None, tokenizer=None, **kwargs):
        """Build for ``model`` with the class's own arguments (``heads``, ``tree_choices``, ``max_nodes``, ...): the
        head is attached to it now (:attr:`attach_in_for_model`) or at the first ``generate()``."""
        drafter = cls(**kwargs)
        if model is not None and cls.attach_in_for_model:
            drafter.head.attach(model)
        return drafter

    # ------------------------------------------------------------------------------------------------ tree shape
    @property
    def max_depth(self) -> int:
        return self.head.depth

    def _resolve_choices(self, tree_choices):
        if tree_choices is not None:
            choices = normalize_choices(tree_choices)
        else:
            acc = self.head.config.head_accuracies
            if acc:
                n = self._size or len(self.head.config.tree_choices or []) or ACCELERATOR_MAX_NODES
                choices = choices_from_accuracies(acc, n, max_depth=self.max_depth)
            elif self.head.config.tree_choices:
                choices = normalize_choices(self.head.config.tree_choices)
            else:  # an untrained head: a chain with a few alternatives at the first depths
                prior = [[0.6 * 0.4 ** i for i in range(4)] for _ in range(self.max_depth)]
                choices = choices_from_accuracies(prior, self._size or ACCELERATOR_MAX_NODES,
                                                  max_depth=self.max_depth)
        if self._size is not None and tree_choices is None:
            choices = choices[: self._size]
        deepest = max(len(c) for c in choices)
        if deepest > self.max_depth:
            raise ValueError(f"tree choices reach depth {deepest}, the head drafts {self.max_depth} tokens")
        return choices

    def expected_gains(self, max_nodes: int = 64) -> list[float] | None:
        """Expected acceptance of each node of the head's best-first tree, in pick order: the path products of the
        per-depth accuracies measured on held-out self-distillation data (``head_accuracies``), the acceptance
        statistics ``max_nodes="auto"`` sizes the tree with (``None`` without measured accuracies or with explicit
        ``tree_choices``)."""
        acc = self.head.config.head_accuracies
        if not acc or self.tree_choices is not None:
            return None
        paths = choices_from_accuracies(acc, max_nodes, max_depth=self.max_depth)
        values = []
        for path in paths:
            value = 1.0
            for depth, rank in enumerate(path):
                value *= float(acc[depth][rank])
            values.append(value)
        return sorted(values, reverse=True)

    # ------------------------------------------------------------------------------------------------ engine hooks
    def begin(self, state) -> None:
        if self._model_id != id(state.model) or not self.head.attached:
            self.head.attach(state.model)
            self._model_id = id(state.model)
        if self.budget.is_auto:
            size = self.budget.resolve(state.model.device, gains=self.expected_gains(), model=state.model)
            if size != self._size:
                self._size = size
                self.choices = self._resolve_choices(self.tree_choices)
        self.last_feature = None
        self.reset_sequence(state)

    def reset_sequence(self, state) -> None:
        """Per-generation state of subclasses."""

    def kernel_modules(self) -> list:
        return [self.head]

    def observe(self, state, result: VerifyResult) -> None:
        hidden = result.hidden_states
        side = 0 if result.draft.side_tokens is None else result.draft.side_tokens.numel()
        s = hidden.shape[0] - len(result.draft.tree) - side  # uncached committed tokens, then the block
        parts = [hidden[:s]]
        if result.accepted:
            parts.append(hidden[s + torch.tensor(result.accepted, device=hidden.device)])
        feats = torch.cat(parts)
        self.on_features(state, feats, result)
        self.last_feature = feats[-1]

    def on_features(self, state, features: torch.Tensor, result: VerifyResult) -> None:
        """Features ``(m, hidden)`` of the positions newly verified and kept (committed tokens, accepted nodes)."""

    def propose(self, state) -> Draft:
        if self.last_feature is None:  # first step: the prompt has not been through the target yet
            return Draft(DraftTree.empty())
        with torch.inference_mode():
            self.prepare(state, self.last_feature, state.input_ids[0, -1])
            tree = build_choice_tree(self.choices, self.topk, self.on_level)
        return Draft(tree)

    @abc.abstractmethod
    def prepare(self, state, feature: torch.Tensor, root_token: torch.Tensor) -> None:
        """Per-step work before the tree is filled: ``feature`` is ``h_j`` ``(hidden,)``, ``root_token`` is
        ``x_{j+1}``."""

    def on_level(self, depth: int, nodes: list[int], parents: list[int], tokens: list[int]) -> None:
        """Called after each depth of the tree is filled (node indices, their parents and tokens)."""

    @abc.abstractmethod
    def topk(self, depth: int, parents: list[int], k: int) -> torch.Tensor:
        """``(len(parents), k)`` ranked candidate token ids for the children of ``parents`` (``-1`` = root)."""
