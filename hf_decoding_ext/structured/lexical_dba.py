"""Lexically constrained beam search with Dynamic Beam Allocation (DBA).

Paper: "Fast Lexically Constrained Decoding with Dynamic Beam Allocation for Neural Machine Translation" (Post &
Vilar, NAACL 2018, arXiv 1804.06609). The vectorised successor is "Improved Lexically Constrained Decoding for
Translation and Monolingual Rewriting" (Hu et al., NAACL 2019).
"""

from __future__ import annotations

import math
import warnings
from typing import Any, Sequence

import torch

from hf_decoding_ext.core import lifecycle
from hf_decoding_ext.core.loop import DecodingLoop, GenerationState

Phrase = tuple[int, ...]


# ----------------------------------------------------------------------------------------------- bookkeeping
class ConstraintState:
    """Which constraint phrases one hypothesis has met, and its progress inside a started phrase (immutable).

    A phrase counts as met only once all its tokens were generated contiguously. One phrase is tracked at a time:
    while a phrase is in progress, the next token either extends it or abandons it; an abandoned phrase loses its
    progress (the hypothesis drops back to a lower bank) and the tail just generated is re-checked, so that e.g.
    ``New Jersey`` still starts (here: completes) the constraint ``New Jersey`` after ``New`` was taken as the start of
    ``New York``. A met phrase's tokens are not reused for another phrase.

    Args:
        phrases: the constraint phrases as token-id tuples.
    """

    __slots__ = ("phrases", "met", "active", "progress", "met_tokens")

    def __init__(self, phrases: Sequence[Phrase], met: tuple[bool, ...] | None = None, active: int = -1,
                 progress: int = 0):
        self.phrases = tuple(tuple(p) for p in phrases)
        self.met = tuple(met) if met is not None else (False,) * len(self.phrases)
        self.active = active
        self.progress = progress
        self.met_tokens = sum(len(p) for p, m in zip(self.phrases, self.met) if m) + progress

    @property
    def num_tokens(self) -> int:
        """Total number of constraint tokens ``C`` (there are ``C + 1`` banks)."""
        return sum(len(p) for p in self.phrases)

    @property
    def all_met(self) -> bool:
        return all(self.met)

    def allowed(self) -> tuple[int, ...]:
        """Constraint tokens this hypothesis may be extended with: the next token of the phrase in progress, else the
        first token of every unmet phrase (the paper's candidate set (b))."""
        if self.active >= 0:
            return (self.phrases[self.active][self.progress],)
        return tuple(dict.fromkeys(p[0] for p, m in zip(self.phrases, self.met) if not m))

    def advance(self, token: int) -> "ConstraintState":
        """The state after appending ``token``."""
        if self.all_met:
            return self
        tail = (self.phrases[self.active][:self.progress] if self.active >= 0 else ()) + (int(token),)
        order = ([self.active] if self.active >= 0 else []) + [i for i in range(len(self.phrases)) if i != self.active]
        for length in range(len(tail), 0, -1):  # longest suffix of the tail that starts an unmet phrase
            suffix = tail[-length:]
            for i in order:
                p = self.phrases[i]
                if not self.met[i] and len(p) >= length and p[:length] == suffix:
                    if length == len(p):
                        met = tuple(m or j == i for j, m in enumerate(self.met))
                        return ConstraintState(self.phrases, met)
                    return ConstraintState(self.phrases, self.met, i, length)
        if self.active < 0:
            return self
        return ConstraintState(self.phrases, self.met)  # abandoned phrase: progress resets

    def __repr__(self) -> str:
        return (f"ConstraintState(met={list(self.met)}, active={self.active}, progress={self.progress}, "
                f"met_tokens={self.met_tokens})")


def constraint_state_of(phrases: Sequence[Sequence[int]], tokens: Sequence[int]) -> ConstraintState:
    """Bookkeeping state after generating ``tokens`` from scratch (convenience for tests and analysis)."""
    state = ConstraintState([tuple(p) for p in phrases])
    for t in tokens:
        state = state.advance(int(t))
    return state


