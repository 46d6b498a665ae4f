"""DEL: context-aware dynamic exit layer and speculation length for LayerSkip-style self-speculative decoding.

The module is named after the method's long name ("dynamic exit layer"): ``del`` is a Python keyword.
"""

from __future__ import annotations

import math

import torch

from hf_decoding_ext.core.anatomy import early_exit, exit_logits, layer_parameters, lm_head, num_layers
from hf_decoding_ext.core.tree import DraftTree
from hf_decoding_ext.speculative.drafters.base import Draft, Drafter, VerifyResult
from hf_decoding_ext.speculative.policies.draft_length import (  # noqa: F401 - re-exported
    break_even_acceptance, expected_tokens)

COSTS = ("layers", "parameters")
"""Cost models of the Token-per-Layer objective: ``"layers"`` (the paper's: a draft token costs ``E`` layers, a
verification ``L``), ``"parameters"`` (head-aware: parameters touched, the LM head included in every draft token,
in the verification and in the shadow-token pass)."""

SHADOW_COUNTS = ("prefix", "all")
"""How shadow tokens are counted per verification round: ``"prefix"`` (each layer's shadow tokens along the accepted
path are matched against the final tokens up to its first mismatch, as the paper describes), ``"all"`` (every
position of the path is a trial)."""


# ------------------------------------------------------------------------------------------------ the objective
def token_per_layer(alpha: float, draft_length: int, exit_cost: float, verify_cost: float) -> float:
    """DEL's Token-per-Layer ``TPL(E, d) = [(1 - a_E^(d+1)) / (1 - a_E)] / (d * c_E + c_L)``: expected tokens of a
    round over its cost, a draft token costing ``exit_cost`` (``c_E``; the paper: ``E`` layers) and the verification
    ``verify_cost`` (``c_L``; the paper: ``L`` layers).

    Example:
        >>> round(token_per_layer(0.8, 3, exit_cost=8, verify_cost=32), 5)  # (1 + .8 + .64 + .512) / (3*8 + 32)
        0.05271
    """
    return expected_tokens(alpha, draft_length) / (draft_length * exit_cost + verify_cost)


def best_exit(alphas, exit_costs, verify_cost: float, max_draft_length: int, min_draft_length: int = 1):
    """The ``(E, d, TPL)`` maximising :func:`token_per_layer` over the exits ``E`` (keys of ``alphas``, a mapping
    ``E -> a_E``) and ``min_draft_length <= d <= max_draft_length``; ``exit_costs[E]`` is ``c_E``. Ties go to the
    smaller ``E``, then the smaller ``d``. ``d = 0`` (allowed with ``min_draft_length=0``) is plain decoding,
    ``TPL = 1 / c_L`` whatever ``E``.

    Example:
        >>> best_exit({4: 0.9, 8: 0.95}, {4: 4, 8: 8}, verify_cost=16, max_draft_length=6)[:2]
        (4, 6)
    """
    best = None
    for e in sorted(alphas):
        a = min(max(float(alphas[e]), 0.0), 1.0)
        for d in range(min_draft_length, max_draft_length + 1):
            tpl = token_per_layer(a, d, float(exit_costs[e]), verify_cost)
            if best is None or tpl > best[2] * (1 + 1e-12):
                best = (e, d, tpl)
    if best is None:
        raise ValueError(f"no candidate: alphas={dict(alphas)!r}, draft lengths {min_draft_length}.."
                         f"{max_draft_length}")
    return best


def parameter_costs(model) -> dict:
    """Parameters touched per token: ``layers`` (one count per decoder layer), ``head`` (the LM head's weight, read
    whole for every token; the embedding lookup reads one row and is not counted) and ``total`` (all decoder layers
    + the head: one full forward)."""
    layers = layer_parameters(model)
    head = lm_head(model).weight.numel()
    return {"layers": layers, "head": head, "total": sum(layers) + head}


