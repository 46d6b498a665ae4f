"""Lexical Unit Decoding (LUD): Sun et al., "Decoding at the Speed of Thought: Harnessing Parallel Decoding of
Lexical Units for LLMs", LREC-COLING 2024, arXiv 2405.15208 (code: tjunlp-lab/Lexical-Unit-Decoding-LUD-, a README
placeholder only).

Three parts:

* **Lexical-unit data** (data-driven, no architecture change): the *original* model's probability of every token of
  the self-distillation sequences (:func:`original_confidences`) marks the lexical units (:func:`lexical_units`):
  maximal runs of contiguous tokens that the original model predicts with probability ``>= alpha`` each (cut every
  ``k`` tokens); every other token is a unit of its own. :func:`unit_example` rebuilds a training example around
  one unit: the context up to the unit, then ``k`` placeholder tokens (:data:`PLACEHOLDER_TOKEN`, one new special
  token added with ``add_special_tokens``); the last real token is labelled with the unit's first token (ordinary
  next-token prediction), placeholder ``j`` with the unit's token ``j + 1`` and, past the unit's end, with the
  placeholder itself (an "end of unit" label), so the model learns to emit the whole unit in one forward and where
  it ends.
* **Objective** ``"lud"`` (:func:`lud_loss`, :func:`lud_batches`) registered in
  :data:`hf_decoding_ext.training.finetune.OBJECTIVES` at import.
* **Decoding** (:class:`LUDDecoding`): each forward feeds the uncached committed tokens and ``k - 1`` placeholders,
  predicts ``k`` tokens at once and accepts the leading ones whose confidence passes the threshold (adaptive span),
  with repetition control; at least one token (the ordinary greedy token) per forward.
"""

from __future__ import annotations

import itertools
import random
import sys
from pathlib import Path

import torch

from hf_decoding_ext.core import lifecycle
from hf_decoding_ext.core.loop import DecodingLoop, GenerationState

PLACEHOLDER_TOKEN = "<|lud_placeholder|>"
"""The token LUD appends after the context (the paper appends ``k - 1`` padding tokens; here a new special token)."""
DEFAULT_K = 4  # look-ahead window: tokens predicted per forward (paper's k; its value not read, our choice)
DEFAULT_ALPHA = 0.7  # data threshold marking lexical units (paper's alpha; value not read, our choice: see fidelity)
DEFAULT_THRESHOLD = 0.9  # decoding confidence threshold of the adaptive span (paper's beta; value not read)
DEFAULT_P_UNIT = 0.5  # share of unit examples; the rest are plain next-token examples (our choice)
SHIPPED_DIR = Path(__file__).resolve().parents[1] / "data" / "finetuned" / "lexical-unit-decoding"
"""Where the lead ships the fine-tuned variant (a LoRA adapter + tokenizer, or a full checkpoint)."""

CITATION = ("Chenxi Sun, Hongzhi Zhang, Zijia Lin, Jingyuan Zhang, Fuzheng Zhang, Zhongyuan Wang, Bin Chen, Chengru "
            "Song, Di Zhang, Kun Gai, Deyi Xiong. Decoding at the Speed of Thought: Harnessing Parallel Decoding of "
            "Lexical Units for LLMs. LREC-COLING 2024. arXiv:2405.15208")

