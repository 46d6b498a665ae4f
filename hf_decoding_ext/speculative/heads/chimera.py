"""Chimera draft model (Zeng et al., "Chimera: A Lossless Decoding Method for Accelerating Large Language Models
Inference by Fusing all Tokens", arXiv 2402.15758; official code kafkayu/Chimera).

Three parts over the frozen target: a **trigram encoder** (an MLP over the concatenated embeddings of three
consecutive tokens: short-range dependencies, cheap), a **full-context decoder** (one transformer layer whose query
is the trigram feature of the newest tokens and whose context is the target's last hidden states of *all* previous
tokens, so the long-range context costs one attention over representations the target already computed), and
**residual decoding heads** predicting successive future tokens from the decoder output added to the target's last
hidden state (the official heads are ``Linear(2H -> V)`` initialised with ``[lm_head, lm_head]``, i.e.
``lm_head(h + o)``; here ``lm_head(h + ResBlock_k(o))`` with the shared lm_head). The heads draft in parallel and
the candidates form a Medusa-style tree verified by the target.

What follows the paper / official code and what is this library's reading: :data:`PAPER_FIDELITY`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from transformers import DynamicCache
from transformers.models.llama.modeling_llama import LlamaDecoderLayer, LlamaRotaryEmbedding

from hf_decoding_ext.core.tree import additive_mask
from hf_decoding_ext.speculative.heads.base import DraftHeadModel, ResBlock, SequenceBatchesMixin, SequenceHeadConfig
from hf_decoding_ext.speculative.heads.clover import _results_section, fidelity_markdown

#: ``(component, "follows" | "own reading", source checked, what this library does)``.
PAPER_FIDELITY = (
    ("trigram encoder", "follows",
     ("Chimera paper; official Chimera_model.py trimlp = ResBlock(3H) then Linear(3H -> H, no bias) over "
      "concat(e_{t-2}, e_{t-1}, e_t)"),
     "the same MLP over the base model's (frozen) embeddings; the first positions repeat the first token's embedding"),
    ("full-context decoder", "follows",
     ("Chimera paper (one transformer layer fusing the LLM's last hidden states of all previous tokens with the "
      "trigram feature); official fast_layer1 = one LlamaDecoderLayer over [last hidden states; trigram features] "
      "where the trigram entry at position p+1 attends to hidden states 0..p and itself"),
     ("one Llama decoder layer with the base geometry; the query is the trigram feature ending at the root token "
      "x_{j+1} at position j+1, attending to the target's last hidden states h_0..h_j (kept in the decoder's KV "
      "cache at inference) and itself")),
    ("residual decoding heads", "follows",
     ("Chimera paper (heads read the decoder output together with the LLM's last hidden state); official "
      "chimera_head = Linear(2H -> V) initialised with [lm_head, lm_head] = lm_head(h + o)"),
     ("head k = lm_head(h_j + ResBlock_k(o)) with the base model's frozen lm_head (draft vocabulary rows), "
      "ResBlock_k starting at identity, so an untrained head is the official initialisation")),
    ("parallel heads", "follows",
     "Chimera paper (heads predict successive future tokens; Medusa-style tree verification)",
     ("head k drafts x_{j+1+k} from the one decoder output; the official training code instead rolls the decoder "
      "autoregressively on its own outputs for heads 2..4 (not done here)")),
    ("training loss", "follows",
     ("official chimera/train.py compute_loss: sum over heads of cross-entropy (weight 1 each); the model's "
      "hidden-state MSE (hsloss) is computed but not added to the loss"),
     ("sum over heads of cross-entropy (weight 1) against the target's greedy token (self-distillation labels); "
      "hidden_weight (default 0, as train.py) optionally adds the MSE of o to h_{j+1}")),
    ("lm_head sharing and draft vocabulary", "own reading",
     "official heads are full-vocabulary copies of the lm_head, trained",
     "the frozen base lm_head shared by reference, rows of the 8192 most frequent response tokens"),
    ("training data", "own reading",
     "official: ShareGPT conversations",
     "self-distillation: the base model's greedy answers to distill.jsonl"),
)


class ChimeraConfig(SequenceHeadConfig):
    """Configuration of :class:`ChimeraModel`.

    Args:
        layer_config: Llama decoder-layer geometry of the full-context decoder (copied from the base model).
        num_heads: residual decoding heads = tokens drafted after the root (the paper: 4).
        hidden_weight: weight of the MSE between the decoder output and the target's next hidden state (official
            train.py: 0, the loss is the heads' cross-entropy only).
        sequence_length: training sequences are cut to their last ``sequence_length`` tokens.
    """

    model_type = "hf_decoding_ext_chimera"

    def __init__(self, layer_config: dict | None = None, num_heads: int = 4, hidden_weight: float = 0.0,
                 sequence_length: int = 512, **kwargs):
        super().__init__(layer_config=layer_config, num_heads=num_heads, sequence_length=sequence_length, **kwargs)
        if float(hidden_weight) < 0:
            raise ValueError(f"hidden_weight must be >= 0, got {hidden_weight!r}")
        self.hidden_weight = float(hidden_weight)


def trigram_ids(ids: torch.Tensor) -> torch.Tensor:
    """``(B, T, 3)`` ids ``(x_{q-2}, x_{q-1}, x_q)`` at every position ``q``, left-padded with the first token."""
    first = ids[:, :1]
    padded = torch.cat([first, first, ids], dim=1)
    return torch.stack([padded[:, :-2], padded[:, 1:-1], padded[:, 2:]], dim=-1)


class ChimeraModel(SequenceBatchesMixin, DraftHeadModel):
    """Chimera: trigram encoder + full-context decoder + residual decoding heads (module docstring; deviations in
    :data:`PAPER_FIDELITY`).

    At the last verified position ``j`` (target feature ``h_j``, root token ``x_{j+1}``): ``g = Trigram(e(x_{j-1}),
    e(x_j), e(x_{j+1}))``; ``o = Decoder(g | h_0..h_j)`` at position ``j + 1``; head ``k`` gives
    ``lm_head(h_j + ResBlock_k(o))``, candidates for ``x_{j+1+k}``.

    Example:
        >>> from hf_decoding_ext.speculative.heads.chimera import ChimeraConfig, ChimeraModel
        >>> cfg = ChimeraConfig(hidden_size=576, vocab_size=49152)
        >>> cfg.from_base_config(model.config)  # doctest: +SKIP
        >>> head = ChimeraModel(cfg).attach(model)  # doctest: +SKIP
    """

    depth_key = "num_heads"
    config_class = ChimeraConfig
    head_kind = "chimera"
    display_name = "Chimera draft model (trigram encoder, full-context decoder, residual heads)"
    method = "chimera"
    drafter = "hf_decoding_ext.speculative.drafters.chimera:ChimeraDrafter"
    shipped_name = "smollm2-135m-instruct-chimera"
    training_defaults = {"lr": 1e-3, "batch_size": 8}  # batch_size counts sequences
    # equal budget with the Medusa/EAGLE baselines (600k positions); sequences cut to 256 tokens to keep the queue
    # job short (the per-position cost is dominated by the 4 depths x 8192-row lm_head, as for Medusa)
    shipped_recipe = {"budget": "comparison", "batch_size": 8, "lr": 1e-3, "weight_decay": 0.01,
                      "head_options": {"sequence_length": 256}, "save_dtype": "float16"}
    card_config_keys = ("num_heads", "hidden_weight", "sequence_length")

    def __init__(self, config: ChimeraConfig):
        super().__init__(config)
        h = config.hidden_size
        lc = config.llama_config()
        self.trigram = nn.Sequential(ResBlock(3 * h), nn.Linear(3 * h, h, bias=False))
        self.decoder = LlamaDecoderLayer(lc, layer_idx=0)
        self.rotary_emb = LlamaRotaryEmbedding(lc)
        self.heads = nn.ModuleList(ResBlock(h) for _ in range(config.num_heads))
        self.post_init()
        with torch.no_grad():  # official: trigram ResBlock and heads start at identity
            for lin in (self.trigram[0].linear, *[r.linear for r in self.heads]):
                lin.weight.zero_()
                lin.bias.zero_()

    def attach(self, base_model) -> ChimeraModel:
        super().attach(base_model)
        self.rotary_emb = LlamaRotaryEmbedding(self.config.llama_config()).to(self.d2t.device)
        return self

    def new_cache(self) -> DynamicCache:
        return DynamicCache(config=self.decoder.self_attn.config)

    # ------------------------------------------------------------------------------------------------ pieces
    def encode_trigrams(self, tri: torch.Tensor) -> torch.Tensor:
        """Trigram features ``(..., H)`` of id triples ``(..., 3)``."""
        e = self.embed(tri).to(self.dtype)
        return self.trigram(e.flatten(-2))

    def decode(self, x: torch.Tensor, position_ids: torch.Tensor, allowed: torch.Tensor, cache=None):
        """The full-context decoder layer over entries ``x (B, L, H)`` (boolean ``allowed (B, L, past + L)``)."""
        x = x.to(self.dtype)
        pos = self.rotary_emb(x, position_ids)
        return self.decoder(x, attention_mask=additive_mask(allowed, self.dtype), position_ids=position_ids,
                            cache=cache, use_cache=cache is not None, position_embeddings=pos)

    def head_logits(self, k: int, hidden: torch.Tensor, decoded: torch.Tensor) -> torch.Tensor:
        """Draft-vocabulary logits of head ``k`` (1-based) from ``h_j`` and the decoder output."""
        if not 1 <= k <= self.config.num_heads:
            raise ValueError(f"head index must be in [1, {self.config.num_heads}], got {k}")
        return self.draft_logits(hidden.to(self.dtype) + self.heads[k - 1](decoded))

    def decoded_sequence(self, hidden: torch.Tensor, input_ids: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
        """Decoder outputs ``(B, T - 1, H)``: entry ``p`` is the query at position ``p + 1`` (trigram ending at
        ``x_{p+1}``) over ``h_0..h_p``, all anchors of a sequence in one pass."""
        b, t = input_ids.shape
        n = t - 1
        dev = input_ids.device
        g = self.encode_trigrams(trigram_ids(input_ids))[:, 1:]
        x = torch.cat([hidden[:, :n].to(self.dtype), g], dim=1)
        hv = valid[:, :n]
        causal = torch.tril(torch.ones(n, n, dtype=torch.bool, device=dev))
        eye = torch.eye(n, dtype=torch.bool, device=dev)
        top = torch.cat([(causal[None] & hv[:, None, :]) | eye[None], torch.zeros(b, n, n, dtype=torch.bool,
                                                                                   device=dev)], dim=2)
        bottom = torch.cat([causal[None] & hv[:, None, :], eye[None].expand(b, -1, -1)], dim=2)
        allowed = torch.cat([top, bottom], dim=1)
        ar = torch.arange(n, device=dev)
        pos = torch.cat([ar, ar + 1])[None].expand(b, -1)
        return self.decode(x, pos, allowed)[:, n:]

    def forward(self, hidden_states: torch.Tensor, input_ids: torch.Tensor, valid: torch.Tensor | None = None):
        """Logits ``(num_heads, B, T - 1, draft_vocab)`` at every anchor ``p < T - 1`` (root token ``x_{p+1}``
        from ``input_ids``)."""
        b, t = input_ids.shape
        valid = torch.ones(b, t, dtype=torch.bool, device=input_ids.device) if valid is None else valid
        o = self.decoded_sequence(hidden_states, input_ids, valid)
        h = hidden_states[:, : t - 1]
        return torch.stack([self.head_logits(k, h, o) for k in range(1, self.config.num_heads + 1)])

    # ------------------------------------------------------------------------------------------------ training
    def training_loss(self, batch: dict, t2d: torch.Tensor) -> tuple[torch.Tensor, dict]:
        """Sum over heads of cross-entropy (official train.py weights: 1 each) + ``hidden_weight`` x MSE."""
        hid, ids, valid = batch["hidden"], batch["input_ids"], batch["valid"]
        t = ids.shape[1]
        o = self.decoded_sequence(hid, ids, valid)
        h = hid[:, : t - 1].to(self.dtype)
        total, metrics = o.sum() * 0.0, {}
        for k in range(1, self.config.num_heads + 1):
            tgt = self.depth_targets(batch, k)[:, : t - 1]
            tgt = torch.where(tgt >= 0, t2d[tgt.clamp(min=0)], tgt)
            if bool((tgt >= 0).any()):
                logits = self.head_logits(k, h, o)
                loss = F.cross_entropy(logits.float().flatten(0, 1), tgt.flatten(), ignore_index=-100)
                total = total + loss
                metrics[f"loss_{k}"] = float(loss.detach())
        if self.config.hidden_weight:
            m = (valid[:, 1:] & valid[:, :-1]).to(o.dtype)
            mse = ((o - hid[:, 1:].to(o.dtype)) ** 2).mean(-1)
            mse = (mse * m).sum() / m.sum().clamp(min=1)
            total = total + self.config.hidden_weight * mse
            metrics["mse"] = float(mse.detach())
        return total, metrics

    @torch.no_grad()
    def ranked_candidates(self, batch: dict, topk: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Candidates ``(num_heads, N, topk)`` (target ids) and targets ``(num_heads, N)`` at every anchor."""
        logits = self(batch["hidden"], batch["input_ids"], batch["valid"])
        t = batch["input_ids"].shape[1]
        cands = self.to_target(logits.topk(topk, dim=-1).indices).flatten(1, 2)
        targets = torch.stack([self.depth_targets(batch, k)[:, : t - 1]
                               for k in range(1, self.config.num_heads + 1)])
        return cands, targets.flatten(1)

    @classmethod
    def card_sections(cls) -> str:
        return ("## Fidelity to the paper\n\n" + fidelity_markdown(PAPER_FIDELITY) + "\n"
                + _results_section("chimera"))


if __doc__ is not None:
    __doc__ += "\n" + fidelity_markdown(PAPER_FIDELITY)


def untrained_head(model, noise: float = 0.0, seed: int = 0, **options) -> ChimeraModel:
    """A new Chimera model sized for ``model`` (config ``options``) and attached to it; ``noise > 0`` perturbs
    every weight (a trained-looking head for mechanism tests).

    Example:
        >>> head = untrained_head(model, num_heads=3)  # doctest: +SKIP
    """
    return ChimeraModel.untrained(model, noise=noise, seed=seed, **options)
