"""AdaDec: uncertainty-guided pause-then-rerank decoding with lookahead.

Paper: "Towards Better Code Generation: Adaptive Decoding with Uncertainty Guidance" (He et al., arXiv 2506.08980).
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch

from hf_decoding_ext.core.entropy import entropy
from hf_decoding_ext.core.lifecycle import require_lifecycle
from hf_decoding_ext.core.loop import DecodingLoop, GenerationState
from hf_decoding_ext.core.resources import data_file
from hf_decoding_ext.core.rollout import rollout

THRESHOLDS_FILE = "adadec_thresholds.json"
"""Name of the JSON file (under :func:`hf_decoding_ext.core.models.cache_dir`) holding fitted thresholds per model."""


# --------------------------------------------------------------------------------------------- calibration data
def calibration_data() -> tuple[list[str], list[str]]:
    """The shipped calibration set: ``(texts, prompts)`` for :meth:`AdaDec.fit_threshold`.

    It holds (1) 40 small Python functions written for this library (``data/python_snippets.jsonl``: the prompt is the
    signature and docstring, the text the body, like a HumanEval problem and its canonical solution) and (2) the code
    of the doctest examples in the shipped stdlib docstrings (``data/stdlib_docs.jsonl``; the ``>>>``/``...`` lines
    with their prompts removed, scored from the second token on).
    """
    data = data_file()
    texts, prompts = [], []
    with (data / "python_snippets.jsonl").open(encoding="utf-8") as f:
        for line in f:
            if line.strip():
                row = json.loads(line)
                prompts.append(row["prompt"])
                texts.append(row["solution"])
    with (data / "stdlib_docs.jsonl").open(encoding="utf-8") as f:
        for line in f:
            if not line.strip():
                continue
            code = []
            for raw in json.loads(line)["text"].splitlines():
                s = raw.strip()
                if s.startswith(">>>") or (s.startswith("...") and code):
                    code.append(s[4:] if len(s) > 3 and s[3] == " " else s[3:])
            if len(code) >= 2:
                prompts.append("")
                texts.append("\n".join(code) + "\n")
    return texts, prompts


def _model_key(model) -> str:
    return str(getattr(model, "name_or_path", None) or getattr(model.config, "_name_or_path", "") or "model")


def _thresholds_path(path: str | Path | None) -> Path:
    if path is not None:
        return Path(path)
    from hf_decoding_ext.core.models import cache_dir

    return cache_dir() / THRESHOLDS_FILE


def _fit_logistic(x: np.ndarray, y: np.ndarray, l2: float = 1.0, iters: int = 100) -> tuple[float, float]:
    """1-D logistic regression ``p(y=1|x) = sigmoid(w x + b)`` by Newton's method, L2 penalty ``l2/2 * w**2`` on
    ``w`` only (scikit-learn's default ``C=1``)."""
    w, b = 0.0, 0.0
    X = np.stack([x, np.ones_like(x)], axis=1)
    reg = np.diag([l2, 0.0])
    for _ in range(iters):
        z = np.clip(w * x + b, -30, 30)
        p = 1.0 / (1.0 + np.exp(-z))
        grad = X.T @ (p - y) + reg @ np.array([w, b])
        hess = (X * (p * (1 - p))[:, None]).T @ X + reg + 1e-9 * np.eye(2)
        step = np.linalg.solve(hess, grad)
        w, b = w - step[0], b - step[1]
        if np.abs(step).max() < 1e-10:
            break
    return float(w), float(b)


# --------------------------------------------------------------------------------------------- the loop
class AdaDec(DecodingLoop):
    r"""AdaDec decoding loop: greedy decoding that pauses at uncertain steps and reranks candidates by lookahead.

    From "Towards Better Code Generation: Adaptive Decoding with Uncertainty Guidance" (He et al., arXiv 2506.08980).
    At every step the Shannon entropy ``H`` (nats) of the next-token distribution is compared with a per-model
    threshold learned from data (:meth:`fit_threshold`). When ``H < threshold`` the greedy token is taken. Otherwise
    decoding pauses: each of the ``top_k`` most probable tokens ``c`` is extended by a greedy rollout of
    ``lookahead_length`` tokens ``x_1..x_m`` (all candidates of all paused rows in one batched forward per rollout
    step, on a copy of the KV cache that is then dropped) and scored by the average log-probability

    .. math:: S(c) = \frac{\log p(c) + \sum_{j=1}^{m} \log p(x_j)}{m + 1},

    and the candidate with the highest score is appended. A rollout stops early at an eos token (``m < L``).

    Entropy, candidates and rollouts use the caller's processed scores (``generate()``'s logits processors, e.g. a
    repetition penalty); without processors these are the raw log-probabilities, as in the paper. With
    ``threshold=float("inf")`` the output is exactly greedy decoding.

    Deviations from the paper: the reference implementation also ends a lookahead rollout on HumanEval-specific code
    heuristics (four blank lines, an unindented line); here only eos ends it. The paper calibrates on HumanEval-style
    problems; the shipped calibration set is :func:`calibration_data` (small Python functions plus the doctest code of
    the stdlib docstrings).

    Per-step trace: with ``return_dict_in_generate=True`` the output has an ``adadec_trace`` field, a list with one
    dict per step: ``entropy`` (per row), ``paused`` (per row), ``candidates``/``scores`` (``{row: [...]}`` for the
    paused rows) and ``tokens`` (the appended token per row).

    Args:
        threshold: entropy threshold (nats); ``float("inf")`` never pauses. Use :meth:`for_model` to load/fit it.
        top_k: number of candidates reranked at a pause (paper: 3).
        lookahead_length: greedy lookahead tokens per candidate, ``L`` (paper: 5).

    Example:
        >>> from hf_decoding_ext.core.models import load_model, encode_prompts
        >>> from hf_decoding_ext.sampling.adadec import AdaDec
        >>> model, tokenizer = load_model()  # doctest: +SKIP
        >>> loop = AdaDec.for_model(model, tokenizer)  # loads or fits the threshold  # doctest: +SKIP
        >>> inputs = encode_prompts(tokenizer, "Write a Python function that reverses a list.")  # doctest: +SKIP
        >>> out = model.generate(**inputs, custom_generate=loop, do_sample=False, max_new_tokens=64)  # doctest: +SKIP
    """

    supports_sampling = False

    def __init__(self, threshold: float, top_k: int = 3, lookahead_length: int = 5):
        try:
            threshold = float(threshold)
        except (TypeError, ValueError) as err:
            raise ValueError(f"threshold must be a number, got {threshold!r}") from err
        if math.isnan(threshold):
            raise ValueError("threshold must not be NaN")
        if not isinstance(top_k, int) or top_k < 1:
            raise ValueError(f"top_k must be a positive integer, got {top_k!r}")
        if not isinstance(lookahead_length, int) or lookahead_length < 0:
            raise ValueError(f"lookahead_length must be a non-negative integer, got {lookahead_length!r}")
        self.threshold = threshold
        self.top_k = top_k
        self.lookahead_length = lookahead_length

    # ----------------------------------------------------------------------------------------- threshold
    @staticmethod
    @torch.no_grad()
    def entropy_statistics(model, tokenizer, texts: Sequence[str], prompts: Sequence[str] | None = None,
                           max_length: int = 512, progress: bool = True) -> tuple[np.ndarray, np.ndarray]:
        """Teacher-force each ground-truth ``text`` (after its ``prompt``) and return, for every scored position, the
        next-token entropy and whether greedy decoding would be right (the ground-truth token ranks first)."""
        from tqdm.auto import tqdm

        if prompts is not None and len(prompts) != len(texts):
            raise ValueError(f"prompts ({len(prompts)}) and texts ({len(texts)}) must have the same length")
        device = next(model.parameters()).device
        ents, correct = [], []
        it = range(len(texts))
        for i in tqdm(it, desc="AdaDec: entropy at ground-truth steps", disable=not progress):
            prompt = prompts[i] if prompts is not None else ""
            p_ids = tokenizer(prompt, add_special_tokens=False)["input_ids"] if prompt else []
            t_ids = tokenizer(texts[i], add_special_tokens=False)["input_ids"]
            ids = (list(p_ids) + list(t_ids))[:max_length]
            start = max(len(p_ids), 1)  # first scored position (predicting ids[start])
            if len(ids) <= start:
                continue
            logits = model(input_ids=torch.tensor([ids], device=device)).logits[0].float()
            pred = logits[start - 1:-1]
            target = torch.tensor(ids[start:], device=device)
            ents.append(entropy(pred).cpu().numpy())
            correct.append((pred.argmax(-1) == target).cpu().numpy())
        if not ents:
            raise ValueError("no scored positions: texts are empty")
        return np.concatenate(ents).astype(np.float64), np.concatenate(correct).astype(np.int64)

    @classmethod
    def fit_threshold(cls, model, tokenizer, texts: Sequence[str] | None = None,
                      prompts: Sequence[str] | None = None, *, test_size: float = 0.2, seed: int = 42,
                      max_length: int = 512, save: bool = True, path: str | Path | None = None,
                      model_name: str | None = None, progress: bool = True) -> dict[str, Any]:
        """Learn the model's entropy threshold as in the paper and (by default) save it.

        Procedure (the paper's, following the authors' reference code): teacher-force ground-truth code, record at
        every position the entropy ``H`` and the label ``y = 1`` if the ground-truth token ranks first (greedy would
        be right), else ``0``. Split 80/20; fit a logistic regression ``p(y=1|H)`` on a class-balanced subsample of
        the training split; pick the probability cut ``t`` in ``0.01..0.99`` that maximises accuracy on the held-out
        split; the threshold is the entropy where ``p(y=1|H) = t``: ``(logit(t) - b) / w``.

        Args:
            texts: ground-truth code; ``None`` uses :func:`calibration_data`.
            prompts: context for each text (not scored); ``None`` or ``""`` scores the text from its second token.
            save: write the result under ``model_name`` (default ``model.name_or_path``) in ``path`` (default
                ``cache_dir()/adadec_thresholds.json``).

        Returns:
            a dict with ``threshold``, ``prob_cut``, ``accuracy``, ``coef``, ``intercept``, ``n_positions``,
            ``n_errors``, ``mean_entropy_error``, ``mean_entropy_correct`` and ``model``.
        """
        if not 0.0 < test_size < 1.0:
            raise ValueError(f"test_size must be in (0, 1), got {test_size}")
        if texts is None:
            texts, prompts = calibration_data()
        H, y = cls.entropy_statistics(model, tokenizer, texts, prompts, max_length=max_length, progress=progress)
        n_err, n_ok = int((y == 0).sum()), int((y == 1).sum())
        if n_err == 0 or n_ok == 0:
            raise ValueError("calibration needs both greedy errors and greedy hits; use more/other texts")
        rng = np.random.default_rng(seed)
        perm = rng.permutation(len(H))
        n_test = max(1, int(round(test_size * len(H))))
        test, train = perm[:n_test], perm[n_test:]
        pos, neg = train[y[train] == 1], train[y[train] == 0]
        m = min(len(pos), len(neg))
        if m > 0:
            bal = np.concatenate([rng.choice(pos, m, replace=False), rng.choice(neg, m, replace=False)])
        else:
            bal = train
        w, b = _fit_logistic(H[bal], y[bal].astype(np.float64))
        p_test = 1.0 / (1.0 + np.exp(-np.clip(w * H[test] + b, -30, 30)))
        best_t, best_acc = 0.5, -1.0
        for t in np.round(np.arange(0.01, 1.0, 0.01), 2):
            acc = float(((p_test >= t).astype(np.int64) == y[test]).mean())
            if acc > best_acc:
                best_t, best_acc = float(t), acc
        threshold = float("inf") if w == 0 else float((math.log(best_t / (1 - best_t)) - b) / w)
        result = {
            "model": model_name or _model_key(model),
            "threshold": threshold,
            "prob_cut": best_t,
            "accuracy": best_acc,
            "coef": w,
            "intercept": b,
            "n_positions": int(len(H)),
            "n_errors": n_err,
            "mean_entropy_error": float(H[y == 0].mean()),
            "mean_entropy_correct": float(H[y == 1].mean()),
        }
        if save:
            file = _thresholds_path(path)
            table = json.loads(file.read_text()) if file.exists() else {}
            table[result["model"]] = result
            file.parent.mkdir(parents=True, exist_ok=True)
            file.write_text(json.dumps(table, indent=2))
        return result

    @staticmethod
    def load_threshold(model_name: str, path: str | Path | None = None) -> float | None:
        """The saved threshold of ``model_name`` (``None`` when none was fitted)."""
        file = _thresholds_path(path)
        if not file.exists():
            return None
        entry = json.loads(file.read_text()).get(model_name)
        if entry is None:
            return None
        return float(entry["threshold"] if isinstance(entry, dict) else entry)

    @classmethod
    def for_model(cls, model, tokenizer, threshold: float | None = None, top_k: int = 3, lookahead_length: int = 5,
                  path: str | None = None, refit: bool = False, progress: bool = True) -> "AdaDec":
        """Build the loop for ``model``: an explicit ``threshold``, else the saved one, else fit it on the shipped
        calibration data (:func:`calibration_data`) and save it (``refit=True`` forces a new fit)."""
        if threshold is None:
            key = _model_key(model)
            threshold = None if refit else cls.load_threshold(key, path)
            if threshold is None:
                if tokenizer is None:
                    raise ValueError("AdaDec needs the tokenizer to fit a threshold (or pass threshold=...)")
                threshold = cls.fit_threshold(model, tokenizer, path=path, model_name=key, progress=progress)[
                    "threshold"]
        return cls(threshold=threshold, top_k=top_k, lookahead_length=lookahead_length)

    # ----------------------------------------------------------------------------------------- decoding
    @torch.no_grad()
    def lookahead_scores(self, state: GenerationState, rows: torch.Tensor, scores: torch.Tensor,
                         logits: torch.Tensor | None = None):
        """Candidates ``(n, k)`` and their lookahead scores ``(n, k)`` for the batch rows ``rows`` whose processed
        next-token scores are ``scores (n, vocab)`` (raw logits ``logits``; default ``scores``); the state's cache is
        left untouched."""
        k = min(self.top_k, scores.shape[-1])
        cand = torch.log_softmax(scores, dim=-1).topk(k, dim=-1).indices
        # one greedy rollout per candidate, all in one batch, each until eos or lookahead_length more tokens
        r = rollout(state, k, rows=rows, first_tokens=cand, logits=scores if logits is None else logits,
                    scores=scores, process=state.logits_processor, max_tokens=self.lookahead_length + 1)
        return cand, (r.scores / r.lengths).view(-1, k).to(scores.dtype)

    @torch.no_grad()
    def run(self, state: GenerationState):
        trace: list[dict[str, Any]] = []
        state.stats["pauses"] = 0
        require_lifecycle(state.logits_processor, type(self).__name__)  # rollouts run them on branched rows
        while not state.done:
            logits, _ = state.next_token_logits()
            scores = state.process(logits)
            state.record(scores, logits)
            ent = entropy(scores)
            tokens = scores.argmax(dim=-1)
            paused = (ent >= self.threshold) & state.unfinished
            step: dict[str, Any] = {"entropy": ent.tolist(), "paused": paused.tolist(), "candidates": {},
                                    "scores": {}}
            if paused.any():
                rows = paused.nonzero().squeeze(1)
                cand, cand_scores = self.lookahead_scores(state, rows, scores[rows], logits[rows])
                best = cand_scores.argmax(dim=-1)
                tokens[rows] = cand.gather(1, best[:, None]).squeeze(1)
                state.stats["pauses"] += int(rows.numel())
                for j, r in enumerate(rows.tolist()):
                    step["candidates"][r] = cand[j].tolist()
                    step["scores"][r] = cand_scores[j].tolist()
            step["tokens"] = tokens.tolist()
            trace.append(step)
            state.append(tokens)
        return {"adadec_trace": trace}
