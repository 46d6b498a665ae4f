"""SPACE: Smart Parallel Auto-Correct Decoding (Yi et al., "Generation Meets Verification: Accelerating Large
Language Model Inference with Smart Parallel Auto-Correct Decoding", Findings of ACL 2024, arXiv 2402.11809;
official code cteant/SPACE).

Two parts:

* **SAR-SFT** (semi-autoregressive fine-tune) of the base model itself, with one new mask token
  (:data:`MASK_TOKEN`): :func:`space_batches` builds the batches (with probability ``p_sar`` (official ``mask_prob``
  0.5) a response is cut at a random point ``start`` and followed by ``k + 1`` mask tokens, ``k`` = official
  ``mask_num`` 5, whose labels are the true tokens ``response[start:start + k + 1]``; otherwise the ordinary AR
  example), :func:`space_loss` is the shifted cross-entropy on them (the real token before the group predicts
  ``response[start]`` as usual, mask ``j`` predicts ``response[start + j + 1]``). Registered as
  ``OBJECTIVES["space"]`` of :mod:`hf_decoding_ext.training.finetune` at import.
* **Auto-correct decoding** (:class:`SPACEDecoding`): one forward per step verifies the previous step's ``k``
  candidates (greedy argmax match, lossless) and, from the ``k`` mask tokens fed after the last accepted token,
  reads the next ``k`` candidates; 1..k+1 tokens per forward.
"""

from __future__ import annotations

import random
from pathlib import Path

import torch

from hf_decoding_ext.core import lifecycle
from hf_decoding_ext.core.loop import DecodingLoop, GenerationState
from hf_decoding_ext.core.tree import VerifyBlock, build_verify_inputs

MASK_TOKEN = "<|space_mask|>"
"""The token SPACE adds (official: a new id, ``--mask_id 32002`` for LLaMA)."""
SHIPPED_DIR = Path(__file__).resolve().parents[1] / "data" / "finetuned" / "space"
"""The shipped SAR fine-tune of the default model (LoRA adapter with the mask token's rows; model card inside)."""
DEFAULT_K = 5  # official run_sft_multi_node.sh --mask_num 5
DEFAULT_P_SAR = 0.5  # official --mask_prob 0.5: SAR example with this probability, else the plain AR example

CITATION = ("Hanling Yi, Feng Lin, Hongbin Li, Peiyang Ning, Xiaotian Yu, Rong Xiao. Generation Meets Verification: "
            "Accelerating Large Language Model Inference with Smart Parallel Auto-Correct Decoding. Findings of ACL "
            "2024. arXiv:2402.11809. Code: https://github.com/cteant/SPACE")

PAPER_FIDELITY = (
    ("Verification layout", ("the official input is [prefix, k masks, (c_1, k masks), ..., (c_k, k masks)] with each "
     "mask group hidden from later tokens; here the k candidates come first as a chain and the k+1 mask groups "
     "(after the last committed token and after each candidate) follow, each seeing the prefix, the candidates up to "
     "its anchor and itself (causal). Same attention pattern and positions, so the same logits; accepted candidates "
     "are contiguous, so the cache rollback is a crop instead of the official gather.")),
    ("First step", ("the official code starts with k mask tokens as dummy candidates (which the greedy check could "
     "accept if the model's argmax were the mask id); here the first step has no candidates.")),
    ("Sampling", ("greedy only: the official sampling path accepts with u <= p(c)/q(c) and then samples afresh from p "
     "(no residual), which is not exact; do_sample=True is refused rather than offering that rule.")),
    ("Logits processors", ("the caller's (stateless) processors are applied at every verification position, so the "
     "output equals generate() with the same processors; stateful processors are refused.")),
    ("SAR data", ("official non-efficient path (mask_efficient_train False, mask_random False, mask_diff False): one "
     "mask group per SAR example, the example cut after it; the AR example otherwise. The efficient variant "
     "(mask group appended after the full sequence with a custom training mask) is not implemented.")),
    ("Batch", ("batch size 1 (as the official evaluation).")),
    ("Shipped fine-tune", ("the paper fully fine-tunes (SAR-SFT) on far more data; the shipped fine-tune of the "
     "default model is a LoRA (rank 16, every projection, plus the mask token's row) of 120 steps x 8 sequences on "
     "the greedy responses to 600 distillation prompts, SAR examples right-truncated at 384 tokens (the mask group is "
     "lost on the longest prompts): a small budget that gives weak mask predictions (results/space_eval.json).")),
)


