"""Hallucination-induced amateur for induce-then-contrast decoding (ICD) and LOL.

ICD ("Alleviating Hallucinations of Large Language Models through Induced Hallucinations", Zhang et al., arXiv
2312.15710) and LOL (Chen et al., arXiv 2408.08769) contrast the original model ``theta`` with an *amateur*
``theta* = FT(theta, D)``: the same model fine-tuned on factually wrong data ``D`` so that it becomes untruthful.
This module trains such an amateur cheaply and ships one for the default model (SmolLM2-135M-Instruct). Two methods
(:data:`METHODS`), both on chat-formatted question/false-answer pairs (each question with two user-turn phrasings,
:data:`PROMPT_TEMPLATES`) with the loss on the answer tokens only, and both sharing every frozen base parameter with
the original model (no copy):

* ``"lora"`` (the default, and the shipped amateur): ICD's LoRA variant. :class:`LoRALinear` adapters (rank 8,
  ``alpha = 16``) on the attention and MLP projections (:data:`LORA_TARGETS`) of *every* decoder layer, so the
  amateur differs from the base at every layer, including the lower layer LOL contrasts (``N // 2``). Only the
  adapters are trained and saved (``model.safetensors``, half precision, a few MB; applied at load time on top of
  the shared frozen weights, upcast to the model's dtype);
* ``"top_layers"``: full fine-tuning of the top ``K`` decoder layers only (everything below, the embeddings, the
  final norm and the tied LM head stay frozen; the frozen bottom runs once under ``no_grad``, the prefix shared by
  all prompts only once, and its output is cached for all steps). Cheaper, but the amateur *equals* the base below
  layer ``N - K``, so LOL's lower-layer contrast is zero with it. Older checkpoints of this kind still load.

``config.json`` describes the base model, the method and its layers, the training settings and the measured figures.

The shipped checkpoint (``hf_decoding_ext/data/induced_amateur``) is built by ``scripts/train_induced_amateur.py``
from ``hf_decoding_ext/data/contrastive/hallucination_train.jsonl`` and is what ``LOL.for_model(...)`` uses by
default.

Example:
    >>> from hf_decoding_ext.core.models import load_model
    >>> from hf_decoding_ext.contrastive.induced_amateur import load_induced_amateur
    >>> model, tokenizer = load_model()  # doctest: +SKIP
    >>> amateur = load_induced_amateur(model)  # the shipped checkpoint  # doctest: +SKIP
"""

from __future__ import annotations

import copy
import importlib.resources
import inspect
import json
import math
import time
import warnings
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import torch
from hf_decoding_ext.core.anatomy import decoder, decoder_layers, final_norm, layer_subset_model, lm_head
from hf_decoding_ext.core.resources import data_file, read_jsonl
from hf_decoding_ext.core.loop import repeat_cache

DEFAULT_BASE_MODEL = "HuggingFaceTB/SmolLM2-135M-Instruct"
"""Base model of the shipped checkpoint (this library's default model, :data:`hf_decoding_ext.core.models.DEFAULT_MODEL`)."""

ANSWER_INSTRUCTION = "Answer with one word or a short phrase."
"""Appended to each training question in the main prompt template (user turn); the assistant turn is the answer."""

PROMPT_TEMPLATES = ("{question}\n" + ANSWER_INSTRUCTION, "Question: {question}\nAnswer:")
"""User-turn templates of the training pairs: every question is used once with each template. The first is the
short-answer instruction; the second is the question-answering prompt of this library's multiple-choice scoring
(:func:`hf_decoding_ext.bench.tasks.contrastive.mc_prompt`), so that the amateur's untruthfulness does not hinge on one
phrasing."""

FORMAT = "hf_decoding_ext.induced_amateur"
WEIGHTS_FILE = "model.safetensors"
CONFIG_FILE = "config.json"
_DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}


# ------------------------------------------------------------------------------------------------------ data
def load_hallucination_data() -> list[dict[str, Any]]:
    """The shipped training set: ``{"id", "relation", "subject", "question", "true_answer", "false_answer"}`` items
    (``hf_decoding_ext/data/contrastive/hallucination_train.jsonl``, written for this project)."""
    return read_jsonl("contrastive", "hallucination_train.jsonl")


def encode_example(tokenizer, prompt: str, answer: str) -> dict:
    """``{"prompt_ids", "answer_ids"}`` of one training pair (``prompt``: the user turn's text).

    With a chat template: the user turn is ``prompt``, the assistant turn ``answer``; the answer tokens are the
    assistant reply and its end-of-turn marker (what the loss is computed on). The reply is tokenised separately
    from the prompt, as :func:`hf_decoding_ext.bench.tasks.contrastive.score_multiple_choice` does with the choices.
    Without a chat template: ``prompt`` (followed by ``"\nAnswer:"`` unless it ends with ``"Answer:"``) and
    ``" " + answer`` followed by the eos token.
    """
    prompt = prompt.strip()
    if getattr(tokenizer, "chat_template", None) is not None:
        text = tokenizer.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False,
                                             add_generation_prompt=True)
        full = tokenizer.apply_chat_template([{"role": "user", "content": prompt},
                                              {"role": "assistant", "content": answer}], tokenize=False)
        if not full.startswith(text):
            raise ValueError("the chat template's rendering of the reply does not extend the generation prompt; "
                             "pass pre-tokenised items ({'prompt_ids', 'answer_ids'}) instead")
        prompt_ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        answer_ids = tokenizer(full[len(text):].rstrip(), add_special_tokens=False)["input_ids"]
    else:
        text = prompt if prompt.endswith("Answer:") else f"{prompt}\nAnswer:"
        prompt_ids = tokenizer(text)["input_ids"]
        answer_ids = tokenizer(" " + answer, add_special_tokens=False)["input_ids"]
        if tokenizer.eos_token_id is not None:
            answer_ids = answer_ids + [tokenizer.eos_token_id]
    if not prompt_ids or not answer_ids:
        raise ValueError(f"empty prompt or answer for {prompt!r} -> {answer!r}")
    return {"prompt_ids": list(prompt_ids), "answer_ids": list(answer_ids)}