PAPER_FIDELITY = (
    ("Paper text", ("only the abstract and a third-party summary of the method could be read here (the official "
     "repository holds no code). From the summary: k - 1 padding tokens appended after the context, k tokens "
     "predicted in one pass, l = max(1, m) tokens accepted with m the leading ones above beta. The values of alpha "
     "(data threshold), beta (decoding threshold) and k (window) were not read. Our choices: alpha 0.7, beta 0.9, k 4; the evaluation sweeps beta. alpha 0.7 because "
     "SmolLM2-135M is far less confident than the paper's larger models: on 16 of its own greedy responses (1946 "
     "tokens) 31% of the tokens have probability >= 0.9 (units of 1.14 tokens on average, 19% of the tokens in "
     "units of >= 2) against 49% >= 0.7 (1.34 tokens per unit, 38% in units of >= 2).")),
    ("Unit boundaries", ("a unit is a maximal run of tokens the original model predicts with probability >= alpha "
     "each (teacher-forced on the sequence), cut every k tokens; each other token is a unit of one; units partition "
     "the response. The paper's exact span rule was not read.")),
    ("Placeholder token", ("one new special token (added with add_special_tokens, mean-initialised) instead of the "
     "paper's [PAD] padding tokens: SmolLM2's pad token is a real token (eos), and a dedicated token keeps the "
     "original model's use of it intact.")),
    ("End-of-unit label", ("placeholders past the unit's end are labelled with the placeholder token itself, and a "
     "placeholder predicted at decoding ends the span. The paper's labels past the unit were not read; this makes "
     "the marked unit boundaries part of what the model learns.")),
    ("Training mix", ("each training example holds one placeholder group (at a uniformly chosen unit, so groups "
     "at one-token units teach the end label) with probability p_unit 0.5, cut after the group; otherwise the plain "
     "next-token example; the prefix before the group keeps its next-token labels. The paper's data mix was not "
     "read.")),
    ("Repetition control", ("a parallel token equal to the token just before it ends the span (the paper's exact rule "
     "was not read; it targets the repeated tokens parallel prediction tends to produce).")),
    ("Confidence", ("the probability of the argmax token after the caller's logits processors (the span's first "
     "token is the ordinary greedy token and is always accepted, so a threshold >= 1 gives the model's greedy "
     "generate()).")),
    ("KV cache", ("placeholder keys/values are cropped after each forward and the accepted tokens are re-fed as real "
     "tokens at the next forward (together with the next placeholders), so the cache always equals a causal "
     "recompute of the committed tokens.")),
    ("Sampling / batch", ("greedy only, batch size 1.")),
    ("Fine-tune", ("LoRA (rank 16, alpha 32, every attention and MLP projection) with the placeholder token's row "
     "instead of the paper's full fine-tune, on the default model's own greedy responses to 600 distillation "
     "prompts (self-distillation), not the paper's data. Small budget: the shipped adapter took 80 steps x 8 "
     "sequences (max 384 tokens, lr 1e-3), 21 minutes on 2 CPU cores, and its greedy output drifts from the "
     "original's (agreement 0.13 on 20 held-out distillation prompts).")),
)


# ------------------------------------------------------------------------------------------------------ unit data
def _has(s, key) -> bool:
    return key in s if isinstance(s, dict) else hasattr(s, key)


def _ids_list(ids) -> list[int]:
    return [int(t) for t in (ids.tolist() if torch.is_tensor(ids) else ids)]


@torch.no_grad()
def original_confidences(model, seqs, *, chunk: int = 2048, batch_size: int = 32,
                         progress: bool = False) -> list[torch.Tensor]:
    """The original model's probability of every token given its prefix: one float32 tensor ``(L,)`` per sequence,
    ``conf[i] = P(x_i | x_<i)`` (``conf[0] = 0``).

    Sequences with stored last-layer features (``hidden``, :class:`~hf_decoding_ext.training.data.Sequence` of the
    self-distillation cache: what the lm_head reads) only run the lm_head on them, over the response (``conf`` is 0
    on the prompt, where no unit starts); others (``input_ids`` lists or dicts) run a batched forward. Call it on
    the model *before* fine-tuning it."""
    from hf_decoding_ext.training.finetune import _get

    was_training = model.training
    model.eval()
    head = model.get_output_embeddings()
    p = next(model.parameters())
    out: list = [None] * len(seqs)
    by_length: dict = {}  # sequences without features: one batched forward per length
    try:
        for n, s in enumerate(seqs):
            ids = torch.as_tensor(_ids_list(_get(s, "input_ids")), dtype=torch.long)
            hidden = s.get("hidden") if isinstance(s, dict) else getattr(s, "hidden", None)
            conf = torch.zeros(len(ids), dtype=torch.float32)
            if len(ids) > 1 and hidden is not None:  # the response only (units never start in the prompt)
                first = max(1, int(_get(s, "response_start"))) if _has(s, "response_start") else 1
                parts = []
                for a in range(first - 1, len(ids) - 1, chunk):
                    h = hidden[a:min(a + chunk, len(ids) - 1)].to(device=p.device, dtype=p.dtype)
                    parts.append(head(h).float().log_softmax(-1).cpu())
                if parts:
                    conf[first:] = torch.cat(parts).gather(-1, ids[first:, None])[:, 0].exp()
            elif len(ids) > 1:
                by_length.setdefault(len(ids), []).append((n, ids))
            out[n] = conf
            if progress and (n + 1) % 100 == 0:
                print(f"[lud] confidences {n + 1}/{len(seqs)}", file=sys.stderr, flush=True)
        for group in by_length.values():
            for a in range(0, len(group), batch_size):
                rows = group[a:a + batch_size]
                ids = torch.stack([r[1] for r in rows])
                logp = model(input_ids=ids.to(p.device)).logits[:, :-1].float().log_softmax(-1).cpu()
                conf = logp.gather(-1, ids[:, 1:, None])[..., 0].exp()
                for (n, _), c in zip(rows, conf):
                    out[n][1:] = c
    finally:
        model.train(was_training)
    return out


