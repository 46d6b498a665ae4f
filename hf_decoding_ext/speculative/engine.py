"""The speculative-decoding verification engine (``custom_generate`` loop).

One engine serves every accelerator: a drafter proposes a chain or token tree (plus optional side nodes), the target
model verifies everything in **one** forward over the uncached committed tokens and the tree with a 4D tree mask and
explicit position ids, an acceptance rule picks the accepted path and a bonus token, and the KV cache is compacted to
the accepted path (no accepted token is run twice).
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch

from hf_decoding_ext.core import lifecycle
from hf_decoding_ext.core.loop import DecodingLoop, GenerationState
from hf_decoding_ext.core.kernels import KernelPlan, fast_kernels, small_batch_linear as _small_batch_linear
from hf_decoding_ext.speculative.acceptance import ACCEPTANCE_RULES, AcceptanceRule, get_acceptance_rule
from hf_decoding_ext.speculative.drafters.base import Draft, Drafter, VerifyResult, check_needs
from hf_decoding_ext.core.anatomy import OutputCapture, final_norm
from hf_decoding_ext.core.kv import check_compactable, keep_positions
from hf_decoding_ext.core.tree import DraftTree, VerifyBlock, build_verify_inputs


class _NodeScores:
    """``scores_at(node)`` of the acceptance rules: the caller's processors applied at the root (``-1``) and at tree
    nodes, lazily and once per node, with the node's path appended to ``input_ids``.

    Stateful processors (:mod:`hf_decoding_ext.core.lifecycle`) score each node on a fork of their state after the
    node's parent, so each node sees exactly the state of its own path, and are told the position of the node in the
    verification forward (``locate``: the root is the last committed token, node ``i`` the ``i``-th block token).
    :meth:`commit` makes the caller's processors adopt the state after the last accepted node: drafted and rejected
    tokens never enter it.
    """

    def __init__(self, state: GenerationState, tree: DraftTree, scores: torch.Tensor, n_block: int):
        self.state, self.tree, self.scores, self.n_block = state, tree, scores, n_block
        self.processors = state.logits_processor
        self.stateful = lifecycle.has_stateful(self.processors)
        self.memo: dict[int, tuple[torch.Tensor, object]] = {}

    def _processors_after(self, node: int):
        """A fork of the processors as they are after scoring ``node``'s parent (``node == -1``: the state's)."""
        if node < 0:
            return lifecycle.fork(self.processors)
        parent = int(self.tree.parents[node])
        self(parent)
        return lifecycle.fork(self.memo[parent][1])

    def __call__(self, node: int) -> torch.Tensor:
        if len(self.processors) == 0:
            return self.scores[node + 1]
        if node not in self.memo:
            path = self.tree.path_to(node) if node >= 0 else []
            ids = self.state.input_ids
            if path:
                ids = torch.cat([ids, self.tree.tokens[path].to(ids.device)[None]], dim=1)
            procs = self.processors
            if self.stateful:
                procs = self._processors_after(node)
                position = torch.tensor([node - self.n_block], device=ids.device)  # from the end of the forward
                lifecycle.locate(procs, positions=position)
            self.memo[node] = (procs(ids, self.scores[node + 1][None].clone())[0], procs)
        return self.memo[node][0]

    def commit(self, node: int) -> None:
        """The caller's stateful processors take over the state after scoring ``node`` (the last accepted one)."""
        if self.stateful and node in self.memo:
            lifecycle.adopt(self.processors, self.memo[node][1])


def _hookable_norm(model):
    """The model's final norm, or ``None`` for an architecture without a recognisable one."""
    try:
        return final_norm(model)
    except ValueError:
        return None


