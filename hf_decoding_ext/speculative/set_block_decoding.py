"""Set Block Decoding (SBD; Gat, Ben-Hamu, Havasi, Haziza, Reizenstein, Synnaeve, Lopez-Paz, Karrer, Lipman, "Set
Block Decoding is a Language Model Inference Accelerator", Meta FAIR, arXiv 2509.04185; no official code, the
paper's Algorithms 1-3, equations 8, 13, 14 and appendix A (training loop, Figures 8-10) followed).

Two parts:

* **The SBD fine-tune** of the base model itself, with one new mask token (:data:`MASK_TOKEN`):
  :func:`sbd_batches` builds the batches and :func:`sbd_loss` is the objective (registered as
  ``OBJECTIVES["sbd"]`` of :mod:`hf_decoding_ext.training.finetune` at import). Each training row is the clean
  sequence followed by a noisy copy (paper eq. 13: every token replaced by the mask token with probability
  ``eta ~ U(0, 1)``, one ``eta`` per sequence): the clean part is an ordinary causal LM (next-token prediction, NTP,
  labels shifted by one); the noisy copy is cut into blocks of ``k`` tokens (``k`` drawn uniformly from 2..16 per
  step, as the paper), each noisy token sees the clean tokens *before its block* and every token of its own block
  (Figure 9's mask) at the position of the token it stands for, and masked positions predict their own token
  (masked token prediction, MATP, labels not shifted). Loss = one cross-entropy over the NTP and MATP targets
  together (eq. 14 normalised by the number of targets, as the appendix's training loop).
* **Set block decoding** (:class:`SetBlockDecoding`, Algorithms 2-3): per block, ``block_size`` mask tokens are fed
  after the committed sequence; each forward reveals the set of masked positions chosen by the Entropy-Bounded (EB)
  sampler (eq. 8: positions sorted by entropy, the largest ``s >= 1`` whose ``s - 1`` lowest entropies sum to at
  most ``gamma``). Revealed tokens replace their masks in the next forward. When the block is complete it is
  committed, and the next block's first forward feeds it *causally* (Algorithm 3, line 4), so the KV cache of every
  committed token is exactly that of a causal forward (the bidirectional block's keys/values are dropped after each
  forward).
"""

from __future__ import annotations

import random
from pathlib import Path

import torch
import torch.nn.functional as F

from hf_decoding_ext.core import lifecycle
from hf_decoding_ext.core.entropy import entropy
from hf_decoding_ext.core.loop import DecodingLoop, GenerationState
from hf_decoding_ext.core.tree import VerifyBlock, additive_mask, build_verify_inputs

MASK_TOKEN = "<|sbd_mask|>"
"""The token SBD adds (the paper's special mask token ``m``)."""
DEFAULT_TRAIN_BLOCK_SIZES = (2, 16)  # paper 3.1: "uniformly sampling a size from the range [2,16] at each step"
DEFAULT_BLOCK_SIZE = 16  # paper: inference blocks of 16 ("block size 16 covers the experimental setting", 4.2)
DEFAULT_GAMMA = 0.35  # paper 3.1: chat benchmarks gamma_low = 0.35 (accuracy-preserving), gamma_high = 0.6
SHIPPED_DIR = Path(__file__).resolve().parents[1] / "data" / "finetuned" / "set-block-decoding"
"""Where the shipped LoRA adapter of the SBD fine-tune of the default model lives (when shipped)."""

CITATION = ("Itai Gat, Heli Ben-Hamu, Marton Havasi, Daniel Haziza, Jeremy Reizenstein, Gabriel Synnaeve, David "
            "Lopez-Paz, Brian Karrer, Yaron Lipman. Set Block Decoding is a Language Model Inference Accelerator. "
            "arXiv:2509.04185, 2025.")