def lexical_units(conf, response_start: int, alpha: float = DEFAULT_ALPHA, k: int = DEFAULT_K,
                  end: int | None = None) -> list[tuple[int, int]]:
    """Partition the response ``[response_start, end)`` (``end``: ``len(conf)``) into lexical units
    ``(start, length)``: maximal runs of tokens whose original-model probability ``conf`` (given their true prefix)
    is ``>= alpha``, cut every ``k`` tokens; a token below ``alpha`` is a unit of one.

    Example: ``conf = [0, 0, .2, .95, .97, .1, .99]``, ``response_start = 2``, ``alpha = .9``, ``k = 4`` gives
    ``[(2, 1), (3, 2), (5, 1), (6, 1)]``."""
    conf = [float(c) for c in (conf.tolist() if torch.is_tensor(conf) else conf)]
    end = len(conf) if end is None else min(int(end), len(conf))
    units, i = [], int(response_start)
    while i < end:
        m = 1
        if conf[i] >= alpha:
            while m < k and i + m < end and conf[i + m] >= alpha:
                m += 1
        units.append((i, m))
        i += m
    return units


def unit_example(input_ids, response_start: int, units, placeholder_id: int, k: int = DEFAULT_K,
                 p_unit: float = DEFAULT_P_UNIT, rng: random.Random | None = None, train_on_prompt: bool = False):
    """One training example ``(input_ids, labels, start)`` (lists; ``labels[i]`` is the token position ``i - 1``
    must predict, the shifted causal-LM convention; ``start`` = the unit's first position, -1 for a plain example).

    With probability ``p_unit`` a unit ``(t, m)`` of ``units`` is drawn uniformly: the input is ``ids[:t] +
    [placeholder] * k`` and the labels ``prefix labels + [ids[t], ..., ids[t + m - 1]] + [placeholder] * (k - m)``:
    the last real token predicts the unit's first token, placeholder ``j`` (``0 <= j < k - 1``) its token ``j + 1``
    or, past the unit, the placeholder (end of unit); the last placeholder only carries the last label. Otherwise
    the plain example ``ids`` with next-token labels on the response."""
    rng = rng or random
    ids = _ids_list(input_ids)
    rs = int(response_start)
    prefix_labels = list(ids) if train_on_prompt else [-100] * rs + ids[rs:]
    usable = [(t, m) for t, m in units if t >= max(1, rs)]
    if usable and k >= 2 and rng.random() < p_unit:
        t, m = usable[rng.randrange(len(usable))]
        m = min(m, k)
        return (ids[:t] + [placeholder_id] * k,
                prefix_labels[:t] + ids[t:t + m] + [placeholder_id] * (k - m), t)
    return ids, prefix_labels, -1


def collate_units(examples, pad_id: int, placeholder_id: int, max_length: int = 512) -> dict:
    """Right-padded batch of :func:`unit_example` results: ``input_ids``, ``attention_mask``, ``labels`` (-100 on
    padding), ``unit_start`` (``(batch,)``, -1 for plain rows) and ``placeholder_token_id``. Rows longer than
    ``max_length`` keep their last ``max_length`` tokens when they hold a placeholder group (the group must stay)."""
    rows = []
    for ids, lab, start in examples:
        if len(ids) > max_length:
            if start >= 0:
                cut = len(ids) - max_length
                ids, lab, start = ids[cut:], lab[cut:], start - cut
            else:
                ids, lab = ids[:max_length], lab[:max_length]
        rows.append((ids, lab, start))
    n = max(len(r[0]) for r in rows)
    b = len(rows)
    input_ids = torch.full((b, n), pad_id, dtype=torch.long)
    attn = torch.zeros((b, n), dtype=torch.long)
    labels = torch.full((b, n), -100, dtype=torch.long)
    for r, (ids, lab, _) in enumerate(rows):
        input_ids[r, :len(ids)] = torch.tensor(ids)
        attn[r, :len(ids)] = 1
        labels[r, :len(lab)] = torch.tensor(lab)
    return {"input_ids": input_ids, "attention_mask": attn, "labels": labels,
            "unit_start": torch.tensor([r[2] for r in rows]), "placeholder_token_id": torch.tensor(int(placeholder_id))}


