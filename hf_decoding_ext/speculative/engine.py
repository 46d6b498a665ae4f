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

from hf_decoding_ext.core.loop import DecodingLoop, GenerationState
from hf_decoding_ext.core.kernels import small_batch_linear as _small_batch_linear
from hf_decoding_ext.speculative.acceptance import ACCEPTANCE_RULES, AcceptanceRule, get_acceptance_rule
from hf_decoding_ext.speculative.drafters.base import Draft, Drafter, VerifyResult, check_needs
from hf_decoding_ext.core.kv import check_compactable, keep_positions
from hf_decoding_ext.core.tree import DraftTree, VerifyBlock, build_verify_inputs


@dataclass
class StepStats:
    """Statistics of one engine step: tokens appended (accepted + bonus), draft and verify seconds."""

    draft_size: int
    accepted: int
    appended: int
    draft_time: float
    verify_time: float
    total_time: float


class SpeculativeDecoding(DecodingLoop):
    """Speculative decoding with tree verification, for any drafter of this library.

    Use it as ``model.generate(..., custom_generate=SpeculativeDecoding(drafter))``. With ``do_sample=False`` and
    the default rule the output is token-identical to plain greedy ``generate()`` (fp32); with ``do_sample=True``
    speculative sampling keeps the target distribution. The caller's logits processors (temperature, top-k/p,
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
        max_draft_nodes: cap on tree nodes per step (``None``: the drafter's own size).
        seed: seed of the acceptance rule's random draws (``None``: torch's global generator).
        small_batch_linear: run the target's (and the drafter's modules') float32 CPU linear layers with the
            weight-left kernel layout of :mod:`hf_decoding_ext.core.kernels` while decoding, which makes
            a verification forward over a few tokens cheaper than PyTorch's default on MKL CPUs (a kernel choice,
            not part of any method; no effect on GPU or in other dtypes). ``False`` keeps PyTorch's kernels.

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

    def __init__(self, drafter: Drafter | None = None, acceptance: str | AcceptanceRule = "auto",
                 max_draft_nodes: int | None = None, seed: int | None = None, small_batch_linear: bool = True):
        if drafter is None:
            from hf_decoding_ext.speculative.drafters.draft_model import DraftModelDrafter

            drafter = DraftModelDrafter()
        if not isinstance(drafter, Drafter):
            raise ValueError(f"drafter must be a Drafter, got {type(drafter).__name__}")
        check_needs(drafter.needs, type(drafter).__name__)
        known = isinstance(acceptance, str) and acceptance in ACCEPTANCE_RULES
        if not (known or isinstance(acceptance, AcceptanceRule)):
            get_acceptance_rule(acceptance, do_sample=False)  # raises the table's error
        if max_draft_nodes is not None and max_draft_nodes < 0:
            raise ValueError("max_draft_nodes must be >= 0")
        self.drafter = drafter
        self.acceptance = acceptance
        self.max_draft_nodes = max_draft_nodes
        self.seed = seed
        if not isinstance(small_batch_linear, bool):
            raise ValueError(f"small_batch_linear must be a bool, got {small_batch_linear!r}")
        self.small_batch_linear = small_batch_linear
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
    def _processed_scores(self, state: GenerationState, tree: DraftTree, scores: torch.Tensor):
        """Lazy processed scores at the root (-1) and tree nodes, with the path appended to ``input_ids``."""
        processors = state.logits_processor
        memo: dict[int, torch.Tensor] = {}
        if len(processors) == 0:
            return lambda node: scores[node + 1]

        def scores_at(node: int) -> torch.Tensor:
            if node not in memo:
                path = tree.path_to(node) if node >= 0 else []
                ids = state.input_ids
                if path:
                    ids = torch.cat([ids, tree.tokens[path].to(ids.device)[None]], dim=1)
                memo[node] = processors(ids, scores[node + 1][None].clone())[0]
            return memo[node]

        return scores_at

    def verify(self, state: GenerationState, draft: Draft):
        """One target forward over the uncached committed tokens, the tree and side nodes.

        Returns ``(tree_logits, side_logits, committed_logits, committed_length, hidden)``: float32 raw logits at the
        root and tree nodes, at the side nodes (or ``None``), at the committed tokens before the root (empty unless
        the drafter needs ``"committed_logits"``), the committed length (the cache position of the first tree node)
        and, when the drafter needs hidden states, the tuple of the embeddings and every layer's output at the
        committed tokens and block nodes (else ``None``).
        """
        block = VerifyBlock.from_tree(draft.tree)
        if draft.side_tokens is not None and draft.side_tokens.numel():
            block = block.extend(draft.side_tokens, draft.side_allowed, draft.side_depth)
        cache_len = state.cache.get_seq_length()
        committed = state.input_ids[:, cache_len:]
        ids, mask, pos = build_verify_inputs(committed, state.attention_mask, cache_len, block,
                                             dtype=state.model.dtype)
        s = committed.shape[1]
        n_block = block.tokens.shape[0]
        needs = self.drafter.needs
        keep = n_block + s if "committed_logits" in needs else n_block + 1
        want_hidden = bool(needs & {"last_hidden_state", "all_hidden_states"})
        out = state.model(input_ids=ids, attention_mask=mask, position_ids=pos, past_key_values=state.cache,
                          use_cache=True, logits_to_keep=keep, return_dict=True,
                          **({"output_hidden_states": True} if want_hidden else {}))
        state.stats["forwards"] += 1
        # embeddings then every layer's output (the last after the final norm: the lm_head's input) at the committed
        # tokens and block nodes
        hidden = tuple(h[0] for h in out.hidden_states) if want_hidden else None
        logits = out.logits[0].float()  # (..., vocab): [committed before the root], root, block nodes
        committed_logits = logits[: keep - n_block - 1]
        logits = logits[keep - n_block - 1:]
        n_tree = len(draft.tree)
        tree_logits = logits[: n_tree + 1]
        side_logits = logits[n_tree + 1:] if logits.shape[0] > n_tree + 1 else None
        return tree_logits, side_logits, committed_logits, cache_len + s, hidden

    # ------------------------------------------------------------------------------------------------ loop
    def run(self, state: GenerationState):
        if state.assistant_model is not None and "assistant_model" not in self.drafter.needs:
            raise ValueError(f"{type(self.drafter).__name__} does not use an assistant model; drop assistant_model= "
                             "or use SpeculativeDecoding() / DraftModelDrafter()")
        check_compactable(state.cache)
        check_needs(self.drafter.needs, type(self.drafter).__name__)
        rule = get_acceptance_rule(self.acceptance, state.do_sample)
        generator = None
        if self.seed is not None:
            generator = torch.Generator(device="cpu").manual_seed(self.seed)
        self.last_stats = []
        self.drafter.begin(state)
        with _small_batch_linear(state.model, *self.drafter.kernel_modules(), enabled=self.small_batch_linear):
            self._decode(state, rule, generator)
        state.truncate_cache()
        return {"spec_stats": self.last_stats} if state.return_dict else None

    def _decode(self, state: GenerationState, rule: AcceptanceRule, generator) -> None:
        shares_cache = "target_cache" in self.drafter.needs
        while not state.done:
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
            tree_logits, side_logits, committed_logits, committed_len, hidden = self.verify(state, draft)
            scores_at = self._processed_scores(state, tree, self.verification_scores(state, draft, tree_logits))
            accepted, bonus = rule.accept(tree, scores_at, generator)
            keep_positions(state.cache, committed_len, torch.tensor(accepted, dtype=torch.long))
            tokens = [int(tree.tokens[i]) for i in accepted] + [bonus]
            t2 = time.perf_counter()
            needs = self.drafter.needs
            self.drafter.observe(state, VerifyResult(
                draft, tree_logits, side_logits, accepted, tokens, committed_logits,
                hidden[-1] if "last_hidden_state" in needs else None,
                hidden if "all_hidden_states" in needs else None, state.cache if shares_cache else None))
            if state.scores is not None or state.logits is not None:
                for node in ([-1] + accepted)[: max(0, state.generation_config.max_length - state.input_ids.shape[1])]:
                    state.record(scores_at(node)[None], tree_logits[node + 1][None])
            appended = state.append(torch.tensor([tokens], device=state.device))
            self.last_stats.append(StepStats(len(tree), len(accepted), appended, t1 - t0, t2 - t1,
                                             time.perf_counter() - t0))

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
