"""Plug a registered method into ``generate()``: the method -> ``generate()`` keyword arguments (was ``api.py``)."""

from __future__ import annotations

from typing import Any

from transformers import LogitsProcessorList, StoppingCriteriaList

from hf_decoding_ext.registry import MethodSpec, get_method


def generate_kwargs(method: str | MethodSpec, model=None, tokenizer=None, **params) -> dict[str, Any]:
    """Build the method's component and return the ``generate()`` kwargs that plug it in.

    Processors go to ``logits_processor``, stopping criteria to ``stopping_criteria``, decoding loops to
    ``custom_generate`` and candidate generators to ``custom_generate`` through their own loop; ``do_sample`` is the
    method's default generation mode. Candidate generators (drafters) are wrapped in the speculative engine.

    Example:
        >>> from hf_decoding_ext import generate_kwargs
        >>> kwargs = generate_kwargs("mirostat-v2", tau=3.0)  # doctest: +SKIP
        >>> model.generate(**inputs, max_new_tokens=64, **kwargs)  # doctest: +SKIP
    """
    spec = get_method(method) if isinstance(method, str) else method
    component = spec.build(model=model, tokenizer=tokenizer, **params)
    kwargs: dict[str, Any] = {"do_sample": spec.do_sample}
    if spec.kind == "processor":
        kwargs["logits_processor"] = LogitsProcessorList([component])
    elif spec.kind == "stopping_criterion":
        kwargs["stopping_criteria"] = StoppingCriteriaList([component])
    elif spec.kind == "candidate_generator":
        from hf_decoding_ext.speculative import SpeculativeDecoding

        kwargs["custom_generate"] = SpeculativeDecoding(component)
    else:
        kwargs["custom_generate"] = component
    if spec.do_sample:
        # generate() applies top_k=50 by default when sampling; a sampling method does its own truncation, so the
        # default is switched off here (pass top_k=... to generate() yourself to combine them deliberately)
        kwargs["top_k"] = 0
    else:
        # greedy methods: neutralise sampling defaults a model's generation_config may carry
        kwargs.update(temperature=None, top_k=None, top_p=None)
    return kwargs


method_generate_kwargs = generate_kwargs  # the name before the core/family layout; kept for one release
