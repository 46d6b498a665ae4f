"""Search and reranking loops (candidate pools and selectors; step-level search guided by values and rewards).

Issue 21 (candidate pools and selectors): :mod:`~hf_decoding_ext.search.mbr` (minimum Bayes risk),
:mod:`~hf_decoding_ext.search.quality_aware` (N-best reranking and MBR), :mod:`~hf_decoding_ext.search.infalign`
(best-/worst-of-N under a calibrated reward), :mod:`~hf_decoding_ext.search.daemon` (sampling-importance-resampling
toward human-text metrics), :mod:`~hf_decoding_ext.search.consensus_game` (equilibrium ranking),
:mod:`~hf_decoding_ext.search.diverse_beam_search` and :mod:`~hf_decoding_ext.search.lattice` (pool generators).
The rerankers are :class:`~hf_decoding_ext.core.candidates.RerankingLoop` subclasses; their utilities and scorers are
in :mod:`hf_decoding_ext.core.scoring`.

Issue 22 (step-level search on :mod:`hf_decoding_ext.core.step_search`): :mod:`~hf_decoding_ext.search.a_star`,
:mod:`~hf_decoding_ext.search.phi_decoding`, :mod:`~hf_decoding_ext.search.cards`,
:mod:`~hf_decoding_ext.search.transfer_q_star`, :mod:`~hf_decoding_ext.search.pg_td` (with
:mod:`hf_decoding_ext.core.sandbox`) and :mod:`~hf_decoding_ext.search.skeleton_graph`.
"""
