"""Jakiro: an EAGLE-style feature drafter whose layer MLP is a sparse mixture of experts.

Jakiro (Huang et al., "Jakiro: Boosting Speculative Decoding with Decoupled Multi-Head via MoE", arXiv 2502.06282):
in EAGLE-2 trees all top-k siblings of a node come from one predicted feature, so their errors are correlated.
Jakiro replaces the MLP of the one-layer drafter with a Mixtral-style sparse MoE block: each selected expert yields
its own feature, and the siblings of a node are taken from different experts (decoupled candidates). The same router
has a second pair of logits that weighs the two selected experts into a *contrastive* feature
``s * (v_a e_a - v_b e_b)`` (official code, ``MixtralSparseMoeBlock`` "method 3"), trained to predict the feature one
step further ahead; drafting is autoregressive for the first depths and parallel (one layer output proposes two
depths) for the last one (the hybrid inference strategy).

This head subclasses :class:`~hf_decoding_ext.speculative.heads.eagle.EagleDrafterModel` (same fusion layer,
attention, feature regression, token loss, feature noise, FSPAD options) and swaps the decoder layer's MLP for
:class:`JakiroMoE`; the drafter is :class:`~hf_decoding_ext.speculative.drafters.jakiro.JakiroDrafter`. Sources
checked: the paper's abstract and the official code (haiduo/Jakiro: ``jakiro/model/cnets.py``,
``jakiro/model/ea_model.py``, ``jakiro/train/main.py``). What follows them and what is this library's reading is
listed item by item in :data:`PAPER_FIDELITY` (rendered below and in the model card).
"""

from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from torch import nn
from transformers.models.llama.modeling_llama import LlamaMLP

from hf_decoding_ext.speculative.heads.eagle import (
    EagleDrafterConfig,
    EagleDrafterModel,
)

#: ``(component, "follows" | "own reading", source checked, what this library does)``.
PAPER_FIDELITY = (
    ("sparse MoE in place of the drafter layer's MLP", "follows",
     ("paper (MoE draft layer); official cnets.py: LlamaDecoderLayer.mlp_moe = MixtralSparseMoeBlock, 2 experts, "
      "both selected (num_experts_per_tok 2), expert MLP width = hidden_size"),
     ("JakiroMoE: num_experts 2, experts_per_token 2, expert_intermediate = hidden_size (576), SwiGLU experts, "
      "router Linear(H -> num_experts + 2) without bias, softmax weights over the selected experts")),
    ("contrastive feature and its loss", "follows",
     ("official cnets.py (router logits 2..3 weigh the two selected experts, output = s * (v_a e_a - v_b e_b)); "
      "official main.py: the second output regresses the feature one step further (target[:, 1:]) and its logits "
      "the token after, added with weight `const`"),
     ("the contrastive stream predicts f_{p+2} (Smooth-L1) and the token after it, weight const_weight (1.0; "
      "the official value of `const` is in a config not read)")),
    ("hybrid inference", "follows",
     ("paper (autoregressive first, parallel later); official cnets.py topK_genrate: the last depth reuses the "
      "contrastive output of the penultimate forward instead of another drafter forward"),
     ("the last parallel_depths (1) depths of the tree take their candidates from the contrastive feature of the "
      "forward that proposed their parent (no drafter forward for those depths)")),
    ("decoupled siblings", "own reading",
     ("paper (candidates of a node come from different experts); the official inference code ranks siblings on the "
      "weighted MoE output"),
     ("rank 0 is the top token of the weighted MoE feature (the one fed back), ranks 1.. alternate over the "
      "selected experts in router order, each expert giving its best token not yet taken; each expert's own "
      "feature (residual + expert output) is trained with the token loss (expert_weight 1.0, on a random "
      "expert_loss_fraction 0.25 of the positions to bound the training cost) so that it ranks tokens on its own")),
    ("router load-balancing loss", "own reading",
     ("the brief asks for the code's router loss; official main.py (this version) adds none: with 2 experts both "
      "always run"),
     ("Switch-style auxiliary loss E * sum_e frac_e * prob_e over the router's expert logits, weight aux_weight "
      "(0.01); it matters only for experts_per_token < num_experts")),
    ("token loss target", "own reading",
     "official main.py: cross-entropy against the full softmax of lm_head(target feature)",
     "cross-entropy against the base model's greedy token (as the library's EAGLE head), weight cls_weight"),
    ("base drafter and training budget", "own reading",
     ("paper: EAGLE-2 base, ShareGPT data, dynamic tree, 0.38B drafter for 7B"),
     ("the library's EAGLE head with the same options as the EAGLE baseline (FSPAD feature sampling and partial "
      "alignment on, cls_weight 0.25), static tree from measured accuracies (sized from the MoE stream's rollout "
      "accuracies), self-distillation data, 600k supervised positions (the baseline's budget)")),
)


