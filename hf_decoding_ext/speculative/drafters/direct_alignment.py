"""Direct Alignment of Draft Model (Goel, Gagrani, Jeon, Park, Lee, Lott; Qualcomm; ME-FoMo @ ICLR 2024,
arXiv 2403.00858): a draft language model for speculative decoding, aligned to a chat model by distillation on the
chat model's own responses with the TVD++ loss.

The paper's recipe has three phases: (1) a small draft pretrained on plain text, (2) a distillation set of the
target's responses to instructions, (3) fine-tuning the draft with **TVD++**. Speculative sampling accepts a draft
token with probability ``min(1, p/q)``, so the expected acceptance at a position is ``sum_x min(p(x), q(x)) =
1 - TVD(p, q)``: minimising the total variation distance maximises acceptance directly. Its gradient is a
policy-gradient with reward ``r(x) = 1[q(x) < p(x)]``::

    grad sum_x min(p, q) = E_{x ~ q}[ r(x) grad log q(x) ]

and TVD++ reduces its variance the way policy-gradient methods do, with a baseline and a normalised advantage
``(r - mean r) / std r``. Forward KL (``KL(p || q)``, ordinary distillation) is the paper's baseline.

This module holds the recipe's parts on this library's terms:

* :func:`init_draft`: phase 1 on this machine. There is no second pretrained model offline, so the draft is
  initialised from the target itself, as the issue asks: its embeddings, its first ``num_layers`` decoder layers
  (copied, trainable), its final norm (copied, trainable) and its LM head.
* :func:`tvd_plus_plus_loss`, :func:`forward_kl_loss`, :func:`expected_acceptance`: the objectives and the metric.
* :func:`train_direct_alignment`: phase 3, resumable (checkpoints in safetensors every ``checkpoint_every`` steps),
  progress in a log; the teacher's distribution comes from a target forward on the fly.
* :func:`save_draft` / :func:`load_draft`: the draft ships as its trained tensors only (decoder layers and final
  norm, safetensors) plus ``config.json``; at load time it shares the target's embeddings and head.

Deviations (also in the model card): (1) no plain-text pretraining phase: the draft starts from the target's lower
layers, which are already pretrained; (2) the embeddings and the LM head are the target's, frozen and shared (they
are 28 M of the 135 M parameters; sharing halves the draft's memory and keeps its vocabulary aligned); (3) the paper's
text was not available offline and it has no released code: TVD++ is implemented from its description (a
policy-gradient estimate of the TVD gradient, tokens sampled from the draft at every response position, reward
``1[q < p]``, advantage normalised over the batch's samples; :func:`tvd_plus_plus_loss`), and the number of samples
per position (4) is this library's choice.
"""

from __future__ import annotations

import copy
import json
import math
import os
import random
import time
from pathlib import Path

import torch

from hf_decoding_ext.speculative.drafters.draft_model import DraftModelDrafter

LOSSES = ("tvd++", "fkl", "tvd")
"""Objectives of :func:`train_direct_alignment`: TVD++ (the paper's), forward KL (its baseline), TVD differentiated
exactly (an ablation)."""

FORMAT_VERSION = 1


# --------------------------------------------------------------------------------------------------- the draft
def init_draft(target, num_layers: int):
    """A draft causal LM made of ``target``'s embeddings and LM head (shared, frozen) and copies of its first
    ``num_layers`` decoder layers and final norm (trainable). The target is not modified."""
    from hf_decoding_ext.core.anatomy import decoder_layers
    from hf_decoding_ext.core.models import truncated_model

    draft = truncated_model(target, num_layers)  # shares every tensor with the target
    base = draft.get_base_model() if hasattr(draft, "get_base_model") else draft
    inner = base.model if hasattr(base, "model") else base
    layers = decoder_layers(draft)
    for i in range(len(layers)):
        layers[i] = copy.deepcopy(layers[i])
    if hasattr(inner, "norm"):
        inner.norm = copy.deepcopy(inner.norm)
    for p in draft.parameters():
        p.requires_grad_(False)
    for p in trainable_parameters(draft):
        p.requires_grad_(True)
    draft.config.draft_num_layers = num_layers
    return draft


