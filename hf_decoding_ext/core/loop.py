"""Shared machinery for decoding loops passed to ``generate(custom_generate=...)``.

transformers 5 calls a ``custom_generate`` callable after its usual input preparation, with the signature of
``GenerationMixin._sample``::

    loop(model, input_ids, logits_processor, stopping_criteria, generation_config, synced_gpus=False,
         streamer=None, **model_kwargs)

where ``logits_processor`` and ``stopping_criteria`` already hold everything the ``generate()`` flags asked for
(temperature, top-k/top-p, eos, max_new_tokens, ...), and ``model_kwargs`` holds the attention mask (``None`` when all
ones), the position ids, the cache (``cache``: ``generate()``'s own or the one the user passed as ``cache=`` or the
deprecated ``past_key_values=``) and any extra model input. :meth:`DecodingLoop.check_generate_inputs` refuses what a
loop would otherwise ignore (extra model inputs, unsupported caches and output flags) with a ``ValueError``;
:class:`DecodingLoop` then turns the call into a :class:`GenerationState`, which every loop in this library uses to
run forwards with a KV cache (with left padding), branch and roll back the cache for lookahead, append tokens
with eos/stopping/streamer handling, and build the ``generate()``-style return value.
"""

from __future__ import annotations

import abc
import copy
import sys
from typing import Any

import torch
from transformers import DynamicCache
from transformers.generation.utils import GenerateDecoderOnlyOutput

from hf_decoding_ext.core import lifecycle


def given_cache(model_kwargs: dict[str, Any]):
    """The cache ``generate()`` hands a loop: ``model_kwargs["cache"]`` (transformers 5.x: ``generate()``'s own, or the
    user's, passed as ``cache=`` or as the deprecated ``past_key_values=``, which ``generate()`` renames), else
    ``model_kwargs["past_key_values"]`` (a direct call with the older name); ``None`` when there is none."""
    cache = model_kwargs.get("cache")
    return model_kwargs.get("past_key_values") if cache is None else cache


