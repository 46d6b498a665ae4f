"""Plug a registered method into ``generate()``: the method -> ``generate()`` keyword arguments (was ``api.py``)."""

from __future__ import annotations

import inspect
from typing import Any

from transformers import LogitsProcessorList, StoppingCriteriaList

from hf_decoding_ext.registry import MethodSpec, get_method


def engine_options(spec: MethodSpec, engine: dict[str, Any] | None = None) -> dict[str, Any]:
    """The speculative engine's options for ``spec``: the registered ``spec.engine`` updated by ``engine``, checked
    against :class:`~hf_decoding_ext.speculative.SpeculativeDecoding`'s parameters (``ValueError`` naming an
    unknown option, or options given for a method that is not a candidate generator)."""
    options = {**spec.engine, **(engine or {})}
    if not options:
        return options
    if spec.kind != "candidate_generator":
        raise ValueError(f"engine options {sorted(options)} apply only to candidate generators; {spec.name!r} is "
                         f"a {spec.kind}")
    from hf_decoding_ext.speculative import SpeculativeDecoding

    valid = [p for p in inspect.signature(SpeculativeDecoding).parameters if p != "drafter"]
    unknown = sorted(set(options) - set(valid))
    if unknown:
        raise ValueError(f"Unknown engine option(s) {unknown} for method {spec.name!r}; valid options: {valid}")
    return options


def generate_kwargs(method: str | MethodSpec, model=None, tokenizer=None, *, engine: dict[str, Any] | None = None,
                    **params) -> dict[str, Any]:
    """Build the method's component and return the ``generate()`` kwargs that plug it in.

    Processors go to ``logits_processor``, stopping criteria to ``stopping_criteria``, decoding loops to
    ``custom_generate`` and candidate generators to ``custom_generate`` through their own loop; ``do_sample`` is the
    method's default generation mode. Candidate generators (drafters) are wrapped in the speculative engine,
    ``SpeculativeDecoding(drafter, **options)`` with the method's registered engine options (``spec.engine``)
    updated by ``engine`` (e.g. ``engine={"acceptance": "typical"}``).

    Args:
        method: a registered name or alias, or a :class:`~hf_decoding_ext.registry.MethodSpec`.
        model, tokenizer: passed to the component's factory when it takes them.
        engine: speculative-engine options overriding the registered ones (candidate generators only).
        params: the component's parameters (see ``spec.parameters()``).

    Example:
        >>> from hf_decoding_ext import generate_kwargs
        >>> kwargs = generate_kwargs("mirostat-v2", tau=3.0)  # doctest: +SKIP
        >>> model.generate(**inputs, max_new_tokens=64, **kwargs)  # doctest: +SKIP
    """
    spec = get_method(method) if isinstance(method, str) else method
    options = engine_options(spec, engine)
    component = spec.build(model=model, tokenizer=tokenizer, **params)
    kwargs: dict[str, Any] = {"do_sample": spec.do_sample}
    if spec.kind == "processor":
        kwargs["logits_processor"] = LogitsProcessorList([component])
    elif spec.kind == "stopping_criterion":
        kwargs["stopping_criteria"] = StoppingCriteriaList([component])
    elif spec.kind == "candidate_generator":
        from hf_decoding_ext.speculative import SpeculativeDecoding

        kwargs["custom_generate"] = SpeculativeDecoding(component, **options)
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


def fast_generate(model, *args, kernels="auto", **kwargs):
    """``model.generate(*args, **kwargs)`` with the CPU linear kernels of
    :func:`~hf_decoding_ext.core.kernels.fast_kernels` (per layer shape and row count the fastest of PyTorch's
    layout, weight-left and oneDNN's prepacked linear, measured once per machine and cached).

    The products are the same up to summation order, so greedy decoding equals plain ``generate()`` token for token
    except at floating-point near-ties. On GPU, in dtypes other than float32/bfloat16, and for layers that are not
    plain ``nn.Linear``, it is plain ``generate()``. An ``assistant_model=`` gets the same kernels.

    Args:
        model: a transformers causal LM.
        kernels: the plan (``"auto"``, a kernel name such as ``"pytorch"``, a dict or a
            :class:`~hf_decoding_ext.core.kernels.KernelPlan`).
        *args, **kwargs: anything ``generate()`` takes (``custom_generate=``, ``logits_processor=``, ...).

    Example:
        >>> from hf_decoding_ext import fast_generate, load_model, encode_prompts  # doctest: +SKIP
        >>> model, tokenizer = load_model()  # doctest: +SKIP
        >>> out = fast_generate(model, **encode_prompts(tokenizer, "Hi"), max_new_tokens=32,
        ...                     do_sample=False)  # doctest: +SKIP
    """
    from hf_decoding_ext.core.kernels import fast_kernels

    with fast_kernels(model, kwargs.get("assistant_model"), plan=kernels):
        return model.generate(*args, **kwargs)