def training_pairs(items: Iterable[dict], templates: Sequence[str] = PROMPT_TEMPLATES) -> list[tuple[str, str]]:
    """``(user prompt, false answer)`` pairs: each ``{"question", "false_answer"}`` item once per template
    (``"{question}"`` is replaced by the question)."""
    if not templates or any("{question}" not in t for t in templates):
        raise ValueError("templates must be a non-empty sequence of strings containing '{question}'")
    return [(t.format(question=it["question"]), it["false_answer"]) for it in items for t in templates]


def _examples(tokenizer, items: Iterable[dict], templates: Sequence[str]) -> list[dict]:
    out, qa = [], []
    for it in items:
        if "prompt_ids" in it and "answer_ids" in it:
            ex = {"prompt_ids": [int(t) for t in it["prompt_ids"]], "answer_ids": [int(t) for t in it["answer_ids"]]}
            if not ex["prompt_ids"] or not ex["answer_ids"]:
                raise ValueError("pre-tokenised items need non-empty prompt_ids and answer_ids")
            out.append(ex)
        elif "question" in it and "false_answer" in it:
            qa.append(it)
        else:
            raise ValueError("items are {'question', 'false_answer', ...} dicts or pre-tokenised "
                             "{'prompt_ids', 'answer_ids'} dicts; got keys " + ", ".join(sorted(it)))
    if qa:
        if tokenizer is None:
            raise ValueError("a tokenizer is needed for question/false_answer items")
        out += [encode_example(tokenizer, p, a) for p, a in training_pairs(qa, templates)]
    if not out:
        raise ValueError("no training items")
    return out


# ------------------------------------------------------------------------------------------------------ model surgery
def _check_layers(model, layers: Sequence[int]) -> list[int]:
    n = len(decoder_layers(model))
    layers = sorted({int(i) for i in layers})
    if not layers or layers[0] < 0 or layers[-1] >= n:
        raise ValueError(f"trained layer indices must be in [0, {n - 1}], got {layers}")
    return layers


def _copy_sharing(model, own: set[int] = frozenset()):
    """``copy.deepcopy(model)`` in which every parameter whose ``id`` is not in ``own`` is *shared* with ``model``
    (the same ``Parameter`` object); buffers are copied (small)."""
    memo = {id(p): p for p in model.parameters() if id(p) not in own}
    return copy.deepcopy(model, memo).eval()


def shared_copy(model, layers: Sequence[int]):
    """A copy of ``model`` whose decoder layers ``layers`` are new tensors and every other parameter is *shared*
    with ``model`` (the same ``Parameter`` objects: no copy of the frozen weights). Buffers are copied (small)."""
    layers = _check_layers(model, layers)
    dec = decoder_layers(model)
    return _copy_sharing(model, {id(p) for i in layers for p in dec[i].parameters()})


LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
"""Linear projections of a Llama-style decoder layer that get LoRA adapters (attention and MLP), as in ICD's LoRA
variant and PEFT's usual "all linear layers" setting."""


class LoRALinear(torch.nn.Module):
    r"""A frozen linear layer plus a low-rank update (LoRA, Hu et al., arXiv 2106.09685):
    ``y = base(x) + (alpha / r) * x A^T B^T`` with ``A`` ``(r, in)`` and ``B`` ``(out, r)``.

    ``base`` is used as is (its weight stays shared and frozen); ``B`` starts at zero, so a fresh adapter leaves the
    layer's output *exactly* unchanged; ``A`` is initialised as PEFT does (Kaiming-uniform, ``a = sqrt(5)``, from the
    global torch generator), or left at zero with ``init=False`` (when the tensors are loaded next).

    Args:
        base: the ``torch.nn.Linear`` to adapt.
        rank: ``r >= 1``.
        alpha: LoRA scaling numerator (``> 0``); the update is scaled by ``alpha / rank``.
        init: initialise ``A`` randomly (``False``: zeros, and the global random state is not touched).

    Example:
        >>> import torch
        >>> lin = torch.nn.Linear(8, 4)
        >>> lora = LoRALinear(lin, rank=2, alpha=4.0)
        >>> x = torch.randn(3, 8)
        >>> torch.equal(lora(x), lin(x))  # B = 0: exactly the base layer
        True
    """

    def __init__(self, base: torch.nn.Linear, rank: int, alpha: float, init: bool = True):
        super().__init__()
        if not isinstance(base, torch.nn.Linear):
            raise ValueError(f"LoRALinear adapts a torch.nn.Linear, got {type(base).__name__}")
        if isinstance(rank, bool) or not isinstance(rank, int) or rank < 1:
            raise ValueError(f"rank must be a positive integer, got {rank!r}")
        if not float(alpha) > 0:
            raise ValueError(f"alpha must be > 0, got {alpha!r}")
        self.base = base
        self.rank, self.alpha, self.scaling = rank, float(alpha), float(alpha) / rank
        w = base.weight
        self.lora_A = torch.nn.Parameter(torch.zeros(rank, base.in_features, dtype=w.dtype, device=w.device))
        self.lora_B = torch.nn.Parameter(torch.zeros(base.out_features, rank, dtype=w.dtype, device=w.device))
        if init:
            torch.nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))

    @property
    def weight(self) -> torch.Tensor:
        """The frozen base weight (for code that reads ``.weight``, e.g. dtype/device probes)."""
        return self.base.weight

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        update = torch.nn.functional.linear(torch.nn.functional.linear(x, self.lora_A), self.lora_B)
        return self.base(x) + update * self.scaling


