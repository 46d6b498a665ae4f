"""Sampling and single-pass decoding methods: logits processors (Mirostat, adaptive top-k, momentum, kNN-LM) and
``custom_generate`` loops (AdaDec, Cautious NTP, Superposed Decoding, IPS), one file per method."""
