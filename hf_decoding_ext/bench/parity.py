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
        enc = encode_prompts(tokenizer, row["prompt"], device=model.device)
        refs.append((row, enc, model.generate(**enc, max_new_tokens=max_new_tokens, do_sample=False)))
    return refs


NEAR_TIE = 1e-3
"""Relative top-2 logit gap ``(top1 - top2) / max(|top1|, 1)`` below which two tokens are a floating-point tie."""


@torch.inference_mode()
def divergences(model, refs, diverged: dict) -> list[dict]:
    """For each prompt whose loop output ``diverged[id]`` differs from its greedy reference: the first differing
    position, the two tokens, whether they are the target's top-2 there (plain forward over the greedy prefix), the
    relative top-2 logit gap (``inf`` when an output is only longer than the other), and ``pair_gap``, the relative
    gap between the two tokens' own logits, with ``pair_top`` whether one of them is the maximum (in bfloat16
    several tokens can tie within one rounding step, so the other token need not be second)."""
    found = []
    for row, enc, ref in refs:
        if row["id"] not in diverged:
            continue
        got = diverged[row["id"]]
        n = min(got.shape[1], ref.shape[1])
        differ = (got[0, :n] != ref[0, :n]).nonzero()
        if not len(differ):
            found.append({"id": row["id"], "position": n, "tokens": None, "top2": False, "gap": float("inf")})
            continue
        pos = int(differ[0])
        mask = torch.ones_like(ref[:, :pos]) if "attention_mask" not in enc else torch.cat(
            [enc["attention_mask"], torch.ones_like(ref[:, enc["attention_mask"].shape[1]:pos])], dim=1)
        logits = model(input_ids=ref[:, :pos], attention_mask=mask).logits[0, -1].float()
        top = logits.topk(2)
        tokens = (int(ref[0, pos]), int(got[0, pos]))
        scale = max(abs(float(top.values[0])), 1.0)
        gap = float(top.values[0] - top.values[1]) / scale
        spread = float(logits[list(tokens)].max() - logits[list(tokens)].min()) / scale
        found.append({"id": row["id"], "position": pos, "tokens": tokens,
                      "top2": set(tokens) == set(top.indices.tolist()), "gap": gap,
                      "pair_gap": spread, "pair_top": bool(float(logits[list(tokens)].max()) == float(top.values[0]))})
    return found


def near_tie_tally(model, refs, diverged: dict, tolerance: float = NEAR_TIE) -> int:
    """Number of diverged prompts; raises ``AssertionError`` naming any divergence that is not a near-tie (the two
    tokens are not the target's top-2, or their relative gap is at least ``tolerance``)."""
    found = divergences(model, refs, diverged)
    real = [d for d in found if not (d["top2"] and d["gap"] < tolerance)]
    assert not real, f"outputs diverge from greedy beyond floating-point near-ties: {real}"
    return len(found)