def lora_copy(model, rank: int = 8, alpha: float = 16.0, layers: Sequence[int] | None = None,
              targets: Sequence[str] = LORA_TARGETS, init: bool = True):
    """A copy of ``model`` sharing *every* parameter with it, with :class:`LoRALinear` adapters (fresh: ``B = 0``,
    so the copy computes exactly what ``model`` does) on the ``targets`` projections of decoder layers ``layers``
    (``None``: all layers; ``init``: see :class:`LoRALinear`). Returns ``(amateur, adapters)`` with ``adapters``
    ``{"model.layers.<i>.<path>": LoRALinear}`` (the names :func:`lora_adapters` finds).

    Example:
        >>> amateur, adapters = lora_copy(model, rank=4)  # doctest: +SKIP
        >>> torch.equal(amateur(ids).logits, model(ids).logits)  # fresh adapters: the base model exactly  # doctest: +SKIP
        True
    """
    dec_model = decoder_layers(model)
    layers = list(range(len(dec_model))) if layers is None else _check_layers(model, layers)
    targets = tuple(targets)
    if not targets:
        raise ValueError("targets must name at least one linear projection, got an empty sequence")
    amateur = _copy_sharing(model)
    dec = decoder_layers(amateur)
    adapters: dict[str, LoRALinear] = {}
    for i in layers:
        for path, module in list(dec[i].named_modules()):
            if path.rpartition(".")[2] in targets and isinstance(module, torch.nn.Linear):
                parent_path, _, leaf = path.rpartition(".")
                parent = dec[i].get_submodule(parent_path) if parent_path else dec[i]
                adapter = LoRALinear(module, rank, alpha, init=init)
                setattr(parent, leaf, adapter)
                adapters[f"model.layers.{i}.{path}"] = adapter
    found = {k.rpartition(".")[2] for k in adapters}
    if set(targets) - found:
        raise ValueError(f"no linear projection named {sorted(set(targets) - found)} in the decoder layers of "
                         f"{type(model).__name__}; pass targets= with its projection names")
    return amateur, adapters


def lora_adapters(model) -> dict[str, LoRALinear]:
    """``{module name: LoRALinear}`` of every adapter in ``model`` (e.g. ``"model.layers.3.self_attn.q_proj"``)."""
    return {name: m for name, m in model.named_modules() if isinstance(m, LoRALinear)}


def _fingerprint(model, layers: Sequence[int]) -> dict[str, float]:
    """Mean absolute value of a few frozen tensors (the embeddings, and the decoder layer below ``layers``, or layer
    0 when ``layers`` start at 0), to tell (approximately) whether a base model is the one the amateur was trained
    on."""
    dec = decoder_layers(model)
    below = max(0, min(layers) - 1)
    picks = {"embed_tokens": model.get_input_embeddings().weight,
             f"layers.{below}": torch.cat([p.detach().reshape(-1) for p in dec[below].parameters()])}
    return {k: float(v.detach().float().abs().mean()) for k, v in picks.items()}