class GenerationState:
    """Mutable state of one decoding run: sequences, attention mask, KV cache, finished rows, recorded scores.

    The cache is kept *lazy*: it holds keys/values for a prefix of ``input_ids`` and :meth:`forward` feeds whatever
    suffix is not yet cached (plus optional extra tokens). Rows that finished (eos or a stopping criterion) keep
    receiving the pad token, exactly as in ``generate()``.
    """

    def __init__(self, model, input_ids, logits_processor, stopping_criteria, generation_config, streamer=None,
                 model_kwargs: dict[str, Any] | None = None):
        model_kwargs = model_kwargs or {}
        self.model = model
        self.input_ids = input_ids
        self.prompt_length = input_ids.shape[1]
        self.logits_processor = logits_processor
        self.stopping_criteria = stopping_criteria
        self.generation_config = generation_config
        self.streamer = streamer
        mask = model_kwargs.get("attention_mask")
        self.attention_mask = torch.ones_like(input_ids) if mask is None else mask.to(input_ids.dtype)
        cache = given_cache(model_kwargs)
        self.cache = cache if cache is not None else DynamicCache(config=model.config)
        self.pad_token_id = generation_config._pad_token_tensor
        if self.pad_token_id is None and generation_config.pad_token_id is not None:
            self.pad_token_id = torch.tensor(generation_config.pad_token_id, device=input_ids.device)
        self.has_eos_criterion = any(hasattr(c, "eos_token_id") for c in stopping_criteria)
        self.unfinished = torch.ones(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)
        self.return_dict = bool(generation_config.return_dict_in_generate)
        self.scores: list[torch.Tensor] | None = [] if (self.return_dict and generation_config.output_scores) else None
        self.logits: list[torch.Tensor] | None = [] if (self.return_dict and generation_config.output_logits) else None
        self.do_sample = bool(generation_config.do_sample)
        self.stats: dict[str, Any] = {"forwards": 0}
        self.assistant_model = None  # generate(assistant_model=...), set by DecodingLoop
        lifecycle.begin(logits_processor, input_ids)  # stateful processors start a new generation

    # ----------------------------------------------------------------------------------------------- properties
    @property
    def batch_size(self) -> int:
        return self.input_ids.shape[0]

    @property
    def device(self) -> torch.device:
        return self.input_ids.device

    @property
    def done(self) -> bool:
        return not bool(self.unfinished.any())

    @property
    def new_tokens(self) -> torch.Tensor:
        """Generated tokens so far, ``(batch, n_new)``."""
        return self.input_ids[:, self.prompt_length:]

    # ----------------------------------------------------------------------------------------------- forwards
    def position_ids(self, mask: torch.Tensor) -> torch.Tensor:
        return (mask.long().cumsum(-1) - 1).clamp(min=0)

    def forward(self, extra_ids: torch.Tensor | None = None, *, keep: bool = True, cache=None,
                input_ids: torch.Tensor | None = None, attention_mask: torch.Tensor | None = None,
                logits_to_keep: int | None = 1, output_hidden_states: bool = False, inputs_embeds=None):
        """Run the model on the uncached suffix of the sequences, plus ``extra_ids`` (``(batch, k)``) if given.

        Args:
            extra_ids: tokens to feed after ``input_ids`` (lookahead); they are not appended to the state.
            keep: keep the keys/values of ``extra_ids`` in the cache. With ``keep=False`` the cache is cropped back
                to the end of ``input_ids`` after the forward (the committed prefix stays cached).
            cache, input_ids, attention_mask: run on another branch (e.g. a repeated cache for several trials)
                instead of the state's own.
            logits_to_keep: number of trailing positions whose logits are computed (``None`` or 0: all).
            output_hidden_states: also return hidden states.
            inputs_embeds: embeddings to feed instead of the uncached token ids (same length as the suffix).

        Returns:
            The model output; ``logits`` are float32.
        """
        cache = self.cache if cache is None else cache
        ids = self.input_ids if input_ids is None else input_ids
        mask = self.attention_mask if attention_mask is None else attention_mask
        cached = cache.get_seq_length()
        new = ids[:, cached:]
        if extra_ids is not None:
            new = torch.cat([new, extra_ids.to(ids.device)], dim=1)
            mask = torch.cat([mask, mask.new_ones(extra_ids.shape)], dim=1)
        if new.shape[1] == 0 and inputs_embeds is None:
            raise RuntimeError("nothing to feed: the cache already covers the whole sequence")
        positions = self.position_ids(mask)[:, cached:]
        kwargs = dict(attention_mask=mask, position_ids=positions, past_key_values=cache, use_cache=True,
                      output_hidden_states=output_hidden_states, return_dict=True)
        if logits_to_keep:
            kwargs["logits_to_keep"] = logits_to_keep
        if inputs_embeds is not None:
            kwargs["inputs_embeds"] = inputs_embeds
        else:
            kwargs["input_ids"] = new
        out = self.model(**kwargs)
        self.stats["forwards"] += 1
        out.logits = out.logits.float()
        if not keep and extra_ids is not None:
            cache.crop(-extra_ids.shape[1])
        return out

    def next_token_logits(self, output_hidden_states: bool = False):
        """Raw float32 logits for the next token ``(batch, vocab)`` (and the model output)."""
        out = self.forward(output_hidden_states=output_hidden_states)
        return out.logits[:, -1, :], out

    def process(self, logits: torch.Tensor, input_ids: torch.Tensor | None = None) -> torch.Tensor:
        """Apply the caller's logits processors (temperature, top-k, this library's processors, ...)."""
        return self.logits_processor(self.input_ids if input_ids is None else input_ids, logits)

    def select_rows(self, indices: torch.Tensor, cache: bool = True) -> None:
        """Make the rows ``indices`` (``(n,)`` long; rows may repeat) of the state its rows, in that order: the
        sequences, attention mask, finished flags, the KV cache (unless ``cache=False``) and the per-row state of the
        logits processors (:func:`hf_decoding_ext.core.lifecycle.select_rows`; a stateful processor without the
        lifecycle is refused with a ``ValueError``)."""
        indices = torch.as_tensor(indices, dtype=torch.long, device=self.device)
        lifecycle.select_rows(self.logits_processor, indices, caller="selecting rows of a GenerationState")
        self.input_ids = self.input_ids[indices]
        self.attention_mask = self.attention_mask[indices]
        self.unfinished = self.unfinished[indices]
        if cache and self.cache.get_seq_length() > 0:
            self.cache.batch_select_indices(indices)

    def select(self, scores: torch.Tensor) -> torch.Tensor:
        """Pick the next token from processed scores: multinomial if ``do_sample`` else argmax. ``(batch,)``."""
        if self.do_sample:
            return torch.multinomial(torch.softmax(scores, dim=-1), num_samples=1).squeeze(1)
        return scores.argmax(dim=-1)

    # ----------------------------------------------------------------------------------------------- appending
    def record(self, scores: torch.Tensor | None = None, logits: torch.Tensor | None = None) -> None:
        """Keep per-step scores/logits for ``return_dict_in_generate`` outputs when they were requested."""
        if self.scores is not None and scores is not None:
            self.scores.append(scores)
        if self.logits is not None and logits is not None:
            self.logits.append(logits)

    def append(self, tokens: torch.Tensor) -> int:
        """Append tokens ``(batch,)`` or ``(batch, k)``, one position at a time, honouring the stopping criteria.

        Finished rows receive the pad token. Appending stops early when every row is finished (eos, max length or a
        custom criterion), so ``max_new_tokens`` is exact and an accepted run is truncated at eos.

        Returns:
            the number of positions appended.
        """
        if tokens.dim() == 1:
            tokens = tokens[:, None]
        appended = 0
        for j in range(tokens.shape[1]):
            if self.done:
                break
            tok = tokens[:, j].to(self.device)
            if self.has_eos_criterion and self.pad_token_id is not None:
                tok = torch.where(self.unfinished, tok, self.pad_token_id.to(tok.dtype))
            self.input_ids = torch.cat([self.input_ids, tok[:, None]], dim=1)
            self.attention_mask = torch.cat([self.attention_mask, self.attention_mask.new_ones((self.batch_size, 1))],
                                            dim=1)
            scores = tuple(self.scores) if self.scores else None
            self.unfinished = self.unfinished & ~self.stopping_criteria(self.input_ids, scores)
            if self.streamer is not None:
                self.streamer.put(tok.cpu())
            appended += 1
        return appended

    def truncate_cache(self) -> None:
        """Drop cached positions beyond ``input_ids`` (after a lookahead that kept its tokens)."""
        extra = self.cache.get_seq_length() - self.input_ids.shape[1]
        if extra > 0:
            self.cache.crop(-extra)

    # ----------------------------------------------------------------------------------------------- output
    def finish(self, **extra_outputs):
        """End the streamer and return what ``generate()`` returns (tensor or ``GenerateDecoderOnlyOutput``)."""
        if self.streamer is not None:
            self.streamer.end()
        if not self.return_dict:
            return self.input_ids
        out = GenerateDecoderOnlyOutput(
            sequences=self.input_ids,
            scores=tuple(self.scores) if self.scores is not None else None,
            logits=tuple(self.logits) if self.logits is not None else None,
            past_key_values=self.cache,
        )
        for k, v in extra_outputs.items():
            out[k] = v
        return out


