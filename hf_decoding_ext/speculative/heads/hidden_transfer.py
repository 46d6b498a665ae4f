"""Hidden Transfer: trained transfer layers at an intermediate layer of the frozen target.

Wu et al., "Parallel Decoding via Hidden Transfer for Lossless Large Language Model Acceleration", arXiv 2404.12022
(no official code; the follow-up FIRP, arXiv 2410.20488, describes the same mechanism). At an intermediate layer
``l`` the hidden state of the last context position ``t`` is *transferred* by trained linear layers to ``k`` pseudo
hidden states standing for the future positions ``t + 1 .. t + k``. The pseudo states then pass the target's own
upper layers ``l .. L - 1`` (frozen), attending to the real context's keys and values in those layers and to the
preceding pseudo states, so they gain the context's semantics before the target's final norm and lm_head read them:
the pseudo state at ``t + i`` predicts the token ``t + i + 1``. With the base lm_head predicting ``t + 1`` from the
real state, pseudo ``i`` predicts depth ``i`` of a Medusa-style draft tree; the target verifies the tree (lossless).

Only the ``k`` transfer layers (``Linear(h, h)`` each) are trained; the target's layers, final norm and lm_head are
used by reference (never copied, never part of the head's ``state_dict``). Training backpropagates through the
frozen upper layers: per sequence the context's upper-layer keys/values are computed once without gradient, then
``anchors_per_sequence`` sampled anchors contribute ``k`` pseudo tokens each, all in one forward with a block mask.

What follows the paper and what is this library's reading is listed in :data:`PAPER_FIDELITY` (rendered below and in
the model card).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from hf_decoding_ext.core.anatomy import (
    LayerSubsetCache,
    crop_layers,
    decoder,
    decoder_layers,
    layer_subset_model,
)
from hf_decoding_ext.core.tree import additive_mask
from hf_decoding_ext.speculative.heads.base import DraftHeadConfig, DraftHeadModel
from hf_decoding_ext.training.data import collate_sequences

#: Architectures whose decoder runs from hidden states with the positions applied inside attention (rotary), so the
#: upper layers can be re-entered with ``inputs_embeds`` (GPT-2 adds learned position embeddings to the input and
#: Gemma scales it: both refused with a ``ValueError``).
SUPPORTED_MODEL_TYPES = ("llama", "mistral", "qwen2", "qwen3", "smollm3")

#: ``(component, "follows" | "own reading", source checked, what this library does)``.
PAPER_FIDELITY = (
    ("hidden transfer at an intermediate layer", "follows",
     "paper abstract and method (arXiv 2404.12022; FIRP 2410.20488)",
     ("k trained linear maps turn the layer-l hidden state of the last context position into k pseudo hidden "
      "states for the next k positions; the pseudo states pass the frozen upper layers l..L-1, attending to the "
      "real context and to the preceding pseudo states (causal), and the target's final norm and lm_head read "
      "them")),
    ("tree attention generation and verification, lossless", "follows", "paper abstract",
     ("pseudo i's top candidates fill depth i of a Medusa-style sparse tree sized from the held-out accuracies; "
      "the target verifies it with greedy (or any lossless) acceptance")),
    ("frozen target, transfer layers only trained on next-k-token prediction", "follows", "paper abstract",
     "cross-entropy of pseudo i against token t+i+1 of the target's own greedy responses (self-distillation)"),
    ("separate upper-layer pass at drafting time", "own reading",
     "the paper puts the pseudo tokens in the same forward as the verified tree",
     ("the k pseudo tokens run the upper layers in a separate pass on the (read-only, cropped) target KV cache "
      "after each verification; exactness is unchanged, but each step costs an extra k-token pass of the upper "
      "layers, so wall-clock speed is below the paper's single-forward scheme")),
    ("transfer layer and k", "own reading", "the paper's exact layer choice was not available here",
     ("l = hidden_states index 20 of SmolLM2-135M's 30 layers (upper 10 layers re-run), k = 4 pseudo tokens: "
      "the same draft depth and the same trained-parameter count as the 4 Medusa heads it is compared with")),
    ("transfer map from the last position only, identity initialisation", "own reading",
     "paper text on the map's inputs and initialisation not available",
     ("pseudo_i = W_i h_t + b_i from the last real position's layer-l state; W_i starts at the identity and b_i "
      "at zero, so an untrained transfer copies the real state forward")),
    ("equal loss weights, anchor sub-sampling", "own reading", "no training recipe available",
     ("uniform sum of the k cross-entropies (loss_decay 1); anchors_per_sequence random anchors per training "
      "sequence keep backpropagation through the frozen layers cheap on CPU; held-out evaluation uses every "
      "response position, as for the Medusa heads")),
    ("draft vocabulary", "own reading", "VocabTrim (arXiv 2506.22694), shared with the other heads",
     "the lm_head reads the pseudo states over the 8192 most frequent response tokens when drafting"),
)


def fidelity_markdown() -> str:
    """:data:`PAPER_FIDELITY` as two Markdown lists (follows the paper / this library's reading)."""
    out = []
    for verdict, title in (("follows", "Follows the paper (source checked):"),
                           ("own reading", "This library's reading (deviations and unknowns):")):
        out.append(title)
        out += [f"- **{name}**: {ours}. Source: {source}." for name, v, source, ours in PAPER_FIDELITY
                if v == verdict]
        out.append("")
    return "\n".join(out).rstrip() + "\n"


if __doc__ is not None:
    __doc__ += "\n" + fidelity_markdown()


class HiddenTransferConfig(DraftHeadConfig):
    """Configuration of :class:`HiddenTransfer`.

    Args:
        transfer_layer: ``hidden_states`` index of the state that is transferred (``l``: the output of decoder layer
            ``l - 1``); the pseudo states re-enter the target at decoder layer ``l``. Must be in
            ``[1, num_layers - 1]``; ``None`` (default): two thirds of the base model's depth, set by
            :meth:`from_base_config` or at ``attach`` (20 for SmolLM2-135M's 30 layers).
        num_transfer: ``k``, the number of pseudo tokens (draft depth).
        anchors_per_sequence: anchors sampled per training sequence (each adds ``k`` pseudo tokens to the forward).
        train_max_length: training sequences are cut to their last ``train_max_length`` tokens.
        loss_decay: weight ``loss_decay ** (i - 1)`` of pseudo ``i``'s cross-entropy.
    """

    model_type = "hf_decoding_ext_hidden_transfer"

    def __init__(self, transfer_layer: int | None = None, num_transfer: int = 4, anchors_per_sequence: int = 32,
                 train_max_length: int = 512, loss_decay: float = 1.0, **kwargs):
        super().__init__(**kwargs)
        if transfer_layer is not None and int(transfer_layer) < 1:
            raise ValueError(f"transfer_layer must be >= 1, got {transfer_layer!r}")
        if int(num_transfer) < 1:
            raise ValueError(f"num_transfer must be >= 1, got {num_transfer!r}")
        if int(anchors_per_sequence) < 1:
            raise ValueError(f"anchors_per_sequence must be >= 1, got {anchors_per_sequence!r}")
        if int(train_max_length) < 3:
            raise ValueError(f"train_max_length must be >= 3, got {train_max_length!r}")
        if not 0 < float(loss_decay) <= 1:
            raise ValueError(f"loss_decay must be in (0, 1], got {loss_decay!r}")
        self.transfer_layer = None if transfer_layer is None else int(transfer_layer)
        self.num_transfer = int(num_transfer)
        self.anchors_per_sequence = int(anchors_per_sequence)
        self.train_max_length = int(train_max_length)
        self.loss_decay = float(loss_decay)

    def from_base_config(self, base_config) -> HiddenTransferConfig:
        """Resolve ``transfer_layer=None`` to two thirds of ``base_config.num_hidden_layers`` (at least 1)."""
        if self.transfer_layer is None:
            self.transfer_layer = default_transfer_layer(int(base_config.num_hidden_layers))
        return self


def default_transfer_layer(num_layers: int) -> int:
    """Two thirds of the depth, at least 1 and at most ``num_layers - 1`` (20 of 30 for SmolLM2-135M)."""
    return max(1, min(num_layers - 1, round(2 * num_layers / 3)))


class HiddenTransfer(DraftHeadModel):
    """Hidden Transfer (Wu et al., "Parallel Decoding via Hidden Transfer for Lossless Large Language Model
    Acceleration", arXiv 2404.12022): ``num_transfer`` linear transfer layers at the target's layer
    ``transfer_layer``; their pseudo hidden states run the target's frozen upper layers (see the module docstring
    and :data:`PAPER_FIDELITY` for every deviation).

    Args:
        config: a :class:`HiddenTransferConfig`.

    Example:
        >>> from hf_decoding_ext.speculative.heads.hidden_transfer import HiddenTransfer, HiddenTransferConfig
        >>> head = HiddenTransfer(HiddenTransferConfig(hidden_size=576, vocab_size=49152)).attach(model)  # doctest: +SKIP
        >>> out = model(ids, output_hidden_states=True, use_cache=True)  # doctest: +SKIP
        >>> logits = head.draft_from_cache(out.hidden_states[20][0, -1], out.past_key_values,
        ...                                position=ids.shape[1])  # (k, draft_vocab)  # doctest: +SKIP
    """

    depth_key = "num_transfer"
    config_class = HiddenTransferConfig
    head_kind = "hidden-transfer"
    display_name = "Hidden Transfer layers (pseudo hidden states through the frozen upper layers)"
    method = "hidden-transfer"
    drafter = "hf_decoding_ext.speculative.drafters.hidden_transfer:HiddenTransferDrafter"
    shipped_name = "smollm2-135m-instruct-hidden-transfer"
    feature_layers = (20,)
    """The layer the pipeline caches for the default model (``transfer_layer=None`` resolves to 20 of its 30
    layers); an instance declares its own ``transfer_layer``."""
    training_defaults = {"lr": 1e-3, "batch_size": 4, "log_every": 5, "checkpoint_every": 50}
    shipped_recipe = {"budget": 32_000, "batch_size": 4, "lr": 2e-3, "weight_decay": 0.0, "warmup": 10,
                      "log_every": 5, "checkpoint_every": 50,
                      "head_options": {"num_transfer": 4, "anchors_per_sequence": 64},
                      "save_dtype": "float16"}
    """Budget 32k supervised positions (152 steps of 4 sequences x up to 64 anchors), not the 150k "small" budget: each
    position backpropagates through the 10 frozen upper layers (4 pseudo tokens) after a no-grad context pass, and
    the training-queue job also runs the one-off layer-20 feature pass over the 296k cached tokens (~7 min on the
    2-core machine); at 150k the job would take an estimated ~30 min uncontended, above the queue's ~10-12 min per job. The Medusa baseline
    of the comparison is retrained at the same 32k positions (``/work/distill/baselines/medusa-32k``, by
    ``scripts/eval_hidden_transfer.py``)."""
    card_config_keys = ("transfer_layer", "num_transfer", "anchors_per_sequence")

    def __init__(self, config: HiddenTransferConfig):
        super().__init__(config)
        if config.transfer_layer is not None:
            self.feature_layers = (config.transfer_layer,)
        h = config.hidden_size
        self.transfer = nn.ModuleList(nn.Linear(h, h) for _ in range(config.num_transfer))
        self.post_init()
        with torch.no_grad():  # identity start: an untrained transfer copies the real state forward
            for lin in self.transfer:
                lin.weight.copy_(torch.eye(h))
                lin.bias.zero_()

    @classmethod
    def card_sections(cls) -> str:
        """The model card's extra sections: the paper-fidelity list and, when the evaluation has been committed
        (``results/hidden_transfer_eval.json`` in a source checkout), the equal-budget comparison with Medusa."""
        import json
        from pathlib import Path

        out = "## Fidelity to the paper\n\n" + fidelity_markdown()
        path = Path(__file__).resolve().parents[3] / "results" / "hidden_transfer_eval.json"
        if path.exists():
            res = json.loads(path.read_text())
            arms = res["equal_budget"]
            rows = ["| arm | trained parameters | positions | " + " | ".join(
                f"top-1 depth {d + 1}" for d in range(len(arms["hidden-transfer"]["heldout_top1"]))) + " |",
                "|---|---|---|" + "---|" * len(arms["hidden-transfer"]["heldout_top1"])]
            for name, arm in arms.items():
                rows.append(f"| {name} | {arm['own_parameters']:,} | {arm['positions']:,} | "
                            + " | ".join(f"{a:.3f}" for a in arm["heldout_top1"]) + " |")
            out += ("\n## Equal-budget comparison with Medusa-1\n\n"
                    f"Same distillation data, held-out split and draft vocabulary, "
                    f"{res['settings']['budget_positions']:,} supervised positions each "
                    "(`scripts/eval_hidden_transfer.py`, `results/hidden_transfer_eval.json`); held-out top-1 "
                    "accuracy per draft depth on every response position of the 120 held-out sequences:\n\n"
                    + "\n".join(rows) + "\n\n"
                    f"Property (top-1 at every depth >= 2 above Medusa): "
                    f"{'holds' if res['summary']['property_holds'] else 'does not hold'}.\n")
            if res.get("parity"):
                out += (f"Greedy parity on SmolLM2-135M-Instruct: {res['summary']['lossless']} prompts "
                        f"token-identical ({res['settings']['parity_prompts']} prompts x "
                        f"{res['settings']['parity_new_tokens']} tokens), tokens per target forward "
                        f"{res['summary']['tokens_per_forward']} at a pinned {res['settings']['pinned_max_nodes']}-node "
                        "tree.\n")
        return out

    # ------------------------------------------------------------------------------------------------ target parts
    def attach(self, base_model) -> HiddenTransfer:
        mtype = getattr(base_model.config, "model_type", None)
        if mtype not in SUPPORTED_MODEL_TYPES:
            raise ValueError(f"unsupported architecture {type(base_model).__name__} (model_type {mtype!r}): Hidden "
                             f"Transfer re-enters the target's decoder with hidden states and supports "
                             f"{SUPPORTED_MODEL_TYPES}")
        n = len(decoder_layers(base_model))
        if self.config.transfer_layer is None:
            self.config.transfer_layer = default_transfer_layer(n)
            self.feature_layers = (self.config.transfer_layer,)
        if not 1 <= self.config.transfer_layer <= n - 1:
            raise ValueError(f"transfer_layer must be in [1, {n - 1}] for a {n}-layer model, got "
                             f"{self.config.transfer_layer}")
        super().attach(base_model)
        self._base["upper_layers"] = tuple(range(self.config.transfer_layer, n))
        self._base["upper"] = None
        return self

    def upper_decoder(self):
        """The target's decoder restricted to layers ``transfer_layer .. L - 1`` (shared modules, with its final
        norm), built once per attached model and held by reference."""
        base = self._require_base()
        if base.get("upper") is None:
            base["upper"] = decoder(layer_subset_model(base["model"], base["upper_layers"]))
        return base["upper"]

    def upper_cache(self, cache):
        """A view of ``cache`` (the full model's layer numbering) that the upper decoder reads and writes."""
        return LayerSubsetCache(cache, self._require_base()["upper_layers"])

    def new_cache(self):
        from transformers import DynamicCache

        return self.upper_cache(DynamicCache(config=self.target_model().config))

    def pseudo_states(self, h: torch.Tensor) -> torch.Tensor:
        """Pseudo hidden states ``(..., k, hidden)`` from layer-``l`` states ``(..., hidden)``."""
        h = h.to(self.dtype)
        return torch.stack([lin(h) for lin in self.transfer], dim=-2)

    def upper_forward(self, states: torch.Tensor, position_ids: torch.Tensor, cache, attention_mask=None):
        """Run ``states`` ``(B, Q, hidden)`` through the upper layers on ``cache`` (appending to it); returns the
        final-normed outputs ``(B, Q, hidden)`` (the lm_head's input)."""
        dec = self.upper_decoder()
        base = self._require_base()
        if "cache_arg" not in base:
            import inspect

            base["cache_arg"] = "cache" if "cache" in inspect.signature(dec.forward).parameters else "past_key_values"
        out = dec(inputs_embeds=states, attention_mask=attention_mask, position_ids=position_ids, use_cache=True,
                  **{base["cache_arg"]: cache})
        return out.last_hidden_state

    @torch.no_grad()
    def draft_from_cache(self, h_last: torch.Tensor, cache, position: int, context_mask=None) -> torch.Tensor:
        """Draft logits ``(k, draft_vocab)`` at inference: ``h_last`` ``(hidden,)`` is the layer-``l`` state of the
        last cached position, ``cache`` the target's KV cache (read only: it is cropped back to its length),
        ``position`` the position of the first pseudo token (the next token's), ``context_mask`` an optional
        ``(cache_length,)`` bool padding mask."""
        k = self.config.num_transfer
        view = self.upper_cache(cache)
        length = view.get_seq_length()
        dev = h_last.device
        allowed = torch.zeros(k, length + k, dtype=torch.bool, device=dev)
        allowed[:, :length] = True if context_mask is None else context_mask.to(dev).bool()[None, :length]
        allowed[:, length:] = torch.tril(torch.ones(k, k, dtype=torch.bool, device=dev))
        mask = additive_mask(allowed, self.dtype)
        pos = (position + torch.arange(k, device=dev))[None]
        try:
            feats = self.upper_forward(self.pseudo_states(h_last)[None], pos, view, mask)[0]
        finally:
            crop_layers(cache, length, self._require_base()["upper_layers"])
        return self.draft_logits(feats)

    def forward(self, layer_states: torch.Tensor, anchors: torch.Tensor, cache) -> torch.Tensor:
        """Training/evaluation forward: ``layer_states`` ``(B, T, hidden)`` real layer-``l`` states whose upper-layer
        keys/values are already in ``cache`` (the context pass), ``anchors`` ``(B, S)`` anchor positions (``-1``:
        padding). Returns draft logits ``(B, S, k, draft_vocab)`` of the pseudo tokens."""
        b, t, _ = layer_states.shape
        s, k = anchors.shape[1], self.config.num_transfer
        dev = layer_states.device
        a = anchors.clamp(min=0)
        h = layer_states.gather(1, a[..., None].expand(b, s, layer_states.shape[-1]))
        pseudo = self.pseudo_states(h).reshape(b, s * k, -1)
        pos = (a[..., None] + 1 + torch.arange(k, device=dev)).reshape(b, s * k)
        # each pseudo token sees the real context up to its anchor and its group's earlier pseudo tokens
        ctx = torch.arange(t, device=dev)[None, None, :] <= anchors[..., None]  # (B, S, T)
        ctx = ctx[:, :, None, :].expand(b, s, k, t).reshape(b, s * k, t)
        grp = torch.arange(s * k, device=dev)
        same = (grp[:, None] // k == grp[None, :] // k) & (grp[None, :] <= grp[:, None])
        allowed = torch.cat([ctx, same[None].expand(b, -1, -1)], dim=-1)
        mask = additive_mask(allowed, self.dtype)
        feats = self.upper_forward(pseudo, pos, cache, mask)
        return self.draft_logits(feats).reshape(b, s, k, -1)

    # ------------------------------------------------------------------------------------------------ training
    def _layer_key(self) -> str:
        return f"layer{self.config.transfer_layer}"

    def _batch(self, seqs, anchors_per_seq: int | None, generator=None, max_length: int | None = None) -> dict:
        k = self.config.num_transfer
        batch = collate_sequences(seqs, max_length or self.config.train_max_length, self.config.hidden_size,
                                  layers=(self.config.transfer_layer,))
        ids, valid, resp = batch["input_ids"], batch["valid"], batch["response"]
        rows = []
        for i in range(ids.shape[0]):
            n = int(valid[i].sum())
            r = int(resp[i].float().argmax()) if bool(resp[i].any()) else n
            lo = max(r - 1, 0)
            hi = n - 2 if anchors_per_seq is None else n - 3  # training: depth-1 target must exist
            cand = torch.arange(lo, hi + 1) if hi >= lo else torch.zeros(0, dtype=torch.long)
            if anchors_per_seq is not None and cand.numel() > anchors_per_seq:
                cand = cand[torch.randperm(cand.numel(), generator=generator)[:anchors_per_seq]].sort().values
            rows.append(cand)
        s = max(1, max(r.numel() for r in rows))
        anchors = torch.full((len(rows), s), -1, dtype=torch.long)
        targets = torch.full((len(rows), s, k), -100, dtype=torch.long)
        for i, cand in enumerate(rows):
            if cand.numel() == 0:
                continue
            n = int(valid[i].sum())
            anchors[i, :cand.numel()] = cand
            idx = cand[:, None] + 2 + torch.arange(k)[None]  # pseudo j (1-based) predicts x_{a + 1 + j}
            targets[i, :cand.numel()] = torch.where(idx < n, ids[i, idx.clamp(max=n - 1)], -100)
        dev = self.device
        return {"layer": batch[self._layer_key()].to(dev), "valid": valid.to(dev), "anchors": anchors.to(dev),
                "targets": targets.to(dev)}

    def train_batches(self, seqs, batch_size: int, seed: int = 0):
        """Endless batches of ``batch_size`` sequences, each with ``anchors_per_sequence`` random anchors."""
        g = torch.Generator().manual_seed(seed)
        seqs = [s for s in seqs if s.input_ids.shape[0] - s.response_start >= 2]
        while True:
            perm = torch.randperm(len(seqs), generator=g).tolist()
            for i in range(0, max(1, len(perm) - batch_size + 1), batch_size):
                yield self._batch([seqs[j] for j in perm[i:i + batch_size]], self.config.anchors_per_sequence, g)

    def eval_batches(self, seqs, batch_size: int):
        """Every response position of every sequence (the positions the Medusa heads are evaluated on), 2
        sequences per batch, uncut."""
        seqs = [s for s in seqs if s.input_ids.shape[0] - s.response_start >= 1]
        for i in range(0, len(seqs), 2):
            chunk = seqs[i:i + 2]
            yield self._batch(chunk, None, max_length=max(s.input_ids.shape[0] for s in chunk))

    def batch_positions(self, batch: dict) -> int:
        return int((batch["targets"][..., 0] >= 0).sum())

    def _logits(self, batch: dict) -> torch.Tensor:
        layer = batch["layer"].to(self.dtype)
        cache = self.new_cache()
        with torch.no_grad():  # the real context's upper-layer keys/values (right padding: causal is enough)
            self.upper_forward(layer, None, cache)
        return self(layer, batch["anchors"], cache)

    def training_loss(self, batch: dict, t2d: torch.Tensor) -> tuple[torch.Tensor, dict]:
        logits = self._logits(batch)
        total, metrics = 0.0, {}
        for i in range(self.config.num_transfer):
            target = batch["targets"][..., i].reshape(-1)
            target = torch.where(target >= 0, t2d[target.clamp(min=0)], target)
            if bool((target >= 0).any()):
                loss = F.cross_entropy(logits[:, :, i].reshape(target.shape[0], -1).float(), target,
                                       ignore_index=-100)
                total = total + self.config.loss_decay ** i * loss
                metrics[f"loss_{i + 1}"] = float(loss.detach())
        return total, metrics

    @torch.no_grad()
    def ranked_candidates(self, batch: dict, topk: int) -> tuple[torch.Tensor, torch.Tensor]:
        logits = self._logits(batch)  # (B, S, k, V)
        k = self.config.num_transfer
        cands = self.to_target(logits.topk(topk, dim=-1).indices)  # (B, S, k, topk)
        keep = (batch["anchors"] >= 0).reshape(-1)
        cands = cands.reshape(-1, k, topk)[keep].permute(1, 0, 2)
        targets = batch["targets"].reshape(-1, k)[keep].T
        return cands, targets


if HiddenTransfer.__doc__ is not None:
    HiddenTransfer.__doc__ += "\n" + "\n".join("    " + line if line else "" for line in fidelity_markdown().splitlines())


def untrained_head(model, num_transfer: int = 3, transfer_layer: int | None = None, noise: float = 0.0,
                   seed: int = 0) -> HiddenTransfer:
    """An untrained :class:`HiddenTransfer` head sized for ``model`` (not attached: the drafter attaches it, and
    refuses unsupported architectures then): transfer layer two thirds of the depth by default, identity transfer maps
    plus ``noise`` x a seeded Gaussian. For tests and tiny models.

    Example:
        >>> head = untrained_head(model, num_transfer=3)  # doctest: +SKIP
    """
    n = int(model.config.num_hidden_layers)
    layer = default_transfer_layer(n) if transfer_layer is None else int(transfer_layer)
    head = HiddenTransfer(HiddenTransferConfig(hidden_size=model.config.hidden_size,
                                               vocab_size=model.get_output_embeddings().weight.shape[0],
                                               transfer_layer=layer, num_transfer=num_transfer))
    if noise:
        g = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for lin in head.transfer:
                lin.weight.add_(noise * torch.randn(lin.weight.shape, generator=g))
    return head
