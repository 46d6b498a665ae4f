"""Isotropic and Proximal Search (Yao et al., EMNLP 2023, arXiv:2310.08130)."""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F

from hf_decoding_ext.core import lifecycle
from hf_decoding_ext.core.loop import DecodingLoop, GenerationState
from hf_decoding_ext.core.rollout import Branch


def ips_scores(probs: torch.Tensor, candidate_hidden: torch.Tensor, response_hidden: torch.Tensor,
               context_hidden: torch.Tensor, context_mask: torch.Tensor | None, alpha: float) -> torch.Tensor:
    r"""The IPS objective (Eq. 3-5 of the paper) for ``m`` candidates of each row.

    Args:
        probs: model confidence :math:`p(w_t \mid w_{<t}, D)` of the candidates, ``(batch, m)``.
        candidate_hidden: representations :math:`h_{w_t}` of the candidates, ``(batch, m, hidden)``.
        response_hidden: representations of the already generated response tokens :math:`w_1..w_{t-1}`,
            ``(batch, t-1, hidden)`` (``t-1 >= 1``).
        context_hidden: utterance representations :math:`h_{u_i}` of the dialogue context, ``(batch, N, hidden)``.
        context_mask: ``(batch, N)`` booleans marking real utterances (rows may have different ``N``); ``None``: all.
        alpha: weight of the model confidence.

    Returns:
        ``alpha * p + (1 - alpha) * (p_value - i_value)``, ``(batch, m)``, where ``p_value`` is the mean cosine
        similarity of the candidate with the generated tokens and ``i_value`` the mean cosine similarity of the
        response representation :math:`h_{RT}` (mean of the generated tokens' and the candidate's representations)
        with the context utterances.
    """
    cand = candidate_hidden.float()
    prev = response_hidden.float()
    ctx = context_hidden.float()
    t_prev = prev.shape[1]
    if t_prev < 1:
        raise ValueError("IPS needs at least one generated token before scoring candidates")
    p_value = torch.einsum("bmh,bth->bmt", F.normalize(cand, dim=-1), F.normalize(prev, dim=-1)).mean(-1)
    h_rt = (prev.sum(1, keepdim=True) + cand) / (t_prev + 1)  # (batch, m, hidden)
    sims = torch.einsum("bmh,bnh->bmn", F.normalize(h_rt, dim=-1), F.normalize(ctx, dim=-1))
    if context_mask is None:
        i_value = sims.mean(-1)
    else:
        w = context_mask.to(sims.dtype)[:, None, :]
        i_value = (sims * w).sum(-1) / w.sum(-1).clamp(min=1.0)
    return alpha * probs.float() + (1.0 - alpha) * (p_value - i_value)


