"""Greedy parity of a speculative loop against plain greedy ``generate()`` (the lossless tests of every drafter)."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch


@dataclass
class ParityReport:
    """Outcome of :func:`greedy_parity`: prompt ids whose output differs (and the loop's output for each, in
    ``diverged``), tokens generated, target forwards (engine steps) and draft tokens accepted, summed over the
    prompts."""

    mismatches: list = field(default_factory=list)
    diverged: dict = field(default_factory=dict)
    tokens: int = 0
    forwards: int = 0
    accepted: int = 0

    @property
    def tokens_per_forward(self) -> float:
        return self.tokens / self.forwards if self.forwards else float("nan")


@torch.inference_mode()
def greedy_parity(model, gen_kwargs: dict, refs, max_new_tokens: int) -> ParityReport:
    """Run ``model.generate(**enc, **gen_kwargs)`` (a ``custom_generate`` speculative loop) on every
    ``(row, enc, reference_output)`` of ``refs`` and compare with the reference greedy output.

    Example:
        >>> refs = [(row, enc, model.generate(**enc, max_new_tokens=32, do_sample=False))]  # doctest: +SKIP
        >>> greedy_parity(model, generate_kwargs("medusa", model=model), refs, 32).mismatches  # doctest: +SKIP
        []
    """
    loop = gen_kwargs["custom_generate"]
    report = ParityReport()
    for row, enc, ref in refs:
        out = model.generate(**enc, max_new_tokens=max_new_tokens, **gen_kwargs)
        if not torch.equal(out, ref):
            report.mismatches.append(row["id"])
            report.diverged[row["id"]] = out
        s = loop.summary()
        report.tokens += s["tokens"]
        report.forwards += s["steps"]
        report.accepted += sum(st.accepted for st in loop.last_stats)
    return report


@torch.inference_mode()
def greedy_references(model, tokenizer, rows, max_new_tokens: int) -> list[tuple[dict, dict, torch.Tensor]]:
    """``(row, encoded prompt, plain greedy output)`` for every prompt row, the references of :func:`greedy_parity`."""
    from hf_decoding_ext.core.models import encode_prompts

    refs = []
    for row in rows:
        enc = encode_prompts(tokenizer, row["prompt"])
        refs.append((row, enc, model.generate(**enc, max_new_tokens=max_new_tokens, do_sample=False)))
    return refs
