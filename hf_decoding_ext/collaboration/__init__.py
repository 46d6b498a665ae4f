"""Small/large model collaboration loops (entropy-adaptive hand-over, speculative thinking, ...).

Built on one router loop, :class:`hf_decoding_ext.core.router.RouterLoop`, which keeps both models' caches in step
and accounts compute per model. :mod:`.entropy_adaptive` (Entropy Adaptive Decoding), :mod:`.foreal`
(FoReaL-Decoding), :mod:`.speculative_thinking` (Speculative Thinking) and :mod:`.draft_approx` (SpecKV, SpecPC) are
written and tested on tiny models but not yet registered: the hand-over knobs are not calibrated for the default
small/large pair, whose small model (the distilled 4-layer draft) writes mostly newlines on its own. SpecKV follows the
official code; it loses some needles of 2k-token passkey prompts because the draft's lookahead is uninformative
(newlines), while SpecPC, which skips the draft's first layer by default, keeps them at a 512-token capacity
(results/issue25_diagnosis.md; scripts/eval_collaboration.py measures both, issue 25).
"""
