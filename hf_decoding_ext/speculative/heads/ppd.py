"""Parallel Prompt Decoding prompt tokens (Chen et al., "Hardware-Aware Parallel Prompt Decoding for Memory-Efficient
Acceleration of LLM Inference", arXiv 2405.18628; code: hmarkc/parallel-prompt-decoding)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from hf_decoding_ext.speculative.heads.base import DraftHeadConfig, DraftHeadModel

PAPER_FIDELITY = (
    ("prompt tokens", "3 trainable prompt tokens, 1 virtual token each (the paper's lowest-latency default); the "
     "ensemble of several virtual tokens per prompt token (ensemble attention) is not implemented: "
     "num_virtual_tokens != 1 is refused"),
    ("trained parameters", "the prompt-token input embeddings only (3 x 576 = 1728 floats); the base model is frozen"),
    ("training objective", "KL(base distribution || prompt-token distribution) at the future positions the prompt "
     "tokens stand for, as the official trainer's self-distillation; the base distributions are the frozen model's "
     "own (lm_head of the cached last-layer features) on its own greedy responses to the distillation prompts, not "
     "ShareGPT"),
    ("training inputs", "prompt-token groups inserted after random anchor positions of a whole sequence with a 4D "
     "mask (each group sees its prefix and the earlier members of the group), several groups per forward; the "
     "official trainer appends prompt tokens after random truncation points"),
    ("training budget", "bounded by the shared 2-core CPU queue (~10 minutes of full 30-layer forward+backward "
     "passes), far below the paper's 16 A100 hours: see config.training"),
    ("initialisation", "every prompt token starts at the mean of the base model's input embeddings (the official "
     "code initialises from existing token embeddings)"),
    ("tree", "dynamic sparse tree: candidate paths best-first from the held-out per-depth top-k accuracies, "
     "prompt tokens removed greedily from the nodes least likely to end the accepted path while the expected rate "
     "improves; one candidate tree whose depth <= c part serves the state 'c prompt tokens at the last accepted "
     "node' (the official builder optimises a separate tree size per depth state); candidate counts searched "
     "1..16 then every 4"),
    ("hardware awareness", "the expected tokens per step (stationary Markov chain over the prompt-token state, as "
     "the official expected_accuracy) divided by the verification cost read from the verify-cost curve measured on "
     "the running machine with the engine's kernels (tuning.device_curve), instead of end-to-end latency "
     "measurements per tree length (application/tree_latency.py); drafting costs nothing extra in PPD"),
    ("first step", "the prompt goes through one verification forward with prompt tokens after its last token (no "
     "candidates yet), as the official first forward"),
    ("held-out accuracies", "measured on the first 40 held-out sequences (each costs a full target forward)"),
)


def fidelity_markdown() -> str:
    return "\n".join(f"- **{k}**: {v}" for k, v in PAPER_FIDELITY)


class PPDConfig(DraftHeadConfig):
    """Configuration of :class:`PromptTokens`.

    Args:
        num_prompt_tokens: prompt tokens appended after a token; prompt token ``i`` (1-based) stands for the token
            ``i + 1`` positions ahead of the one the base model predicts next (the paper: 3).
        num_virtual_tokens: virtual tokens per prompt token (the paper's ensemble; only 1 is implemented).
        anchors_per_sequence: prompt-token groups inserted per training sequence.
        sequence_length: training sequences are cut to their last ``sequence_length`` tokens.
        eval_sequences: held-out sequences the per-depth accuracies are measured on (full target forwards).
    """

    model_type = "hf_decoding_ext_ppd"

    def __init__(self, num_prompt_tokens: int = 3, num_virtual_tokens: int = 1, anchors_per_sequence: int = 64,
                 sequence_length: int = 256, eval_sequences: int = 40, **kwargs):
        super().__init__(**kwargs)
        if isinstance(num_prompt_tokens, bool) or not isinstance(num_prompt_tokens, int) or num_prompt_tokens < 1:
            raise ValueError(f"num_prompt_tokens must be an int >= 1, got {num_prompt_tokens!r}")
        if num_virtual_tokens != 1:
            raise ValueError(f"num_virtual_tokens must be 1 (the ensemble of virtual tokens is not implemented), got "
                             f"{num_virtual_tokens!r}")
        if anchors_per_sequence < 1 or sequence_length < num_prompt_tokens + 2:
            raise ValueError(f"anchors_per_sequence must be >= 1 and sequence_length >= num_prompt_tokens + 2, got "
                             f"{anchors_per_sequence!r} and {sequence_length!r}")
        self.num_prompt_tokens = num_prompt_tokens
        self.num_virtual_tokens = num_virtual_tokens
        self.anchors_per_sequence = anchors_per_sequence
        self.sequence_length = sequence_length
        self.eval_sequences = eval_sequences


class PromptTokens(DraftHeadModel):
    """PPD's trained prompt tokens: ``num_prompt_tokens`` input embeddings fed to the frozen target after a token.

    Fed right after token ``t`` (positions ``t + 1, ..., t + m``, each attending to the prefix and to the earlier prompt
    tokens of its group), the target's output at prompt token ``i`` is a guess of token ``t + i + 1`` (the target
    itself predicts ``t + 1``): PPD drafts with the target model itself, and only these ``m x hidden`` floats are
    trained (self-distillation, the base frozen). The drafter
    (:class:`~hf_decoding_ext.speculative.drafters.ppd.PPDDrafter`) feeds them in every verification forward,
    attached to the tree nodes, so each forward both verifies the current draft and yields the next one.

    Deviations from the paper and the official code:

    {fidelity}

    Args:
        config: a :class:`PPDConfig`.

    Example:
        >>> from hf_decoding_ext.speculative.heads.ppd import PPDConfig, PromptTokens
        >>> head = PromptTokens(PPDConfig(hidden_size=model.config.hidden_size,
        ...                               vocab_size=model.config.vocab_size)).attach(model)  # doctest: +SKIP
        >>> head.num_own_parameters()  # 3 x 576 floats for SmolLM2-135M  # doctest: +SKIP
        1728
    """

    depth_key = "num_prompt_tokens"
    config_class = PPDConfig
    main_input_name = "input_ids"
    head_kind = "ppd"
    display_name = "Parallel Prompt Decoding prompt tokens"
    method = "ppd"
    drafter = "hf_decoding_ext.speculative.drafters.ppd:PPDDrafter"
    shipped_name = "smollm2-135m-instruct-ppd"
    training_defaults = {"lr": 1e-2, "batch_size": 2, "warmup": 10, "log_every": 5, "checkpoint_every": 50,
                         "tree_nodes": 16}
    shipped_recipe = {"steps": 50, "batch_size": 2, "lr": 1e-2, "weight_decay": 0.0, "warmup": 5, "log_every": 5,
                      "checkpoint_every": 25, "save_dtype": "float16"}
    """50 steps x 2 sequences x 64 anchors (~6.4k anchors, 19k supervised prompt-token positions): every step is a
    full no-grad target forward over 2 x 256 tokens plus a forward+backward over 384 prompt rows, about 8 s alone on
    the 2-core CPU, so the queue job (load, 50 steps, held-out accuracies on 40 sequences) stays near 10 minutes;
    1728 trained floats converge in few steps (lr 1e-2, as the official trainer)."""
    card_config_keys = ("num_prompt_tokens", "num_virtual_tokens", "anchors_per_sequence", "sequence_length")

    def __init__(self, config: PPDConfig):
        super().__init__(config)
        self.prompt_embeddings = nn.Parameter(torch.zeros(config.num_prompt_tokens * config.num_virtual_tokens,
                                                          config.hidden_size))
        self._initialised = False
        self.post_init()

    def _init_weights(self, module):
        pass  # the prompt embeddings are set from the base embeddings at attach() (or loaded)

    def attach(self, base_model) -> PromptTokens:
        super().attach(base_model)
        if not self._initialised and not bool(self.prompt_embeddings.detach().abs().sum() > 0):
            self.reset_embeddings()
        self._initialised = True
        return self

    @torch.no_grad()
    def reset_embeddings(self) -> None:
        """Set every prompt token to the mean of the base model's input embeddings (the untrained state)."""
        mean = self._require_base()["embedding"].weight.detach().float().mean(0)
        self.prompt_embeddings.copy_(mean.to(self.prompt_embeddings.dtype).expand_as(self.prompt_embeddings))

    def prompt_embeds(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """The prompt-token input embeddings ``(num_prompt_tokens, hidden)``."""
        e = self.prompt_embeddings
        return e if dtype is None else e.to(dtype)

    def forward(self, input_ids: torch.Tensor, anchors: torch.Tensor, valid: torch.Tensor | None = None):
        """Target logits at the prompt tokens ``(B, A, m, vocab)`` with a group of prompt tokens after each of the
        ``anchors`` ``(B, A)`` (positions in ``input_ids (B, T)``, right-padded, ``valid`` its mask; ``-1``: no
        group). The sequence runs once without gradient into a KV cache; the ``A x m`` prompt tokens then run on
        it with a 4D mask (each group sees the prefix up to its anchor and the earlier members of its group), so
        gradients flow to the prompt embeddings through the prompt rows only."""
        model = self.target_model()
        b, t = input_ids.shape
        a, m = anchors.shape[1], self.config.num_prompt_tokens
        device = input_ids.device
        valid = torch.ones(b, t, dtype=torch.bool, device=device) if valid is None else valid.bool()
        with torch.no_grad():
            cache = model(input_ids=input_ids, attention_mask=valid.long(), use_cache=True, logits_to_keep=1,
                          return_dict=True).past_key_values
        dtype = self.embed(input_ids[:, :1]).dtype
        prompts = self.prompt_embeds(dtype)[None, None].expand(b, a, m, -1).reshape(b, a * m, -1)
        has = anchors >= 0
        anc = anchors.clamp(min=0)
        ar = torch.arange(t, device=device)
        allowed = torch.zeros(b, a, m, t + a * m, dtype=torch.bool, device=device)
        allowed[..., :t] = ((ar[None, None, :] <= anc[..., None]) & valid[:, None, :] & has[..., None])[:, :, None]
        group = torch.tril(torch.ones(m, m, dtype=torch.bool, device=device))
        for g in range(a):
            allowed[:, g, :, t + g * m:t + (g + 1) * m] = group[None] & has[:, g, None, None]
        allowed = allowed.view(b, a * m, t + a * m)
        idx = torch.arange(a * m, device=device)
        allowed[:, idx, t + idx] = True  # rows of absent groups attend to themselves (no empty softmax row)
        mask = torch.zeros(b, 1, a * m, t + a * m, dtype=dtype, device=device).masked_fill_(
            ~allowed[:, None], torch.finfo(dtype).min)
        position_ids = (anc[..., None] + 1 + torch.arange(m, device=device)).reshape(b, a * m)
        out = model(inputs_embeds=prompts, attention_mask=mask, position_ids=position_ids, past_key_values=cache,
                    use_cache=True, return_dict=True)
        return out.logits.view(b, a, m, -1)

    @classmethod
    def card_sections(cls) -> str:
        """Model-card sections: the deviation list and the measured property figures (if committed)."""
        import json
        from pathlib import Path

        text = "## Fidelity to the paper\n\n" + fidelity_markdown() + "\n"
        path = Path(__file__).resolve().parents[3] / "results" / "ppd_eval.json"
        if path.exists():
            summary = json.loads(path.read_text()).get("summary", {})
            if summary:
                text += "\n## Measured (results/ppd_eval.json)\n\n"
                text += "\n".join(f"- {k}: {v}" for k, v in summary.items() if not isinstance(v, dict))
                text += "\n"
        return text

    # ------------------------------------------------------------------------------------------------ data
    def _anchors(self, batch_valid: torch.Tensor, response: torch.Tensor, generator=None) -> torch.Tensor:
        """``(B, A)`` anchor positions: response positions ``t`` whose ``m`` target positions ``t + 1 .. t + m`` exist
        (random without replacement with ``generator``, evenly spaced otherwise); ``-1`` where none is left."""
        m, a = self.config.num_prompt_tokens, self.config.anchors_per_sequence
        b, t = batch_valid.shape
        out = torch.full((b, a), -1, dtype=torch.long)
        for i in range(b):
            n = int(batch_valid[i].sum())
            cand = torch.nonzero(response[i, : max(0, n - m - 1)]).flatten()
            cand = cand[cand >= 1] if cand.numel() > 1 else cand
            if cand.numel() == 0:
                continue
            if generator is not None:
                pick = cand[torch.randperm(cand.numel(), generator=generator)[:a]].sort().values
            else:
                pick = cand[torch.linspace(0, cand.numel() - 1, min(a, cand.numel())).round().long().unique()]
            out[i, : pick.numel()] = pick
        return out

    def _batch(self, seqs, generator=None) -> dict:
        from hf_decoding_ext.training.data import collate_sequences

        batch = collate_sequences(seqs, self.config.sequence_length, self.config.hidden_size)
        batch["anchors"] = self._anchors(batch["valid"], batch["response"], generator)
        return {k: v.to(self.device) for k, v in batch.items()}

    def train_batches(self, seqs, batch_size: int, seed: int = 0):
        """Endless batches of ``batch_size`` whole sequences (``collate_sequences``) with random anchors."""
        g = torch.Generator().manual_seed(seed)
        n = len(seqs)
        while True:
            perm = torch.randperm(n, generator=g).tolist()
            for i in range(0, max(1, n - batch_size + 1), batch_size):
                yield self._batch([seqs[j] for j in perm[i:i + batch_size]], g)

    def eval_batches(self, seqs, batch_size: int):
        """Held-out batches with evenly spaced anchors (deterministic) over the first ``config.eval_sequences``
        held-out sequences (each costs a full target forward); ``batch_size`` is capped at 4 sequences."""
        step = max(1, min(int(batch_size), 4))
        seqs = list(seqs)[: self.config.eval_sequences]
        for i in range(0, len(seqs), step):
            yield self._batch(list(seqs[i:i + step]))

    def batch_positions(self, batch: dict) -> int:
        """Anchors in the batch (each supervises ``num_prompt_tokens`` future tokens, as a Medusa position its heads)."""
        return int((batch["anchors"] >= 0).sum())

    def _targets(self, batch: dict, what: str) -> torch.Tensor:
        """``(B, A, m, ...)`` gathered at anchor + 1 + i (i = 0..m-1) from ``batch[what]`` ``(B, T, ...)``."""
        m = self.config.num_prompt_tokens
        anc = batch["anchors"].clamp(min=0)
        idx = (anc[..., None] + 1 + torch.arange(m, device=anc.device)).clamp(max=batch[what].shape[1] - 1)
        src = batch[what]
        flat = idx.reshape(idx.shape[0], -1)
        if src.dim() == 3:
            got = torch.gather(src, 1, flat[..., None].expand(-1, -1, src.shape[-1]))
            return got.view(*idx.shape, src.shape[-1])
        return torch.gather(src, 1, flat).view(idx.shape)

    # ------------------------------------------------------------------------------------------------ training
    def training_loss(self, batch: dict, t2d: torch.Tensor) -> tuple[torch.Tensor, dict]:
        """Self-distillation: ``KL(p_base || p_prompt)`` over the full vocabulary at every prompt token, where
        ``p_base`` at prompt token ``i`` after anchor ``t`` is the base model's distribution of token ``t + i + 1``
        (its lm_head at the cached feature of position ``t + i``)."""
        logits = self(batch["input_ids"], batch["anchors"], batch["valid"]).float()  # (B, A, m, V)
        feats = self._targets(batch, "hidden")
        with torch.no_grad():
            teacher = F.linear(feats.to(self._require_base()["lm_head"].weight.dtype),
                               self._require_base()["lm_head"].weight).float().log_softmax(-1)
        has = batch["anchors"] >= 0
        student = logits.log_softmax(-1)
        kl = (teacher.exp() * (teacher - student)).sum(-1)  # (B, A, m)
        w = has[..., None].expand_as(kl).float()
        per_depth = (kl * w).sum((0, 1)) / w.sum((0, 1)).clamp(min=1)
        loss = per_depth.mean()
        top1 = (logits.argmax(-1) == teacher.argmax(-1)).float()
        metrics = {f"kl_{i + 1}": float(per_depth[i].detach()) for i in range(per_depth.shape[0])}
        metrics.update({f"top1_{i + 1}": float(((top1[..., i] * w[..., i]).sum() / w[..., i].sum().clamp(min=1)))
                        for i in range(per_depth.shape[0])})
        return loss, metrics

    @torch.no_grad()
    def ranked_candidates(self, batch: dict, topk: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The target's best ``topk`` tokens at each prompt token ``(m, N, topk)`` and the base model's greedy tokens
        there ``(m, N)`` (``-100`` where absent), for ``N`` anchors."""
        logits = self(batch["input_ids"], batch["anchors"], batch["valid"])
        m = self.config.num_prompt_tokens
        cands = logits.topk(topk, dim=-1).indices.reshape(-1, m, topk).transpose(0, 1)
        labels = self._targets(batch, "labels")
        labels = labels.masked_fill(~(batch["anchors"] >= 0)[..., None], -100)
        return cands, labels.reshape(-1, m).T


PromptTokens.__doc__ = PromptTokens.__doc__.replace("{fidelity}", fidelity_markdown().replace("\n", "\n    "))
