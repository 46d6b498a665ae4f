"""Clover heads (Xiao et al., "Clover: Regressive Lightweight Speculative Decoding with Sequential Knowledge",
arXiv 2405.00263; official code XiaoBin1992/clover).

Medusa's heads guess every future token from the same last hidden state. Clover makes them *regressive*: the
embedding of the token speculated at depth ``d - 1`` (the tree root for ``d = 1``) feeds the head of depth ``d``
together with the previous depth's state (**Regressive Connection**), and that query reads the context through a
cross-attention (**Attention Decoder**) whose keys and values are the target's last hidden states of all previous
tokens after one extra transformer block (**Augmenting Block**), which adapts the target's features to the
speculative objective. Head ``d`` is a residual block read by the base model's shared lm_head.

What follows the paper / official code and what is this library's reading: :data:`PAPER_FIDELITY` (rendered below
and in the model card).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from transformers import DynamicCache
from transformers.models.llama.modeling_llama import LlamaDecoderLayer, LlamaRMSNorm, LlamaRotaryEmbedding

from hf_decoding_ext.core.tree import additive_mask
from hf_decoding_ext.speculative.heads.base import DraftHeadModel, ResBlock, SequenceBatchesMixin, SequenceHeadConfig

#: ``(component, "follows" | "own reading", source checked, what this library does)``.
PAPER_FIDELITY = (
    ("regressive connection", "follows",
     "Clover paper (the previous head's speculated token embedding feeds the next head, RNN-style)",
     ("depth d reads the embedding of the token on its tree path at depth d - 1 (the root token, the target's own "
      "next token, at depth 1) and the state of depth d - 1 (the target's last hidden state h_j at depth 1): "
      "x = s + SiLU(W [e; s] + b), one cell shared by all depths as in the official clover2.py rnn cell")),
    ("attention decoder", "follows",
     ("Clover paper (cross-attention: query from the token embedding and the previous state, keys/values from the "
      "context's hidden states)"),
     ("multi-head cross-attention (the base layer's head geometry, no rotary position) from RMSNorm(x) to the "
      "augmented hidden states of positions 0..j, output projection added to x; shared by all depths")),
    ("augmenting block", "follows",
     "Clover paper (one transformer block over the LLM's last hidden states, trained for the speculative task)",
     ("one Llama decoder layer with the base model's layer geometry, causal over the committed sequence, run "
      "incrementally with its own KV cache at inference")),
    ("heads and lm_head", "own reading",
     "Clover paper / Medusa: per-head residual MLP, each head with its own lm_head copy (clover2.py trains a head)",
     ("one residual block per depth, read by the base model's frozen lm_head (shared by reference, rows of the "
      "8192-token draft vocabulary), so the checkpoint stays a few MB")),
    ("initialisation", "own reading",
     ("clover2.py initialises the augmenting block from the base model's last layer and the rnn cell near identity "
      "(eye + uniform)"),
     ("regressive cell, decoder output projection and heads start at zero, so an untrained head repeats the "
      "target's next-token prediction (Medusa's safe start); the augmenting block starts random")),
    ("training loss", "own reading",
     ("Clover paper: cross-entropy per head with Medusa's decay; Clover-2 adds a distillation loss and EAGLE-style "
      "feature regression (not used here)"),
     ("teacher forcing on whole sequences (collate_sequences), sum over depths of loss_decay**(d-1) x cross-entropy "
      "against the target's greedy token (self-distillation labels, every position counted)")),
    ("Clover-2 changes", "own reading",
     "Clover-2 (arXiv 2408.00264): extra distillation loss, augmenting block on the first head's input, more layers",
     "none used: this is Clover (v1) as the paper describes it"),
    ("draft tree", "own reading",
     "Clover paper: Medusa-style static sparse tree",
     "a static tree from the measured per-depth accuracies (build_choice_tree), filled depth by depth"),
)


def fidelity_markdown(fidelity=PAPER_FIDELITY) -> str:
    """``fidelity`` as two Markdown lists: what follows the paper, then this library's reading."""
    out = []
    for verdict, title in (("follows", "Follows the paper (source checked):"),
                           ("own reading", "This library's reading (differs from, or is not in, the source):")):
        out.append(title)
        out += [f"- **{name}**: {ours}. Source: {source}." for name, v, source, ours in fidelity if v == verdict]
        out.append("")
    return "\n".join(out).rstrip() + "\n"


