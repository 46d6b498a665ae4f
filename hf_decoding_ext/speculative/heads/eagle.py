"""EAGLE-style feature-level drafter trained with FSPAD.

EAGLE (Li et al., "EAGLE: Speculative Sampling Requires Rethinking Feature Uncertainty", arXiv 2401.15077): one
decoder layer autoregresses over the target's features. At position ``p`` its input is the target feature ``f_p``
fused with the embedding of the *next* token ``x_{p+1}`` (the shifted token resolves the feature's uncertainty about
which token was sampled); it outputs a predicted feature ``f^_{p+1}``, and the base model's lm_head turns that into a
distribution over ``x_{p+2}``. Drafting continues on the drafter's own predicted features.

FSPAD (Gui et al., "Boosting Lossless Speculative Decoding via Feature Sampling and Partial Alignment
Distillation", arXiv 2408.15562) adds two components on top of EAGLE, each switched by a config option
(:data:`FSPAD_COMPONENTS`; both ``False`` is plain EAGLE, the ablation's other arm, :data:`ABLATION_ARMS`):

- **Feature sampling** (``feature_sampling``): the feature is "sampled" with the token embedding in a higher
  dimensional space: ``s = W_d((W_f f) * (W_e e))`` (width ``fs_expansion * H``), added to the feature (``f + s``)
  before the fusion layer; ``W_d`` starts at zero, so an untrained sampler is EAGLE's input exactly.
- **Partial alignment distillation** (``partial_alignment``): the predicted feature ``f^`` is aligned to the
  target's feature (Smooth-L1) and is what drafting feeds back, while the logits are read through a small residual
  adapter ``g(f^) = f^ + SiLU(W f^ + b)`` (identity at initialisation) and distilled from the target's tokens, so
  logit confidence no longer fights exact feature alignment.

What follows the papers and what is this library's reading is listed item by item in :data:`PAPER_FIDELITY`
(rendered below and in the model card). Sources checked: the EAGLE paper and its official code (SafeAILab/EAGLE,
``eagle/model/cnets.py``, ``eagle/train/main.py``), FSPAD's abstract and its official code (Luc4Gui/FSPAD,
``eagle/model/cnets_fspad.py``, ``eagle/train/main_fspad.py``); the full FSPAD paper text was not available. Both
FSPAD components are this library's parametrisation of the abstract and differ from the official code; the decoder
layer is a standard Llama layer (with its input norm) so that the drafter exports to vLLM's ``speculators`` format
as the EAGLE-1 type (:mod:`hf_decoding_ext.speculative.heads.speculators_export`).
"""


from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from transformers import DynamicCache
from transformers.models.llama.modeling_llama import LlamaDecoderLayer, LlamaRotaryEmbedding

from hf_decoding_ext.core.tree import additive_mask
from hf_decoding_ext.speculative.heads.base import (
    LAYER_KEYS,
    DecoderLayerConfig,
    DraftHeadModel,
    ResBlock,
    SequenceBatchesMixin,
)

#: The config options that switch FSPAD's components on; at ``False`` the drafter is plain EAGLE (same fusion layer,
#: decoder layer, loss and feature noise), which is what the ablation (``scripts/ablate_eagle_fspad.py``) compares.
FSPAD_COMPONENTS = ("feature_sampling", "partial_alignment")

#: Head options of the two ablation arms; everything else (data, steps, batch, lr, seed, ``cls_weight``,
#: ``feature_noise``) is shared, so the arms differ only in FSPAD's components.
ABLATION_ARMS = {
    "fspad": {name: True for name in FSPAD_COMPONENTS},
    "eagle": {name: False for name in FSPAD_COMPONENTS},
}

