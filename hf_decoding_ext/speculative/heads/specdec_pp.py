"""SpecDec++'s acceptance prediction head (Huang, Guo, Wang, "SpecDec++: Boosting Speculative Decoding via Adaptive
Candidate Lengths", COLM 2025, arXiv 2405.19715) and its training.

SpecDec++ casts the choice of the draft length as a Markov decision process and shows that the optimal policy stops
drafting once the probability that at least one of the drafted tokens is rejected exceeds a threshold. That
probability is estimated by a small head on the **draft** model: it reads the draft's last hidden state at a drafted
token (the final norm's output, the draft lm_head's input) and predicts the token's acceptance probability
``min(1, p(y) / q(y))`` (``p`` the target's, ``q`` the draft's next-token distribution). The drafter that applies the
stopping rule is :class:`~hf_decoding_ext.speculative.drafters.specdec_pp.SpecDecPPDrafter`.

Training follows the official code (``Kaffaljidhmah2/SpecDec_pp``: ``data/gen_*.py``, ``specdec_pp/train.py``):

1. target responses to prompts (here the committed distillation responses of Direct Alignment);
2. at every response position the draft samples a token ``y_i ~ q(. | prompt, x_<i)`` (``x`` the target's response)
   and its label is the acceptance probability ``min(1, p(y_i) / q(y_i))`` under the same prefix (a soft label);
3. the training sequence is the prompt followed by ``z`` with ``z_i = x_i`` (the target's token) with probability
   ``mixing_ratio`` (0.15) and ``z_i = y_i`` (the draft's token) otherwise; the frozen draft runs over it, the head
   reads the hidden state at the position of ``z_i`` and is trained on the draft-token positions only (the
   target-token positions carry no label), so the head sees contexts mostly made of drafted tokens, as at inference;
4. the loss is a binary cross-entropy with soft labels, the rejection class weighted ``weight_mismatch`` (6), the
   sum normalised by the total weight (:func:`weighted_bce_loss`).

Example:
    >>> from hf_decoding_ext.speculative.heads.specdec_pp import AcceptancePredictionHead, SpecDecPPHeadConfig
    >>> head = AcceptancePredictionHead(SpecDecPPHeadConfig(hidden_size=16, num_layers=3))
    >>> import torch
    >>> head.acceptance_probability(torch.zeros(4, 16)).shape
    torch.Size([4])
"""

from __future__ import annotations

import math
import os
import time
from pathlib import Path

import torch
from torch import nn
from transformers import PretrainedConfig, PreTrainedModel

from hf_decoding_ext.speculative.heads.base import ResBlock

__all__ = ["AcceptancePredictionHead", "SpecDecPPHeadConfig", "acceptance_dataset", "acceptance_labels",
           "draft_features", "evaluate_acceptance_head", "load_shipped_head", "shipped_head_path", "soft_auc",
           "train_acceptance_head", "weighted_bce_loss"]


class SpecDecPPHeadConfig(PretrainedConfig):
    """Configuration of :class:`AcceptancePredictionHead`.

    Args:
        hidden_size: the draft model's hidden size (the head's input width).
        num_layers: residual blocks ``x + SiLU(W x + b)`` before the 2-way output layer (official default: 3).
        weight_mismatch: weight of the rejection class in the training loss (official default: 6).
        mixing_ratio: share of target tokens mixed into the draft tokens of a training sequence (official default:
            0.15).
        base_model_name_or_path: the target model the head was trained for.
        draft_model: the draft model it reads (a description: path or name).
        heldout_auc: the held-out AUC measured after training (see :func:`soft_auc`).
        training: free-form record of the training run, kept for the model card.
    """

    model_type = "hf_decoding_ext_specdec_pp_head"

    def __init__(self, hidden_size: int = 576, num_layers: int = 3, weight_mismatch: float = 6.0,
                 mixing_ratio: float = 0.15, base_model_name_or_path: str | None = None,
                 draft_model: str | None = None, heldout_auc: float | None = None, training: dict | None = None,
                 **kwargs):
        super().__init__(**kwargs)
        if isinstance(hidden_size, bool) or not isinstance(hidden_size, int) or hidden_size < 1:
            raise ValueError(f"hidden_size must be a positive integer, got {hidden_size!r}")
        if isinstance(num_layers, bool) or not isinstance(num_layers, int) or num_layers < 0:
            raise ValueError(f"num_layers must be an integer >= 0, got {num_layers!r}")
        if not weight_mismatch > 0:
            raise ValueError(f"weight_mismatch must be > 0, got {weight_mismatch!r}")
        if not 0 <= mixing_ratio < 1:
            raise ValueError(f"mixing_ratio must be in [0, 1), got {mixing_ratio!r}")
        self.hidden_size = hidden_size
        self.num_layers = num_layers
        self.weight_mismatch = float(weight_mismatch)
        self.mixing_ratio = float(mixing_ratio)
        self.base_model_name_or_path = base_model_name_or_path
        self.draft_model = draft_model
        self.heldout_auc = heldout_auc
        self.training = training or {}


