"""Blockwise Parallel Decoding proposal heads (Stern, Shazeer, Uszkoreit, "Blockwise Parallel Decoding for Deep
Autoregressive Models", NeurIPS 2018, arXiv 1811.03115).

The base model is ``p_1``; ``block_size - 1`` proposal heads ``p_2 .. p_k`` predict the tokens 2..k positions ahead
from the base model's decoder output at the last position. As in the paper, the heads
are ONE feed-forward layer inserted after the decoder output (the paper's implementation section: hidden size
``k x d_hidden``, output size ``k x d_model``), here with ``k - 1`` chunks since ``p_1`` is the frozen base; the output
is split into one ``d_model`` chunk per head, each chunk gets a residual connection to the decoder output, and every
head is read through the shared vocabulary projection (here the base model's own lm_head, frozen and borrowed by
reference, never stored in the checkpoint).

What follows the paper and what is this library's reading is listed item by item in :data:`PAPER_FIDELITY`
(rendered below and in the model card). Sources: the paper's abstract and algorithm (predict / verify / accept,
checked) and the project's brief of its implementation description (one FFN, residual, shared projection; not
re-checked against the full text here). The paper says its code is in Tensor2Tensor; it was not read.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from hf_decoding_ext.speculative.heads.base import DraftHeadConfig, DraftHeadModel

PAPER_FIDELITY = (
    ("one feed-forward layer split into per-head chunks, residual, shared vocabulary projection", "follows",
     "paper, implementation section (a single FFN with hidden size k x d_hidden and output size k x d_model after the decoder "
     "output, split into k chunks with a residual connection each, then the shared vocabulary projection)",
     "Linear(d_model -> (k-1) x hidden_per_head) -> ReLU -> Linear(-> (k-1) x d_model), split per head, plus the "
     "decoder output, read by the base lm_head"),
    ("frozen base model (p_1 = the base model)", "follows",
     "paper, experiments (the 'frozen' setting: only the proposal heads are trained, quality identical to the base)",
     "the base model is never modified; p_1 is its own lm_head, so only k - 1 chunks are trained"),
    ("predict / verify / accept with exact match, one target call per iteration", "follows",
     "paper, algorithm (predict / verify / accept: longest prefix with proposal == argmax of p_1; combined scoring and proposal)",
     "the speculative engine verifies the chain in one target forward whose last accepted feature also drives "
     "the next block's proposals (the combined schedule); token-identical to greedy"),
    ("relaxed acceptance (top-k membership, distance)", "follows",
     "paper, approximate inference ( top-k selection, distance-based for ordinal outputs)",
     "registered acceptance rules 'blockwise-top-k' and 'blockwise-distance' (lossy: outputs may differ from "
     "greedy); the distance criterion uses the token-id distance, meaningful only for ordinal vocabularies"),
    ("training objective", "own reading",
     "paper: heads trained with the sum of per-position cross-entropies on the training references",
     "sum over heads of cross-entropy against the base model's own greedy tokens (self-distillation data, "
     "draft vocabulary of the 8192 most frequent target tokens); no loss decay"),
    ("hidden width", "own reading",
     "paper: d_hidden is the model's FFN width (per head)",
     "the shipped heads use hidden_per_head 384 instead of SmolLM2's FFN width 1536, to keep the checkpoint small "
     "(~9 MB at fp16 for 4 heads) and the training within the shared queue's 10 minutes"),
    ("initialisation", "own reading",
     "paper: not stated",
     "the output projection starts at zero so an untrained head repeats the base prediction (Medusa's choice)"),
    ("sequence-level distillation / fine-tuning the base", "not used",
     "paper, experiments (fine-tuned and distilled variants change the base model)",
     "not used: the base must stay lossless-verifiable, the issue's frozen-target setting"),
)


def fidelity_markdown() -> str:
    """:data:`PAPER_FIDELITY` as Markdown lists: what follows the paper, then this library's reading.

    Example:
        >>> from hf_decoding_ext.speculative.heads.blockwise import fidelity_markdown
        >>> fidelity_markdown().splitlines()[0]
        'Follows the paper (source checked):'
    """
    out = []
    for verdict, title in (("follows", "Follows the paper (source checked):"),
                           ("own reading", "This library's reading (differs from, or is not in, the paper):"),
                           ("not used", "Not used:")):
        out.append(title)
        out += [f"- **{name}**: {ours}. Source: {source}." for name, v, source, ours in PAPER_FIDELITY if v == verdict]
        out.append("")
    return "\n".join(out).rstrip() + "\n"


if __doc__ is not None:  # None under python -OO
    __doc__ += "\n" + fidelity_markdown()


class BlockwiseConfig(DraftHeadConfig):
    """Configuration of :class:`BlockwiseHeads`.

    Args:
        block_size: the paper's ``k``: tokens proposed per block, the base model's own next token included, so
            there are ``block_size - 1`` proposal heads (>= 2).
        hidden_per_head: the paper's ``d_hidden``; the shared feed-forward layer has ``(block_size - 1) x
            hidden_per_head`` hidden units (``None``: ``hidden_size``).
        activation: ``"relu"`` (the Transformer FFN of the paper) or ``"silu"``.
    """

    model_type = "hf_decoding_ext_blockwise"

    def __init__(self, block_size: int = 5, hidden_per_head: int | None = None, activation: str = "relu",
                 **kwargs):
        super().__init__(**kwargs)
        if not isinstance(block_size, int) or block_size < 2:
            raise ValueError(f"block_size must be an integer >= 2, got {block_size!r}")
        if hidden_per_head is not None and (not isinstance(hidden_per_head, int) or hidden_per_head < 1):
            raise ValueError(f"hidden_per_head must be a positive integer or None, got {hidden_per_head!r}")
        if activation not in ("relu", "silu"):
            raise ValueError(f"activation must be 'relu' or 'silu', got {activation!r}")
        self.block_size = block_size
        self.hidden_per_head = hidden_per_head
        self.activation = activation

    @property
    def num_heads(self) -> int:
        """Proposal heads (``block_size - 1``)."""
        return self.block_size - 1


class BlockwiseHeads(DraftHeadModel):
    """Blockwise Parallel Decoding proposal heads (Stern et al. 2018, arXiv 1811.03115): ``block_size - 1`` heads
    sharing one feed-forward layer over the base model's last feature; head ``j`` (``j = 1 .. k-1``) at position ``t``
    predicts token ``t + j + 1`` (the base model's lm_head, ``p_1``, predicts ``t + 1``). Only the feed-forward layer
    is stored (the vocabulary projection is the base lm_head, shared by reference).

    Args:
        config: a :class:`BlockwiseConfig`.

    Deviations from the paper (full list: :data:`PAPER_FIDELITY`): the base is frozen (p_1 = base lm_head), heads
    are trained on the base model's own greedy tokens, the shipped ``hidden_per_head`` is 384 (not the FFN width)
    and the output projection is zero-initialised.

    Example:
        >>> from hf_decoding_ext.speculative.heads.blockwise import BlockwiseConfig, BlockwiseHeads
        >>> heads = BlockwiseHeads(BlockwiseConfig(hidden_size=32, vocab_size=128, block_size=4))
        >>> heads.depth
        3
        >>> heads.features(torch.zeros(2, 32)).shape
        torch.Size([3, 2, 32])
    """

    depth_key = "num_heads"
    config_class = BlockwiseConfig
    head_kind = "blockwise"
    display_name = "Blockwise Parallel Decoding proposal heads"
    method = "blockwise-parallel"
    drafter = "hf_decoding_ext.speculative.drafters.blockwise:BlockwiseDrafter"
    shipped_name = "smollm2-135m-instruct-blockwise"
    training_defaults = {"lr": 1e-3, "batch_size": 256}
    shipped_recipe = {"budget": "comparison", "batch_size": 256, "lr": 2e-3, "weight_decay": 0.01,
                      "head_options": {"block_size": 5, "hidden_per_head": 384}, "save_dtype": "float16"}
    """The comparison budget (600k supervised positions, the same data, batch, lr and draft vocabulary as the Medusa
    baseline ``medusa-600k``), so per-head accuracies compare at an equal budget."""
    card_config_keys = ("block_size", "hidden_per_head", "activation")

    def __init__(self, config: BlockwiseConfig):
        super().__init__(config)
        d = config.hidden_size
        width = config.hidden_per_head or d
        k = config.num_heads
        self.ffn_in = nn.Linear(d, k * width)
        self.ffn_out = nn.Linear(k * width, k * d)
        self.post_init()
        with torch.no_grad():  # an untrained head repeats the base model's prediction
            self.ffn_out.weight.zero_()
            self.ffn_out.bias.zero_()

    def features(self, hidden_states: torch.Tensor) -> torch.Tensor:
        """Per-head features ``(num_heads, ..., hidden)``: chunk ``j`` of the FFN output plus the decoder output."""
        act = F.relu if self.config.activation == "relu" else F.silu
        out = self.ffn_out(act(self.ffn_in(hidden_states)))
        chunks = out.unflatten(-1, (self.config.num_heads, self.config.hidden_size))  # (..., k-1, d)
        return chunks.movedim(-2, 0) + hidden_states.unsqueeze(0)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        """Draft-vocabulary logits ``(num_heads, ..., draft_vocab)``."""
        return self.draft_logits(self.features(hidden_states))

    # ------------------------------------------------------------------------------------------------ training
    def training_loss(self, batch: dict, t2d: torch.Tensor) -> tuple[torch.Tensor, dict]:
        """Sum over heads of the cross-entropy against the base model's greedy tokens on a position batch
        (``hidden (B, h)``, ``tokens (B, 1 + num_heads)``)."""
        logits = self(batch["hidden"].to(self.dtype))
        total, metrics = 0.0, {}
        for j in range(self.config.num_heads):
            target = batch["tokens"][:, j + 1]
            target = torch.where(target >= 0, t2d[target.clamp(min=0)], target)
            if bool((target >= 0).any()):
                loss = F.cross_entropy(logits[j].float(), target, ignore_index=-100)
                total = total + loss
                metrics[f"loss_{j + 1}"] = float(loss.detach())
        return total, metrics

    @torch.no_grad()
    def ranked_candidates(self, batch: dict, topk: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Each head's best ``topk`` candidates ``(num_heads, B, topk)`` (target ids) and the targets
        ``(num_heads, B)``."""
        cands = self.to_target(self(batch["hidden"].to(self.dtype)).topk(topk, dim=-1).indices)
        return cands, batch["tokens"][:, 1:].T

    @classmethod
    def card_sections(cls) -> str:
        """Model-card sections: the deviation list and the measured property figures (if committed)."""
        import json
        from pathlib import Path

        text = "## Fidelity to the paper\n\n" + fidelity_markdown()
        path = Path(__file__).resolve().parents[3] / "results" / "blockwise_eval.json"
        if path.exists():
            summary = json.loads(path.read_text()).get("summary", {})
            if summary:
                text += "\n## Measured (results/blockwise_eval.json)\n\n"
                text += "\n".join(f"- {k}: {v}" for k, v in summary.items() if not isinstance(v, dict))
                text += "\n"
        return text


def random_blockwise_heads(model, block_size: int = 4, seed: int = 0, scale: float = 0.5) -> BlockwiseHeads:
    """Untrained blockwise heads for ``model`` with a random (not zero) output projection, attached: drafts that are
    sometimes right and sometimes wrong, for tests and examples on tiny models.

    Example:
        >>> from transformers import LlamaConfig, LlamaForCausalLM
        >>> tiny = LlamaForCausalLM(LlamaConfig(vocab_size=128, hidden_size=32, intermediate_size=64,
        ...                                     num_hidden_layers=1, num_attention_heads=4))
        >>> random_blockwise_heads(tiny).depth
        3
    """
    g = torch.Generator().manual_seed(seed)
    cfg = BlockwiseConfig(hidden_size=model.config.hidden_size,
                          vocab_size=model.get_output_embeddings().weight.shape[0], block_size=block_size)
    heads = BlockwiseHeads(cfg)
    with torch.no_grad():
        heads.ffn_in.weight.copy_(torch.randn(heads.ffn_in.weight.shape, generator=g) * 0.02)
        heads.ffn_out.weight.copy_(torch.randn(heads.ffn_out.weight.shape, generator=g) * scale)
    return heads.attach(model)