#: What this drafter takes from the papers and what is this library's reading, one entry per component:
#: ``(component, "follows" | "own reading", source checked, what this library does (and what the source does))``.
PAPER_FIDELITY = (
    ("feature + token fusion", "follows",
     ("EAGLE paper (feature-level autoregression with the token sequence advanced by one); official "
      "eagle/model/cnets.py (fc = Linear(2H -> H, bias) over concat(embedding, feature))"),
     ("fc(concat(embedding(x_{p+1}), f_p)), Linear(2H -> H) with bias, f_p the base model's last hidden state "
      "after its final norm (the lm_head input)")),
    ("one decoder layer, frozen base embedding and lm_head", "follows",
     "EAGLE paper (auto-regression head: FC layer + one decoder layer); official configs (num_hidden_layers 1)",
     ("one Llama decoder layer with the base model's layer geometry; the base embedding and lm_head are reused, "
      "frozen")),
    ("feature regression loss", "follows",
     "EAGLE paper (L_reg, Smooth L1); official eagle/train/main.py (SmoothL1Loss, v_w = 1.0)",
     "Smooth-L1 between the predicted and the target's next feature, weight 1"),
    ("drafting on predicted features, tree attention, lossless verification", "follows",
     "EAGLE paper (tree-structured drafts verified in one forward; greedy and speculative sampling lossless)",
     "the drafter feeds back its own predicted features; tree nodes attend to their ancestors; the engine verifies"),
    ("input norm of the decoder layer", "own reading",
     "official cnets.py and cnets_fspad.py skip input_layernorm in the first (only) layer",
     ("kept (a standard transformers LlamaDecoderLayer, the geometry of speculators' transformer_layer_config; "
      "speculators' EAGLE-1 model with layernorms=False has no such norm, see speculators_export)")),
    ("token loss and its weight", "own reading",
     ("EAGLE paper (w_cls = 0.1); official main.py / main_fspad.py: p_w = 0.1, cross-entropy against the full "
      "softmax of lm_head(target feature)"),
     ("cross-entropy against the base model's greedy token (the argmax of that distribution), weight cls_weight "
      "(default 0.1; the shipped head used 0.25, a choice of this library's recipe, not from either paper)")),
    ("feature noise", "own reading",
     ("EAGLE paper (uniform noise U(-0.1, 0.1) on the features); official main.py: (U(0,1) - 0.5) * 0.2 * 512 / "
      "sequence length"),
     "uniform noise of half-width feature_noise (0.1) times the feature's RMS"),
    ("draft tree", "own reading",
     "EAGLE-1 paper: a static tree; FSPAD's official code drafts with EAGLE-2's dynamic tree (topK_genrate)",
     "a static tree built from the drafter's measured per-depth accuracies (EAGLE-1 style)"),
    ("training data", "own reading",
     ("EAGLE and FSPAD official code train on a fixed dataset (ShareGPT conversations, features extracted by "
      "ge_data), not on the target's own answers"),
     ("self-distillation: the base model's greedy answers to distill.jsonl (as Medusa-2), every position counted "
      "with the base model's next-token prediction as label")),
    ("draft vocabulary", "own reading",
     "not in EAGLE-1 or FSPAD (EAGLE-3 introduced a reduced draft vocabulary)",
     "the 8192 most frequent response tokens (lm_head rows of those tokens)"),
    ("FSPAD feature sampling", "own reading",
     ("FSPAD abstract (sample features in a high-dimensional space using the token embedding); official "
      "cnets_fspad.py (Efc): after fc, x + down(act(gate(e)) * up(norm(x))) at the intermediate size"),
     ("s = W_d((W_f f) * (W_e e)) at width fs_expansion * H (1 by default), no activation, added to f before fc, "
      "W_d zero-initialised")),
    ("FSPAD partial alignment distillation", "own reading",
     ("FSPAD abstract (partial alignment: the feature alignment and the logit distillation no longer conflict); "
      "official cnets_fspad.py: the layer's MLP outputs 2H, the first half feeds lm_head (token loss only), the "
      "second half is regressed to the target feature and fed back"),
     ("the layer output f^ is regressed and fed back; the logits are read through a residual adapter g(f^) "
      "(identity at initialisation)")),
)


def fidelity_markdown() -> str:
    """:data:`PAPER_FIDELITY` as two Markdown lists: what follows the papers, then this library's reading.

    Example:
        >>> from hf_decoding_ext.speculative.heads.eagle import fidelity_markdown
        >>> fidelity_markdown().splitlines()[0]
        'Follows the papers (source checked):'
    """
    out = []
    for verdict, title in (("follows", "Follows the papers (source checked):"),
                           ("own reading", "This library's reading (differs from, or is not in, the source):")):
        out.append(title)
        out += [f"- **{name}**: {ours}. Source: {source}." for name, v, source, ours in PAPER_FIDELITY
                if v == verdict]
        out.append("")
    return "\n".join(out).rstrip() + "\n"


if __doc__ is not None:  # None under python -OO
    __doc__ += "\n" + fidelity_markdown()

_LAYER_KEYS = LAYER_KEYS  # the name the speculators export reads


