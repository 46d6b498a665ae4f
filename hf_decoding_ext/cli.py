"""Command line: ``hf-decoding-ext list | generate | bench``.

Examples::

    hf-decoding-ext list
    hf-decoding-ext list --search grammar-aligned
    hf-decoding-ext list --effect "not reproduced" --notes
    hf-decoding-ext generate --method mirostat-v2 --param tau=3.0 --prompt "Tell me about the sea."
    hf-decoding-ext generate --method GAD --param grammar="(apple|banana)" --prompt "Name a fruit."
    hf-decoding-ext bench --family sampling --per-category 5
    hf-decoding-ext train medusa --base smollm2-135m-instruct --out heads/medusa --steps 2000 --log train.log
    hf-decoding-ext train eagle --recipe shipped --out heads/eagle
    hf-decoding-ext publish eagle --repo-id <user>/smollm2-135m-instruct-eagle-fspad
    hf-decoding-ext finetune --objective ntp --mode lora --extra-token "<|mask|>" --out finetuned/ntp --steps 1000
"""

from __future__ import annotations

import argparse
import ast
import sys
from collections.abc import Sequence
from typing import Any, Callable


def parse_params(items: list[str] | None) -> dict[str, Any]:
    """Parse ``k=v`` strings; values are Python literals when they parse as such, else strings."""
    params: dict[str, Any] = {}
    for item in items or []:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ValueError(f"--param expects key=value, got {item!r}")
        try:
            params[key] = ast.literal_eval(value)
        except (ValueError, SyntaxError):
            params[key] = value
    return params


def _cmd_list(args) -> int:
    from hf_decoding_ext.registry import effect_text, find_methods, format_table, list_methods, markdown_table

    methods = list_methods(family=args.family, effect=args.effect)
    if args.search is not None:
        methods = find_methods(args.search, methods)
        if not methods:
            print(f"no method matches {args.search!r}", file=sys.stderr)
            return 1
    print(markdown_table(methods) if args.markdown else format_table(methods))
    if args.notes and not args.markdown:  # the Markdown table already holds the notes
        print("\nEffect of each paper at this scale (SmolLM2-135M-Instruct, CPU):")
        width = max((len(m.name) for m in methods), default=0)
        for m in methods:
            print(f"{m.name.ljust(width)}  {effect_text(m)}")
    return 0


def _cmd_generate(args) -> int:
    import torch
    from transformers import TextStreamer

    from hf_decoding_ext.plug import engine_options, fast_generate, generate_kwargs
    from hf_decoding_ext.core.models import encode_prompts, load_model
    from hf_decoding_ext.registry import get_method

    spec = get_method(args.method)  # a name or an alias; clear error listing valid methods
    params = parse_params(args.param)
    unknown = sorted(set(params) - set(spec.parameters()))
    if unknown:  # fail before loading the model
        raise ValueError(f"Unknown parameter(s) {unknown} for method {spec.name!r}; "
                         f"valid parameters: {spec.parameters() or 'none'}")
    engine = parse_params(args.engine)
    engine_options(spec, engine)  # fail before loading the model
    if spec.served_model:  # a method that fine-tunes its model: its shipped fine-tune, or --model as another one
        model, tokenizer = spec.load_served_model(args.model, device=args.device)
    else:
        model, tokenizer = load_model(args.model, device=args.device)
    gen_kwargs = generate_kwargs(spec, model=model, tokenizer=tokenizer, engine=engine, **params)
    for proc in gen_kwargs.get("logits_processor") or []:  # structured outputs finish within --max-new-tokens
        if callable(getattr(proc, "set_budget", None)) and getattr(proc, "budget", True) is None:
            proc.set_budget(args.max_new_tokens)
    if args.sample is not None:
        gen_kwargs["do_sample"] = args.sample
    if args.temperature is not None:
        gen_kwargs["temperature"] = args.temperature
    enc = encode_prompts(tokenizer, args.prompt, chat=False if args.no_chat else None, device=model.device)
    torch.manual_seed(args.seed)
    streamer = TextStreamer(tokenizer, skip_prompt=True, skip_special_tokens=True) if args.stream else None
    out = fast_generate(model, **enc, max_new_tokens=args.max_new_tokens, streamer=streamer, tokenizer=tokenizer,
                        kernels=args.kernels, **gen_kwargs)
    sequences = out.sequences if hasattr(out, "sequences") else out
    if streamer is None:
        for row in sequences:
            print(tokenizer.decode(row[enc["input_ids"].shape[1]:], skip_special_tokens=True))
            if len(sequences) > 1:
                print("-" * 40)
    return 0