def fidelity_markdown() -> str:
    """:data:`PAPER_FIDELITY` as Markdown lists (follows / own reading).

    Example:
        >>> from hf_decoding_ext.speculative.heads.jakiro import fidelity_markdown
        >>> fidelity_markdown().splitlines()[0]
        'Follows the paper / official code (source checked):'
    """
    out = []
    for verdict, title in (("follows", "Follows the paper / official code (source checked):"),
                           ("own reading", "This library's reading (differs from, or is not in, the source):")):
        out.append(title)
        out += [f"- **{name}**: {ours}. Source: {source}." for name, v, source, ours in PAPER_FIDELITY if v == verdict]
        out.append("")
    return "\n".join(out).rstrip() + "\n"


if __doc__ is not None:
    __doc__ += "\n" + fidelity_markdown()


class JakiroMoE(nn.Module):
    """Mixtral-style sparse MoE block with Jakiro's contrastive pair of router logits.

    ``forward(x)`` returns the weighted sum of the ``experts_per_token`` selected experts (softmax over their
    router logits) and stashes in :attr:`aux` the selected experts' outputs in router order ``(..., k, H)``, the
    contrastive output ``(..., H)`` (when ``contrastive``) and the router's expert logits (for the balance loss).
    All experts are computed densely (2 experts, both selected, as the official configuration).
    """

    def __init__(self, layer_config, num_experts: int, experts_per_token: int, expert_intermediate: int,
                 contrastive: bool):
        super().__init__()
        cfg = copy.deepcopy(layer_config)
        cfg.intermediate_size = expert_intermediate
        self.num_experts = num_experts
        self.top_k = experts_per_token
        self.contrastive = contrastive
        self.gate = nn.Linear(cfg.hidden_size, num_experts + (2 if contrastive else 0), bias=False)
        self.experts = nn.ModuleList([LlamaMLP(cfg) for _ in range(num_experts)])
        self.aux: dict = {}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        logits = self.gate(x)
        router = logits[..., : self.num_experts]
        top, sel = router.topk(self.top_k, dim=-1)  # (..., k) in router order
        weights = F.softmax(top.float(), dim=-1).to(x.dtype)
        outs = torch.stack([e(x) for e in self.experts], dim=-2)  # (..., E, H)
        chosen = torch.gather(outs, -2, sel[..., None].expand(*sel.shape, outs.shape[-1]))  # (..., k, H)
        mixed = (weights[..., None] * chosen).sum(-2)
        aux = {"router": router, "experts": chosen, "mixed": mixed}
        if self.contrastive:
            pair = logits[..., self.num_experts:]
            v = F.softmax(pair.float(), dim=-1).to(x.dtype)
            sign = torch.where(pair[..., 0] > pair[..., 1], 1.0, -1.0).to(x.dtype)[..., None]
            aux["contrastive"] = sign * (v[..., :1] * chosen[..., 0, :] - v[..., 1:] * chosen[..., 1, :])
        self.aux = aux
        return mixed

    def balance_loss(self, valid: torch.Tensor | None = None) -> torch.Tensor:
        """Switch-Transformer load-balancing loss ``E * sum_e frac_e * prob_e`` of the last forward (over
        ``valid`` positions)."""
        router = self.aux["router"].float()
        probs = router.softmax(-1).reshape(-1, self.num_experts)
        first = F.one_hot(router.argmax(-1), self.num_experts).float().reshape(-1, self.num_experts)
        if valid is not None:
            m = valid.reshape(-1, 1).float()
            n = m.sum().clamp(min=1)
            return self.num_experts * ((first * m).sum(0) / n * (probs * m).sum(0) / n).sum()
        return self.num_experts * (first.mean(0) * probs.mean(0)).sum()


