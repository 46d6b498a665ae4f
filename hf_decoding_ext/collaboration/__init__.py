"""Small/large model collaboration loops (entropy-adaptive hand-over, speculative thinking, ...).

Built on one router loop, :class:`hf_decoding_ext.core.router.RouterLoop`, which keeps both models' caches in step
and accounts compute per model. :mod:`.entropy_adaptive` (Entropy Adaptive Decoding) is written and tested on tiny
models but not yet registered: its threshold is not calibrated for the default small/large pair (issue 25).
"""