# ------------------------------------------------------------------------------------------------------ SAR data
def sar_example(input_ids, response_start: int, mask_id: int, k: int = DEFAULT_K, p_sar: float = DEFAULT_P_SAR,
                rng: random.Random | None = None, train_on_prompt: bool = False):
    """One training example ``(input_ids, labels, start)`` (lists; ``start`` = index of the first mask in the
    sequence, -1 for an AR example).

    With probability ``p_sar`` and a response of at least ``k + 1`` tokens: ``start`` is uniform in the response
    (``response[start:start + k + 1]`` inside it), the input is ``prompt + response[:start] + [mask] * (k + 1)`` and
    the labels ``prompt(-100) + response[:start + k + 1]`` (official preprocess.py). Otherwise the AR example."""
    rng = rng or random
    ids = [int(t) for t in (input_ids.tolist() if torch.is_tensor(input_ids) else input_ids)]
    rs = int(response_start)
    prompt, resp = ids[:rs], ids[rs:]
    prompt_labels = list(prompt) if train_on_prompt else [-100] * len(prompt)
    if rng.random() < p_sar and k > 0 and len(resp) >= k + 1:
        s = rng.randint(0, len(resp) - k - 1)
        return (prompt + resp[:s] + [mask_id] * (k + 1), prompt_labels + resp[:s + k + 1], rs + s)
    return prompt + resp, prompt_labels + resp, -1


def collate_sar(examples, pad_id: int, mask_id: int, max_length: int = 512) -> dict:
    """Right-padded batch of :func:`sar_example` results: ``input_ids``, ``attention_mask``, ``labels`` (-100 on
    padding), ``mask_start`` (``(batch,)``, -1 for AR rows) and ``mask_token_id``."""
    n = min(max_length, max(len(e[0]) for e in examples))
    b = len(examples)
    input_ids = torch.full((b, n), pad_id, dtype=torch.long)
    attn = torch.zeros((b, n), dtype=torch.long)
    labels = torch.full((b, n), -100, dtype=torch.long)
    for r, (ids, lab, _) in enumerate(examples):
        ids, lab = ids[:n], lab[:n]
        input_ids[r, :len(ids)] = torch.tensor(ids)
        attn[r, :len(ids)] = 1
        labels[r, :len(lab)] = torch.tensor(lab)
    return {"input_ids": input_ids, "attention_mask": attn, "labels": labels,
            "mask_start": torch.tensor([e[2] for e in examples]), "mask_token_id": torch.tensor(int(mask_id))}


def space_batches(data, config, tokenizer, *, k: int = DEFAULT_K, p_sar: float = DEFAULT_P_SAR,
                  mask_token: str = MASK_TOKEN):
    """Batch builder of ``OBJECTIVES["space"]``: returns ``seed -> endless iterator`` of SAR/AR batches over
    ``data`` (a ``DistillData`` (its train split) or sequences with ``input_ids``/``response_start``).

    ``mask_token`` is appended to ``config.extra_tokens`` when missing, so :func:`finetune` adds it to the tokenizer
    and the model before the stream starts; its id is read from the tokenizer when the stream starts."""
    from hf_decoding_ext.training.finetune import _get, added_token_stream, training_sequences

    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
        raise ValueError(f"k must be an int >= 1, got {k!r}")
    if not 0.0 <= float(p_sar) <= 1.0:
        raise ValueError(f"p_sar must be in [0, 1], got {p_sar!r}")
    seqs = training_sequences(data)

    def make_batch(indices, mask_id, pad, rng):
        return collate_sar([sar_example(_get(seqs[j], "input_ids"), _get(seqs[j], "response_start"), mask_id, k,
                                        p_sar, rng, config.train_on_prompt) for j in indices],
                           pad, mask_id, config.max_length)

    return added_token_stream(seqs, config, tokenizer, mask_token, make_batch)


def space_loss(model, batch):
    """SAR-SFT objective: mean shifted cross-entropy over the labels (AR rows: every response token; SAR rows: the
    response before the group, then the group's tokens, each mask predicting the token after its position).
    Metrics: ``tokens``, ``mask_tokens`` (positions predicted from a mask input) and ``mask_acc`` (their argmax
    accuracy)."""
    from hf_decoding_ext.training.finetune import next_token_loss

    return next_token_loss(model, batch, marker="mask")