def _chunked_top_k(model, features: torch.Tensor, k: int, chunk: int = 256) -> torch.Tensor:
    """Top-``k`` token ids ``(n, k)`` of the LM head's logits at ``features`` ``(n, hidden)``, ``chunk`` rows at a
    time (never a ``(n, vocab)`` tensor for a long prompt)."""
    head = model.get_output_embeddings()
    parts = [head(rows).float().topk(k, dim=-1).indices for rows in features.split(chunk)]
    return torch.cat(parts) if parts else torch.zeros(0, k, dtype=torch.long, device=features.device)


@dataclass
class StepStats:
    """Statistics of one engine step: tokens appended (accepted + bonus), draft and verify seconds, and the indices of
    the accepted tree nodes (in the drafter's node order; the acceptance statistics that size trees are counted from
    them, see :mod:`hf_decoding_ext.speculative.policies.tuning`)."""

    draft_size: int
    accepted: int
    appended: int
    draft_time: float
    verify_time: float
    total_time: float
    accepted_nodes: tuple[int, ...] = ()
    drafted_nodes: tuple[int, ...] | None = None
    """The drafter's node ids of the verified tree when it dropped some nodes of its layout (``Draft.info
    ["node_ids"]``, e.g. token recycling's nodes without a candidate yet); ``accepted_nodes`` are then ids too."""