# ------------------------------------------------------------------------------------------------ the drafter
class DELDrafter(Drafter):
    """DEL, "DEL: Context-Aware Dynamic Exit Layer for Efficient Self-Speculative Decoding" (Entezari Zarch, Gao,
    Jiang, Annavaram; COLM 2025; arXiv 2504.05598; official code hoenza/DEL on top of facebookresearch/LayerSkip).

    LayerSkip-style self-speculation: the draft is the target's first ``E`` decoder layers, its final norm and its
    LM head (:func:`~hf_decoding_ext.core.anatomy.early_exit` running on the target's own KV cache, which the engine
    crops back after drafting), the verification the full model; greedy drafts, so the output is the target's
    (token-identical to greedy ``generate()`` under ``do_sample=False``). Before every round DEL picks the exit ``E``
    and the speculation length ``d`` maximising the Token-per-Layer objective (:func:`token_per_layer`)::

        TPL(E, d) = [(1 - a_E^(d+1)) / (1 - a_E)] / (d * E + L)

    where ``a_l`` is the acceptance rate a draft exiting at layer ``l`` would have, tracked online for **every**
    layer by *shadow tokens*: after each verification the target's hidden states at every layer along the accepted
    path (the engine's ``VerifyResult.all_hidden_states``, no extra forward) go through the final norm and the LM
    head, and each layer's predictions are matched against the final tokens up to the first mismatch. As the first
    ``E`` layers of the draft compute exactly what the target's first ``E`` layers computed for the same prefix,
    layer ``E``'s shadow token at an accepted position is the token the draft would have proposed there. The counts
    decay by ``decay`` per round (context-aware: the recent text weighs most). *Dynamic draft exiting* stops a draft
    before ``d`` tokens when it stops paying: after the ``k``-th draft token, with ``P_k`` the product of the draft's
    top-1 probabilities so far, drafting the next token is expected to add ``P_k * a_E`` tokens at a cost ``c_E``, and
    the draft stops when ``P_k * a_E < exit_scale * c_E * TPL*`` (``TPL*`` the chosen round's objective).

    The first round of a generation drafts nothing (no acceptance is known yet): its verification is the prompt's
    forward, and the agreement of every layer's prediction with the final layer's at the last ``prompt_warmup``
    prompt positions seeds the counts.

    Args:
        max_draft_length: the largest speculation length ``d`` searched (this library's default 8).
        min_exit_layer, max_exit_layer: the exits searched, ``min_exit_layer <= E <= max_exit_layer`` (default
            ``1 .. L - 1``).
        exit_layer: a fixed exit (``None``: chosen by TPL every round); with ``draft_length`` too and
            ``dynamic_exit=False`` this is static LayerSkip self-speculation (the baseline grid point).
        draft_length: a fixed speculation length (``None``: chosen by TPL every round).
        decay: per-round decay of the shadow-token counts, ``0 < decay <= 1`` (1: never forget).
        shadow_count: ``"prefix"`` (match up to the first mismatch per round, the paper's) or ``"all"``.
        dynamic_exit: stop a draft early by the confidence rule above.
        exit_scale: scale of the dynamic-exit threshold (``> 0``; larger stops earlier).
        cost: ``"layers"`` (the paper's TPL) or ``"parameters"`` (head-aware extension, see Deviations).
        allow_no_draft: also consider ``d = 0`` (plain decoding for the round; shadow tokens keep being tracked, so
            drafting resumes when some exit becomes worth it). Off by default (the paper always drafts).
        prompt_warmup: prompt positions whose layer-vs-final agreement seeds the counts (``0``: none).

    Attributes (after a call, for inspection and tests): ``alphas()`` the current tracked ``a_l`` (``l = 1 .. L``),
    ``shadow_totals`` the undecayed ``(matches, trials)`` per layer over generated positions, ``rounds`` one dict per
    round (``exit``, ``draft_length`` chosen, ``drafted``, ``accepted``, ``tpl``, and ``shadow_hits`` /
    ``shadow_trials``: the shadow-token count of that round at the exit used), ``measured()`` the acceptance
    actually measured per exit used.

    Deviations from the paper / official code:

    1. The official code (hoenza/DEL) was not available offline and the paper's text only through its abstract: the
       decay of the counts (``decay``), the prefix counting, the dynamic-exit rule (the marginal-TPL stop above), the
       prompt warm-up, the empty first round and the defaults (``max_draft_length=8``, ``decay=0.9``,
       ``prompt_warmup=16``) are this library's reading of the paper's description, not verified against its code.
       The dynamic exit keeps the token after which it stops (its forward is already paid; verifying one more row
       is nearly free).
    2. Verification runs the full model over the drafts; LayerSkip's reuse of the draft's exit-layer activations
       (verify only layers ``E+1 .. L``) is not implemented, so the ``d * E + L`` cost of the TPL objective is the
       actual cost here (in LayerSkip the first ``E`` layers of the verification are already computed).
    3. ``cost="parameters"`` (an extension, not the paper's default) counts parameters touched: a draft token costs
       ``E`` layers plus the LM head, the verification ``L`` layers plus the head plus the shadow-token head pass; on
       SmolLM2-135M the head is about 21% of the weights, so the paper's layer count under-prices early exits.
    4. ``allow_no_draft`` (off by default) is an extension.
    5. Shadow tokens are computed for every layer at every accepted position: one LM-head pass over ``(L - 1) x
       (accepted + 1)`` rows per round, which the paper hides on a GPU and which costs about one head read per round
       here.
    6. Batch size 1 only (a ``ValueError`` otherwise); drafts are greedy (the draft's argmax) also under sampling,
       where the engine's speculative sampling treats them as one-hot, so sampling stays lossless.

    Example:
        >>> from hf_decoding_ext.speculative import SpeculativeDecoding
        >>> from hf_decoding_ext.speculative.drafters.dynamic_exit_layer import DELDrafter
        >>> drafter = DELDrafter()
        >>> out = model.generate(**inputs, max_new_tokens=32, do_sample=False,
        ...                      custom_generate=SpeculativeDecoding(drafter))  # doctest: +SKIP
        >>> drafter.alphas()[-5:], drafter.rounds[-1]  # doctest: +SKIP
    """

    needs = frozenset({"all_hidden_states", "target_cache"})

    def __init__(self, max_draft_length: int = 8, min_exit_layer: int = 1, max_exit_layer: int | None = None,
                 exit_layer: int | None = None, draft_length: int | None = None, decay: float = 0.9,
                 shadow_count: str = "prefix", dynamic_exit: bool = True, exit_scale: float = 1.0,
                 cost: str = "layers", allow_no_draft: bool = False, prompt_warmup: int = 16):
        def positive(name, value, allow_none=False, allow_zero=False):
            if value is None and allow_none:
                return
            if isinstance(value, bool) or not isinstance(value, int) or value < (0 if allow_zero else 1):
                raise ValueError(f"{name} must be a {'non-negative' if allow_zero else 'positive'} integer, got "
                                 f"{value!r}")

        positive("max_draft_length", max_draft_length)
        positive("min_exit_layer", min_exit_layer)
        positive("max_exit_layer", max_exit_layer, allow_none=True)
        positive("exit_layer", exit_layer, allow_none=True)
        positive("draft_length", draft_length, allow_none=True, allow_zero=True)
        positive("prompt_warmup", prompt_warmup, allow_zero=True)
        if max_exit_layer is not None and max_exit_layer < min_exit_layer:
            raise ValueError(f"max_exit_layer={max_exit_layer!r} is below min_exit_layer={min_exit_layer!r}")
        if isinstance(decay, bool) or not isinstance(decay, (int, float)) or not 0 < decay <= 1:
            raise ValueError(f"decay must be in (0, 1], got {decay!r}")
        if isinstance(exit_scale, bool) or not isinstance(exit_scale, (int, float)) or not exit_scale > 0 \
                or not math.isfinite(exit_scale):
            raise ValueError(f"exit_scale must be a positive finite number, got {exit_scale!r}")
        if shadow_count not in SHADOW_COUNTS:
            raise ValueError(f"shadow_count must be one of {SHADOW_COUNTS}, got {shadow_count!r}")
        if cost not in COSTS:
            raise ValueError(f"cost must be one of {COSTS}, got {cost!r}")
        if draft_length == 0 and not allow_no_draft:
            raise ValueError("draft_length=0 drafts nothing: pass allow_no_draft=True for plain decoding")
        self.max_draft_length, self.min_exit_layer, self.max_exit_layer = max_draft_length, min_exit_layer, \
            max_exit_layer
        self.exit_layer, self.draft_length, self.decay = exit_layer, draft_length, float(decay)
        self.shadow_count, self.dynamic_exit, self.exit_scale = shadow_count, bool(dynamic_exit), float(exit_scale)
        self.cost, self.allow_no_draft, self.prompt_warmup = cost, bool(allow_no_draft), prompt_warmup
        self._views: dict = {}
        self._model_id = None
        self.rounds: list[dict] = []

    @classmethod
    def for_model(cls, model=None, tokenizer=None, max_draft_length: int = 8, min_exit_layer: int = 1,
                  max_exit_layer: int | None = None, exit_layer: int | None = None, draft_length: int | None = None,
                  decay: float = 0.9, shadow_count: str = "prefix", dynamic_exit: bool = True,
                  exit_scale: float = 1.0, cost: str = "layers", allow_no_draft: bool = False,
                  prompt_warmup: int = 16) -> DELDrafter:
        """Registry/CLI factory (the drafter reads the model from the generation state; the arguments are the
        constructor's)."""
        return cls(max_draft_length=max_draft_length, min_exit_layer=min_exit_layer, max_exit_layer=max_exit_layer,
                   exit_layer=exit_layer, draft_length=draft_length, decay=decay, shadow_count=shadow_count,
                   dynamic_exit=dynamic_exit, exit_scale=exit_scale, cost=cost, allow_no_draft=allow_no_draft,
                   prompt_warmup=prompt_warmup)

    # ------------------------------------------------------------------------------------------------ set-up
    def _setup(self, model) -> None:
        if self._model_id == id(model):
            return
        total = num_layers(model)
        if total < 2:
            raise ValueError(f"DELDrafter needs a model with at least 2 decoder layers, got {total}")
        hi = total - 1 if self.max_exit_layer is None else self.max_exit_layer
        for name, value in (("max_exit_layer", hi), ("exit_layer", self.exit_layer)):
            if value is not None and not 1 <= value <= total - 1:
                raise ValueError(f"{name}={value!r} out of range: this model has {total} decoder layers, exits are "
                                 f"1 .. {total - 1}")
        if self.min_exit_layer > hi:
            raise ValueError(f"min_exit_layer={self.min_exit_layer!r} out of range: exits are 1 .. {hi}")
        self.num_layers = total
        self.exits = [self.exit_layer] if self.exit_layer is not None else list(range(self.min_exit_layer, hi + 1))
        params = parameter_costs(model)
        self.param_costs = params
        cum = [0]
        for n in params["layers"]:
            cum.append(cum[-1] + n)
        self.cost_fraction = {e: (cum[e] + params["head"]) / params["total"] for e in range(1, total + 1)}
        if self.cost == "layers":
            self.exit_costs = {e: e / total for e in range(1, total + 1)}
            self.verify_cost = 1.0
        else:
            self.exit_costs = dict(self.cost_fraction)
            self.verify_cost = 1.0 + params["head"] / params["total"]  # the shadow-token head pass
        self._views = {}
        self._model_id = id(model)

    def _view(self, model, e: int):
        if e not in self._views:
            self._views[e] = early_exit(model, e, share_cache=True)
        return self._views[e]

    def begin(self, state) -> None:
        if state.batch_size != 1:
            raise ValueError(f"DELDrafter drafts one sequence at a time; got batch size {state.batch_size}")
        self._setup(state.model)
        total = self.num_layers
        self._matches = torch.zeros(total + 1, dtype=torch.float64)  # decayed, index l = layer l (1 .. L)
        self._trials = torch.zeros(total + 1, dtype=torch.float64)
        self.shadow_totals = (torch.zeros(total + 1, dtype=torch.long), torch.zeros(total + 1, dtype=torch.long))
        self.prompt_counts = (torch.zeros(total + 1, dtype=torch.long), torch.zeros(total + 1, dtype=torch.long))
        self.rounds = []
        self._measured: dict[int, list[int]] = {}  # exit -> [accepted, trials]
        self._pending: dict | None = None

    # ------------------------------------------------------------------------------------------------ estimates
    def alphas(self) -> list[float]:
        """The tracked acceptance rate ``a_l`` of every exit ``l = 1 .. L`` (index ``l - 1``; ``nan`` before any
        count; ``a_L = 1``: the target's own prediction)."""
        out = []
        for e in range(1, self.num_layers + 1):
            n = float(self._trials[e])
            out.append(1.0 if e == self.num_layers else (float(self._matches[e]) / n if n > 0 else float("nan")))
        return out

    def measured(self) -> dict[int, dict]:
        """Acceptance actually measured per exit used: ``accepted`` draft tokens, ``trials`` (accepted tokens plus one
        per round cut by a rejection; a draft fully accepted has no failed trial) and ``rate = accepted / trials``,
        the per-token conditional acceptance that :meth:`alphas` estimates."""
        return {e: {"accepted": a, "trials": t, "rate": a / t if t else float("nan")}
                for e, (a, t) in sorted(self._measured.items())}

    def choose(self) -> tuple[int, int, float]:
        """``(E, d, TPL)`` for the next round from the current counts (``d = 0``: no count yet, or plain decoding
        chosen under ``allow_no_draft``). ``TPL`` is in tokens per full-forward unit (the paper's value times
        ``L`` under ``cost="layers"``)."""
        if float(self._trials[1:self.num_layers].max()) <= 0:
            return self.exits[0], 0, 1.0 / self.verify_cost
        alphas = self.alphas()
        cand = {e: (0.0 if math.isnan(alphas[e - 1]) else alphas[e - 1]) for e in self.exits}
        if self.draft_length is not None:
            lo = hi = self.draft_length
        else:
            lo, hi = (0 if self.allow_no_draft else 1), self.max_draft_length
        return best_exit(cand, self.exit_costs, self.verify_cost, hi, lo)

    # ------------------------------------------------------------------------------------------------ drafting
    def propose(self, state) -> Draft:
        e, d, tpl = self.choose()
        room = state.generation_config.max_length - state.input_ids.shape[1] - 1
        d = max(0, min(d, room))
        info = {"exit": e, "draft_length": d, "tpl": tpl}
        if d == 0:
            self._pending = {**info, "drafted": 0}
            return Draft(DraftTree.empty(), info=dict(info))
        view = self._view(state.model, e)
        cache = state.cache
        cached = cache.get_seq_length()
        ids = state.input_ids[:, cached:]
        mask = state.attention_mask
        alpha = self.alphas()[e - 1]
        alpha = 0.0 if math.isnan(alpha) else alpha
        threshold = self.exit_scale * self.exit_costs[e] * tpl
        tokens, confidence, p_all = [], [], 1.0
        with torch.no_grad():
            for k in range(d):
                n = ids.shape[1]
                pos = (mask.long().cumsum(-1) - 1).clamp(min=0)[:, -n:]
                out = view(input_ids=ids, attention_mask=mask, position_ids=pos, cache=cache,
                           use_cache=True, logits_to_keep=1)
                probs = torch.softmax(out.logits[0, -1].float(), dim=-1)
                conf, tok = probs.max(-1)
                tokens.append(int(tok))
                confidence.append(float(conf))
                p_all *= float(conf)
                if self.dynamic_exit and k + 1 < d and p_all * alpha < threshold:
                    break
                ids = tok.view(1, 1).to(state.input_ids.device)
                mask = torch.cat([mask, mask.new_ones((1, 1))], dim=1)
        self._pending = {**info, "drafted": len(tokens), "confidence": confidence}
        return Draft(DraftTree.chain(torch.tensor(tokens, dtype=torch.long)), info=dict(info))

    # ------------------------------------------------------------------------------------------------ shadow tokens
    def observe(self, state, result: VerifyResult) -> None:
        hidden = result.all_hidden_states
        if hidden is None:
            raise ValueError("DELDrafter needs the engine's all_hidden_states (run it through SpeculativeDecoding)")
        total = self.num_layers
        n_block = len(result.draft.tree) + (0 if result.draft.side_tokens is None
                                            else int(result.draft.side_tokens.numel()))
        s = hidden[0].shape[0] - n_block  # uncached committed tokens, the root last
        path_rows = [s - 1] + [s + i for i in result.accepted]
        targets = torch.tensor(result.tokens, dtype=torch.long)
        warm = min(self.prompt_warmup, s - 1) if not self.rounds else 0
        rows = list(range(s - 1 - warm, s - 1)) + path_rows
        idx = torch.tensor(rows, device=hidden[0].device)
        with torch.no_grad():
            stacked = torch.stack([hidden[layer].index_select(0, idx) for layer in range(1, total)])
            shadow = exit_logits(stacked, state.model).argmax(-1).cpu()  # (L - 1, rows)
            if warm:
                final = lm_head(state.model)(hidden[total].index_select(0, idx[:warm])).float().argmax(-1).cpu()
        # context-aware decay, then this round's counts
        self._matches *= self.decay
        self._trials *= self.decay
        if warm:
            agree = (shadow[:, :warm] == final[None]).sum(-1).to(torch.float64)
            self._matches[1:total] += agree
            self._trials[1:total] += warm
            self.prompt_counts[0][1:total] += agree.long()
            self.prompt_counts[1][1:total] += warm
        hits = shadow[:, warm:] == targets[None]  # (L - 1, path)
        if self.shadow_count == "prefix":
            lead = hits.long().cumprod(-1).sum(-1)  # matches before the first mismatch
            trials = torch.clamp(lead + 1, max=hits.shape[1])
        else:
            lead = hits.sum(-1)
            trials = torch.full_like(lead, hits.shape[1])
        self._matches[1:total] += lead.to(torch.float64)
        self._trials[1:total] += trials.to(torch.float64)
        self.shadow_totals[0][1:total] += lead
        self.shadow_totals[1][1:total] += trials
        pending = self._pending or {"exit": None, "draft_length": 0, "drafted": 0, "tpl": float("nan")}
        accepted = len(result.accepted)
        if pending["drafted"]:
            a, t = self._measured.setdefault(pending["exit"], [0, 0])
            self._measured[pending["exit"]] = [a + accepted, t + accepted + (1 if accepted < pending["drafted"]
                                                                              else 0)]
        e = pending["exit"]
        self.rounds.append({"exit": e, "draft_length": pending["draft_length"], "drafted": pending["drafted"],
                            "accepted": accepted, "tpl": pending["tpl"],
                            "shadow_hits": int(lead[e - 1]) if e is not None and e < total else None,
                            "shadow_trials": int(trials[e - 1]) if e is not None and e < total else None})
        self._pending = None

    def reset(self) -> None:
        self._views = {}
        self._model_id = None


__all__ = ["COSTS", "SHADOW_COUNTS", "DELDrafter", "best_exit", "break_even_acceptance", "expected_tokens",
           "parameter_costs", "token_per_layer"]