class IsotropicProximalSearch(DecodingLoop):
    r"""Isotropic and Proximal Search (IPS), from "Fine-grained Conversational Decoding via Isotropic and Proximal
    Search" (Yao et al., EMNLP 2023, https://arxiv.org/abs/2310.08130).

    A contrastive-search-style decoder for dialogue responses. The first ``first_steps`` tokens are decoded the
    usual way (greedy, or sampled with ``do_sample=True``; the paper samples them with top-k, k=7). Then at each step
    the ``top_k`` most probable tokens :math:`V^{(m)}` are fed in one batched forward (on a
    :class:`~hf_decoding_ext.core.rollout.Branch` of ``top_k`` copies of the cache, the chosen candidate's copy kept,
    as in transformers' former contrastive search), and the token maximising

    .. math::
        \alpha\, p(w_t \mid w_{<t}, D) + (1-\alpha)\,(\text{p\_value}_t - \text{i\_value}_t)

    is chosen, where :math:`\text{p\_value}_t = \frac{1}{t-1}\sum_{i<t} s(h_{w_t}, h_{w_i})` (*proximity*: the
    response tokens should stay close to each other, expressing one concentrated idea) and
    :math:`\text{i\_value}_t = \frac1N \sum_{i=1}^N s(h_{RT}, h_{u_i})` (*isotropy*: the response representation
    :math:`h_{RT}`, the mean of the representations of the response tokens including the candidate, should be
    discriminative against the :math:`N` context utterances). :math:`s` is the cosine similarity and
    representations are the model's last-layer hidden states. ``alpha=1`` is greedy search.

    The dialogue context comes in through the chat template: each utterance of the prompt (system, user and assistant
    turns) is represented by the hidden state of its end-of-utterance token (the paper's ``[EOU]``; by default the
    model's eos token(s), e.g. ``<|im_end|>`` for ChatML templates). A prompt without such a token is treated as one
    utterance represented by its last token.

    With ``return_dict_in_generate=True`` the output carries the search trace: ``ips_candidate_ids``,
    ``ips_candidate_probs``, ``ips_scores`` (``(steps, batch, top_k)``), ``ips_candidate_hidden``
    (``(steps, batch, top_k, hidden)``), ``ips_response_hidden`` (``(batch, T, hidden)``, the generated tokens whose
    representation was computed), ``ips_context_hidden`` (``(batch, N, hidden)``) and ``ips_context_mask``; step ``s``
    of the trace chooses generated token number ``first_steps + s`` (0-based).

    Deviations: the paper fine-tunes BART on DailyDialog/LCCC; here the decoder-only model's own chat context is
    used. The paper gives ``top_k`` (m) as "typically 4 to 8" without one value; 5 is used.

    Args:
        alpha: weight of the model confidence (paper: 0.6; 1.0 = greedy).
        top_k: size of the candidate set :math:`V^{(m)}`.
        first_steps: number of tokens decoded before IPS starts (paper: n = 2; at least 1).
        eou_token_id: token id(s) that end an utterance in the prompt; default: the generation config's eos ids.

    Example:
        >>> from hf_decoding_ext.core.models import load_model, encode_prompts
        >>> from hf_decoding_ext.sampling.ips import IsotropicProximalSearch
        >>> model, tokenizer = load_model()  # doctest: +SKIP
        >>> chat = [{"role": "user", "content": "Hi! Any plans tonight?"},
        ...         {"role": "assistant", "content": "Not yet. Maybe a film."},
        ...         {"role": "user", "content": "Which one?"}]
        >>> inputs = encode_prompts(tokenizer, [chat])  # doctest: +SKIP
        >>> out = model.generate(**inputs, custom_generate=IsotropicProximalSearch(), do_sample=False,
        ...                      max_new_tokens=30)  # doctest: +SKIP
    """

    needs_uncached_prompt = True  # the context representations are the prompt's hidden states

    def __init__(self, alpha: float = 0.6, top_k: int = 5, first_steps: int = 2,
                 eou_token_id: int | Sequence[int] | None = None):
        if not 0.0 <= float(alpha) <= 1.0:
            raise ValueError(f"alpha must be in [0, 1], got {alpha}")
        if not isinstance(top_k, int) or top_k < 1:
            raise ValueError(f"top_k must be a positive integer, got {top_k!r}")
        if not isinstance(first_steps, int) or first_steps < 1:
            raise ValueError(f"first_steps must be an integer >= 1 (the proximity term needs a generated token), "
                             f"got {first_steps!r}")
        if eou_token_id is not None:
            ids = [eou_token_id] if isinstance(eou_token_id, int) else list(eou_token_id)
            if not ids or not all(isinstance(i, int) and i >= 0 for i in ids):
                raise ValueError(f"eou_token_id must be a non-negative int or a list of them, got {eou_token_id!r}")
            eou_token_id = ids
        self.alpha = float(alpha)
        self.top_k = top_k
        self.first_steps = first_steps
        self.eou_token_id = eou_token_id

    # ------------------------------------------------------------------------------------------------ context
    def _eou_ids(self, state: GenerationState) -> list[int]:
        if self.eou_token_id is not None:
            return self.eou_token_id
        eos = state.generation_config.eos_token_id
        if eos is None:
            return []
        return [eos] if isinstance(eos, int) else list(eos)

    def context_representations(self, state: GenerationState, hidden: torch.Tensor):
        """Utterance representations ``(batch, N, hidden)`` and mask ``(batch, N)`` from prompt hidden states."""
        ids, mask = state.input_ids, state.attention_mask.bool()
        eou = torch.zeros_like(mask)
        for t in self._eou_ids(state):
            eou |= ids == t
        eou &= mask
        last = torch.zeros_like(mask)
        last[:, -1] = True
        eou = torch.where(eou.any(1, keepdim=True), eou, last)  # no utterance boundary: the prompt is one utterance
        n_max = int(eou.sum(1).max())
        ctx = hidden.new_zeros(ids.shape[0], n_max, hidden.shape[-1])
        ctx_mask = torch.zeros(ids.shape[0], n_max, dtype=torch.bool, device=ids.device)
        for b in range(ids.shape[0]):
            pos = eou[b].nonzero().squeeze(1)
            ctx[b, : pos.numel()] = hidden[b, pos]
            ctx_mask[b, : pos.numel()] = True
        return ctx, ctx_mask

    # ------------------------------------------------------------------------------------------------ decoding
    def run(self, state: GenerationState):
        out = state.forward(output_hidden_states=True)
        ctx_hidden, ctx_mask = self.context_representations(state, out.hidden_states[-1])
        next_logits = out.logits[:, -1, :]
        response: list[torch.Tensor] = []  # (batch, hidden) per generated token with a known representation
        trace = {"ids": [], "probs": [], "hidden": [], "scores": []} if state.return_dict else None
        step = 0
        batch = state.batch_size
        while not state.done:
            scores = state.process(next_logits)
            state.record(scores, next_logits)
            if step < self.first_steps:
                tokens = state.select(scores)
                state.append(tokens)
                step += 1
                if state.done:
                    break
                out = state.forward(output_hidden_states=True)
                response.append(out.hidden_states[-1][:, -1, :])
                next_logits = out.logits[:, -1, :]
                continue
            # IPS step: one batched forward over the top-k candidates
            probs = torch.softmax(scores, dim=-1)
            k = min(self.top_k, probs.shape[-1])
            cand_probs, cand_ids = probs.topk(k, dim=-1)  # (batch, k)
            branch = Branch(state, k=k)  # k copies of every row's cache
            branch.extend(cand_ids.reshape(-1))
            cand_out = branch.forward(output_hidden_states=True)
            cand_hidden = cand_out.hidden_states[-1][:, -1, :].reshape(batch, k, -1)
            obj = ips_scores(cand_probs, cand_hidden, torch.stack(response, 1), ctx_hidden, ctx_mask, self.alpha)
            obj = obj.masked_fill(cand_probs <= 0, float("-inf"))  # tokens the processors removed
            choice = obj.argmax(-1)  # (batch,)
            rows = torch.arange(batch, device=state.device)
            branch.keep(rows * k + choice)  # the chosen candidate's cache becomes the state's
            if trace is not None:
                trace["ids"].append(cand_ids)
                trace["probs"].append(cand_probs)
                trace["hidden"].append(cand_hidden)
                trace["scores"].append(obj)
            branch.commit()
            # the next scores come from the chosen rows of the candidate forward (kNN-LM reads its hidden state)
            lifecycle.locate(state.logits_processor, rows=rows * k + choice)
            step += 1
            response.append(cand_hidden[rows, choice])
            next_logits = cand_out.logits[:, -1, :].reshape(batch, k, -1)[rows, choice]
        if trace is None:
            return None
        hidden_size = ctx_hidden.shape[-1]

        def stack(xs, shape):
            return torch.stack(xs) if xs else ctx_hidden.new_zeros(shape)

        return {
            "ips_candidate_ids": stack(trace["ids"], (0, batch, self.top_k)).long(),
            "ips_candidate_probs": stack(trace["probs"], (0, batch, self.top_k)),
            "ips_scores": stack(trace["scores"], (0, batch, self.top_k)),
            "ips_candidate_hidden": stack(trace["hidden"], (0, batch, self.top_k, hidden_size)),
            "ips_response_hidden": torch.stack(response, 1) if response else ctx_hidden.new_zeros(batch, 0,
                                                                                                     hidden_size),
            "ips_context_hidden": ctx_hidden,
            "ips_context_mask": ctx_mask,
        }
