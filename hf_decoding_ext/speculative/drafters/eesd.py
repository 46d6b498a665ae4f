"""EESD: early-exit self-drafting with a self-distilled exit layer and a Thompson-sampling draft-length controller."""

from __future__ import annotations

import inspect
from pathlib import Path

import torch

from hf_decoding_ext.core import lifecycle
from hf_decoding_ext.core.anatomy import (
    LayerSubsetCache,
    _NORM_NAMES,
    crop_layers,
    decoder,
    decoder_layers,
    exit_logits,
    layer_parameters,
    layer_subset_model,
)
from hf_decoding_ext.core.tree import DraftTree
from hf_decoding_ext.speculative.drafters.base import Draft, Drafter, pick_draft_token
from hf_decoding_ext.speculative.heads.exit_head import ExitHead, shipped_exit_head_path
from hf_decoding_ext.speculative.policies.draft_length import (  # noqa: F401 - break_even_acceptance re-exported
    ConstantLength, DraftLengthPolicy, break_even_acceptance)
from hf_decoding_ext.speculative.policies.thompson import ThompsonLength

__all__ = ["EESDDrafter", "draft_cost_fraction", "break_even_acceptance"]

CONTROLLERS = ("beta", "calibration", "constant")


def draft_cost_fraction(model, exit_layer: int, extra_layers: int = 1) -> float:
    """Parameters one draft token touches, as a fraction of a full forward's: the first ``exit_layer`` decoder layers,
    ``extra_layers`` layers of the exit head, the embedding row and the LM head (tied or not, counted once as a
    matrix multiply) over the model's parameters (LM head counted once for a tied model too).

    Example:
        >>> draft_cost_fraction(model, 6)  # SmolLM2-135M: (7 x 3.54M + 28.3M) / 134.5M  # doctest: +SKIP
        0.395
    """
    per_layer = layer_parameters(model)
    total = sum(p.numel() for p in model.parameters())
    head = model.get_output_embeddings().weight.numel()
    emb = model.get_input_embeddings().weight
    tied = emb.data_ptr() == model.get_output_embeddings().weight.data_ptr()
    full = total if tied else total - emb.numel()  # an untied embedding is a lookup, not a matrix multiply
    layer_mean = sum(per_layer) / len(per_layer)
    draft = sum(per_layer[:exit_layer]) + extra_layers * layer_mean + head
    return draft / full