def _confidence_file(data) -> Path | None:
    path = getattr(data, "path", None)
    return None if path is None else Path(path).with_name(Path(path).stem + ".lud_conf.safetensors")


def load_or_compute_confidences(data, seqs, model=None, progress: bool = False) -> list[torch.Tensor]:
    """The original model's confidences on ``seqs`` (the training split of ``data``): read from
    ``<features>.lud_conf.safetensors`` next to the self-distillation cache when present, else computed with
    ``model`` (:func:`original_confidences`) and saved there."""
    from safetensors.torch import load_file, save_file

    from hf_decoding_ext.training.finetune import _get

    file = _confidence_file(data)
    if file is not None and file.exists():
        t = load_file(str(file))
        if int(t["count"]) == len(seqs):
            flat, off = t["conf"], t["offsets"].tolist()
            confs = [flat[a:b] for a, b in itertools.pairwise(off)]
            if all(len(c) == len(_get(s, "input_ids")) for c, s in zip(confs, seqs)):
                return confs
    if model is None:
        raise ValueError("LUD marks lexical units with the ORIGINAL model's probabilities: pass model= (the model "
                         "before fine-tuning) or confidences=")
    confs = original_confidences(model, seqs, progress=progress)
    if file is not None:
        offsets = torch.tensor([0] + [len(c) for c in confs]).cumsum(0)
        tmp = file.with_suffix(".tmp")
        save_file({"conf": torch.cat(confs) if confs else torch.zeros(0), "offsets": offsets,
                   "count": torch.tensor(len(seqs))}, str(tmp))
        tmp.replace(file)
    return confs


def lud_batches(data, config, tokenizer, *, model=None, confidences=None, k: int = DEFAULT_K,
                alpha: float = DEFAULT_ALPHA, p_unit: float = DEFAULT_P_UNIT,
                placeholder_token: str = PLACEHOLDER_TOKEN):
    """Batch builder of ``OBJECTIVES["lud"]``: returns ``seed -> endless iterator`` of unit / plain batches over
    ``data`` (a ``DistillData`` (its train split) or sequences with ``input_ids``/``response_start``).

    The lexical units are marked here, once, with the ORIGINAL model's probabilities: ``confidences`` (one ``(L,)``
    tensor per sequence), else the cached ``<features>.lud_conf.safetensors``, else computed with ``model``
    (``run_finetune`` passes the original model, before fine-tuning, to builders with a ``model`` keyword). The
    placeholder token is appended to ``config.extra_tokens`` so :func:`finetune` adds it before the stream starts.
    Statistics of the marking are in the returned callable's ``unit_stats``."""
    from hf_decoding_ext.training.finetune import _get, added_token_stream, training_sequences

    if isinstance(k, bool) or not isinstance(k, int) or k < 2:
        raise ValueError(f"k must be an int >= 2, got {k!r}")
    if not 0.0 < float(alpha) <= 1.0:
        raise ValueError(f"alpha must be in (0, 1], got {alpha!r}")
    if not 0.0 <= float(p_unit) <= 1.0:
        raise ValueError(f"p_unit must be in [0, 1], got {p_unit!r}")
    seqs = training_sequences(data)
    if confidences is None:
        confidences = load_or_compute_confidences(data, seqs, model, progress=True)
    if len(confidences) != len(seqs):
        raise ValueError(f"{len(confidences)} confidence rows for {len(seqs)} sequences")
    units = [lexical_units(c, int(_get(s, "response_start")), alpha, k) for c, s in zip(confidences, seqs)]
    lengths = [m for us in units for _, m in us]
    n_tok = sum(lengths)

    def make_batch(indices, ph, pad, rng):
        return collate_units([unit_example(_get(seqs[j], "input_ids"), _get(seqs[j], "response_start"), units[j], ph,
                                           k, p_unit, rng, config.train_on_prompt) for j in indices],
                             pad, ph, config.max_length)

    stream = added_token_stream(seqs, config, tokenizer, placeholder_token, make_batch)
    stream.unit_stats = {"sequences": len(seqs), "response_tokens": n_tok, "units": len(lengths),
                         "tokens_per_unit": n_tok / max(1, len(lengths)),
                         "units_ge2": sum(1 for m in lengths if m >= 2), "alpha": float(alpha), "k": k}
    return stream