PAPER_FIDELITY = (
    ("Noisy copy", ("the paper appends a noisy copy of the whole sequence; here the copy starts at the first block "
     "holding a response token (the blocks before it carry no loss when the prompt is not trained on, so they are "
     "not computed); with train_on_prompt the whole sequence is copied, as the paper.")),
    ("Masking", ("eq. 13 / appendix loop: one eta ~ U(0, 1) per sequence, each noisy token masked with probability "
     "eta; a block may have no mask (no MATP target), as the paper.")),
    ("Loss", ("one mean cross-entropy over the NTP targets (clean part, shifted) and the MATP targets (masked noisy "
     "tokens, aligned) together, as the appendix's single loss over the concatenated labels; only response tokens "
     "are targets unless train_on_prompt (instruction fine-tuning, the repo's data).")),
    ("Block size", ("training: k uniform in 2..16 per batch (paper 3.1; with grad_accum, per micro-batch), blocks "
     "aligned to multiples of k from the sequence start (Figure 9); decoding: 16 by default, cut at "
     "max_new_tokens.")),
    ("Recipe", ("the paper fine-tunes all weights (8B: AdamW 3e-4, warmup 200, cosine, 70B tokens; 3B SFT: 1e-5); "
     "the repo's small-scale recipe is a LoRA fine-tune of SmolLM2-135M on its self-distillation data (see the "
     "command in the closing note); the paper's control, an NTP fine-tune with the same data and settings, is the "
     "'ntp' objective.")),
    ("EB sampler", ("eq. 8: masked positions sorted by the entropy of the model's distribution (raw logits, before "
     "the caller's processors such as temperature or top-k; ties: left first), the largest s >= 1 whose s - 1 lowest "
     "entropies sum to at most gamma. gamma=0 reveals one position per forward (the lowest-entropy one, not "
     "left-to-right), plus any zero-entropy positions (they add nothing to the sum). Tokens are the argmax (the "
     "paper's temperature 0) or, with do_sample=True, a sample of the processed distribution (an extension).")),
    ("EOS", ("a block ends early once an eos token and every position before it are revealed (later positions are "
     "never committed); the paper counts NFE until the end of the solution.")),
    ("Logits processors", ("applied to each position's logits with the committed sequence plus the block's leading "
     "revealed run as context (a position's left neighbours may still be masked); stateful processors are refused.")),
    ("Batch", "batch size 1."),
)


# ------------------------------------------------------------------------------------------------------ SBD data
def _check_block_size(block_size) -> tuple[int, int]:
    """``block_size`` as an inclusive ``(low, high)`` range (an int ``k`` is ``(k, k)``)."""
    lo_hi = (block_size, block_size) if isinstance(block_size, int) and not isinstance(block_size, bool) \
        else tuple(block_size) if isinstance(block_size, (tuple, list)) else None
    if lo_hi is None or len(lo_hi) != 2 or any(isinstance(v, bool) or not isinstance(v, int) for v in lo_hi) \
            or not 1 <= lo_hi[0] <= lo_hi[1]:
        raise ValueError(f"block_size must be an int >= 1 or a (low, high) range with 1 <= low <= high, got "
                         f"{block_size!r}")
    return lo_hi