class EESDDrafter(Drafter):
    """Early-exiting speculative decoding (Liu, Wang, Wang, Cai, "Speculative Decoding via Early-exiting for Faster LLM
    Inference with Thompson Sampling Control Mechanism", Findings of ACL 2024, arXiv 2406.03853; no official code
    found).

    The draft is the target's own first ``N`` decoder layers followed by an early-exiting layer
    (:class:`~hf_decoding_ext.speculative.heads.exit_head.ExitHead`: one extra decoder layer, a norm, the LM head)
    trained by self-distillation with the base model frozen. The first ``N`` layers run on the target's KV cache (their
    KV for the committed tokens is the target's own; what the draft appends is cropped by the engine); the extra layer
    keeps its own KV cache, extended after each verification from the target's layer-``N`` hidden states at the
    accepted positions. After every draft token a Thompson-sampling controller
    (:class:`~hf_decoding_ext.speculative.policies.thompson.ThompsonLength`) decides whether to draft another: it
    samples an acceptance rate from its Beta posterior and continues with that probability; the posterior is
    updated with the verified acceptances. The chain is verified in one target forward, so the output is the target's
    (greedy: token-identical to greedy ``generate()`` up to float near-ties; sampling: speculative sampling).

    Args:
        head: an attached :class:`ExitHead`, a folder path of one, ``"shipped"`` (the head shipped for
            SmolLM2-135M-Instruct: ``hf_decoding_ext/data/heads/exit_head_smollm2_l6``), ``"untrained"`` (an
            extra layer copied from base layer ``N``, i.e. a plain early exit after ``N + 1`` layers) or ``None``
            (the plain early exit at ``N``: the base final norm and LM head on layer ``N``'s output, no extra
            layer). A path, ``"shipped"`` and ``"untrained"`` are resolved on the first ``generate()`` call (they need
            the model).
        exit_layer: ``N`` (default: the head's, else 6); must match a given head's.
        controller: ``"beta"`` (Beta-TS, the paper's), ``"calibration"`` (Thompson sampling from per-confidence-bin
            Beta posteriors) or ``"constant"`` (always ``num_tokens`` draft tokens, the fixed-gamma baseline), or a
            :class:`~hf_decoding_ext.speculative.policies.draft_length.DraftLengthPolicy`.
        num_tokens: the cap on draft length (``"constant"``: the draft length).
        alpha, beta: the Beta prior of the Thompson controllers.
        seed: seed of the controller's random draws (``None``: torch's global generator).

    Deviations: (1) the LM head is the base model's, shared and frozen (the paper trains its early-exiting layer's
    own LM head; a copy would be 28.3 M parameters for SmolLM2); (2) the paper's Calibration-TS formula was not
    available offline, ``controller="calibration"`` is a per-confidence-bin Beta posterior; the defaults of the
    prior and the length cap are not confirmed (``Beta(1, 1)``, 10); (3) the shipped head was trained on CPU for
    minutes on a few hundred of the model's own answers (see its model card), far less than the paper's training;
    (4) the paper's tree-attention add-on is not built (chains only); (5) batch size 1 (the engine's limit);
    (6) ``N = 6`` is chosen by the cost analysis below (the paper's ``N`` for its models was not confirmed offline);
    (7) the distillation loss covers prompt positions as well as the model's generated answers.

    Cost on SmolLM2-135M (per draft token, parameters touched): ``(N + 1) x 3.54M + 28.3M`` of 134.5M, 0.40 at
    ``N = 6`` (:func:`draft_cost_fraction`), so a draft token costs 40% of a target forward where the paper's 13B/70B
    drafts cost a few percent: little or no speed-up is expected here (see :func:`break_even_acceptance`).

    Example:
        >>> from hf_decoding_ext.speculative import SpeculativeDecoding
        >>> from hf_decoding_ext.speculative.drafters.eesd import EESDDrafter
        >>> loop = SpeculativeDecoding(EESDDrafter("shipped"))  # doctest: +SKIP
        >>> out = model.generate(**inputs, max_new_tokens=64, do_sample=False, custom_generate=loop)  # doctest: +SKIP
    """

    needs = frozenset({"all_hidden_states", "target_cache"})

    def __init__(self, head: ExitHead | str | Path | None = "shipped", exit_layer: int | None = None,
                 controller: str | DraftLengthPolicy = "beta", num_tokens: int = 10, alpha: float = 1.0,
                 beta: float = 1.0, seed: int | None = 0):
        if head is not None and not isinstance(head, (ExitHead, str, Path)):
            raise ValueError(f"head must be an ExitHead, a folder path, 'shipped', 'untrained' or None, got {head!r}")
        if exit_layer is not None and (isinstance(exit_layer, bool) or not isinstance(exit_layer, int)
                                       or exit_layer < 1):
            raise ValueError(f"exit_layer must be an int >= 1 or None, got {exit_layer!r}")
        if isinstance(head, ExitHead):
            if exit_layer is not None and exit_layer != head.exit_layer:
                raise ValueError(f"exit_layer={exit_layer!r} does not match the head's exit layer {head.exit_layer}")
            exit_layer = head.exit_layer
        if isinstance(num_tokens, bool) or not isinstance(num_tokens, int) or num_tokens < 1:
            raise ValueError(f"num_tokens must be an int >= 1, got {num_tokens!r}")
        if isinstance(controller, str):
            if controller not in CONTROLLERS:
                raise ValueError(f"controller must be one of {CONTROLLERS} or a DraftLengthPolicy, got {controller!r}")
            if controller == "constant":
                policy = ConstantLength(num_tokens)
            else:
                policy = ThompsonLength(num_tokens, alpha=alpha, beta=beta, mode=controller, seed=seed)
        elif isinstance(controller, DraftLengthPolicy):
            policy = controller
        else:
            raise ValueError(f"controller must be one of {CONTROLLERS} or a DraftLengthPolicy, got {controller!r}")
        self.head_spec = head
        self.head: ExitHead | None = head if isinstance(head, ExitHead) else None
        self.exit_layer = exit_layer
        self.controller = controller if isinstance(controller, str) else type(controller).__name__
        self.policy = policy
        self.num_tokens = num_tokens
        self._model_id = None
        self._trunk = None
        self.round_log: list[tuple[int, int]] = []  # (drafted, accepted) per verification of the last call

    @classmethod
    def for_model(cls, model=None, tokenizer=None, head: str | None = "shipped", exit_layer: int | None = None,
                  controller: str = "beta", num_tokens: int = 10, alpha: float = 1.0, beta: float = 1.0,
                  seed: int | None = 0) -> EESDDrafter:
        """Registry/CLI factory (``head`` as in the constructor; the shipped head needs SmolLM2-135M's shapes)."""
        return cls(head=head, exit_layer=exit_layer, controller=controller, num_tokens=num_tokens, alpha=alpha,
                   beta=beta, seed=seed)

    # ------------------------------------------------------------------------------------------------ setup
    def _resolve(self, model) -> None:
        if self._model_id == id(model):
            return
        with torch.inference_mode(False):  # a head built inside generate() must hold ordinary tensors
            self._build(model)

    def _build(self, model) -> None:
        total = len(decoder_layers(model))
        spec = self.head_spec
        if isinstance(spec, ExitHead):
            head = spec
        elif spec is None:
            head = None
        elif isinstance(spec, str) and spec == "untrained":
            head = ExitHead.from_base(model, exit_layer=self.exit_layer or min(6, total - 1))
        else:
            path = shipped_exit_head_path() if isinstance(spec, str) and spec == "shipped" else Path(spec)
            if not (path / "config.json").exists():
                raise ValueError(f"no exit head at {str(path)!r} (config.json missing)")
            head = ExitHead.from_pretrained(str(path))
        if head is not None:
            head.attach(model)
            head.eval()
            for p in head.parameters():
                p.requires_grad_(False)
        n = head.exit_layer if head is not None else (self.exit_layer or min(6, total - 1))
        if self.exit_layer is not None and n != self.exit_layer:
            raise ValueError(f"exit_layer={self.exit_layer} does not match the head's exit layer {n}")
        if not 1 <= n < total:
            raise ValueError(f"exit_layer must be in [1, {total - 1}] for this {total}-layer model, got {n}")
        self.head, self.exit_layer = head, n
        trunk = layer_subset_model(model, range(n))
        base = decoder(trunk)
        for name in _NORM_NAMES:  # the trunk returns layer N's raw output (the shell's containers are its own)
            if isinstance(getattr(base, name, None), torch.nn.Module):
                setattr(base, name, torch.nn.Identity())
                break
        self._trunk = base
        self._cache_arg = "cache" if "cache" in inspect.signature(type(base).forward).parameters else "past_key_values"
        self._model_id = id(model)

    def kernel_modules(self) -> list:
        return [self.head] if self.head is not None else []

    def begin(self, state) -> None:
        if state.input_ids.shape[0] != 1:
            raise ValueError(f"EESDDrafter drafts for batch size 1, got {state.input_ids.shape[0]}")
        self._resolve(state.model)
        self.policy.begin()
        self._head_cache = self.head.new_cache() if self.head is not None else None
        self.round_log = []

    def reset(self) -> None:
        if isinstance(self.policy, ThompsonLength):
            self.policy.reset()

    # ------------------------------------------------------------------------------------------------ drafting
    def _draft_logits(self, state, ids: torch.Tensor, start: int) -> torch.Tensor:
        """Run ``ids`` ``(1, n)`` at cache positions ``start ...`` through the first ``N`` layers (on the target's
        cache) and the exit; float32 logits ``(vocab,)`` at the last position."""
        mask = state.attention_mask
        end = start + ids.shape[1]
        full = torch.ones(1, end, dtype=mask.dtype, device=mask.device)
        full[:, : min(end, mask.shape[1])] = mask[:, :end]
        pos = (full.long().cumsum(-1) - 1).clamp(min=0)[:, start:end]
        cache = LayerSubsetCache(state.cache, range(self.exit_layer))
        hidden = self._trunk(input_ids=ids, attention_mask=full, position_ids=pos, use_cache=True,
                             **{self._cache_arg: cache}).last_hidden_state
        if self.head is None:
            return exit_logits(hidden[:, -1], state.model)[0]
        out = self.head(hidden, position_ids=pos, attention_mask=full, cache=self._head_cache, logits_to_keep=1)
        return out.logits[0, -1]

    @torch.no_grad()
    def propose(self, state) -> Draft:
        ids = state.input_ids
        start = state.cache.get_seq_length()
        if self._head_cache is not None and self._head_cache.get_seq_length() != start:
            crop_layers(self._head_cache, start)
        room = state.generation_config.max_length - ids.shape[1] - 1
        limit = max(0, min(self.policy.length(), room))
        processors = lifecycle.fork(state.logits_processor, caller=type(self).__name__)
        tokens, probs = [], []
        cur, new, pos = ids, ids[:, start:], start
        for _ in range(limit):
            logits = self._draft_logits(state, new, pos)
            pos += new.shape[1]
            scores = processors(cur, logits[None])
            tok, p = pick_draft_token(scores, state.do_sample, probs)
            tokens.append(int(tok))
            new = tok[:, None]
            cur = torch.cat([cur, new], dim=1)
            if self.policy.stop(float(p[0, tok])):
                break
        draft_probs = torch.stack(probs) if probs else None
        return Draft(DraftTree.chain(torch.tensor(tokens, dtype=torch.long), draft_probs,
                                     "deterministic" if draft_probs is None else "iid"))

    @torch.no_grad()
    def observe(self, state, result) -> None:
        drafted, accepted = len(result.draft.tree), len(result.accepted)
        self.policy.update(drafted, accepted)
        self.round_log.append((drafted, accepted))
        if self._head_cache is None:
            return
        # the extra layer's KV must cover what the target's cache now holds: the committed tokens of the verification
        # forward and the accepted draft tokens; fill any position drafting did not feed (the last drafted token)
        # from the target's own layer-N hidden states, identical to the draft's first N layers there
        target_len = result.target_cache.get_seq_length()
        have = self._head_cache.get_seq_length()
        if have > target_len:
            crop_layers(self._head_cache, target_len)
            have = target_len
        if have == target_len:
            return
        hidden = result.all_hidden_states[self.exit_layer]
        n_block = len(result.draft.tree) + (0 if result.draft.side_tokens is None else result.draft.side_tokens.numel())
        s = hidden.shape[0] - n_block
        committed_start = target_len - s - accepted  # cache position of the verification's first committed token
        rows = []
        for p in range(have, target_len):
            k = p - committed_start
            rows.append(k if k < s else s + result.accepted[k - s])
        h = hidden[torch.tensor(rows, device=hidden.device)][None]
        pad = int((state.attention_mask == 0).sum())  # left padding shifts positions
        pos = torch.arange(have - pad, target_len - pad, device=h.device)[None]
        mask = torch.ones(1, target_len, dtype=torch.long, device=h.device)
        mask[:, :pad] = 0
        self.head.features(h, position_ids=pos, attention_mask=mask, cache=self._head_cache)

    # ------------------------------------------------------------------------------------------------ reporting
    def summary(self) -> dict:
        """Mean drafted and accepted tokens per verification of the last call, and tokens per target forward."""
        if not self.round_log:
            return {}
        n = len(self.round_log)
        drafted = sum(d for d, _ in self.round_log) / n
        accepted = sum(a for _, a in self.round_log) / n
        return {"rounds": n, "mean_drafted": drafted, "mean_accepted": accepted, "tokens_per_forward": accepted + 1}