def lud_loss(model, batch):
    """LUD objective: mean shifted cross-entropy over the labels (plain rows: every response token; unit rows: the
    response before the group, the unit's first token from the last real token, then the unit's tokens / end labels
    from the placeholders). Metrics: ``tokens``, ``placeholder_tokens`` (positions predicted from a placeholder) and
    ``placeholder_acc`` (their argmax accuracy)."""
    from hf_decoding_ext.training.finetune import next_token_loss

    return next_token_loss(model, batch, marker="placeholder")


def _register() -> None:
    from hf_decoding_ext.training import finetune as ft

    ft.OBJECTIVES.setdefault("lud", (lud_loss, lud_batches))


_register()


# ------------------------------------------------------------------------------------------------------ model
def resolve_placeholder_id(model, tokenizer=None, placeholder_token: str = PLACEHOLDER_TOKEN,
                           explicit: int | None = None) -> int:
    """The placeholder id of a LUD model: ``explicit``, else
    ``model.config.decoding_ext_added_tokens[placeholder_token]`` (set by ``add_special_tokens``), else the
    tokenizer's id for it. ``ValueError`` when absent or outside the
    model's vocabulary."""
    from hf_decoding_ext.training.finetune import added_token_id

    return added_token_id(model, tokenizer, placeholder_token, explicit=explicit, what="LUD placeholder token",
                          hint=": fine-tune it with the 'lud' objective (load_lud_model) or pass placeholder_token_id=")


def load_lud_model(path=None, base: str | None = None, dtype=torch.float32, device=None):
    """``(model, tokenizer)`` of the LUD fine-tune at ``path`` (default: the shipped variant under
    ``hf_decoding_ext/data/finetuned/lexical-unit-decoding``): a LoRA adapter (``adapter.safetensors``, loaded into
    the original ``base`` model with the placeholder token added, then merged) or a full checkpoint
    (``config.json``). ``ValueError`` when ``path`` holds neither."""
    from hf_decoding_ext.training.finetune import load_finetuned

    return load_finetuned(path if path is not None else SHIPPED_DIR, [PLACEHOLDER_TOKEN], base, dtype, device,
                          what="LUD fine-tune", hint=": run `hf-decoding-ext finetune --objective lud` first")