class AcceptancePredictionHead(PreTrainedModel):
    """SpecDec++'s acceptance prediction head: ``num_layers`` residual blocks ``x + SiLU(W x + b)`` then a 2-way
    linear layer on the draft model's last hidden state (after its final norm) at a drafted token; class 1 is
    "accepted", class 0 "rejected". :meth:`acceptance_probability` is the softmax of class 1.

    A regular ``PreTrainedModel``: ``save_pretrained`` writes ``config.json`` + ``model.safetensors``,
    ``from_pretrained`` loads a folder or a Hub id.

    Deviation from the official code: its ``nn.Sequential(*([ResBlock(h)] * num_layers), ...)`` repeats one block
    instance, so its ``num_layers`` blocks share their weights; here each block has its own (the paper's "ResNet
    with ``num_layers`` layers").

    Args:
        config: a :class:`SpecDecPPHeadConfig`.

    Example:
        >>> import torch
        >>> from hf_decoding_ext.speculative.heads.specdec_pp import AcceptancePredictionHead, SpecDecPPHeadConfig
        >>> head = AcceptancePredictionHead(SpecDecPPHeadConfig(hidden_size=8, num_layers=1))
        >>> head(torch.zeros(3, 8)).shape  # logits (rejected, accepted)
        torch.Size([3, 2])
    """

    config_class = SpecDecPPHeadConfig
    base_model_prefix = "acceptance_head"
    main_input_name = "hidden_states"
    _no_split_modules: list[str] = []

    def __init__(self, config: SpecDecPPHeadConfig):
        super().__init__(config)
        self.blocks = nn.Sequential(*[ResBlock(config.hidden_size) for _ in range(config.num_layers)])
        self.out = nn.Linear(config.hidden_size, 2)
        self.post_init()

    def _init_weights(self, module):
        if isinstance(module, nn.Linear):
            module.reset_parameters()  # PyTorch's default initialisation, as in the official code

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        """Logits ``(..., 2)`` (rejected, accepted) for draft hidden states ``(..., hidden)``."""
        return self.out(self.blocks(hidden_states.to(self.out.weight.dtype)))

    @torch.no_grad()
    def acceptance_probability(self, hidden_states: torch.Tensor) -> torch.Tensor:
        """Predicted acceptance probabilities ``(...)`` (float32) for hidden states ``(..., hidden)``."""
        return torch.softmax(self(hidden_states).float(), dim=-1)[..., 1]


# --------------------------------------------------------------------------------------------------- shipped head
def shipped_head_path() -> Path:
    """Where the library ships its head for the default model and the distilled draft
    (``hf_decoding_ext/data/specdec_pp_head``)."""
    return Path(__file__).resolve().parents[2] / "data" / "specdec_pp_head"


def load_shipped_head(path: str | os.PathLike | None = None) -> AcceptancePredictionHead:
    """The shipped head (or the one saved at ``path``) in float32; ``ValueError`` when there is none."""
    path = Path(path) if path is not None else shipped_head_path()
    if not (path / "config.json").exists():
        raise ValueError(f"no SpecDec++ acceptance head at {path}: train one with scripts/train_specdec_pp.py")
    return AcceptancePredictionHead.from_pretrained(str(path)).float().eval()


# --------------------------------------------------------------------------------------------------- data
@torch.no_grad()
def draft_features(draft, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None):
    """The draft's logits ``(B, T, vocab)`` and last hidden states ``(B, T, hidden)`` (its final norm's output) over
    ``input_ids``."""
    from hf_decoding_ext.core.anatomy import OutputCapture, final_norm

    with OutputCapture(final_norm(draft)) as hook:
        out = draft(input_ids=input_ids, attention_mask=attention_mask, return_dict=True)
    return out.logits, hook.output


