"""Small/large model collaboration loops (entropy-adaptive hand-over, speculative thinking, ...).

Empty in this release: the methods of the collaboration issue are built here on one router loop.
"""
