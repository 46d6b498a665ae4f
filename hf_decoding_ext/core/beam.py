"""Beam-search bookkeeping shared by the library's beam loops.

:class:`BeamSearchBank` holds the running and finished hypotheses of several *independent* beam searches of the same
width (one per prompt, or one per prompt and group in Diverse Beam Search) and performs one step of transformers 5's
beam search (``GenerationMixin._beam_search``) on any subset of them: the top ``max(2, 1 + number of eos ids) *
width`` continuations over the search's beams, the stopping criteria asked on these candidates, the best unfinished
ones as the next running beams, the candidates among the top ``width`` that end joining a pool of the ``width`` best
finished hypotheses (score divided by ``generated_length ** length_penalty``), ``early_stopping`` (``True``,
``False`` or ``"never"``) and the early-stop heuristic, with the same tensor operations in the same order, so that a
loop built on it reproduces ``generate(num_beams=k, do_sample=False)`` token for token. The loop owns the model, the
KV cache and the sequences; the bank only says which beam each new beam continues and with which token.
"""

from __future__ import annotations

import torch


class BeamSearchBank:
    r"""Running and finished hypotheses of ``searches`` independent beam searches of width ``width``.

    Mirrors the state of transformers 5's ``_beam_search`` (``running_beam_scores``, ``sequences``, ``beam_scores``,
    ``is_sent_finished``, ``is_early_stop_heuristic_unsatisfied``), with one row per search instead of one per batch
    item, and an optional second quantity accumulated along the beams (e.g. log-probabilities without a diversity
    penalty) reported with the finished hypotheses.

    Args:
        searches: number of independent searches.
        width: beams per search.
        prompt_length: length of the prompt (left-padded to a common length).
        max_length: ``generation_config.max_length`` (finished sequences are stored at this length).
        num_eos: number of end-of-sequence ids (sets the number of candidates per step, as ``generate()`` does).
        length_penalty: exponent of the generated length that divides a finished hypothesis' score.
        early_stopping: ``True``, ``False`` or ``"never"``, with ``generate()``'s meaning.
        fill_value: token stored after the end of finished sequences (``generate()``: the pad id, else the first eos
            id, else -1).
        device: where the bookkeeping tensors live.

    Example:
        >>> import torch
        >>> from transformers import StoppingCriteriaList
        >>> from transformers.generation.stopping_criteria import MaxLengthCriteria
        >>> bank = BeamSearchBank(1, 2, prompt_length=1, max_length=3, num_eos=0, fill_value=-1)
        >>> crit = StoppingCriteriaList([MaxLengthCriteria(3)])
        >>> lp = torch.log(torch.tensor([[[0.6, 0.3, 0.1], [0.2, 0.2, 0.6]]]))  # beam 1 is inactive at step 1
        >>> src, tok = bank.step(torch.tensor([0]), lp, torch.zeros(1, 2, 1, dtype=torch.long), crit)
        >>> src.tolist(), tok.tolist()
        ([[0, 0]], [[0, 1]])
    """

    def __init__(self, searches: int, width: int, *, prompt_length: int, max_length: int, num_eos: int = 0,
                 length_penalty: float = 1.0, early_stopping: bool | str = False, fill_value: int = -1,
                 device: torch.device | str | None = None):
        if not isinstance(width, int) or width < 1:
            raise ValueError(f"width must be an integer >= 1, got {width!r}")
        if not isinstance(searches, int) or searches < 1:
            raise ValueError(f"searches must be an integer >= 1, got {searches!r}")
        if early_stopping not in (True, False, "never"):
            raise ValueError(f"early_stopping must be True, False or 'never', got {early_stopping!r}")
        if max_length <= prompt_length:
            raise ValueError(f"max_length ({max_length}) must exceed the prompt length ({prompt_length})")
        self.searches, self.width = searches, width
        self.prompt_length, self.max_length = int(prompt_length), int(max_length)
        self.length_penalty = float(length_penalty)
        self.early_stopping = early_stopping
        self.fill_value = int(fill_value)
        self.num_candidates = max(2, 1 + int(num_eos)) * width
        device = torch.device("cpu") if device is None else torch.device(device)
        self.device = device
        # running beams: only the first is active at the start (the others would repeat its tokens)
        self.running_scores = torch.zeros((searches, width), dtype=torch.float, device=device)
        self.running_scores[:, 1:] = -1e9
        self.running_extra = torch.zeros((searches, width), dtype=torch.float, device=device)
        # pool of finished hypotheses, best first
        self.sequences = torch.full((searches, width, self.max_length), self.fill_value, dtype=torch.long,
                                    device=device)
        self.scores = torch.full((searches, width), -1e9, dtype=torch.float, device=device)
        self.extra = torch.zeros((searches, width), dtype=torch.float, device=device)
        self.lengths = torch.zeros((searches, width), dtype=torch.long, device=device)  # generated tokens
        self.is_finished = torch.zeros((searches, width), dtype=torch.bool, device=device)
        self.improvable = torch.ones((searches, 1), dtype=torch.bool, device=device)
        self.all_candidates_ended = torch.zeros(searches, dtype=torch.bool, device=device)
        self._top_width = torch.arange(self.num_candidates, device=device) < width

    # ----------------------------------------------------------------------------------------------- one step
    def step(self, searches: torch.Tensor, log_probs: torch.Tensor, sequences: torch.Tensor, stopping_criteria,
             scores=None, extra_log_probs: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """One beam-search step of the searches ``searches``.

        Args:
            searches: ``(n,)`` long, the searches this step covers (each at most once).
            log_probs: ``(n, width, vocab)`` next-token scores of each running beam (after the logits processors and
                any penalty), added to the beams' accumulated scores.
            sequences: ``(n, width, cur_len)`` the running sequences (prompt included).
            stopping_criteria: ``generate()``'s stopping criteria, asked on the candidate sequences.
            scores: what the stopping criteria receive as scores (``generate()``: the recorded scores or ``None``).
            extra_log_probs: ``(n, width, vocab)`` a second per-token quantity accumulated along the beams and kept
                with the finished hypotheses (:attr:`extra`); ``None``: the same as ``log_probs``.

        Returns:
            ``(source, tokens)``, each ``(n, width)``: new running beam ``i`` of search ``searches[k]`` is its old beam
            ``source[k, i]`` followed by ``tokens[k, i]``.
        """
        searches = searches.to(self.device)
        n, width, vocab = log_probs.shape
        if width != self.width:
            raise ValueError(f"expected {self.width} beams per search, got {width}")
        cur_len = sequences.shape[-1]
        accumulated = log_probs + self.running_scores[searches][:, :, None]
        accumulated = accumulated.reshape(n, -1)
        k = min(self.num_candidates, accumulated.shape[1])
        top_scores, top_index = torch.topk(accumulated, k=k)
        source = top_index // vocab
        tokens = top_index % vocab
        candidates = torch.cat([torch.take_along_dim(sequences, source[:, :, None], dim=1), tokens[:, :, None]], dim=2)
        hits = stopping_criteria(candidates.reshape(n * k, cur_len + 1), scores).reshape(n, k).to(self.device)
        extra_lp = log_probs if extra_log_probs is None else extra_log_probs
        cand_extra = (self.running_extra[searches].gather(1, source)
                      + extra_lp.reshape(n, -1).gather(1, top_index).float())

        # the next running beams: the best candidates that did not end
        running = top_scores + hits.to(torch.float32) * -1.0e9
        keep = torch.topk(running, k=self.width)[1]
        new_source = source.gather(1, keep)
        new_tokens = tokens.gather(1, keep)
        new_scores = running.gather(1, keep)
        new_extra = cand_extra.gather(1, keep)

        # finished hypotheses: candidates among the top `width` that ended join the pool if they beat its worst
        top_mask = self._top_width[:k]
        just_finished = hits & top_mask[None, :]
        finished_scores = top_scores / ((cur_len + 1 - self.prompt_length) ** self.length_penalty)
        pool_full = torch.all(self.is_finished[searches], dim=-1, keepdim=True) & (self.early_stopping is True)
        finished_scores = finished_scores + pool_full.to(torch.float32) * -1.0e9
        finished_scores = finished_scores + (~self.improvable[searches]).to(torch.float32) * -1.0e9
        finished_scores = finished_scores + (~just_finished) * -1.0e9
        padded = torch.full((n, k, self.max_length), self.fill_value, dtype=torch.long, device=self.device)
        padded[:, :, :cur_len + 1] = candidates
        merged_scores = torch.cat([self.scores[searches], finished_scores], dim=1)
        best = torch.topk(merged_scores, k=self.width)[1]
        merged_sequences = torch.cat([self.sequences[searches], padded], dim=1)
        merged_extra = torch.cat([self.extra[searches], cand_extra], dim=1)
        merged_lengths = torch.cat([self.lengths[searches],
                                    torch.full((n, k), cur_len + 1 - self.prompt_length, dtype=torch.long,
                                               device=self.device)], dim=1)
        merged_finished = torch.cat([self.is_finished[searches], just_finished], dim=1)
        self.sequences[searches] = torch.take_along_dim(merged_sequences, best[:, :, None], dim=1)
        self.scores[searches] = merged_scores.gather(1, best)
        self.extra[searches] = merged_extra.gather(1, best)
        self.lengths[searches] = merged_lengths.gather(1, best)
        self.is_finished[searches] = merged_finished.gather(1, best)
        self.running_scores[searches] = new_scores
        self.running_extra[searches] = new_extra
        self.all_candidates_ended[searches] = hits.all(dim=-1)

        # can a running beam still beat the worst finished hypothesis? (generate()'s heuristic, at the new length)
        new_len = cur_len + 1
        if self.early_stopping == "never" and self.length_penalty > 0.0:
            best_length = self.max_length - self.prompt_length
        else:
            best_length = new_len - self.prompt_length
        best_possible = new_scores[:, :1] / (best_length ** self.length_penalty)
        worst = torch.where(self.is_finished[searches], torch.min(self.scores[searches], dim=1, keepdim=True)[0],
                            -1.0e9)
        self.improvable[searches] = self.improvable[searches] & torch.any(best_possible > worst, dim=-1,
                                                                          keepdim=True)
        return new_source, new_tokens

    @property
    def done(self) -> bool:
        """``generate()``'s stopping rule over all searches: no search can improve, or every pool is full under
        ``early_stopping=True``, or every candidate of the last step ended (e.g. the maximum length)."""
        improvement_possible = bool(self.improvable.any())
        open_beam = not (bool(self.is_finished.all()) and self.early_stopping is True)
        valid_continuations = not bool(self.all_candidates_ended.all())
        return not (improvement_possible and open_beam and valid_continuations)

    # ----------------------------------------------------------------------------------------------- results
    def best(self, searches: torch.Tensor, count: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The ``count`` best finished hypotheses over a set of searches (e.g. all groups of one prompt).

        Args:
            searches: ``(m, s)`` long: ``m`` items, each ranked over its ``s`` searches' pools (``s * width``
                hypotheses, best score first; ties keep search order, then pool order).
            count: hypotheses per item.

        Returns:
            ``(search, slot)``, each ``(m, count)``: the chosen hypotheses' search and position in its pool.
        """
        m, s = searches.shape
        scores = self.scores[searches.reshape(-1)].reshape(m, s * self.width)
        order = torch.sort(scores, dim=1, descending=True, stable=True)[1][:, :count]
        search = searches.gather(1, order // self.width)
        return search, order % self.width

    def output_length(self, search: torch.Tensor, slot: torch.Tensor) -> int:
        """Prompt plus the longest generated part among the given hypotheses (``generate()`` crops to it)."""
        return self.prompt_length + int(self.lengths[search, slot].max())