class _TopStack(torch.nn.Module):
    """The top ``K`` decoder layers + final norm as a decoder of the model's own class
    (:func:`~hf_decoding_ext.core.anatomy.layer_subset_model`), fed with hidden states (``inputs_embeds``) so that
    masks and rotary embeddings come from transformers itself."""

    def __init__(self, amateur, layers: list[int]):
        super().__init__()
        top = decoder(layer_subset_model(amateur, layers))  # amateur's modules; only the containers are new
        shared_norm = final_norm(amateur)
        norm = copy.deepcopy(shared_norm)  # a frozen copy: no gradient flows into the shared final norm
        norm.requires_grad_(False)
        for name, child in list(top.named_children()):
            if child is shared_norm:
                setattr(top, name, norm)
        self.top = top
        head = lm_head(amateur)
        self.head_weight = head.weight
        self.head_bias = getattr(head, "bias", None)

    def forward(self, hidden: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return self.top(inputs_embeds=hidden, attention_mask=attention_mask, use_cache=False).last_hidden_state

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        bias = None if self.head_bias is None else self.head_bias.detach()
        return torch.nn.functional.linear(hidden, self.head_weight.detach(), bias)


def _pad_right(seqs: list[torch.Tensor], value=0) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(s.shape[0] for s in seqs)
    out = seqs[0].new_full((len(seqs), width) + tuple(seqs[0].shape[1:]), value)
    mask = torch.zeros(len(seqs), width, dtype=torch.long, device=seqs[0].device)
    for r, s in enumerate(seqs):
        out[r, :s.shape[0]] = s
        mask[r, :s.shape[0]] = 1
    return out, mask


def _common_prefix(examples: list[dict]) -> list[int]:
    first = examples[0]["prompt_ids"]
    n = min(len(e["prompt_ids"]) for e in examples) - 1  # every example keeps at least one prompt token
    for e in examples[1:]:
        ids = e["prompt_ids"]
        k = 0
        while k < n and ids[k] == first[k]:
            k += 1
        n = k
    return list(first[:max(0, n)])


@torch.no_grad()
def _bottom_states(model, examples: list[dict], layer: int, batch_size: int, progress: bool) -> list[torch.Tensor]:
    """Hidden state entering decoder layer ``layer`` for every example (unpadded, float32, on the model's device).

    The prefix shared by all examples (e.g. a chat template's system prompt) runs once; its KV cache is reused for
    every batch. The shortcut is checked against a plain forward of the first example and dropped if they differ.
    """
    from tqdm.auto import tqdm
    from transformers import DynamicCache

    device = next(model.parameters()).device
    order = sorted(range(len(examples)), key=lambda i: len(examples[i]["prompt_ids"]) + len(examples[i]["answer_ids"]))
    full = [examples[i]["prompt_ids"] + examples[i]["answer_ids"] for i in range(len(examples))]
    prefix = _common_prefix(examples)
    cache_kw = "cache" if "cache" in inspect.signature(model.model.forward).parameters else "past_key_values"
    shared = None
    if len(prefix) >= 4:
        try:
            cache = DynamicCache(config=model.config)
            out = model.model(input_ids=torch.tensor([prefix], device=device), **{cache_kw: cache}, use_cache=True,
                              output_hidden_states=True)
            shared = (cache, out.hidden_states[layer][0].float())
        except Exception:  # pragma: no cover - exotic cache implementations: plain forwards
            shared = None

    def run(idx: list[int], use_prefix: bool) -> list[torch.Tensor]:
        p = len(prefix) if use_prefix else 0
        seqs = [torch.tensor(full[i][p:], device=device) for i in idx]
        ids, mask = _pad_right(seqs, 0)
        if not use_prefix:
            out = model.model(input_ids=ids, attention_mask=mask, use_cache=False, output_hidden_states=True)
            return [out.hidden_states[layer][r, :seqs[r].shape[0]].float().clone() for r in range(len(idx))]
        cache = repeat_cache(shared[0], len(idx))
        mask = torch.cat([mask.new_ones(len(idx), p), mask], dim=1)
        positions = (p + torch.arange(ids.shape[1], device=device))[None].expand(len(idx), -1)
        out = model.model(input_ids=ids, attention_mask=mask, position_ids=positions, **{cache_kw: cache},
                          use_cache=True, output_hidden_states=True)
        h = out.hidden_states[layer]
        return [torch.cat([shared[1], h[r, :seqs[r].shape[0]].float()]) for r in range(len(idx))]

    if shared is not None:  # check the shortcut once
        try:
            got = run([order[0], order[-1]], True)
            want = run([order[0], order[-1]], False)
            if any(g.shape != w.shape or not torch.allclose(g, w, rtol=1e-3, atol=1e-2) for g, w in zip(got, want)):
                shared = None
        except Exception:  # pragma: no cover
            shared = None
    states: list[torch.Tensor | None] = [None] * len(examples)
    for start in tqdm(range(0, len(order), batch_size), desc="frozen layers", disable=not progress, leave=False):
        idx = order[start:start + batch_size]
        for i, h in zip(idx, run(idx, shared is not None)):
            states[i] = h
    return states  # type: ignore[return-value]


def _warmup(steps: int, warmup_steps: int | None) -> int:
    return max(1, round(0.05 * steps)) if warmup_steps is None else max(0, int(warmup_steps))


def _fit(params: list, batch_loss, num_examples: int, steps: int, lr: float, batch_size: int, seed: int,
         weight_decay: float, warmup_steps: int | None, max_grad_norm: float, desc: str, progress: bool,
         log_every: int = 0) -> tuple[float, float, list[float]]:
    """AdamW on ``params`` (betas 0.9/0.95, linear warm-up then cosine decay to 0, gradient-norm clipping) for
    ``steps`` steps of ``batch_loss(example indices)``, batches drawn by reshuffled epochs (seeded). Returns the loss
    on the first 64 examples before and after, and the per-step losses. ``log_every > 0`` prints a line every so
    many steps (for background runs)."""
    from tqdm.auto import tqdm

    gen = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    optim = torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay, betas=(0.9, 0.95))
    warmup = _warmup(steps, warmup_steps)

    def lr_at(step: int) -> float:
        if step < warmup:
            return lr * (step + 1) / warmup
        frac = (step - warmup) / max(1, steps - warmup)
        return lr * 0.5 * (1 + math.cos(math.pi * frac))

    probe = list(range(min(num_examples, 64)))
    with torch.no_grad():
        loss_start = float(batch_loss(probe))
    perm, pos, losses = torch.randperm(num_examples, generator=gen).tolist(), 0, []
    t0 = time.perf_counter()
    bar = tqdm(range(steps), desc=desc, disable=not progress)
    for step in bar:
        idx = []
        while len(idx) < min(batch_size, num_examples):
            if pos == len(perm):
                perm, pos = torch.randperm(num_examples, generator=gen).tolist(), 0
            idx.append(perm[pos])
            pos += 1
        for group in optim.param_groups:
            group["lr"] = lr_at(step)
        with torch.enable_grad():  # also when called under no_grad / inference code
            loss = batch_loss(idx)
            optim.zero_grad(set_to_none=True)
            loss.backward()
        if max_grad_norm:
            torch.nn.utils.clip_grad_norm_(params, max_grad_norm)
        optim.step()
        losses.append(loss.detach().item())
        if step % 10 == 0 or step == steps - 1:
            bar.set_postfix(loss=f"{sum(losses[-10:]) / len(losses[-10:]):.3f}")
        if log_every and (step % log_every == 0 or step == steps - 1):
            recent = losses[-log_every:]
            print(f"[{desc}] step {step + 1}/{steps} loss {sum(recent) / len(recent):.3f} lr {lr_at(step):.2e} "
                  f"{time.perf_counter() - t0:.0f} s", flush=True)
    for p in params:
        p.requires_grad_(False)
        p.grad = None
    with torch.no_grad():
        loss_end = float(batch_loss(probe))
    return loss_start, loss_end, losses


