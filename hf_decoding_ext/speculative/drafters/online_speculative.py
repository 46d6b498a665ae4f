"""Online Speculative Decoding (Liu, Hu, Bae, Su, Ren, Zhu, Wang; "Online Speculative Decoding", ICML 2024,
arXiv 2310.07177; official code LiuXiaoxuanPKU/OSD, ``distill/distill_trainer.py::online_training_step``)."""

from __future__ import annotations

import torch

from hf_decoding_ext.speculative.drafters.draft_model import DraftModelDrafter

LOSSES = ("fkl", "rkl", "jsd", "tvd")
"""Distillation objectives: forward KL (the official online default, ``soft_cross_entropy``), reverse KL, the
official JSD mix (0.9 forward + 0.1 reverse KL) and TVD (speculative sampling's rejection probability)."""

POSITIONS = ("rejected", "all")

PAPER_FIDELITY = (
    ("online loop", "faithful: serve with speculative decoding, record the served queries in a buffer, distil the "
                    "draft on the buffer every `update_interval` queries (official `online_update_interval`, 1 in "
                    "`bash_scripts/*/online.sh`), then empty the buffer"),
    ("supervised positions", "faithful: the positions where the draft's proposal was rejected (official "
                             "`wrong_token_ids`), with the target's distribution there; `positions='all'` also "
                             "adds the accepted ones"),
    ("teacher distribution", "deviation (the official TODO): the target's logits come from the engine's "
                             "verification forward at serving time (no second teacher forward at update time); "
                             "stored as float16 log-probabilities"),
    ("losses", "faithful: forward KL (default), reverse KL, JSD (0.9 forward); TVD added (from "
               "`direct_alignment`); all computed with this library's `direct_alignment` losses"),
    ("draft model", "deviation: the 4-layer Direct-Alignment draft of the default model (shared embeddings and "
                    "lm_head, frozen; its layers and final norm trained) instead of LLaMA-160M / T5-small"),
    ("optimiser", "deviation: AdamW with a constant lr of 1e-4 (official: 1e-5 constant, per query, on a GPU "
                  "stream of thousands of queries); the larger rate lets a stream of tens of queries show the "
                  "effect on CPU; `steps` optimiser steps per update (1 = official)"),
    ("when updates happen", "deviation: between generate() calls (at the next call's begin), never inside a "
                            "generation, so every output is exactly the target's greedy / sampled output"),
    ("query clustering", "not implemented: the paper's optional one-draft-per-query-cluster routing"),
)


def fidelity_markdown() -> str:
    return "\n".join(f"- **{k}**: {v}" for k, v in PAPER_FIDELITY)


class OnlineDistillationBuffer:
    """Served queries waiting for the next online update: per query, the final token sequence (prompt and
    generated tokens) and the positions whose next-token distribution the target revealed during verification,
    with those distributions (log-probabilities, ``(n, vocab)`` float16).

    Args:
        capacity: most queries kept (the oldest are dropped first).
    """

    def __init__(self, capacity: int = 8):
        if isinstance(capacity, bool) or not isinstance(capacity, int) or capacity < 1:
            raise ValueError(f"capacity must be a positive integer, got {capacity!r}")
        self.capacity = capacity
        self.queries: list[dict] = []
        self._current: dict | None = None

    def start_query(self) -> None:
        self.finish_query()
        self._current = {"ids": None, "positions": [], "logprobs": []}

    def record(self, prefix: torch.Tensor, tokens: list[int], positions: list[int], logits: torch.Tensor) -> None:
        """After a verification: ``prefix`` (the committed ids before it), the appended ``tokens``, and the target
        ``logits`` ``(n, vocab)`` at absolute ``positions`` (row ``i`` predicts the token after position
        ``positions[i]``)."""
        if self._current is None:
            self.start_query()
        self._current["ids"] = torch.cat([prefix.reshape(-1).cpu(), torch.tensor(tokens, dtype=torch.long)])
        if positions:
            self._current["positions"].extend(int(p) for p in positions)
            self._current["logprobs"].append(torch.log_softmax(logits.float(), -1).to(torch.float16).cpu())

    def finish_query(self) -> None:
        cur, self._current = self._current, None
        if cur is None or cur["ids"] is None or not cur["positions"]:
            return
        positions = torch.tensor(cur["positions"], dtype=torch.long)  # all inside ids: a forward over ids scores them
        self.queries.append({"ids": cur["ids"], "positions": positions,
                             "logprobs": torch.cat(cur["logprobs"]).clone()})
        del self.queries[: -self.capacity]

    def __len__(self) -> int:
        return len(self.queries)

    @property
    def num_positions(self) -> int:
        return sum(int(q["positions"].numel()) for q in self.queries)

    def clear(self) -> None:
        self.queries = []


