"""Grammar-constrained decoding as a ``LogitsProcessor``: JSON schema, regular expression, Lark/GBNF grammar.

The token mask comes from llguidance (:mod:`hf_decoding_ext.structured.grammar`); this module only applies it.
"""

from __future__ import annotations

import torch
from transformers import LogitsProcessor

from hf_decoding_ext.structured.completion import BudgetGuard, CompletionFinder, json_completer_for
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
        max_new_tokens: the token budget of the output (pass the ``max_new_tokens`` given to ``generate()``). With
            it the processor keeps a way to close the document within what is left of the budget
            (:class:`~hf_decoding_ext.structured.completion.BudgetGuard`): at every step the highest-scored tokens
            after which no completion fits are removed, and near the end of the budget only tokens that keep a
            completion in reach are allowed, so a greedy row always ends with a complete document. ``None``
            (default): no budget, the output may be a valid prefix cut by ``max_new_tokens``.
        verify_top_k: with ``max_new_tokens``, how many of the highest-scored allowed tokens are checked per step
            (sampling may draw an unchecked one while the budget is ample; the bound is re-computed after it).
        slack: with ``max_new_tokens``, how many tokens before the known completion no longer fits the tight zone
            starts.
        limits: llguidance's parser limits (a dict of :func:`~hf_decoding_ext.structured.grammar.parser_limits`
            arguments, e.g. ``{"step_lexer_fuel": 2_000_000}``); ``None``: the engine's defaults. The engine's
            warnings about the grammar are issued as ``UserWarning`` and kept in ``processor.compiled.warnings``.

    A row left with no allowed token (the grammar's tokens all removed by a processor that ran before this one, such
    as ``no_repeat_ngram_size``, ``bad_words_ids`` or ``min_new_tokens``, which transformers runs before user
    processors) raises a ``ValueError`` naming the conflict instead of letting generation pick a token the grammar
    forbids.

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
                 lark=None, eos_token_id=None, vocab_size: int | None = None, max_new_tokens: int | None = None,
                 verify_top_k: int = 4, slack: int = 4, limits: dict | None = None):
        self.grammar = as_grammar(grammar, json_schema_=json_schema, regex_=regex, lark_=lark)
        self.eos_token_ids = eos_ids_of(None, tokenizer, eos_token_id)
        if vocab_size is not None and vocab_size < len(tokenizer):
            raise ValueError(f"vocab_size {vocab_size} is smaller than the tokenizer ({len(tokenizer)} tokens)")
        self.tokenizer = tokenizer
        self.vocab_size = vocab_size or len(tokenizer)
        self.compiled = compile_grammar(tokenizer, self.grammar, self.eos_token_ids, self.vocab_size, limits=limits,
                                        warn=True)
        from hf_decoding_ext.structured.deferred import deferred_rows_for

        self.deferred = deferred_rows_for(self.grammar, self.compiled)
        self.budget: BudgetGuard | None = None
        if max_new_tokens is not None:
            self.set_budget(max_new_tokens, verify_top_k=verify_top_k, slack=slack)
        self.reset()

    def set_budget(self, max_new_tokens: int, verify_top_k: int = 4, slack: int = 4) -> None:
        """Make the processor budget-aware for generations of at most ``max_new_tokens`` tokens (the constructor's
        ``max_new_tokens``; the CLI calls it with its ``--max-new-tokens``)."""
        finder = CompletionFinder(self.compiled, self.tokenizer, json=json_completer_for(self.grammar))
        finder.deferred = getattr(self, "deferred", None)  # completions must pass the keywords checked on completion
        self.budget = BudgetGuard(finder, max_new_tokens, verify_top_k=verify_top_k, slack=slack)

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
        if self.budget is not None:
            self.budget.reset()

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
        allowed = self.rows.allowed(vocab_size or self.vocab_size, input_ids.device)
        return self._filter_deferred(generated, allowed)

    def _filter_deferred(self, generated, allowed):
        """Remove the tokens that complete a value failing a keyword checked on completion (``unmaskable=
        "validate"``); rows the grammar rejected keep their eos-only mask."""
        if self.deferred is not None:
            live = [r for r in range(len(generated)) if r not in self.rows.dead]
            if live:
                sub = allowed[live]
                self.deferred.filter([generated[r] for r in live], sub)
                allowed[live] = sub
        return allowed

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        generated = self.generated(input_ids)
        self.rows.sync(generated)
        allowed = self._filter_deferred(generated, self.rows.allowed(scores.shape[-1], scores.device))
        if self.budget is not None:
            for r, row in enumerate(generated):
                if r not in self.rows.dead:
                    allowed[r] = self.budget.restrict(self.rows.matchers[r], self.rows.consumed[r], allowed[r],
                                                      scores[r])
        out = scores.masked_fill(~allowed, float("-inf"))
        empty = (out == float("-inf")).all(dim=-1)
        if bool(empty.any()):
            self._raise_conflict(int(empty.nonzero()[0]), allowed, scores, generated)
        return out

    def _raise_conflict(self, row: int, allowed, scores, generated) -> None:
        if not bool(allowed[row].any()) and self.deferred is not None and row not in self.rows.dead:
            from hf_decoding_ext.structured.deferred import DeferredDeadEnd

            grammar_allowed = self.rows.allowed(allowed.shape[-1])[row]
            raise DeferredDeadEnd(
                f"row {row}: no token is left after {len(generated[row])} generated tokens: every token the grammar "
                f"allows completes a value that fails a keyword checked on completion "
                f"({self.deferred.failure(generated[row], grammar_allowed)}). The output reached a dead end of the "
                "deferred checks (unmaskable='validate' masks those keywords lazily); retry with sampling or "
                "restate the schema without them.")
        kept = allowed[row].nonzero().flatten()[:8].tolist()
        text = [self.tokenizer.decode([t]) for t in kept]
        raise ValueError(
            f"row {row}: no token is left after {len(generated[row])} generated tokens. The grammar allows "
            f"{int(allowed[row].sum())} token(s) here (e.g. {text}), but every one of them had a score of -inf "
            "before this processor ran: another processor removed them (transformers runs no_repeat_ngram_size, "
            "bad_words_ids, min_new_tokens / min_length and sequence_bias before user processors). Relax that "
            "setting or the grammar.")

    # ------------------------------------------------------------------------------------------------ hooks
    def rollback(self, num_tokens: int, row: int | None = None) -> None:
        """Undo the last ``num_tokens`` tokens (for loops that track tokens themselves; the processor also
        re-synchronises with ``input_ids`` on every call)."""
        if self.rows is not None:
            self.rows.rollback(num_tokens, row)

    def is_complete(self, row: int = 0, input_ids: torch.LongTensor | None = None) -> bool:
        """Whether ``row``'s output is a complete sentence of the grammar: as of the last call, or after
        ``input_ids`` (the sequences ``generate()`` returned, which end with a token no processor call has seen)."""
        if input_ids is not None:
            self.rows.sync(self.generated(input_ids))
        if self.rows is None or not self.rows.accepting(row):
            return False
        if self.deferred is not None:
            st = self.deferred.state_for(self.rows.consumed[row])
            return self.deferred.checker.finish(st).failed is None
        return True

    @property
    def mask_seconds(self) -> float:
        """Seconds spent computing token masks in the current generation."""
        return 0.0 if self.rows is None else self.rows.mask_seconds + self.rows.sync_seconds


