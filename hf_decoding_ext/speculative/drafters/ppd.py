"""Parallel Prompt Decoding drafting: trained prompt tokens fed in every verification forward, a dynamic sparse tree
whose nodes carry prompt tokens, sized for the running device from its measured verify-cost curve."""

from __future__ import annotations

import functools

import torch

from hf_decoding_ext.core.tree import DraftTree, build_choice_tree, choices_from_accuracies, normalize_choices
from hf_decoding_ext.speculative.drafters.base import Draft, Drafter, VerifyResult
from hf_decoding_ext.speculative.drafters.feature_head import load_head
from hf_decoding_ext.speculative.heads.ppd import PromptTokens, fidelity_markdown
from hf_decoding_ext.speculative.policies.tree_policy import VerifyCostCurve

PAPER_GPU_TREE_LENGTH = 105
"""Input length (candidates + prompt tokens) of the official hardware-aware tree for Vicuna-7B on an A100
(``prompt/inference/dynamic_sparse_trees_3_vicuna_7b.py``, the paper's default)."""

FLAT_CURVE = VerifyCostCurve((1, 96), (1.0, 1.0), "flat: an accelerator-like verify cost (96 tokens cost one forward)")
"""An accelerator-like verify-cost curve: every forward up to 96 tokens costs the same (memory-bound decoding)."""

UNTRAINED_PRIOR = 0.6
"""Per-depth top-k accuracy prior ``UNTRAINED_PRIOR * 0.4**rank`` for prompt tokens without measured accuracies."""


def _end_probabilities(paths: list[tuple], values: list[float]) -> list[float]:
    """Probability that each node (root first, then ``paths``) is the last accepted node of the tree."""
    child_sum = [0.0] * (len(paths) + 1)
    index = {p: i + 1 for i, p in enumerate(paths)}
    for p, v in zip(paths, values):
        child_sum[index.get(p[:-1], 0)] += v
    own = [1.0] + list(values)
    return [max(0.0, o - c) for o, c in zip(own, child_sum)]


def expected_rate(paths, values, counts, curve: VerifyCostCurve, num_prompt_tokens: int) -> tuple[float, float, float]:
    """Expected tokens per step, expected verify cost per step and their ratio for a tree (``paths``, each path's
    acceptance probability ``values``) whose root and nodes carry ``counts`` prompt tokens (root first).

    A node carrying ``c`` prompt tokens, when it ends the accepted path, lets the next tree reach depth ``c`` only
    (the next tree is the part of this one of depth ``<= c``). The state ``c`` of the next step follows a Markov
    chain; its stationary distribution weighs each state's accepted tokens and cost (the paper's two-stage
    hardware-aware search solves the same chain, ``sparse_tree_builder.expected_accuracy``)."""
    m = num_prompt_tokens
    per_state = []
    for c in range(m + 1):
        keep = [i for i, p in enumerate(paths) if len(p) <= c]
        sub_paths = [paths[i] for i in keep]
        sub_values = [values[i] for i in keep]
        sub_counts = [counts[0]] + [counts[i + 1] for i in keep]
        ends = _end_probabilities(sub_paths, sub_values)
        trans = [0.0] * (m + 1)
        for e, k in zip(ends, sub_counts):
            trans[k] += e
        size = 1 + len(sub_paths) + sum(sub_counts)
        if size > curve.max_tokens:
            return 0.0, float("inf"), 0.0
        per_state.append((1.0 + sum(sub_values), curve(size), trans))
    pi = [0.0] * m + [1.0]
    for _ in range(60):
        new = [0.0] * (m + 1)
        for c, (_, _, trans) in enumerate(per_state):
            for k, t in enumerate(trans):
                new[k] += pi[c] * t
        total = sum(new) or 1.0
        pi = [x / total for x in new]
    tokens = sum(p * s[0] for p, s in zip(pi, per_state))
    cost = sum(p * s[1] for p, s in zip(pi, per_state))
    return tokens, cost, tokens / cost