def _register() -> None:
    from hf_decoding_ext.training import finetune as ft

    ft.OBJECTIVES.setdefault("space", (space_loss, space_batches))


_register()


# ------------------------------------------------------------------------------------------------------ decoding
def resolve_mask_token_id(model, tokenizer=None, mask_token: str = MASK_TOKEN, explicit: int | None = None) -> int:
    """The mask id of a SPACE model: ``explicit``, else ``model.config.decoding_ext_added_tokens[mask_token]`` (set by
    ``add_special_tokens``), else ``model.config.space_mask_token_id``, else the tokenizer's id for it.
    ``ValueError`` when none is found or it is outside the model's vocabulary."""
    from hf_decoding_ext.training.finetune import added_token_id

    return added_token_id(model, tokenizer, mask_token, explicit=explicit, config_attr="space_mask_token_id",
                          what="SPACE mask token",
                          hint=": fine-tune it with the 'space' objective (add_special_tokens) or pass mask_token_id=")


def load_space_model(path=None, device=None, base: str | None = None, dtype=torch.float32):
    """``(model, tokenizer)`` of a SPACE (SAR) fine-tune: ``path`` = a LoRA adapter folder (loaded into ``base``,
    default the embedded default model, after adding :data:`MASK_TOKEN`, then merged) or a full checkpoint folder;
    ``None``: the shipped fine-tune of the default model (:data:`SHIPPED_DIR`). The registry's ``served_model``.

    Example:
        >>> from hf_decoding_ext.speculative.space import SPACEDecoding, load_space_model
        >>> model, tokenizer = load_space_model()  # doctest: +SKIP
        >>> model.generate(**tokenizer("Hi", return_tensors="pt"), custom_generate=SPACEDecoding())  # doctest: +SKIP
    """
    from hf_decoding_ext.training.finetune import load_finetuned

    return load_finetuned(path if path is not None else SHIPPED_DIR, [MASK_TOKEN], base, dtype, device,
                          what="SPACE fine-tune", hint=": train one with `hf-decoding-ext finetune --objective space`")


