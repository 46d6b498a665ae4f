"""Draft-model chain drafter: a small causal LM sharing the target's tokenizer proposes the draft."""

from __future__ import annotations

import torch
from transformers import DynamicCache

from hf_decoding_ext.core import lifecycle
from hf_decoding_ext.core.tree import DraftTree
from hf_decoding_ext.speculative.drafters.base import Draft, Drafter, pick_draft_token
from hf_decoding_ext.speculative.policies.draft_length import SCHEDULES, DraftLengthPolicy, draft_length_policy


SELF_ASSISTANT_TOKENS = 3


class DraftModelDrafter(Drafter):
    """Chain drafts from a small model (speculative decoding as in Leviathan et al., arXiv 2211.17192).

    The draft model keeps its own KV cache, cropped back to the accepted prefix before each proposal, and drafts up
    to ``num_tokens`` tokens. Greedy generation drafts argmax tokens (deterministic, so greedy and sampling
    acceptance are both lossless) and, like transformers' assisted generation (``ConfidenceCriteria``, greedy or
    sampled), stops a draft early once the draft model's probability of its own token falls below
    ``confidence_threshold`` (a stop decided by the draft's own tokens only, so sampling stays lossless). With
    ``do_sample=True`` it samples
    from the draft model's distribution after the caller's logits processors and hands those distributions to the
    speculative-sampling rule. The processors run on a :func:`~hf_decoding_ext.core.lifecycle.fork` of the caller's
    (stateful processors such as Mirostat follow the draft on the copy; the caller's state only ever sees the
    tokens the engine accepts). A processor that reads the model's forward (kNN-LM) reads the latest forward of the
    model it hooks, which may be the target's last verification rather than the draft model: the draft is then
    built from an approximate distribution, which costs acceptance but not exactness.

    Args:
        assistant_model: the draft model; its vocabulary must match the target's. ``None``: the model passed as
            ``generate(..., assistant_model=...)``.
        num_tokens: maximum draft length (``None``: the assistant's ``generation_config.num_assistant_tokens``,
            transformers' default 20).
        confidence_threshold: stop drafting when the draft's top probability is below it (``None``: the
            assistant's ``generation_config.assistant_confidence_threshold``, transformers' default 0.4; 0
            disables).
        schedule: transformers' ``num_assistant_tokens_schedule``: ``"constant"``, ``"heuristic"`` (draft length +2
            after a fully accepted draft, -1 otherwise, carried over to the next ``generate()`` call) or
            ``"heuristic_transient"`` (the same, restarting every call); ``None``: the assistant's generation config
            (default ``"constant"``). The schedule and the threshold run as a
            :class:`~hf_decoding_ext.speculative.policies.draft_length.DraftLengthPolicy`, kept in
            ``self.length_policy`` (built at each ``generate()`` call; a ``"heuristic"`` policy with unchanged
            settings is kept, so its length carries over; ``reset()`` drops it).
        keep_logits: keep the draft model's raw float32 logits at the root and at every drafted node but the last
            in ``Draft.info["assistant_logits"]`` (``(n, vocab)``, row ``k`` = the distribution after tree node
            ``k - 1``, row 0 at the root, aligned with the engine's ``tree_logits``; an empty draft still gets the
            root row). Used by speculative contrastive decoding.
        extra_step: also run the draft model on the last drafted token (one more forward), so the kept logits
            cover every node, ``(n + 1, vocab)``; implies ``keep_logits``.

    Deviation: when scikit-learn is installed transformers also re-fits ``assistant_confidence_threshold`` online
    from an ROC curve; this drafter keeps the threshold fixed (equal to transformers without scikit-learn).

    Example:
        >>> from hf_decoding_ext.speculative import SpeculativeDecoding
        >>> from hf_decoding_ext.speculative.drafters.draft_model import DraftModelDrafter
        >>> loop = SpeculativeDecoding(DraftModelDrafter())
        >>> out = model.generate(**inputs, max_new_tokens=64, assistant_model=small_model,
        ...                      custom_generate=loop)  # doctest: +SKIP
    """

    needs = frozenset({"assistant_model"})

    def __init__(self, assistant_model=None, num_tokens: int | None = None,
                 confidence_threshold: float | None = None, schedule: str | None = None,
                 keep_logits: bool = False, extra_step: bool = False):
        if schedule not in (None, *SCHEDULES):
            raise ValueError(f"schedule must be None or one of {tuple(SCHEDULES)}, got {schedule!r}")
        self.schedule = schedule
        if num_tokens is not None and num_tokens < 1:
            raise ValueError(f"num_tokens must be >= 1, got {num_tokens}")
        if confidence_threshold is not None and not 0 <= confidence_threshold < 1:
            raise ValueError(f"confidence_threshold must be in [0, 1), got {confidence_threshold}")
        self.assistant_model = assistant_model
        self.num_tokens = num_tokens
        self.confidence_threshold = confidence_threshold
        self.keep_logits = bool(keep_logits) or bool(extra_step)
        self.extra_step = bool(extra_step)
        self.assistant = assistant_model
        self.length_policy: DraftLengthPolicy | None = None
        self._cache = None
        self._cached_ids: torch.Tensor | None = None

    @classmethod
    def for_model(cls, model=None, tokenizer=None, assistant: str = "distilled", num_tokens: int | None = None,
                  confidence_threshold: float | None = None, schedule: str | None = None) -> DraftModelDrafter:
        """Registry/CLI factory; ``assistant`` as in :meth:`load_assistant` (default: the shipped distilled draft)."""
        return cls(cls.load_assistant(model, assistant), num_tokens=num_tokens,
                   confidence_threshold=confidence_threshold, schedule=schedule)

    @staticmethod
    def load_assistant(model=None, assistant: str = "distilled"):
        """The draft model named by ``assistant``, for the target ``model``:

        - ``"distilled"`` (the default of every draft-model method) or ``"distilled:PATH"``: the Direct-Alignment
          draft (:mod:`~hf_decoding_ext.speculative.drafters.direct_alignment`, arXiv 2403.00858) shipped with the
          library for the default model (the target's first 4 layers distilled on its own responses; embeddings and
          head shared with the target), or one saved at ``PATH``;
        - ``"self:N"``: the target's first ``N`` layers with its final norm and LM head, untrained
          (:func:`~hf_decoding_ext.core.models.truncated_model`), a weak drafter kept as an option; its
          ``generation_config.num_assistant_tokens`` is set to :data:`SELF_ASSISTANT_TOKENS` (3): its confident but
          often wrong early-exit guesses make transformers' default of 20 draft tokens mostly wasted work;
        - any other string: a model name or path, loaded with :func:`~hf_decoding_ext.core.models.load_model` on the
          target's device and dtype.
        """
        from hf_decoding_ext.core.models import load_model, truncated_model

        if not isinstance(assistant, str) or not assistant:
            raise ValueError(f"assistant must be 'distilled', 'self:N' or a model name/path, got {assistant!r}")
        if assistant == "distilled" or assistant.startswith("distilled:"):
            from hf_decoding_ext.speculative.drafters.direct_alignment import load_shipped_draft

            if model is None:
                raise ValueError("assistant='distilled' needs the target model (it shares its embeddings and head)")
            path = assistant.split(":", 1)[1] if ":" in assistant else None
            return load_shipped_draft(model, path)
        if assistant.startswith("self:"):
            if model is None:
                raise ValueError("assistant='self:N' needs the target model")
            try:
                n = int(assistant.split(":", 1)[1])
            except ValueError:
                raise ValueError(f"assistant='self:N' needs an integer N, got {assistant!r}") from None
            draft = truncated_model(model, n)
            # an untrained early exit is a weak drafter: short drafts (transformers reads the same setting)
            draft.generation_config.num_assistant_tokens = SELF_ASSISTANT_TOKENS
            return draft
        draft, _ = load_model(assistant)
        if model is not None:
            draft = draft.to(device=model.device, dtype=model.dtype)
        return draft

    def kernel_modules(self) -> list:
        """The draft model runs under the same CPU kernel plan as the target (as transformers' assisted generation
        does under :func:`~hf_decoding_ext.plug.fast_generate`)."""
        return [self.assistant] if self.assistant is not None else []

    def begin(self, state) -> None:
        given = getattr(state, "assistant_model", None)
        if self.assistant_model is not None and given is not None and given is not self.assistant_model:
            raise ValueError("DraftModelDrafter got two different assistant models (its own and generate()'s)")
        self.assistant = self.assistant_model if self.assistant_model is not None else given
        if self.assistant is None:
            raise ValueError("DraftModelDrafter needs an assistant model: DraftModelDrafter(small_model) or "
                             "generate(..., assistant_model=small_model)")
        target_vocab = state.model.get_output_embeddings().weight.shape[0]
        draft_vocab = self.assistant.get_output_embeddings().weight.shape[0]
        if target_vocab != draft_vocab:
            raise ValueError(f"the draft model's vocabulary ({draft_vocab}) differs from the target's "
                             f"({target_vocab}); a draft model must share the target's tokenizer")
        cfg = getattr(self.assistant, "generation_config", None)
        num_tokens = self.num_tokens if self.num_tokens is not None else int(
            getattr(cfg, "num_assistant_tokens", None) or 20)
        threshold = self.confidence_threshold
        if threshold is None:
            threshold = getattr(cfg, "assistant_confidence_threshold", None)
        threshold = 0.4 if threshold is None else float(threshold)
        schedule = self.schedule or getattr(cfg, "num_assistant_tokens_schedule", None) or "constant"
        if schedule not in SCHEDULES:
            raise ValueError(f"unsupported num_assistant_tokens_schedule {schedule!r} (one of {tuple(SCHEDULES)})")
        policy = self.length_policy
        if policy is None or (policy.name, policy.num_tokens, policy.confidence_threshold) != (
                schedule, num_tokens, threshold):
            policy = draft_length_policy(schedule, num_tokens, threshold)
        policy.begin()  # "heuristic" keeps its length from the previous call, the others restart
        self.length_policy = policy
        self._cache = DynamicCache(config=self.assistant.config)
        self._cached_ids = state.input_ids.new_zeros((1, 0))

    def _sync(self, ids: torch.Tensor) -> None:
        """Crop the draft cache to the longest prefix it shares with ``ids``."""
        n = min(self._cached_ids.shape[1], ids.shape[1] - 1)
        same = (self._cached_ids[0, :n] == ids[0, :n]).long()
        common = int(same.cumprod(0).sum()) if n else 0
        extra = self._cache.get_seq_length() - common
        if extra > 0:
            self._cache.crop(-extra)
        self._cached_ids = ids[:, :common]

    def _step(self, cur_ids: torch.Tensor, cur_mask: torch.Tensor, keep: int = 1) -> torch.Tensor:
        """One draft-model forward over the uncached suffix of ``cur_ids``: raw float32 logits ``(keep, V)`` at its
        last ``keep`` positions (``keep=1``: the next-token logits ``(1, V)``; more: several tokens checked in one
        forward, as staged speculation does)."""
        device = self.assistant.device
        cached = self._cache.get_seq_length()
        new = cur_ids[:, cached:]
        pos = (cur_mask.long().cumsum(-1) - 1).clamp(min=0)[:, cached:]
        out = self.assistant(input_ids=new.to(device), attention_mask=cur_mask.to(device),
                             position_ids=pos.to(device), past_key_values=self._cache, use_cache=True,
                             logits_to_keep=keep, return_dict=True)
        return out.logits[0, -keep:].float().to(cur_ids.device)

    def propose(self, state) -> Draft:
        ids = state.input_ids
        mask = state.attention_mask
        self._sync(ids)
        tokens, probs, kept = [], [], []
        room = state.generation_config.max_length - ids.shape[1] - 1
        cur_ids, cur_mask = ids, mask
        processors = lifecycle.fork(state.logits_processor, caller=type(self).__name__)
        for _ in range(max(0, min(self.length_policy.length(), room))):
            logits = self._step(cur_ids, cur_mask)
            if self.keep_logits:
                kept.append(logits[0])
            scores = processors(cur_ids, logits)
            tok, p = pick_draft_token(scores, state.do_sample, probs)
            tokens.append(int(tok))
            cur_ids = torch.cat([cur_ids, tok[:, None]], dim=1)
            cur_mask = torch.cat([cur_mask, cur_mask.new_ones((1, 1))], dim=1)
            if self.length_policy.stop(float(p[0, tok])):  # greedy and sampled, as transformers' ConfidenceCriteria
                break
        if self.keep_logits and (self.extra_step or not tokens):
            kept.append(self._step(cur_ids, cur_mask)[0])  # after the last drafted token (or at the root)
        self._cached_ids = cur_ids[:, : self._cache.get_seq_length()]
        draft_probs = torch.stack(probs) if probs else None
        draft = Draft(DraftTree.chain(torch.tensor(tokens, dtype=torch.long), draft_probs,
                                      "deterministic" if draft_probs is None else "iid"))  # a sampled chain: i.i.d.
        if self.keep_logits:
            draft.info["assistant_logits"] = torch.stack(kept)
        return draft

    def scores_after(self, state, path: list[int]) -> torch.Tensor:
        """The draft model's processed next-token scores ``(vocab,)`` after the committed sequence plus ``path``
        (the caller's processors on a fresh fork; the draft cache is reused up to the common prefix)."""
        ids, mask = state.input_ids, state.attention_mask
        cur_ids = torch.cat([ids, ids.new_tensor([path])], dim=1) if path else ids
        cur_mask = torch.cat([mask, mask.new_ones((1, len(path)))], dim=1) if path else mask
        self._sync(cur_ids)
        processors = lifecycle.fork(state.logits_processor, caller=type(self).__name__)
        scores = processors(cur_ids, self._step(cur_ids, cur_mask))[0]
        self._cached_ids = cur_ids[:, : self._cache.get_seq_length()]
        return scores

    def observe(self, state, result) -> None:
        self.length_policy.update(len(result.draft.tree), len(result.accepted))

    def reset(self) -> None:
        self.length_policy = None


