"""Hydra heads (Ankner et al., "Hydra: Sequentially-Dependent Draft Heads for Medusa Decoding", arXiv 2402.05109).

Medusa's heads guess every future token from the base feature alone. A Hydra head also reads the tokens drafted
before it on its tree path, so a candidate continuation is conditioned on the candidate it continues: head ``k``
predicts ``x_{j+1+k}`` from the feature ``h_j`` and the embeddings of ``x_{j+1}`` (the base model's own next token,
the tree's root) and ``x_{j+2} .. x_{j+k}`` (the draft tokens on the path).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from hf_decoding_ext.speculative.heads.base import DraftHeadConfig, DraftHeadModel, ResBlock


class HydraConfig(DraftHeadConfig):
    """Configuration of :class:`HydraHeads`.

    Args:
        num_heads: number of Hydra heads (tree depth); head ``k`` predicts the token ``k + 1`` positions after the
            one the base lm_head predicts (the paper: 4).
        num_layers: Linear + SiLU layers per head (the paper's basic MLP head: 1; Hydra++ uses 4).
        loss_decay: weight ``loss_decay ** (k - 1)`` of head ``k``'s loss (Medusa's and the Hydra code's geometric
            decay; ``1.0`` weighs all heads alike).
    """

    model_type = "hf_decoding_ext_hydra"

    def __init__(self, num_heads: int = 4, num_layers: int = 1, loss_decay: float = 0.8, **kwargs):
        super().__init__(**kwargs)
        for name, value in (("num_heads", num_heads), ("num_layers", num_layers)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be an integer >= 1, got {value!r}")
        if not 0 < float(loss_decay) <= 1:
            raise ValueError(f"loss_decay must be in (0, 1], got {loss_decay!r}")
        self.num_heads = num_heads
        self.num_layers = num_layers
        self.loss_decay = float(loss_decay)


class HydraInputBlock(nn.Module):
    """First layer of a Hydra head: ``h + SiLU(W [h; e_1; ...; e_k] + b)`` over the feature ``h`` and the
    embeddings of the ``k`` path tokens, with the residual connection to the feature."""

    def __init__(self, hidden_size: int, num_tokens: int):
        super().__init__()
        self.linear = nn.Linear(hidden_size * (num_tokens + 1), hidden_size)

    def forward(self, hidden: torch.Tensor, embeds: torch.Tensor) -> torch.Tensor:
        """``hidden (..., H)``, ``embeds (..., k, H)`` -> ``(..., H)``."""
        x = torch.cat([hidden, embeds.flatten(-2)], dim=-1)
        return hidden + F.silu(self.linear(x))


class HydraMLP(nn.Module):
    """One Hydra head: a :class:`HydraInputBlock` then ``num_layers - 1`` residual blocks ``x + SiLU(W x + b)``."""

    def __init__(self, hidden_size: int, num_tokens: int, num_layers: int):
        super().__init__()
        self.num_tokens = num_tokens
        self.input_block = HydraInputBlock(hidden_size, num_tokens)
        self.blocks = nn.ModuleList(ResBlock(hidden_size) for _ in range(num_layers - 1))

    def forward(self, hidden: torch.Tensor, embeds: torch.Tensor) -> torch.Tensor:
        x = self.input_block(hidden, embeds)
        for block in self.blocks:
            x = block(x)
        return x


class HydraHeads(DraftHeadModel):
    """Hydra heads with the paper's MLP head, over the base model's frozen embeddings and lm_head.

    Head ``k`` (``k = 1 .. num_heads``) maps ``[h_j; e(x_{j+1}); ...; e(x_{j+k})]`` (width ``(k + 1) * hidden``) to a
    feature through ``h_j + SiLU(W [...] + b)`` and ``num_layers - 1`` residual blocks, then through the base model's
    shared, frozen lm_head (rows of the draft vocabulary, :meth:`draft_logits`). ``e`` is the base model's input
    embedding, ``x_{j+1}`` the base model's next token (known at drafting time: the tree root) and ``x_{j+2..j+k}``
    the draft tokens on the path, so the heads are sequentially dependent and a tree is drafted depth by depth.

    Initialisation: every linear layer starts at zero (weight and bias), so an untrained head returns ``h_j`` and
    repeats the base model's next-token prediction, as Medusa's heads do; training starts from that safe prior.

    Training: teacher forcing on position batches, head ``k`` reads the true ``x_{j+1..j+k}`` and is trained with
    cross-entropy on ``x_{j+1+k}``. The paper's teacher-distillation objective matches the base model's distribution;
    our training data are the base model's own greedy continuations (self-distillation), so cross-entropy on them is
    that distillation target at temperature zero.

    Deviations from the paper: (1) the lm_head is the base model's, shared and frozen (the paper trains one copy per
    head), which keeps a checkpoint small; (2) the first layer's residual path is ``h_j`` itself, where the reference
    code uses a learned projection of the whole input: this halves the head's parameters and makes the untrained
    head exactly the base prediction; (3) the Hydra++ extras (prefix-attention layer, input noise) are not included.

    Example:
        >>> from hf_decoding_ext.speculative.heads.hydra import HydraConfig, HydraHeads
        >>> heads = HydraHeads(HydraConfig(hidden_size=model.config.hidden_size,
        ...                                vocab_size=model.config.vocab_size)).attach(model)  # doctest: +SKIP
        >>> logits = heads(hidden_states, input_ids)  # (num_heads, ..., draft_vocab)  # doctest: +SKIP
    """

    depth_key = "num_heads"
    config_class = HydraConfig
    head_kind = "hydra"
    display_name = "Hydra heads"
    method = "hydra"
    drafter = "hf_decoding_ext.speculative.drafters.hydra:HydraDrafter"
    shipped_name = "smollm2-135m-instruct-hydra"
    training_defaults = {"lr": 1e-3, "batch_size": 256}
    shipped_recipe = {"steps": 1200, "batch_size": 256, "lr": 2e-3, "weight_decay": 0.01}
    card_config_keys = ("num_heads", "num_layers")

    def __init__(self, config: HydraConfig):
        super().__init__(config)
        self.heads = nn.ModuleList(
            HydraMLP(config.hidden_size, k, config.num_layers) for k in range(1, config.num_heads + 1)
        )
        self.post_init()
        with torch.no_grad():  # untrained heads repeat the base prediction (see the class docstring)
            for module in self.heads.modules():
                if isinstance(module, nn.Linear):
                    module.weight.zero_()
                    module.bias.zero_()


    def _check_head(self, k: int) -> None:
        if not 1 <= k <= self.config.num_heads:
            raise ValueError(f"head index must be in [1, {self.config.num_heads}], got {k}")

    def head_features(self, k: int, hidden_states: torch.Tensor, input_ids: torch.Tensor) -> torch.Tensor:
        """Feature ``(..., hidden)`` of head ``k`` (1-based) from ``hidden_states (..., hidden)`` and the ``k`` path
        tokens ``input_ids (..., k)`` (``x_{j+1} .. x_{j+k}``)."""
        self._check_head(k)
        if input_ids.shape[-1] != k:
            raise ValueError(f"head {k} reads {k} tokens, got input_ids of shape {tuple(input_ids.shape)}")
        embeds = self.embed(input_ids).to(self.dtype)
        return self.heads[k - 1](hidden_states.to(self.dtype), embeds)

    def head_logits(self, k: int, hidden_states: torch.Tensor, input_ids: torch.Tensor) -> torch.Tensor:
        """Draft-vocabulary logits ``(..., draft_vocab)`` of head ``k`` (see :meth:`head_features`)."""
        return self.draft_logits(self.head_features(k, hidden_states, input_ids))

    def forward(self, hidden_states: torch.Tensor, input_ids: torch.Tensor) -> torch.Tensor:
        """Teacher-forced logits ``(num_heads, ..., draft_vocab)``: head ``k`` reads ``input_ids[..., :k]``.

        Args:
            hidden_states: ``(..., hidden)`` base features ``h_j``.
            input_ids: ``(..., >= num_heads)`` the tokens ``x_{j+1}, x_{j+2}, ...`` (valid ids).
        """
        n = self.config.num_heads
        if input_ids.shape[-1] < n:
            raise ValueError(f"input_ids must hold at least {n} tokens per position, got {input_ids.shape[-1]}")
        hidden = hidden_states.to(self.dtype)
        embeds = self.embed(input_ids[..., :n]).to(self.dtype)
        feats = torch.stack([head(hidden, embeds[..., : k + 1, :]) for k, head in enumerate(self.heads)])
        return self.draft_logits(feats)

    # ------------------------------------------------------------------------------------------------ training
    def training_loss(self, batch: dict, t2d: torch.Tensor) -> tuple[torch.Tensor, dict]:
        """Hydra loss on a position batch (``hidden (B, h)``, ``tokens (B, 1 + num_heads)``): the sum over heads of
        ``loss_decay**(k - 1)`` x cross-entropy of head ``k`` (inputs ``tokens[:, :k]``, target ``tokens[:, k]``
        mapped to the draft vocabulary; positions past the end or outside the draft vocabulary are ignored)."""
        tokens = batch["tokens"]
        logits = self(batch["hidden"], tokens.clamp(min=0))
        total, metrics = 0.0, {}
        for k in range(1, self.config.num_heads + 1):
            target = tokens[:, k]
            valid = (tokens[:, : k + 1] >= 0).all(dim=1)
            target = torch.where(valid, t2d[target.clamp(min=0)], torch.full_like(target, -100))
            if bool((target >= 0).any()):
                loss = F.cross_entropy(logits[k - 1].float(), target, ignore_index=-100)
                total = total + self.config.loss_decay ** (k - 1) * loss
                metrics[f"loss_{k}"] = float(loss.detach())
        if not torch.is_tensor(total):  # no valid target in the batch
            total = logits.sum() * 0.0
        return total, metrics

    @torch.no_grad()
    def ranked_candidates(self, batch: dict, topk: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Each head's best ``topk`` candidates ``(num_heads, B, topk)`` (target ids) given the true prefix tokens
        (teacher forcing) and the targets ``(num_heads, B)`` (``-100`` past the end)."""
        tokens = batch["tokens"]
        logits = self(batch["hidden"], tokens.clamp(min=0))
        cands = self.to_target(logits.topk(topk, dim=-1).indices)
        return cands, tokens[:, 1: self.config.num_heads + 1].T