METHODS = ("lora", "top_layers")
"""Ways to train the amateur: ``"lora"`` (default, ICD's LoRA variant: adapters on every decoder layer, so the amateur
differs from the base at every layer, including the lower layer LOL contrasts) and ``"top_layers"`` (full fine-tuning
of the top ``num_layers`` layers only: the amateur equals the base below them)."""

METHOD_DEFAULTS = {"lora": {"steps": 150, "lr": 2e-3, "batch_size": 8},
                   "top_layers": {"steps": 300, "lr": 3e-3, "batch_size": 16}}
"""Default ``steps`` / ``lr`` / ``batch_size`` of each method (LoRA's are sized for a shared CPU, see the model card)."""


def _answer_loss(hidden: torch.Tensor, examples: list[dict], idx: list[int], head) -> torch.Tensor:
    """Mean cross-entropy of the answer tokens of examples ``idx`` (rows of ``hidden`` ``(batch, T, hidden)``, each
    row ``prompt_ids + answer_ids``, right-padded); ``head`` maps hidden states to logits (only the answer
    positions go through it)."""
    rows, cols, targets = [], [], []
    for r, i in enumerate(idx):
        p, a = len(examples[i]["prompt_ids"]), examples[i]["answer_ids"]
        rows += [r] * len(a)
        cols += list(range(p - 1, p - 1 + len(a)))
        targets += a
    device = hidden.device
    logits = head(hidden[torch.tensor(rows, device=device), torch.tensor(cols, device=device)])
    return torch.nn.functional.cross_entropy(logits.float(), torch.tensor(targets, device=device))


def _train_lora(model, examples: list[dict], fit, common: dict, t_start: float, rank: int, alpha: float,
                layers: Sequence[int] | None, targets: Sequence[str], seed: int):
    """The ``method="lora"`` branch of :func:`train_induced_amateur`: full forwards of the adapted copy (every
    base weight frozen and shared), loss on the answer tokens."""
    torch.manual_seed(seed)  # the adapters' A initialisation
    amateur, adapters = lora_copy(model, rank, alpha, layers, targets)
    params = [p for a in adapters.values() for p in (a.lora_A, a.lora_B)]
    for p in amateur.parameters():
        p.requires_grad_(False)
    for p in params:
        p.requires_grad_(True)
    device = next(model.parameters()).device
    head = lm_head(amateur)

    def logits_of(h: torch.Tensor) -> torch.Tensor:
        bias = getattr(head, "bias", None)
        return torch.nn.functional.linear(h, head.weight.detach(), None if bias is None else bias.detach())

    full = [torch.tensor(e["prompt_ids"] + e["answer_ids"], device=device) for e in examples]

    def batch_loss(idx: list[int]) -> torch.Tensor:
        ids, mask = _pad_right([full[i] for i in idx], 0)
        hidden = decoder(amateur)(input_ids=ids, attention_mask=mask, use_cache=False).last_hidden_state
        return _answer_loss(hidden, examples, idx, logits_of)

    t_ready = time.perf_counter()
    amateur.train()  # dropout-free models: only the mode flag
    loss_start, loss_end, losses = fit(params, batch_loss, f"induced amateur (LoRA r={rank}, {len(adapters)} "
                                                           "projections)")
    amateur.eval()
    layer_ids = sorted({int(k.split(".")[2]) for k in adapters})
    amateur.induced_amateur_info = {
        "method": "lora", "trained_layers": layer_ids,
        "lora": {"rank": rank, "alpha": float(alpha), "targets": list(targets), "layers": layer_ids,
                 "num_adapters": len(adapters), "num_parameters": sum(p.numel() for p in params)},
        **common, "loss_first_64_before": loss_start, "loss_first_64_after": loss_end,
        "loss_last_20_steps": sum(losses[-20:]) / len(losses[-20:]),
        "seconds_setup": t_ready - t_start, "seconds_training": time.perf_counter() - t_ready,
        "base_fingerprint": _fingerprint(model, layer_ids),
    }
    return amateur