def allocate_banks(counts: Sequence[int], beam_size: int) -> list[int]:
    """Dynamic beam allocation: how many beam slots each bank gets.

    Bank ``c`` holds hypotheses that met ``c`` constraint tokens (``len(counts) = C + 1`` banks). Each bank first gets
    ``beam_size // (C + 1)`` slots and the remainder goes to the top bank ``C``; then, from the top bank down, slots a
    bank cannot fill (fewer candidates than slots) move to the bank below, and what bank 0 cannot use goes to the
    highest banks that still have unplaced candidates. The result never exceeds ``counts`` and sums to
    ``min(beam_size, sum(counts))``.

    Args:
        counts: number of candidates in each bank.
        beam_size: the beam size ``k``.
    """
    if beam_size < 1:
        raise ValueError(f"beam_size must be >= 1, got {beam_size}")
    n = len(counts)
    if n == 0:
        raise ValueError("need at least one bank")
    if any(c < 0 for c in counts):
        raise ValueError(f"counts must be non-negative, got {list(counts)}")
    alloc = [beam_size // n] * n
    alloc[-1] += beam_size - sum(alloc)
    spare = 0
    for b in range(n - 1, -1, -1):
        alloc[b] += spare
        spare = max(0, alloc[b] - counts[b])
        alloc[b] -= spare
    for b in range(n - 1, -1, -1):
        if spare == 0:
            break
        take = min(spare, counts[b] - alloc[b])
        alloc[b] += take
        spare -= take
    return alloc


def _select(cands: list[tuple], banks: int, beam_size: int) -> list[int]:
    """Indices (into ``cands``, sorted best first) chosen by bank allocation; ``cands`` items have the bank at [3]."""
    counts = [0] * banks
    for c in cands:
        counts[c[3]] += 1
    alloc = allocate_banks(counts, beam_size)
    chosen = []
    for i, c in enumerate(cands):
        if alloc[c[3]] > 0:
            alloc[c[3]] -= 1
            chosen.append(i)
    return chosen


def _is_phrase(x) -> bool:
    return isinstance(x, str) or (isinstance(x, (list, tuple)) and len(x) > 0
                                  and all(isinstance(t, int) and not isinstance(t, bool) for t in x))


def _is_row(x) -> bool:
    """One batch row's constraints: a (possibly empty) list of phrases, none of which is a bare token id."""
    return isinstance(x, (list, tuple)) and all(not isinstance(p, int) and _is_phrase(p) for p in x)


# ----------------------------------------------------------------------------------------------- decoding loop
class DynamicBeamAllocation(DecodingLoop):
    r"""Lexically constrained beam search with Dynamic Beam Allocation (DBA).

    From "Fast Lexically Constrained Decoding with Dynamic Beam Allocation for Neural Machine Translation" (Post &
    Vilar, NAACL 2018, arXiv 1804.06609). Every returned hypothesis must contain every constraint phrase, as a
    contiguous run of tokens of the generated part. At each step, for every batch row, the candidates are

    (a) the best ``2k`` (``k`` = beam size; more with several eos ids) continuations over the whole beam, as in
        ``generate()``'s beam search,
    (b) every hypothesis extended with each of its allowed constraint tokens (the next token of the phrase it is in
        the middle of, else the first token of each unmet phrase), and
    (c) every hypothesis extended with its own single best token.

    Candidates are grouped into ``C + 1`` *banks* by the number of constraint tokens they have met (``C`` = total
    constraint tokens of the row). The beam is split evenly across the banks (remainder to the top bank) and slots a
    bank cannot fill are handed down (:func:`allocate_banks`); each bank keeps its best-scoring candidates. Scores are
    plain accumulated log-probabilities. Phrases are tracked token by token (:class:`ConstraintState`): abandoning a
    partially generated phrase resets its progress. End of sequence is only allowed once all constraints are met.
    The improved, vectorised variant of Hu et al. ("Improved Lexically Constrained Decoding for Translation and
    Monolingual Rewriting", NAACL 2019) keeps the same candidate sets and banks in tensors; this implementation keeps
    the per-hypothesis bookkeeping in Python, which costs little next to a forward pass for small beams.

    Finished hypotheses are handled as in ``generate(num_beams=k)``: a candidate that ends (eos, ``max_new_tokens``
    or another stopping criterion) and wins a slot in the bank allocation over all candidates moves to a pool of the
    ``k`` best finished hypotheses (score divided by ``generated_length ** length_penalty``), the running beam keeps
    ``k`` unfinished hypotheses, and ``early_stopping`` has ``generate()``'s meaning. With no constraints (one bank)
    the search is token-identical to ``model.generate(num_beams=k, do_sample=False)``. The pool ranks hypotheses by
    number of met constraint tokens first, then by score, so a hypothesis cut by ``max_new_tokens`` before meeting
    its constraints is only returned when nothing better exists (a warning says so; ``return_dict_in_generate=True``
    outputs carry a ``constraints_met`` boolean per returned sequence).

    The caller's logits processors act on every beam's log-probabilities; processors with per-row state follow the
    beams as they are reordered (:func:`hf_decoding_ext.core.lifecycle.select_rows`), and a processor that declares
    per-row state without that lifecycle is refused with a ``ValueError``.

    Deviations from the paper:
        - Finished hypotheses leave the beam for a pool (``generate()``'s convention) instead of occupying beam slots
          until the end, so that the unconstrained case equals Hugging Face beam search; candidate set (a) is the top
          ``max(2, 1 + number of eos ids) * k`` (``generate()``'s size) instead of the top ``k``.
        - After an abandoned phrase, the longest suffix of the abandoned prefix plus the new token that starts an
          unmet phrase is kept (the paper resets to nothing); this only finds more true matches.
        - Slots that bank 0 cannot use go to the highest banks with spare candidates instead of being left empty.
        - Constraint phrases given as strings are tokenised with a leading space by default (``prefix_space=True``),
          since they are usually generated mid-sentence by a BPE model; pass token ids for full control.

    Args:
        constraints: the phrases that every output must contain: a list of strings (tokenised with ``tokenizer``)
            and/or token-id lists, shared by all batch rows; or one such list per batch row (a list of lists); a
            single string is one phrase. ``None`` or ``[]``: no constraints (plain beam search).
        num_beams: beam size used when ``generate()`` is called with its default ``num_beams=1`` (e.g. from the CLI);
            ``generate(num_beams=k)`` with ``k > 1`` takes precedence. Post & Vilar recommend a beam larger than the
            number of constraint tokens.
        tokenizer: needed when ``constraints`` holds strings.
        prefix_space: prepend a space to string phrases that do not start with one before tokenising.

    Example:
        >>> from hf_decoding_ext.core.models import load_model, encode_prompts
        >>> from hf_decoding_ext.structured.lexical_dba import DynamicBeamAllocation
        >>> model, tokenizer = load_model()  # doctest: +SKIP
        >>> dba = DynamicBeamAllocation.for_model(model, tokenizer,
        ...                                       constraints=["umbrella", "Tuesday"])  # doctest: +SKIP
        >>> inputs = encode_prompts(tokenizer, "Write one sentence about the weather.")  # doctest: +SKIP
        >>> out = model.generate(**inputs, custom_generate=dba, num_beams=4, do_sample=False,
        ...                      max_new_tokens=40)  # doctest: +SKIP
        >>> DynamicBeamAllocation([[5, 6], [7]]).phrases  # shared token-id phrases
        [[(5, 6), (7,)]]
    """

    supports_batch = True
    supports_beams = True
    supports_sampling = False

    def __init__(self, constraints=None, num_beams: int = 4, tokenizer=None, prefix_space: bool = True):
        if not isinstance(num_beams, int) or isinstance(num_beams, bool) or num_beams < 1:
            raise ValueError(f"num_beams must be an integer >= 1, got {num_beams!r}")
        self.num_beams = num_beams
        self.prefix_space = bool(prefix_space)
        self._tokenizer = tokenizer
        self.per_row = False
        if constraints is None:
            constraints = []
        if isinstance(constraints, str):
            constraints = [constraints]
        if not isinstance(constraints, (list, tuple)):
            raise ValueError(f"constraints must be a list of phrases (strings or token-id lists) or one such list per "
                             f"batch row, got {type(constraints).__name__}")
        if all(_is_phrase(p) for p in constraints):
            rows = [constraints]
        elif all(_is_row(r) for r in constraints):
            rows = list(constraints)
            self.per_row = True
        else:
            raise ValueError("constraints must be a list of phrases (non-empty strings or non-empty lists of token "
                             "ids), or one such list per batch row; got " + repr(constraints)[:200])
        self.phrases: list[list[Phrase]] = [[self._encode(p) for p in row] for row in rows]

    @classmethod
    def for_model(cls, model=None, tokenizer=None, constraints=None, num_beams: int = 4, prefix_space: bool = True):
        """Build the loop for ``model``/``tokenizer`` (string constraints are tokenised with ``tokenizer``)."""
        return cls(constraints=constraints, num_beams=num_beams, tokenizer=tokenizer, prefix_space=prefix_space)

    def _encode(self, phrase) -> Phrase:
        if isinstance(phrase, str):
            if not phrase.strip():
                raise ValueError("constraint phrases must be non-empty")
            if self._tokenizer is None:
                raise ValueError(f"constraint {phrase!r} is a string: pass tokenizer= (or use for_model) or give "
                                 "token ids")
            text = phrase if (phrase.startswith(" ") or not self.prefix_space) else " " + phrase
            ids = self._tokenizer(text, add_special_tokens=False)["input_ids"]
            if not ids:
                raise ValueError(f"constraint {phrase!r} tokenises to nothing")
            return tuple(int(i) for i in ids)
        if any(t < 0 for t in phrase):
            raise ValueError(f"token ids must be non-negative, got {list(phrase)}")
        return tuple(int(t) for t in phrase)

    def _row_phrases(self, batch: int) -> list[list[Phrase]]:
        if not self.per_row:
            return [self.phrases[0]] * batch
        if len(self.phrases) != batch:
            raise ValueError(f"per-row constraints were given for {len(self.phrases)} rows but the batch has {batch}")
        return self.phrases

    # --------------------------------------------------------------------------------------------- search
    @torch.no_grad()
    def run(self, state: GenerationState):
        gc = state.generation_config
        if state.streamer is not None:
            raise ValueError("DynamicBeamAllocation is a beam search and cannot stream; drop streamer=")
        gen_beams = int(gc.num_beams or 1)
        k = gen_beams if gen_beams > 1 else self.num_beams
        nrs = int(gc.num_return_sequences or 1)
        if nrs > k:
            raise ValueError(f"num_return_sequences ({nrs}) must be <= the beam size ({k})")
        length_penalty = 1.0 if gc.length_penalty is None else float(gc.length_penalty)
        early_stopping = False if gc.early_stopping is None else gc.early_stopping
        rows = state.input_ids.shape[0]
        expand = max(gen_beams, nrs)
        if rows % expand:
            raise RuntimeError(f"unexpected input of {rows} rows for an expansion of {expand}")
        batch = rows // expand
        row_phrases = self._row_phrases(batch)
        device = state.device
        eos = gc._eos_token_tensor
        eos_ids = [] if eos is None else [int(e) for e in eos.reshape(-1).tolist()]
        for phrases in row_phrases:
            for p in phrases:
                if set(p) & set(eos_ids):
                    raise ValueError(f"constraint {list(p)} contains an end-of-sequence token {eos_ids}")
        lifecycle.require_lifecycle(state.logits_processor, type(self).__name__)  # beams are reordered
        if expand != k:  # re-expand the prompt rows to the beam size
            idx = (torch.arange(batch, device=device) * expand).repeat_interleave(k)
            lifecycle.select_rows(state.logits_processor, idx, caller=type(self).__name__)
            state.input_ids = state.input_ids[idx]
            state.attention_mask = state.attention_mask[idx]
            if state.cache.get_seq_length() > 0:
                state.cache.batch_select_indices(idx)
        pad = gc._pad_token_tensor
        if eos is None:
            fill = -1
        else:
            fill = int(pad) if (pad is not None and bool(pad)) else eos_ids[0]  # generate()'s filler for beams
        prompt_len = state.prompt_length
        max_length = gc.max_length
        beams_to_keep = max(2, 1 + len(eos_ids)) * k
        banks = [sum(len(p) for p in phrases) + 1 for phrases in row_phrases]

        hyps: list[list[ConstraintState | None]] = [
            [ConstraintState(phrases)] + [None] * (k - 1) for phrases in row_phrases]
        run_scores = torch.full((batch, k), -math.inf, dtype=torch.float32, device=device)
        run_scores[:, 0] = 0.0
        pools: list[list[tuple]] = [[] for _ in range(batch)]  # (met_tokens, norm_score, seq, all_met)
        improvable = [True] * batch
        eos_t = torch.tensor(eos_ids, dtype=torch.long, device=device)
        vocab_checked = False
        cur_len = state.input_ids.shape[1]

        while True:
            out = state.forward()
            logits = out.logits[:, -1, :]
            vocab = logits.shape[-1]
            if not vocab_checked:
                bad = [t for phrases in row_phrases for p in phrases for t in p if t >= vocab]
                if bad:
                    raise ValueError(f"constraint token ids {sorted(set(bad))} are outside the vocabulary ({vocab})")
                vocab_checked = True
            log_probs = torch.log_softmax(logits, dim=-1)
            log_probs = state.process(log_probs)
            flat_hyps = [h for row in hyps for h in row]
            if eos_ids:
                blocked = [i for i, h in enumerate(flat_hyps) if h is not None and not h.all_met]
                if blocked:
                    b_idx = torch.tensor(blocked, dtype=torch.long, device=device)
                    log_probs[b_idx[:, None], eos_t[None, :]] = -math.inf
            state.record(scores=log_probs.clone(), logits=logits.clone())
            total = log_probs + run_scores.reshape(-1, 1)
            top_v, top_i = total.reshape(batch, -1).topk(min(beams_to_keep, k * vocab), dim=1)
            best_v, best_i = total.max(dim=-1)
            # constraint-token candidates (b)
            con_src, con_tok = [], []
            for i, h in enumerate(flat_hyps):
                if h is not None:
                    for t in h.allowed():
                        con_src.append(i)
                        con_tok.append(t)
            con_v = (total[torch.tensor(con_src, dtype=torch.long, device=device),
                           torch.tensor(con_tok, dtype=torch.long, device=device)].tolist() if con_src else [])
            top_v, top_i, best_v, best_i = top_v.tolist(), top_i.tolist(), best_v.tolist(), best_i.tolist()

            # candidates per row: (score, beam, token, bank, new_state)
            row_cands: list[list[tuple]] = [[] for _ in range(batch)]
            seen: list[set] = [set() for _ in range(batch)]

            def add(b: int, j: int, tok: int, score: float):
                h = hyps[b][j]
                if h is None or not score > -math.inf or (j, tok) in seen[b]:
                    return
                seen[b].add((j, tok))
                new = h.advance(tok)
                row_cands[b].append((score, j, tok, new.met_tokens, new))

            for b in range(batch):
                for v, i in zip(top_v[b], top_i[b]):
                    add(b, i // vocab, i % vocab, v)
                for j in range(k):
                    add(b, j, best_i[b * k + j], best_v[b * k + j])
            for src, tok, v in zip(con_src, con_tok, con_v):
                add(src // k, src % k, tok, v)

            # which candidates end here (eos, max length, custom criteria), as generate() asks on the candidates
            flat_cands = [(b, c) for b in range(batch) for c in row_cands[b]]
            if not flat_cands:
                break
            src = torch.tensor([b * k + c[1] for b, c in flat_cands], dtype=torch.long, device=device)
            toks = torch.tensor([c[2] for _, c in flat_cands], dtype=state.input_ids.dtype, device=device)
            cand_seqs = torch.cat([state.input_ids[src], toks[:, None]], dim=1)
            ends = state.stopping_criteria(cand_seqs, tuple(state.scores) if state.scores else None).tolist()
            gen_len = cur_len + 1 - prompt_len
            norm = (torch.tensor([c[0] for _, c in flat_cands], dtype=torch.float32, device=device)
                    / (gen_len ** length_penalty)).tolist()
            info: list[list[tuple]] = [[] for _ in range(batch)]  # (score, j, tok, bank, state, end, norm, flat)
            for n, (b, c) in enumerate(flat_cands):
                info[b].append(c + (bool(ends[n]), norm[n], n))

            new_src, new_tok, new_scores, new_hyps = [], [], [], []
            for b in range(batch):
                cands = sorted(info[b], key=lambda c: -c[0])  # stable: generate()'s top-k order on ties
                # finished candidates that win a slot in the allocation over all candidates join the pool
                pool_full = len(pools[b]) >= k
                if improvable[b] and not (pool_full and early_stopping is True):
                    for i in _select(cands, banks[b], k):
                        c = cands[i]
                        if c[5]:
                            pools[b].append((c[4].met_tokens, c[6], cand_seqs[c[7]], c[4].all_met))
                    pools[b].sort(key=lambda e: (-e[0], -e[1]))
                    del pools[b][k:]
                running = [c for c in cands if not c[5]]  # the running beam: allocation over unfinished ones
                running = [running[i] for i in _select(running, banks[b], k)] if running else []
                for c in running:
                    new_src.append(b * k + c[1])
                    new_tok.append(c[2])
                    new_scores.append(c[0])
                    new_hyps.append(c[4])
                for _ in range(k - len(running)):  # too few candidates: inactive filler beams
                    new_src.append(b * k)
                    new_tok.append(fill if fill >= 0 else 0)
                    new_scores.append(-math.inf)
                    new_hyps.append(None)

            beam_idx = torch.tensor(new_src, dtype=torch.long, device=device)
            lifecycle.select_rows(state.logits_processor, beam_idx, caller=type(self).__name__)  # processors follow
            tok_t = torch.tensor(new_tok, dtype=state.input_ids.dtype, device=device)
            state.input_ids = torch.cat([state.input_ids[beam_idx], tok_t[:, None]], dim=1)
            state.attention_mask = torch.cat([state.attention_mask[beam_idx],
                                              state.attention_mask.new_ones((beam_idx.shape[0], 1))], dim=1)
            state.cache.reorder_cache(beam_idx)
            run_scores = torch.tensor(new_scores, dtype=torch.float32, device=device).reshape(batch, k)
            hyps = [new_hyps[b * k:(b + 1) * k] for b in range(batch)]
            cur_len += 1

            # generate()'s stopping heuristic: can a running beam still beat the worst finished one?
            if early_stopping == "never" and length_penalty > 0.0:
                best_len = max_length - prompt_len
            else:
                best_len = cur_len - prompt_len
            best_possible = (run_scores[:, 0] / (best_len ** length_penalty)).tolist()
            for b in range(batch):
                if len(pools[b]) >= k:
                    worst = min(e[1] for e in pools[b])
                    improvable[b] = improvable[b] and best_possible[b] > worst
            all_full = all(len(p) >= k for p in pools)
            if not any(improvable) or (all_full and early_stopping is True) or all(ends) \
                    or all(h is None for row in hyps for h in row):
                break

        return self._outputs(state, pools, hyps, run_scores, nrs, prompt_len, fill, cur_len, length_penalty)

    def _outputs(self, state, pools, hyps, run_scores, nrs, prompt_len, fill, cur_len, length_penalty):
        batch, k = run_scores.shape
        chosen: list[tuple] = []
        for b in range(batch):
            picks = list(pools[b][:nrs])
            if len(picks) < nrs:  # not enough finished hypotheses: take the best running ones
                gen = max(cur_len - prompt_len, 1)
                extra = [(h.met_tokens, float(run_scores[b, j]) / gen ** length_penalty,
                          state.input_ids[b * k + j], h.all_met) for j, h in enumerate(hyps[b]) if h is not None]
                extra.sort(key=lambda e: (-e[0], -e[1]))
                picks += extra[:nrs - len(picks)]
            chosen.extend(picks)
        out_len = max(len(e[2]) for e in chosen)
        seqs = torch.full((len(chosen), out_len), fill, dtype=state.input_ids.dtype, device=state.device)
        for i, e in enumerate(chosen):
            seqs[i, :len(e[2])] = e[2]
        met = torch.tensor([bool(e[3]) for e in chosen], dtype=torch.bool, device=state.device)
        if not bool(met.all()):
            warnings.warn("DynamicBeamAllocation: some returned hypotheses do not contain every constraint "
                          "(max_new_tokens reached first); increase max_new_tokens or num_beams", stacklevel=2)
        state.input_ids = seqs
        extra: dict[str, Any] = {"constraints_met": met}
        if state.scores is not None:
            extra["sequences_scores"] = torch.tensor([e[1] for e in chosen], dtype=torch.float32, device=state.device)
        return extra
