"""Grammar-constrained decoding as a ``LogitsProcessor``: JSON schema, regular expression, Lark/GBNF grammar.

The token mask comes from llguidance (:mod:`hf_decoding_ext.structured.grammar`); this module only applies it.
"""

from __future__ import annotations

import torch
from transformers import LogitsProcessor

from hf_decoding_ext.structured.grammar import (
    Grammar,
    RowMatchers,
    as_grammar,
    compile_grammar,
    eos_ids_of,
)
from hf_decoding_ext.structured.prompt_rows import PromptTrackingProcessor


class GrammarConstrainedLogitsProcessor(PromptTrackingProcessor, LogitsProcessor):
    r"""
    Constrain generation to a JSON schema, a regular expression or a context-free grammar: at every step the tokens
    the grammar does not allow get ``-inf``, and eos is allowed only where the output so far is a complete sentence
    of the grammar. The token masks come from `llguidance <https://github.com/guidance-ai/llguidance>`_, the engine
    evaluated in "Generating Structured Outputs from Language Models: Benchmark and Studies" (Geng et al.,
    arXiv 2501.10868, JSONSchemaBench), with one matcher per batch row.

    Works with greedy search, sampling (the mask is applied before temperature / top-k / top-p, since transformers
    runs user processors first), beam search (rows are re-synchronised after the beams are reordered) and this
    library's speculative engine (a rejected draft rolls the matcher back: the matcher state is a function of each
    row's tokens, see :class:`~hf_decoding_ext.structured.grammar.RowMatchers`). Batch rows may be left-padded.

    Args:
        tokenizer: the model's fast Hugging Face tokenizer.
        grammar: a :class:`~hf_decoding_ext.structured.grammar.Grammar` (from ``grammar.json_schema``,
            ``grammar.regex``, ``grammar.lark`` or ``grammar.choices``), or a dict taken as a JSON schema.
        json_schema: a JSON schema (dict or JSON text), instead of ``grammar``.
        regex: a regular expression the whole output must match, instead of ``grammar``.
        lark: a Lark (or GBNF) grammar, instead of ``grammar``.
        eos_token_id: eos id(s) allowed when the grammar accepts (default: the tokenizer's eos; use
            :meth:`for_model` to take the model's generation config).
        vocab_size: size of the model's logits (default ``len(tokenizer)``); ids beyond the tokenizer are masked.

    Raises:
        ValueError: at construction, before any generation, when the grammar is invalid or uses a feature the engine
            does not support (the message names it), or when the tokenizer cannot be used by the engine.

    One processor instance tracks one ``generate()`` call at a time; a new call is recognised when the prompt
    changes (call :meth:`reset` to reuse it with a prompt that extends the previous output). Inside this library's
    loops (lookahead branches, trials, Superposed drafts, beam reordering, the speculative engine) the processor
    follows the lifecycle of :mod:`hf_decoding_ext.core.lifecycle` (see
    :class:`~hf_decoding_ext.structured.prompt_rows.PromptTrackingProcessor`): branched and reordered rows keep
    their prompt, so every mask is the one plain ``generate()`` gives the same tokens. If ``max_new_tokens``
    ends generation before the grammar is complete, the output is a valid *prefix* only; check
    :meth:`is_complete`.

    Example:
        >>> from hf_decoding_ext.core.models import load_model, encode_prompts
        >>> from hf_decoding_ext.structured import JsonSchemaLogitsProcessor
        >>> model, tokenizer = load_model()  # doctest: +SKIP
        >>> schema = {"type": "object", "properties": {"name": {"type": "string"}, "age": {"type": "integer"}},
        ...           "required": ["name", "age"], "additionalProperties": False}
        >>> proc = JsonSchemaLogitsProcessor.for_model(model, tokenizer, schema=schema)  # doctest: +SKIP
        >>> inputs = encode_prompts(tokenizer, "Alice is 31. Give her name and age as JSON.")  # doctest: +SKIP
        >>> out = model.generate(**inputs, logits_processor=[proc], max_new_tokens=40, do_sample=False)  # doctest: +SKIP
        >>> tokenizer.decode(out[0, inputs.input_ids.shape[1]:], skip_special_tokens=True)  # doctest: +SKIP
        '{"name": "Alice", "age": 31}'
    """

    def __init__(self, tokenizer, grammar: Grammar | dict | None = None, *, json_schema=None, regex=None,
                 lark=None, eos_token_id=None, vocab_size: int | None = None):
        self.grammar = as_grammar(grammar, json_schema_=json_schema, regex_=regex, lark_=lark)
        self.eos_token_ids = eos_ids_of(None, tokenizer, eos_token_id)
        if vocab_size is not None and vocab_size < len(tokenizer):
            raise ValueError(f"vocab_size {vocab_size} is smaller than the tokenizer ({len(tokenizer)} tokens)")
        self.tokenizer = tokenizer
        self.vocab_size = vocab_size or len(tokenizer)
        self.compiled = compile_grammar(tokenizer, self.grammar, self.eos_token_ids, self.vocab_size)
        self.reset()

    @classmethod
    def for_model(cls, model=None, tokenizer=None, grammar=None, **kwargs) -> GrammarConstrainedLogitsProcessor:
        """Build for ``model``: eos ids from its generation config, mask width from its vocabulary size."""
        if tokenizer is None:
            raise ValueError(f"{cls.__name__} needs the model's tokenizer")
        if model is not None:
            kwargs.setdefault("eos_token_id", eos_ids_of(model, tokenizer))
            vocab = getattr(model.config, "vocab_size", None) or getattr(model.get_output_embeddings(), "out_features",
                                                                         None)
            if vocab is not None:
                kwargs.setdefault("vocab_size", max(int(vocab), len(tokenizer)))
        return cls(tokenizer, grammar, **kwargs)

    # ------------------------------------------------------------------------------------------------ state
    state_attributes = PromptTrackingProcessor.state_attributes + ("rows",)

    def reset(self) -> None:
        """Forget the current generation (the next call starts a new one)."""
        super().reset()
        self.rows: RowMatchers | None = None

    def _start(self, input_ids: torch.LongTensor) -> None:
        super()._start(input_ids)
        self.rows = RowMatchers(self.compiled, input_ids.shape[0])

    def select_rows(self, indices: torch.LongTensor) -> None:
        """Keep the rows ``indices`` (rows may repeat): their prompts and matchers follow."""
        super().select_rows(indices)
        if self.rows is not None:
            self.rows = self.rows.select(torch.as_tensor(indices).tolist())

    def copy_state(self, value):
        return value.select(range(len(value)), copy=True) if isinstance(value, RowMatchers) else value

    def allowed_tokens(self, input_ids: torch.LongTensor, vocab_size: int | None = None) -> torch.BoolTensor:
        """``(batch, vocab)`` boolean mask of the tokens the grammar allows after ``input_ids``."""
        generated = self.generated(input_ids)
        self.rows.sync(generated)
        return self.rows.allowed(vocab_size or self.vocab_size, input_ids.device)

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        allowed = self.allowed_tokens(input_ids, scores.shape[-1])
        return scores.masked_fill(~allowed, float("-inf"))

    # ------------------------------------------------------------------------------------------------ hooks
    def rollback(self, num_tokens: int, row: int | None = None) -> None:
        """Undo the last ``num_tokens`` tokens (for loops that track tokens themselves; the processor also
        re-synchronises with ``input_ids`` on every call)."""
        if self.rows is not None:
            self.rows.rollback(num_tokens, row)

    def is_complete(self, row: int = 0) -> bool:
        """Whether ``row``'s output (as of the last call) is a complete sentence of the grammar."""
        return self.rows is not None and self.rows.accepting(row)

    @property
    def mask_seconds(self) -> float:
        """Seconds spent computing token masks in the current generation."""
        return 0.0 if self.rows is None else self.rows.mask_seconds + self.rows.sync_seconds