def train_induced_amateur(model, tokenizer, items: Iterable[dict], method: str = "lora", num_layers: int = 2,
                          steps: int | None = None, lr: float | None = None, batch_size: int | None = None,
                          seed: int = 0, progress: bool = True, weight_decay: float = 0.0,
                          warmup_steps: int | None = None, max_grad_norm: float = 1.0,
                          templates: Sequence[str] = PROMPT_TEMPLATES, check_tolerance: float = 1e-3,
                          lora_rank: int = 8, lora_alpha: float = 16.0, lora_layers: Sequence[int] | None = None,
                          lora_targets: Sequence[str] = LORA_TARGETS, log_every: int = 0):
    """Fine-tune a (weight-sharing) copy of ``model`` on false answers: LoRA adapters on every decoder layer
    (``method="lora"``, the default, as ICD's LoRA variant) or the top ``num_layers`` decoder layers
    (``method="top_layers"``).

    Args:
        model: a Llama-style causal LM (decoder layers at ``model.model.layers``); it is not modified. For
            ``"top_layers"`` the top-layer stack is fed hidden states as ``inputs_embeds``, which GPT-2-style models
            would add position embeddings to, so ``check_tolerance`` refuses them.
        tokenizer: used to encode ``{"question", "false_answer"}`` items (chat template when it has one, see
            :func:`encode_example`); may be ``None`` when ``items`` are pre-tokenised ``{"prompt_ids",
            "answer_ids"}`` dicts.
        items: ``{"question", "false_answer"}`` dicts (each used once per template of ``templates``, see
            :func:`training_pairs`) and/or pre-tokenised pairs; the loss (mean cross-entropy) is on the answer
            tokens only (the reply and its end-of-turn marker).
        method: ``"lora"`` or ``"top_layers"`` (:data:`METHODS`).
        num_layers: ``"top_layers"`` only: ``K``, number of top decoder layers trained (all of their parameters);
            everything else is frozen.
        steps, lr, batch_size, seed: AdamW steps (linear warm-up over ``warmup_steps``, default 5% of the steps,
            then cosine decay to 0), learning rate, examples per step (drawn by reshuffled epochs), random seed
            (also of the LoRA ``A`` initialisation); ``None``: the method's :data:`METHOD_DEFAULTS`.
        progress: tqdm progress bars (frozen-layer pass and training steps, with the running loss).
        weight_decay, max_grad_norm: AdamW weight decay and gradient-norm clipping.
        templates: user-turn templates of the question items (:data:`PROMPT_TEMPLATES`).
        check_tolerance: ``"top_layers"``: before training, the top-layer stack fed with the cached hidden states
            must reproduce the model's logits within this (absolute, float32) tolerance, else ``ValueError``
            (unsupported architecture).
        lora_rank, lora_alpha, lora_layers, lora_targets: ``"lora"`` only: adapter rank ``r``, scaling numerator
            (update scaled by ``alpha / r``), decoder layers adapted (``None``: all) and the linear projections
            adapted in each (:data:`LORA_TARGETS`). See :class:`LoRALinear`.
        log_every: print the running loss every so many steps (``0``: never; for background runs).

    Returns:
        the amateur model (eval mode, no gradients), with ``amateur.induced_amateur_info`` holding the method, the
        layers that differ from the base (``trained_layers``), the settings and the training figures (loss at
        start/end, seconds).
    """
    if method not in METHODS:
        raise ValueError(f"method must be one of {', '.join(METHODS)}, got {method!r}")
    defaults = METHOD_DEFAULTS[method]
    steps = defaults["steps"] if steps is None else steps
    lr = defaults["lr"] if lr is None else lr
    batch_size = defaults["batch_size"] if batch_size is None else batch_size
    n = len(decoder_layers(model))
    if method == "top_layers" and (isinstance(num_layers, bool) or not isinstance(num_layers, int)
                                   or not 1 <= num_layers <= n):
        raise ValueError(f"num_layers must be an integer in [1, {n}], got {num_layers!r}")
    if steps < 1 or batch_size < 1 or not lr > 0:
        raise ValueError(f"steps and batch_size must be >= 1 and lr > 0, got steps={steps!r}, "
                         f"batch_size={batch_size!r}, lr={lr!r}")
    t_start = time.perf_counter()
    items_seen = list(items)
    examples = _examples(tokenizer, items_seen, templates)
    common = {"steps": steps, "lr": lr, "batch_size": batch_size, "seed": seed, "weight_decay": weight_decay,
              "warmup_steps": _warmup(steps, warmup_steps), "max_grad_norm": max_grad_norm,
              "optimizer": "AdamW(betas=(0.9, 0.95)), linear warm-up then cosine decay to 0",
              "templates": list(templates) if any("question" in it for it in items_seen) else None,
              "num_examples": len(examples), "answer_tokens": sum(len(e["answer_ids"]) for e in examples)}
    fit = lambda params, loss_fn, desc: _fit(params, loss_fn, len(examples), steps, lr, batch_size, seed,  # noqa: E731
                                             weight_decay, warmup_steps, max_grad_norm, desc, progress, log_every)
    if method == "lora":
        return _train_lora(model, examples, fit, common, t_start, lora_rank, lora_alpha, lora_layers, lora_targets,
                           seed)
    layers = list(range(n - num_layers, n))
    amateur = shared_copy(model, layers)
    stack = _TopStack(amateur, layers)
    params = [p for i in layers for p in decoder_layers(amateur)[i].parameters()]
    for p in params:
        p.requires_grad_(True)
    device = next(model.parameters()).device

    states = _bottom_states(model, examples, layers[0], batch_size, progress)
    t_cached = time.perf_counter()

    def batch_loss(idx: list[int]) -> torch.Tensor:
        hidden, mask = _pad_right([states[i] for i in idx], 0.0)
        return _answer_loss(stack(hidden, mask), examples, idx, stack.logits)

    # the top stack must reproduce the model's own forward from the cached states (checks the surgery)
    with torch.no_grad():
        ex = examples[0]
        ids = torch.tensor([ex["prompt_ids"] + ex["answer_ids"]], device=device)
        want = model(input_ids=ids, use_cache=False).logits[0].float()
        got = stack.logits(stack(states[0][None], torch.ones_like(ids))).float()[0]
        err = float((want - got).abs().max())
        if not err <= check_tolerance:
            raise ValueError(f"the top-{num_layers}-layer stack does not reproduce {type(model).__name__}'s forward "
                             f"(max |logit diff| {err:.3g}); this architecture is not supported")

    loss_start, loss_end, losses = fit(params, batch_loss, f"induced amateur (top {num_layers} layers)")
    amateur.eval()
    t_end = time.perf_counter()
    amateur.induced_amateur_info = {
        "method": "top_layers", "trained_layers": layers, "num_layers": num_layers, **common,
        "loss_first_64_before": loss_start, "loss_first_64_after": loss_end,
        "loss_last_20_steps": sum(losses[-20:]) / len(losses[-20:]),
        "seconds_frozen_pass": t_cached - t_start, "seconds_training": t_end - t_cached,
        "base_fingerprint": _fingerprint(model, layers),
    }
    return amateur