class SpeculativeDecoding(DecodingLoop):
    """Speculative decoding with tree verification, for any drafter of this library.

    Use it as ``model.generate(..., custom_generate=SpeculativeDecoding(drafter))``. With ``do_sample=False`` and
    the default rule the output is token-identical to plain greedy ``generate()`` up to floating-point near-ties
    (fp32): the target verifies a block of tokens per forward, and by default with other CPU kernels
    (``kernels``), so its logits may differ from plain decoding's in the last bits, and where the top-2
    logits are that close the other token may win (``tests/test_speculative_lossless.py`` tallies these on the real
    model). With ``do_sample=True`` speculative sampling keeps the target distribution. The caller's logits
    processors (temperature, top-k/p,
    repetition penalty, ...) are applied at verification exactly as in plain decoding; eos, stopping criteria,
    streamers and ``max_new_tokens`` are honoured inside an accepted run.

    Args:
        drafter: a :class:`~hf_decoding_ext.speculative.drafters.base.Drafter`; ``None``: a
            :class:`~hf_decoding_ext.speculative.drafters.draft_model.DraftModelDrafter` over the model passed as
            ``generate(..., assistant_model=...)`` (assisted generation through this engine).
        acceptance: a name of :data:`~hf_decoding_ext.speculative.acceptance.ACCEPTANCE_RULES` (``"auto"``: greedy
            or speculative sampling following ``do_sample``; ``"greedy"``, ``"speculative"``, ``"typical"`` (lossy)
            and any registered rule) or an :class:`AcceptanceRule`. A lossless rule refuses (``ValueError``) a draft
            whose ``sibling_scheme`` it is not lossless for.
        max_draft_nodes: cap on tree nodes per step: the drafter's tree is cut to its first ``max_draft_nodes``
            nodes (a valid tree, parents come first) before verification (``None``: the drafter's own size).
        seed: seed of the acceptance rule's random draws: a ``torch.Generator`` on the model's device is created
            from it at the start of every ``generate()`` call (:meth:`generator_for`), so a seeded call is
            reproducible; ``None``: torch's global generator.
        kernels: the CPU linear kernels of the target (and the drafter's modules) while decoding, a ``plan`` of
            :func:`~hf_decoding_ext.core.kernels.fast_kernels`: ``"auto"`` (default: per layer shape and row count
            the fastest of PyTorch's layout, weight-left and oneDNN's prepacked linear, measured once per machine
            and cached), ``"lean"`` (the same choices holding one copy of the linear weights: for long inputs,
            where the prepacked copy's 0.5 GB matters), ``"pytorch"`` (PyTorch's kernels), another kernel name, or a
            :class:`~hf_decoding_ext.core.kernels.KernelPlan`. A kernel choice, not part of any method; no effect on
            GPU or in dtypes other than float32/bfloat16. Compare a method with greedy decoding under the same
            kernels (``hf_decoding_ext.fast_generate``) to see its own speed-up.
        small_batch_linear: legacy switch: ``False`` = ``kernels="pytorch"``; ``True`` = the former default, the
            weight-left layout for 2-32 rows (:func:`~hf_decoding_ext.core.kernels.small_batch_linear`);
            ``None`` (default): ``kernels`` decides.

    The drafter's :attr:`~hf_decoding_ext.speculative.drafters.base.Drafter.needs` (checked here) decide what the
    verification forward hands back to it. :meth:`verification_scores` is the hook that changes the distribution
    drafts are verified against (Speculative Contrastive Decoding overrides it).

    Per-step :class:`StepStats` of the last call are in ``self.last_stats`` (and in the output's ``spec_stats``
    with ``return_dict_in_generate=True``). Batch size 1 only (a clear error otherwise).

    Example:
        >>> from hf_decoding_ext.speculative import SpeculativeDecoding
        >>> from hf_decoding_ext.speculative.drafters.prompt_lookup import PromptLookupDrafter
        >>> out = model.generate(**inputs, max_new_tokens=64, do_sample=False,
        ...                      custom_generate=SpeculativeDecoding(PromptLookupDrafter()))  # doctest: +SKIP
    """

    supports_batch = False
    accepts_assistant_model = True
    prefill_above = 1024
    """Uncached committed tokens above which the prompt is prefilled on its own, through the causal path (see
    :meth:`verify`); up to it the prompt and the first tree share one forward, as in transformers' assisted
    generation (the same number of target forwards; the dense 4D mask then holds at most about 1025 x 1025
    entries, 4 MB in float32)."""
    prefill_chunk = 512
    """Tokens per forward of that prefill (the activations of one chunk at a time)."""
    supports_sliding_window = False  # tree masks and KV compaction assume full attention

    def __init__(self, drafter: Drafter | None = None, acceptance: str | AcceptanceRule = "auto",
                 max_draft_nodes: int | None = None, seed: int | None = None,
                 kernels: str | dict | KernelPlan = "auto", small_batch_linear: bool | None = None):
        if drafter is None:
            from hf_decoding_ext.speculative.drafters.draft_model import DraftModelDrafter

            drafter = DraftModelDrafter()
        if not isinstance(drafter, Drafter):
            raise ValueError(f"drafter must be a Drafter, got {type(drafter).__name__}")
        check_needs(drafter.needs, type(drafter).__name__)
        known = isinstance(acceptance, str) and acceptance in ACCEPTANCE_RULES
        if not (known or isinstance(acceptance, AcceptanceRule)):
            get_acceptance_rule(acceptance, do_sample=False)  # raises the table's error
        if max_draft_nodes is not None and (isinstance(max_draft_nodes, bool) or not isinstance(max_draft_nodes, int)
                                            or max_draft_nodes < 0):
            raise ValueError(f"max_draft_nodes must be an int >= 0 or None, got {max_draft_nodes!r}")
        self.drafter = drafter
        self.acceptance = acceptance
        self.max_draft_nodes = max_draft_nodes
        if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int)):
            raise ValueError(f"seed must be an int or None, got {seed!r}")
        self.seed = seed
        if small_batch_linear is not None and not isinstance(small_batch_linear, bool):
            raise ValueError(f"small_batch_linear must be a bool or None, got {small_batch_linear!r}")
        self.small_batch_linear = small_batch_linear
        KernelPlan.coerce(kernels)  # validates
        self.kernels = "pytorch" if small_batch_linear is False else kernels
        self.last_stats: list[StepStats] = []

    # ------------------------------------------------------------------------------------------------ hooks
    def verification_scores(self, state: GenerationState, draft: Draft, tree_logits: torch.Tensor) -> torch.Tensor:
        """The scores drafts are verified against, before the caller's logits processors.

        Override to change the verification target (e.g. a contrast with an amateur model, a reward-tilted
        distribution). The acceptance rule then sees ``processors(path, verification_scores(...)[node + 1])`` at
        each node, and ``output_scores`` records the same; ``output_logits`` keeps the target's raw logits.

        Args:
            state: the generation state (committed ``input_ids``, processors, ``do_sample``, ...).
            draft: the verified draft (its ``tree`` and the drafter's ``info``).
            tree_logits: ``(1 + n, vocab)`` float32 raw target logits at the root and at the ``n`` tree nodes.

        Returns:
            ``(1 + n, vocab)`` scores; the default returns ``tree_logits`` (plain speculative decoding).

        Example:
            >>> import torch
            >>> from hf_decoding_ext.speculative import SpeculativeDecoding
            >>> class NoToken7(SpeculativeDecoding):  # verify against the target with token 7 banned
            ...     def verification_scores(self, state, draft, tree_logits):
            ...         return tree_logits.index_fill(-1, torch.tensor([7]), float("-inf"))
            >>> out = model.generate(**inputs, do_sample=False,
            ...                      custom_generate=NoToken7(PromptLookupDrafter()))  # doctest: +SKIP
        """
        return tree_logits

    # ------------------------------------------------------------------------------------------------ helpers
    def generator_for(self, device: torch.device | str) -> torch.Generator | None:
        """The acceptance rule's random generator for a call on ``device`` (the model's): ``None`` without ``seed``
        (torch's global generator), else a fresh ``torch.Generator`` on that device seeded with ``seed`` (a CUDA
        model samples its verification distributions on CUDA, which needs a CUDA generator).

        Example:
            >>> from hf_decoding_ext.speculative import SpeculativeDecoding
            >>> from hf_decoding_ext.speculative.drafters.prompt_lookup import PromptLookupDrafter
            >>> SpeculativeDecoding(PromptLookupDrafter(), seed=0).generator_for("cpu").device
            device(type='cpu')
        """
        if self.seed is None:
            return None
        return torch.Generator(device=torch.device(device)).manual_seed(self.seed)

    def _processed_scores(self, state: GenerationState, tree: DraftTree, scores: torch.Tensor, n_block: int):
        """Lazy processed scores at the root (-1) and tree nodes, with the path appended to ``input_ids``
        (a :class:`_NodeScores`; ``n_block`` is the number of tree and side nodes of the verification forward)."""
        return _NodeScores(state, tree, scores, n_block)

    def _side_scores(self, state: GenerationState, draft: Draft, tree_logits: torch.Tensor,
                     side_logits: torch.Tensor | None, n_block: int):
        """``side_scores_at(node)`` for a rule with ``uses_side_scores``: the caller's processors applied (as at
        ``node`` itself: the node's path appended, stateful processors on a fork) to the side-node logits row the
        drafter aligned with ``node`` in :attr:`Draft.side_rows <hf_decoding_ext.speculative.drafters.base.Draft>`,
        ``None`` where it named no row (or the draft has no side rows)."""
        tree, rows = draft.tree, draft.side_rows
        if rows is None or side_logits is None:
            return lambda node: None
        rows = torch.as_tensor(rows, dtype=torch.long).reshape(-1)[: len(tree) + 1]
        have = rows >= 0
        aligned = tree_logits.clone()  # rows without a side row are never read
        aligned[: rows.shape[0]][have] = side_logits[rows[have].to(side_logits.device)]
        scores = _NodeScores(state, tree, aligned, n_block)
        return lambda node: scores(node) if node + 1 < rows.shape[0] and bool(have[node + 1]) else None

    def prefill(self, state: GenerationState, n_tokens: int, want: str | None):
        """Run the first ``n_tokens`` uncached committed tokens (the prompt but its last token, at the first step)
        through the model's normal causal path (a 2D padding mask, no tree mask), in chunks of
        :attr:`prefill_chunk` tokens (transformers' ``prefill_chunk_size``: the activations of one chunk at a time),
        and return the features the drafter needs at them: ``want="last"``: the final norm's output ``(n, hidden)``
        (captured by a hook, not every layer), ``"all"``: every layer's hidden states (a tuple), ``None``: nothing.
        No logits are kept but each chunk's last position's."""
        chunks = []
        for start in range(0, n_tokens, self.prefill_chunk):
            cache_len = state.cache.get_seq_length()
            stop = min(n_tokens - start, self.prefill_chunk)
            ids = state.input_ids[:, cache_len:cache_len + stop]
            mask = state.attention_mask[:, :cache_len + stop]
            pos = (mask.long().cumsum(-1) - 1).clamp(min=0)[:, cache_len:]
            with OutputCapture(_hookable_norm(state.model) if want == "last" else None) as hook:
                out = state.model(input_ids=ids, attention_mask=mask, position_ids=pos, past_key_values=state.cache,
                                  use_cache=True, logits_to_keep=1, return_dict=True,
                                  **({"output_hidden_states": True} if want == "all" else {}))
            if want == "last":
                chunks.append(None if hook.output is None else hook.output[0])
            elif want == "all":
                chunks.append(tuple(h[0] for h in out.hidden_states))
            del out
        if want == "last":
            return chunks[0] if len(chunks) == 1 else torch.cat(chunks)
        if want == "all":
            return chunks[0] if len(chunks) == 1 else tuple(torch.cat(parts) for parts in zip(*chunks))
        return None

    def verify(self, state: GenerationState, draft: Draft):
        """One target forward over the uncached committed tokens, the tree and side nodes.

        Returns ``(tree_logits, side_logits, committed_logits, committed_length, hidden, committed_top_k)``: float32
        raw logits at the root and tree nodes, at the side nodes (or ``None``), at the committed tokens before the
        root (empty unless the drafter needs ``"committed_logits"``), the committed length (the cache position of
        the first tree node), the features the drafter needs at the committed tokens and block nodes (``None``
        unless it needs hidden states; ``(last,)`` for ``"last_hidden_state"``, the embeddings and every layer's
        output for ``"all_hidden_states"``) and the top-k token ids at the committed tokens before the root for
        ``"committed_top_k"``.

        Memory: when more than :attr:`prefill_above` committed tokens are uncached (a long prompt, at the first
        step) and the drafter does not need full ``"committed_logits"``, all but the last of them are first run
        through the model's normal causal path (:meth:`prefill`): no dense prompt-by-prompt float mask, no logits at
        the prompt, features by a hook on the final norm, top-k ids computed from them in chunks. Shorter prompts
        go with the tree in one forward, as transformers' assisted generation does (one forward fewer).
        """
        needs = self.drafter.needs
        want = "all" if "all_hidden_states" in needs else "last" if needs & {"last_hidden_state",
                                                                            "committed_top_k"} else None
        norm = _hookable_norm(state.model) if want == "last" else None
        if want == "last" and norm is None:
            want = "all"  # no hookable final norm: the model's own hidden states (the last is the lm_head's input)
        cache_len = state.cache.get_seq_length()
        uncached = state.input_ids.shape[1] - cache_len
        pre_hidden = pre_top_k = None
        if uncached > self.prefill_above and "committed_logits" not in needs:
            pre_hidden = self.prefill(state, uncached - 1, want)
            state.stats["prefill_forwards"] = (state.stats.get("prefill_forwards", 0)
                                               + -(-(uncached - 1) // self.prefill_chunk))
            if "committed_top_k" in needs:
                features = pre_hidden[-1] if want == "all" else pre_hidden
                pre_top_k = _chunked_top_k(state.model, features, self.drafter.committed_k)
            cache_len = state.cache.get_seq_length()
        block = VerifyBlock.from_tree(draft.tree)
        n_side = 0 if draft.side_tokens is None else draft.side_tokens.numel()
        if n_side:
            block = block.extend(draft.side_tokens, draft.side_allowed[:, -n_side:], draft.side_depth)
            if draft.side_allowed.shape[1] == len(draft.tree) + n_side:  # side nodes that also see tree nodes
                block.allowed[-n_side:, : len(draft.tree)] = draft.side_allowed[:, : len(draft.tree)].bool().cpu()
        committed = state.input_ids[:, cache_len:]
        ids, mask, pos = build_verify_inputs(committed, state.attention_mask, cache_len, block,
                                             dtype=state.model.dtype)
        s = committed.shape[1]
        n_block = block.tokens.shape[0]
        keep = n_block + s if "committed_logits" in needs else n_block + 1
        inputs = {"input_ids": ids}
        if draft.side_embeds is not None and n_side:  # side nodes fed by their own input embeddings (PPD)
            embeds = state.model.get_input_embeddings()(ids)
            if draft.side_embeds.shape != (n_side, embeds.shape[-1]):
                raise ValueError(f"side_embeds must be (n_side, hidden) = {(n_side, embeds.shape[-1])}, got "
                                 f"{tuple(draft.side_embeds.shape)}")
            embeds[0, -n_side:] = draft.side_embeds.to(embeds.dtype)
            inputs = {"inputs_embeds": embeds}
        with OutputCapture(norm) as hook:
            out = state.model(**inputs, attention_mask=mask, position_ids=pos, past_key_values=state.cache,
                              use_cache=True, logits_to_keep=keep, return_dict=True,
                              **({"output_hidden_states": True} if want == "all" else {}))
        state.stats["forwards"] += 1
        if want == "all":
            hidden = tuple(h[0] for h in out.hidden_states)
            if pre_hidden is not None:
                hidden = tuple(torch.cat([a, b]) for a, b in zip(pre_hidden, hidden))
        elif want == "last":
            feats = None if hook.output is None else hook.output[0]
            hidden = (feats if pre_hidden is None else torch.cat([pre_hidden, feats]),)
        else:
            hidden = None
        logits = out.logits[0].float()  # (..., vocab): [committed before the root], root, block nodes
        committed_logits = logits[: keep - n_block - 1]
        logits = logits[keep - n_block - 1:]
        committed_top_k = None
        if "committed_top_k" in needs:  # from the features at the committed tokens before the root, in chunks
            here = _chunked_top_k(state.model, hidden[-1][: s - 1], self.drafter.committed_k)
            committed_top_k = here if pre_top_k is None else torch.cat([pre_top_k, here])
        n_tree = len(draft.tree)
        tree_logits = logits[: n_tree + 1]
        side_logits = logits[n_tree + 1:] if logits.shape[0] > n_tree + 1 else None
        return tree_logits, side_logits, committed_logits, cache_len + s, hidden, committed_top_k

    # ------------------------------------------------------------------------------------------------ loop
    def run(self, state: GenerationState):
        if state.assistant_model is not None and "assistant_model" not in self.drafter.needs:
            raise ValueError(f"{type(self.drafter).__name__} does not use an assistant model; drop assistant_model= "
                             "or use SpeculativeDecoding() / DraftModelDrafter()")
        check_compactable(state.cache)
        check_needs(self.drafter.needs, type(self.drafter).__name__)
        rule = get_acceptance_rule(self.acceptance, state.do_sample)
        lifecycle.require_lifecycle(state.logits_processor, type(self).__name__)  # scored at rejected tree nodes
        generator = self.generator_for(state.device)
        self.last_stats = []
        self.drafter.begin(state)
        modules = (state.model, *self.drafter.kernel_modules())
        kernel_context = (_small_batch_linear(*modules) if self.small_batch_linear
                          else fast_kernels(*modules, plan=self.kernels))
        with kernel_context:
            self._decode(state, rule, generator)
        state.truncate_cache()
        return {"spec_stats": self.last_stats} if state.return_dict else None

    def _decode(self, state: GenerationState, rule: AcceptanceRule, generator) -> None:
        while not state.done:
            self._step(state, rule, generator)

    def _step(self, state: GenerationState, rule: AcceptanceRule, generator) -> None:
        """One draft-verify-accept round: the drafter proposes, one target forward verifies, ``rule`` accepts, the
        accepted tokens and the bonus token are appended (loops built on the engine call it step by step)."""
        shares_cache = "target_cache" in self.drafter.needs
        t0 = time.perf_counter()
        cached = state.cache.get_seq_length() if shares_cache else 0
        draft = self.drafter.propose(state)
        if shares_cache:  # drop whatever the drafter appended to the target's cache
            keep_positions(state.cache, cached, torch.zeros(0, dtype=torch.long))
        if self.max_draft_nodes is not None and len(draft.tree) > self.max_draft_nodes:
            draft.tree = draft.tree.truncate(self.max_draft_nodes)
        tree = draft.tree
        rule.check_tree(tree)
        t1 = time.perf_counter()
        tree_logits, side_logits, committed_logits, committed_len, hidden, committed_top_k = self.verify(
            state, draft)
        n_block = len(tree) + (0 if side_logits is None else side_logits.shape[0])
        scores_at = self._processed_scores(state, tree, self.verification_scores(state, draft, tree_logits),
                                           n_block)
        if rule.uses_side_scores:  # a rule that also reads the drafter's side-node distributions
            accepted, bonus = rule.accept(tree, scores_at, generator, side_scores_at=self._side_scores(
                state, draft, tree_logits, side_logits, n_block))
        else:
            accepted, bonus = rule.accept(tree, scores_at, generator)
        scores_at.commit(accepted[-1] if accepted else -1)  # stateful processors follow the accepted path only
        keep_positions(state.cache, committed_len, torch.tensor(accepted, dtype=torch.long))
        tokens = [int(tree.tokens[i]) for i in accepted] + [bonus]
        t2 = time.perf_counter()
        needs = self.drafter.needs
        self.drafter.observe(state, VerifyResult(
            draft, tree_logits, side_logits, accepted, tokens, committed_logits,
            hidden[-1] if "last_hidden_state" in needs else None,
            hidden if "all_hidden_states" in needs else None, state.cache if shares_cache else None,
            committed_top_k))
        if state.scores is not None or state.logits is not None:
            for node in ([-1] + accepted)[: max(0, state.generation_config.max_length - state.input_ids.shape[1])]:
                state.record(scores_at(node)[None], tree_logits[node + 1][None])
        appended = state.append(torch.tensor([tokens], device=state.device))
        ids = draft.info.get("node_ids") if draft.info else None
        if ids is not None and len(ids) < len(tree):
            ids = None  # the engine cut the tree after the drafter named its nodes: indices are kept
        self.last_stats.append(StepStats(
            len(tree), len(accepted), appended, t1 - t0, t2 - t1, time.perf_counter() - t0,
            tuple(int(a) if ids is None else int(ids[a]) for a in accepted),
            None if ids is None else tuple(int(i) for i in ids[: len(tree)])))

    # ------------------------------------------------------------------------------------------------ summaries
    def summary(self) -> dict:
        """Aggregates of the last call: steps, tokens per target forward, mean accepted draft length, times."""
        st = self.last_stats
        if not st:
            return {}
        tokens = sum(s.appended for s in st)
        return {
            "steps": len(st),
            "tokens": tokens,
            "tokens_per_forward": tokens / len(st),
            "mean_accepted": sum(s.accepted for s in st) / len(st),
            "mean_draft_size": sum(s.draft_size for s in st) / len(st),
            "draft_time": sum(s.draft_time for s in st),
            "verify_time": sum(s.verify_time for s in st),
            "total_time": sum(s.total_time for s in st),
        }
