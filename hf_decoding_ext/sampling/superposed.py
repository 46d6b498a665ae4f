"""Superposed Decoding: k drafts from one autoregressive inference pass (Shen et al., 2024, arXiv:2405.18400)."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from hf_decoding_ext.core import lifecycle
from hf_decoding_ext.core.loop import DecodingLoop, GenerationState
from hf_decoding_ext.core.ngram_lm import NGramLM

PAPER_NGRAM_WEIGHTS = (0.01, 0.04, 0.15, 0.18, 0.12)
"""Interpolation weights of the bigram ... 6-gram models in the authors' released configurations."""


class SuperposedDecoding(DecodingLoop):
    r"""Superposed Decoding, from "Superposed Decoding: Multiple Generations from a Single Autoregressive Inference
    Pass" (Shen et al., 2024, https://arxiv.org/abs/2405.18400).

    One forward pass per generated position yields ``num_drafts`` (:math:`k`) drafts:

    1. **First step.** The prompt's next-token distribution is scored (see 3.) and its top-:math:`k` tokens start
       the :math:`k` drafts; each draft's score is its token's score.
    2. **Superposition.** At every later step the model input is *one* embedding, the superposition
       :math:`\tilde x = \sum_i \gamma_i\, E[x^i_{t-1}]` of the drafts' last-token embeddings, weighted by the
       drafts' normalised probabilities :math:`\gamma_i = p_i / \sum_j p_j` (:math:`p_i = \exp` of the draft score).
       It is fed through ``inputs_embeds`` with a single KV cache, so the cost is one forward of batch 1.
    3. **N-gram interpolation.** The LM's next-token distribution (after the caller's logits processors, at
       ``temperature``, restricted to its ``num_tokens`` most likely tokens and renormalised) is interpolated
       geometrically, for each draft :math:`d` separately, with an n-gram distribution conditioned on that draft's
       own last tokens: :math:`\log s_d(x) = (1-\alpha)\log p_{LM}(x) + \alpha \log \sum_n \lambda_n
       p_n(x \mid d)`, with the bigram ... 6-gram weights :math:`\lambda = (0.01, 0.04, 0.15, 0.18, 0.12)`.
    4. **Pruning.** Every draft is extended by every candidate token (:math:`k \times` ``num_tokens`` new drafts,
       scored by cumulative log-score) and the :math:`k` best are kept, as in beam search.

    Output: ``generate()`` returns ``num_drafts`` sequences for the (single) prompt, shape
    ``(num_drafts, prompt_len + new_tokens)``, as with ``num_return_sequences=num_drafts``. While no draft has
    ended, the rows are ordered by draft score (row 0 = the most likely draft). A draft that emits eos (or meets a
    stopping criterion) is complete: it keeps its row, is padded like a finished row of ``generate()``, and the
    remaining drafts continue (they are re-ranked among themselves); generation stops when every draft is complete or
    ``max_new_tokens`` is reached. With ``return_dict_in_generate=True`` the output also has ``draft_scores``
    (``(num_drafts,)``, cumulative interpolated log-scores); ``scores`` (if requested) are per-row interpolated
    log-scores ``(num_drafts, vocab)`` of the row's parent draft, ``logits`` the raw logits of the superposed pass.

    Defaults are those of the authors' configuration for :math:`k = 3` (``params/p15_d3_mixed.json`` in
    RAIVNLab/SuperposedDecoding): ``alpha=0.54``, ``temperature=0.06``, ``num_tokens=3k`` (9), n-gram orders 2 to 6.

    Deviations from the paper:

    * The authors' n-gram tables are unsmoothed maximum-likelihood counts from a large corpus (RedPajama, Llama
      tokenizer); unseen contexts drop out of the mixture and drafts with no n-gram support get a fixed penalty. This
      library builds its tables from the small Python-docstring corpus it ships (:class:`NGramLM`), so each order's
      estimate is a Witten-Bell-smoothed back-off distribution (never zero) and no penalty is needed.
    * A draft that ends keeps its slot (the reference keeps separate "alive" and "finished" beams).
    * The caller's logits processors are applied to the shared distribution once per draft, with that draft's own
      tokens as ``input_ids`` (so e.g. a repetition penalty sees each draft's history).
    * Sampling variants and the "resetting" of drafts discussed in the paper are not implemented; decoding is
      deterministic (``do_sample=False``). Batch size 1 only (the drafts are the batch).

    Args:
        ngram_lm: the n-gram model over the model's token ids (:meth:`for_model` builds one from the shipped
            corpus). Not needed when ``alpha=0``.
        num_drafts: number of drafts :math:`k` (returned sequences).
        alpha: weight of the n-gram distribution in the geometric interpolation (0 = LM only).
        temperature: softmax temperature of the LM distribution (the authors use 0.06).
        num_tokens: number of most likely LM tokens considered per draft (default ``3 * num_drafts``).
        ngram_weights: weights of the n-gram orders 2, 3, ...; ``ngram_lm`` must have order ``len(ngram_weights)+1``
            or more.

    Example:
        >>> from hf_decoding_ext.core.models import load_model, encode_prompts
        >>> from hf_decoding_ext.sampling.superposed import SuperposedDecoding
        >>> model, tokenizer = load_model()  # doctest: +SKIP
        >>> loop = SuperposedDecoding.for_model(model, tokenizer, num_drafts=3)  # doctest: +SKIP
        >>> inputs = encode_prompts(tokenizer, "What does the json module do?")  # doctest: +SKIP
        >>> drafts = model.generate(**inputs, custom_generate=loop, do_sample=False,
        ...                         max_new_tokens=20)  # doctest: +SKIP
        >>> drafts.shape[0]  # doctest: +SKIP
        3
    """

    supports_batch = False
    supports_sampling = False

    def __init__(self, ngram_lm: NGramLM | None = None, num_drafts: int = 3, alpha: float = 0.54,
                 temperature: float = 0.06, num_tokens: int | None = None,
                 ngram_weights: Sequence[float] = PAPER_NGRAM_WEIGHTS):
        if not isinstance(num_drafts, int) or num_drafts < 1:
            raise ValueError(f"num_drafts must be a positive integer, got {num_drafts!r}")
        if not 0.0 <= float(alpha) <= 1.0:
            raise ValueError(f"alpha must be in [0, 1], got {alpha}")
        if not float(temperature) > 0.0:
            raise ValueError(f"temperature must be > 0, got {temperature}")
        num_tokens = 3 * num_drafts if num_tokens is None else num_tokens
        if not isinstance(num_tokens, int) or num_tokens < num_drafts:
            raise ValueError(f"num_tokens must be an integer >= num_drafts ({num_drafts}), got {num_tokens!r}")
        weights = tuple(float(w) for w in ngram_weights)
        if not weights or any(w < 0 for w in weights) or sum(weights) <= 0:
            raise ValueError(f"ngram_weights must be non-negative with a positive sum, got {ngram_weights!r}")
        if alpha > 0:
            if ngram_lm is None:
                raise ValueError("SuperposedDecoding needs an n-gram LM when alpha > 0: build the loop with "
                                 "SuperposedDecoding.for_model(model, tokenizer) or pass "
                                 "ngram_lm=NGramLM.for_tokenizer(tokenizer)")
            if ngram_lm.order < len(weights) + 1:
                raise ValueError(f"ngram_weights cover orders 2..{len(weights) + 1} but ngram_lm has order "
                                 f"{ngram_lm.order}")
        self.ngram_lm = ngram_lm
        self.num_drafts = num_drafts
        self.alpha = float(alpha)
        self.temperature = float(temperature)
        self.num_tokens = num_tokens
        self.ngram_weights = weights

    @classmethod
    def for_model(cls, model, tokenizer, num_drafts: int = 3, alpha: float = 0.54, temperature: float = 0.06,
                  num_tokens: int | None = None, ngram_corpus: str = "stdlib") -> SuperposedDecoding:
        """Build the loop with an n-gram LM over ``tokenizer``'s ids (built once from the shipped corpus, then cached).

        ``ngram_corpus``: ``"stdlib"`` (shipped docstrings + standard-library docstrings) or ``"shipped"``.
        """
        lm = NGramLM.for_tokenizer(tokenizer, order=len(PAPER_NGRAM_WEIGHTS) + 1, corpus=ngram_corpus) \
            if alpha > 0 else None
        return cls(ngram_lm=lm, num_drafts=num_drafts, alpha=alpha, temperature=temperature, num_tokens=num_tokens)

    # ------------------------------------------------------------------------------------------------ scoring
    def interpolated_scores(self, scores: torch.Tensor, input_ids: torch.Tensor) -> torch.Tensor:
        """Per-draft log-scores ``(rows, vocab)``: LM (top ``num_tokens``, at ``temperature``) x n-gram of the row.

        ``scores`` are processed logits ``(rows, vocab)``; ``input_ids`` ``(rows, len)`` are the drafts (prompt
        included), whose last tokens condition the n-gram model. Tokens outside the top ``num_tokens`` get ``-inf``.
        """
        logp = torch.log_softmax(scores.float() / self.temperature, dim=-1)
        top_lp, top_ids = logp.topk(self.num_tokens, dim=-1)
        # renormalise over the kept tokens (the reference keeps the top tokens of the distribution and renormalises)
        top_lp = top_lp - torch.logsumexp(top_lp, dim=-1, keepdim=True)
        out = torch.full_like(logp, float("-inf"))
        if self.alpha > 0:
            lm = self.ngram_lm
            ctx_len = len(self.ngram_weights)
            w = torch.tensor(self.ngram_weights, dtype=torch.float32).unsqueeze(1)
            ng = torch.empty_like(top_lp)
            for r in range(scores.shape[0]):
                ids = top_ids[r].cpu()
                valid = ids < lm.vocab_size
                p = torch.full(ids.shape, 1.0 / lm.vocab_size)
                if valid.any():
                    orders = lm.order_probs(input_ids[r, -ctx_len:].cpu(), ids[valid])  # (order, m)
                    p[valid] = (w * orders[1:ctx_len + 1]).sum(0)
                ng[r] = torch.log(p).to(ng.device)
            mixed = (1.0 - self.alpha) * top_lp + self.alpha * ng
        else:
            mixed = top_lp
        # tokens the processors removed stay removed
        mixed = torch.where(torch.isfinite(top_lp), mixed, torch.full_like(mixed, float("-inf")))
        return out.scatter(1, top_ids, mixed)

    # ------------------------------------------------------------------------------------------------ decoding
    def run(self, state: GenerationState):
        if state.streamer is not None:
            raise ValueError("SuperposedDecoding returns num_drafts sequences for one prompt; streamers (batch 1) "
                             "are not supported")
        k = self.num_drafts
        lifecycle.require_lifecycle(state.logits_processor, type(self).__name__)  # drafts branch and reorder rows
        embed = state.model.get_input_embeddings()
        pad = state.pad_token_id if state.pad_token_id is not None else torch.tensor(0, device=state.device)

        # 1. first step: the prompt's distribution branches into k drafts
        logits, _ = state.next_token_logits()
        cand = self.interpolated_scores(state.process(logits), state.input_ids)  # (1, V)
        first_scores, first_tokens = cand[0].topk(k)
        if not torch.isfinite(first_scores).all():
            raise ValueError(f"the logits processors left fewer than num_drafts={k} candidate tokens")
        # the prompt row becomes k draft rows (the cache stays one row: superposed forwards share it)
        state.select_rows(torch.zeros(k, dtype=torch.long), cache=False)
        draft_scores = first_scores.clone()
        state.record(cand.expand(k, -1), logits.expand(k, -1))
        state.append(first_tokens)

        # 2.-4. one superposed forward per position
        vocab = cand.shape[-1]
        while not state.done:
            alive = state.unfinished.clone()
            idx = alive.nonzero().squeeze(1)
            gamma = torch.softmax(draft_scores[idx], dim=0)
            token_emb = embed(state.input_ids[idx, -1])  # (n_alive, hidden)
            superposed = (gamma.to(token_emb.dtype)[:, None] * token_emb).sum(0)[None, None, :]
            out = state.forward(input_ids=state.input_ids[:1], attention_mask=state.attention_mask[:1],
                                inputs_embeds=superposed)
            logits = out.logits[:, -1, :]  # (1, V)
            # every draft reads the one superposed forward (processors that read the model's forward, e.g. kNN-LM)
            lifecycle.locate(state.logits_processor, rows=torch.zeros(k, dtype=torch.long, device=state.device))
            processed = state.process(logits.expand(k, -1).clone(), state.input_ids)
            cand = self.interpolated_scores(processed, state.input_ids)  # (k, V)
            total = draft_scores[:, None] + cand
            total[~alive] = float("-inf")
            best, flat = total.reshape(-1).topk(idx.numel())
            parents = torch.arange(k, device=state.device)
            parents[idx] = flat // vocab
            tokens = pad.to(state.input_ids.dtype).expand(k).clone()
            tokens[idx] = flat % vocab
            new_scores = draft_scores.clone()
            new_scores[idx] = best
            state.select_rows(parents, cache=False)  # sequences, finished flags and processor states follow
            dead = idx[~torch.isfinite(best)]  # processors left too few candidates: the draft ends here
            if dead.numel():
                state.unfinished[dead] = False
                tokens[dead] = pad
                new_scores[dead] = draft_scores[parents[dead]]
            draft_scores = new_scores
            state.record(cand[parents], logits.expand(k, -1))
            state.append(tokens)
        return {"draft_scores": draft_scores}