def cap_open_lengths(schema, max_string_length: int | None = None, max_items: int | None = None):
    """A copy of ``schema`` where strings without a ``maxLength`` (and without ``enum``/``const``/``format``) get
    ``maxLength = max_string_length`` and arrays without a ``maxItems`` get ``maxItems = max_items`` (kept at least
    their ``minLength``/``minItems``). A deviation from the user's schema, for models that repeat themselves inside
    open strings and arrays; documents valid under the capped schema are valid under the original."""
    from hf_decoding_ext.structured.schema_coverage import transform_schema

    def visit(out: dict, path: str) -> dict:
        types = out.get("type")
        types = set(types) if isinstance(types, list) else {types}
        if (max_string_length is not None and "string" in types and "maxLength" not in out
                and not any(k in out for k in ("enum", "const", "format"))):
            out["maxLength"] = max(int(max_string_length), int(out.get("minLength", 0) or 0))
        if max_items is not None and "array" in types and "maxItems" not in out:
            out["maxItems"] = max(int(max_items), int(out.get("minItems", 0) or 0))
        return out

    return transform_schema(schema, visit)


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
        max_string_length: cap the length (in characters) of strings whose schema sets no ``maxLength`` (and no
            ``enum``, ``const`` or ``format``). A deviation from the schema, off by default: the default model
            otherwise repeats itself inside open strings until the budget ends (:func:`cap_open_lengths`).
        max_items: cap the items of arrays whose schema sets no ``maxItems`` (a deviation, off by default).
        unknown_formats, one_of: schema rewrites that widen coverage (see
            :func:`~hf_decoding_ext.structured.grammar.json_schema`).
        unmaskable: ``"error"`` (default) refuses keywords the engine cannot mask; ``"validate"`` masks the schema
            without them and checks them on every value as it completes (:mod:`hf_decoding_ext.structured.deferred`).
            Every completed output then validates and no valid output is blocked, but a row can reach a prefix that
            no valid document extends; the processor then raises a ``ValueError`` naming the failed check.
        eos_token_id, vocab_size, max_new_tokens, verify_top_k, slack, limits: as in
            :class:`GrammarConstrainedLogitsProcessor` (``max_new_tokens``: finish the document within that budget).

    Example:
        >>> from hf_decoding_ext.structured import JsonSchemaLogitsProcessor
        >>> proc = JsonSchemaLogitsProcessor.for_model(model, tokenizer,
        ...                                            schema={"type": "array", "items": {"type": "integer"}})  # doctest: +SKIP
        >>> out = model.generate(**inputs, logits_processor=[proc], max_new_tokens=32)  # doctest: +SKIP
    """

    def __init__(self, tokenizer, schema: dict | str | bool = True, *, whitespace_flexible: bool = False,
                 lenient: bool = False, eos_token_id=None, vocab_size: int | None = None,
                 max_new_tokens: int | None = None, verify_top_k: int = 4, slack: int = 4,
                 max_string_length: int | None = None, max_items: int | None = None, limits: dict | None = None,
                 unknown_formats: str = "error", one_of: str = "disjoint", unmaskable: str = "error"):
        from hf_decoding_ext.structured.grammar import json_schema

        for name, value in (("max_string_length", max_string_length), ("max_items", max_items)):
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
                raise ValueError(f"{name} must be a positive integer or None, got {value!r}")
        grammar_schema = schema
        if max_string_length is not None or max_items is not None:
            if isinstance(schema, str):
                import json as _json

                try:
                    grammar_schema = _json.loads(schema)
                except (ValueError, RecursionError) as err:
                    raise ValueError(f"schema is not valid JSON: {err}") from None
            grammar_schema = cap_open_lengths({} if grammar_schema is True else grammar_schema, max_string_length,
                                              max_items)
        self.max_string_length, self.max_items = max_string_length, max_items
        super().__init__(tokenizer, json_schema(grammar_schema, whitespace_flexible=whitespace_flexible,
                                                lenient=lenient, unknown_formats=unknown_formats, one_of=one_of,
                                                unmaskable=unmaskable),
                         eos_token_id=eos_token_id, vocab_size=vocab_size, max_new_tokens=max_new_tokens,
                         verify_top_k=verify_top_k, slack=slack, limits=limits)
        self.schema = schema

    @classmethod
    def for_model(cls, model=None, tokenizer=None, schema: dict | str | bool = True, whitespace_flexible: bool = False,
                  lenient: bool = False, **kwargs) -> JsonSchemaLogitsProcessor:
        """Build for ``model`` (eos ids from its generation config, mask width from its vocabulary); ``kwargs``: any
        other argument of the constructor (``max_new_tokens``, ``max_string_length``, ...)."""
        if tokenizer is None:
            raise ValueError(f"{cls.__name__} needs the model's tokenizer")
        if model is not None:
            kwargs.setdefault("eos_token_id", eos_ids_of(model, tokenizer))
            kwargs.setdefault("vocab_size", max(int(model.config.vocab_size), len(tokenizer)))
        return cls(tokenizer, schema, whitespace_flexible=whitespace_flexible, lenient=lenient, **kwargs)
