"""Sketch-guided constrained decoding (SGCD): a local model refines a blackbox LLM's unconstrained "sketch" into an
output that satisfies a grammar, by grammar-constrained decoding conditioned on the task input and the sketch.

Also here: the refinement prompt builder (:func:`build_refinement_prompt`) and the task input recovered from a
chat-formatted prompt (:func:`task_input_from_prompt`). The closed information extraction task of the shipped toy set
``data/sketch_cie.jsonl`` (its loader, triplet grammar, parsers and F1) is in
:mod:`hf_decoding_ext.bench.tasks.sketch_cie`.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
from transformers import DynamicCache

from hf_decoding_ext.core.loop import DecodingLoop, GenerationState
from hf_decoding_ext.core.models import task_input_from_prompt  # noqa: F401 - re-exported (moved to core)
from hf_decoding_ext.core.rows import broadcast_rows
from hf_decoding_ext.structured.json_schema import GrammarConstrainedLogitsProcessor
from hf_decoding_ext.structured.grammar import Grammar, as_grammar, choices as choices_grammar, compile_grammar, eos_ids_of

DEFAULT_INSTRUCTION = (
    "You are given an input and a draft answer (a sketch) written by another model. The draft may use other names "
    "than the required ones, miss facts or add wrong ones. Write the correct final answer for the input in the "
    "required format, using the draft as a guide."
)
"""Task description placed before the demonstrations (the paper's prompt opens with one, e.g. "you will be provided
with a draft ... Your task is to correct the annotations")."""



# ------------------------------------------------------------------------------------------------ prompts
def _check_text(name: str, value) -> str:
    if not isinstance(value, str):
        raise ValueError(f"{name} must be a string, got {type(value).__name__}")
    return value


def _check_demonstrations(demonstrations) -> list[dict[str, str]]:
    if demonstrations is None:
        return []
    if isinstance(demonstrations, (str, Mapping)) or not isinstance(demonstrations, Sequence):
        raise ValueError("demonstrations must be a list of {'input', 'sketch', 'output'} dicts")
    out = []
    for i, d in enumerate(demonstrations):
        if not isinstance(d, Mapping) or not all(isinstance(d.get(k), str) for k in ("input", "sketch", "output")):
            raise ValueError(f"demonstration {i} must be a dict with string 'input', 'sketch' and 'output' fields")
        out.append({k: d[k] for k in ("input", "sketch", "output")})
    return out


def _user_turn(task_input: str, sketch: str | None) -> str:
    return f"Input: {task_input}" if sketch is None else f"Input: {task_input}\nSketch: {sketch}"


def _uses_chat(tokenizer, chat: bool | None) -> bool:
    has_template = getattr(tokenizer, "chat_template", None) is not None
    if chat and not has_template:
        raise ValueError("chat=True but the tokenizer has no chat template")
    return has_template if chat is None else bool(chat)


def build_refinement_prompt(tokenizer, task_input: str, sketch: str | None, demonstrations=None,
                            instruction: str | None = DEFAULT_INSTRUCTION, chat: bool | None = None) -> str:
    """The constrained decoder's prompt text: instruction, few-shot demonstrations ``(input, sketch) -> output``,
    then the task input and its sketch (the output is left for the constrained decoder).

    With a chat template (``chat=None`` uses it when the tokenizer has one) every demonstration is a user turn
    ``"Input: ...\\nSketch: ..."`` answered by an assistant turn holding its output, the instruction opens the first
    user turn, and the prompt ends with the generation prompt of the assistant. Without one, the same blocks are
    written one after the other, each ending with ``"Output:\\n"`` and the demonstration's output.
    ``sketch=None`` leaves the sketch out everywhere: the plain few-shot constrained-decoding prompt (the paper's
    "constrained decoding without sketch" baseline), for comparisons.

    Example:
        >>> from transformers import AutoTokenizer  # doctest: +SKIP
        >>> print(build_refinement_prompt(tokenizer, "Ottawa is the capital of Canada.", "(Ottawa, capital city of,"
        ...       " Canada)", chat=False, instruction=None))  # doctest: +SKIP
        Input: Ottawa is the capital of Canada.
        Sketch: (Ottawa, capital city of, Canada)
        Output:
        <BLANKLINE>
    """
    _check_text("task_input", task_input)
    if sketch is not None:
        _check_text("sketch", sketch)
    if instruction is not None:
        _check_text("instruction", instruction)
    demos = _check_demonstrations(demonstrations)
    use_sketch = sketch is not None
    turns = [(_user_turn(d["input"], d["sketch"] if use_sketch else None), d["output"]) for d in demos]
    turns.append((_user_turn(task_input, sketch), None))
    if _uses_chat(tokenizer, chat):
        messages = []
        for i, (user, answer) in enumerate(turns):
            if i == 0 and instruction:
                user = f"{instruction}\n\n{user}"
            messages.append({"role": "user", "content": user})
            if answer is not None:
                messages.append({"role": "assistant", "content": answer})
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    blocks = [f"{user}\nOutput:\n" + (answer if answer is not None else "") for user, answer in turns]
    text = "\n\n".join(blocks)
    return f"{instruction}\n\n{text}" if instruction else text


# ------------------------------------------------------------------------------------------------ the loop
class SketchGuidedDecoding(DecodingLoop):
    r"""
    Sketch-guided constrained decoding (SGCD), from "Sketch-Guided Constrained Decoding for Boosting Blackbox Large
    Language Models without Logit Access" (Geng, Döner, Wendler, Josifoski and West, ACL 2024, arXiv 2401.09967).

    A blackbox LLM, whose logits are not available, first writes an unconstrained answer, the *sketch*. The local
    model (the one ``generate()`` runs) then writes the final output under the constraint (a JSON schema, a regular
    expression, a Lark/GBNF grammar or a list of choices), conditioned on the task input and the sketch: it is
    prompted with an instruction, few-shot demonstrations ``(input, sketch) -> output`` and the task input with its
    sketch (:func:`build_refinement_prompt`), and decoded with
    :class:`~hf_decoding_ext.structured.json_schema.GrammarConstrainedLogitsProcessor` (llguidance token masks).
    Every complete output is a sentence of the grammar; the sketch supplies what the small model would not find on
    its own (entities, facts, structure), the grammar what the blackbox model does not respect (names of a fixed
    inventory, the output format).

    The task input of each row is taken from the prompt given to ``generate()`` (the last user message of a
    chat-formatted prompt, see :func:`task_input_from_prompt`) unless ``task_input=`` is given. The refinement prompt
    is internal: the returned sequences are the caller's prompt followed by the refined output, as for any
    ``generate()`` call. Greedy or sampling follow ``generate()`` (``do_sample``, temperature, top-k/top-p and the
    caller's own processors are applied after the grammar mask); ``max_new_tokens``, eos, stopping criteria and a
    ``streamer`` are honoured. Batches are supported: the refinement prompts share their instruction and
    demonstrations, which are run once and whose keys/values are copied to every row (each row's own part follows
    after padding). If ``max_new_tokens`` ends a row before the grammar is complete, its output is only a valid
    prefix: check ``grammar_complete``.

    Args:
        tokenizer: the model's fast Hugging Face tokenizer (used for the prompts and by the grammar engine).
        grammar: a :class:`~hf_decoding_ext.structured.grammar.Grammar` or a JSON-schema dict; or exactly one of
        json_schema, regex, lark, choices: the constraint as a JSON schema (dict or JSON text), a regular expression,
            a Lark (or GBNF) grammar, or a list of allowed outputs.
        sketch: the blackbox model's answer: one string for every row, or a list with one per batch row.
        sketcher: instead of ``sketch``, the blackbox itself: any callable ``task_input_text -> sketch_text`` (for
            example a function sending the text, with its own few-shot prompt, to a chat-completion API and returning
            the reply). It is called once per row at the start of every ``generate()`` call, with the row's task
            input; it must return a string.
        demonstrations: few-shot examples, a list of ``{"input", "sketch", "output"}`` dicts (outputs in the
            constraint's format; the paper uses a few).
        instruction: task description placed before the demonstrations (default :data:`DEFAULT_INSTRUCTION`;
            ``None`` for none).
        task_input: the task input text (one string, or one per row) instead of the one read from the prompt.
        chat: apply the tokenizer's chat template to the refinement prompt (default: when it has one).
        eos_token_id: eos id(s) the grammar may end with (default: ``generate()``'s, else the model's, else the
            tokenizer's; :meth:`for_model` takes the model's generation config).
        vocab_size: width of the model's logits (default: the model's vocabulary, at least ``len(tokenizer)``).

    Returns (with ``return_dict_in_generate=True``) also ``sketches`` (the sketch of each row),
    ``refinement_prompts`` (the texts the constrained decoder was run on) and ``grammar_complete`` (``(batch,)``
    bool tensor: the output is a complete sentence of the grammar); the same is kept in :attr:`last_result`.
    ``past_key_values`` in that output is the (unused) cache of the caller's prompt, not the refinement cache.

    Deviations: the paper constrains closed information extraction with a trie of entity / relation names and
    constituency parsing with a context-free grammar (transformers-CFG); here any llguidance constraint, e.g.
    :func:`~hf_decoding_ext.bench.tasks.sketch_cie.triplet_grammar` for the triplet task. Its prompt is one
    plain-text block (input and sketch joined by a separator, then the output, between quote delimiters); here a
    chat conversation for instruct models (demonstrations as turns) or labelled plain-text blocks. The paper also
    runs the constrained decoder with beam search; here greedy search or sampling, as ``generate()`` asks
    (``num_beams > 1`` is refused).

    Example:
        >>> from hf_decoding_ext.core.models import load_model, encode_prompts
        >>> from hf_decoding_ext.structured.sketch_guided import SketchGuidedDecoding
        >>> model, tokenizer = load_model()  # doctest: +SKIP
        >>> loop = SketchGuidedDecoding.for_model(model, tokenizer, sketch="Apples are a fruit.",
        ...                                       choices=["apple", "banana", "cherry"])  # doctest: +SKIP
        >>> inputs = encode_prompts(tokenizer, "Name a fruit.")  # doctest: +SKIP
        >>> out = model.generate(**inputs, custom_generate=loop, do_sample=False, max_new_tokens=8)  # doctest: +SKIP
        >>> tokenizer.decode(out[0, inputs.input_ids.shape[1]:], skip_special_tokens=True)  # doctest: +SKIP
        'apple'
    """

    def __init__(self, tokenizer, grammar: Grammar | dict | None = None, *, json_schema=None, regex=None,
                 lark=None, choices=None, sketch: str | Sequence[str] | None = None,
                 sketcher: Callable[[str], str] | None = None, demonstrations=None,
                 instruction: str | None = DEFAULT_INSTRUCTION, task_input: str | Sequence[str] | None = None,
                 chat: bool | None = None, eos_token_id=None, vocab_size: int | None = None):
        if tokenizer is None:
            raise ValueError("SketchGuidedDecoding needs the model's tokenizer")
        if choices is not None:
            if any(g is not None for g in (grammar, json_schema, regex, lark)):
                raise ValueError("give exactly one constraint: grammar=, json_schema=, regex=, lark= or choices=")
            if isinstance(choices, str):
                raise ValueError("choices must be a list of strings (use regex= for a pattern)")
            self.grammar = choices_grammar(choices)
        else:
            try:
                self.grammar = as_grammar(grammar, json_schema_=json_schema, regex_=regex, lark_=lark)
            except ValueError as err:
                raise ValueError(f"{err} (or choices=)") from None
        if (sketch is None) == (sketcher is None):
            raise ValueError("give exactly one of sketch= (the blackbox model's answer, one per row) or sketcher= "
                             "(a callable task_input -> sketch)")
        if sketcher is not None and not callable(sketcher):
            raise ValueError(f"sketcher must be a callable task_input -> sketch, got {type(sketcher).__name__}")
        self.sketches = self._texts("sketch", sketch)
        self.sketcher = sketcher
        self.task_inputs = self._texts("task_input", task_input)
        self.demonstrations = _check_demonstrations(demonstrations)
        if instruction is not None:
            _check_text("instruction", instruction)
        self.instruction = instruction
        _uses_chat(tokenizer, chat)  # chat=True without a template: a clear error now
        self.chat = chat
        self.tokenizer = tokenizer
        self.eos_token_id = eos_token_id
        if vocab_size is not None and vocab_size < len(tokenizer):
            raise ValueError(f"vocab_size {vocab_size} is smaller than the tokenizer ({len(tokenizer)} tokens)")
        self.vocab_size = vocab_size
        # validate and compile now, so that a bad grammar fails before any generation
        compile_grammar(tokenizer, self.grammar, eos_ids_of(None, tokenizer, eos_token_id),
                        vocab_size or len(tokenizer))
        self.last_result: dict[str, Any] | None = None

    @classmethod
    def for_model(cls, model=None, tokenizer=None, sketch=None, sketcher=None, grammar=None, json_schema=None,
                  regex=None, lark=None, choices=None, demonstrations=None,
                  instruction: str | None = DEFAULT_INSTRUCTION, task_input=None,
                  chat: bool | None = None) -> SketchGuidedDecoding:
        """Build for ``model``: eos ids from its generation config, mask width from its vocabulary size."""
        if tokenizer is None:
            raise ValueError("SketchGuidedDecoding.for_model needs the model's tokenizer")
        eos, vocab = None, None
        if model is not None:
            eos = list(eos_ids_of(model, tokenizer))
            n = getattr(model.config, "vocab_size", None)
            vocab = max(int(n), len(tokenizer)) if n is not None else None
        return cls(tokenizer, grammar, json_schema=json_schema, regex=regex, lark=lark, choices=choices,
                   sketch=sketch, sketcher=sketcher, demonstrations=demonstrations, instruction=instruction,
                   task_input=task_input, chat=chat, eos_token_id=eos, vocab_size=vocab)

    @staticmethod
    def _texts(name: str, value) -> list[str] | None:
        if value is None:
            return None
        if isinstance(value, str):
            return [value]
        if not isinstance(value, Sequence) or not value or not all(isinstance(v, str) for v in value):
            raise ValueError(f"{name} must be a string or a non-empty list of strings (one per batch row)")
        return list(value)

    @staticmethod
    def _per_row(name: str, values: list[str], batch: int) -> list[str]:
        return broadcast_rows(name, values, batch)

    # ------------------------------------------------------------------------------------------------ prompts
    def task_inputs_of(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> list[str]:
        """The task input of each row: ``task_input=`` if given, else read from the (left-padded) prompt."""
        batch = input_ids.shape[0]
        if self.task_inputs is not None:
            return self._per_row("task_input", self.task_inputs, batch)
        mask = torch.ones_like(input_ids) if attention_mask is None else attention_mask
        return [task_input_from_prompt(self.tokenizer, row[m.bool()].tolist()) for row, m in zip(input_ids, mask)]

    def sketches_for(self, task_inputs: list[str]) -> list[str]:
        """The sketch of each row: the given ones, or the sketcher's answer for each task input."""
        if self.sketches is not None:
            return self._per_row("sketch", self.sketches, len(task_inputs))
        out = []
        for text in task_inputs:
            sketch = self.sketcher(text)
            if not isinstance(sketch, str):
                raise ValueError(f"the sketcher must return a string, got {type(sketch).__name__}")
            out.append(sketch)
        return out

    def refinement_prompt(self, task_input: str, sketch: str) -> str:
        """The constrained decoder's prompt for one row (see :func:`build_refinement_prompt`)."""
        return build_refinement_prompt(self.tokenizer, task_input, sketch, self.demonstrations, self.instruction,
                                       self.chat)

    def _encode(self, texts: list[str], pad_id: int) -> tuple[torch.Tensor, torch.Tensor, int]:
        """Token ids and attention mask of the refinement prompts, and the length of their shared token prefix.

        The instruction and demonstrations are the same in every row: the rows are laid out as
        ``[shared prefix | padding | own suffix]`` so that the prefix can be run once (padding sits between the
        prefix and the suffix; positions follow the attention mask). Without a shared prefix this is plain left
        padding (shared length 0)."""
        special = not _uses_chat(self.tokenizer, self.chat)  # a rendered chat template already has its specials
        rows = [list(self.tokenizer(t, add_special_tokens=special)["input_ids"]) for t in texts]
        if any(len(r) == 0 for r in rows):
            raise ValueError("a refinement prompt is empty")
        shared = min(len(r) for r in rows) - 1  # every row keeps at least one token of its own
        for r in rows[1:]:
            k = 0
            while k < shared and r[k] == rows[0][k]:
                k += 1
            shared = k
        if len(rows) == 1:
            shared = 0
        width = shared + max(len(r) - shared for r in rows)
        ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
        mask = torch.zeros((len(rows), width), dtype=torch.long)
        for i, r in enumerate(rows):
            own = r[shared:]
            ids[i, :shared] = torch.tensor(r[:shared], dtype=torch.long)
            mask[i, :shared] = 1
            ids[i, width - len(own):] = torch.tensor(own, dtype=torch.long)
            mask[i, width - len(own):] = 1
        return ids, mask, shared

    def _eos_ids(self, state: GenerationState) -> tuple[int, ...]:
        if self.eos_token_id is not None:
            return eos_ids_of(None, self.tokenizer, self.eos_token_id)
        eos = getattr(state.generation_config, "_eos_token_tensor", None)
        if eos is not None:
            return tuple(sorted({int(e) for e in eos.flatten().tolist()}))
        return eos_ids_of(state.model, self.tokenizer)

    # ------------------------------------------------------------------------------------------------ decoding
    @torch.no_grad()
    def run(self, state: GenerationState):
        batch = state.batch_size
        task_inputs = self.task_inputs_of(state.input_ids, state.attention_mask)
        sketches = self.sketches_for(task_inputs)
        prompts = [self.refinement_prompt(t, s) for t, s in zip(task_inputs, sketches)]
        pad = state.pad_token_id
        pad_id = int(pad) if pad is not None else (self.tokenizer.pad_token_id or 0)
        ids, mask, shared = self._encode(prompts, pad_id)
        ids, mask = ids.to(state.device), mask.to(state.device)

        model_vocab = getattr(state.model.config, "vocab_size", None)
        vocab = self.vocab_size or max(int(model_vocab or 0), len(self.tokenizer))
        constraint = GrammarConstrainedLogitsProcessor(self.tokenizer, self.grammar,
                                                       eos_token_id=list(self._eos_ids(state)), vocab_size=vocab)
        cache = DynamicCache(config=state.model.config)
        if shared > 0:  # run the shared instruction + demonstrations once, then copy its keys/values to every row
            state.forward(input_ids=ids[:1, :shared], attention_mask=mask[:1, :shared], cache=cache)
            cache.batch_repeat_interleave(batch)
        while not state.done:
            out = state.forward(input_ids=ids, attention_mask=mask, cache=cache)
            logits = out.logits[:, -1, :]
            scores = constraint(state.input_ids, logits)  # grammar mask first, then the caller's processors
            scores = state.process(scores)
            state.record(scores, logits)
            if state.append(state.select(scores)) == 0:
                break
            ids = torch.cat([ids, state.input_ids[:, -1:]], dim=1)
            mask = torch.cat([mask, mask.new_ones((batch, 1))], dim=1)
        constraint(state.input_ids, torch.zeros(batch, vocab, device=state.device))  # sync with the final tokens
        complete = torch.tensor([constraint.is_complete(r) for r in range(batch)], dtype=torch.bool)
        result = {"sketches": sketches, "refinement_prompts": prompts, "grammar_complete": complete}
        self.last_result = result
        return dict(result)
