"""Diverse Beam Search (Vijayakumar et al., AAAI 2018, arXiv 1610.02424)."""

from __future__ import annotations

import math
from typing import Any

import torch

from hf_decoding_ext.core import lifecycle
from hf_decoding_ext.core.beam import BeamSearchBank
from hf_decoding_ext.core.loop import DecodingLoop, GenerationState

DIVERSITY_FUNCTIONS = ("hamming", "cumulative", "ngram", "embedding")
"""The diversity terms of the paper (Section 5.1), by name."""


# ----------------------------------------------------------------------------------------------- diversity terms
def hamming_diversity(previous_tokens: torch.Tensor, width: int, vocab: int) -> torch.Tensor:
    """Hamming diversity: for every token, how many beams of the earlier groups chose it at this step.

    Args:
        previous_tokens: ``(batch, P)`` the tokens the ``P`` beams of the earlier groups chose at this step.
        width: beams of the current group.
        vocab: vocabulary size.

    Returns:
        ``(batch, width, vocab)`` counts (the same for every beam of the group).

    Example:
        >>> hamming_diversity(torch.tensor([[3, 3, 1]]), 2, 5)[0, 0].tolist()
        [0.0, 1.0, 0.0, 2.0, 0.0]
    """
    counts = torch.zeros(previous_tokens.shape[0], vocab, device=previous_tokens.device)
    counts.scatter_add_(1, previous_tokens, torch.ones_like(previous_tokens, dtype=counts.dtype))
    return counts[:, None, :].expand(-1, width, -1)


def cumulative_diversity(previous_tokens: torch.Tensor, previous_generated: torch.Tensor,
                         parents_generated: torch.Tensor, vocab: int, temperature: float) -> torch.Tensor:
    r"""Cumulative diversity: Hamming diversity backed off by how much two sequences already differ.

    A candidate of beam ``j`` with token ``v`` is penalised, for every earlier-group beam ``b'`` that chose ``v`` at
    this step, by :math:`\exp(-d_{j,b'} / \Gamma)`, where :math:`d_{j,b'}` counts the earlier generated positions at
    which the two sequences differ (the paper's
    :math:`\exp\{-(\sum_{\tau<t} \mathbb{1}[y^h_{b',\tau} \ne y^g_{j,\tau}])/\Gamma\}` times the Hamming indicator).

    Args:
        previous_tokens: ``(batch, P)`` tokens chosen by the earlier groups' beams at this step.
        previous_generated: ``(batch, P, t - 1)`` those beams' generated tokens before this step.
        parents_generated: ``(batch, width, t - 1)`` the current group's beams' generated tokens.
        vocab: vocabulary size.
        temperature: :math:`\Gamma`.

    Returns:
        ``(batch, width, vocab)`` penalties.

    Example:
        >>> prev_tok, prev_gen = torch.tensor([[4]]), torch.tensor([[[1, 2]]])
        >>> parents = torch.tensor([[[1, 2], [1, 3]]])  # beam 0 equals the earlier beam so far, beam 1 differs once
        >>> pen = cumulative_diversity(prev_tok, prev_gen, parents, vocab=6, temperature=1.0)
        >>> [round(x, 4) for x in pen[0, :, 4].tolist()]
        [1.0, 0.3679]
    """
    batch, width = parents_generated.shape[:2]
    differ = (parents_generated[:, :, None, :] != previous_generated[:, None, :, :]).sum(-1)  # (batch, width, P)
    weight = torch.exp(-differ.float() / temperature)
    out = torch.zeros(batch, width, vocab, device=previous_tokens.device)
    out.scatter_add_(2, previous_tokens[:, None, :].expand(-1, width, -1).contiguous(), weight)
    return out


