"""Blockwise Parallel Decoding (Stern et al. 2018, arXiv 1811.03115): proposal heads, drafter, relaxed criteria."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from hf_decoding_ext.speculative.heads.blockwise import BlockwiseConfig, BlockwiseHeads
from hf_decoding_ext.training.trainer import TrainConfig, evaluate_head, train_head

ROOT = Path(__file__).resolve().parents[1]


def tiny_blockwise(model, block_size: int = 4, seed: int = 0, scale: float = 0.5) -> BlockwiseHeads:
    """Random (not zero) blockwise heads for a tiny model, attached."""
    torch.manual_seed(seed)
    cfg = BlockwiseConfig(hidden_size=model.config.hidden_size, vocab_size=model.get_output_embeddings().weight.shape[0],
                          block_size=block_size)
    heads = BlockwiseHeads(cfg)
    with torch.no_grad():
        heads.ffn_out.weight.normal_(std=scale)
    return heads.attach(model)


def test_config_validates_and_round_trips(tmp_path, tiny_llama):
    with pytest.raises(ValueError, match="block_size"):
        BlockwiseConfig(block_size=1)
    with pytest.raises(ValueError, match="'tanh'"):
        BlockwiseConfig(activation="tanh")
    with pytest.raises(ValueError, match="hidden_per_head"):
        BlockwiseConfig(hidden_per_head=0)
    heads = tiny_blockwise(tiny_llama, block_size=3)
    heads.save_pretrained(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["config.json", "model.safetensors"]
    back = BlockwiseHeads.from_pretrained(tmp_path)
    drop = {"_name_or_path"}
    assert ({k: v for k, v in back.config.to_dict().items() if k not in drop}
            == {k: v for k, v in heads.config.to_dict().items() if k not in drop})
    assert back.depth == 2 and back.config.num_heads == 2
    for (n, p), (_, q) in zip(heads.state_dict().items(), back.state_dict().items()):
        assert torch.equal(p, q), n


def test_one_ffn_split_per_head_with_residual_and_no_base_weights(tiny_llama):
    heads = tiny_blockwise(tiny_llama, block_size=4)
    h, v = tiny_llama.config.hidden_size, tiny_llama.config.vocab_size
    # own parameters = one FFN layer; the base lm_head and embeddings are not part of the head
    assert heads.num_own_parameters() == (h * 3 * h + 3 * h) + (3 * h * 3 * h + 3 * h)
    assert not any(k.startswith(("lm_head", "embed")) for k in heads.state_dict())
    x = torch.randn(5, h)
    feats = heads.features(x)
    chunk = heads.ffn_out(torch.relu(heads.ffn_in(x))).view(5, 3, h)
    torch.testing.assert_close(feats[1], chunk[:, 1] + x)
    assert heads(x).shape == (3, 5, v)


def test_untrained_heads_repeat_the_base_prediction(tiny_llama):
    cfg = BlockwiseConfig(hidden_size=tiny_llama.config.hidden_size, vocab_size=tiny_llama.config.vocab_size)
    heads = BlockwiseHeads(cfg).attach(tiny_llama)
    x = torch.randn(4, cfg.hidden_size)
    base = tiny_llama.get_output_embeddings()(x)
    for j in range(heads.depth):
        torch.testing.assert_close(heads(x)[j], base)


def test_smoke_training_raises_heldout_accuracy(tiny_distill_data, tmp_path):
    model, data = tiny_distill_data
    cfg = BlockwiseConfig(hidden_size=model.config.hidden_size, vocab_size=model.config.vocab_size, block_size=3)
    torch.manual_seed(0)
    heads = BlockwiseHeads(cfg).attach(model)
    before = evaluate_head(heads, data.heldout, topk=1)["top1"]
    heads = train_head(heads, data, tmp_path, TrainConfig(steps=80, batch_size=64, lr=1e-2, log_every=10,
                                                          checkpoint_every=1000), progress=False)
    after = heads.config.training["heldout_top1"]
    log = [json.loads(line) for line in (tmp_path / "train_log.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in log if "loss" in r]
    assert losses[-1] < losses[0]
    print(before, after)
    assert after[0] > before[0] + 0.05, (before, after)


# ---------------------------------------------------------------------------------------------- drafter
from hf_decoding_ext.speculative import SpeculativeDecoding  # noqa: E402
from hf_decoding_ext.speculative.acceptance import get_acceptance_rule  # noqa: E402
from hf_decoding_ext.speculative.acceptance.blockwise import (  # noqa: E402
    BlockwiseDistanceAcceptance,
    BlockwiseTopKAcceptance,
)
from hf_decoding_ext.speculative.drafters.blockwise import BlockwiseDrafter  # noqa: E402

PROMPTS = [[1, 5, 9, 2], [7, 7, 7, 7, 7, 7], [3, 14, 15, 92, 65, 35]]


class _CountForwards:
    def __init__(self, model):
        self.model, self.n = model, 0
        self.handle = model.register_forward_pre_hook(self._hook)

    def _hook(self, *args):
        self.n += 1

    def close(self):
        self.handle.remove()


def test_exact_criterion_is_token_identical_with_one_target_forward_per_block(tiny_model):
    heads = tiny_blockwise(tiny_model, block_size=4)
    drafter = BlockwiseDrafter(heads)
    assert drafter.choices == [(0,), (0, 0), (0, 0, 0)]  # a chain: the block of k = 4 tokens (root + 3 proposals)
    for ids in PROMPTS:
        x = torch.tensor([ids])
        ref = tiny_model.generate(x, max_new_tokens=24, do_sample=False)
        loop = SpeculativeDecoding(drafter)
        counter = _CountForwards(tiny_model)
        try:
            out = tiny_model.generate(x, max_new_tokens=24, do_sample=False, custom_generate=loop)
        finally:
            counter.close()
        assert torch.equal(out, ref), ids
        # combined scoring and proposal: one target call per iteration (the first one is the prompt's)
        assert counter.n == len(loop.last_stats)
        assert all(s.draft_size <= 3 for s in loop.last_stats)
        assert sum(s.appended for s in loop.last_stats) == out.shape[1] - x.shape[1]


def test_proposals_are_the_heads_argmax_chain(tiny_llama):
    heads = tiny_blockwise(tiny_llama, block_size=4)
    drafter = BlockwiseDrafter(heads, max_nodes=2)
    assert drafter.choices == [(0,), (0, 0)]
    feature = torch.randn(tiny_llama.config.hidden_size)
    drafter.prepare(None, feature, None)
    want = heads(feature[None])[:, 0].argmax(-1)
    assert drafter._proposals.tolist() == want.tolist()
    with pytest.raises(ValueError, match="max_nodes"):
        BlockwiseDrafter(heads, max_nodes=0)


def test_trained_heads_accept_more_than_one_token_per_forward(tiny_distill_data, tmp_path):
    model, data = tiny_distill_data
    cfg = BlockwiseConfig(hidden_size=model.config.hidden_size, vocab_size=model.config.vocab_size, block_size=3)
    torch.manual_seed(0)
    heads = train_head(BlockwiseHeads(cfg).attach(model), data, tmp_path,
                       TrainConfig(steps=80, batch_size=64, lr=1e-2, log_every=40, checkpoint_every=1000),
                       progress=False)
    drafter, tokens, forwards = BlockwiseDrafter(heads), 0, 0
    for s in data.train[:8]:
        x = s.input_ids[: s.response_start][None]
        ref = model.generate(x, max_new_tokens=16, do_sample=False)
        loop = SpeculativeDecoding(drafter)
        out = model.generate(x, max_new_tokens=16, do_sample=False, custom_generate=loop)
        assert torch.equal(out, ref)
        tokens += out.shape[1] - x.shape[1]
        forwards += len(loop.last_stats)
    assert tokens / forwards > 1.0, (tokens, forwards)


def test_relaxed_criteria_are_lossy_and_accept_at_least_as_much(tiny_llama):
    heads = tiny_blockwise(tiny_llama, block_size=4, seed=3)
    x = torch.tensor([PROMPTS[2]])
    runs = {}
    for name, rule in (("exact", "greedy"), ("top-3", BlockwiseTopKAcceptance(k=3)), ("top-1", BlockwiseTopKAcceptance(k=1)),
                       ("dist-0", BlockwiseDistanceAcceptance(epsilon=0))):
        loop = SpeculativeDecoding(BlockwiseDrafter(heads), acceptance=rule)
        out = tiny_llama.generate(x, max_new_tokens=32, do_sample=False, custom_generate=loop)
        runs[name] = (out, sum(s.accepted for s in loop.last_stats) / len(loop.last_stats))
    # k = 1 / epsilon = 0 are the exact criterion
    assert torch.equal(runs["top-1"][0], runs["exact"][0]) and torch.equal(runs["dist-0"][0], runs["exact"][0])
    assert runs["top-3"][1] >= runs["exact"][1]
    assert not BlockwiseTopKAcceptance(2).lossless and not BlockwiseDistanceAcceptance(1).lossless
    assert isinstance(get_acceptance_rule("blockwise-top-k", do_sample=False), BlockwiseTopKAcceptance)
    assert isinstance(get_acceptance_rule("blockwise-distance", do_sample=False), BlockwiseDistanceAcceptance)
    with pytest.raises(ValueError, match="-1"):
        BlockwiseTopKAcceptance(k=-1)


def test_top_k_criterion_accepts_a_non_argmax_proposal():
    from hf_decoding_ext.core.tree import DraftTree

    scores = {-1: torch.tensor([0.0, 3.0, 2.0, 1.0]), 0: torch.tensor([0.0, 0.0, 0.0, 4.0]), 1: torch.zeros(4)}
    tree = DraftTree.chain([2, 3])
    assert BlockwiseTopKAcceptance(k=2).accept(tree, scores.__getitem__) == ([0, 1], 0)
    assert get_acceptance_rule("greedy", do_sample=False).accept(tree, scores.__getitem__) == ([], 1)
    assert BlockwiseDistanceAcceptance(epsilon=1).accept(tree, scores.__getitem__) == ([0, 1], 0)


# ---------------------------------------------------------------------------------------------- real model
def _shipped() -> bool:
    from hf_decoding_ext.speculative.drafters.feature_head import SHIPPED

    return "blockwise" in SHIPPED


def test_committed_evaluation_shows_the_properties():
    res = json.loads((ROOT / "results" / "blockwise_eval.json").read_text())
    bpd = res["arms"]["bpd"]
    assert bpd["identical"] + bpd["near_tie_divergences"] == bpd["prompts"]
    assert bpd["block_efficiency"] > 1.0
    assert len(res["head_accuracy"]["blockwise"]["top1"]) == len(res["head_accuracy"]["medusa"]["top1"])


def test_relaxed_criterion_by_name_through_the_registry(tiny_llama):
    from hf_decoding_ext import generate_kwargs

    x = torch.tensor([PROMPTS[0]])
    kw = generate_kwargs("blockwise-parallel", model=tiny_llama, heads=tiny_blockwise(tiny_llama, seed=3),
                         engine={"acceptance": "blockwise-top-k"})
    assert kw["custom_generate"].acceptance == "blockwise-top-k"
    out = tiny_llama.generate(x, max_new_tokens=12, **kw)
    assert out.shape[1] == x.shape[1] + 12
    exact = generate_kwargs("blockwise-parallel", model=tiny_llama, heads=tiny_blockwise(tiny_llama, seed=3))
    tiny_llama.generate(x, max_new_tokens=12, **exact)
    assert exact["custom_generate"].acceptance == "auto"  # the registered default: the exact (lossless) criterion
