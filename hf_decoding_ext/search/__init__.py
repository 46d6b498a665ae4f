"""Search and reranking loops (candidate pools and selectors, step-level search guided by values and rewards).

Empty in this release: the methods of the search issues (MBR, best-of-N, A*-decoding, ...) are built here as
configurations of :mod:`hf_decoding_ext.core.rollout` and :mod:`hf_decoding_ext.core.scoring`.
"""
