"""Trained draft heads, one class per kind; each class declares its kind, training defaults and shipped checkpoint.

The declarations (:class:`~hf_decoding_ext.speculative.heads.base.DraftHeadModel`'s ``head_kind``,
``training_defaults``, ``shipped_recipe``, ``shipped_name``, ``drafter``, ...) are the one place per kind that the
training pipeline, the ``train`` command, the shipped-checkpoint table and the model-card writer read: adding a head
kind is adding its class to :data:`HEAD_CLASSES` (an extension may append to it), with no per-kind branch elsewhere.

Nothing is imported until :func:`head_classes` is called, so importing this package stays cheap.

Example:
    >>> from hf_decoding_ext.speculative.heads import head_class, head_classes
    >>> list(head_classes())
    ['medusa', 'hydra', 'mlp-speculator', 'eagle']
    >>> head_class("eagle").training_defaults
    {'lr': 0.0005, 'batch_size': 8}
"""

from __future__ import annotations

from hf_decoding_ext.registry import import_target

HEAD_CLASSES: list[str] = [
    "hf_decoding_ext.speculative.heads.medusa:MedusaHeads",
    "hf_decoding_ext.speculative.heads.hydra:HydraHeads",
    "hf_decoding_ext.speculative.heads.mlp_speculator:MLPSpeculator",
    "hf_decoding_ext.speculative.heads.eagle:EagleDrafterModel",
    # Issue 23 kinds: each line is uncommented by its author once the class imports and its tiny tests pass
    # (one broken import here breaks every kind).
    # >>> HEAD blockwise
    "hf_decoding_ext.speculative.heads.blockwise:BlockwiseHeads",
    # <<< HEAD blockwise
    # >>> HEAD chimera
    "hf_decoding_ext.speculative.heads.chimera:ChimeraModel",
    # <<< HEAD chimera
    # >>> HEAD clover
    "hf_decoding_ext.speculative.heads.clover:CloverModel",
    # <<< HEAD clover
    # >>> HEAD jakiro
    "hf_decoding_ext.speculative.heads.jakiro:JakiroDrafterModel",
    # <<< HEAD jakiro
    # >>> HEAD hidden-transfer
    "hf_decoding_ext.speculative.heads.hidden_transfer:HiddenTransfer",
    # <<< HEAD hidden-transfer
    # >>> HEAD ppd
    "hf_decoding_ext.speculative.heads.ppd:PromptTokens",
    # <<< HEAD ppd
    # >>> HEAD longspec
    "hf_decoding_ext.speculative.heads.longspec:LongSpecDrafterModel",
    # <<< HEAD longspec
]
"""``"module:Class"`` of every head class, in the order the kinds are listed."""

RECIPES = ("defaults", "shipped")
"""Starting points of a training run: a head class's ``training_defaults``, or ``"shipped"``: the options its
shipped checkpoint was trained with (``shipped_recipe``) over those defaults."""


def head_classes() -> dict[str, type]:
    """``{kind: head class}`` from the classes' ``head_kind`` declarations (``ValueError`` on a missing or repeated
    kind)."""
    out: dict[str, type] = {}
    for target in HEAD_CLASSES:
        cls = import_target(target)
        kind = cls.__dict__.get("head_kind")
        if not kind:
            raise ValueError(f"{target} declares no head_kind")
        if kind in out:
            raise ValueError(f"head kind {kind!r} is declared by both {out[kind].__name__} and {cls.__name__}")
        out[kind] = cls
    return out


def head_class(kind: str) -> type:
    """The head class of ``kind``; unknown kinds raise a ``ValueError`` listing the known ones."""
    classes = head_classes()
    if kind not in classes:
        raise ValueError(f"unknown head kind {kind!r}; known: {sorted(classes)}")
    return classes[kind]

