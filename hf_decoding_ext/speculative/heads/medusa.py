"""Medusa-1 heads (Cai et al., "Medusa: Simple LLM Inference Acceleration Framework with Multiple Decoding Heads",
arXiv 2401.10774)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from hf_decoding_ext.speculative.heads.base import DraftHeadConfig, DraftHeadModel, ResBlock


class MedusaConfig(DraftHeadConfig):
    """Configuration of :class:`MedusaHeads`.

    Args:
        num_heads: number of Medusa heads; head ``k`` predicts the token ``k + 1`` positions after the one the base
            lm_head predicts (the paper uses 4-5).
        num_layers: residual blocks per head (the paper: 1).
        loss_decay: weight ``loss_decay ** k`` of head ``k``'s loss (the paper's lambda_k = 0.8^k).
    """

    model_type = "hf_decoding_ext_medusa"

    def __init__(self, num_heads: int = 4, num_layers: int = 1, loss_decay: float = 0.8, **kwargs):
        super().__init__(**kwargs)
        if num_heads < 1 or num_layers < 1:
            raise ValueError("num_heads and num_layers must be >= 1")
        self.num_heads = num_heads
        self.num_layers = num_layers
        self.loss_decay = loss_decay


class MedusaHeads(DraftHeadModel):
    """Medusa-1 heads: ``num_heads`` stacks of residual blocks ``x + SiLU(W x + b)`` over the base model's last
    feature, each followed by the base model's frozen lm_head (shared, not stored; Medusa-1 keeps the backbone
    frozen). Head ``k`` at position ``t`` predicts token ``t + k + 1`` (the base lm_head predicts ``t + 1``).
    Blocks start at zero so an untrained head repeats the base model's prediction (the paper's initialisation).

    Deviation from the paper: the paper gives every head its own copy of the lm_head (initialised from the base);
    here the base lm_head is shared and frozen, as the issue asks, which keeps a checkpoint at ~1.3 M parameters per
    head for SmolLM2-135M instead of 28 M.

    Example:
        >>> from hf_decoding_ext.speculative.heads.medusa import MedusaConfig, MedusaHeads
        >>> heads = MedusaHeads(MedusaConfig(hidden_size=model.config.hidden_size,
        ...                                  vocab_size=model.config.vocab_size)).attach(model)  # doctest: +SKIP
        >>> logits = heads(hidden_states)  # (num_heads, ..., draft_vocab)  # doctest: +SKIP
    """

    depth_key = "num_heads"
    config_class = MedusaConfig
    head_kind = "medusa"
    display_name = "Medusa-1 heads"
    method = "medusa"
    drafter = "hf_decoding_ext.speculative.drafters.medusa:MedusaDrafter"
    shipped_name = "smollm2-135m-instruct-medusa"
    training_defaults = {"lr": 1e-3, "batch_size": 256}
    shipped_recipe = {"steps": 1200, "batch_size": 256, "lr": 2e-3, "weight_decay": 0.01}
    card_config_keys = ("num_heads", "num_layers")

    def __init__(self, config: MedusaConfig):
        super().__init__(config)
        self.heads = nn.ModuleList(
            nn.Sequential(*[ResBlock(config.hidden_size) for _ in range(config.num_layers)])
            for _ in range(config.num_heads)
        )
        self.post_init()
        with torch.no_grad():  # the paper's initialisation: every block starts as the identity
            for block in self.modules():
                if isinstance(block, ResBlock):
                    block.linear.weight.zero_()
                    block.linear.bias.zero_()


    def features(self, hidden_states: torch.Tensor) -> torch.Tensor:
        """Per-head features ``(num_heads, ..., hidden)``."""
        return torch.stack([head(hidden_states) for head in self.heads])

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        """Draft-vocabulary logits ``(num_heads, ..., draft_vocab)``."""
        return self.draft_logits(self.features(hidden_states))

    # ------------------------------------------------------------------------------------------------ training
    def training_loss(self, batch: dict, t2d: torch.Tensor) -> tuple[torch.Tensor, dict]:
        """Medusa-1 loss on a position batch (``hidden (B, h)``, ``tokens (B, 1 + num_heads)``: the next token then
        the heads' targets): the sum over heads of ``loss_decay**k`` x cross-entropy."""
        logits = self(batch["hidden"].to(self.dtype))
        total, metrics = 0.0, {}
        for k in range(self.config.num_heads):
            target = batch["tokens"][:, k + 1]
            target = torch.where(target >= 0, t2d[target.clamp(min=0)], target)
            if bool((target >= 0).any()):
                loss = F.cross_entropy(logits[k].float(), target, ignore_index=-100)
                total = total + self.config.loss_decay ** k * loss
                metrics[f"loss_{k + 1}"] = float(loss.detach())
        return total, metrics

    @torch.no_grad()
    def ranked_candidates(self, batch: dict, topk: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Each head's best ``topk`` candidates ``(num_heads, B, topk)`` (target ids) and the targets
        ``(num_heads, B)``."""
        cands = self.to_target(self(batch["hidden"].to(self.dtype)).topk(topk, dim=-1).indices)
        return cands, batch["tokens"][:, 1:].T
