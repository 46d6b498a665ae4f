"""Small/large model collaboration loops and draft-based approximate inference (issue 25).

The hand-over methods run on one router loop, :class:`hf_decoding_ext.core.router.RouterLoop`, which keeps both models'
caches in step and accounts compute per model: :mod:`.entropy_adaptive` (Entropy Adaptive Decoding),
:mod:`.foreal` (FoReaL-Decoding) and :mod:`.speculative_thinking` (Speculative Thinking). :mod:`.draft_approx` holds
SpecKV and SpecPC, where a draft model decides which KV entries or prompt tokens the target keeps of a long prompt.
All are registered; on the default pair (the shipped distilled 4-layer draft as the small model, SmolLM2-135M-Instruct
as the large one) the small model does not write coherent text alone, so the hand-over trade-offs of the papers do
not show (results/collaboration_eval.json, scripts/eval_collaboration.py).
"""