class JakiroConfig(EagleDrafterConfig):
    """Configuration of :class:`JakiroDrafterModel`: :class:`EagleDrafterConfig` plus

    Args:
        num_experts: experts of the MoE block (official: 2).
        experts_per_token: experts selected per position (official: 2; the contrastive feature needs 2).
        expert_intermediate: SwiGLU width of each expert (``None``: the hidden size, as the official code).
        contrastive: the contrastive stream and the hybrid (parallel last depth) inference.
        parallel_depths: depths at the bottom of the tree drafted in parallel from the contrastive stream.
        const_weight: weight of the contrastive stream's losses (official ``const``).
        expert_weight: weight of the per-expert token losses (decoupled siblings), relative to ``cls_weight``.
        aux_weight: weight of the router load-balancing loss.
        expert_loss_fraction: share of the positions (random each step) that carry the per-expert token losses.
    """

    model_type = "hf_decoding_ext_jakiro"

    def __init__(self, num_experts: int = 2, experts_per_token: int = 2, expert_intermediate: int | None = None,
                 contrastive: bool = True, parallel_depths: int = 1, const_weight: float = 1.0,
                 expert_weight: float = 1.0, aux_weight: float = 0.01, expert_loss_fraction: float = 0.25,
                 **kwargs):
        super().__init__(**kwargs)
        if num_experts < 2:
            raise ValueError(f"num_experts must be >= 2, got {num_experts!r}")
        if not 2 <= experts_per_token <= num_experts:
            raise ValueError(f"experts_per_token must be in [2, num_experts], got {experts_per_token!r}")
        if expert_intermediate is not None and expert_intermediate < 1:
            raise ValueError(f"expert_intermediate must be >= 1, got {expert_intermediate!r}")
        if parallel_depths not in (0, 1) or (contrastive and parallel_depths >= self.num_draft_tokens):
            raise ValueError(f"parallel_depths must be 0 or 1 (the official last-depth switch), less than "
                             f"num_draft_tokens, got {parallel_depths!r}")
        self.num_experts = num_experts
        self.experts_per_token = experts_per_token
        self.expert_intermediate = expert_intermediate
        self.contrastive = contrastive
        self.parallel_depths = parallel_depths if contrastive else 0
        self.const_weight = const_weight
        self.expert_weight = expert_weight
        self.aux_weight = aux_weight
        if not 0 < expert_loss_fraction <= 1:
            raise ValueError(f"expert_loss_fraction must be in (0, 1], got {expert_loss_fraction!r}")
        self.expert_loss_fraction = expert_loss_fraction