def _cmd_bench(args) -> int:
    from hf_decoding_ext.bench import run as bench_run

    kwargs = dict(model_name=args.model, max_new_tokens=args.max_new_tokens, per_category=args.per_category,
                  out_dir=args.out)
    if args.family:
        bench_run.run_family(args.family, methods=args.methods, **kwargs)
    else:
        raise ValueError("bench: give --family (e.g. --family sampling)")
    return 0


def _cmd_train(args) -> int:
    from hf_decoding_ext.training.pipeline import run_training

    train_options = {k: v for k, v in dict(steps=args.steps, batch_size=args.batch_size, lr=args.lr,
                                            weight_decay=args.weight_decay,
                                            checkpoint_every=args.checkpoint_every).items() if v is not None}
    head = run_training(args.kind, base=args.base, out=args.out, prompts=args.prompts,
                        max_new_tokens=args.max_new_tokens, gen_batch_size=args.gen_batch_size,
                        draft_vocab_size=args.draft_vocab_size or None, work_dir=args.work_dir, log_file=args.log,
                        head_options=parse_params(args.head_param), save_dtype=args.save_dtype, recipe=args.recipe,
                        budget=args.budget, **train_options)
    print(f"saved {type(head).__name__} to {args.out}; held-out top-1 per depth: "
          f"{head.config.training.get('heldout_top1')}")
    return 0


def finetune_options(args) -> dict[str, Any]:
    """The :class:`~hf_decoding_ext.training.finetune.FineTuneConfig` fields given on the ``finetune`` command line."""
    return {k: v for k, v in dict(steps=args.steps, budget=args.budget, batch_size=args.batch_size,
                                  grad_accum=args.grad_accum, max_length=args.max_length, lr=args.lr,
                                  weight_decay=args.weight_decay, warmup=args.warmup, mode=args.mode,
                                  lora_rank=args.lora_rank, lora_alpha=args.lora_alpha,
                                  lora_target_modules=tuple(args.lora_target) if args.lora_target else None,
                                  extra_tokens=tuple(args.extra_token) if args.extra_token else None,
                                  checkpoint_every=args.checkpoint_every, seed=args.seed,
                                  save_dtype=args.save_dtype).items() if v is not None}


def _cmd_finetune(args) -> int:
    from hf_decoding_ext.training.finetune import run_finetune

    run_finetune(args.base, args.out, objective=args.objective, prompts=args.prompts,
                 max_new_tokens=args.max_new_tokens, gen_batch_size=args.gen_batch_size, work_dir=args.work_dir,
                 log_file=args.log, agreement_prompts=args.agreement_prompts, **finetune_options(args))
    print(f"saved the fine-tuned model ({args.mode}) to {args.out}")
    return 0


def _cmd_publish(args) -> int:
    from hf_decoding_ext.speculative.heads.hub import publish

    names = publish(args.head, args.repo_id, private=args.private, dry_run=args.dry_run)
    print(("would upload" if args.dry_run else "uploaded") + f" {', '.join(names)} to {args.repo_id}")
    return 0


class LazyChoices(Sequence):
    """Argument choices read from ``source`` (a ``"module:attribute"`` holding a collection or a function returning
    one) when first needed, so that building the parser imports neither the heads nor torch."""

    def __init__(self, source: str):
        self.source = source

    def _items(self) -> list:
        from hf_decoding_ext.registry import import_target

        value = import_target(self.source)
        return list(value() if callable(value) else value)

    def __getitem__(self, i):
        return self._items()[i]

    def __len__(self) -> int:
        return len(self._items())

    def __contains__(self, item) -> bool:
        return item in self._items()


HEAD_KINDS = LazyChoices("hf_decoding_ext.speculative.heads:head_classes")
"""The head kinds the ``train`` command accepts: those declared by the head classes."""