# ------------------------------------------------------------------------------------------------------ decoding
class LUDDecoding(DecodingLoop):
    """Lexical Unit Decoding (Sun et al., arXiv 2405.15208), a ``custom_generate`` loop for a model fine-tuned with
    the ``"lud"`` objective (:func:`lud_loss`; it has a placeholder token).

    Each forward feeds the committed tokens not yet cached followed by ``k - 1`` placeholder tokens (consecutive
    positions, causal attention) and reads ``k`` predictions: the last committed token's (the ordinary greedy next
    token, always accepted, the fall-back to one token) and the placeholders'. The leading parallel tokens are
    accepted while the probability of each (softmax of the processed scores) is above ``threshold`` (adaptive span),
    it is not the placeholder (end of unit) and, with ``repetition_control``, it differs from the token before it.
    The placeholders' keys/values are dropped after the forward and the accepted tokens are re-fed as real tokens at
    the next forward, so the KV cache always equals a causal recompute of the committed tokens. Lossy: the parallel
    tokens are not verified (``threshold >= 1`` accepts none and equals the model's greedy ``generate()``).

    Args:
        placeholder_token_id: the placeholder id (default: :func:`resolve_placeholder_id`; ``ValueError`` when the
            model has none). An explicit id runs the loop on any model (mechanism tests on untrained models).
        k: tokens predicted per forward (window; ``k - 1`` placeholders). ``k = 1`` is plain greedy decoding.
        threshold: confidence a parallel token must exceed (paper's beta); ``>= 1`` never accepts one.
        repetition_control: end the span at a parallel token equal to the token before it.
        tokenizer: only to look up the placeholder token.

    Greedy only, batch size 1. Per-run statistics (``forwards``, ``tokens``, ``forwards_per_token``,
    ``tokens_per_forward``, ``accepted_per_step``, ``stops``: why spans ended) are in ``self.last_stats`` (and in
    the output's ``lud_stats`` with ``return_dict_in_generate``). Deviations: :data:`PAPER_FIDELITY`.

    Example:
        >>> from hf_decoding_ext.speculative.lud import LUDDecoding, load_lud_model
        >>> model, tokenizer = load_lud_model("/work/distill/finetune/lexical-unit-decoding")  # doctest: +SKIP
        >>> loop = LUDDecoding(k=4, threshold=0.9, tokenizer=tokenizer)
        >>> out = model.generate(**inputs, max_new_tokens=64, do_sample=False, custom_generate=loop)  # doctest: +SKIP
        >>> loop.last_stats["forwards_per_token"]  # doctest: +SKIP
    """

    supports_batch = False
    supports_sampling = False
    supports_sliding_window = False  # placeholder keys are cropped after each forward
    citation = CITATION

    def __init__(self, placeholder_token_id: int | None = None, k: int = DEFAULT_K,
                 threshold: float = DEFAULT_THRESHOLD, repetition_control: bool = True, tokenizer=None):
        if isinstance(k, bool) or not isinstance(k, int) or k < 1:
            raise ValueError(f"k must be an int >= 1, got {k!r}")
        if isinstance(threshold, bool) or not isinstance(threshold, (int, float)) or not threshold >= 0:
            raise ValueError(f"threshold must be a number >= 0 (>= 1: never accept a parallel token), got "
                             f"{threshold!r}")
        if placeholder_token_id is not None and (isinstance(placeholder_token_id, bool)
                                                 or not isinstance(placeholder_token_id, int)
                                                 or placeholder_token_id < 0):
            raise ValueError(f"placeholder_token_id must be a non-negative int, got {placeholder_token_id!r}")
        if not isinstance(repetition_control, bool):
            raise ValueError(f"repetition_control must be a bool, got {repetition_control!r}")
        self.placeholder_token_id, self.k, self.threshold = placeholder_token_id, k, float(threshold)
        self.repetition_control, self.tokenizer = repetition_control, tokenizer
        self.last_stats: dict = {}

    def __call__(self, model, input_ids, logits_processor, stopping_criteria, generation_config, *args, **kwargs):
        if generation_config.do_sample:
            raise ValueError("LUDDecoding is greedy only (the adaptive span accepts argmax tokens by confidence): "
                             "call generate() with do_sample=False")
        return super().__call__(model, input_ids, logits_processor, stopping_criteria, generation_config, *args,
                                **kwargs)

    def _placeholder(self, model) -> int:
        return resolve_placeholder_id(model, self.tokenizer, explicit=self.placeholder_token_id)

    def run(self, state: GenerationState):
        if lifecycle.has_stateful(state.logits_processor):
            raise ValueError("LUDDecoding does not support stateful logits processors")
        k = self.k
        ph = self._placeholder(state.model) if k > 1 else None
        extra = None if k == 1 else torch.full((1, k - 1), ph, dtype=torch.long, device=state.device)
        steps: list[int] = []
        stops = {"threshold": 0, "placeholder": 0, "repetition": 0, "window": 0}
        state.stats.update(tokens=0)
        while not state.done:
            out = state.forward(extra, keep=False, logits_to_keep=k)  # placeholders' KV cropped (keep=False)
            logits = out.logits[0]
            accepted: list[int] = []
            recorded = []
            reason = "window"
            for j in range(k):
                prefix = torch.cat([state.input_ids, torch.tensor([accepted], dtype=torch.long,
                                                                  device=state.device)], dim=1)
                raw = logits[j][None]
                scores = state.process(raw.clone(), prefix)
                tok = int(scores.argmax(-1))
                if j > 0:
                    if tok == ph:
                        reason = "placeholder"
                        break
                    if float(torch.softmax(scores[0].float(), -1)[tok]) <= self.threshold:
                        reason = "threshold"
                        break
                    if self.repetition_control and tok == accepted[-1]:
                        reason = "repetition"
                        break
                accepted.append(tok)
                recorded.append((scores, raw))
            stops[reason] += 1
            n = state.append(torch.tensor([accepted], dtype=torch.long, device=state.device))
            for sc, lg in recorded[:n]:
                state.record(sc, lg)
            steps.append(n)
            state.stats["tokens"] += n
        st = state.stats
        st["accepted_per_step"] = steps
        st["stops"] = stops
        st["tokens_per_forward"] = st["tokens"] / max(1, st["forwards"])
        st["forwards_per_token"] = st["forwards"] / max(1, st["tokens"])
        st.update(k=k, threshold=self.threshold, repetition_control=self.repetition_control)
        self.last_stats = dict(st)
        return {"lud_stats": self.last_stats} if state.return_dict else None