def hardware_aware_tree(accuracies, curve: VerifyCostCurve, num_prompt_tokens: int, max_nodes: int | None = None):
    """The dynamic sparse tree with the highest expected tokens per unit of verification cost on ``curve``.

    Stage 1 (for each candidate count ``n``): the ``n`` best-first paths of the per-depth ``accuracies``
    (:func:`~hf_decoding_ext.core.tree.choices_from_accuracies`). Stage 2: every node starts with
    ``num_prompt_tokens`` prompt tokens; prompt tokens are removed one at a time from the node least likely to end
    the accepted path while the rate of :func:`expected_rate` improves (the official builder's pruning of special
    tokens by accuracy loss). The best ``(n, allocation)`` over ``n`` wins; a flat (accelerator-like) curve therefore
    picks a large tree and a steep (CPU) curve a small one.

    Returns:
        ``(choices, counts, info)``: rank paths, prompt tokens per node (root first) and a dict with the expected
        ``tokens``/``cost``/``rate`` and the verification ``size`` (1 + nodes + prompt tokens at full depth).

    Example:
        >>> from hf_decoding_ext.speculative.policies.tree_policy import VerifyCostCurve
        >>> flat = VerifyCostCurve((1, 96), (1.0, 1.0))
        >>> _, _, info = hardware_aware_tree([[0.5, 0.2], [0.4, 0.1], [0.3, 0.1]], flat, 3)
        >>> info["size"] > 20
        True
    """
    m = int(num_prompt_tokens)
    return _hardware_aware_tree(tuple(tuple(float(a) for a in row) for row in accuracies[:m]), curve, m,
                                max_nodes)


@functools.lru_cache(maxsize=32)
def _hardware_aware_tree(acc, curve, m, max_nodes):
    depth = min(m, len(acc))
    limit = (curve.max_tokens - 1 - m) // (1 + m) * (1 + m) + m  # enough candidates to fill the curve's range
    limit = min(limit, curve.max_tokens - 1 - m)
    if max_nodes is not None:
        limit = min(limit, max_nodes)
    best = ([], [m], {"tokens": 1.0, "cost": curve(1 + m), "rate": 1.0 / curve(1 + m), "size": 1 + m})

    def value(p):
        v = 1.0
        for d, r in enumerate(p):
            v *= acc[d][r]
        return v

    sizes = [n for n in range(1, limit + 1) if n <= 16 or n % 4 == 0 or n == limit]
    for n in sizes:
        paths = choices_from_accuracies([list(r) for r in acc], n, max_depth=depth)
        n = len(paths)
        values = [value(p) for p in paths]
        counts = [m] * (n + 1)
        ends = _end_probabilities(paths, values)
        tokens, cost, rate = expected_rate(paths, values, counts, curve, m)
        for i in sorted(range(n + 1), key=lambda j: ends[j]):  # least likely to end the path first
            while counts[i] > (1 if i == 0 else 0):
                counts[i] -= 1
                t, c, r = expected_rate(paths, values, counts, curve, m)
                if r > rate:
                    tokens, cost, rate = t, c, r
                else:
                    counts[i] += 1
                    break
        if rate > best[2]["rate"]:
            best = (paths, counts, {"tokens": tokens, "cost": cost, "rate": rate,
                                    "size": 1 + n + sum(counts)})
    paths, counts, info = best
    return [tuple(p) for p in paths], list(counts), dict(info)