def clone_cache(cache):
    """Independent copy of a KV cache (for branching)."""
    return copy.deepcopy(cache)


def repeat_cache(cache, repeats: int):
    """Copy of ``cache`` with every batch row repeated ``repeats`` times (row-major, like ``repeat_interleave``)."""
    new = copy.deepcopy(cache)
    new.batch_repeat_interleave(repeats)
    return new


def _generate_call_locals(loop) -> dict[str, Any]:
    """The local variables of the ``generate()`` call that invoked ``loop`` (``{}`` when not called from one).

    transformers 5.x forwards to a callable ``custom_generate`` only the arguments of ``GenerationMixin._sample`` plus
    the callable's *extra* keyword arguments found in ``**kwargs``; ``streamer`` (although ``generate()`` already
    streamed the prompt) and ``assistant_model`` (an explicit ``generate()`` parameter) are dropped. To keep
    ``streamer=`` and ``assistant_model=`` working for our loops, they are looked up in the calling ``generate()``
    frame, as is ``kwargs_has_position_ids`` (whether the user passed ``position_ids`` or ``generate()`` made them).
    """
    frame = sys._getframe(1)
    for _ in range(8):
        frame = frame.f_back
        if frame is None:
            return {}
        if frame.f_code.co_name == "generate" and frame.f_locals.get("custom_generate") is loop:
            return frame.f_locals
    return {}


def select_cache(cache, indices: torch.Tensor):
    """Copy of ``cache`` holding only the batch rows ``indices`` (``(n,)`` long; rows may repeat), for branching a
    subset of rows, e.g. ``select_cache(cache, rows.repeat_interleave(k))`` for ``k`` lookahead candidates per row."""
    new = copy.deepcopy(cache)
    new.batch_select_indices(indices.to(torch.long))
    return new


_LOOP_MODEL_INPUTS = frozenset({"attention_mask", "cache", "past_key_values", "position_ids", "use_cache",
                                "logits_to_keep", "output_hidden_states", "output_attentions", "return_dict"})
"""``generate()`` model kwargs a :class:`DecodingLoop` handles itself (:meth:`DecodingLoop.check_generate_inputs`)."""