def ngram_diversity(previous_generated: torch.Tensor, parents_generated: torch.Tensor, vocab: int,
                    n: int) -> torch.Tensor:
    """n-gram diversity: how often the n-gram a candidate completes occurs in the earlier groups' sequences.

    The n-gram of beam ``j`` with token ``v`` is its last ``n - 1`` generated tokens followed by ``v``; it is counted
    at every position of every earlier-group beam's generated tokens (this step's token included), regardless of
    alignment in time. While fewer than ``n`` tokens are generated the n-gram is shortened to what exists (at the
    first step it is the token itself, i.e. Hamming diversity).

    Args:
        previous_generated: ``(batch, P, t)`` the earlier groups' beams' generated tokens, this step's included.
        parents_generated: ``(batch, width, t - 1)`` the current group's beams' generated tokens.
        vocab: vocabulary size.
        n: n-gram order.

    Returns:
        ``(batch, width, vocab)`` counts.

    Example:
        >>> prev = torch.tensor([[[5, 6, 5, 7]]])  # one earlier beam: bigrams (5,6), (6,5), (5,7)
        >>> parents = torch.tensor([[[1, 2, 5], [1, 2, 6]]])
        >>> pen = ngram_diversity(prev, parents, vocab=8, n=2)
        >>> pen[0, 0].nonzero().flatten().tolist(), pen[0, 1].nonzero().flatten().tolist()
        ([6, 7], [5])
    """
    batch, P, t = previous_generated.shape
    width = parents_generated.shape[1]
    k = min(n, t)
    out = torch.zeros(batch, width, vocab, device=previous_generated.device)
    if k == 1:
        counts = torch.zeros(batch, vocab, device=previous_generated.device)
        counts.scatter_add_(1, previous_generated.reshape(batch, -1),
                            torch.ones(batch, P * t, device=previous_generated.device))
        return out + counts[:, None, :]
    windows = previous_generated.unfold(-1, k, 1)  # (batch, P, t - k + 1, k)
    prefix = parents_generated[:, :, t - k:]  # the last k - 1 tokens of each parent, (batch, width, k - 1)
    match = (windows[:, None, :, :, :-1] == prefix[:, :, None, None, :]).all(-1)  # (batch, width, P, windows)
    last = windows[..., -1][:, None].expand(-1, width, -1, -1)
    out.scatter_add_(2, last.reshape(batch, width, -1), match.float().reshape(batch, width, -1))
    return out


def embedding_diversity(previous_tokens: torch.Tensor, embeddings: torch.Tensor, norms: torch.Tensor, width: int,
                        vocab: int) -> torch.Tensor:
    """Neural-embedding diversity: Hamming diversity with the indicator replaced by the cosine similarity of token
    embeddings (clipped at 0), so near-synonyms of the earlier groups' tokens are penalised too.

    Args:
        previous_tokens: ``(batch, P)`` tokens chosen by the earlier groups' beams at this step.
        embeddings: ``(V, d)`` token embeddings (this library: the model's input embeddings).
        norms: ``(V,)`` their norms.
        width: beams of the current group.
        vocab: vocabulary size of the scores (embeddings beyond it are ignored; missing rows count 0).

    Returns:
        ``(batch, width, vocab)`` penalties.

    Example:
        >>> emb = torch.tensor([[1.0, 0.0], [1.0, 1.0], [0.0, 1.0], [-1.0, 0.0]])
        >>> pen = embedding_diversity(torch.tensor([[0]]), emb, emb.norm(dim=-1), 1, 4)
        >>> [round(x, 4) for x in pen[0, 0].tolist()]
        [1.0, 0.7071, 0.0, 0.0]
    """
    rows = min(vocab, embeddings.shape[0])
    prev = embeddings[previous_tokens].float()  # (batch, P, d)
    sims = prev @ embeddings[:rows].float().T  # (batch, P, rows)
    sims = sims / (norms[previous_tokens][..., None].float() * norms[:rows].float()[None, None, :]).clamp(min=1e-12)
    total = sims.clamp(min=0.0).sum(1)  # (batch, rows)
    out = torch.zeros(previous_tokens.shape[0], vocab, device=previous_tokens.device)
    out[:, :rows] = total
    return out[:, None, :].expand(-1, width, -1)