def head_kinds_help() -> str:
    """The ``train`` command's table of head kinds, read from the head classes' declarations."""
    from hf_decoding_ext.speculative.heads import head_classes

    def opts(d: dict) -> str:
        return " ".join(f"{k}={v}" for k, v in d.items()) or "-"

    lines = ["head kinds (declared by the head classes):"]
    for kind, cls in head_classes().items():
        lines.append(f"  {kind}: {cls.display_name} ({cls.__module__}.{cls.__name__}), method {cls.method}")
        lines.append(f"      defaults: {opts(cls.training_defaults)}")
        if cls.shipped_name:
            lines.append(f"      --recipe shipped ({cls.shipped_name}): {opts(cls.shipped_recipe)}")
    return "\n".join(lines)


class _Parser(argparse.ArgumentParser):
    """``ArgumentParser`` whose help may end with text computed when the help is printed (``lazy_epilog``)."""

    def __init__(self, *args, lazy_epilog: Callable[[], str] | None = None, **kwargs):
        super().__init__(*args, **kwargs)
        self.lazy_epilog = lazy_epilog

    def format_help(self) -> str:
        text = super().format_help()
        return text + "\n" + self.lazy_epilog() + "\n" if self.lazy_epilog else text


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="hf-decoding-ext", description=__doc__.split("\n")[0])
    sub = p.add_subparsers(dest="command", required=True)

    pl = sub.add_parser("list", help="print the registry of methods")
    pl.add_argument("--family", help="only this family")
    pl.add_argument("--search", metavar="TEXT", default=None,
                    help="only the methods matching TEXT (name, alias, title words or arXiv id), best first")
    pl.add_argument("--effect", choices=LazyChoices("hf_decoding_ext.registry:EFFECTS"), default=None,
                    help="only the methods whose paper's effect at this scale is %(choices)s")
    pl.add_argument("--notes", action="store_true", help="also print each method's effect note (the measured figure "
                    "against the baseline, or why it is not measurable here)")
    pl.add_argument("--markdown", action="store_true", help="Markdown table (docs; the effect cells hold the notes)")
    pl.set_defaults(func=_cmd_list)

    pg = sub.add_parser("generate", help="generate with a registered method")
    pg.add_argument("--method", required=True, help="registered method name or alias (see `list`)")
    pg.add_argument("--param", action="append", metavar="KEY=VALUE", help="method parameter (repeatable)")
    pg.add_argument("--engine", action="append", metavar="KEY=VALUE",
                    help="speculative-engine option for drafters, e.g. acceptance=typical (repeatable)")
    pg.add_argument("--prompt", required=True)
    pg.add_argument("--model", default=None, help="Hub id or local path (default: embedded SmolLM2-135M-Instruct)")
    pg.add_argument("--device", default=None)
    pg.add_argument("--max-new-tokens", type=int, default=128)
    pg.add_argument("--seed", type=int, default=0)
    pg.add_argument("--temperature", type=float, default=None)
    pg.add_argument("--sample", dest="sample", action="store_true", default=None, help="force do_sample=True")
    pg.add_argument("--greedy", dest="sample", action="store_false", help="force do_sample=False")
    pg.add_argument("--no-chat", action="store_true", help="do not apply the chat template")
    pg.add_argument("--stream", action="store_true", help="print tokens as they are generated")
    pg.add_argument("--kernels", default="auto", choices=["auto", "lean", "pytorch", "weight_left",
                                                           "padded_weight_left", "onednn"],
                    help="CPU linear kernels (default auto: the fastest per layer shape, measured once per machine; "
                         "lean: the same with one copy of the weights, for long inputs; pytorch: PyTorch's own)")
    pg.set_defaults(func=_cmd_generate)

    pb = sub.add_parser("bench", help="run the benchmark harness")
    pb.add_argument("--family", default=None, help="benchmark every registered method of this family")
    pb.add_argument("--methods", nargs="*", default=None, help="restrict to these method names")
    pb.add_argument("--model", default=None)
    pb.add_argument("--max-new-tokens", type=int, default=128)
    pb.add_argument("--per-category", type=int, default=None, help="prompts per category (default: all)")
    pb.add_argument("--out", default="results")
    pb.set_defaults(func=_cmd_bench)

    pt = sub.add_parser("train", help="self-distil and train a draft head (kinds: `train --help`)",
                        lazy_epilog=head_kinds_help)
    pt.add_argument("kind", metavar="KIND", choices=HEAD_KINDS, help="head kind: %(choices)s")
    pt.add_argument("--recipe", metavar="RECIPE", choices=LazyChoices("hf_decoding_ext.speculative.heads:RECIPES"),
                    default="defaults", help="%(choices)s: start from the kind's training defaults, or from the "
                    "options its shipped checkpoint was trained with; the options below override either")
    pt.add_argument("--base", default=None, help="base model (default: embedded SmolLM2-135M-Instruct)")
    pt.add_argument("--out", required=True, help="output folder of the trained head")
    pt.add_argument("--prompts", type=int, default=None, help="distillation prompts per category (default: all 200)")
    pt.add_argument("--max-new-tokens", type=int, default=256, help="response length of the base model")
    pt.add_argument("--gen-batch-size", type=int, default=16)
    pt.add_argument("--draft-vocab-size", type=int, default=8192, help="0: full vocabulary")
    pt.add_argument("--steps", type=int, default=None)
    pt.add_argument("--budget", default=None, help="supervised positions to train on instead of --steps: a number or "
                    "a name (comparison = 600000, small = 150000, smoke = 2000); the same for every arm of a comparison")
    pt.add_argument("--batch-size", type=int, default=None)
    pt.add_argument("--lr", type=float, default=None)
    pt.add_argument("--weight-decay", type=float, default=None, help="AdamW weight decay (default 0)")
    pt.add_argument("--checkpoint-every", type=int, default=None)
    pt.add_argument("--head-param", action="append", metavar="KEY=VALUE", help="head config option (repeatable)")
    pt.add_argument("--work-dir", default=None, help="cache of responses and features")
    pt.add_argument("--log", default=None, help="progress log file")
    pt.add_argument("--save-dtype", default=None, help="store the final weights in this dtype, e.g. float16")
    pt.set_defaults(func=_cmd_train)

    pf = sub.add_parser("finetune", help="fine-tune the base model itself (full or LoRA) with a method's objective")
    pf.add_argument("--objective", default="ntp", help="a name from training.finetune.OBJECTIVES (ntp, ...)")
    pf.add_argument("--mode", choices=("full", "lora"), default="lora")
    pf.add_argument("--base", default=None, help="base model (default: embedded SmolLM2-135M-Instruct)")
    pf.add_argument("--out", required=True, help="output folder (a rerun resumes from OUT/checkpoint)")
    pf.add_argument("--extra-token", action="append", help="special token to add, e.g. '<|mask|>' (repeatable)")
    pf.add_argument("--lora-rank", type=int, default=None)
    pf.add_argument("--lora-alpha", type=float, default=None)
    pf.add_argument("--lora-target", nargs="+", default=None, help="module names (default: attention and MLP)")
    pf.add_argument("--prompts", type=int, default=None, help="distillation prompts per category (default: all)")
    pf.add_argument("--max-new-tokens", type=int, default=256)
    pf.add_argument("--gen-batch-size", type=int, default=16)
    pf.add_argument("--steps", type=int, default=None)
    pf.add_argument("--budget", default=None, help="supervised positions instead of --steps (number or name)")
    pf.add_argument("--batch-size", type=int, default=None)
    pf.add_argument("--grad-accum", type=int, default=None)
    pf.add_argument("--max-length", type=int, default=None)
    pf.add_argument("--lr", type=float, default=None)
    pf.add_argument("--weight-decay", type=float, default=None)
    pf.add_argument("--warmup", type=int, default=None)
    pf.add_argument("--checkpoint-every", type=int, default=None)
    pf.add_argument("--seed", type=int, default=None)
    pf.add_argument("--save-dtype", default=None, help="e.g. bfloat16")
    pf.add_argument("--agreement-prompts", type=int, default=20, help="held-out prompts for the greedy agreement")
    pf.add_argument("--work-dir", default=None)
    pf.add_argument("--log", default=None, help="stage log file (the JSON-lines log is OUT/train_log.jsonl)")
    pf.set_defaults(func=_cmd_finetune)

    pp = sub.add_parser("publish", help="upload a trained head (shipped kind or folder) to the Hugging Face Hub")
    pp.add_argument("head", help="a shipped head kind (see `train --help`) or a checkpoint folder")
    pp.add_argument("--repo-id", required=True, help="user/name on the Hub")
    pp.add_argument("--private", action="store_true")
    pp.add_argument("--dry-run", action="store_true", help="list the files without uploading")
    pp.set_defaults(func=_cmd_publish)
    return p


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exit_:  # usage errors (status 2, message printed) and --help (status 0)
        return exit_.code if isinstance(exit_.code, int) else 2
    try:
        return args.func(args)
    except (ValueError, RuntimeError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
