"""Contrastive and guidance decoding: a second view of the next-token distribution, combined with the main one.

One mechanism, :class:`~hf_decoding_ext.contrastive.context.ContrastiveContextProcessor`, and one thin
configuration per paper:

* :class:`~hf_decoding_ext.contrastive.cad.ContextAwareDecodingProcessor` (context-aware decoding);
* :class:`~hf_decoding_ext.contrastive.cfg.ClassifierFreeGuidanceProcessor` (classifier-free guidance);
* :class:`~hf_decoding_ext.contrastive.instructive.InstructiveDecodingProcessor` (instructive decoding);
* :class:`~hf_decoding_ext.contrastive.leading_query.LeadingQueryContrastiveProcessor` (leading-query CD);
* :class:`~hf_decoding_ext.contrastive.contrastive_decoding.ContrastiveDecodingProcessor` (contrastive decoding
  with an amateur model).

Evaluation helpers and loaders for the shipped data sets are in :mod:`hf_decoding_ext.bench.tasks.contrastive`.
"""

from hf_decoding_ext.contrastive.cad import ContextAwareDecodingProcessor, cad_scores
from hf_decoding_ext.contrastive.cfg import ClassifierFreeGuidanceProcessor, cfg_scores
from hf_decoding_ext.contrastive.context import ContrastiveContextProcessor, encode_second_view, pad_left
from hf_decoding_ext.contrastive.contrastive_decoding import ContrastiveDecodingProcessor, contrastive_decoding_scores
from hf_decoding_ext.contrastive.instructive import InstructiveDecodingProcessor, instructive_scores, noisy_instruction_prompt
from hf_decoding_ext.contrastive.leading_query import LeadingQueryContrastiveProcessor, lqcd_scores
from hf_decoding_ext.contrastive.speculative_contrastive import SpeculativeContrastiveDecoding, scd_scores

__all__ = [
    "ContrastiveContextProcessor",
    "ContextAwareDecodingProcessor",
    "ClassifierFreeGuidanceProcessor",
    "InstructiveDecodingProcessor",
    "LeadingQueryContrastiveProcessor",
    "ContrastiveDecodingProcessor",
    "SpeculativeContrastiveDecoding",
    "scd_scores",
    "cad_scores",
    "cfg_scores",
    "instructive_scores",
    "lqcd_scores",
    "contrastive_decoding_scores",
    "noisy_instruction_prompt",
    "encode_second_view",
    "pad_left",
]
