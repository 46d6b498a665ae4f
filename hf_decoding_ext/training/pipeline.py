"""End-to-end training of a draft head: ``hf-decoding-ext train <kind> --base <model>``.

Stages (each resumable, progress on a bar and in the log file): the base model answers the distillation prompts
(``data/prompts/distill.jsonl``, disjoint from the benchmark prompts), its features are extracted once, the draft
vocabulary is chosen (the most frequent response tokens), the head is trained with checkpoints, evaluated on
held-out sequences (per-depth top-k accuracy, which also fixes the default tree) and saved as safetensors.

Example:
    >>> from hf_decoding_ext.training.pipeline import run_training
    >>> run_training("medusa", base=None, out="heads/medusa", steps=2000)  # doctest: +SKIP
"""

from __future__ import annotations

import hashlib
import json
import time
from dataclasses import fields
from pathlib import Path

import torch

from hf_decoding_ext.training.budget import resolve_budget
from hf_decoding_ext.training.data import (DistillData, base_predictions, extract_features, extract_layer_features,
                                          generate_responses, read_responses)
from hf_decoding_ext.training.trainer import TrainConfig, train_head


def recipe_options(kind: str, recipe: str = "defaults") -> dict:
    """The options a run of ``recipe`` starts from for head ``kind``, read from the head class's declarations:
    ``{"train": TrainConfig fields, "head_options": head config options, "save_dtype": dtype name or None,
    "budget": a training budget (name or positions, see :mod:`~hf_decoding_ext.training.budget`) or None}``.

    Example:
        >>> recipe_options("eagle", "shipped")["head_options"]
        {'cls_weight': 0.25}
    """
    from hf_decoding_ext.speculative.heads import RECIPES, head_class

    cls = head_class(kind)
    if recipe not in RECIPES:
        raise ValueError(f"recipe must be one of {RECIPES}, got {recipe!r}")
    extra = dict(cls.shipped_recipe) if recipe == "shipped" else {}
    head_options = dict(extra.pop("head_options", {}))
    save_dtype = extra.pop("save_dtype", None)
    budget = extra.pop("budget", None)
    return {"train": {**cls.training_defaults, **extra}, "head_options": head_options, "save_dtype": save_dtype,
            "budget": budget}


def _logger(path):
    if path is None:
        return lambda msg: None
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)

    def log(msg: str) -> None:
        with open(path, "a") as f:
            f.write(f"{time.strftime('%H:%M:%S')} {msg}\n")

    return log


