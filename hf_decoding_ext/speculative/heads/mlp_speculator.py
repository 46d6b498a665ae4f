"""MLP speculator (Wertheimer et al., "Accelerating Production LLMs with Combined Token/Embedding Speculators",
arXiv 2404.19124; IBM's ``fms-extras`` ``MLPSpeculator``)."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from hf_decoding_ext.speculative.heads.base import DraftHeadConfig, DraftHeadModel


class MLPSpeculatorConfig(DraftHeadConfig):
    """Configuration of :class:`MLPSpeculator`.

    Args:
        n_predict: number of stages, i.e. tokens drafted after the tree root (the paper uses 3-7; default 4).
        inner_dim: width of the speculator's state (``None``: the base model's hidden size, the reference's
            ``inner_dim=0``).
        scale_input: normalise the base feature before the first stage (parameter-free LayerNorm divided by
            ``sqrt(2)``, the reference's ``scale_input``), so that the state and token terms of stage 1 are of equal
            size whatever the base model's feature scale.
    """

    model_type = "hf_decoding_ext_mlp_speculator"

    def __init__(self, n_predict: int = 4, inner_dim: int | None = None, scale_input: bool = True, **kwargs):
        super().__init__(**kwargs)
        if isinstance(n_predict, bool) or not isinstance(n_predict, int) or n_predict < 1:
            raise ValueError(f"n_predict must be an integer >= 1, got {n_predict!r}")
        if inner_dim is not None and (isinstance(inner_dim, bool) or not isinstance(inner_dim, int)
                                      or inner_dim < 0):
            raise ValueError(f"inner_dim must be a positive integer or None, got {inner_dim!r}")
        self.n_predict = n_predict
        self.inner_dim = inner_dim or self.hidden_size
        self.scale_input = bool(scale_input)


class MLPSpeculator(DraftHeadModel):
    """MLP speculator: a multi-stage MLP over the base model's last feature that conditions each drafted token on
    the tokens drafted before it (an RNN-like chain of small MLPs, "combined token/embedding speculator").

    The state starts as the base feature ``h_j`` of the last verified position; stage ``i`` (``1..n_predict``) reads
    the previous state and the token before the one it predicts (stage 1: ``x_{j+1}``, the tree root known at
    inference; stage ``i``: the token stage ``i - 1`` drafted; the true tokens during training) and computes::

        state_i = GELU(LayerNorm(state_weight * P_i(state_{i-1}) + emb_weight * E_i(token)))
        logits_i = lm_head(O_i(state_i))                                  # candidates for x_{j+1+i}

    with the reference's weighting ``state_weight = 0.5 ** (0.5 / n_predict)`` and
    ``emb_weight = sqrt(1 - state_weight ** 2) * sqrt(inner_dim / 2)`` (so that the base feature still makes half of
    the state's magnitude after the last stage), the reference's initialisation (all projections
    ``N(0, 1 / inner_dim)``) and, with ``scale_input``, the reference's normalised input ``LayerNorm(h_j) / sqrt(2)``.

    Deviation from the reference (size budget): the reference gives every stage its own token embedding table
    ``vocab x inner_dim`` and its own output head ``inner_dim x vocab`` (~840 M parameters for Llama-7B). Here
    ``E_i(token) = W_i(e(token) / ||e(token)||)`` reads the base model's frozen input embedding ``e`` (unit-normed so
    that ``E_i`` starts at the scale of the reference's embedding rows) through a per-stage ``hidden -> inner_dim``
    projection ``W_i``, and ``O_i`` is a per-stage ``inner_dim -> hidden`` projection followed by the base model's
    frozen lm_head (the draft-vocabulary rows, :meth:`draft_logits`). For SmolLM2-135M (hidden 576, 4 stages) the
    checkpoint holds 4.0 M parameters instead of 4 x 2 x 28 M. Training uses the reference's loss: teacher forcing
    with the true tokens and the unweighted sum of the stages' cross-entropies.

    Args:
        config: an :class:`MLPSpeculatorConfig`.

    Example:
        >>> from hf_decoding_ext.speculative.heads.mlp_speculator import MLPSpeculator, MLPSpeculatorConfig
        >>> config = MLPSpeculatorConfig(hidden_size=model.config.hidden_size,
        ...                              vocab_size=model.config.vocab_size, n_predict=4)  # doctest: +SKIP
        >>> spec = MLPSpeculator(config).attach(model)  # doctest: +SKIP
        >>> logits = spec(hidden_states, tokens)  # (n_predict, ..., draft_vocab)  # doctest: +SKIP
    """

    depth_key = "n_predict"
    config_class = MLPSpeculatorConfig
    head_kind = "mlp-speculator"
    display_name = "MLP speculator"
    method = "mlp-speculator"
    drafter = "hf_decoding_ext.speculative.drafters.mlp_speculator:MLPSpeculatorDrafter"
    shipped_name = "smollm2-135m-instruct-mlp-speculator"
    training_defaults = {"lr": 1e-3, "batch_size": 256}
    shipped_recipe = {"steps": 1200, "batch_size": 256, "lr": 2e-3, "weight_decay": 0.01}
    card_config_keys = ("n_predict", "inner_dim")

    def __init__(self, config: MLPSpeculatorConfig):
        super().__init__(config)
        hidden, inner, n = config.hidden_size, config.inner_dim, config.n_predict
        self.proj = nn.ModuleList(nn.Linear(hidden if i == 0 else inner, inner, bias=False) for i in range(n))
        self.emb_proj = nn.ModuleList(nn.Linear(hidden, inner, bias=False) for _ in range(n))
        self.ln = nn.ModuleList(nn.LayerNorm(inner) for _ in range(n))
        self.out_proj = nn.ModuleList(nn.Linear(inner, hidden, bias=False) for _ in range(n))
        self.post_init()

    def _init_weights(self, module):
        if isinstance(module, nn.Linear):  # the reference's initialisation
            nn.init.normal_(module.weight, std=1 / math.sqrt(self.config.inner_dim))
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        else:
            super()._init_weights(module)


    @property
    def state_weight(self) -> float:
        """Weight of the previous state: the base feature keeps half of the state's magnitude after the last stage."""
        return 0.5 ** (0.5 / self.config.n_predict)

    @property
    def emb_weight(self) -> float:
        """Weight of the token term, ``sqrt(1 - state_weight ** 2)`` times the reference's ``sqrt(inner_dim / 2)``."""
        return math.sqrt(1 - self.state_weight ** 2) * math.sqrt(self.config.inner_dim / 2)

    # ------------------------------------------------------------------------------------------------ stages
    def initial_state(self, hidden_states: torch.Tensor) -> torch.Tensor:
        """The state before stage 1 from base features ``(..., hidden)``."""
        h = hidden_states.to(self.dtype)
        if self.config.scale_input:
            h = F.layer_norm(h, (h.shape[-1],)) / math.sqrt(2)
        return h

    def step(self, stage: int, state: torch.Tensor, token_ids: torch.Tensor) -> torch.Tensor:
        """Stage ``stage`` (1-based): the new state ``(..., inner_dim)`` from the previous state and the ids of the
        tokens fed to it ``(...)``."""
        if not 1 <= stage <= self.config.n_predict:
            raise ValueError(f"stage must be in [1, {self.config.n_predict}], got {stage}")
        e = self.embed(token_ids).to(self.dtype)
        e = e / e.norm(dim=-1, keepdim=True).clamp(min=1e-6)
        i = stage - 1
        z = self.proj[i](state) * self.state_weight + self.emb_proj[i](e) * self.emb_weight
        return F.gelu(self.ln[i](z))

    def stage_logits(self, stage: int, state: torch.Tensor) -> torch.Tensor:
        """Draft-vocabulary logits ``(..., draft_vocab)`` of stage ``stage`` (1-based) from its state."""
        return self.draft_logits(self.out_proj[stage - 1](state))

    def forward(self, hidden_states: torch.Tensor, input_ids: torch.Tensor) -> torch.Tensor:
        """Teacher-forced logits ``(n_predict, ..., draft_vocab)``.

        Args:
            hidden_states: base features ``h_j`` ``(..., hidden)``.
            input_ids: ``(..., n_predict)`` the token fed to each stage: ``x_{j+1}, ..., x_{j+n_predict}``.
        """
        n = self.config.n_predict
        if input_ids.shape[-1] != n or input_ids.shape[:-1] != hidden_states.shape[:-1]:
            raise ValueError(f"input_ids must have shape {tuple(hidden_states.shape[:-1]) + (n,)}, got "
                             f"{tuple(input_ids.shape)}")
        state = self.initial_state(hidden_states)
        out = []
        for stage in range(1, n + 1):
            state = self.step(stage, state, input_ids[..., stage - 1])
            out.append(self.stage_logits(stage, state))
        return torch.stack(out)

    # ------------------------------------------------------------------------------------------------ training
    def _teacher_forced(self, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
        tokens = batch["tokens"]
        inputs = tokens[:, :-1]
        return self(batch["hidden"], inputs.clamp(min=0)), inputs

    def training_loss(self, batch: dict, t2d: torch.Tensor) -> tuple[torch.Tensor, dict]:
        """The reference's loss on a position batch (``hidden (B, h)``, ``tokens (B, 1 + n_predict)``): stage ``i``
        reads the true token ``tokens[:, i - 1]``; the unweighted sum over stages of the cross-entropy against
        ``tokens[:, i]`` (mapped to the draft vocabulary; targets outside it, past the end or after an input past the
        end are ignored)."""
        logits, inputs = self._teacher_forced(batch)
        total, metrics = 0.0, {}
        for i in range(self.config.n_predict):
            target = batch["tokens"][:, i + 1]
            target = torch.where(target >= 0, t2d[target.clamp(min=0)], target)
            target = torch.where(inputs[:, i] >= 0, target, torch.full_like(target, -100))
            if bool((target >= 0).any()):
                loss = F.cross_entropy(logits[i].float(), target, ignore_index=-100)
                total = total + loss
                metrics[f"loss_{i + 1}"] = float(loss.detach())
        if not torch.is_tensor(total):  # no valid target in the batch: a zero loss that still has a graph
            total = logits.sum() * 0.0
        return total, metrics

    @torch.no_grad()
    def ranked_candidates(self, batch: dict, topk: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Teacher-forced (a correct prefix): each stage's best ``topk`` candidates ``(n_predict, B, topk)``
        (target ids) and the targets ``(n_predict, B)``."""
        logits, _ = self._teacher_forced(batch)
        cands = self.to_target(logits.topk(min(topk, logits.shape[-1]), dim=-1).indices)
        return cands, batch["tokens"][:, 1:].T