class JakiroDrafterModel(EagleDrafterModel):
    """Jakiro's MoE drafter layer (module docstring): an :class:`EagleDrafterModel` whose decoder-layer MLP is a
    :class:`JakiroMoE`. ``forward`` returns the weighted MoE feature (fed back when drafting) and stashes in
    :attr:`aux_out` the selected experts' own features ``(B, T, k, H)`` and the contrastive feature ``(B, T, H)``
    (a prediction of the feature one step further ahead).

    Example:
        >>> from hf_decoding_ext.speculative.heads.jakiro import JakiroConfig, JakiroDrafterModel
        >>> cfg = JakiroConfig(hidden_size=576, vocab_size=49152)
        >>> cfg.from_base_config(model.config)  # doctest: +SKIP
        >>> head = JakiroDrafterModel(cfg).attach(model)  # doctest: +SKIP
    """

    config_class = JakiroConfig
    head_kind = "jakiro"
    display_name = "Jakiro decoupled MoE feature drafter"
    method = "jakiro"
    drafter = "hf_decoding_ext.speculative.drafters.jakiro:JakiroDrafter"
    shipped_name = "smollm2-135m-instruct-jakiro"
    training_defaults = {"lr": 5e-4, "batch_size": 8}
    # Same recipe as the EAGLE baseline (/work/distill/baselines/eagle-600k: eagle's shipped recipe at the
    # "comparison" budget of 600k positions, ~300 steps of 8 sequences): lr, weight decay, batch, cls_weight, fp16.
    shipped_recipe = {"budget": "comparison", "batch_size": 8, "lr": 1e-3, "weight_decay": 0.01,
                      "head_options": {"cls_weight": 0.25}, "save_dtype": "float16"}
    card_config_keys = ("num_draft_tokens", "num_experts", "experts_per_token", "expert_intermediate",
                        "contrastive", "parallel_depths", "const_weight", "expert_weight", "aux_weight",
                        "expert_loss_fraction", "feature_sampling", "partial_alignment", "cls_weight")

    def __init__(self, config: JakiroConfig):
        super().__init__(config)
        lc = config.llama_config()
        self.layers[0].mlp = JakiroMoE(lc, config.num_experts, config.experts_per_token,
                                       config.expert_intermediate or config.hidden_size, config.contrastive)
        self.layers[0].mlp.apply(self._init_weights)
        self.aux_out: dict = {}

    @property
    def moe(self) -> JakiroMoE:
        return self.layers[0].mlp

    def forward(self, features, input_ids, position_ids, attention_mask, cache=None):
        out = super().forward(features, input_ids, position_ids, attention_mask, cache)
        aux = self.moe.aux
        residual = out - aux["mixed"]  # the layer output is residual + MoE output
        self.aux_out = {"experts": residual[..., None, :] + aux["experts"]}
        if self.config.contrastive:
            self.aux_out["parallel"] = residual + aux["contrastive"]
        return out

    # ------------------------------------------------------------------------------------------------ drafting
    @torch.no_grad()
    def decoupled_topk(self, mixed: torch.Tensor, experts: torch.Tensor, k: int) -> torch.Tensor:
        """Decoupled sibling candidates ``(N, k)`` (draft-vocabulary indices) for ``N`` nodes: rank 0 is the top
        token of the weighted MoE feature ``mixed`` ``(N, H)``, ranks 1.. alternate over the selected experts'
        features ``experts`` ``(N, e, H)`` in router order, each giving its best token not yet taken."""
        top_mixed = self.logits_from(mixed).topk(k, dim=-1).indices.tolist()
        top_exp = self.logits_from(experts).topk(k, dim=-1).indices.tolist()  # (N, e, k)
        out = []
        for row_mixed, rows in zip(top_mixed, top_exp):
            chosen = [row_mixed[0]]
            ptr = [0] * len(rows)
            e = 0
            while len(chosen) < k:
                while ptr[e] < k and rows[e][ptr[e]] in chosen:
                    ptr[e] += 1
                if ptr[e] < k:
                    chosen.append(rows[e][ptr[e]])
                    ptr[e] += 1
                elif all(p >= k for p in ptr):  # every expert exhausted: fill from the mixed ranking
                    chosen += [t for t in row_mixed if t not in chosen][: k - len(chosen)]
                e = (e + 1) % len(rows)
            out.append(chosen)
        return torch.tensor(out, dtype=torch.long, device=mixed.device)

    # ------------------------------------------------------------------------------------------------ training
    def training_loss(self, batch: dict, t2d: torch.Tensor) -> tuple[torch.Tensor, dict]:
        """EAGLE/FSPAD loss of the weighted MoE feature (:meth:`EagleDrafterModel.training_loss`) plus
        ``const_weight`` x (Smooth-L1 of the contrastive feature to ``f_{p+2}`` + ``cls_weight`` x its token loss
        against the base model's token after that), ``cls_weight * expert_weight`` x the mean token loss of the
        selected experts' own features, and ``aux_weight`` x the router load-balancing loss."""
        loss, metrics = super().training_loss(batch, t2d)  # one teacher-forced forward; aux_out/moe.aux are its
        aux, moe_aux = self.aux_out, self.moe.aux
        ids, hid, valid, resp = batch["input_ids"], batch["hidden"].to(self.dtype), batch["valid"], batch["response"]
        labels = batch.get("labels")
        use_all = labels is not None and bool((labels >= 0).any())
        cfg = self.config

        def token_ce(logits, target, tmask):
            target = target.clamp(min=0)
            tgt = torch.where(tmask, t2d[target], torch.full_like(target, -100))
            return F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), tgt.reshape(-1), ignore_index=-100)

        # per-expert token losses (same targets as the MoE stream: logits at p predict x_{p+2})
        target = labels[:, 1:-1] if use_all else ids[:, 2:]
        tmask = valid[:, 2:] & ((target >= 0) if use_all else resp[:, 2:])
        exp = aux["experts"][:, :-1]  # (B, T-2, k, H)
        if cfg.expert_loss_fraction < 1:  # a random share of the positions (the lm_head over 2 experts is costly)
            keep = torch.rand(tmask.shape, device=tmask.device) < cfg.expert_loss_fraction
            rows, cols = torch.nonzero(keep & tmask, as_tuple=True)
            exp, target_e, tmask_e = exp[rows, cols][None], target[rows, cols][None], tmask[rows, cols][None]
        else:
            target_e, tmask_e = target, tmask
        ce_exp = torch.stack([token_ce(self.logits_from(exp[:, :, j]), target_e, tmask_e)
                              for j in range(exp.shape[2])]).mean()
        loss = loss + cfg.cls_weight * cfg.expert_weight * ce_exp
        metrics["ce_experts"] = float(ce_exp.detach())
        # router balance over the input positions
        lb = self.moe.balance_loss(valid[:, 1:])
        loss = loss + cfg.aux_weight * lb
        metrics["balance"] = float(lb.detach())
        with torch.no_grad():
            first = moe_aux["router"].argmax(-1)[valid[:, 1:]]
            metrics["expert0_share"] = float((first == 0).float().mean()) if first.numel() else 0.0
        if cfg.contrastive and hid.shape[1] > 3:
            par = aux["parallel"]  # par[:, p] ~ f_{p+2}; its logits predict x_{p+3}
            reg_mask = valid[:, 2:] & (valid[:, 2:] if use_all else resp[:, 2:])
            reg = F.smooth_l1_loss(par[:, :-1], hid[:, 2:], reduction="none").mean(-1)
            reg2 = (reg * reg_mask).sum() / reg_mask.sum().clamp(min=1)
            target2 = labels[:, 2:-1] if use_all else ids[:, 3:]
            tmask2 = valid[:, 3:] & ((target2 >= 0) if use_all else resp[:, 3:])
            logits2 = self.logits_from(par[:, :-2])
            ce2 = token_ce(logits2, target2, tmask2)
            loss = loss + cfg.const_weight * (reg2 + cfg.cls_weight * ce2)
            with torch.no_grad():
                t2 = torch.where(tmask2, t2d[target2.clamp(min=0)], torch.full_like(target2, -100))
                ok = t2 >= 0
                metrics["acc_parallel"] = float(((logits2.argmax(-1) == t2) & ok).sum() / ok.sum().clamp(min=1))
            metrics["reg_parallel"], metrics["ce_parallel"] = float(reg2.detach()), float(ce2.detach())
        return loss, metrics

    @classmethod
    def card_sections(cls) -> str:
        """Model-card section: the fidelity list (what follows the paper, every deviation)."""
        return "## Fidelity to the paper\n\n" + fidelity_markdown()


def untrained_head(model, seed: int = 0, **options) -> JakiroDrafterModel:
    """A randomly initialised Jakiro head shaped for ``model`` (full vocabulary), attached to it: drafts that the
    verification rejects almost always (a lossless placeholder until a trained checkpoint is given).

    Example:
        >>> from hf_decoding_ext.speculative.heads.jakiro import untrained_head
        >>> head = untrained_head(model)  # doctest: +SKIP
    """
    return JakiroDrafterModel.untrained(model, seed=seed, **options)

