"""Speculative decoding: one verification engine, acceptance rules, tree utilities and drafters."""

from .acceptance import AcceptanceRule, GreedyAcceptance, SpeculativeSamplingAcceptance, TypicalAcceptance
from .drafters.base import Draft, Drafter, VerifyResult
from .engine import SpeculativeDecoding, StepStats
from .tree import DraftTree

__all__ = ["AcceptanceRule", "Draft", "Drafter", "DraftTree", "GreedyAcceptance", "SpeculativeDecoding",
           "SpeculativeSamplingAcceptance", "StepStats", "TypicalAcceptance", "VerifyResult"]
