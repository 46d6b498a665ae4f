"""Policies of the speculative engine: the draft tree's shape and size (:mod:`.tree_policy`) and the length of
chain drafts (:mod:`.draft_length`)."""

from hf_decoding_ext.speculative.policies.draft_length import (
    SCHEDULES,
    ConstantLength,
    DraftLengthPolicy,
    HeuristicLength,
    draft_length_policy,
)
from hf_decoding_ext.speculative.policies.tree_policy import (
    ACCELERATOR_MAX_NODES,
    NodeBudget,
    VerifyCostCurve,
    best_first_paths,
    best_first_tree,
    check_max_nodes,
    node_budget,
)

__all__ = [
    "ACCELERATOR_MAX_NODES", "SCHEDULES", "ConstantLength", "DraftLengthPolicy", "HeuristicLength", "NodeBudget",
    "VerifyCostCurve", "best_first_paths", "best_first_tree", "check_max_nodes", "draft_length_policy",
    "node_budget",
]