class SPACEDecoding(DecodingLoop):
    """SPACE auto-correct decoding (Yi et al., arXiv 2402.11809), a ``custom_generate`` loop for a model fine-tuned
    with the SAR objective (:func:`space_loss`; it has a mask token).

    Each step feeds, after the committed tokens not yet cached, the ``k`` candidates of the previous step (a chain)
    and ``k + 1`` groups of ``k`` mask tokens, one after the last committed token and one after each candidate; a
    4D mask lets each group see the prefix, the candidates up to its anchor and itself. Candidate ``i`` is accepted
    while it equals the greedy token at its position (the caller's processors applied), so the output is
    token-identical to the model's own greedy ``generate()``; the greedy token after the last accepted one is
    appended too (1..k+1 tokens per forward), and the next candidates are the argmax of the mask group anchored at
    the last accepted token. Only the committed tokens stay in the KV cache.

    Args:
        mask_token_id: the mask id (default: :func:`resolve_mask_token_id`; ``ValueError`` when absent).
        k: candidates / mask tokens per group (official ``mask_num`` 5).
        tokenizer: only to look up the mask token.

    Greedy only (``do_sample=True`` is refused: the official sampling rule is not exact), batch size 1. Per-run
    statistics (``forwards``, ``tokens``, ``tokens_per_forward``, ``accepted_per_step``) are in ``self.last_stats``
    (and in the output's ``space_stats`` with ``return_dict_in_generate``). Deviations: :data:`PAPER_FIDELITY`.

    Example:
        >>> from hf_decoding_ext.speculative.space import SPACEDecoding
        >>> loop = SPACEDecoding(k=5)
        >>> out = model.generate(**inputs, max_new_tokens=64, do_sample=False, custom_generate=loop)  # doctest: +SKIP
        >>> loop.last_stats["tokens_per_forward"]  # doctest: +SKIP
    """

    supports_batch = False
    supports_sampling = False
    supports_sliding_window = False
    citation = CITATION

    def __init__(self, mask_token_id: int | None = None, k: int = DEFAULT_K, tokenizer=None):
        if isinstance(k, bool) or not isinstance(k, int) or k < 1:
            raise ValueError(f"k must be an int >= 1, got {k!r}")
        if mask_token_id is not None and (isinstance(mask_token_id, bool) or not isinstance(mask_token_id, int)
                                          or mask_token_id < 0):
            raise ValueError(f"mask_token_id must be a non-negative int, got {mask_token_id!r}")
        self.mask_token_id, self.k, self.tokenizer = mask_token_id, k, tokenizer
        self.last_stats: dict = {}

    def __call__(self, model, input_ids, logits_processor, stopping_criteria, generation_config, *args, **kwargs):
        if generation_config.do_sample:
            raise ValueError("SPACEDecoding is greedy only (lossless w.r.t. the model's greedy generate()); exact "
                             "speculative sampling is not implemented and the official sampling rule is not exact: "
                             "call generate() with do_sample=False")
        if input_ids.shape[0] > 1:
            raise ValueError(f"SPACEDecoding supports batch size 1 only; got a batch of {input_ids.shape[0]}. "
                             "Call generate() once per prompt.")
        return super().__call__(model, input_ids, logits_processor, stopping_criteria, generation_config, *args,
                                **kwargs)

    def _mask_id(self, model) -> int:
        return resolve_mask_token_id(model, self.tokenizer, explicit=self.mask_token_id)

    def _block(self, cands: torch.Tensor, mask_id: int) -> VerifyBlock:
        k, a = self.k, cands.shape[0]
        n = a + (a + 1) * k
        tokens = torch.cat([cands.long(), torch.full((n - a,), mask_id, dtype=torch.long)])
        allowed = torch.zeros(n, n, dtype=torch.bool)
        depth = torch.zeros(n, dtype=torch.long)
        allowed[:a, :a] = torch.tril(torch.ones(a, a, dtype=torch.bool))
        depth[:a] = torch.arange(1, a + 1)
        tri = torch.tril(torch.ones(k, k, dtype=torch.bool))
        for g in range(a + 1):  # group anchored at depth g (0: last committed token, g: candidate g - 1)
            off = a + g * k
            allowed[off:off + k, :g] = True
            allowed[off:off + k, off:off + k] = tri
            depth[off:off + k] = g + 1 + torch.arange(k)
        return VerifyBlock(tokens, allowed, depth)

    def run(self, state: GenerationState):
        if lifecycle.has_stateful(state.logits_processor):
            raise ValueError("SPACEDecoding does not support stateful logits processors")
        model, k = state.model, self.k
        mask_id = self._mask_id(model)
        cands = torch.zeros(0, dtype=torch.long)
        steps: list[int] = []
        state.stats.update(tokens=0)
        while not state.done:
            cache_len = state.cache.get_seq_length()
            committed = state.input_ids[:, cache_len:]
            s, a_max = committed.shape[1], cands.shape[0]
            block = self._block(cands, mask_id)
            ids, mask, pos = build_verify_inputs(committed, state.attention_mask, cache_len, block,
                                                 dtype=model.dtype)
            out = model(input_ids=ids, attention_mask=mask, position_ids=pos, cache=state.cache,
                        use_cache=True, return_dict=True)
            state.stats["forwards"] += 1
            logits = out.logits[0].float()
            accepted: list[int] = []
            recorded = []
            for i in range(a_max + 1):
                row = s - 1 + i  # last committed token, then candidate i - 1
                prefix = torch.cat([state.input_ids, torch.tensor([accepted], dtype=torch.long,
                                                                  device=state.device)], dim=1)
                raw = logits[row][None]
                scores = state.process(raw.clone(), prefix)
                tok = int(scores.argmax(-1))
                accepted.append(tok)
                recorded.append((scores, raw))
                if i == a_max or tok != int(cands[i]):
                    break
            a = len(accepted) - 1  # candidates accepted
            off = s + a_max + a * k
            cands = logits[off:off + k].argmax(-1).cpu()
            extra = state.cache.get_seq_length() - (cache_len + s + a)
            if extra > 0:  # keep the prefix + accepted candidates; the bonus token is fed next step
                state.cache.crop(-extra)
            n = state.append(torch.tensor([accepted], dtype=torch.long, device=state.device))
            for sc, lg in recorded[:n]:
                state.record(sc, lg)
            state.truncate_cache()
            steps.append(a)
            state.stats["tokens"] += n
        state.stats["accepted_per_step"] = steps
        state.stats["tokens_per_forward"] = state.stats["tokens"] / max(1, state.stats["forwards"])
        state.stats["k"] = k
        self.last_stats = dict(state.stats)
        return {"space_stats": self.last_stats} if state.return_dict else None