class DecodingLoop(abc.ABC):
    """Base class of the library's ``custom_generate`` loops.

    Subclasses implement :meth:`run` (mutating a :class:`GenerationState` until ``state.done``) and may set
    ``supports_batch = False`` to refuse batch > 1 with a clear error. Constructor arguments are the method's
    hyper-parameters; per-run state lives in the :class:`GenerationState`, so one instance can be reused.
    """

    supports_batch: bool = True
    supports_beams: bool = False  # True for loops that are themselves a beam search (accept generate(num_beams=k))
    supports_sampling: bool = True
    supports_greedy: bool = True
    accepts_assistant_model: bool = False
    supports_output_scores: bool = True  # records one score (and logit) row per generated token with state.record
    supports_output_hidden_states: bool = False
    supports_output_attentions: bool = False
    needs_uncached_prompt: bool = False  # the first forward must cover the whole prompt (e.g. its hidden states)
    supports_sliding_window: bool = True  # False: tree masks / cache compaction that assume full attention

    def __call__(self, model, input_ids, logits_processor, stopping_criteria, generation_config, synced_gpus=False,
                 streamer=None, **model_kwargs):
        name = type(self).__name__
        if synced_gpus:
            raise ValueError(f"{name} does not support synced_gpus")
        if model.config.is_encoder_decoder:
            raise ValueError(f"{name} supports decoder-only models only")
        if input_ids.shape[0] > 1 and not self.supports_batch:
            raise ValueError(f"{name} supports batch size 1 only; got a batch of {input_ids.shape[0]}. "
                             "Call generate() once per prompt.")
        if generation_config.num_beams and generation_config.num_beams > 1 and not self.supports_beams:
            raise ValueError(f"{name} is its own search; num_beams > 1 is not supported")
        if generation_config.do_sample and not self.supports_sampling:
            raise ValueError(f"{name} is a deterministic search; call generate() with do_sample=False")
        if not generation_config.do_sample and not self.supports_greedy:
            raise ValueError(f"{name} samples; call generate() with do_sample=True")
        caller = _generate_call_locals(self)
        if streamer is None:
            streamer = caller.get("streamer")
        assistant_model = caller.get("assistant_model")
        if assistant_model is not None and not self.accepts_assistant_model:
            raise ValueError(f"{name} does not use an assistant model; drop assistant_model= from generate()")
        self.check_generate_inputs(model, input_ids, generation_config, model_kwargs, caller)
        state = GenerationState(model, input_ids, logits_processor, stopping_criteria, generation_config, streamer,
                                model_kwargs)
        state.assistant_model = assistant_model
        positions = model_kwargs.get("position_ids")
        if positions is not None and not (caller and not caller.get("kwargs_has_position_ids", True)):
            self._check_position_ids(state, positions)  # the user's (or a direct caller's), not generate()'s own
        callers_cache = state.cache
        if self.needs_uncached_prompt and state.cache.get_seq_length():
            state.cache = DynamicCache(config=model.config)  # a prefilled cache is recomputed, then filled below
        extra = self.run(state) or {}
        if state.cache is None:  # the loop's own cache is approximate (compressed): the caller's stays as it was
            state.cache = callers_cache
        elif state.cache is not callers_cache:  # the loop committed a branch's cache: the caller's object receives it
            callers_cache.__dict__.update(state.cache.__dict__)
            state.cache = callers_cache
        return state.finish(**extra)

    def check_generate_inputs(self, model, input_ids, generation_config, model_kwargs: dict[str, Any],
                              caller: dict[str, Any] | None = None) -> None:
        """Refuse with a ``ValueError`` what ``generate()`` hands the loop that the loop would otherwise ignore.

        What a loop honours (through :class:`GenerationState`): the attention mask, a cache (``generate()``'s own or
        the user's, under the ``cache`` or ``past_key_values`` name), also one that already holds a prefix of the
        prompt (decoding resumes where it stops), the position ids ``generate()`` derives from the mask, and the
        ``return_dict_in_generate`` / ``output_scores`` / ``output_logits`` outputs. What it refuses:

        * extra model inputs (``token_type_ids``, ``inputs_embeds``, ...): the loops feed the model token ids, the
          attention mask and positions derived from it, nothing else;
        * ``position_ids`` given by the caller that differ from the mask's (``cumsum(mask) - 1``) at attended tokens
          (checked once the state is built, :meth:`_check_position_ids`);
        * a cache other than a ``DynamicCache`` (the loops crop, copy and branch it), one holding as many positions
          as the prompt or more, or another batch size; ``input_ids`` holding only the uncached tokens (an attention
          mask longer than ``input_ids``): the loops need the whole sequence;
        * a model with sliding-window (or hybrid) attention when the loop sets ``supports_sliding_window = False``
          (tree masks and cache compaction assume full attention), naming the architecture;
        * ``output_hidden_states`` / ``output_attentions`` with ``return_dict_in_generate`` unless the loop sets
          ``supports_output_hidden_states`` / ``supports_output_attentions``; ``output_scores`` / ``output_logits``
          when it sets ``supports_output_scores = False``. Without ``return_dict_in_generate`` these flags have no
          effect, as in ``generate()``.

        ``use_cache=False`` and ``logits_to_keep`` only change speed; the loops always keep a cache.

        Args:
            model, input_ids, generation_config, model_kwargs: what ``generate()`` passed to the loop.
            caller: the locals of the calling ``generate()`` (:func:`_generate_call_locals`); ``{}`` or ``None`` for
                a direct call.

        Example:
            >>> model.generate(**inputs, token_type_ids=types, custom_generate=loop)  # doctest: +SKIP
            Traceback (most recent call last):
            ValueError: IsotropicProximalSearch feeds the model token ids, the attention mask and positions only; ...
        """
        name = type(self).__name__
        if not self.supports_sliding_window and any(DynamicCache(config=model.config).is_sliding):
            raise ValueError(f"{name} does not support the sliding-window attention of {type(model).__name__} "
                             f"(model_type {model.config.model_type!r}, sliding_window "
                             f"{getattr(model.config, 'sliding_window', None)}): its tree attention masks and cache "
                             "compaction assume full-attention layers")
        extra = sorted(k for k, v in model_kwargs.items() if v is not None and k not in _LOOP_MODEL_INPUTS)
        if extra:
            raise ValueError(f"{name} feeds the model token ids, the attention mask and positions only; it cannot "
                             f"pass the extra model input(s) {extra}: drop them from generate()")
        length = input_ids.shape[1]
        mask = model_kwargs.get("attention_mask")
        mask_length = mask.shape[-1] if mask is not None else getattr(generation_config, "_mask_length", None)
        if mask_length is not None and mask_length != length:
            raise ValueError(f"{name} needs the whole sequence as input_ids: the attention mask covers {mask_length} "
                             f"positions but input_ids has {length} (pass every token, including those a cache "
                             "holds)")
        cache = given_cache(model_kwargs)
        if cache is not None:
            if not isinstance(cache, DynamicCache):
                raise ValueError(f"{name} needs a DynamicCache (it crops, copies and branches the cache); got a "
                                 f"{type(cache).__name__}: drop cache_implementation= or pass a DynamicCache")
            cached = cache.get_seq_length()
            if cached >= length:
                raise ValueError(f"the cache already holds {cached} positions but the prompt has {length} tokens; "
                                 f"{name} needs at least the last prompt token uncached")
            rows = next((layer.keys.shape[0] for layer in cache.layers
                         if getattr(layer, "keys", None) is not None and layer.keys.numel()), input_ids.shape[0])
            if rows != input_ids.shape[0]:
                raise ValueError(f"the cache holds a batch of {rows} rows but input_ids has {input_ids.shape[0]}")
        if generation_config.return_dict_in_generate:
            supported = {"output_hidden_states": self.supports_output_hidden_states,
                         "output_attentions": self.supports_output_attentions,
                         "output_scores": self.supports_output_scores, "output_logits": self.supports_output_scores}
            for flag, ok in supported.items():
                if getattr(generation_config, flag, False) and not ok:
                    raise ValueError(f"{name} does not return {flag}; call generate() without {flag}=True (or "
                                     "without return_dict_in_generate=True)")

    def _check_position_ids(self, state: GenerationState, positions: torch.Tensor) -> None:
        """Refuse ``position_ids`` that differ, at attended tokens, from those the state derives from the mask."""
        expected = state.position_ids(state.attention_mask)
        keep = state.attention_mask.bool()
        if positions.shape[-1] != expected.shape[-1] or not torch.equal(
                positions.to(expected.device).expand_as(expected)[keep], expected[keep]):
            raise ValueError(f"{type(self).__name__} derives positions from the attention mask (cumsum(mask) - 1); "
                             f"it cannot use other position_ids (got {positions.tolist()})")

    @abc.abstractmethod
    def run(self, state: GenerationState):
        """Decode until ``state.done``; may return extra fields for the ``return_dict_in_generate`` output.

        The cache handed back (the output's ``past_key_values``, the caller's cache object) is ``state.cache`` after
        the run; a loop whose own cache does not hold the sequence exactly (compressed, re-positioned) sets
        ``state.cache = None`` so that the caller's cache is returned as it was (an exact prefix, possibly empty)."""