if __doc__ is not None:
    __doc__ += "\n" + fidelity_markdown()


class CloverConfig(SequenceHeadConfig):
    """Configuration of :class:`CloverModel`.

    Args:
        layer_config: Llama decoder-layer geometry of the augmenting block (copied from the base model by
            :meth:`from_base_config`).
        num_heads: tokens drafted after the root (tree depth; the paper: 4 heads).
        loss_decay: weight ``loss_decay ** (d - 1)`` of depth ``d``'s cross-entropy (Medusa's decay, 0.8).
        sequence_length: training sequences are cut to their last ``sequence_length`` tokens.
    """

    model_type = "hf_decoding_ext_clover"

    def __init__(self, layer_config: dict | None = None, num_heads: int = 4, loss_decay: float = 0.8,
                 sequence_length: int = 512, **kwargs):
        super().__init__(layer_config=layer_config, num_heads=num_heads, sequence_length=sequence_length, **kwargs)
        if not 0 < float(loss_decay) <= 1:
            raise ValueError(f"loss_decay must be in (0, 1], got {loss_decay!r}")
        self.loss_decay = float(loss_decay)


def causal_allowed(valid: torch.Tensor) -> torch.Tensor:
    """``(B, T, T)`` causal pattern over valid keys (each row also sees itself, so padded rows stay finite)."""
    t = valid.shape[1]
    eye = torch.eye(t, dtype=torch.bool, device=valid.device)[None]
    return (torch.tril(torch.ones(t, t, dtype=torch.bool, device=valid.device))[None] & valid[:, None, :]) | eye