class PPDDrafter(Drafter):
    """Hardware-Aware Parallel Prompt Decoding (Chen et al., "Hardware-Aware Parallel Prompt Decoding for
    Memory-Efficient Acceleration of LLM Inference", arXiv 2405.18628; official code hmarkc/parallel-prompt-decoding).

    The target drafts for itself: ``m`` trained prompt tokens
    (:class:`~hf_decoding_ext.speculative.heads.ppd.PromptTokens`) are fed after the root and after tree nodes in the
    verification forward, as side nodes with their own input embeddings (``Draft.side_embeds``) that attend to their
    node's path; they are never accepted and their KV is dropped. The target's outputs at the prompt tokens of the
    node that ends the accepted path rank the candidates of the next step: depth ``d`` of the next tree holds the
    top-ranked tokens of prompt token ``d``. The tree is PPD's dynamic sparse tree: candidate paths picked best-first
    from the per-depth accuracies measured on held-out data, and prompt tokens only on the nodes likely to end the
    accepted path (a node with ``c`` prompt tokens lets the next tree reach depth ``c``), sized by
    :func:`hardware_aware_tree` for the running device from its measured verify-cost curve
    (:func:`~hf_decoding_ext.speculative.policies.tuning.device_curve`). Greedy acceptance: token-identical to
    greedy decoding (the target verifies every token).

    Deviations from the paper and the official code (also in the model card):

    {fidelity}

    Args:
        heads: a :class:`PromptTokens`, a folder or Hub id, ``"shipped"`` (the checkpoint trained on
            SmolLM2-135M-Instruct) or ``"untrained"`` (fresh prompt tokens at their initialisation, for comparisons).
        tree_choices: explicit candidate tree (rank paths); every node then carries all prompt tokens.
        max_nodes: ``"auto"`` (default): the hardware-aware tree of the device's measured curve; an int caps the
            candidate count of that search; ``None``: the search on the whole measured range.
        curve: a :class:`VerifyCostCurve` to size the tree with instead of the measured one, ``"packaged"`` (the
            curve shipped for the development CPU) or ``"flat"`` (:data:`FLAT_CURVE`, accelerator-like).

    Example:
        >>> from hf_decoding_ext.speculative import SpeculativeDecoding
        >>> from hf_decoding_ext.speculative.drafters.ppd import PPDDrafter
        >>> out = model.generate(**inputs, max_new_tokens=64, do_sample=False,
        ...                      custom_generate=SpeculativeDecoding(PPDDrafter("shipped")))  # doctest: +SKIP
    """

    def __init__(self, heads="shipped", tree_choices=None, max_nodes: int | str | None = "auto",
                 curve: VerifyCostCurve | str | None = None, model=None):
        if heads == "untrained":
            if model is None:
                raise ValueError("heads='untrained' needs the model (PPDDrafter.for_model(model, heads='untrained'))")
            from hf_decoding_ext.speculative.heads.ppd import PPDConfig

            heads = PromptTokens(PPDConfig(hidden_size=model.config.hidden_size,
                                           vocab_size=model.config.vocab_size)).attach(model)
        if not (max_nodes is None or max_nodes == "auto" or (isinstance(max_nodes, int)
                                                             and not isinstance(max_nodes, bool) and max_nodes >= 1)):
            raise ValueError(f"max_nodes must be 'auto', None or an int >= 1, got {max_nodes!r}")
        if curve == "packaged":
            curve = VerifyCostCurve.packaged()
        elif curve == "flat":
            curve = FLAT_CURVE
        if curve is not None and not isinstance(curve, VerifyCostCurve):
            raise ValueError(f"curve must be a VerifyCostCurve, 'packaged', 'flat' or None, got {curve!r}")
        self.head = load_head(heads, PromptTokens, "ppd")
        self.head.eval()
        self.m = self.head.config.num_prompt_tokens
        self.tree_choices = None if tree_choices is None else normalize_choices(tree_choices)
        if self.tree_choices and max(len(c) for c in self.tree_choices) > self.m:
            raise ValueError(f"tree choices reach depth {max(len(c) for c in self.tree_choices)}, the prompt tokens "
                             f"draft {self.m}")
        self.max_nodes = max_nodes
        self.curve = curve
        self.choices: list[tuple] = []
        self.counts: list[int] = []
        self.tree_info: dict = {}
        self._model_id = None
        self._guesses: torch.Tensor | None = None
        self._reach = 0

    @classmethod
    def for_model(cls, model=None, tokenizer=None, heads="shipped", tree_choices=None,
                  max_nodes: int | str | None = "auto", curve: VerifyCostCurve | str | None = None) -> PPDDrafter:
        """Build for ``model`` (the prompt tokens are attached to it)."""
        drafter = cls(heads, tree_choices, max_nodes, curve, model=model)
        if model is not None:
            drafter.head.attach(model)
        return drafter

    def accuracies(self) -> list[list[float]]:
        """Per-depth top-k accuracies of the prompt tokens (measured on held-out data; a prior without them)."""
        acc = self.head.config.head_accuracies
        if acc:
            return [list(r) for r in acc[: self.m]]
        return [[UNTRAINED_PRIOR * 0.4 ** i for i in range(4)] for _ in range(self.m)]

    def resolve_tree(self, model) -> None:
        """The tree of this device: explicit choices, or :func:`hardware_aware_tree` on the measured curve."""
        if self.tree_choices is not None:
            self.choices, self.counts = list(self.tree_choices), [self.m] * (len(self.tree_choices) + 1)
            self.tree_info = {"source": "explicit"}
            return
        curve = self.curve
        if curve is None:
            from hf_decoding_ext.speculative.policies.tuning import device_curve

            curve = device_curve(model)
        cap = None if self.max_nodes in (None, "auto") else self.max_nodes
        self.choices, self.counts, info = hardware_aware_tree(self.accuracies(), curve, self.m, cap)
        self.tree_info = {**info, "curve": curve.source}

    # ------------------------------------------------------------------------------------------------ engine hooks
    def begin(self, state) -> None:
        if state.input_ids.shape[0] != 1:
            raise ValueError(f"PPDDrafter drafts for one sequence at a time, got batch size {state.input_ids.shape[0]}")
        if self._model_id != id(state.model) or not self.head.attached:
            self.head.attach(state.model)
            self._model_id = id(state.model)
            self.choices = []
        if not self.choices and not self.counts:
            self.resolve_tree(state.model)
        self._guesses, self._reach = None, 0

    def propose(self, state) -> Draft:
        if self._guesses is None or self._reach == 0:
            paths: list[tuple] = []
        else:
            paths = [p for p in self.choices if len(p) <= self._reach]
        if paths:
            guesses = self._guesses
            tree = build_choice_tree(paths, lambda depth, parents, k: guesses[depth - 1, :k].expand(len(parents), k))
        else:
            tree = DraftTree.empty()
        n = len(tree)
        counts = [self.counts[0]] + ([self.counts[1 + self.choices.index(p)] for p in normalize_choices(paths)]
                                     if paths else [])
        ancestors = tree.ancestor_mask() if n else torch.zeros(0, 0, dtype=torch.bool)
        depth = tree.depth if n else torch.zeros(0, dtype=torch.long)
        rows_owner, rows_rank = [], []
        for node, c in enumerate(counts):  # node 0 = root, node i = tree node i - 1
            for i in range(c):
                rows_owner.append(node - 1)
                rows_rank.append(i)
        s = len(rows_owner)
        allowed = torch.zeros(s, n + s, dtype=torch.bool)
        side_depth = torch.zeros(s, dtype=torch.long)
        for r, (owner, rank) in enumerate(zip(rows_owner, rows_rank)):
            if owner >= 0:
                allowed[r, :n] = ancestors[owner]
            allowed[r, n + r - rank:n + r + 1] = True
            side_depth[r] = (0 if owner < 0 else int(depth[owner])) + 1 + rank
        embeds = self.head.prompt_embeds()[torch.tensor(rows_rank, dtype=torch.long)].detach()
        groups = {}
        for r, owner in enumerate(rows_owner):
            groups.setdefault(owner, []).append(r)
        return Draft(tree, side_tokens=torch.zeros(s, dtype=torch.long), side_allowed=allowed,
                     side_depth=side_depth, side_embeds=embeds, info={"ppd_groups": groups})

    def observe(self, state, result: VerifyResult) -> None:
        last = result.accepted[-1] if result.accepted else -1
        rows = result.draft.info["ppd_groups"].get(last, [])
        self._reach = len(rows)
        if not rows or result.side_logits is None:
            self._guesses = None
            return
        width = max((max(p) for p in self.choices), default=0) + 1
        logits = result.side_logits[torch.tensor(rows, device=result.side_logits.device)]
        self._guesses = logits.topk(width, dim=-1).indices.cpu()  # (reach, width)

    def reset(self) -> None:
        self._guesses, self._reach = None, 0


PPDDrafter.__doc__ = PPDDrafter.__doc__.replace("{fidelity}", fidelity_markdown().replace("\n", "\n    "))