class JsonSchemaLogitsProcessor(GrammarConstrainedLogitsProcessor):
    r"""
    JSON-schema constrained decoding, the setting of "Generating Structured Outputs from Language Models: Benchmark
    and Studies" (Geng et al., arXiv 2501.10868, JSONSchemaBench): the output is a JSON document valid under the
    schema (Draft 2020-12 as supported by llguidance); schemas with keywords the engine does not implement are
    refused with a ``ValueError`` naming them (``lenient=True`` to ignore them instead).

    Args:
        tokenizer: the model's fast tokenizer.
        schema: the JSON schema (dict or JSON text); ``True`` or ``{}`` for any JSON value.
        whitespace_flexible: allow free JSON whitespace (default: compact ``", "`` / ``": "`` separators only).
        lenient: ignore unsupported keywords instead of refusing the schema.
        eos_token_id, vocab_size: as in :class:`GrammarConstrainedLogitsProcessor`.

    Example:
        >>> from hf_decoding_ext.structured import JsonSchemaLogitsProcessor
        >>> proc = JsonSchemaLogitsProcessor.for_model(model, tokenizer,
        ...                                            schema={"type": "array", "items": {"type": "integer"}})  # doctest: +SKIP
        >>> out = model.generate(**inputs, logits_processor=[proc], max_new_tokens=32)  # doctest: +SKIP
    """

    def __init__(self, tokenizer, schema: dict | str | bool = True, *, whitespace_flexible: bool = False,
                 lenient: bool = False, eos_token_id=None, vocab_size: int | None = None):
        from hf_decoding_ext.structured.grammar import json_schema

        super().__init__(tokenizer, json_schema(schema, whitespace_flexible=whitespace_flexible, lenient=lenient),
                         eos_token_id=eos_token_id, vocab_size=vocab_size)
        self.schema = schema

    @classmethod
    def for_model(cls, model=None, tokenizer=None, schema: dict | str | bool = True, whitespace_flexible: bool = False,
                  lenient: bool = False, **kwargs) -> JsonSchemaLogitsProcessor:
        """Build for ``model`` (eos ids from its generation config, mask width from its vocabulary)."""
        if tokenizer is None:
            raise ValueError(f"{cls.__name__} needs the model's tokenizer")
        if model is not None:
            kwargs.setdefault("eos_token_id", eos_ids_of(model, tokenizer))
            kwargs.setdefault("vocab_size", max(int(model.config.vocab_size), len(tokenizer)))
        return cls(tokenizer, schema, whitespace_flexible=whitespace_flexible, lenient=lenient, **kwargs)