def sbd_example(input_ids, response_start: int, mask_id: int, block_size: int = DEFAULT_BLOCK_SIZE,
                rng: random.Random | None = None, train_on_prompt: bool = False, eta: float | None = None) -> dict:
    """One SBD training row (lists and a bool tensor) for the sequence ``input_ids`` (prompt then response).

    Layout: the ``n`` clean tokens, then a noisy copy of ``input_ids[start:]``, where ``start`` is the first
    multiple of ``block_size`` at or before ``response_start`` (0 with ``train_on_prompt``). Each noisy token is the
    mask with probability ``eta`` (default: drawn from U(0, 1) once per sequence). Returns ``input_ids``,
    ``position_ids`` (clean ``0..n-1``; a noisy token sits at the position of the token it stands for), ``allowed``
    (``(T, T)`` bool: clean tokens causal; a noisy token in block ``b`` (``p // block_size``) sees the clean tokens
    before ``b * block_size`` and the noisy tokens of block ``b``), ``labels`` (NTP, unshifted form: the clean
    response (and prompt with ``train_on_prompt``), -100 elsewhere; the loss shifts them), ``mask_labels`` (MATP,
    aligned: the true token at masked noisy positions that are targets, -100 elsewhere) and ``start``."""
    k, high = _check_block_size(block_size)
    if high != k:
        raise ValueError(f"sbd_example takes one block size, got {block_size!r}")
    rng = rng or random
    ids = [int(t) for t in (input_ids.tolist() if torch.is_tensor(input_ids) else input_ids)]
    n, rs = len(ids), int(response_start)
    if not 0 <= rs <= n:
        raise ValueError(f"response_start {rs} is outside the sequence of {n} tokens")
    eta = rng.random() if eta is None else float(eta)
    first_target = 0 if train_on_prompt else rs
    start = (first_target // k) * k if first_target < n else n
    m = n - start
    noisy, mask_labels = [], []
    for p in range(start, n):
        masked = rng.random() < eta
        noisy.append(mask_id if masked else ids[p])
        mask_labels.append(ids[p] if masked and p >= first_target else -100)
    allowed = torch.zeros(n + m, n + m, dtype=torch.bool)
    allowed[:n, :n] = torch.tril(torch.ones(n, n, dtype=torch.bool))
    for b0 in range(start, n, k):
        b1 = min(b0 + k, n)
        rows = slice(n + b0 - start, n + b1 - start)
        allowed[rows, :b0] = True  # the clean past before the block
        allowed[rows, rows] = True  # the block, bidirectionally
    labels = [t if i >= first_target else -100 for i, t in enumerate(ids)] + [-100] * m
    return {"input_ids": ids + noisy, "position_ids": list(range(n)) + list(range(start, n)), "allowed": allowed,
            "labels": labels, "mask_labels": [-100] * n + mask_labels, "start": start}


def collate_sbd(examples, pad_id: int) -> dict:
    """Right-padded batch of :func:`sbd_example` rows: ``input_ids``, ``position_ids``, ``allowed`` (``(batch, T,
    T)`` bool; a padding position sees only itself and is seen by none), ``labels``, ``mask_labels`` (-100 on
    padding)."""
    t = max(len(e["input_ids"]) for e in examples)
    b = len(examples)
    input_ids = torch.full((b, t), pad_id, dtype=torch.long)
    position_ids = torch.zeros((b, t), dtype=torch.long)
    allowed = torch.eye(t, dtype=torch.bool).repeat(b, 1, 1)
    labels = torch.full((b, t), -100, dtype=torch.long)
    mask_labels = torch.full((b, t), -100, dtype=torch.long)
    for r, e in enumerate(examples):
        n = len(e["input_ids"])
        input_ids[r, :n] = torch.tensor(e["input_ids"])
        position_ids[r, :n] = torch.tensor(e["position_ids"])
        position_ids[r, n:] = torch.arange(t - n) + (max(e["position_ids"]) + 1 if n else 0)
        allowed[r, :n, :n] = e["allowed"]
        labels[r, :n] = torch.tensor(e["labels"])
        mask_labels[r, :n] = torch.tensor(e["mask_labels"])
    return {"input_ids": input_ids, "position_ids": position_ids, "allowed": allowed, "labels": labels,
            "mask_labels": mask_labels}


def sbd_batches(data, config, tokenizer, *, block_size=DEFAULT_TRAIN_BLOCK_SIZES, mask_token: str = MASK_TOKEN):
    """Batch builder of ``OBJECTIVES["sbd"]``: returns ``seed -> endless iterator`` of SBD batches over ``data`` (a
    ``DistillData`` (its train split) or sequences with ``input_ids``/``response_start``), each sequence cut to
    ``config.max_length`` tokens before its noisy copy is appended (a row holds up to ``2 * max_length`` tokens).
    ``block_size``: an int, or an inclusive ``(low, high)`` range drawn uniformly per batch (default 2..16, the
    paper's).

    ``mask_token`` is appended to ``config.extra_tokens`` when missing, so :func:`finetune` adds it to the tokenizer
    and the model before the stream starts; its id is read from the tokenizer when the stream starts."""
    from hf_decoding_ext.training.finetune import _get, added_token_stream, training_sequences

    lo, hi = _check_block_size(block_size)
    seqs = training_sequences(data)

    def make_batch(indices, mask_id, pad, rng):
        k = rng.randint(lo, hi)
        rows = []
        for j in indices:
            ids = _get(seqs[j], "input_ids")
            ids = (ids.tolist() if torch.is_tensor(ids) else list(ids))[:config.max_length]
            rs = min(int(_get(seqs[j], "response_start")), len(ids))
            rows.append(sbd_example(ids, rs, mask_id, k, rng, config.train_on_prompt))
        return collate_sbd(rows, pad)

    return added_token_stream(seqs, config, tokenizer, mask_token, make_batch)


def sbd_loss(model, batch):
    """SBD objective (paper eq. 14): one mean cross-entropy over the NTP targets (``labels``, shifted, on the clean
    causal part) and the MATP targets (``mask_labels`` at the masked noisy positions, not shifted), one forward with
    the 4D mask ``allowed``. Metrics: ``tokens``, ``ntp_loss`` and ``matp_loss`` (their separate means),
    ``mask_tokens`` and ``mask_acc``."""
    mask = additive_mask(batch["allowed"], dtype=model.dtype)
    logits = model(input_ids=batch["input_ids"], attention_mask=mask, position_ids=batch["position_ids"]).logits
    vocab = logits.shape[-1]
    ntp_logits, ntp_labels = logits[:, :-1].reshape(-1, vocab), batch["labels"][:, 1:].reshape(-1)
    keep = ntp_labels != -100
    ntp_logits, ntp_labels = ntp_logits[keep], ntp_labels[keep]
    sel = batch["mask_labels"] != -100
    matp_logits, matp_labels = logits[sel], batch["mask_labels"][sel]
    ce = F.cross_entropy(torch.cat([ntp_logits, matp_logits]).float(), torch.cat([ntp_labels, matp_labels]),
                         reduction="none")
    n_ntp, n_mask = ntp_labels.shape[0], matp_labels.shape[0]
    loss = ce.mean() if ce.numel() else logits.sum() * 0.0
    metrics = {"tokens": n_ntp, "mask_tokens": n_mask}
    if n_ntp:
        metrics["ntp_loss"] = float(ce[:n_ntp].mean().detach())
    if n_mask:
        metrics["matp_loss"] = float(ce[n_ntp:].mean().detach())
        metrics["mask_acc"] = float((matp_logits.argmax(-1) == matp_labels).float().mean())
    return loss, metrics


def _register() -> None:
    from hf_decoding_ext.training import finetune as ft

    ft.OBJECTIVES.setdefault("sbd", (sbd_loss, sbd_batches))


_register()


# ------------------------------------------------------------------------------------------------------ models
def resolve_mask_token_id(model, tokenizer=None, mask_token: str = MASK_TOKEN, explicit: int | None = None) -> int:
    """The mask id of an SBD model: ``explicit``, else ``model.config.decoding_ext_added_tokens[mask_token]`` (set by
    ``add_special_tokens``), else ``model.config.sbd_mask_token_id``, else the tokenizer's id for it. ``ValueError``
    when none is found or it is outside the model's vocabulary."""
    from hf_decoding_ext.training.finetune import added_token_id

    return added_token_id(model, tokenizer, mask_token, explicit=explicit, config_attr="sbd_mask_token_id",
                          what="SBD mask token", hint=": fine-tune it with the 'sbd' objective (load_sbd_model for "
                          "the shipped one) or pass mask_token_id=")


def load_sbd_model(path: str | Path | None = None, base: str | None = None, dtype=torch.float32, device=None):
    """``(model, tokenizer)``: the base model (``None``: the embedded default) with the SBD mask token added and the
    SBD LoRA adapter at ``path`` (default :data:`SHIPPED_DIR`) merged in; a folder holding a full fine-tune
    (``config.json``, written by ``finetune --mode full``) is loaded as is. ``ValueError`` when nothing is there."""
    from hf_decoding_ext.training.finetune import load_finetuned

    model, tokenizer = load_finetuned(path if path is not None else SHIPPED_DIR, [MASK_TOKEN], base, dtype, device,
                                      what="SBD fine-tune", hint=" (the adapter is not shipped yet): train one with "
                                      "`python -m hf_decoding_ext finetune --objective sbd ...` and pass its folder")
    resolve_mask_token_id(model, tokenizer)
    return model, tokenizer


# ------------------------------------------------------------------------------------------------------ decoding
def eb_select(entropies: torch.Tensor, gamma: float) -> list[int]:
    """Entropy-Bounded selection: indices of ``entropies`` (``(n,)``, n >= 1) sorted ascending (ties: lower index
    first), the longest prefix ``U`` with ``sum(H_U) - max(H_U) <= gamma``; always at least one.

    Example:
        >>> import torch
        >>> eb_select(torch.tensor([0.3, 0.1, 2.0, 0.2]), 0.35)
        [1, 3, 0]
    """
    h = entropies.double().cpu()
    order = sorted(range(h.shape[0]), key=lambda i: (float(h[i]), i))
    chosen, total = [order[0]], float(h[order[0]])
    for i in order[1:]:
        total += float(h[i])
        if total - float(h[i]) > gamma:  # sorted ascending: the newest is the largest
            break
        chosen.append(i)
    return chosen


class SetBlockDecoding(DecodingLoop):
    """Set Block Decoding (Gat et al., arXiv 2509.04185), a ``custom_generate`` loop for a model fine-tuned with the
    SBD objective (:func:`sbd_loss`; it has a mask token).

    Each block puts ``block_size`` mask tokens after the committed sequence (fewer when ``max_new_tokens`` leaves
    less room). Every forward feeds the committed tokens not yet cached (causally) and the block (its revealed tokens
    and remaining masks, attending to the whole committed sequence and bidirectionally to each other); the
    Entropy-Bounded sampler (:func:`eb_select`) ranks the masked positions by the entropy of the model's distribution
    there and reveals the lowest-entropy ones while the revealed set's entropy sum minus its largest entropy stays
    within ``gamma`` (at least one), each as the argmax (``do_sample=False``) or a sample of its distribution after
    the caller's processors (temperature, top-k/top-p, ...). A finished
    block (or one whose eos and every position before it are revealed) is committed; the next forward caches it
    causally, so the KV cache equals a causal recompute (the block's bidirectional keys/values are never kept).

    Args:
        block_size: tokens per block (``k``; default :data:`DEFAULT_BLOCK_SIZE`).
        gamma: EB-sampler threshold in nats (``>= 0``; default :data:`DEFAULT_GAMMA` 0.35, the paper's
            accuracy-preserving value for chat; 0 reveals one position per forward, larger values reveal more per
            forward at some quality cost).
        mask_token_id: the mask id (default: :func:`resolve_mask_token_id`).
        tokenizer: only to look up the mask token.

    Greedy and sampling, batch size 1, full-attention models. Per-run statistics (``forwards``, ``tokens``,
    ``nfe_per_token``, ``tokens_per_forward``, ``revealed_per_forward``, ``blocks``) are in ``self.last_stats`` (and
    in the output's ``sbd_stats`` with ``return_dict_in_generate``). Lossy against the original model (and against
    the fine-tuned model's own AR greedy output). Deviations: :data:`PAPER_FIDELITY`.

    Example:
        >>> from hf_decoding_ext.speculative.set_block_decoding import SetBlockDecoding, load_sbd_model
        >>> model, tok = load_sbd_model()  # the shipped SBD fine-tune of the default model  # doctest: +SKIP
        >>> loop = SetBlockDecoding(block_size=16, gamma=0.35, tokenizer=tok)
        >>> out = model.generate(**tok("Hi", return_tensors="pt"), max_new_tokens=64, do_sample=False,
        ...                      custom_generate=loop)  # doctest: +SKIP
        >>> loop.last_stats["nfe_per_token"]  # doctest: +SKIP
    """

    supports_batch = False
    supports_sliding_window = False
    citation = CITATION

    def __init__(self, block_size: int = DEFAULT_BLOCK_SIZE, gamma: float = DEFAULT_GAMMA,
                 mask_token_id: int | None = None, tokenizer=None):
        if isinstance(block_size, bool) or not isinstance(block_size, int) or block_size < 1:
            raise ValueError(f"block_size must be an int >= 1, got {block_size!r}")
        if isinstance(gamma, bool) or not isinstance(gamma, (int, float)) or not gamma >= 0:
            raise ValueError(f"gamma must be a number >= 0, got {gamma!r}")
        if mask_token_id is not None and (isinstance(mask_token_id, bool) or not isinstance(mask_token_id, int)
                                          or mask_token_id < 0):
            raise ValueError(f"mask_token_id must be a non-negative int, got {mask_token_id!r}")
        self.block_size, self.gamma = block_size, float(gamma)
        self.mask_token_id, self.tokenizer = mask_token_id, tokenizer
        self.last_stats: dict = {}

    def _mask_id(self, model) -> int:
        return resolve_mask_token_id(model, self.tokenizer, explicit=self.mask_token_id)

    @staticmethod
    def _eos_ids(state: GenerationState) -> set[int]:
        if not state.has_eos_criterion:
            return set()
        eos = getattr(state.generation_config, "_eos_token_tensor", None)
        if eos is None:
            eos = state.generation_config.eos_token_id
        if eos is None:
            return set()
        return {int(t) for t in torch.as_tensor(eos).reshape(-1).tolist()}

    def run(self, state: GenerationState):
        if lifecycle.has_stateful(state.logits_processor):
            raise ValueError("SetBlockDecoding does not support stateful logits processors")
        model, device = state.model, state.device
        mask_id = self._mask_id(model)
        eos_ids = self._eos_ids(state)
        limit = getattr(state.generation_config, "max_length", None)
        per_forward: list[int] = []
        blocks = 0
        state.stats.update(tokens=0)
        while not state.done:
            length = state.input_ids.shape[1]
            k = self.block_size if limit is None else max(1, min(self.block_size, int(limit) - length))
            tokens = torch.full((k,), mask_id, dtype=torch.long)
            revealed = torch.zeros(k, dtype=torch.bool)
            recorded: list = [None] * k
            end = k
            block = VerifyBlock(tokens, torch.ones(k, k, dtype=torch.bool), torch.arange(1, k + 1))
            while True:
                cache_len = state.cache.get_seq_length()
                committed = state.input_ids[:, cache_len:]
                s = committed.shape[1]
                block.tokens = tokens
                ids, mask, pos = build_verify_inputs(committed, state.attention_mask, cache_len, block,
                                                     dtype=model.dtype)
                out = model(input_ids=ids, attention_mask=mask, position_ids=pos, cache=state.cache,
                            use_cache=True, return_dict=True)
                state.stats["forwards"] += 1
                state.cache.crop(-k)  # drop the block's keys/values: only the causal part stays (exact KV caching)
                logits = out.logits[0, s:].float()
                lead = int(revealed.long().cumprod(0).sum())  # the leading revealed run
                context = torch.cat([state.input_ids, tokens[:lead].to(device)[None]], dim=1)
                open_pos = [j for j in range(end) if not revealed[j]]
                processed = {}
                for j in open_pos:
                    raw = logits[j][None]
                    processed[j] = (state.process(raw.clone(), context[:, :length + min(j, lead)]), raw)
                ent = entropy(logits[open_pos])  # the model's own distributions (before the caller's processors)
                chosen = [open_pos[i] for i in eb_select(ent, self.gamma)]
                for j in chosen:
                    scores = processed[j][0]
                    tokens[j] = int(state.select(scores)[0])
                    revealed[j] = True
                    recorded[j] = processed[j]
                per_forward.append(len(chosen))
                done_eos = [j for j in range(end) if revealed[j] and int(tokens[j]) in eos_ids
                            and bool(revealed[:j + 1].all())]
                if done_eos:
                    end = done_eos[0] + 1
                if bool(revealed[:end].all()):
                    break
            n = state.append(tokens[:end].to(device)[None])
            for j in range(n):
                state.record(*recorded[j])
            state.stats["tokens"] += n
            blocks += 1
        state.stats["revealed_per_forward"] = per_forward
        state.stats["blocks"] = blocks
        state.stats["nfe_per_token"] = state.stats["forwards"] / max(1, state.stats["tokens"])
        state.stats["tokens_per_forward"] = state.stats["tokens"] / max(1, state.stats["forwards"])
        state.stats.update(block_size=self.block_size, gamma=self.gamma)
        self.last_stats = dict(state.stats)
        return {"sbd_stats": self.last_stats} if state.return_dict else None
