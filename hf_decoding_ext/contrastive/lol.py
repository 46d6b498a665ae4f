"""LOL (LOwer Layer matters): multi-layer fusion contrastive decoding with a truthfulness-refocused original model.

Paper: "Lower Layer Matters: Alleviating Hallucination via Multi-Layer Fusion Contrastive Decoding with Truthfulness
Refocused" (Chen et al., arXiv 2408.08769; v2 title "Lower Layers Matter: Alleviating Hallucination via Multi-Layer
Fusion and Truthfulness Refocused Contrastive Decoding").
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from transformers import DynamicCache

from hf_decoding_ext.core.loop import DecodingLoop, GenerationState
from hf_decoding_ext.core.anatomy import exit_logits, num_layers
from hf_decoding_ext.core.plausibility import plausibility_mask

DEFAULT_INSTRUCTION = ("Answer truthfully and accurately. Focus on the key facts of the question and do not state "
                       "anything that is not true.\n")
"""Truthfulness-refocusing instruction used by :meth:`LOL.for_model` (this library's wording, see the class notes)."""


def _number(name: str, value, low: float | None = None, high: float | None = None) -> float:
    try:
        value = float(value)
    except (TypeError, ValueError) as err:
        raise ValueError(f"{name} must be a number, got {value!r}") from err
    if math.isnan(value) or math.isinf(value):
        raise ValueError(f"{name} must be finite, got {value}")
    if (low is not None and value < low) or (high is not None and value > high):
        raise ValueError(f"{name} must be in [{low}, {high}], got {value}")
    return value


def lol_scores(orig_final: torch.Tensor, amateur_final: torch.Tensor, orig_lower: torch.Tensor,
               amateur_lower: torch.Tensor, lam: float = 1.0, lam_lower: float = 1.0, omega: float = 1.0,
               alpha: float = 0.1) -> torch.Tensor:
    r"""LOL's fused contrast scores ``(batch, vocab)`` from four sets of logits ``(batch, vocab)``.

    .. math::

        F = \underbrace{\log p_\theta(x) - \lambda \log p_{\theta^*}(x)}_{\text{final layer}}
            + \omega \, \underbrace{\big(\log p_\theta^{(L)}(x) - \lambda' \log p_{\theta^*}^{(L)}(x)\big)}_{
            \text{lower layer } L}

    on ``V_head = {x : p_theta(x) >= alpha max_w p_theta(w)}`` (final layer of the original model), ``-inf`` elsewhere.
    """
    lp_o = torch.log_softmax(orig_final.float(), dim=-1)
    lp_a = torch.log_softmax(amateur_final.float(), dim=-1)
    lq_o = torch.log_softmax(orig_lower.float(), dim=-1)
    lq_a = torch.log_softmax(amateur_lower.float(), dim=-1)
    fused = (lp_o - lam * lp_a) + omega * (lq_o - lam_lower * lq_a)
    keep = plausibility_mask(orig_final, alpha)
    return torch.where(keep, fused, torch.full_like(fused, float("-inf")))


class LOL(DecodingLoop):
    r"""LOL decoding loop: contrast an original model with a hallucination-induced amateur at the final layer *and* at
    a lower layer, fuse the two contrasts, and refocus the original model on truthfulness with an instruction.

    From "Lower Layer Matters: Alleviating Hallucination via Multi-Layer Fusion Contrastive Decoding with Truthfulness
    Refocused" (Chen et al., arXiv 2408.08769). The method builds on induce-then-contrast decoding (ICD, Zhang et al.,
    arXiv 2312.15710): the amateur ``theta*`` is the original model fine-tuned (fully or with LoRA) on hallucinated
    data, ``theta* = FT(theta, D)``. At each step, with ``L`` the lower (early-exit) layer:

    * final-layer contrast ``F_t = log p(x_t | x_<t; theta) - lambda log p(x_t | x_<t; theta*)``;
    * lower-layer contrast ``F'_t = log p(x_t | x_<t; theta; L) - lambda' log p(x_t | x_<t; theta*; L)``, each model's
      layer-``L`` hidden state exited through its own final norm and LM head (as in DoLa);
    * multi-layer fusion ``F = F_t + omega F'_t``, restricted to the adaptive plausibility set of the original model
      (``alpha = 0.1``, as in ICD/DoLa), ``-inf`` elsewhere (:func:`lol_scores`);
    * truthfulness refocusing: the original model (both of its terms) reads ``instruction + prompt``, an instruction
      that guides it to the truthful, key-fact content; the amateur reads the plain prompt.

    The caller's logits processors are applied to ``F`` after the fusion; then argmax or sampling (``state.select``).
    Batches with left padding are supported (the instruction is put before each row's padding; positions skip the
    padding). With ``lam = lam_lower = omega = 0``, ``alpha = 0`` and no instruction the loop is plain greedy/sampling
    decoding of the original model.

    Deviations and unknowns (the paper's method section could only be read through secondary summaries here; its code
    was "coming soon" and is not public):

    * the amateur: :meth:`for_model` defaults to ``amateur="induced"``, the hallucination-induced amateur shipped for
      the default model SmolLM2-135M-Instruct (:mod:`hf_decoding_ext.contrastive.induced_amateur`,
      ``hf_decoding_ext/data/induced_amateur``). It was trained here, for this library, as ICD's LoRA variant: rank-8
      LoRA adapters on the attention and MLP projections of *all* 30 decoder layers (the base weights are shared and
      frozen; only the adapters are stored), so the amateur differs from the original at every layer, including the
      lower layer ``L`` contrasted here (an amateur that only differs above ``L``, e.g. one fine-tuned in its top
      layers only, makes the lower-layer term ``(1 - lambda') log p_theta^(L)``, i.e. no contrast at all). Its
      training data is this project's own set of short factual questions paired with false answers of the same
      relation (``hallucination_train.jsonl``, chat format, loss on the answer only), one pass over it. ICD instead
      fine-tuned the full model (or LoRA adapters) of a 7B chat model on hallucinated data derived from HaluEval, and
      LOL used ICD's amateur; so this amateur is far smaller, trained on different (much less) data, and only
      untruthful in a narrow, short-answer sense. On the held-out factual multiple-choice set it is clearly less truthful than the original
      (see its ``config.json`` / the model card ``model_cards/induced-amateur-smollm2-135m.md``). For other models
      pass your own amateur (e.g. ICD's ``HillZhang/untruthful_llama2_7b`` for Llama-2-7B-chat), or train one with
      :func:`~hf_decoding_ext.contrastive.induced_amateur.train_induced_amateur`. Any causal LM with the same
      vocabulary works, e.g. a smaller model of the family, but that is contrastive decoding with an untrained
      amateur, not LOL's amateur.
    * the defaults ``lam = lam_lower = omega = 1`` (ICD's unit-weight contrast ``log p_theta - log p_theta*``, with
      equal weight for the lower-layer term) and ``lower_layer = N // 2`` are this library's choices; the paper's
      tuned values could not be verified.
    * the paper's exact refocusing instruction (and any keyword extraction that feeds it) could not be verified;
      :data:`DEFAULT_INSTRUCTION` is this library's wording, and ``instruction_ids=None`` turns the module off.

    Measured on SmolLM2-135M-Instruct (58-question factual multiple-choice set, summed log-probabilities as in the
    TruthfulQA-MC reference protocol, ``results/contrastive_quality.json``, written by
    ``scripts/train_induced_amateur.py --results``): original model 0.483, shipped induced amateur alone 0.431 (less
    truthful, as intended), LOL with the defaults 0.431: no gain at this scale (the paper reports gains on 7B chat
    models). With this amateur the lower-layer term is active: at layer 15 its amateur part
    ``lambda' |log p_theta^(L) - log p_theta*^(L)|`` averages 8.04 nats over the plausible head (last prompt
    position of each question, no instruction; 0 with the former top-2-layer amateur).

    Args:
        amateur_model: the hallucination-induced amateur causal LM (same tokenizer/vocabulary as the model).
        lower_layer: the lower layer ``L`` (``hidden_states`` index, 0 = embeddings), in ``[0, min(N, N*) - 1]``;
            ``None``: ``min(N, N*) // 2``.
        lam: ``lambda``, weight of the amateur at the final layer (``>= 0``).
        lam_lower: ``lambda'``, weight of the amateur at the lower layer (``>= 0``).
        omega: fusion weight of the lower-layer contrast (``>= 0``).
        alpha: adaptive plausibility threshold in ``[0, 1]``.
        instruction_ids: token ids of the truthfulness-refocusing instruction, prepended to the original model's input
            (``None``: no refocusing). :meth:`for_model` tokenises an instruction text.
        final_norm: apply each model's final norm before its LM head for the lower-layer early exit.

    Example:
        >>> from hf_decoding_ext.core.models import load_model, encode_prompts
        >>> from hf_decoding_ext.contrastive.lol import LOL
        >>> model, tokenizer = load_model()  # doctest: +SKIP
        >>> loop = LOL.for_model(model, tokenizer)  # the shipped induced amateur  # doctest: +SKIP
        >>> inputs = encode_prompts(tokenizer, "What happens if you crack your knuckles a lot?")  # doctest: +SKIP
        >>> out = model.generate(**inputs, custom_generate=loop, do_sample=False, max_new_tokens=48)  # doctest: +SKIP
    """

    def __init__(self, amateur_model, lower_layer: int | None = None, lam: float = 1.0, lam_lower: float = 1.0,
                 omega: float = 1.0, alpha: float = 0.1, instruction_ids: Sequence[int] | torch.Tensor | None = None,
                 final_norm: bool = True):
        if amateur_model is None or not callable(amateur_model) or not hasattr(amateur_model, "config"):
            raise ValueError("LOL needs an amateur causal LM (amateur_model), e.g. the model fine-tuned on "
                             "hallucinated data as in ICD")
        if getattr(amateur_model.config, "is_encoder_decoder", False):
            raise ValueError("the amateur model must be a decoder-only causal LM")
        if lower_layer is not None and (isinstance(lower_layer, bool) or not isinstance(lower_layer, int)
                                        or lower_layer < 0):
            raise ValueError(f"lower_layer must be a non-negative integer layer index, got {lower_layer!r}")
        self.lam = _number("lam", lam, 0.0)
        self.lam_lower = _number("lam_lower", lam_lower, 0.0)
        self.omega = _number("omega", omega, 0.0)
        self.alpha = _number("alpha", alpha, 0.0, 1.0)
        if instruction_ids is not None:
            ids = torch.as_tensor(instruction_ids, dtype=torch.long).reshape(-1)
            if ids.numel() == 0:
                raise ValueError("instruction_ids is empty; pass None to disable truthfulness refocusing")
            instruction_ids = ids
        self.amateur_model = amateur_model
        self.lower_layer = lower_layer
        self.instruction_ids = instruction_ids
        self.final_norm = bool(final_norm)
        self._check_lower(num_layers(amateur_model))

    @classmethod
    def for_model(cls, model=None, tokenizer=None, amateur="induced", lower_layer: int | None = None,
                  lam: float = 1.0, lam_lower: float = 1.0, omega: float = 1.0, alpha: float = 0.1,
                  instruction: str | None = DEFAULT_INSTRUCTION, final_norm: bool = True) -> "LOL":
        """Build the loop.

        ``amateur``: ``"induced"`` (default) for the hallucination-induced amateur shipped for SmolLM2-135M-Instruct,
        built from ``model`` with :func:`~hf_decoding_ext.contrastive.induced_amateur.load_induced_amateur` (a
        ``ValueError`` when ``model`` is not that model); ``"induced:<folder>"`` for another checkpoint saved by
        :func:`~hf_decoding_ext.contrastive.induced_amateur.save_induced_amateur`; a model; or a name/path for
        :func:`hf_decoding_ext.core.models.load_model`. ``instruction`` (text, ``None`` or ``""`` for none) is tokenised
        with ``tokenizer`` (no special tokens).
        """
        if amateur is None:
            raise ValueError("LOL needs an amateur model: use amateur='induced' (the default: the amateur shipped for "
                             "SmolLM2-135M-Instruct) or pass a model or Hub id/path (a model fine-tuned on "
                             "hallucinated data, as in ICD)")
        if isinstance(amateur, str) and (amateur == "induced" or amateur.startswith("induced:")):
            if model is None:
                raise ValueError("amateur='induced' builds the amateur from the model: pass the model")
            from hf_decoding_ext.contrastive.induced_amateur import load_induced_amateur

            amateur = load_induced_amateur(model, amateur.partition(":")[2] or None)
        elif isinstance(amateur, str):
            from hf_decoding_ext.core.models import load_model

            amateur = load_model(amateur)[0]
            if model is not None:
                amateur = amateur.to(device=model.device, dtype=model.dtype)
        ids = None
        if instruction:
            if tokenizer is None:
                raise ValueError("a tokenizer is needed to encode the instruction (or pass instruction=None)")
            ids = tokenizer(instruction, add_special_tokens=False)["input_ids"]
        loop = cls(amateur, lower_layer=lower_layer, lam=lam, lam_lower=lam_lower, omega=omega, alpha=alpha,
                   instruction_ids=ids, final_norm=final_norm)
        if model is not None:
            loop.resolve_lower_layer(model)
        return loop

    # ----------------------------------------------------------------------------------------- helpers
    def _check_lower(self, n: int) -> None:
        if self.lower_layer is not None and self.lower_layer >= n:
            raise ValueError(f"lower_layer {self.lower_layer} out of range: must be in [0, {n - 1}] "
                             f"(a model here has {n} decoder layers; {n} is its final layer)")

    def resolve_lower_layer(self, model) -> int:
        """The lower layer ``L`` used with ``model`` (validated against both models' depths)."""
        n = min(num_layers(model), num_layers(self.amateur_model))
        self._check_lower(n)
        return self.lower_layer if self.lower_layer is not None else n // 2

    def original_inputs(self, state: GenerationState) -> tuple[torch.Tensor, torch.Tensor]:
        """``(input_ids, attention_mask)`` read by the original model: the instruction, then each (left-padded) row."""
        if self.instruction_ids is None:
            return state.input_ids, state.attention_mask
        instr = self.instruction_ids.to(state.device)[None].expand(state.batch_size, -1)
        ids = torch.cat([instr, state.input_ids], dim=1)
        mask = torch.cat([state.attention_mask.new_ones(instr.shape), state.attention_mask], dim=1)
        return ids, mask

    @staticmethod
    def _amateur_forward(amateur, cache, ids: torch.Tensor, mask: torch.Tensor):
        device = next(amateur.parameters()).device
        ids, mask = ids.to(device), mask.to(device)
        cached = cache.get_seq_length()
        positions = (mask.long().cumsum(-1) - 1).clamp(min=0)[:, cached:]
        return amateur(input_ids=ids[:, cached:], attention_mask=mask, position_ids=positions, past_key_values=cache,
                       use_cache=True, output_hidden_states=True, return_dict=True, logits_to_keep=1)

    # ----------------------------------------------------------------------------------------- decoding
    @torch.no_grad()
    def run(self, state: GenerationState):
        model, amateur = state.model, self.amateur_model
        lower = self.resolve_lower_layer(model)
        cache_o = DynamicCache(config=model.config) if self.instruction_ids is not None else None
        cache_a = DynamicCache(config=amateur.config)
        while not state.done:
            ids_o, mask_o = self.original_inputs(state)
            if cache_o is None:
                out_o = state.forward(output_hidden_states=True)
            else:
                out_o = state.forward(cache=cache_o, input_ids=ids_o, attention_mask=mask_o, output_hidden_states=True)
            out_a = self._amateur_forward(amateur, cache_a, state.input_ids, state.attention_mask)
            final_o = out_o.logits[:, -1, :]
            final_a = out_a.logits[:, -1, :].float().to(final_o.device)
            if final_a.shape[-1] != final_o.shape[-1]:
                raise ValueError(f"the amateur's vocabulary ({final_a.shape[-1]}) differs from the model's "
                                 f"({final_o.shape[-1]}); LOL needs models sharing one tokenizer")
            lower_o = exit_logits(out_o.hidden_states[lower][:, -1, :], model, self.final_norm)
            lower_a = exit_logits(out_a.hidden_states[lower][:, -1, :], amateur, self.final_norm).to(final_o.device)
            scores = lol_scores(final_o, final_a, lower_o, lower_a, self.lam, self.lam_lower, self.omega, self.alpha)
            scores = state.process(scores)
            state.record(scores, final_o)
            state.append(state.select(scores))
        state.stats["lower_layer"] = lower
        return None


# --------------------------------------------------------------------------------------------- scoring (MC tasks)
OUTSIDE_HEAD_VALUE = -1000.0
"""Fused score given to tokens outside the plausibility set when LOL scores a given text (instead of ``-inf``), so
that log-likelihoods of any continuation stay finite (as DoLa's reference code does with ``relative_top_value``)."""


def lol_scorer(loop: LOL, model):
    """LOL's fused contrast as a scoring function for likelihood-based multiple choice.

    Returns ``score_fn(input_ids (1, T)) -> (T, vocab)``: at every position, the log-softmax of :func:`lol_scores`
    (final-layer contrast + ``omega`` times the lower-layer contrast, with ``loop``'s weights, lower layer and
    plausibility threshold). One full forward of each model with ``output_hidden_states`` and no cache; the original
    model reads ``loop.instruction_ids + input_ids`` (its positions are offset by the instruction's length, as in
    generation), the amateur reads ``input_ids``. Tokens outside the plausibility set get
    :data:`OUTSIDE_HEAD_VALUE` before the log-softmax instead of ``-inf``, so scores stay finite (a token outside the
    set costs about 1000 nats). The caller's logits processors of generation are not applied. At the last position
    the argmax is the first token greedy LOL generates from ``input_ids``. Called with ``first=k`` it returns the rows
    of positions ``k..T-1`` only (``supports_first``, see :data:`hf_decoding_ext.bench.tasks.contrastive.ScoreFn`).

    Example:
        >>> from hf_decoding_ext.bench.tasks.contrastive import evaluate_multiple_choice, load_factual_mc
        >>> loop = LOL.for_model(model, tokenizer)  # doctest: +SKIP
        >>> acc = evaluate_multiple_choice(load_factual_mc(), tokenizer, lol_scorer(loop, model))  # doctest: +SKIP
    """
    amateur = loop.amateur_model
    lower = loop.resolve_lower_layer(model)

    @torch.no_grad()
    def score(input_ids: torch.Tensor, first: int = 0) -> torch.Tensor:
        if input_ids.dim() != 2 or input_ids.shape[0] != 1:
            raise ValueError(f"lol_scorer scores one sequence (1, T) at a time, got {tuple(input_ids.shape)}")
        device = next(model.parameters()).device
        ids = input_ids.to(device)
        k = 0
        if loop.instruction_ids is not None:
            k = loop.instruction_ids.numel()
            ids = torch.cat([loop.instruction_ids.to(device)[None], ids], dim=1)
        out_o = model(input_ids=ids, use_cache=False, output_hidden_states=True, return_dict=True)
        dev_a = next(amateur.parameters()).device
        out_a = amateur(input_ids=input_ids.to(dev_a), use_cache=False, output_hidden_states=True, return_dict=True)
        final_o = out_o.logits[0, k + first:].float()
        final_a = out_a.logits[0, first:].float().to(device)
        if final_a.shape[-1] != final_o.shape[-1]:
            raise ValueError(f"the amateur's vocabulary ({final_a.shape[-1]}) differs from the model's "
                             f"({final_o.shape[-1]}); LOL needs models sharing one tokenizer")
        lower_o = exit_logits(out_o.hidden_states[lower][0, k + first:], model, loop.final_norm)
        lower_a = exit_logits(out_a.hidden_states[lower][0, first:], amateur, loop.final_norm).to(device)
        fused = lol_scores(final_o, final_a, lower_o, lower_a, loop.lam, loop.lam_lower, loop.omega, loop.alpha)
        return torch.log_softmax(fused.masked_fill(torch.isinf(fused), OUTSIDE_HEAD_VALUE), dim=-1)

    score.supports_first = True
    return score