# ----------------------------------------------------------------------------------------------- decoding loop
class DiverseBeamSearch(DecodingLoop):
    r"""Diverse Beam Search (DBS), from "Diverse Beam Search: Decoding Diverse Solutions from Neural Sequence
    Models" (Vijayakumar, Cogswell, Selvaraju, Sun, Lee, Crandall, Batra; AAAI 2018, https://arxiv.org/abs/1610.02424).

    The ``num_beams`` (B) beams are split into ``num_beam_groups`` (G) groups of ``B / G``. At every step the groups
    are processed in order: group ``g`` runs one step of ordinary beam search of width ``B / G`` on the scores

    .. math:: \log p(y_t \mid y_{<t}, x) - \lambda\, \Delta(y_t;\ Y^1_t, \dots, Y^{g-1}_t)

    where :math:`Y^h_t` are the tokens (or sequences) the earlier groups chose at this step and :math:`\Delta` the
    diversity term ``diversity`` (Section 5.1 of the paper):

    * ``"hamming"`` (default; best oracle accuracy in the paper, and transformers' former
      ``HammingDiversityLogitsProcessor``): the number of earlier-group beams that chose the token at this step
      (:func:`hamming_diversity`);
    * ``"cumulative"``: the Hamming indicator of each earlier beam weighted by :math:`\exp(-d/\Gamma)`, ``d`` the
      number of earlier positions at which the two sequences already differ, :math:`\Gamma` = ``temperature``
      (:func:`cumulative_diversity`);
    * ``"ngram"``: how often the ``ngram_size``-gram the candidate completes occurs anywhere in the earlier groups'
      sequences (:func:`ngram_diversity`);
    * ``"embedding"``: the Hamming indicator replaced by the cosine similarity of token embeddings
      (:func:`embedding_diversity`).

    Group 1 is plain beam search. Each group keeps its own running beams and its own pool of ``B / G`` finished
    hypotheses exactly as ``generate(num_beams=B / G)`` does (:class:`~hf_decoding_ext.core.beam.BeamSearchBank`:
    top ``max(2, 1 + #eos) * B / G`` candidates, stopping criteria asked on the candidates, ``length_penalty``,
    ``early_stopping`` and the early-stop heuristic), all groups sharing one batched forward per step. Hence ``G = 1``
    is token for token ``generate(num_beams=B)``, and ``diversity_penalty=0`` gives ``G`` copies of
    ``generate(num_beams=B / G)``. The returned sequences are the ``num_return_sequences`` best hypotheses over all
    groups (by length-normalised score), as transformers' group beam search returned them.

    Arguments ``generate()`` gives take precedence over the constructor's: ``num_beams > 1``, ``num_beam_groups > 1``
    and a non-zero ``diversity_penalty`` (transformers 5 still accepts these flags and hands them to a
    ``custom_generate`` loop). ``num_return_sequences`` must not exceed the number of beams; to return several,
    pass ``num_beams=B`` to ``generate()`` as well (transformers refuses ``num_return_sequences > 1`` in greedy mode
    without beams). With ``return_dict_in_generate=True`` the output also carries

    * ``sequences_scores``: the returned hypotheses' scores (accumulated diversity-augmented log-probabilities divided
      by ``generated_length ** length_penalty``, the quantity beam search ranks by);
    * ``sequences_logprobs``: their summed log-probabilities without the diversity penalty (after the caller's logits
      processors);
    * ``sequence_groups``: the group each returned hypothesis comes from;
    * ``group_sequences`` ``(batch, G, B / G, length)``, ``group_scores``, ``group_logprobs`` ``(batch, G, B / G)``:
      every group's finished hypotheses, best first, padded like the sequences;
    * ``scores`` (with ``output_scores``): per step, every beam's next-token scores after the processors and the
      diversity penalty (the beams in group order).

    The caller's logits processors act on every beam's log-probabilities before the penalty; processors with per-row
    state follow the beams as they are reordered (:func:`hf_decoding_ext.core.lifecycle.select_rows`).

    Deviations from the paper and the official code (ashwinkalyan/dbs, Lua):
        - Groups advance in lock-step (all groups decide step ``t`` after one batched forward) instead of the
          official code's staggered start (group ``g`` begins ``g - 1`` steps late); the penalty sees the same
          tokens either way (the earlier groups' choices for the same position).
        - Beam bookkeeping is Hugging Face's (finished hypotheses leave the beam for a pool, ``2 * B / G``
          candidates, length penalty and early stopping, the best ``num_return_sequences`` over all groups),
          not the official code's (finished beams stay with score -1000; each group returns its ``B / G`` beams).
          As in transformers' group beam search, the penalty counts the tokens of the earlier groups' *running*
          beams, so an end-of-sequence token that just finished a hypothesis does not penalise later groups.
        - Accumulated beam scores include the penalty (as in the official code and transformers), and
          ``sequences_logprobs`` reports the unpenalised sums.
        - ``"cumulative"``: the paper gives no value for :math:`\Gamma` (default 1 here) and the official
          ``div_utils.lua`` normalises the mismatch count by the length and averages it per group; here it is the
          paper's per-beam count.
        - ``"ngram"``: shorter n-grams while fewer than ``n`` tokens exist; ``"embedding"``: the paper's word2vec
          vectors are replaced by the model's own input embeddings (offline stand-in), negative cosines clipped to 0.
        - ``diversity_penalty=0`` is allowed (transformers refused it); it gives identical groups.

    Args:
        num_beams: total beams B (used when ``generate()`` is called with ``num_beams=1``).
        num_beam_groups: groups G (must divide B); the paper finds G = B explores the most.
        diversity_penalty: :math:`\lambda >= 0`; the paper reports 0.2-0.8 working well for most tasks.
        diversity: ``"hamming"``, ``"cumulative"``, ``"ngram"`` or ``"embedding"``.
        ngram_size: n of the ``"ngram"`` diversity.
        temperature: :math:`\Gamma` of the ``"cumulative"`` diversity.

    Example:
        >>> from hf_decoding_ext.core.models import load_model, encode_prompts
        >>> from hf_decoding_ext.search.diverse_beam_search import DiverseBeamSearch
        >>> model, tokenizer = load_model()  # doctest: +SKIP
        >>> inputs = encode_prompts(tokenizer, "Write a one-line slogan for a bakery.")  # doctest: +SKIP
        >>> out = model.generate(**inputs, custom_generate=DiverseBeamSearch(num_beams=4, num_beam_groups=4,
        ...                      diversity_penalty=0.5), do_sample=False, max_new_tokens=24, num_beams=4,
        ...                      num_return_sequences=4)  # doctest: +SKIP
        >>> DiverseBeamSearch(num_beams=6, num_beam_groups=3).group_width
        2
    """

    supports_batch = True
    supports_beams = True
    supports_sampling = False

    def __init__(self, num_beams: int = 4, num_beam_groups: int = 4, diversity_penalty: float = 0.5,
                 diversity: str = "hamming", ngram_size: int = 2, temperature: float = 1.0):
        for name, value in (("num_beams", num_beams), ("num_beam_groups", num_beam_groups),
                            ("ngram_size", ngram_size)):
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{name} must be an integer >= 1, got {value!r}")
        if num_beams % num_beam_groups:
            raise ValueError(f"num_beams ({num_beams}) must be divisible by num_beam_groups ({num_beam_groups})")
        if isinstance(diversity_penalty, bool) or not isinstance(diversity_penalty, (int, float)) \
                or not math.isfinite(diversity_penalty) or diversity_penalty < 0:
            raise ValueError(f"diversity_penalty must be a finite number >= 0, got {diversity_penalty!r}")
        if diversity not in DIVERSITY_FUNCTIONS:
            raise ValueError(f"diversity must be one of {DIVERSITY_FUNCTIONS}, got {diversity!r}")
        if isinstance(temperature, bool) or not isinstance(temperature, (int, float)) \
                or not math.isfinite(temperature) or temperature <= 0:
            raise ValueError(f"temperature must be a finite number > 0, got {temperature!r}")
        self.num_beams = num_beams
        self.num_beam_groups = num_beam_groups
        self.diversity_penalty = float(diversity_penalty)
        self.diversity = diversity
        self.ngram_size = ngram_size
        self.temperature = float(temperature)

    @property
    def group_width(self) -> int:
        """Beams per group, ``num_beams // num_beam_groups`` (constructor values)."""
        return self.num_beams // self.num_beam_groups

    def resolve(self, generation_config) -> tuple[int, int, float]:
        """``(num_beams, num_beam_groups, diversity_penalty)`` for a run: ``generate()``'s values where set
        (``num_beams > 1``, ``num_beam_groups > 1``, ``diversity_penalty != 0``), else the constructor's."""
        gc = generation_config
        beams = int(gc.num_beams) if gc.num_beams and gc.num_beams > 1 else self.num_beams
        groups = getattr(gc, "num_beam_groups", None)
        groups = int(groups) if groups and groups > 1 else self.num_beam_groups
        penalty = getattr(gc, "diversity_penalty", None)
        penalty = float(penalty) if penalty else self.diversity_penalty
        if beams % groups:
            raise ValueError(f"num_beams ({beams}) must be divisible by num_beam_groups ({groups})")
        if penalty < 0 or not math.isfinite(penalty):
            raise ValueError(f"diversity_penalty must be a finite number >= 0, got {penalty!r}")
        return beams, groups, penalty

    # --------------------------------------------------------------------------------------------- search
    def _penalty(self, previous_tokens, previous_sequences, parents, prompt_length, vocab, embeddings):
        width = parents.shape[1]
        if self.diversity == "hamming":
            return hamming_diversity(previous_tokens, width, vocab)
        if self.diversity == "embedding":
            return embedding_diversity(previous_tokens, embeddings[0], embeddings[1], width, vocab)
        parents_generated = parents[..., prompt_length:]
        previous_generated = previous_sequences[..., prompt_length:]
        if self.diversity == "cumulative":
            return cumulative_diversity(previous_tokens, previous_generated[..., :-1], parents_generated, vocab,
                                        self.temperature)
        return ngram_diversity(previous_generated, parents_generated, vocab, self.ngram_size)

    @torch.no_grad()
    def run(self, state: GenerationState):
        name = type(self).__name__
        gc = state.generation_config
        if state.streamer is not None:
            raise ValueError(f"{name} is a beam search and cannot stream; drop streamer=")
        beams, groups, penalty = self.resolve(gc)
        width = beams // groups
        nrs = int(gc.num_return_sequences or 1)
        if nrs > beams:
            raise ValueError(f"num_return_sequences ({nrs}) must be <= num_beams ({beams})")
        length_penalty = 1.0 if gc.length_penalty is None else float(gc.length_penalty)
        early_stopping = False if gc.early_stopping is None else gc.early_stopping
        rows = state.input_ids.shape[0]
        expand = max(int(gc.num_beams or 1), nrs)  # how generate() expanded the prompts
        if rows % expand:
            raise RuntimeError(f"unexpected input of {rows} rows for an expansion of {expand}")
        batch = rows // expand
        device = state.device
        lifecycle.require_lifecycle(state.logits_processor, name)  # beams are reordered
        if expand != beams:  # re-expand every prompt to the beams
            idx = (torch.arange(batch, device=device) * expand).repeat_interleave(beams)
            lifecycle.select_rows(state.logits_processor, idx, caller=name)
            state.input_ids = state.input_ids[idx]
            state.attention_mask = state.attention_mask[idx]
            state.unfinished = state.unfinished[idx]
            if state.cache.get_seq_length() > 0:
                state.cache.batch_select_indices(idx)
        eos = gc._eos_token_tensor
        eos_ids = [] if eos is None else [int(e) for e in eos.reshape(-1).tolist()]
        pad = gc._pad_token_tensor
        if eos is None:
            fill = -1
        else:  # generate()'s filler: the pad id unless it is None or 0, else the first eos id
            fill = int(pad) if (pad is not None and bool(pad)) else eos_ids[0]
        prompt_length = state.prompt_length
        bank = BeamSearchBank(batch * groups, width, prompt_length=prompt_length, max_length=gc.max_length,
                              num_eos=len(eos_ids), length_penalty=length_penalty, early_stopping=early_stopping,
                              fill_value=fill, device=device)
        item = torch.arange(batch, device=device)
        group_searches = [item * groups + g for g in range(groups)]
        group_rows = [(item[:, None] * beams + g * width + torch.arange(width, device=device)[None, :]).reshape(-1)
                      for g in range(groups)]
        embeddings = None
        if self.diversity == "embedding" and groups > 1 and penalty:
            weight = state.model.get_input_embeddings().weight.detach()
            embeddings = (weight, weight.float().norm(dim=-1))

        cur_len = state.input_ids.shape[1]
        while True:
            out = state.forward()
            logits = out.logits[:, -1, :]
            del out
            vocab = logits.shape[-1]
            log_probs = torch.log_softmax(logits, dim=-1)
            log_probs = state.process(log_probs)
            recorded = log_probs.clone() if state.scores is not None else None
            state.record(scores=recorded, logits=logits.clone())
            crit_scores = tuple(state.scores) if state.scores is not None else None
            source = torch.empty((batch, beams), dtype=torch.long, device=device)
            tokens = torch.empty((batch, beams), dtype=state.input_ids.dtype, device=device)
            prev_tokens: list[torch.Tensor] = []
            prev_sequences: list[torch.Tensor] = []
            for g in range(groups):
                rows_g = group_rows[g]
                raw = log_probs[rows_g].reshape(batch, width, vocab)
                parents = state.input_ids[rows_g].reshape(batch, width, cur_len)
                scores = raw
                if g > 0 and penalty:
                    delta = self._penalty(torch.cat(prev_tokens, dim=1), torch.cat(prev_sequences, dim=1), parents,
                                          prompt_length, vocab, embeddings)
                    scores = raw - penalty * delta
                    if recorded is not None:
                        recorded[rows_g] = scores.reshape(-1, vocab)
                src, tok = bank.step(group_searches[g], scores, parents, state.stopping_criteria, crit_scores,
                                     extra_log_probs=raw)
                source[:, g * width:(g + 1) * width] = g * width + src
                tokens[:, g * width:(g + 1) * width] = tok
                if g + 1 < groups:
                    prev_tokens.append(tok)
                    prev_sequences.append(torch.cat([torch.take_along_dim(parents, src[:, :, None], dim=1),
                                                     tok[:, :, None].to(parents.dtype)], dim=2))
            beam_idx = (item[:, None] * beams + source).reshape(-1)
            lifecycle.select_rows(state.logits_processor, beam_idx, caller=name)  # processors follow the beams
            state.input_ids = torch.cat([state.input_ids[beam_idx], tokens.reshape(-1, 1)], dim=1)
            state.attention_mask = torch.cat([state.attention_mask[beam_idx],
                                              state.attention_mask.new_ones((beam_idx.shape[0], 1))], dim=1)
            state.cache.reorder_cache(beam_idx)
            cur_len += 1
            if bank.done:
                break
        return self._outputs(state, bank, batch, groups, width, nrs)

    def _outputs(self, state, bank: BeamSearchBank, batch, groups, width, nrs) -> dict[str, Any]:
        device = state.device
        searches = (torch.arange(batch, device=device)[:, None] * groups
                    + torch.arange(groups, device=device)[None, :])
        search, slot = bank.best(searches, nrs)  # (batch, nrs)
        length = bank.output_length(search, slot)
        state.input_ids = bank.sequences[search, slot][..., :length].reshape(batch * nrs, length).to(
            state.input_ids.dtype)
        all_length = bank.prompt_length + int(bank.lengths.max())
        return {
            "sequences_scores": bank.scores[search, slot].reshape(-1),
            "sequences_logprobs": bank.extra[search, slot].reshape(-1),
            "sequence_groups": (search % groups).reshape(-1),
            "group_sequences": bank.sequences[..., :all_length].reshape(batch, groups, width, all_length),
            "group_scores": bank.scores.reshape(batch, groups, width),
            "group_logprobs": bank.extra.reshape(batch, groups, width),
        }