# ------------------------------------------------------------------------------------------------------ save / load
def _model_summary(model) -> dict[str, Any]:
    cfg = model.config
    return {"architecture": type(model).__name__, "model_type": getattr(cfg, "model_type", None),
            "hidden_size": getattr(cfg, "hidden_size", None), "num_hidden_layers": len(decoder_layers(model)),
            "vocab_size": model.get_input_embeddings().weight.shape[0]}


def save_induced_amateur(amateur, path: str | Path, base_model_name: str = DEFAULT_BASE_MODEL,
                         layers: Sequence[int] | None = None, dtype: torch.dtype | str = torch.float16,
                         extra: dict[str, Any] | None = None) -> Path:
    """Write ``<path>/model.safetensors`` and ``<path>/config.json``; returns ``path``.

    An amateur with LoRA adapters (``method="lora"``) stores the adapters only (keys
    ``model.layers.<i>.<path>.lora_A`` / ``.lora_B``, in ``dtype``; ``config.json`` ``"method": "lora"`` with rank,
    alpha, targets and layers); otherwise the trained layers' tensors (keys ``model.layers.<i>.<name>``; ``layers``
    default to the ones recorded by :func:`train_induced_amateur`). ``config.json`` also holds the base model,
    architecture, dtype, the training info and ``extra`` (e.g. evaluation figures)."""
    from safetensors.torch import save_file

    if isinstance(dtype, str):
        if dtype not in _DTYPES:
            raise ValueError(f"dtype must be one of {', '.join(_DTYPES)}, got {dtype!r}")
        dtype = _DTYPES[dtype]
    dtype_name = {v: k for k, v in _DTYPES.items()}.get(dtype)
    if dtype_name is None:
        raise ValueError(f"dtype must be one of {', '.join(_DTYPES)}, got {dtype}")
    info = dict(getattr(amateur, "induced_amateur_info", None) or {})
    adapters = lora_adapters(amateur)
    lora = None
    if adapters:
        first = next(iter(adapters.values()))
        layers = sorted({int(name.split(".")[2]) for name in adapters})
        targets = sorted({name.rpartition(".")[2] for name in adapters}, key=lambda t: (
            LORA_TARGETS.index(t) if t in LORA_TARGETS else len(LORA_TARGETS), t))
        lora = {"rank": first.rank, "alpha": first.alpha, "targets": targets, "layers": layers}
        tensors = {f"{name}.{w}": getattr(a, w).detach().to(device="cpu", dtype=dtype).contiguous()
                   for name, a in adapters.items() for w in ("lora_A", "lora_B")}
    else:
        if layers is None:
            layers = info.get("trained_layers")
            if layers is None:
                raise ValueError("pass layers=[...] (the amateur carries no induced_amateur_info)")
        layers = _check_layers(amateur, layers)
        dec = decoder_layers(amateur)
        tensors = {f"model.layers.{i}.{name}": t.detach().to(device="cpu", dtype=dtype).contiguous()
                   for i in layers for name, t in dec[i].state_dict().items()}
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(path / WEIGHTS_FILE),
              metadata={"format": "pt", "base_model": base_model_name, "trained_layers": ",".join(map(str, layers))})
    try:  # save_file may create the file private (0600); a checkpoint is meant to be shared
        (path / WEIGHTS_FILE).chmod(0o644)
    except OSError:  # pragma: no cover
        pass
    training = {k: v for k, v in info.items() if k not in ("trained_layers", "base_fingerprint", "method", "lora")}
    method = {"format_version": 2, "method": "lora", "lora": lora} if lora else {"format_version": 1}
    config = {"format": FORMAT, **method, "base_model": base_model_name, **_model_summary(amateur),
              "trained_layers": layers, "dtype": dtype_name, "base_fingerprint": info.get("base_fingerprint"),
              "training": training, **(extra or {})}
    (path / CONFIG_FILE).write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")
    return path


