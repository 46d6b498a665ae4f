"""One training loop for every draft head: AdamW, warmup + cosine schedule, progress bar and JSON-lines log,
resumable safetensors checkpoints (weights, optimizer state, step), held-out evaluation of per-depth top-k accuracy
and the default tree derived from it."""

from __future__ import annotations

import json
import math
import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from tqdm.auto import tqdm

from hf_decoding_ext.core.tree import choices_from_accuracies
from hf_decoding_ext.training.data import DistillData


@dataclass
class TrainConfig:
    """Hyper-parameters of :func:`train_head`.

    ``batch_size`` counts positions for position heads (Medusa, Hydra, MLP speculator) and sequences for sequence
    heads (EAGLE-style drafters).
    """

    steps: int = 2000
    batch_size: int = 256
    lr: float = 1e-3
    weight_decay: float = 0.0
    warmup: int = 50
    grad_clip: float = 1.0
    log_every: int = 20
    checkpoint_every: int = 200
    eval_topk: int = 8
    tree_nodes: int = 16
    seed: int = 0

    def __post_init__(self):
        for name in ("steps", "batch_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1")
        if self.lr <= 0:
            raise ValueError("lr must be > 0")


def _lr_factor(step: int, cfg: TrainConfig) -> float:
    if step < cfg.warmup:
        return (step + 1) / cfg.warmup
    progress = (step - cfg.warmup) / max(1, cfg.steps - cfg.warmup)
    return 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))


def save_optimizer(optimizer: torch.optim.Optimizer, path: Path, step: int) -> None:
    """AdamW state as safetensors (no pickle): ``{group}.{param}.{key}`` tensors and the step in the metadata."""
    tensors = {}
    for gi, group in enumerate(optimizer.param_groups):
        for pi, p in enumerate(group["params"]):
            for key, value in optimizer.state.get(p, {}).items():
                if torch.is_tensor(value):
                    tensors[f"{gi}.{pi}.{key}"] = value.detach().cpu().contiguous()
    save_file(tensors, str(path), metadata={"step": str(step)})


def load_optimizer(optimizer: torch.optim.Optimizer, path: Path) -> None:
    tensors = load_file(str(path))
    for gi, group in enumerate(optimizer.param_groups):
        for pi, p in enumerate(group["params"]):
            state = {k.split(".", 2)[2]: v.to(p.device) for k, v in tensors.items() if k.startswith(f"{gi}.{pi}.")}
            if state:
                optimizer.state[p] = state


@torch.no_grad()
def evaluate_head(head, seqs, topk: int = 8, batch_size: int = 512) -> dict:
    """Per-depth top-k accuracy on held-out sequences: ``accuracies[d][i]`` = share of positions where the rank-``i``
    candidate at depth ``d + 1`` is the base model's token (teacher-forced: a correct prefix)."""
    head.eval()
    hits, counts = None, None
    for batch in head.eval_batches(seqs, batch_size):
        cands, targets = head.ranked_candidates(batch, topk)  # (D, N, k), (D, N)
        valid = targets >= 0
        h = (cands == targets[..., None]) & valid[..., None]
        hits = h.sum(1).double() if hits is None else hits + h.sum(1).double()
        counts = valid.sum(1).double() if counts is None else counts + valid.sum(1).double()
    acc = (hits / counts.clamp(min=1)[:, None]).tolist()
    return {"accuracies": acc, "top1": [a[0] for a in acc], "positions": counts.tolist()}


def train_head(head, data: DistillData, out_dir: str | os.PathLike, cfg: TrainConfig | None = None, *,
               resume: bool = True, progress: bool = True, log_path: str | os.PathLike | None = None):
    """Train ``head`` (attached to its base model) on ``data``; checkpoints go to ``out_dir/checkpoint`` and the
    final head (with measured accuracies and its default tree in the config) to ``out_dir``. A rerun resumes from
    the checkpoint. Returns the trained head.

    Example:
        >>> head = MedusaHeads(MedusaConfig(hidden_size=576, vocab_size=49152)).attach(model)  # doctest: +SKIP
        >>> train_head(head, DistillData("features.safetensors"), "out/medusa", TrainConfig(steps=500))  # doctest: +SKIP
    """
    cfg = cfg or TrainConfig()
    out_dir = Path(out_dir)
    ckpt = out_dir / "checkpoint"
    out_dir.mkdir(parents=True, exist_ok=True)
    log_path = Path(log_path) if log_path else out_dir / "train_log.jsonl"
    torch.manual_seed(cfg.seed)
    head.train()
    params = [p for p in head.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    start = 0
    if resume and (ckpt / "trainer_state.json").exists():
        from safetensors.torch import load_model

        load_model(head, str(ckpt / "model.safetensors"), strict=False)
        load_optimizer(optimizer, ckpt / "optimizer.safetensors")
        start = json.loads((ckpt / "trainer_state.json").read_text())["step"]
    t2d = head.target_to_draft()
    batches = head.train_batches(data.train, cfg.batch_size, seed=cfg.seed)
    for _ in range(start):  # the same batch stream as an uninterrupted run
        next(batches)
    positions = 0
    if start and (ckpt / "trainer_state.json").exists():
        positions = json.loads((ckpt / "trainer_state.json").read_text()).get("positions", 0)
    bar = tqdm(total=cfg.steps, initial=start, desc=f"train {type(head).__name__}", disable=not progress)
    t0 = time.time()
    with open(log_path, "a") as log:
        for step in range(start, cfg.steps):
            for g in optimizer.param_groups:
                g["lr"] = cfg.lr * _lr_factor(step, cfg)
            batch = next(batches)
            positions += head.batch_positions(batch)
            loss, metrics = head.training_loss(batch, t2d)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            if cfg.grad_clip:
                torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip)
            optimizer.step()
            bar.update(1)
            bar.set_postfix(loss=f"{float(loss.detach()):.3f}")
            if (step + 1) % cfg.log_every == 0 or step + 1 == cfg.steps:
                log.write(json.dumps({"step": step + 1, "loss": float(loss.detach()), "lr": optimizer.param_groups[0]["lr"],
                                      "positions": positions, "elapsed_s": round(time.time() - t0, 1), **metrics}) + "\n")
                log.flush()
            if (step + 1) % cfg.checkpoint_every == 0 and step + 1 < cfg.steps:
                ckpt.mkdir(parents=True, exist_ok=True)
                head.save_pretrained(ckpt)
                save_optimizer(optimizer, ckpt / "optimizer.safetensors", step + 1)
                (ckpt / "trainer_state.json").write_text(json.dumps({"step": step + 1, "positions": positions,
                                                                          "config": asdict(cfg)}))
    bar.close()
    head.eval()
    ev = evaluate_head(head, data.heldout, topk=cfg.eval_topk)
    head.config.head_accuracies = [[round(a, 4) for a in row] for row in ev["accuracies"]]
    head.config.tree_choices = [list(c) for c in choices_from_accuracies(ev["accuracies"], cfg.tree_nodes,
                                                                          max_depth=head.depth)]
    head.config.training = {**(head.config.training or {}), "steps": cfg.steps, "batch_size": cfg.batch_size,
                            "lr": cfg.lr, "weight_decay": cfg.weight_decay, "positions": positions,
                            "train_sequences": len(data.train),
                            "heldout_sequences": len(data.heldout),
                            "heldout_positions": ev["positions"], "heldout_top1": [round(a, 4) for a in ev["top1"]],
                            "train_seconds": round(time.time() - t0, 1)}
    head.save_pretrained(out_dir)
    return head