class DraftModelTreeDrafter(DraftModelDrafter):
    """A draft tree from the draft model with a fixed branching factor per depth: every node at depth ``d`` gets
    ``branching[d]`` children (the shape of Multi-Candidate Speculative Decoding and of Recursive Speculative
    Decoding's RSD-C). The shared base of :class:`~hf_decoding_ext.speculative.drafters.mcsd.MCSDDrafter` and
    :class:`~hf_decoding_ext.speculative.drafters.rsd.RSDDrafter`.

    With sampling the children of a node are drawn from the draft model's distribution there (after the caller's
    logits processors, on a fork per node), ``"iid"`` (independently, with replacement: repeated tokens are
    separate children) or ``"without_replacement"`` (Gumbel-top-k: distinct tokens, in sampling order); each child
    keeps that distribution in ``draft_probs`` for the speculative-sampling rule, which is lossless for both. Without
    sampling the children are the ``branching[d]`` most likely tokens (a deterministic tree for greedy acceptance).

    Args:
        assistant_model: the draft model (``None``: ``generate(..., assistant_model=...)``).
        branching: children per node at each depth, e.g. ``(2, 2, 1)`` (depth = its length).
        sibling_scheme: ``"iid"`` or ``"without_replacement"`` (sampling only).

    The tree is expanded one depth at a time: one draft-model forward per depth over all of that depth's nodes,
    with a 4D tree mask (each node sees the committed sequence, its ancestors and itself) on the draft's KV cache,
    which is cropped back to the committed sequence at the next proposal.
    """

    def __init__(self, assistant_model=None, branching=(2, 2, 1), sibling_scheme: str = "without_replacement"):
        branching = tuple(branching)
        if not branching or any(isinstance(b, bool) or not isinstance(b, int) or b < 1 for b in branching):
            raise ValueError(f"branching must be a non-empty sequence of positive integers, got {branching!r}")
        if sibling_scheme not in ("iid", "without_replacement"):
            raise ValueError(f"sibling_scheme must be 'iid' or 'without_replacement', got {sibling_scheme!r}")
        super().__init__(assistant_model, num_tokens=len(branching), confidence_threshold=0.0, schedule="constant")
        self.branching = branching
        self.sibling_scheme = sibling_scheme

    def _children(self, scores: torch.Tensor, k: int, do_sample: bool) -> tuple[list[int], torch.Tensor]:
        p = torch.softmax(scores.float(), dim=-1)
        if not do_sample:
            return torch.topk(p, min(k, p.numel())).indices.tolist(), p
        if self.sibling_scheme == "iid":
            return torch.multinomial(p, k, replacement=True).tolist(), p
        k = min(k, int((p > 0).sum()))
        u = torch.rand(p.shape).clamp_min_(torch.finfo(torch.float32).tiny)
        keys = torch.log(p) - torch.log(-torch.log(u))  # Gumbel-top-k: sampling without replacement, in order
        return torch.topk(keys, k).indices.tolist(), p

    def _level_logits(self, state, base: int, tokens: list[int], parents: list[int], depths: list[int],
                      start: int) -> torch.Tensor:
        """One draft-model forward over the tree nodes ``start:`` (one depth), with the committed sequence and the
        earlier nodes in the draft cache (``base`` committed positions): raw float32 logits ``(n_new, vocab)``.
        Each node attends to the committed prefix, its ancestors and itself (a 4D tree mask)."""
        from hf_decoding_ext.core.tree import additive_mask

        device = self.assistant.device
        mask2d = state.attention_mask
        n_prev, n_new = start, len(tokens) - start
        allowed = torch.zeros(n_new, base + n_prev + n_new, dtype=torch.bool)
        allowed[:, :base] = mask2d[0, :base].bool().cpu()[None]
        for i in range(n_new):
            allowed[i, base + n_prev + i] = True
            a = parents[start + i]
            while a >= 0:
                allowed[i, base + a] = True
                a = parents[a]
        last = int(mask2d.long().sum()) - 1
        pos = torch.tensor([[last + depths[start + i] for i in range(n_new)]], device=device)
        out = self.assistant(input_ids=torch.tensor([tokens[start:]], device=device),
                             attention_mask=additive_mask(allowed, self.assistant.dtype).to(device),
                             position_ids=pos, past_key_values=self._cache, use_cache=True, return_dict=True)
        return out.logits[0].float().to(state.input_ids.device)

    def propose(self, state) -> Draft:
        ids, mask = state.input_ids, state.attention_mask
        room = state.generation_config.max_length - ids.shape[1] - 1
        depth = max(0, min(len(self.branching), room))
        if depth == 0:
            return Draft(DraftTree.chain(torch.zeros(0, dtype=torch.long)))
        self._sync(ids)
        level_logits = self._step(ids, mask)  # (1, V) at the root; the whole committed sequence is now cached
        base = self._cache.get_seq_length()
        self._cached_ids = ids[:, :base]
        tokens, parents, depths, probs, paths = [], [], [], [], {-1: []}
        level = [-1]
        for d in range(depth):
            start = len(tokens)
            for node, logits in zip(level, level_logits):
                path = paths[node]
                cur = torch.cat([ids, ids.new_tensor([path])], dim=1) if path else ids
                processors = lifecycle.fork(state.logits_processor, caller=type(self).__name__)
                scores = processors(cur, logits[None])[0]
                kids, p = self._children(scores, self.branching[d], state.do_sample)
                for t in kids:
                    tokens.append(int(t))
                    parents.append(node)
                    depths.append(d + 1)
                    probs.append(p)
                    paths[len(tokens) - 1] = path + [int(t)]
            level = list(range(start, len(tokens)))
            if d + 1 < depth and level:
                level_logits = self._level_logits(state, base, tokens, parents, depths, start)
        if not tokens:
            return Draft(DraftTree.chain(torch.zeros(0, dtype=torch.long)))
        tok, par = torch.tensor(tokens, dtype=torch.long), torch.tensor(parents)
        if not state.do_sample:
            return Draft(DraftTree(tok, par))
        return Draft(DraftTree(tok, par, torch.stack(probs), self.sibling_scheme))

    def observe(self, state, result) -> None:
        pass