class EagleDrafterConfig(DecoderLayerConfig):
    """Configuration of :class:`EagleDrafterModel`.

    Args:
        layer_config: keyword arguments of the Llama decoder layer (``hidden_size``, ``intermediate_size``,
            ``num_attention_heads``, ``num_key_value_heads``, ``head_dim``, ``rms_norm_eps``, ``rope_theta``,
            ``max_position_embeddings``); by default copied from the base model (:meth:`from_base_config`).
        num_draft_tokens: tree depth (tokens drafted after the root).
        feature_sampling: FSPAD's feature sampling, this library's parametrisation (``False``: plain EAGLE fusion).
        fs_expansion: width multiplier of the sampling space.
        partial_alignment: FSPAD's partial alignment, this library's parametrisation (logits through an adapter);
            ``False``: EAGLE's logits straight from the predicted feature.
        cls_weight: weight of the token cross-entropy against the feature regression (EAGLE's paper and official
            code: 0.1; the shipped head's recipe: 0.25).
        feature_noise: half-width of the uniform noise added to input features in training, relative to the
            features' RMS (EAGLE's data augmentation: U(-0.1, 0.1)).
    """

    model_type = "hf_decoding_ext_eagle"

    def __init__(self, layer_config: dict | None = None, num_draft_tokens: int = 6, feature_sampling: bool = True,
                 fs_expansion: int = 1, partial_alignment: bool = True, cls_weight: float = 0.1,
                 feature_noise: float = 0.1, **kwargs):
        super().__init__(layer_config=layer_config, **kwargs)
        if num_draft_tokens < 1 or fs_expansion < 1:
            raise ValueError("num_draft_tokens and fs_expansion must be >= 1")
        self.num_draft_tokens = num_draft_tokens
        self.feature_sampling = feature_sampling
        self.fs_expansion = fs_expansion
        self.partial_alignment = partial_alignment
        self.cls_weight = cls_weight
        self.feature_noise = feature_noise


