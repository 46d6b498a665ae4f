"""Constrained and structured generation.

* :mod:`~hf_decoding_ext.structured.grammar`: the shared grammar machinery over llguidance (grammar sources,
  compilation cache, per-row matchers with rollback, token masks, a per-token grammar predicate).
* :class:`~hf_decoding_ext.structured.prompt_rows.PromptTrackingProcessor`: the processor lifecycle shared by the
  structured processors (each row remembers the prompt row it descends from when loops branch or reorder rows).
* :class:`~hf_decoding_ext.structured.json_schema.GrammarConstrainedLogitsProcessor` and
  :class:`~hf_decoding_ext.structured.json_schema.JsonSchemaLogitsProcessor`: grammar / JSON-schema constrained
  decoding as a logits processor (JSONSchemaBench).
* :class:`~hf_decoding_ext.structured.grammar_aligned.GrammarAlignedSampling`: ASAp (grammar-aligned decoding).
* :class:`~hf_decoding_ext.structured.awrs.AdaptiveWeightedRejectionSampling`: AWRS with importance weights.
* :class:`~hf_decoding_ext.structured.monitor_guided.MonitorGuidedLogitsProcessor`: monitor-guided decoding for code.
* :class:`~hf_decoding_ext.structured.exact_extractive.ExtractiveSpanLogitsProcessor` and
  :class:`~hf_decoding_ext.structured.exact_extractive.ExactExtractiveDecoding`: extractive spans, exact search.
* :class:`~hf_decoding_ext.structured.sketch_guided.SketchGuidedDecoding`: sketch-guided constrained decoding.
* :class:`~hf_decoding_ext.structured.lexical_dba.DynamicBeamAllocation`: lexically constrained beam search (DBA).
"""

from hf_decoding_ext.structured import grammar
from hf_decoding_ext.structured.awrs import AdaptiveWeightedRejectionSampling
from hf_decoding_ext.structured.json_schema import GrammarConstrainedLogitsProcessor, JsonSchemaLogitsProcessor
from hf_decoding_ext.structured.exact_extractive import ExactExtractiveDecoding, ExtractiveSpanLogitsProcessor
from hf_decoding_ext.structured.grammar_aligned import GrammarAlignedSampling
from hf_decoding_ext.structured.lexical_dba import DynamicBeamAllocation
from hf_decoding_ext.structured.monitor_guided import MonitorGuidedLogitsProcessor
from hf_decoding_ext.structured.sketch_guided import SketchGuidedDecoding

__all__ = ["grammar", "AdaptiveWeightedRejectionSampling", "DynamicBeamAllocation", "ExactExtractiveDecoding", "ExtractiveSpanLogitsProcessor",
           "GrammarAlignedSampling", "GrammarConstrainedLogitsProcessor", "JsonSchemaLogitsProcessor",
           "MonitorGuidedLogitsProcessor", "SketchGuidedDecoding"]