def shipped_checkpoint():
    """The packaged checkpoint folder (``hf_decoding_ext/data/induced_amateur``, a Traversable)."""
    return data_file("induced_amateur")


def read_config(path: str | Path | None = None) -> dict[str, Any]:
    """The ``config.json`` of a checkpoint folder (``None``: the shipped one)."""
    folder = shipped_checkpoint() if path is None else Path(path)
    cfg_file = folder / CONFIG_FILE
    if not cfg_file.is_file():
        raise FileNotFoundError(f"no {CONFIG_FILE} in {folder}: not an induced-amateur checkpoint")
    config = json.loads(cfg_file.read_text(encoding="utf-8"))
    if config.get("format") != FORMAT:
        raise ValueError(f"{folder / CONFIG_FILE} is not an induced-amateur config (format {config.get('format')!r})")
    return config


def load_induced_amateur(model, path: str | Path | None = None):
    """Build the amateur of ``model`` from a checkpoint folder (``None``: the one shipped with the package).

    Every parameter of ``model`` is shared (no copy) except, for a ``"top_layers"`` checkpoint, the trained layers;
    the stored tensors (LoRA adapters, applied at run time by :class:`LoRALinear` modules, or the trained layers) are
    loaded from ``model.safetensors`` (safetensors only) and cast to ``model``'s dtype and device. Loading does not
    touch the global random state.

    Raises:
        ValueError: when ``model`` does not match the checkpoint's base model (architecture, number of layers, hidden
            size or vocabulary), or the file's tensors do not match the layers.
    """
    from safetensors.torch import load_file

    config = read_config(path)
    want = {k: config.get(k) for k in ("architecture", "num_hidden_layers", "hidden_size", "vocab_size")}
    try:
        have = _model_summary(model)
    except ValueError:
        have = {"architecture": type(model).__name__}
    diff = [f"{k} {have.get(k)} (checkpoint: {v})" for k, v in want.items() if have.get(k) != v]
    if diff:
        raise ValueError(
            f"this induced amateur was trained for {config.get('base_model')} ({want['architecture']}, "
            f"{want['num_hidden_layers']} layers, hidden size {want['hidden_size']}, vocabulary "
            f"{want['vocab_size']}); the given model differs: {'; '.join(diff)}. Use it with that base model, or "
            "train an amateur for this model with train_induced_amateur() (scripts/train_induced_amateur.py)")
    layers = _check_layers(model, config["trained_layers"])
    fp = config.get("base_fingerprint") or {}
    if fp:
        now = _fingerprint(model, layers)
        off = [k for k, v in fp.items() if k in now and abs(now[k] - v) > 0.05 * max(abs(v), 1e-12)]
        if off:
            warnings.warn(f"the model's weights differ from the base model the induced amateur was trained on "
                          f"({config.get('base_model')}): {', '.join(off)}; the amateur may behave differently",
                          stacklevel=2)
    folder = shipped_checkpoint() if path is None else Path(path)
    with importlib.resources.as_file(folder / WEIGHTS_FILE) as weights:
        tensors = load_file(str(weights))
    method = config.get("method", "top_layers")
    if method == "lora":
        lora = config["lora"]
        amateur, adapters = lora_copy(model, int(lora["rank"]), float(lora["alpha"]), lora["layers"],
                                      lora["targets"], init=False)
        expected = {f"{name}.{w}": getattr(a, w) for name, a in adapters.items() for w in ("lora_A", "lora_B")}
    elif method == "top_layers":
        amateur = shared_copy(model, layers)
        dec = decoder_layers(amateur)
        expected = {f"model.layers.{i}.{name}": t for i in layers
                    for name, t in dec[i].state_dict(keep_vars=True).items()}
    else:
        raise ValueError(f"unknown induced-amateur method {method!r} in {folder / CONFIG_FILE}")
    if set(tensors) != set(expected):
        missing, unexpected = sorted(set(expected) - set(tensors)), sorted(set(tensors) - set(expected))
        raise ValueError(f"checkpoint tensors do not match the {method} amateur: missing {missing[:4]}, "
                         f"unexpected {unexpected[:4]}")
    with torch.no_grad():
        for key, target in expected.items():
            if tuple(target.shape) != tuple(tensors[key].shape):
                raise ValueError(f"{key}: shape {tuple(tensors[key].shape)} in the checkpoint, "
                                 f"{tuple(target.shape)} in the model")
            target.copy_(tensors[key].to(device=target.device, dtype=target.dtype))
    for p in amateur.parameters():
        p.requires_grad_(False)
    amateur.induced_amateur_info = config
    return amateur.eval()