def distillation_loss(kind: str, draft_logits: torch.Tensor, target_logprobs: torch.Tensor) -> torch.Tensor:
    """The online objective between draft logits and target log-probabilities ``(n, vocab)``, built on
    :mod:`~hf_decoding_ext.speculative.drafters.direct_alignment`'s losses (``rkl`` swaps the arguments of its
    forward KL; ``jsd`` is the official 0.9/0.1 mix of forward and reverse KL)."""
    from hf_decoding_ext.speculative.drafters.direct_alignment import forward_kl_loss, tvd_loss

    if kind == "fkl":
        return forward_kl_loss(draft_logits, target_logprobs)
    if kind == "rkl":
        return forward_kl_loss(target_logprobs, draft_logits)
    if kind == "jsd":
        return 0.9 * forward_kl_loss(draft_logits, target_logprobs) + 0.1 * forward_kl_loss(target_logprobs,
                                                                                            draft_logits)
    if kind == "tvd":
        return tvd_loss(draft_logits, target_logprobs)
    raise ValueError(f"loss must be one of {LOSSES}, got {kind!r}")


class OnlineSpeculativeDrafter(DraftModelDrafter):
    """Online Speculative Decoding ("Online Speculative Decoding", Liu et al., ICML 2024, arXiv 2310.07177): the
    chain draft-model drafter whose draft is distilled online on the queries it serves.

    While serving, every verification reveals the target's distribution at the draft's positions (the engine's
    verification logits): the drafter records, per query, the positions where its proposal was rejected (the
    official ``wrong_token_ids``) with the target's distribution there. Every ``update_interval`` queries the draft's
    own layers (:func:`~hf_decoding_ext.speculative.drafters.direct_alignment.trainable_parameters`; embeddings and
    lm_head stay shared and frozen) take ``steps`` AdamW steps of knowledge distillation on the buffered positions,
    and the buffer is emptied. Updates run between ``generate()`` calls (at the start of the next call), so the
    target's verification decides every token: outputs are exactly greedy (or the target's sampling distribution).
    The drafter keeps its draft across calls; :meth:`reset` restores the initial draft and empties the buffer.

    Args:
        assistant_model: the draft LM (``None``: :meth:`for_model` loads the shipped distilled draft; a given model
            is deep-copied, so the caller's draft is never trained).
        update_interval: queries (``generate()`` calls) between updates (official default 1).
        buffer_size: most queries kept in the buffer.
        loss: ``"fkl"`` (official default), ``"rkl"``, ``"jsd"`` or ``"tvd"``.
        lr: AdamW learning rate (constant).
        steps: optimiser steps per update.
        positions: ``"rejected"`` (official) or ``"all"`` verified draft positions.
        num_tokens, confidence_threshold, schedule: as in
            :class:`~hf_decoding_ext.speculative.drafters.draft_model.DraftModelDrafter`.

    Paper fidelity (every deviation from the paper and the official code):

    {fidelity}

    Example:
        >>> from hf_decoding_ext.speculative import SpeculativeDecoding
        >>> from hf_decoding_ext.speculative.drafters.online_speculative import OnlineSpeculativeDrafter
        >>> drafter = OnlineSpeculativeDrafter.for_model(model)  # doctest: +SKIP
        >>> loop = SpeculativeDecoding(drafter)  # doctest: +SKIP
        >>> for prompt in stream:  # doctest: +SKIP
        ...     out = model.generate(**tok(prompt, return_tensors="pt"), max_new_tokens=64, custom_generate=loop)
        >>> drafter.num_updates  # doctest: +SKIP
    """

    def __init__(self, assistant_model=None, update_interval: int = 1, buffer_size: int = 8, loss: str = "fkl",
                 lr: float = 1e-4, steps: int = 1, positions: str = "rejected", num_tokens: int | None = None,
                 confidence_threshold: float | None = None, schedule: str | None = None):
        for name, value in (("update_interval", update_interval), ("buffer_size", buffer_size), ("steps", steps)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        if loss not in LOSSES:
            raise ValueError(f"loss must be one of {LOSSES}, got {loss!r}")
        if positions not in POSITIONS:
            raise ValueError(f"positions must be one of {POSITIONS}, got {positions!r}")
        if not isinstance(lr, (int, float)) or isinstance(lr, bool) or not lr > 0:
            raise ValueError(f"lr must be a positive number, got {lr!r}")
        if assistant_model is None:
            raise ValueError("OnlineSpeculativeDrafter needs its own draft model to train: "
                             "OnlineSpeculativeDrafter(draft) or OnlineSpeculativeDrafter.for_model(model)")
        from hf_decoding_ext.speculative.drafters.direct_alignment import trainable_parameters

        draft = _own_copy(assistant_model)
        super().__init__(draft, num_tokens=num_tokens, confidence_threshold=confidence_threshold, schedule=schedule)
        self.update_interval, self.buffer_size, self.loss = update_interval, buffer_size, loss
        self.lr, self.steps, self.positions = float(lr), steps, positions
        self.params = trainable_parameters(draft)
        if not self.params:
            raise ValueError("the draft model has no parameters of its own to train (all shared with the target)")
        self._initial = [p.detach().clone() for p in self.params]
        self.buffer = OnlineDistillationBuffer(buffer_size)
        self._new_optimizer()
        self.queries = 0
        self.num_updates = 0
        self.history: list[dict] = []

    @classmethod
    def for_model(cls, model=None, tokenizer=None, assistant: str = "distilled", update_interval: int = 1,
                  buffer_size: int = 8, loss: str = "fkl", lr: float = 1e-4, steps: int = 1,
                  positions: str = "rejected", num_tokens: int | None = None,
                  confidence_threshold: float | None = None, schedule: str | None = None,
                  max_nodes: int | None = None):
        """Registry/CLI factory: the draft named by ``assistant`` (see
        :meth:`~hf_decoding_ext.speculative.drafters.draft_model.DraftModelDrafter.load_assistant`); ``max_nodes``
        (the node budget per verification of the tree drafters) caps the chain's length (``num_tokens``)."""
        if max_nodes is not None:
            if isinstance(max_nodes, bool) or not isinstance(max_nodes, int) or max_nodes < 1:
                raise ValueError(f"max_nodes must be a positive integer, got {max_nodes!r}")
            num_tokens = min(num_tokens or max_nodes, max_nodes)
        return cls(cls.load_assistant(model, assistant), update_interval=update_interval, buffer_size=buffer_size,
                   loss=loss, lr=lr, steps=steps, positions=positions, num_tokens=num_tokens,
                   confidence_threshold=confidence_threshold, schedule=schedule)

    def _new_optimizer(self) -> None:
        self.optimizer = torch.optim.AdamW(self.params, lr=self.lr, weight_decay=0.0)

    # ------------------------------------------------------------------------------------------------ serving
    def begin(self, state) -> None:
        self.buffer.finish_query()
        if self.queries and self.queries % self.update_interval == 0 and len(self.buffer):
            self.update()
        self.queries += 1
        self.buffer.start_query()
        super().begin(state)

    def observe(self, state, result) -> None:
        super().observe(state, result)
        tree, accepted = result.draft.tree, result.accepted
        n = len(tree)
        parents = tree.parents.tolist()
        accepted_set = set(accepted)
        # target row r (0 = root, r = node r - 1) predicts the token after the committed prefix plus the path to it;
        # a node was verified if its parent is the root or an accepted node; its depth d (0 = child of the root)
        # puts that distribution at position n_ctx - 1 + d of the final sequence
        prefix = state.input_ids[0]
        if state.attention_mask is not None:
            prefix = prefix[state.attention_mask[0].bool()]  # batch 1: drop any left padding
        n_ctx = int(prefix.numel())
        by_position: dict[int, int] = {}
        for i in range(n):
            parent = parents[i]
            if parent >= 0 and parent not in accepted_set:
                continue  # never reached by the verification
            if self.positions == "rejected" and i in accepted_set:
                continue
            depth, a = 0, parent
            while a >= 0:
                depth, a = depth + 1, parents[a]
            by_position[n_ctx - 1 + depth] = parent + 1
        positions = sorted(by_position)
        rows = [by_position[p] for p in positions]
        self.buffer.record(prefix, list(result.tokens), positions, result.tree_logits[rows])

    def reset(self) -> None:
        """Restore the initial draft, empty the buffer and restart the optimiser."""
        super().reset()
        with torch.no_grad():
            for p, p0 in zip(self.params, self._initial):
                p.copy_(p0)
        self.buffer = OnlineDistillationBuffer(self.buffer_size)
        self._new_optimizer()
        self.queries = 0
        self.num_updates = 0
        self.history = []

    # ------------------------------------------------------------------------------------------------ learning
    def update(self) -> dict:
        """Distil the draft on the buffered queries (``steps`` optimiser steps), then empty the buffer."""
        self.buffer.finish_query()
        if not len(self.buffer):
            return {}
        draft = self.assistant_model
        device = draft.device
        losses = []
        with torch.inference_mode(False), torch.enable_grad():
            for _ in range(self.steps):
                self.optimizer.zero_grad(set_to_none=True)
                total = 0.0
                n_pos = max(1, self.buffer.num_positions)
                for q in self.buffer.queries:
                    ids = q["ids"].clone().to(device)[None]
                    pos = q["positions"].clone().to(device)
                    teacher = q["logprobs"].clone().to(device=device, dtype=torch.float32)
                    logits = draft(input_ids=ids, use_cache=False, return_dict=True,
                                   logits_to_keep=pos).logits[0].float()  # only the supervised positions
                    loss = distillation_loss(self.loss, logits, teacher) * (pos.numel() / n_pos)
                    loss.backward()
                    total += float(loss.detach())
                torch.nn.utils.clip_grad_norm_(self.params, 1.0)
                self.optimizer.step()
                losses.append(total)
        for p in self.params:
            p.grad = None
        self.num_updates += 1
        record = {"update": self.num_updates, "query": self.queries, "queries": len(self.buffer),
                  "positions": self.buffer.num_positions, "loss": losses[0], "loss_last": losses[-1]}
        self.history.append(record)
        self.buffer.clear()
        return record


def _own_copy(draft):
    """A copy of ``draft`` whose own (trainable) tensors are new and whose embeddings and lm_head stay shared with
    the target (a deep copy that memoises the shared modules onto themselves)."""
    import copy

    shared = {}
    for module in (draft.get_input_embeddings(), draft.get_output_embeddings()):
        if module is not None:
            shared[id(module)] = module
            for t in list(module.parameters()) + list(module.buffers()):
                shared[id(t)] = t
    clone = copy.deepcopy(draft, memo=dict(shared))
    for p in clone.parameters():
        p.requires_grad_(False)
    from hf_decoding_ext.speculative.drafters.direct_alignment import trainable_parameters

    for p in trainable_parameters(clone):
        p.requires_grad_(True)
    return clone.eval()


OnlineSpeculativeDrafter.__doc__ = OnlineSpeculativeDrafter.__doc__.replace(
    "{fidelity}", fidelity_markdown().replace("\n", "\n    "))

__all__ = ["OnlineSpeculativeDrafter", "OnlineDistillationBuffer", "distillation_loss", "LOSSES", "PAPER_FIDELITY"]