class EagleDrafterModel(SequenceBatchesMixin, DraftHeadModel):
    """EAGLE-style one-layer feature drafter with FSPAD's feature sampling and partial alignment (module docstring).

    ``forward(features, input_ids, position_ids, attention_mask, cache)`` maps the target features ``f_p``
    ``(B, T, H)`` and next tokens ``x_{p+1}`` ``(B, T)`` to predicted features ``f^_{p+1}`` ``(B, T, H)``;
    :meth:`logits_from` turns predicted features into draft-vocabulary logits.

    Example:
        >>> from hf_decoding_ext.speculative.heads.eagle import EagleDrafterConfig, EagleDrafterModel
        >>> cfg = EagleDrafterConfig(hidden_size=576, vocab_size=49152)
        >>> cfg.from_base_config(model.config)  # doctest: +SKIP
        >>> drafter = EagleDrafterModel(cfg).attach(model)  # doctest: +SKIP
    """

    depth_key = "num_draft_tokens"
    config_class = EagleDrafterConfig
    head_kind = "eagle"
    display_name = "EAGLE-style feature drafter trained with FSPAD"
    method = "eagle-fspad"
    drafter = "hf_decoding_ext.speculative.drafters.eagle:EagleDrafter"
    shipped_name = "smollm2-135m-instruct-eagle-fspad"
    training_defaults = {"lr": 5e-4, "batch_size": 8}  # batch_size counts sequences for this head
    shipped_recipe = {"steps": 900, "batch_size": 8, "lr": 1e-3, "weight_decay": 0.01,
                      "head_options": {"cls_weight": 0.25}, "save_dtype": "float16"}
    card_config_keys = ("num_draft_tokens", "feature_sampling", "partial_alignment", "fs_expansion", "cls_weight")

    def __init__(self, config: EagleDrafterConfig):
        super().__init__(config)
        h = config.hidden_size
        lc = config.llama_config()
        self.fc = nn.Linear(2 * h, h, bias=True)
        if config.feature_sampling:
            w = config.fs_expansion * h
            self.fs_feature = nn.Linear(h, w, bias=False)
            self.fs_embed = nn.Linear(h, w, bias=False)
            self.fs_out = nn.Linear(w, h, bias=False)
        self.layers = nn.ModuleList([LlamaDecoderLayer(lc, layer_idx=0)])
        self.rotary_emb = LlamaRotaryEmbedding(lc)
        if config.partial_alignment:
            self.logit_adapter = ResBlock(h)
        self._blocks: list[tuple[int, int]] = []
        self.post_init()
        with torch.no_grad():  # start as plain EAGLE: no sampling term, identity adapter
            if config.feature_sampling:
                self.fs_out.weight.zero_()
            if config.partial_alignment:
                self.logit_adapter.linear.weight.zero_()
                self.logit_adapter.linear.bias.zero_()


    def attach(self, base_model) -> EagleDrafterModel:
        super().attach(base_model)
        # rotary frequencies are a derived buffer: rebuild them in float32 (a head loaded from a float16 checkpoint
        # would otherwise carry float16 frequencies, whose rounding scrambles positions beyond a few dozen)
        self.rotary_emb = LlamaRotaryEmbedding(self.config.llama_config()).to(self.d2t.device)
        return self

    def fuse(self, features: torch.Tensor, embeds: torch.Tensor) -> torch.Tensor:
        if self.config.feature_sampling:
            features = features + self.fs_out(self.fs_feature(features) * self.fs_embed(embeds))
        return self.fc(torch.cat([embeds, features], dim=-1))

    def forward(self, features: torch.Tensor, input_ids: torch.Tensor, position_ids: torch.Tensor,
                attention_mask: torch.Tensor, cache=None) -> torch.Tensor:
        """Predicted features ``(B, T, H)``; ``attention_mask`` is additive ``(B, 1, T, past + T)``."""
        x = self.fuse(features.to(self.dtype), self.embed(input_ids).to(self.dtype))
        pos = self.rotary_emb(x, position_ids)
        for layer in self.layers:
            x = layer(x, attention_mask=attention_mask.to(x.dtype), position_ids=position_ids, cache=cache,
                      use_cache=cache is not None, position_embeddings=pos)
        return x

    def logits_from(self, predicted: torch.Tensor) -> torch.Tensor:
        if self.config.partial_alignment:
            predicted = self.logit_adapter(predicted)
        return self.draft_logits(predicted)

    def new_cache(self) -> DynamicCache:
        return DynamicCache(config=self.layers[0].self_attn.config)

    # ------------------------------------------------------------------------------------------------ training
    def _causal_mask(self, valid: torch.Tensor) -> torch.Tensor:
        t = valid.shape[1]
        allowed = torch.tril(torch.ones(t, t, dtype=torch.bool, device=valid.device))[None] & valid[:, None, :]
        allowed = allowed | torch.eye(t, dtype=torch.bool, device=valid.device)[None]  # padded rows: no NaN
        return additive_mask(allowed, self.dtype)

    def _teacher_forced(self, batch: dict, noise: bool):
        ids, hid, valid = batch["input_ids"], batch["hidden"].to(self.dtype), batch["valid"]
        feats = hid[:, :-1]
        if noise and self.config.feature_noise:
            rms = feats.pow(2).mean(-1, keepdim=True).sqrt()
            feats = feats + (torch.rand_like(feats) * 2 - 1) * self.config.feature_noise * rms
        inp_valid = valid[:, 1:]
        pos = torch.arange(feats.shape[1], device=ids.device)[None].expand(ids.shape[0], -1)
        pred = self(feats, ids[:, 1:], pos, self._causal_mask(inp_valid))  # pred[:, p] ~ f_{p+1}
        return pred

    def training_loss(self, batch: dict, t2d: torch.Tensor) -> tuple[torch.Tensor, dict]:
        """FSPAD / EAGLE loss: Smooth-L1 of ``f^_{p+1}`` to ``f_{p+1}`` plus ``cls_weight`` x cross-entropy of the
        logits (through the partial-alignment adapter when on) against the base model's greedy token after
        ``x_{p+1}`` (the official code distils the full distribution instead: :data:`PAPER_FIDELITY`). With the base model's predictions cached
        (``batch["labels"]``, :func:`~hf_decoding_ext.training.data.base_predictions`) every position counts, prompt
        included (distillation on fixed text, as EAGLE trains); otherwise only the generated responses, whose next
        tokens are those predictions."""
        pred = self._teacher_forced(batch, noise=True)
        ids, hid, valid, resp = batch["input_ids"], batch["hidden"].to(self.dtype), batch["valid"], batch["response"]
        labels = batch.get("labels")
        use_all = labels is not None and bool((labels >= 0).any())
        # regression: f^_{p+1} vs f_{p+1} (response positions, or every position when distilling from labels)
        reg_mask = valid[:, 1:] & (valid[:, 1:] if use_all else resp[:, 1:])
        reg = F.smooth_l1_loss(pred, hid[:, 1:], reduction="none").mean(-1)
        reg_loss = (reg * reg_mask).sum() / reg_mask.sum().clamp(min=1)
        # classification: logits at p predict x_{p+2}
        logits = self.logits_from(pred[:, :-1])
        target = labels[:, 1:-1] if use_all else ids[:, 2:]
        tmask = valid[:, 2:] & ((target >= 0) if use_all else resp[:, 2:])
        target = target.clamp(min=0)
        tgt = torch.where(tmask, t2d[target], torch.full_like(target, -100))
        ce = F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), tgt.reshape(-1), ignore_index=-100)
        loss = reg_loss + self.config.cls_weight * ce
        with torch.no_grad():
            ok = tgt >= 0
            acc = ((logits.argmax(-1) == tgt) & ok).sum() / ok.sum().clamp(min=1)
        return loss, {"reg": float(reg_loss.detach()), "ce": float(ce.detach()), "acc": float(acc)}

    @torch.no_grad()
    def ranked_candidates(self, batch: dict, topk: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-depth candidates as at inference: depth 1 from the true features; depth ``d > 1`` rolls the drafter
        on its own predicted features with the true tokens (a correct prefix). Returns ``(depth, N, topk)`` target
        ids and ``(depth, N)`` targets over every response position."""
        ids, hid, valid, resp = batch["input_ids"], batch["hidden"].to(self.dtype), batch["valid"], batch["response"]
        b, t = ids.shape
        depth = self.depth
        cache = self.new_cache()
        pos = torch.arange(t - 1, device=ids.device)[None].expand(b, -1)
        pred = self(hid[:, :-1], ids[:, 1:], pos, self._causal_mask(valid[:, 1:]), cache=cache)
        # rollout: at step d, the input at position p is (f^_{p+d-1}, x_{p+d}); rows never see other rows' rollouts,
        # so we re-run the layer over the whole sequence with the true prefix cached (teacher-forced up to p)
        self._blocks = []
        cands, targets = [], []
        cur = pred  # cur[:, p]: predicted feature whose logits give depth-d candidates at anchor p
        for d in range(1, depth + 1):
            n = t - 1 - d  # anchors p with a target x_{p+1+d} inside the sequence
            c = torch.full((b, t - 1, topk), -1, dtype=torch.long, device=ids.device)
            tgt = torch.full((b, t - 1), -100, dtype=torch.long, device=ids.device)
            if n > 0:
                c[:, :n] = self.to_target(self.logits_from(cur[:, :n]).topk(topk, dim=-1).indices)
                m = valid[:, 1 + d:] & resp[:, 1 + d:]
                tgt[:, :n] = torch.where(m, ids[:, 1 + d:], torch.full_like(ids[:, 1 + d:], -100))
            cands.append(c.reshape(-1, topk))
            targets.append(tgt.reshape(-1))
            if d < depth and n > 1:
                # next depth: anchor p feeds (cur[:, p], x_{p+1+d}) at position p + d
                cur = self._rollout_step(cache, cur, ids, valid, d)
            elif d < depth:
                break
        while len(cands) < depth:
            cands.append(torch.full_like(cands[0], -1))
            targets.append(torch.full_like(targets[0], -100))
        self._blocks = []
        return torch.stack(cands), torch.stack(targets)

    def _rollout_step(self, cache, cur, ids, valid, d):
        """One rollout depth for every anchor at once: anchor ``p`` feeds ``(cur[:, p], x_{p+1+d})`` at position
        ``p + d``, attending to true-feature entries ``0..p`` and to its own earlier rollout entries."""
        b, t = ids.shape
        n = t - 1 - d  # anchors 0..n-1
        past = cache.get_seq_length()
        feats = cur[:, :n]
        toks = ids[:, 1 + d: 1 + d + n]
        pos = (torch.arange(n, device=ids.device) + d)[None].expand(b, -1)
        true_len = t - 1
        allowed = torch.zeros(n, past + n, dtype=torch.bool, device=ids.device)
        anchor = torch.arange(n, device=ids.device)
        allowed[:, :true_len] = torch.arange(true_len, device=ids.device)[None] <= anchor[:, None]
        # earlier rollout blocks: block k (depth k+2 inputs) occupies columns true_len + k*? -> track in cache layout
        for start, width in self._blocks:
            cols = torch.arange(width, device=ids.device)
            allowed[:, start:start + width] = cols[None] == anchor[:, None]
        allowed[:, past:] = torch.eye(n, dtype=torch.bool, device=ids.device)
        keys_valid = torch.cat([valid[:, 1:], valid.new_ones(b, past + n - true_len)], 1)
        mask = additive_mask(allowed[None] & keys_valid[:, None, :], self.dtype)
        self._blocks.append((past, n))
        return self(feats, toks, pos, mask, cache=cache)
