"""Speculative decoding: one verification engine, acceptance rules, tree utilities and drafters."""

from hf_decoding_ext.speculative.acceptance import (ACCEPTANCE_RULES, AcceptanceRule, GreedyAcceptance,
                                                    SpeculativeSamplingAcceptance, TypicalAcceptance,
                                                    get_acceptance_rule, register_acceptance_rule)
from hf_decoding_ext.speculative.drafters.base import DRAFTER_NEEDS, Draft, Drafter, VerifyResult
from hf_decoding_ext.speculative.engine import SpeculativeDecoding, StepStats
from hf_decoding_ext.core.tree import DraftTree

__all__ = ["ACCEPTANCE_RULES", "DRAFTER_NEEDS", "AcceptanceRule", "Draft", "DraftTree", "Drafter", "GreedyAcceptance",
           "SpeculativeDecoding", "SpeculativeSamplingAcceptance", "StepStats", "TypicalAcceptance", "VerifyResult",
           "get_acceptance_rule", "register_acceptance_rule"]
