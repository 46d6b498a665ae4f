"""What every family uses; imports nothing above ``core``.

* :mod:`~hf_decoding_ext.core.loop`: :class:`DecodingLoop` / :class:`GenerationState`, the ``custom_generate`` base
  with cache branching (``clone_cache``, ``repeat_cache``, ``select_cache``);
* :mod:`~hf_decoding_ext.core.rollout`: branch the state and roll out k continuations per row in one batch, each
  ending on its own predicate (eos, stop tokens or strings, stopping criteria, a cap);
* :mod:`~hf_decoding_ext.core.scoring`: the :class:`Scorer` protocol for candidates (log-probability,
  length-normalised log-probability, MBR over a cached utility matrix, any callable);
* :mod:`~hf_decoding_ext.core.anatomy`: decoder layers, final norm, lm_head, embeddings and early-exit logits of
  Llama-style, GPT-2 and other layouts, and layer-skip / early-exit views with their own or the model's cache;
* :mod:`~hf_decoding_ext.core.tree`, :mod:`~hf_decoding_ext.core.kv`: token trees, 4D tree masks and position ids,
  KV-cache compaction;
* :mod:`~hf_decoding_ext.core.models`: the default model, prompt encoding, truncated models and amateur resolution;
* :mod:`~hf_decoding_ext.core.plausibility`: the adaptive plausibility set of the contrastive methods;
* :mod:`~hf_decoding_ext.core.kernels`: the weight-left CPU layout for few-row linear layers;
* :mod:`~hf_decoding_ext.core.resources`: the one place that locates packaged data;
* :mod:`~hf_decoding_ext.core.rows`, :mod:`~hf_decoding_ext.core.entropy`, :mod:`~hf_decoding_ext.core.ngram`,
  :mod:`~hf_decoding_ext.core.ngram_lm`: per-row helpers, entropy/surprise, n-gram statistics and an n-gram LM.
"""
