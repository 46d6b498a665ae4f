"""Speculative decoding: one verification engine, acceptance rules, tree utilities and drafters."""

from hf_decoding_ext.speculative.acceptance import AcceptanceRule, GreedyAcceptance, SpeculativeSamplingAcceptance, TypicalAcceptance
from hf_decoding_ext.speculative.drafters.base import Draft, Drafter, VerifyResult
from hf_decoding_ext.speculative.engine import SpeculativeDecoding, StepStats
from hf_decoding_ext.core.tree import DraftTree

__all__ = ["AcceptanceRule", "Draft", "Drafter", "DraftTree", "GreedyAcceptance", "SpeculativeDecoding",
           "SpeculativeSamplingAcceptance", "StepStats", "TypicalAcceptance", "VerifyResult"]
