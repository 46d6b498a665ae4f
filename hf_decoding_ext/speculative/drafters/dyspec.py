"""DySpec: a draft tree grown best-first on the draft model's path probability under a node budget."""

from __future__ import annotations

import heapq

import torch

from hf_decoding_ext.core.tree import DraftTree
from hf_decoding_ext.speculative.drafters.base import Draft
from hf_decoding_ext.speculative.drafters.draft_model import DraftModelDrafter


class DySpecDrafter(DraftModelDrafter):
    """The dynamic token tree of "DySpec: Faster Speculative Decoding with Dynamic Token Tree Structure" (Xiong et
    al., arXiv 2410.11744). The draft probability of a path estimates how likely the target is to accept it, so the
    tree is grown greedily: a max-heap holds, for every tree node, its *next* child (the value of adding it is the
    node's path probability times the probability of that child), the best entry is popped and added, the draft
    model runs on the new node, and its own next-child entry is pushed, until ``num_nodes`` nodes are in the tree.

    Children of a node are added in the order of sampling without replacement from the draft model's distribution
    there (``sibling_scheme="without_replacement"``, verified by recursive rejection sampling, lossless). The value
    of a node's next-child entry is computed *before* that child is drawn (the node's path probability times the
    largest probability left in its distribution), so whether a draw is added never depends on the draw itself and
    the tree stays unbiased. Without sampling the next child is the most likely remaining token and the value is
    exact (the greedy dynamic tree).

    Args:
        assistant_model: the draft model (``None``: ``generate(..., assistant_model=...)``).
        num_nodes: the node budget (default 8, this library's choice for a 2-core CPU; the paper's budgets are for
            GPUs, 64 to 768).
        max_depth: the deepest level grown (default 6).

    Deviation: one draft-model forward per added node (the paper batches the expansions of a step).

    Example:
        >>> from hf_decoding_ext.speculative import SpeculativeDecoding
        >>> from hf_decoding_ext.speculative.drafters.dyspec import DySpecDrafter
        >>> loop = SpeculativeDecoding(DySpecDrafter(small_model, num_nodes=16))  # doctest: +SKIP
        >>> out = model.generate(**inputs, do_sample=True, max_new_tokens=64, custom_generate=loop)  # doctest: +SKIP
    """

    @classmethod
    def for_model(cls, model=None, tokenizer=None, assistant: str = "distilled", num_nodes: int = 8,
                  max_depth: int = 6) -> DySpecDrafter:
        """Registry/CLI factory (``assistant`` as in :meth:`DraftModelDrafter.load_assistant`)."""
        return cls(cls.load_assistant(model, assistant), num_nodes=num_nodes, max_depth=max_depth)

    def __init__(self, assistant_model=None, num_nodes: int = 8, max_depth: int = 6):
        for name, value in (("num_nodes", num_nodes), ("max_depth", max_depth)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        super().__init__(assistant_model, num_tokens=max_depth, confidence_threshold=0.0, schedule="constant")
        self.num_nodes = num_nodes
        self.max_depth = max_depth

    def _distribution(self, state, path: list[int]) -> torch.Tensor:
        return torch.softmax(self.scores_after(state, path).float(), dim=-1)

    def propose(self, state) -> Draft:
        room = state.generation_config.max_length - state.input_ids.shape[1] - 1
        depth_limit = max(0, min(self.max_depth, room))
        tokens, parents, probs = [], [], []
        if depth_limit == 0:
            return Draft(DraftTree.chain(torch.zeros(0, dtype=torch.long)))
        # per expanded node: its path, path probability, distribution, and the order its children are drawn in
        info = {}
        heap: list[tuple[float, int, int]] = []  # (-value, tie-break, node)
        counter = 0

        def expand(node: int, path: list[int], path_prob: float) -> None:
            nonlocal counter
            if len(path) >= depth_limit:
                return
            q = self._distribution(state, path)
            if state.do_sample:  # the full without-replacement order, drawn lazily one child at a time
                u = torch.rand(q.shape).clamp_min_(torch.finfo(torch.float32).tiny)
                order = torch.argsort(torch.log(q) - torch.log(-torch.log(u)), descending=True)
            else:
                order = torch.argsort(q, descending=True)
            info[node] = {"path": path, "prob": path_prob, "q": q, "order": order, "next": 0, "left": q.clone()}
            push(node)

        def push(node: int) -> None:
            nonlocal counter
            d = info[node]
            if d["next"] >= int((d["q"] > 0).sum()):
                return
            if state.do_sample:  # known before the draw: the largest probability not drawn yet
                value = d["prob"] * float(d["left"].max())
            else:
                value = d["prob"] * float(d["q"][d["order"][d["next"]]])
            counter += 1
            heapq.heappush(heap, (-value, counter, node))

        expand(-1, [], 1.0)
        while heap and len(tokens) < self.num_nodes:
            _, _, node = heapq.heappop(heap)
            d = info[node]
            x = int(d["order"][d["next"]])
            d["next"] += 1
            d["left"][x] = 0.0
            tokens.append(x)
            parents.append(node)
            probs.append(d["q"])
            child = len(tokens) - 1
            push(node)
            if len(tokens) < self.num_nodes:
                expand(child, d["path"] + [x], d["prob"] * float(d["q"][x]))
        if not state.do_sample:
            return Draft(DraftTree(torch.tensor(tokens, dtype=torch.long), torch.tensor(parents)))
        return Draft(DraftTree(torch.tensor(tokens, dtype=torch.long), torch.tensor(parents), torch.stack(probs),
                               "without_replacement"))

    def observe(self, state, result) -> None:
        pass


__all__ = ["DySpecDrafter"]
