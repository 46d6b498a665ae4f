"""Minimum Bayes risk (MBR) decoding over a sampled pool, the component shared by MBR for instruction following
(Wu et al., arXiv 2410.02902) and quality-aware decoding (Fernandes et al., arXiv 2205.00978,
:mod:`hf_decoding_ext.search.quality_aware`).

:func:`build_utility_scorer` turns a utility name (``"judge"``, ``"chrf"``, ``"bleu"``, ``"rougeL"``, ``"rouge1"``,
``"token_f1"``, ``"rouge_l"``), a :class:`~hf_decoding_ext.core.scoring.JudgeUtility` or any callable into a
:class:`~hf_decoding_ext.core.scoring.MBRScorer`; :func:`mbr_select` scores one pool (or a subset of it, the
shortlist of quality-aware decoding's two-stage rule) and returns the :class:`~hf_decoding_ext.core.candidates.Selection`.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

from hf_decoding_ext.core.candidates import CandidatePool, RerankingLoop, Selection
from hf_decoding_ext.core.loop import GenerationState
from hf_decoding_ext.core.scoring import (
    TEXT_UTILITIES,
    UTILITIES,
    JudgeUtility,
    MBRScorer,
)

UTILITY_NAMES = ("judge", *TEXT_UTILITIES, *UTILITIES)
"""Utility names understood by :func:`build_utility_scorer`."""


def build_utility_scorer(utility: str | Callable = "judge", *, tokenizer=None, model=None, on_text: bool | None = None,
                         num_pseudo_references: int | None = None, seed: int | None = None,
                         judge_batch_size: int = 8, judge_rubric: str | None = None) -> MBRScorer:
    """The :class:`~hf_decoding_ext.core.scoring.MBRScorer` of a utility.

    Args:
        utility: ``"judge"`` (a :class:`~hf_decoding_ext.core.scoring.JudgeUtility` on ``model``, or on the
            generating model once bound: a self-judge), a text utility name (``"chrf"``, ``"bleu"``, ``"rougeL"``,
            ``"rouge1"``), a token-id utility name (``"token_f1"``, ``"rouge_l"``), a ``JudgeUtility``, or a callable
            ``utility(hypothesis, reference) -> float`` (on text when ``on_text`` or, by default, when a
            ``tokenizer`` is given; on token-id lists otherwise).
        tokenizer: decodes candidates for text utilities (required by them).
        model: the judge model for ``"judge"`` (``None``: the generating model).
        on_text: whether a callable utility takes text (see above).
        num_pseudo_references, seed: pseudo-reference subsampling (see :class:`~hf_decoding_ext.core.scoring.MBRScorer`).
        judge_batch_size, judge_rubric: the judge's batch size and rubric (``None``: the default rubric).
    """
    if isinstance(utility, str):
        if utility not in UTILITY_NAMES:
            raise ValueError(f"unknown utility {utility!r}; expected one of {list(UTILITY_NAMES)} or a callable")
        if utility == "judge":
            if tokenizer is None:
                raise ValueError("utility='judge' needs the tokenizer (to build the judge prompts)")
            utility = JudgeUtility(model, tokenizer, rubric=judge_rubric, batch_size=judge_batch_size)
        elif utility in TEXT_UTILITIES and tokenizer is None:
            raise ValueError(f"the text utility {utility!r} needs a tokenizer to decode the candidates")
    elif not callable(utility):
        raise ValueError(f"utility must be a name of {list(UTILITY_NAMES)} or a callable, got {utility!r}")
    if isinstance(utility, str) and utility in UTILITIES:
        on_text = False
    return MBRScorer(utility, tokenizer=tokenizer, on_text=on_text, num_pseudo_references=num_pseudo_references,
                     seed=seed)


def mbr_select(scorer: MBRScorer, pool: CandidatePool, judge_model=None,
               subset: Sequence[int] | None = None) -> Selection:
    """MBR choice in ``pool``: the candidate with the highest mean utility against the other candidates (or against a
    subsample of them, per the scorer), first index on ties.

    Args:
        scorer: the MBR scorer (:func:`build_utility_scorer`).
        pool: the candidate pool; its prompt is the context of context-aware utilities (the judge's instruction).
        judge_model: with a judge utility, judge with this model (the self-judge: the generating model).
        subset: restrict MBR to these pool indices (hypotheses and pseudo-references alike); the others score
            ``-inf``.

    Returns:
        the :class:`~hf_decoding_ext.core.candidates.Selection`: ``index`` into the whole pool, ``scores`` ``(n,)``
        float32 and ``extra`` with ``utility_matrix`` (over the subset), ``pseudo_references`` (pool indices) and
        ``utility_calls`` (utility evaluations this selection made).
    """
    if isinstance(scorer.utility, JudgeUtility) and judge_model is not None:
        scorer.utility.model = judge_model
    members = list(range(len(pool))) if subset is None else [int(i) for i in subset]
    if not members or any(not 0 <= i < len(pool) for i in members) or len(set(members)) != len(members):
        raise ValueError(f"subset must hold distinct indices of the pool (size {len(pool)}), got {subset!r}")
    candidates = [pool.tokens[i] for i in members]
    before = scorer.utility_calls
    local = scorer.score(candidates, context=pool.prompt)
    calls = scorer.utility_calls - before
    refs = scorer.last_references
    matrix = scorer.utility_matrix(candidates, context=pool.prompt,
                                   columns=None if len(refs) == len(candidates) else refs)
    scores = torch.full((len(pool),), float("-inf"), dtype=torch.float32)
    scores[members] = local.float()
    best = members[int(torch.argmax(local))]
    return Selection(best, scores, {"utility_matrix": matrix, "pseudo_references": [members[r] for r in refs],
                                    "utility_calls": calls})


class MBRDecoding(RerankingLoop):
    r"""Minimum Bayes risk decoding with a pluggable utility, from "Better Instruction-Following Through Minimum Bayes
    Risk" (Wu, Fernandes, Bertsch, Kim, Pakazad, Neubig; ICLR 2025, https://arxiv.org/abs/2410.02902).

    For each prompt, ``n`` candidates are sampled (one batched rollout on the prompt's cache, with the caller's
    sampling settings: call ``generate()`` with ``do_sample=True``), every candidate is scored against the others as
    pseudo-references with a reference-based utility, and the candidate with the highest mean utility is returned:

    .. math:: \hat{y} = \arg\max_{i} \frac{1}{n - 1} \sum_{j \ne i} u(y_i, y_j)

    The paper's utility is a reference-based LLM judge, Prometheus-2-7B (1-5 rubric score of ``y_i`` with ``y_j`` as
    the reference answer). Utilities here (``utility=``):

    * ``"judge"`` (default): :class:`~hf_decoding_ext.core.scoring.JudgeUtility`, a Prometheus-style rubric prompt
      read as a probability-weighted 1-5 score, judged by the generating model itself (or ``judge_model``).
      **Offline stand-in: SmolLM2-135M-Instruct is a weak stand-in for Prometheus-2-7B.**
    * ``"chrf"`` / ``"bleu"`` (sacrebleu, sentence level), ``"rougeL"`` / ``"rouge1"`` (rouge-score; ROUGE-1 is the
      paper's lexical MBR baseline), ``"token_f1"`` / ``"rouge_l"`` (token ids, no tokenizer needed);
    * any callable ``utility(hypothesis, reference) -> float`` (text with a tokenizer, token-id lists without;
      ``on_text`` overrides).

    The ``n x n`` utility matrix is computed once per pool (distinct pairs once; symmetric utilities, the ROUGE
    F-measures, once per unordered pair); ``num_pseudo_references=k`` computes only ``n x k`` utilities against a
    uniform subsample of pseudo-references (as quality-aware decoding's official code does). Ties go to the first
    sampled candidate (so with ``n = 2`` and a symmetric utility, MBR returns the first sample). A
    ``return_dict_in_generate`` output holds ``selection_scores`` (each row's mean utilities) and ``candidates``.

    Deviations from the paper: the judge is SmolLM2 (or any given causal LM) instead of Prometheus-2-7B, scored from
    its next-token probabilities over "1".."5" after a shortened Prometheus prompt (no generated feedback); the
    instruction shown to the judge is the decoded prompt (chat-template markers removed). The paper's second part,
    MBR distillation by iterative DPO self-training, is not implemented (decoding only). The paper's pool size and
    temperature are not copied: ``n`` defaults to 8 and the temperature is ``generate()``'s.

    Args:
        n (`int`, *optional*, defaults to 8): candidates per prompt.
        utility (`str` or callable, *optional*, defaults to ``"judge"``): see above.
        tokenizer (*optional*): the model's tokenizer, needed by text utilities and the judge.
        judge_model (*optional*): a separate judge model for ``utility="judge"`` (default: the generating model).
        judge_batch_size (`int`, *optional*, defaults to 8): judge prompts per forward.
        judge_rubric (`str`, *optional*): the judge's score rubric.
        num_pseudo_references (`int`, *optional*): pseudo-reference subsample size (``None``: every other candidate).
        on_text (`bool`, *optional*): whether a callable utility takes text.
        seed (`int`, *optional*): seed of the candidate sampling (and of the pseudo-reference subsampling).

    Example:
        >>> from hf_decoding_ext.search.mbr import MBRDecoding
        >>> loop = MBRDecoding(n=8, utility="chrf", tokenizer=tokenizer)  # doctest: +SKIP
        >>> out = model.generate(**inputs, do_sample=True, max_new_tokens=48, custom_generate=loop)  # doctest: +SKIP
    """

    def __init__(self, n: int = 8, utility: str | Callable = "judge", tokenizer=None, judge_model=None,
                 judge_batch_size: int = 8, judge_rubric: str | None = None,
                 num_pseudo_references: int | None = None, on_text: bool | None = None, seed: int | None = None):
        super().__init__(n=n, seed=seed)
        if judge_model is not None and utility != "judge":
            raise ValueError(f"judge_model is only used with utility='judge', got utility={utility!r}")
        self.utility = utility
        self.tokenizer = tokenizer
        self.self_judge = utility == "judge" and judge_model is None
        self.scorer = build_utility_scorer(utility, tokenizer=tokenizer, model=judge_model, on_text=on_text,
                                           num_pseudo_references=num_pseudo_references, seed=seed,
                                           judge_batch_size=judge_batch_size, judge_rubric=judge_rubric)

    def rerank(self, pool: CandidatePool, model=None) -> Selection:
        """The MBR choice in a pool (usable outside generate()); ``model`` is the self-judge's model."""
        return mbr_select(self.scorer, pool, judge_model=model if self.self_judge else None)

    def select(self, pool: CandidatePool, state: GenerationState, row: int) -> Selection:
        return self.rerank(pool, state.model)