def acceptance_labels(target_logits: torch.Tensor, draft_logits: torch.Tensor,
                      draft_tokens: torch.Tensor) -> torch.Tensor:
    """``min(1, p(y) / q(y))`` of the tokens ``y`` (``(...)``) under the target's and the draft's logits
    ``(..., vocab)`` (speculative sampling's acceptance probability of a draft token; ``data/gen_acceptance.py``).

    Example:
        >>> import torch
        >>> p, q = torch.tensor([[0.5, 0.5]]).log(), torch.tensor([[0.8, 0.2]]).log()
        >>> acceptance_labels(p, q, torch.tensor([0])), acceptance_labels(p, q, torch.tensor([1]))
        (tensor([0.6250]), tensor([1.]))
    """
    logp = torch.log_softmax(target_logits.float(), -1).gather(-1, draft_tokens[..., None])[..., 0]
    logq = torch.log_softmax(draft_logits.float(), -1).gather(-1, draft_tokens[..., None])[..., 0]
    return torch.exp((logp - logq).clamp(max=0.0))


@torch.no_grad()
def acceptance_dataset(target, draft, rows: list[dict], *, mixing_ratio: float = 0.15, seed: int = 0,
                       batch_size: int = 4, max_length: int = 384, log=None) -> dict:
    """Training examples of the head from response rows (``prompt_ids``, ``response_ids``: the target's responses).

    At each response position ``i`` the draft samples ``y_i`` from its distribution after ``prompt + x_<i`` (the
    target's tokens), labelled ``min(1, p(y_i) / q(y_i))`` (:func:`acceptance_labels`); the sequence ``prompt + z``
    with ``z_i = x_i`` with probability ``mixing_ratio`` and ``y_i`` otherwise is run through the draft, and the
    hidden state at ``z_i`` is kept where ``z_i = y_i``. Sequences are cut to ``max_length`` tokens.

    Returns:
        ``{"hidden": (N, hidden) float16, "labels": (N,) float32, "sequence": (N,) long (row index),
        "position": (N,) long (response position), "draft_prob": (N,) the draft's probability of its token (a
        baseline predictor of acceptance), "mean_label": float}``.
    """
    g = torch.Generator().manual_seed(seed)
    rows = [r for r in rows if r["response_ids"] and len(r["prompt_ids"]) < max_length]
    pad = 0
    feats, labels, seq_idx, pos_idx, qs = [], [], [], [], []
    t0 = time.perf_counter()
    for start in range(0, len(rows), batch_size):
        chunk = rows[start:start + batch_size]
        seqs = [(r["prompt_ids"] + r["response_ids"])[:max_length] for r in chunk]
        width = max(len(s) for s in seqs)
        ids = torch.full((len(seqs), width), pad, dtype=torch.long)
        att = torch.zeros((len(seqs), width), dtype=torch.long)
        for i, s in enumerate(seqs):
            ids[i, : len(s)] = torch.tensor(s)
            att[i, : len(s)] = 1
        tl = target(input_ids=ids, attention_mask=att).logits.float()
        dl, _ = draft_features(draft, ids, att)
        dl = dl.float()
        mixed = ids.clone()
        keep = torch.zeros_like(att, dtype=torch.bool)
        lab = torch.zeros(ids.shape, dtype=torch.float32)
        qy = torch.zeros(ids.shape, dtype=torch.float32)
        for i, (r, s) in enumerate(zip(chunk, seqs)):
            first = len(r["prompt_ids"])  # position of the first response token
            n = len(s) - first
            if n <= 0:
                continue
            q = torch.softmax(dl[i, first - 1: len(s) - 1], -1)  # the draft's distribution at each response position
            y = torch.multinomial(q, 1, generator=g)[:, 0]
            lab[i, first: len(s)] = acceptance_labels(tl[i, first - 1: len(s) - 1], dl[i, first - 1: len(s) - 1], y)
            qy[i, first: len(s)] = q.gather(-1, y[:, None])[:, 0]
            from_target = torch.rand(n, generator=g) < mixing_ratio
            mixed[i, first: len(s)] = torch.where(from_target, ids[i, first: len(s)], y)
            keep[i, first: len(s)] = ~from_target
        _, hidden = draft_features(draft, mixed, att)
        for i in range(len(chunk)):
            where = keep[i].nonzero()[:, 0]
            feats.append(hidden[i, where].to(torch.float16))
            labels.append(lab[i, where])
            qs.append(qy[i, where])
            seq_idx.append(torch.full((len(where),), start + i, dtype=torch.long))
            pos_idx.append(where - len(chunk[i]["prompt_ids"]))
        if log is not None and (start // batch_size) % 10 == 0:
            log(f"acceptance data: {min(start + batch_size, len(rows))}/{len(rows)} sequences, "
                f"{sum(len(x) for x in labels)} positions, {time.perf_counter() - t0:.0f} s")
    labels_all = torch.cat(labels) if labels else torch.zeros(0)
    return {"hidden": torch.cat(feats) if feats else torch.zeros(0, draft.config.hidden_size, dtype=torch.float16),
            "labels": labels_all, "sequence": torch.cat(seq_idx) if seq_idx else torch.zeros(0, dtype=torch.long),
            "position": torch.cat(pos_idx) if pos_idx else torch.zeros(0, dtype=torch.long),
            "draft_prob": torch.cat(qs) if qs else torch.zeros(0),
            "mean_label": float(labels_all.mean()) if labels_all.numel() else float("nan")}


# --------------------------------------------------------------------------------------------------- loss, metric
def weighted_bce_loss(logits: torch.Tensor, labels: torch.Tensor, weight_mismatch: float = 6.0) -> torch.Tensor:
    """The official training loss: a cross-entropy of the 2-way ``logits`` ``(N, 2)`` against soft labels ``(N,)``
    (the acceptance probability), the rejection class weighted ``weight_mismatch``, normalised by the total weight::

        sum_i [w (1 - y_i) (-log(1 - a_i)) + y_i (-log a_i)] / sum_i [w (1 - y_i) + y_i]

    Example:
        >>> import torch
        >>> logits = torch.tensor([[0.0, 0.0]])
        >>> round(float(weighted_bce_loss(logits, torch.tensor([1.0]))), 4)  # -log 0.5
        0.6931
    """
    logp = torch.log_softmax(logits.float(), -1)
    y = labels.float()
    num = weight_mismatch * (1 - y) * (-logp[:, 0]) + y * (-logp[:, 1])
    return num.sum() / (weight_mismatch * (1 - y) + y).sum().clamp_min(1e-12)


def soft_auc(scores: torch.Tensor, labels: torch.Tensor) -> float:
    """Area under the ROC curve of ``scores`` with soft labels: example ``i`` is a positive of weight ``labels[i]``
    and a negative of weight ``1 - labels[i]`` (with 0/1 labels, the ordinary AUC; with acceptance probabilities,
    the expected AUC over the acceptance events, each example never paired with itself). Ties count one half.

    Example:
        >>> import torch
        >>> soft_auc(torch.tensor([0.1, 0.4, 0.35, 0.8]), torch.tensor([0.0, 0.0, 1.0, 1.0]))
        0.75
    """
    s = scores.double().flatten()
    pos = labels.double().flatten()
    neg = 1.0 - pos
    order = torch.argsort(s)
    s, pos, neg = s[order], pos[order], neg[order]
    uniq, inverse = torch.unique_consecutive(s, return_inverse=True)
    group_pos = torch.zeros(len(uniq), dtype=torch.float64).index_add_(0, inverse, pos)
    group_neg = torch.zeros(len(uniq), dtype=torch.float64).index_add_(0, inverse, neg)
    neg_below = torch.cumsum(group_neg, 0) - group_neg
    self_pairs = float((pos * neg).sum())
    wins = float((group_pos * (neg_below + 0.5 * group_neg)).sum()) - 0.5 * self_pairs
    total = float(pos.sum() * neg.sum()) - self_pairs
    return wins / total if total > 0 else float("nan")


@torch.no_grad()
def evaluate_acceptance_head(head: AcceptancePredictionHead, data: dict, batch_size: int = 4096) -> dict:
    """Held-out figures of ``head`` on an :func:`acceptance_dataset`: ``auc`` (:func:`soft_auc` of the predicted
    acceptance against the soft labels), ``loss`` (:func:`weighted_bce_loss`), ``kl`` (mean binary KL of the label
    from the prediction, the official metric), the mean prediction and label, and ``positions``."""
    head.eval()
    logits = torch.cat([head(h.float()).float() for h in data["hidden"].split(batch_size)]) if len(
        data["labels"]) else torch.zeros(0, 2)
    y = data["labels"].float()
    logp = torch.log_softmax(logits, -1)
    a = logp[:, 1].exp()
    ent = torch.special.xlogy(y, y) + torch.special.xlogy(1 - y, 1 - y)
    kl = (-(y * logp[:, 1] + (1 - y) * logp[:, 0]) + ent).mean()
    return {"auc": soft_auc(a, y), "loss": float(weighted_bce_loss(logits, y, head.config.weight_mismatch)),
            "kl": float(kl), "mean_prediction": float(a.mean()), "mean_label": float(y.mean()),
            "positions": int(y.numel())}


# --------------------------------------------------------------------------------------------------- training
def train_acceptance_head(target, draft, rows: list[dict], *, heldout: list[dict] | None = None,
                          num_layers: int = 3, weight_mismatch: float = 6.0, mixing_ratio: float = 0.15,
                          epochs: int = 3, batch_size: int = 256, lr: float = 1e-3, weight_decay: float = 0.0,
                          warmup_ratio: float = 0.03, seed: int = 0, max_length: int = 384,
                          data: dict | None = None, heldout_data: dict | None = None, log=None,
                          eval_every: int = 0) -> AcceptancePredictionHead:
    """Train a SpecDec++ acceptance head for ``draft`` (frozen) against ``target`` on response rows.

    The examples come from :func:`acceptance_dataset` (pass ``data`` / ``heldout_data`` to reuse ones already
    built); the head is trained with AdamW (``lr``, linear warmup over ``warmup_ratio`` of the steps then cosine
    decay, as the official run's schedule) for ``epochs`` passes over shuffled mini-batches of ``batch_size``
    positions, on :func:`weighted_bce_loss`. With held-out rows or data, the held-out figures of
    :func:`evaluate_acceptance_head` are logged every ``eval_every`` steps (0: at the end only) and stored in the
    head's config (``heldout_auc``, ``training``).

    Deviation from the official run: the official head trains on whole sequences (4 per device, 8 accumulation
    steps, 3 epochs, Hugging Face Trainer defaults, bf16) with the draft's forward inside the loop; here the frozen
    draft's features are computed once and the head trains on shuffled positions in float32 (the same examples
    and loss; a few CPU minutes instead of GPU hours).

    Returns:
        the trained head (eval mode, float32).
    """
    say = log or (lambda msg: None)
    if data is None:
        data = acceptance_dataset(target, draft, rows, mixing_ratio=mixing_ratio, seed=seed, max_length=max_length,
                                  log=log)
    if heldout_data is None and heldout:
        heldout_data = acceptance_dataset(target, draft, heldout, mixing_ratio=mixing_ratio, seed=seed + 1,
                                          max_length=max_length, log=log)
    torch.manual_seed(seed)
    config = SpecDecPPHeadConfig(hidden_size=int(draft.config.hidden_size), num_layers=num_layers,
                                 weight_mismatch=weight_mismatch, mixing_ratio=mixing_ratio)
    head = AcceptancePredictionHead(config).float().train()
    n = int(data["labels"].numel())
    if n == 0:
        raise ValueError("no training positions (empty responses?)")
    steps_per_epoch = max(1, n // batch_size)
    total = steps_per_epoch * epochs
    warmup = max(1, round(warmup_ratio * total))
    opt = torch.optim.AdamW(head.parameters(), lr=lr, weight_decay=weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: (s + 1) / warmup if s < warmup else 0.5 * (1 + math.cos(math.pi * (s - warmup) /
                                                                                 max(1, total - warmup))))
    g = torch.Generator().manual_seed(seed)
    history = []
    t0 = time.perf_counter()
    step = 0
    say(f"training the acceptance head: {n} positions (mean label {data['labels'].mean():.3f}), {epochs} epochs "
        f"x {steps_per_epoch} steps of {batch_size}, lr {lr}")
    for epoch in range(epochs):
        perm = torch.randperm(n, generator=g)
        running = 0.0
        for i in range(steps_per_epoch):
            idx = perm[i * batch_size:(i + 1) * batch_size]
            loss = weighted_bce_loss(head(data["hidden"][idx].float()), data["labels"][idx], weight_mismatch)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            step += 1
            running += float(loss.detach())
            if eval_every and heldout_data is not None and step % eval_every == 0:
                figures = evaluate_acceptance_head(head, heldout_data)
                head.train()
                history.append({"step": step, **figures})
                say(f"step {step}/{total}: held-out auc {figures['auc']:.4f} loss {figures['loss']:.4f}")
        say(f"epoch {epoch + 1}/{epochs}: train loss {running / steps_per_epoch:.4f} "
            f"({time.perf_counter() - t0:.0f} s)")
    head.eval()
    record = {"positions": n, "epochs": epochs, "steps": total, "batch_size": batch_size, "lr": lr,
              "weight_decay": weight_decay, "warmup_ratio": warmup_ratio, "seed": seed,
              "seconds": round(time.perf_counter() - t0, 1), "mean_label": float(data["labels"].mean())}
    if heldout_data is not None:
        figures = evaluate_acceptance_head(head, heldout_data)
        history.append({"step": total, **figures})
        record["heldout"] = figures
        record["history"] = history
        config.heldout_auc = figures["auc"]
        say(f"held-out: auc {figures['auc']:.4f}, loss {figures['loss']:.4f}, kl {figures['kl']:.4f} over "
            f"{figures['positions']} positions")
    config.training = record
    return head
