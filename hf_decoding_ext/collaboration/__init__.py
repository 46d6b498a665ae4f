"""Small/large model collaboration loops (entropy-adaptive hand-over, speculative thinking, ...).

Built on one router loop, :class:`hf_decoding_ext.core.router.RouterLoop`, which keeps both models' caches in step
and accounts compute per model. :mod:`.entropy_adaptive` (Entropy Adaptive Decoding), :mod:`.foreal`
(FoReaL-Decoding) and :mod:`.speculative_thinking` (Speculative Thinking) are written and tested on tiny models but
not yet registered: their knobs are not calibrated for the default small/large pair, whose small model (the distilled
4-layer draft) writes mostly newlines on its own (issue 25).
"""
