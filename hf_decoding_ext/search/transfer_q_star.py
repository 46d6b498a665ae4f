"""Transfer Q Star (TQ*, Chakraborty, Ghosal, Yin, Manocha, Wang, Bedi, Huang; NeurIPS 2024, arXiv:2405.20495):
token-level decoding-time alignment with a rollout estimate of the optimal action value.

At every token the top-``k`` candidates of the model's (processed) next-token scores are each rolled out greedily
for ``horizon`` tokens by a baseline model :math:`\\rho_{BL}`, in one batched rollout from the shared prefix cache;
each rollout text is scored by the target reward, giving :math:`\\hat Q(s, z)`, and the token maximising
``score(z) + alpha * Q(s, z)`` is appended (or one is sampled from ``softmax`` of it with ``do_sample=True``).

* :class:`TransferQStarDecoding`: the ``custom_generate`` loop (direct transfer; indirect transfer with
  ``baseline_reward=``).
* :func:`indirect_q`: the indirect-transfer value ``exp(scale * (r - r_BL)) * r`` of the official code.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from transformers import DynamicCache

from hf_decoding_ext.core.loop import DecodingLoop, GenerationState
from hf_decoding_ext.core.rollout import rollout
from hf_decoding_ext.core.scoring import resolve_reward
from hf_decoding_ext.core.step_search import SearchStats

REWARD_INPUTS = ("response", "full")


def indirect_q(target_reward: torch.Tensor, baseline_reward: torch.Tensor, scale: float = 0.5) -> torch.Tensor:
    r"""The indirect-transfer value of rollouts scored by the target reward :math:`r` and the baseline model's own
    reward :math:`r_{BL}`: :math:`\hat Q = e^{\beta^{-1}(r - r_{BL})}\, r` (the importance factor of the paper's
    indirect transfer; the official ``indirect.py`` uses :math:`\beta^{-1} = 0.5`).

    Example:
        >>> import torch
        >>> [round(v, 4) for v in indirect_q(torch.tensor([1.0, 2.0]), torch.tensor([1.0, 0.0])).tolist()]
        [1.0, 5.4366]
    """
    return torch.exp(scale * (target_reward - baseline_reward)) * target_reward


class TransferQStarDecoding(DecodingLoop):
    r"""Transfer Q* decoding: "Transfer Q Star: Principled Decoding for LLM Alignment" (Chakraborty et al., NeurIPS
    2024, https://arxiv.org/abs/2405.20495; official code Soumya1612-Rasha/Transfer-Q, ``direct.py`` /
    ``indirect.py``).

    The paper's target policy is :math:`\pi^*(z|s) \propto \pi_{sft}(z|s)\exp(\alpha Q^*(s, z))`, with the optimal
    action value :math:`Q^*` of the target reward estimated through a baseline model :math:`\rho_{BL}` aligned for a
    baseline reward: roll :math:`\rho_{BL}` out from :math:`[s, z]` and score the trajectory. As in the official
    ``TQ_direct.generate_step``, at each step of each prompt row:

    1. the top-``num_candidates`` tokens :math:`z_1..z_k` of the model's next-token scores (its logits after the
       caller's ``generate()`` processors: the raw logits under plain greedy decoding, as in the official code) are
       the candidates;
    2. each candidate is rolled out greedily by the baseline model for ``horizon`` more tokens (fewer if it emits
       eos), all ``k`` (times the number of unfinished rows) in ONE batched
       :func:`~hf_decoding_ext.core.rollout.rollout` from a copy of the shared prefix cache (``first_tokens`` =
       the candidates);
    3. the text of each rollout (the response so far + candidate + rollout; with ``reward_input="full"`` the prompt
       too, as the official reward model sees it) is scored by the target reward: :math:`\hat Q(s, z_i) = r(\cdot)`
       (direct transfer), or with ``baseline_reward`` :math:`r_{BL}` given,
       :math:`\hat Q = e^{0.5 (r - r_{BL})}\, r` (:func:`indirect_q`, the official indirect transfer);
    4. the score :math:`\text{score}(z_i) + \alpha \hat Q(s, z_i)` is formed and its argmax appended
       (``do_sample=True``: a sample from its softmax, the official ``"topk"`` mode).

    With ``alpha=0`` the choice is the argmax of the model's scores, i.e. exactly greedy ``generate()``.

    Cost per generated token and unfinished row: one forward of the model, ``horizon`` batched forwards of the
    baseline (one more for a separate ``baseline_model``, to extend its own prefix cache), ``k * (horizon + 1)``
    rollout tokens, ``k`` reward calls (``2k`` with indirect transfer). The counters
    (:class:`~hf_decoding_ext.core.step_search.SearchStats`: ``model_calls``, ``generated_tokens`` = rollout tokens
    including the candidate tokens, ``rollouts``, ``scorer_calls``) are reported with ``return_dict_in_generate=True``
    under ``search_stats``, with the per-step ``tq_candidates`` ``(batch, k)`` (-1 for finished rows or missing
    candidates), ``tq_q_values`` and ``tq_scores`` (the shifted scores, ``-inf`` where not a candidate).

    Args:
        alpha (`float`, *optional*, defaults to 1.0): weight of the value (the official ``rm_weight``; 1.0 in its
            ``example.config``); ``0`` recovers the model's own greedy / sampled choice among the candidates.
        num_candidates (`int`, *optional*, defaults to 4): candidates per step (the official ``topk``, 10 there).
        horizon (`int`, *optional*, defaults to 8): baseline rollout length after the candidate (20 in the
            official ``direct.py``, 5 in ``indirect.py``); ``0`` scores the candidate-extended prefix itself.
        reward (callable or ``"vader"``, *optional*, defaults to ``"vader"``): the target reward :math:`r`, any
            ``text -> float`` (token-id lists without a tokenizer); ``"vader"`` is
            :func:`~hf_decoding_ext.core.scoring.vader_reward`.
        baseline_reward (callable or ``"vader"``, *optional*): the baseline model's reward :math:`r_{BL}`; when
            given, indirect transfer (see above).
        indirect_scale (`float`, *optional*, defaults to 0.5): :math:`\beta^{-1}` of the indirect importance
            factor (0.5 in the official code).
        baseline_model (*optional*): the baseline model :math:`\rho_{BL}` (a causal LM sharing the tokenizer and
            vocabulary); ``None``: the model itself (see the deviations).
        tokenizer (*optional*): decodes rollouts for a text reward.
        reward_input (`str`, *optional*, defaults to ``"response"``): what the reward scores: ``"response"`` (the
            generated text: response so far + candidate + rollout) or ``"full"`` (the prompt followed by it).
        seed (`int`, *optional*): seed of the generator used with ``do_sample=True`` (``None``: torch's global one).

    Example:
        >>> from hf_decoding_ext import encode_prompts, load_model
        >>> from hf_decoding_ext.search.transfer_q_star import TransferQStarDecoding
        >>> model, tokenizer = load_model()  # doctest: +SKIP
        >>> loop = TransferQStarDecoding(alpha=4.0, num_candidates=4, horizon=6, tokenizer=tokenizer)  # doctest: +SKIP
        >>> out = model.generate(**encode_prompts(tokenizer, "Describe the weather today."), max_new_tokens=20,
        ...                      custom_generate=loop, return_dict_in_generate=True)  # doctest: +SKIP
        >>> out.search_stats  # doctest: +SKIP

    Deviations and stand-ins:
        * Reward: VADER compound sentiment (:func:`~hf_decoding_ext.core.scoring.vader_reward`, lexicon bundled)
          stands in for the paper's learned reward models (``usvsnsp/pythia-6.9b-rm-full-hh-rlhf`` in the official
          code); any ``text -> float`` callable replaces it. By default it scores the generated text only
          (``reward_input="response"``): VADER is not additive, so the prompt's own sentiment would blur the
          comparison; ``reward_input="full"`` scores prompt + response as the official code does (it decodes the
          whole sequence, special tokens included; here special tokens are skipped).
        * Baseline model: the paper's :math:`\rho_{BL}` is a model aligned for a baseline reward, distinct from the
          SFT model proposing the candidates. No such pair exists offline for the default model, so by default the
          model itself (SmolLM2-135M-Instruct, already SFT + preference-tuned) plays both roles, as the official
          code also does (``lomahony/eleuther-pythia6.9b-hh-dpo`` proposes and rolls out); ``baseline_model=``
          accepts a separate model sharing the tokenizer.
        * Candidates are the top-k of the caller's processed scores (the raw logits under plain greedy decoding,
          as officially), and ``alpha * Q`` is added after the processors: with ``temperature=T`` sampling draws
          from ``softmax(logit / T + alpha Q)``, i.e. the official ``rm_weight`` equals ``alpha * T`` (its sampling
          temperature, 0.7 by default, applies to the sum). Candidates the processors removed (``-inf``) are not
          rolled out as candidates; a row left with fewer than ``k`` re-runs its best candidate in the spare
          batch slots (counted in the rollout counters, not scored).
        * Rollouts are greedy on the baseline's raw logits (the official ``generate(max_new_tokens=...)`` with the
          baseline's default, greedy, generation config), end at eos, and ignore the caller's stopping criteria
          (like the official rollouts, they may look past ``max_new_tokens``).
        * Defaults are small for a 2-core CPU: ``num_candidates=4`` (official 10), ``horizon=8`` (official 20 in
          ``direct.py``); the official "greedy_large" chunked mode (reward on the candidate-extended prefix with the
          reward model's cache) is ``horizon=0`` here, without a reward-model cache.
        * Generation ends at eos and the caller's stopping criteria, as ``generate()`` does (the official loop runs
          a fixed ``max_new_token`` steps without an eos check).
        * Indirect transfer follows the official ``indirect.py`` (``exp(0.5 * (r - r_BL)) * r``); the official file
          loads the same reward model twice, so its Δ is 0 there; here ``baseline_reward`` is any other callable.
    """

    supports_output_scores = True

    def __init__(self, alpha: float = 1.0, num_candidates: int = 4, horizon: int = 8,
                 reward: Callable[..., float] | str = "vader", baseline_reward: Callable[..., float] | str | None = None,
                 indirect_scale: float = 0.5, baseline_model=None, tokenizer=None, reward_input: str = "response",
                 seed: int | None = None):
        if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not math.isfinite(alpha):
            raise ValueError(f"alpha must be a finite number, got {alpha!r}")
        if not isinstance(num_candidates, int) or isinstance(num_candidates, bool) or num_candidates < 1:
            raise ValueError(f"num_candidates must be a positive integer, got {num_candidates!r}")
        if not isinstance(horizon, int) or isinstance(horizon, bool) or horizon < 0:
            raise ValueError(f"horizon must be a non-negative integer, got {horizon!r}")
        if isinstance(indirect_scale, bool) or not isinstance(indirect_scale, (int, float)) or not math.isfinite(
                indirect_scale):
            raise ValueError(f"indirect_scale must be a finite number, got {indirect_scale!r}")
        if reward_input not in REWARD_INPUTS:
            raise ValueError(f"reward_input must be one of {REWARD_INPUTS}, got {reward_input!r}")
        if reward_input == "full" and tokenizer is None:
            raise ValueError("reward_input='full' decodes the prompt: pass the tokenizer")
        if seed is not None and (not isinstance(seed, int) or isinstance(seed, bool)):
            raise ValueError(f"seed must be None or an integer, got {seed!r}")
        if baseline_model is not None and not callable(getattr(baseline_model, "forward", None)):
            raise ValueError(f"baseline_model must be a causal LM, got {type(baseline_model).__name__}")
        self.alpha = float(alpha)
        self.num_candidates = num_candidates
        self.horizon = horizon
        self.reward = resolve_reward(reward, tokenizer, "reward")
        self.baseline_reward = (None if baseline_reward is None
                                else resolve_reward(baseline_reward, tokenizer, "baseline_reward"))
        self.indirect_scale = float(indirect_scale)
        self.baseline_model = baseline_model
        self.tokenizer = tokenizer
        self.reward_input = reward_input
        self.seed = seed

    # ------------------------------------------------------------------------------------------ pieces
    def _text(self, state: GenerationState, row: int, tokens: list[int]):
        """What the reward receives for a rollout of ``row``: decoded text, or token ids without a tokenizer."""
        if self.tokenizer is None:
            return list(tokens)
        text = self.tokenizer.decode(tokens, skip_special_tokens=True)
        if self.reward_input == "full":
            ids = state.input_ids[row, :state.prompt_length][state.attention_mask[row, :state.prompt_length].bool()]
            text = self.tokenizer.decode(ids.tolist(), skip_special_tokens=True) + text
        return text

    def q_values(self, state: GenerationState, row: int, rollouts: list[list[int]],
                 stats: SearchStats | None = None) -> torch.Tensor:
        """:math:`\\hat Q` of rollouts (candidate + baseline continuation, token lists) of ``row``: the target reward
        of the response so far followed by each rollout (direct), or :func:`indirect_q` with ``baseline_reward``.
        ``(n,)`` float64."""
        prefix = state.input_ids[row, state.prompt_length:].tolist()
        inputs = [self._text(state, row, prefix + toks) for toks in rollouts]
        r = torch.tensor([float(self.reward(x)) for x in inputs], dtype=torch.float64)
        if stats is not None:
            stats.scorer_calls += len(inputs)
        if self.baseline_reward is None:
            return r
        r_bl = torch.tensor([float(self.baseline_reward(x)) for x in inputs], dtype=torch.float64)
        if stats is not None:
            stats.scorer_calls += len(inputs)
        return indirect_q(r, r_bl, self.indirect_scale)

    def _baseline_view(self, state: GenerationState, cache) -> GenerationState:
        view = object.__new__(GenerationState)
        view.__dict__.update(state.__dict__)  # shares input_ids, mask, config and the forward counter
        view.model = self.baseline_model
        view.cache = cache
        view.streamer = None
        return view

    # ------------------------------------------------------------------------------------------ the loop
    def run(self, state: GenerationState):
        stats = SearchStats()
        k, horizon = self.num_candidates, self.horizon
        generator = None
        if state.do_sample and self.seed is not None:
            generator = torch.Generator(device=state.device).manual_seed(self.seed)
        bl_cache = None
        if self.baseline_model is not None:
            vocab = state.model.get_output_embeddings().weight.shape[0]
            bl_vocab = self.baseline_model.get_output_embeddings().weight.shape[0]
            if bl_vocab != vocab:
                raise ValueError(f"baseline_model must share the model's vocabulary: {bl_vocab} tokens vs {vocab}")
            bl_cache = DynamicCache(config=self.baseline_model.config)
        all_candidates, all_q, all_scores = [], [], []
        while not state.done:
            before = state.stats["forwards"]
            raw, _ = state.next_token_logits()
            proc = state.process(raw)
            active = state.unfinished.nonzero().flatten()
            top = proc[active].topk(min(k, proc.shape[-1]), dim=-1)
            cand, valid = top.indices, torch.isfinite(top.values)
            if cand.shape[1] < k:  # vocabulary smaller than k
                pad = k - cand.shape[1]
                cand = torch.cat([cand, cand[:, :1].expand(-1, pad)], dim=1)
                valid = torch.cat([valid, valid.new_zeros(cand.shape[0], pad)], dim=1)
            first = torch.where(valid, cand, cand[:, :1])  # spare slots re-run the best candidate
            if self.baseline_model is None:
                view, bl_logits = state, raw[active]
            else:
                view = self._baseline_view(state, bl_cache)
                bl_logits = view.forward().logits[:, -1, :][active]
            r = rollout(view, k, rows=active, first_tokens=first, logits=bl_logits, process=None, do_sample=False,
                        max_tokens=horizon + 1, stop_on_eos=True, use_stopping_criteria=False)
            stats.model_calls += state.stats["forwards"] - before
            stats.generated_tokens += int(r.lengths.sum())
            stats.rollouts += r.lengths.numel()
            lists = r.token_lists()
            q = torch.full((state.batch_size, k), float("nan"), dtype=torch.float64, device=state.device)
            shifted = torch.full_like(proc, float("-inf"))
            cand_out = torch.full((state.batch_size, k), -1, dtype=torch.long, device=state.device)
            for i, row in enumerate(active.tolist()):
                ok = valid[i].nonzero().flatten().tolist()
                qi = self.q_values(state, row, [lists[i * k + j] for j in ok], stats)
                q[row, ok] = qi.to(q.device)
                toks = cand[i, ok]
                cand_out[row, ok] = toks
                shifted[row, toks] = proc[row, toks] + self.alpha * qi.to(proc.dtype).to(proc.device)
            if state.do_sample:
                probs = torch.softmax(shifted[active], dim=-1)
                choice = torch.multinomial(probs, num_samples=1, generator=generator).squeeze(1)
            else:
                choice = shifted[active].argmax(dim=-1)
            nxt = torch.zeros(state.batch_size, dtype=torch.long, device=state.device)
            nxt[active] = choice
            state.record(shifted, raw)
            all_candidates.append(cand_out)
            all_q.append(q)
            all_scores.append(shifted)
            state.append(nxt)
        state.truncate_cache()
        stats.stop()
        return {"search_stats": stats.as_dict(), "tq_candidates": all_candidates, "tq_q_values": all_q,
                "tq_scores": all_scores}