def _trainable_named(draft) -> dict[str, torch.nn.Parameter]:
    shared = {id(draft.get_input_embeddings().weight), id(draft.get_output_embeddings().weight)}
    return {n: p for n, p in draft.named_parameters(remove_duplicate=True) if id(p) not in shared}


def trainable_parameters(draft) -> list[torch.nn.Parameter]:
    """The draft's own parameters (decoder layers, final norm): everything but the shared embeddings and head."""
    return list(_trainable_named(draft).values())


# --------------------------------------------------------------------------------------------------- objectives
def _masked_mean(x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    if mask is None:
        return x.mean()
    mask = mask.to(x.dtype)
    return (x * mask).sum() / mask.sum().clamp_min(1)


def expected_acceptance(draft_logits: torch.Tensor, target_logits: torch.Tensor) -> torch.Tensor:
    """``sum_x min(p(x), q(x))`` per position (``(...,)``): speculative sampling's probability of accepting the
    draft token there (``1 - TVD``)."""
    p = torch.softmax(target_logits.float(), dim=-1)
    q = torch.softmax(draft_logits.float(), dim=-1)
    return torch.minimum(p, q).sum(-1)


def forward_kl_loss(draft_logits: torch.Tensor, target_logits: torch.Tensor,
                    mask: torch.Tensor | None = None) -> torch.Tensor:
    """Mean over positions of ``KL(p || q)`` (``p`` the target's distribution, ``q`` the draft's)."""
    logp = torch.log_softmax(target_logits.float(), dim=-1)
    logq = torch.log_softmax(draft_logits.float(), dim=-1)
    kl = (logp.exp() * (logp - logq)).sum(-1)
    return _masked_mean(kl, mask)


def tvd_loss(draft_logits: torch.Tensor, target_logits: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """Mean over positions of ``TVD(p, q) = 1 - sum_x min(p(x), q(x))``, differentiated exactly (the ablation the
    paper's TVD++ estimates by sampling)."""
    return _masked_mean(1.0 - expected_acceptance(draft_logits, target_logits), mask)


def tvd_plus_plus_loss(draft_logits: torch.Tensor, target_logits: torch.Tensor, mask: torch.Tensor | None = None,
                       samples: int = 4, normalise: bool = True, generator: torch.Generator | None = None,
                       eps: float = 1e-6) -> torch.Tensor:
    """The TVD++ surrogate loss: ``samples`` tokens ``x ~ q`` are drawn at every position, rewarded with ``r(x) =
    1[q(x) < p(x)]``, and the loss is ``-mean(A(x) log q(x))`` with the advantage ``A = (r - mean r) / std r``
    normalised over all the batch's samples (the policy-gradient variance reduction of the paper). Its expected
    gradient with ``normalise=False`` is ``grad TVD(p, q)`` per position (``E_{x~q}[r(x) grad log q(x)] = grad
    sum_x min(p, q)``). Positions are ``(..., vocab)``; ``mask`` (``(...)``) selects the trained ones. The loss's
    value is not a divergence (report :func:`expected_acceptance`)."""
    if isinstance(samples, bool) or not isinstance(samples, int) or samples < 1:
        raise ValueError(f"samples must be a positive integer, got {samples!r}")
    vocab = draft_logits.shape[-1]
    logq = torch.log_softmax(draft_logits.float(), dim=-1).reshape(-1, vocab)
    p = torch.softmax(target_logits.float(), dim=-1).reshape(-1, vocab)
    if mask is not None:
        keep = mask.reshape(-1).bool()
        logq, p = logq[keep], p[keep]
    if logq.shape[0] == 0:
        return draft_logits.sum() * 0.0
    q = logq.detach().exp()
    x = torch.multinomial(q, samples, replacement=True, generator=generator)
    reward = (q.gather(-1, x) < p.gather(-1, x)).to(q.dtype)
    if normalise:
        advantage = (reward - reward.mean()) / (reward.std(unbiased=False) + eps)
    else:
        advantage = reward
    return -(advantage * logq.gather(-1, x)).mean()


def alignment_loss(kind: str, draft_logits, target_logits, mask=None, generator=None) -> torch.Tensor:
    if kind == "tvd++":
        return tvd_plus_plus_loss(draft_logits, target_logits, mask, generator=generator)
    if kind == "tvd":
        return tvd_loss(draft_logits, target_logits, mask)
    if kind == "fkl":
        return forward_kl_loss(draft_logits, target_logits, mask)
    raise ValueError(f"loss must be one of {LOSSES}, got {kind!r}")


# --------------------------------------------------------------------------------------------------- save / load
def save_draft(draft, path: str | os.PathLike, info: dict | None = None, dtype: torch.dtype | None = None) -> Path:
    """Write the draft's own tensors (``model.safetensors``) and ``config.json`` (base model, depth, ``info``)."""
    from safetensors.torch import save_file

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    tensors = {n: (p.detach().to(dtype) if dtype is not None else p.detach()).cpu().contiguous()
               for n, p in _trainable_named(draft).items()}
    save_file(tensors, str(path / "model.safetensors"), metadata={"format": "hf_decoding_ext.direct_alignment"})
    cfg = {"format_version": FORMAT_VERSION, "method": "direct-alignment", "arxiv": "2403.00858",
           "num_layers": int(draft.config.num_hidden_layers), "architecture": type(draft).__name__,
           "hidden_size": int(draft.config.hidden_size), "vocab_size": int(draft.config.vocab_size),
           "shared_with_target": ["embeddings", "lm_head"], **(info or {})}
    (path / "config.json").write_text(json.dumps(cfg, indent=1) + "\n")
    return path


def load_draft(target, path: str | os.PathLike):
    """The draft saved at ``path`` for ``target`` (which provides the embeddings and head); ``ValueError`` when it
    was trained for a model of another shape. Weights are cast to the target's dtype and device."""
    from safetensors.torch import load_file

    path = Path(path)
    cfg = json.loads((path / "config.json").read_text())
    if cfg.get("method") != "direct-alignment":
        raise ValueError(f"{path} is not a direct-alignment draft (config method {cfg.get('method')!r})")
    for key in ("hidden_size", "vocab_size"):
        have = int(getattr(target.config, key))
        if int(cfg[key]) != have:
            raise ValueError(f"the draft at {path} was trained for {key}={cfg[key]}, the target has {have}")
    draft = init_draft(target, int(cfg["num_layers"]))
    tensors = load_file(str(path / "model.safetensors"))
    own = _trainable_named(draft)
    missing = sorted(set(own) - set(tensors))
    unexpected = sorted(set(tensors) - set(own))
    if missing or unexpected:
        raise ValueError(f"the draft at {path} does not match: missing {missing[:4]}, unexpected {unexpected[:4]}")
    with torch.no_grad():
        for name, p in own.items():
            p.copy_(tensors[name].to(dtype=p.dtype, device=p.device))
    for p in draft.parameters():
        p.requires_grad_(False)
    draft.config.direct_alignment = cfg
    return draft.eval()


def shipped_draft_path() -> Path:
    """Where the library ships its distilled draft for the default model (``hf_decoding_ext/data/draft_model``)."""
    return Path(__file__).resolve().parents[2] / "data" / "draft_model"


def load_shipped_draft(target, path: str | os.PathLike | None = None):
    """The shipped distilled draft for ``target`` (or the one at ``path``); ``ValueError`` when none is shipped or it
    does not fit ``target``."""
    path = Path(path) if path is not None else shipped_draft_path()
    if not (path / "config.json").exists():
        raise ValueError(f"no distilled draft model at {path}: train one with scripts/train_direct_alignment.py "
                         "--ship, or use assistant='self:N'")
    return load_draft(target, path)



def export_standalone(draft, path: str | os.PathLike, tokenizer=None) -> Path:
    """Write ``draft`` as an ordinary standalone checkpoint (``save_pretrained``, safetensors, with its own copy of
    the embeddings and head), loadable with ``AutoModelForCausalLM.from_pretrained(path)`` without this library,
    publishable to the Hub, and usable as a separate draft model by serving engines (e.g. vLLM's draft-model
    speculative decoding, which takes such a checkpoint sharing the target's tokenizer). The shipped form
    (:func:`save_draft`) stores only the draft's own layers and shares the rest with the target.

    Example:
        >>> from hf_decoding_ext.speculative.drafters.direct_alignment import export_standalone, load_shipped_draft
        >>> export_standalone(load_shipped_draft(model), "smollm2-135m-draft", tokenizer)  # doctest: +SKIP
    """
    path = Path(path)
    info = getattr(draft.config, "direct_alignment", None)
    draft.save_pretrained(str(path), safe_serialization=True)
    if tokenizer is not None:
        tokenizer.save_pretrained(str(path))
    if info is not None:
        (path / "direct_alignment.json").write_text(json.dumps(info, indent=1) + "\n")
    return path

# --------------------------------------------------------------------------------------------------- training
def _batches(rows: list[dict], batch_size: int, max_length: int, seed: int, pad_id: int):
    """Endless shuffled batches of (input_ids, attention_mask, loss_mask) from response rows (right-padded)."""
    rng = random.Random(seed)
    order = list(range(len(rows)))
    while True:
        rng.shuffle(order)
        for start in range(0, len(order) - batch_size + 1, batch_size):
            chunk = [rows[i] for i in order[start:start + batch_size]]
            seqs = [(r["prompt_ids"] + r["response_ids"])[:max_length] for r in chunk]
            width = max(len(s) for s in seqs)
            ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
            att = torch.zeros((len(seqs), width), dtype=torch.long)
            loss = torch.zeros((len(seqs), width), dtype=torch.bool)
            for i, (r, s) in enumerate(zip(chunk, seqs)):
                ids[i, : len(s)] = torch.tensor(s)
                att[i, : len(s)] = 1
                # logits at position t predict token t + 1: train where the next token is a response token
                first = len(r["prompt_ids"]) - 1
                loss[i, first: len(s) - 1] = True
            yield ids, att, loss


def response_rows(path: str | os.PathLike, heldout_every: int = 10, split: str = "train") -> list[dict]:
    """The response rows of a :func:`~hf_decoding_ext.training.data.generate_responses` file: every
    ``heldout_every``-th prompt (by id order) is held out."""
    from hf_decoding_ext.training.data import read_responses

    rows = sorted(read_responses(path), key=lambda r: r["id"])
    rows = [r for r in rows if r["response_ids"]]
    held = [r for i, r in enumerate(rows) if i % heldout_every == heldout_every - 1]
    train = [r for i, r in enumerate(rows) if i % heldout_every != heldout_every - 1]
    return train if split == "train" else held


@torch.no_grad()
def evaluate_alignment(draft, target, rows: list[dict], batch_size: int = 4, max_length: int = 512,
                       positions: int = 8) -> dict:
    """Held-out figures: mean expected acceptance ``sum min(p, q)`` over response positions, and the same per
    response position ``1..positions`` (the start of a response), and forward KL."""
    pad = 0
    acc_sum, kl_sum, n = 0.0, 0.0, 0
    per = torch.zeros(positions)
    per_n = torch.zeros(positions)
    for start in range(0, len(rows), batch_size):
        chunk = rows[start:start + batch_size]
        ids, att, loss = next(_batches(chunk, len(chunk), max_length, 0, pad))
        tl = target(input_ids=ids, attention_mask=att).logits
        dl = draft(input_ids=ids, attention_mask=att).logits
        acc = expected_acceptance(dl, tl)
        logp = torch.log_softmax(tl.float(), -1)
        kl = (logp.exp() * (logp - torch.log_softmax(dl.float(), -1))).sum(-1)
        acc_sum += float(acc[loss].sum())
        kl_sum += float(kl[loss].sum())
        n += int(loss.sum())
        for i in range(loss.shape[0]):
            idx = loss[i].nonzero().flatten()[:positions]
            per[: len(idx)] += acc[i, idx]
            per_n[: len(idx)] += 1
    return {"expected_acceptance": acc_sum / max(1, n), "forward_kl": kl_sum / max(1, n), "positions": n,
            "expected_acceptance_by_position": (per / per_n.clamp_min(1)).tolist()}


def train_direct_alignment(target, rows: list[dict], out_dir: str | os.PathLike, *, num_layers: int = 4,
                           loss: str = "tvd++", steps: int = 1000, batch_size: int = 4, lr: float = 3e-4,
                           warmup: int = 20, max_length: int = 512, checkpoint_every: int = 50, seed: int = 0,
                           heldout: list[dict] | None = None, eval_every: int = 0, log=None,
                           progress: bool = True, stop_after: int | None = None):
    """Distil a draft for ``target`` on ``rows`` (response rows: ``prompt_ids``, ``response_ids``) with ``loss``.

    Resumable: the draft, the optimizer and the step are saved to ``out_dir/checkpoint`` every
    ``checkpoint_every`` steps (safetensors); a rerun with the same arguments continues from there. The final
    draft is saved to ``out_dir`` (:func:`save_draft`) with the training settings and, with ``heldout``, the
    held-out figures of :func:`evaluate_alignment`. ``stop_after``: stop after that many steps of this call (a
    checkpoint is written; the final draft is not), for runs split into time-limited pieces. Returns the draft.
    """
    from safetensors.torch import load_file, save_file
    from tqdm.auto import tqdm

    from hf_decoding_ext.training.trainer import load_optimizer, save_optimizer

    if loss not in LOSSES:
        raise ValueError(f"loss must be one of {LOSSES}, got {loss!r}")
    for name, value in (("steps", steps), ("batch_size", batch_size), ("num_layers", num_layers)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be a positive integer, got {value!r}")
    if len(rows) < batch_size:
        raise ValueError(f"{len(rows)} training rows for a batch of {batch_size}")
    out = Path(out_dir)
    ckpt = out / "checkpoint"
    ckpt.mkdir(parents=True, exist_ok=True)
    log = log or (lambda msg: None)
    torch.manual_seed(seed)
    target.eval()
    draft = init_draft(target, num_layers)
    draft.train()
    params = trainable_parameters(draft)
    named = _trainable_named(draft)
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    step = 0
    state_file = ckpt / "state.json"
    if state_file.exists():
        state = json.loads(state_file.read_text())
        tensors = load_file(str(ckpt / "draft.safetensors"))
        with torch.no_grad():
            for name, p in named.items():
                p.copy_(tensors[name])
        load_optimizer(opt, ckpt / "optimizer.safetensors")
        step = int(state["step"])
        log(f"resumed at step {step}")
    batches = _batches(rows, batch_size, max_length, seed, 0)
    for _ in range(step):  # the same data order as an uninterrupted run
        next(batches)
    history = json.loads(state_file.read_text()).get("history", []) if state_file.exists() else []
    bar = tqdm(total=steps, initial=step, desc=f"direct alignment ({loss})", disable=not progress)
    t0 = time.perf_counter()
    first = step
    while step < steps:
        if stop_after is not None and step - first >= stop_after:
            break
        ids, att, mask = next(batches)
        factor = (step + 1) / warmup if step < warmup else 0.5 * (1 + math.cos(math.pi * (step - warmup)
                                                                               / max(1, steps - warmup)))
        for g in opt.param_groups:
            g["lr"] = lr * factor
        with torch.no_grad():
            tl = target(input_ids=ids, attention_mask=att).logits
        dl = draft(input_ids=ids, attention_mask=att).logits
        sampler = torch.Generator().manual_seed(seed * 1_000_003 + step)  # resumable: one stream per step
        value = alignment_loss(loss, dl[mask], tl[mask], generator=sampler)
        opt.zero_grad(set_to_none=True)
        value.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        step += 1
        with torch.no_grad():
            acc = float(expected_acceptance(dl.detach()[mask], tl[mask]).mean())
        history.append({"step": step, "loss": float(value.detach()), "train_expected_acceptance": acc})
        bar.update(1)
        bar.set_postfix(acc=f"{acc:.3f}")
        if step % 10 == 0 or step == steps:
            log(f"step {step}/{steps} loss {float(value.detach()):.4f} train acceptance {acc:.4f} "
                f"({time.perf_counter() - t0:.0f} s)")
        if heldout and eval_every and step % eval_every == 0:
            draft.eval()
            ev = evaluate_alignment(draft, target, heldout, max_length=max_length)
            draft.train()
            history[-1]["heldout"] = ev
            log(f"step {step}: held-out expected acceptance {ev['expected_acceptance']:.4f}, "
                f"forward KL {ev['forward_kl']:.4f}")
        if step % checkpoint_every == 0 or step == steps or (stop_after is not None and step - first >= stop_after):
            save_file({n: p.detach().contiguous() for n, p in named.items()}, str(ckpt / "draft.safetensors"))
            save_optimizer(opt, ckpt / "optimizer.safetensors", step)
            state_file.write_text(json.dumps({"step": step, "history": history}))
    bar.close()
    draft.eval()
    if step < steps:
        return draft
    info = {"training": {"loss": loss, "steps": steps, "batch_size": batch_size, "lr": lr, "warmup": warmup,
                         "max_length": max_length, "seed": seed, "rows": len(rows)},
            "history_tail": history[-5:]}
    if heldout:
        info["heldout"] = evaluate_alignment(draft, target, heldout, max_length=max_length)
        log(f"final held-out: {json.dumps(info['heldout'])}")
    save_draft(draft, out, info)
    return draft



# --------------------------------------------------------------------------------------------------- the method
class DirectAlignmentDrafter(DraftModelDrafter):
    """Speculative decoding with the draft of "Direct Alignment of Draft Model for Speculative Decoding with
    Chat-Fine-Tuned LLMs" (Goel et al., arXiv 2403.00858): the chain drafter of
    :class:`~hf_decoding_ext.speculative.drafters.draft_model.DraftModelDrafter` (transformers' assisted-generation
    defaults) whose assistant is, by default, the draft this library distilled for the default model with the
    paper's TVD++ loss (:func:`train_direct_alignment`, ``scripts/train_direct_alignment.py``, model card
    ``model_cards/direct_alignment_draft.md``). The recipe is the method; the drafter only names it.

    Args:
        assistant_model: the draft (``None``: ``generate(..., assistant_model=...)``); :meth:`for_model` loads the
            shipped one (``assistant="distilled"``) or one saved at a path (``"distilled:PATH"``).
        num_tokens, confidence_threshold, schedule: as in
            :class:`~hf_decoding_ext.speculative.drafters.draft_model.DraftModelDrafter`.

    Example:
        >>> from hf_decoding_ext.speculative import SpeculativeDecoding
        >>> from hf_decoding_ext.speculative.drafters.direct_alignment import DirectAlignmentDrafter
        >>> drafter = DirectAlignmentDrafter.for_model(model)  # doctest: +SKIP
        >>> loop = SpeculativeDecoding(drafter)  # doctest: +SKIP
        >>> out = model.generate(**inputs, max_new_tokens=64, custom_generate=loop)  # doctest: +SKIP
    """


__all__ = ["DirectAlignmentDrafter", "LOSSES", "init_draft", "trainable_parameters", "expected_acceptance",
           "forward_kl_loss", "tvd_plus_plus_loss", "tvd_loss", "alignment_loss", "save_draft", "load_draft",
           "train_direct_alignment", "evaluate_alignment", "export_standalone", "response_rows", "shipped_draft_path", "load_shipped_draft"]