def prepare_data(model, tokenizer, base_name: str, *, prompts: int | None = None, max_new_tokens: int = 256,
                 batch_size: int = 16, work_dir=None, log=None, progress: bool = True,
                 layers: tuple[int, ...] = ()) -> DistillData:
    """Responses and features for the first ``prompts`` distillation prompts of each category (cached under
    ``work_dir``), with the intermediate hidden states of ``layers`` when asked."""
    from hf_decoding_ext.bench.prompts import load_distill_prompts
    from hf_decoding_ext.core.models import cache_dir

    rows = load_distill_prompts(limit=prompts)
    key = hashlib.sha1(json.dumps([base_name, max_new_tokens]).encode()).hexdigest()[:10]
    work = Path(work_dir) if work_dir else cache_dir() / "distill" / key
    work.mkdir(parents=True, exist_ok=True)
    responses = work / "responses.jsonl"
    log = log or (lambda msg: None)
    log(f"stage 1/3: responses of {len(rows)} prompts -> {responses}")
    generate_responses(model, tokenizer, rows, responses, batch_size=batch_size, max_new_tokens=max_new_tokens,
                       progress=progress, log=log)
    wanted = {r["id"] for r in rows}
    answered = [r for r in read_responses(responses) if r["id"] in wanted]
    digest = hashlib.sha1(",".join(sorted(r["id"] for r in answered)).encode()).hexdigest()[:10]
    features = work / f"features-{digest}.safetensors"
    log(f"stage 2/3: features of {len(answered)} sequences -> {features}")
    extract_features(model, answered, features, batch_size=max(1, batch_size // 2), progress=progress, log=log)
    base_predictions(model, features, progress=progress)
    if layers:
        log(f"stage 2b/3: layer {list(layers)} features")
        extract_layer_features(model, features, tuple(layers), batch_size=max(1, batch_size // 2), progress=progress,
                               log=log)
    return DistillData(features, layers=tuple(layers))


def build_head(kind: str, model, base_name: str, **head_options):
    """A new head of ``kind`` (its declared class and config class) sized for ``model`` and attached to it."""
    from hf_decoding_ext.speculative.heads import head_class

    head_cls = head_class(kind)
    cfg = head_cls.config_class(hidden_size=model.config.hidden_size,
                                vocab_size=model.get_output_embeddings().weight.shape[0],
                                base_model_name_or_path=base_name, **head_options)
    if hasattr(cfg, "from_base_config"):
        cfg.from_base_config(model.config)
    return head_cls(cfg).attach(model)


def run_training(kind: str, base: str | None = None, out: str = "heads", *, prompts: int | None = None,
                 max_new_tokens: int = 256, gen_batch_size: int = 16, draft_vocab_size: int | None = 8192,
                 work_dir=None, log_file=None, progress: bool = True, head_options: dict | None = None,
                 save_dtype: str | None = None, recipe: str = "defaults", budget=None, **train_options):
    """Train a head of ``kind`` for ``base`` (``None``: the embedded default model) and save it to ``out``.

    ``train_options`` are :class:`TrainConfig` fields (``steps``, ``batch_size``, ``lr``, ...); ``head_options``
    the head config's (e.g. ``num_heads``); ``save_dtype`` (e.g. ``"float16"``) stores the final weights in that
    dtype (they are cast to the base model's dtype when attached). They override the options of ``recipe``
    (:func:`recipe_options`: the head class's ``training_defaults``, or with ``"shipped"`` the options its shipped
    checkpoint was trained with). ``budget`` (a :class:`~hf_decoding_ext.training.budget.TrainingBudget`, a name
    from :data:`~hf_decoding_ext.training.budget.BUDGETS` or a number of positions) sets ``steps`` from the
    supervised positions the head's batches carry, for comparisons at an equal budget. Returns the trained head.
    """
    from hf_decoding_ext.core.models import DEFAULT_MODEL, load_model

    start = recipe_options(kind, recipe)
    head_options = {**start["head_options"], **(head_options or {})}
    save_dtype = save_dtype or start["save_dtype"]
    if save_dtype is not None and not isinstance(getattr(torch, str(save_dtype), None), torch.dtype):
        raise ValueError(f"save_dtype must name a torch dtype, got {save_dtype!r}")
    valid = {f.name for f in fields(TrainConfig)}
    unknown = sorted(set(train_options) - valid)
    if unknown:
        raise ValueError(f"unknown training option(s) {unknown}; valid: {sorted(valid)}")
    log = _logger(log_file)
    base_name = base or DEFAULT_MODEL
    model, tokenizer = load_model(base)
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    log(f"base model {base_name}; head {kind}")
    from hf_decoding_ext.speculative.heads import head_class

    if budget is None and "steps" not in train_options:
        budget = start["budget"]
    budget = resolve_budget(budget)
    if budget is not None and "steps" in train_options:
        raise ValueError("give either steps or a budget, not both")
    data = prepare_data(model, tokenizer, base_name, prompts=prompts, max_new_tokens=max_new_tokens,
                        batch_size=gen_batch_size, work_dir=work_dir, log=log, progress=progress,
                        layers=head_class(kind).feature_layers)
    log(f"data: {len(data.train)} train / {len(data.heldout)} held-out sequences, {data.num_tokens} tokens")
    head = build_head(kind, model, base_name, **head_options)
    if draft_vocab_size and draft_vocab_size < head.config.vocab_size:
        from hf_decoding_ext.speculative.vocab_trim import VocabTrim, select_vocab, target_token_counts

        top, covered = select_vocab(target_token_counts(head.config.vocab_size, data), draft_vocab_size)
        VocabTrim(top).apply(head)  # head.set_draft_vocab(top): VocabTrim (arXiv 2506.22694) on the training data
        head.config.training = {**(head.config.training or {}), "draft_vocab_coverage": round(covered, 4)}
        log(f"draft vocabulary: {draft_vocab_size} tokens cover {covered:.4f} of response tokens")
    options = {**start["train"], **train_options}
    if budget is not None:
        options["steps"] = budget.steps_for(head, data.train, options.get("batch_size", TrainConfig.batch_size),
                                            seed=options.get("seed", 0))
        head.config.training = {**(head.config.training or {}), "budget": {"positions": budget.positions,
                                                                           "label": budget.label}}
        log(f"budget {budget.positions} positions -> {options['steps']} steps")
    cfg = TrainConfig(**options)
    head.config.training = {**(head.config.training or {}), "data": {
        "prompts": "hf_decoding_ext/data/prompts/distill.jsonl", "sequences": len(data.train) + len(data.heldout),
        "tokens": data.num_tokens, "max_new_tokens": max_new_tokens, "responses": "greedy, by the base model"}}
    log(f"stage 3/3: training {cfg}")
    torch.set_grad_enabled(True)
    head = train_head(head, data, out, cfg, progress=progress)
    if save_dtype:
        dtype = getattr(torch, save_dtype, None)
        if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
            raise ValueError(f"save_dtype must name a floating torch dtype, got {save_dtype!r}")
        head.to(dtype).save_pretrained(out)
    log(f"done: held-out top-1 per depth {head.config.training.get('heldout_top1')}; saved to {out}")
    return head