class CloverModel(SequenceBatchesMixin, DraftHeadModel):
    """Clover: regressive connection + attention decoder + augmenting block, over the base model's frozen
    embeddings and lm_head (module docstring; deviations in :data:`PAPER_FIDELITY`).

    At anchor ``j`` (the last verified position, feature ``h_j``), with the augmented context
    ``a_{0..j} = AugmentingBlock(h_{0..j})``: ``s_0 = h_j``; for depth ``d = 1..num_heads``,
    ``x_d = s_{d-1} + SiLU(W_r [e(t_d); s_{d-1}] + b_r)`` where ``t_d`` is the path token at depth ``d - 1``
    (``t_1`` = the tree root), ``s_d = x_d + W_o CrossAttn(RMSNorm(x_d), a_{0..j})`` and depth ``d``'s logits are
    ``lm_head(ResBlock_d(s_d))`` over the draft vocabulary, candidates for ``x_{j+1+d}``.

    Example:
        >>> from hf_decoding_ext.speculative.heads.clover import CloverConfig, CloverModel
        >>> cfg = CloverConfig(hidden_size=576, vocab_size=49152)
        >>> cfg.from_base_config(model.config)  # doctest: +SKIP
        >>> head = CloverModel(cfg).attach(model)  # doctest: +SKIP
    """

    depth_key = "num_heads"
    config_class = CloverConfig
    head_kind = "clover"
    display_name = "Clover heads (regressive connection, attention decoder, augmenting block)"
    method = "clover"
    drafter = "hf_decoding_ext.speculative.drafters.clover:CloverDrafter"
    shipped_name = "smollm2-135m-instruct-clover"
    training_defaults = {"lr": 1e-3, "batch_size": 8}  # batch_size counts sequences
    # equal budget with the Medusa/EAGLE baselines (600k positions); sequences cut to 256 tokens to keep the queue
    # job short (the per-position cost is dominated by the 4 depths x 8192-row lm_head, as for Medusa)
    shipped_recipe = {"budget": "comparison", "batch_size": 8, "lr": 1e-3, "weight_decay": 0.01,
                      "head_options": {"sequence_length": 256}, "save_dtype": "float16"}
    card_config_keys = ("num_heads", "loss_decay", "sequence_length")

    def __init__(self, config: CloverConfig):
        super().__init__(config)
        h = config.hidden_size
        lc = config.llama_config()
        self.augmenting_block = LlamaDecoderLayer(lc, layer_idx=0)
        self.rotary_emb = LlamaRotaryEmbedding(lc)
        self.num_q = lc.num_attention_heads
        self.num_kv = lc.num_key_value_heads or lc.num_attention_heads
        self.head_dim = getattr(lc, "head_dim", None) or h // self.num_q
        self.regressive = nn.Linear(2 * h, h)
        self.decoder_norm = LlamaRMSNorm(h, eps=lc.rms_norm_eps)
        self.q_proj = nn.Linear(h, self.num_q * self.head_dim, bias=False)
        self.k_proj = nn.Linear(h, self.num_kv * self.head_dim, bias=False)
        self.v_proj = nn.Linear(h, self.num_kv * self.head_dim, bias=False)
        self.o_proj = nn.Linear(self.num_q * self.head_dim, h, bias=False)
        self.heads = nn.ModuleList(ResBlock(h) for _ in range(config.num_heads))
        self.post_init()
        with torch.no_grad():  # untrained: s_d = h_j and the heads repeat the target's prediction
            for lin in (self.regressive, self.o_proj, *[r.linear for r in self.heads]):
                lin.weight.zero_()
                if lin.bias is not None:
                    lin.bias.zero_()

    def attach(self, base_model) -> CloverModel:
        super().attach(base_model)
        self.rotary_emb = LlamaRotaryEmbedding(self.config.llama_config()).to(self.d2t.device)  # fp32 frequencies
        return self

    def new_cache(self) -> DynamicCache:
        return DynamicCache(config=self.augmenting_block.self_attn.config)

    # ------------------------------------------------------------------------------------------------ pieces
    def augment(self, hidden: torch.Tensor, position_ids: torch.Tensor, attention_mask: torch.Tensor,
                cache=None) -> torch.Tensor:
        """Augmenting block over target features ``(B, T, H)`` (additive mask ``(B, 1, T, past + T)``)."""
        x = hidden.to(self.dtype)
        pos = self.rotary_emb(x, position_ids)
        return self.augmenting_block(x, attention_mask=attention_mask.to(x.dtype), position_ids=position_ids,
                                     cache=cache, use_cache=cache is not None, position_embeddings=pos)

    def context_kv(self, augmented: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys and values ``(B, kv_heads, T, head_dim)`` of the attention decoder over augmented states."""
        b, t, _ = augmented.shape
        k = self.k_proj(augmented).view(b, t, self.num_kv, self.head_dim).transpose(1, 2)
        v = self.v_proj(augmented).view(b, t, self.num_kv, self.head_dim).transpose(1, 2)
        return k, v

    def step(self, state: torch.Tensor, token_ids: torch.Tensor, keys: torch.Tensor, values: torch.Tensor,
             allowed: torch.Tensor | None = None) -> torch.Tensor:
        """One regressive depth: ``state (B, Q, H)``, ``token_ids (B, Q)``, context ``keys/values
        (B, kv_heads, T, head_dim)``, ``allowed (B, Q, T)`` (``None``: every key) -> next state ``(B, Q, H)``."""
        e = self.embed(token_ids).to(self.dtype)
        x = state + F.silu(self.regressive(torch.cat([e, state], dim=-1)))
        b, q, _ = x.shape
        query = self.q_proj(self.decoder_norm(x)).view(b, q, self.num_q, self.head_dim).transpose(1, 2)
        rep = self.num_q // self.num_kv
        k = keys.repeat_interleave(rep, dim=1) if rep > 1 else keys
        v = values.repeat_interleave(rep, dim=1) if rep > 1 else values
        mask = None if allowed is None else allowed[:, None]
        att = F.scaled_dot_product_attention(query, k, v, attn_mask=mask)
        return x + self.o_proj(att.transpose(1, 2).reshape(b, q, -1))

    def head_logits(self, d: int, state: torch.Tensor) -> torch.Tensor:
        """Draft-vocabulary logits of depth ``d`` (1-based) from its state."""
        if not 1 <= d <= self.config.num_heads:
            raise ValueError(f"depth must be in [1, {self.config.num_heads}], got {d}")
        return self.draft_logits(self.heads[d - 1](state))

    def forward(self, hidden_states: torch.Tensor, input_ids: torch.Tensor, valid: torch.Tensor | None = None):
        """Teacher-forced logits ``(num_heads, B, T, draft_vocab)`` over sequences: depth ``d`` at anchor ``j``
        reads the true tokens ``x_{j+1} .. x_{j+d}`` (``hidden_states (B, T, H)``, ``input_ids (B, T)``)."""
        b, t = input_ids.shape
        valid = torch.ones(b, t, dtype=torch.bool, device=input_ids.device) if valid is None else valid
        allowed = causal_allowed(valid)
        pos = torch.arange(t, device=input_ids.device)[None].expand(b, -1)
        hid = hidden_states.to(self.dtype)
        keys, values = self.context_kv(self.augment(hid, pos, additive_mask(allowed, self.dtype)))
        state, out = hid, []
        for d in range(1, self.config.num_heads + 1):
            state = self.step(state, self.shifted_ids(input_ids, d), keys, values, allowed)
            out.append(self.head_logits(d, state))
        return torch.stack(out)

    # ------------------------------------------------------------------------------------------------ training
    def training_loss(self, batch: dict, t2d: torch.Tensor) -> tuple[torch.Tensor, dict]:
        """Sum over depths of ``loss_decay ** (d - 1)`` x cross-entropy against the target's greedy token."""
        logits = self(batch["hidden"], batch["input_ids"], batch["valid"])
        total, metrics = logits.sum() * 0.0, {}
        for d in range(1, self.config.num_heads + 1):
            tgt = self.depth_targets(batch, d)
            tgt = torch.where(tgt >= 0, t2d[tgt.clamp(min=0)], tgt)
            if bool((tgt >= 0).any()):
                loss = F.cross_entropy(logits[d - 1].float().flatten(0, 1), tgt.flatten(), ignore_index=-100)
                total = total + self.config.loss_decay ** (d - 1) * loss
                metrics[f"loss_{d}"] = float(loss.detach())
        return total, metrics

    @torch.no_grad()
    def ranked_candidates(self, batch: dict, topk: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Teacher-forced candidates ``(num_heads, N, topk)`` (target ids) and targets ``(num_heads, N)``."""
        logits = self(batch["hidden"], batch["input_ids"], batch["valid"])
        cands = self.to_target(logits.topk(topk, dim=-1).indices).flatten(1, 2)
        targets = torch.stack([self.depth_targets(batch, d) for d in range(1, self.config.num_heads + 1)])
        return cands, targets.flatten(1)

    @classmethod
    def card_sections(cls) -> str:
        return "## Fidelity to the paper\n\n" + fidelity_markdown() + "\n" + _results_section("clover")


def _results_section(kind: str) -> str:
    """The measured property figures (``results/clover_chimera_eval.json``), when present."""
    import json
    from pathlib import Path

    path = Path(__file__).resolve().parents[3] / "results" / "clover_chimera_eval.json"
    if not path.exists():
        return ""
    try:
        summary = json.loads(path.read_text()).get("summary", {}).get(kind)
    except (OSError, ValueError):
        return ""
    if not summary:
        return ""
    lines = [f"- {k}: {v}" for k, v in summary.items()]
    return "## Property measured (results/clover_chimera_eval.json)\n\n" + "\n".join(lines) + "\n"


def untrained_head(model, noise: float = 0.0, seed: int = 0, **options) -> CloverModel:
    """A new Clover head sized for ``model`` (config ``options``) and attached to it; ``noise > 0`` perturbs every
    weight (a trained-looking head for mechanism tests).

    Example:
        >>> head = untrained_head(model, num_heads=3)  # doctest: +SKIP
    """
    return CloverModel.untrained(model, noise=noise, seed=seed, **options)
