"""Hydra heads and drafter (Ankner et al., arXiv 2402.05109) on tiny random models."""

from __future__ import annotations

import json
import random

import pytest
import torch
from safetensors.torch import load_file

from hf_decoding_ext.speculative import SpeculativeDecoding
from hf_decoding_ext.speculative.drafters.feature_head import CPU_MAX_NODES
from hf_decoding_ext.speculative.drafters.hydra import HydraDrafter
from hf_decoding_ext.speculative.heads.hydra import HydraConfig, HydraHeads
from hf_decoding_ext.core.tree import build_choice_tree
from hf_decoding_ext.training.data import DistillData, extract_features, generate_responses, read_responses
from hf_decoding_ext.training.trainer import TrainConfig, evaluate_head, train_head

PROMPTS = [[5, 6, 7, 8, 9, 10], [3, 40, 41, 90], [17, 17, 17, 17, 60, 61, 62, 63, 64, 65, 66], [100, 3]]


class _CharTokenizer:
    chat_template = None
    pad_token_id = 0
    eos_token_id = 2

    def __call__(self, text, add_special_tokens=True):
        return {"input_ids": [3 + (ord(c) % 120) for c in text]}


def _heads(model, num_heads=3, num_layers=1, seed=None, **kwargs) -> HydraHeads:
    cfg = HydraConfig(hidden_size=model.config.hidden_size, vocab_size=model.config.vocab_size,
                      num_heads=num_heads, num_layers=num_layers, **kwargs)
    heads = HydraHeads(cfg)
    if seed is not None:  # random weights: path-dependent, non-trivial drafts
        g = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for p in heads.heads.parameters():
                p.copy_(torch.randn(p.shape, generator=g) * 0.5)
            for head in heads.heads:  # the tiny models' embeddings are ~0.02: weigh them up so they matter
                head.input_block.linear.weight[:, model.config.hidden_size:] *= 50
    return heads.attach(model)


def _greedy_equal(model, drafter, prompts=PROMPTS, max_new_tokens=24):
    accepted = 0
    for ids in prompts:
        x = torch.tensor([ids])
        ref = model.generate(x, max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=0)
        sd = SpeculativeDecoding(drafter)
        out = model.generate(x, max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=0, custom_generate=sd)
        assert torch.equal(ref, out), (ids, ref.tolist(), out.tolist())
        accepted += sum(s.accepted for s in sd.last_stats)
    return accepted


# ---------------------------------------------------------------------------------------------- shared training run
@pytest.fixture(scope="module")
def distilled(tiny_llama, tmp_path_factory):
    """Self-distilled data of the tiny Llama, an untrained head and the head trained by ``train_head``."""
    d = tmp_path_factory.mktemp("hydra")
    rng = random.Random(0)
    alphabet = "abcdefghijklmnopqrstuvwxyz0123456789 .,;:!?"
    prompts = [{"id": f"p{i}", "prompt": "".join(rng.choice(alphabet) for _ in range(rng.randint(4, 12)))}
               for i in range(60)]
    generate_responses(tiny_llama, _CharTokenizer(), prompts, d / "r.jsonl", batch_size=20, max_new_tokens=24,
                       progress=False)
    extract_features(tiny_llama, read_responses(d / "r.jsonl"), d / "f.safetensors", batch_size=20, progress=False)
    data = DistillData(d / "f.safetensors")
    untrained = _heads(tiny_llama)
    torch.manual_seed(0)
    trained = train_head(_heads(tiny_llama), data, d / "out",
                         TrainConfig(steps=150, batch_size=64, lr=1e-2, warmup=5, log_every=10, checkpoint_every=60,
                                     eval_topk=4, tree_nodes=10), progress=False)
    return {"dir": d, "data": data, "untrained": untrained, "trained": trained}


def _heldout_loss(heads, data):
    t2d = heads.target_to_draft()
    with torch.no_grad():
        losses = [float(heads.training_loss(b, t2d)[0]) for b in heads.eval_batches(data.heldout, 4096)]
    return sum(losses) / len(losses)


def test_training_lowers_loss_and_beats_untrained(distilled):
    data, untrained, trained = distilled["data"], distilled["untrained"], distilled["trained"]
    assert len(data.heldout) >= 5
    assert _heldout_loss(trained, data) < _heldout_loss(untrained, data) - 1.0
    before = evaluate_head(untrained, data.heldout, topk=4)["top1"]
    after = trained.config.training["heldout_top1"]
    assert after[0] > before[0] + 0.05, (before, after)
    assert len(trained.config.head_accuracies) == 3 and trained.config.tree_choices
    log = [json.loads(line) for line in (distilled["dir"] / "out" / "train_log.jsonl").read_text().splitlines()]
    assert log[-1]["step"] == 150 and log[-1]["loss"] < log[0]["loss"]


def test_save_load_round_trip(distilled):
    out, trained = distilled["dir"] / "out", distilled["trained"]
    assert (out / "model.safetensors").exists()
    stored = load_file(str(out / "model.safetensors"))
    assert not any("embed" in k or "lm_head" in k for k in stored)  # base weights are borrowed, not saved
    loaded = HydraHeads.from_pretrained(str(out))
    assert type(loaded.config) is HydraConfig and loaded.config.model_type == "hf_decoding_ext_hydra"
    drop = {"_name_or_path"}
    assert {k: v for k, v in loaded.config.to_dict().items() if k not in drop} == \
        {k: v for k, v in trained.config.to_dict().items() if k not in drop}
    assert loaded.config.num_heads == 3 and loaded.config.tree_choices == trained.config.tree_choices
    ref = trained.state_dict()
    assert set(loaded.state_dict()) == set(ref)
    assert all(torch.equal(v, ref[k]) for k, v in loaded.state_dict().items())


def test_trained_drafter_is_lossless_and_accepts(distilled, tiny_llama):
    drafter = HydraDrafter.for_model(tiny_llama, heads=str(distilled["dir"] / "out"), max_nodes=16)
    assert len(drafter.choices) == 16 and max(len(c) for c in drafter.choices) <= 3  # from the measured accuracies
    assert _greedy_equal(tiny_llama, drafter) > 0
    auto = HydraDrafter.for_model(tiny_llama, heads=str(distilled["dir"] / "out"))  # max_nodes="auto", CPU target
    assert len(auto.choices) == CPU_MAX_NODES and set(auto.choices) < set(drafter.choices)  # the best paths first
    assert _greedy_equal(tiny_llama, auto) > 0


# ---------------------------------------------------------------------------------------------- the head itself
def test_untrained_head_repeats_base_prediction(tiny_llama):
    heads = _heads(tiny_llama, num_heads=2, num_layers=2)
    x = torch.tensor([[5, 6, 7, 8]])
    with torch.no_grad():
        out = tiny_llama(x, output_hidden_states=True)
    h = out.hidden_states[-1][0]
    logits = heads(h, torch.randint(3, 128, (4, 2)))
    assert torch.allclose(logits[0], out.logits[0], atol=1e-5) and torch.allclose(logits[1], out.logits[0], atol=1e-5)


def test_heads_are_sequentially_dependent_and_teacher_forced(tiny_llama):
    heads = _heads(tiny_llama, num_heads=3, seed=1)
    torch.manual_seed(0)
    hidden, tokens = torch.randn(5, 32), torch.randint(3, 128, (5, 4))
    logits = heads(hidden, tokens)
    for k in (1, 2, 3):
        assert torch.allclose(logits[k - 1], heads.head_logits(k, hidden, tokens[:, :k]))
    changed = tokens.clone()
    changed[:, 1] = (changed[:, 1] + 7) % 128
    other = heads(hidden, changed)
    assert torch.equal(other[0], logits[0])  # head 1 reads x_{j+1} only
    assert not torch.allclose(other[1], logits[1]) and not torch.allclose(other[2], logits[2])
    # ranked candidates: teacher-forced ranking of each head, targets are tokens[:, 1:]
    batch = {"hidden": hidden.half(), "tokens": tokens}
    cands, targets = heads.ranked_candidates(batch, 4)
    assert cands.shape == (3, 5, 4) and torch.equal(targets, tokens[:, 1:].T)
    assert torch.equal(cands, heads(hidden.half(), tokens).topk(4, dim=-1).indices)


def test_training_loss_masks_end_and_draft_vocab(tiny_llama):
    heads = _heads(tiny_llama, num_heads=2, seed=2)
    t2d = heads.target_to_draft()
    hidden = torch.randn(3, 32).half()
    tokens = torch.tensor([[5, 6, 7], [8, 9, -100], [10, -100, -100]])
    loss, metrics = heads.training_loss({"hidden": hidden, "tokens": tokens}, t2d)
    logits = heads(hidden, tokens.clamp(min=0))
    ce1 = torch.nn.functional.cross_entropy(logits[0, :2], tokens[:2, 1])
    ce2 = torch.nn.functional.cross_entropy(logits[1, :1], tokens[:1, 2])
    assert torch.allclose(loss, ce1 + 0.8 * ce2)
    assert metrics["loss_1"] == pytest.approx(float(ce1)) and metrics["loss_2"] == pytest.approx(float(ce2))
    loss.backward()
    assert heads.heads[1].input_block.linear.weight.grad.abs().sum() > 0
    # nothing valid: a zero loss that still back-propagates
    empty = {"hidden": hidden, "tokens": torch.tensor([[5, -100, -100]] * 3)}
    assert float(heads.training_loss(empty, t2d)[0]) == 0.0
    # a trimmed draft vocabulary: targets outside it are ignored, candidates come from it
    heads.set_draft_vocab(torch.arange(50, 90))
    loss, metrics = heads.training_loss({"hidden": hidden, "tokens": torch.tensor([[5, 60, 7]] * 3)},
                                        heads.target_to_draft())
    assert set(metrics) == {"loss_1"} and torch.isfinite(loss)
    cands, _ = heads.ranked_candidates({"hidden": hidden, "tokens": tokens}, 3)
    assert bool(((cands >= 50) & (cands < 90)).all())


# ---------------------------------------------------------------------------------------------- the drafter
def _prepared(drafter, model, ids):
    x = torch.tensor([ids])
    with torch.no_grad():
        out = model(x, output_hidden_states=True)
    drafter.prepare(None, out.hidden_states[-1][0, -1], out.logits[0, -1].argmax())
    return out.hidden_states[-1][0, -1], int(out.logits[0, -1].argmax())


def test_drafter_tree_follows_paths(tiny_llama):
    choices = [[0], [1], [2], [0, 0], [0, 1], [1, 0], [2, 1], [0, 0, 0], [1, 0, 0], [1, 0, 1], [2, 1, 0]]
    heads = _heads(tiny_llama, num_heads=3, seed=3)
    drafter = HydraDrafter(heads, tree_choices=choices)
    h, root = _prepared(drafter, tiny_llama, [5, 6, 7, 8])
    calls = []
    topk = drafter.topk
    tree = build_choice_tree(drafter.choices, lambda d, p, k: calls.append((d, list(p))) or topk(d, p, k))
    assert [d for d, _ in calls] == [1, 2, 3]  # one batched head call per depth
    assert len(tree) == len(choices)
    for i, path in enumerate(drafter.choices):  # brute force: each node is the head's ranked pick given its path
        nodes = tree.path_to(i)
        prefix = [root] + [int(tree.tokens[n]) for n in nodes[:-1]]
        logits = heads.head_logits(len(path), h[None], torch.tensor([prefix]))[0]
        assert int(tree.tokens[i]) == int(heads.to_target(logits.topk(path[-1] + 1).indices[-1]))
        assert drafter.path_tokens(i) == [int(tree.tokens[n]) for n in nodes]
    # sequential dependence: the children of different depth-1 nodes differ
    assert int(tree.tokens[drafter.choices.index((0, 0))]) != int(tree.tokens[drafter.choices.index((1, 0))]) or \
        int(tree.tokens[drafter.choices.index((2, 1))]) != int(tree.tokens[drafter.choices.index((0, 1))])


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_random_heads_lossless(arch, tiny_llama, tiny_gpt2):
    model = tiny_llama if arch == "llama" else tiny_gpt2
    drafter = HydraDrafter.for_model(model, heads=_heads(model, num_heads=3, num_layers=2, seed=4), max_nodes=12)
    _greedy_equal(model, drafter)
    # a zero-initialised head drafts the base prediction at every depth (a repeat): still lossless
    _greedy_equal(model, HydraDrafter(_heads(model, num_heads=4), tree_choices=[[0], [1], [0, 0], [0, 0, 0]]))


def test_tree_size_and_choices(tiny_llama):
    heads = _heads(tiny_llama, num_heads=4, seed=5)
    for n in (1, 5, 16):
        drafter = HydraDrafter(heads, max_nodes=n)
        assert len(drafter.choices) == n
        _prepared(drafter, tiny_llama, [9, 10, 11])
        assert len(build_choice_tree(drafter.choices, drafter.topk)) == n
    chosen = [[0], [0, 0], [0, 0, 0], [0, 0, 0, 0], [1]]
    drafter = HydraDrafter(heads, tree_choices=chosen)
    _prepared(drafter, tiny_llama, [9, 10, 11])
    tree = build_choice_tree(drafter.choices, drafter.topk)
    assert tree.depth.tolist() == [1, 1, 2, 3, 4] and tree.parents.tolist() == [-1, -1, 0, 2, 3]
    assert drafter.max_depth == heads.depth == 4


def test_bad_arguments(tiny_llama):
    for kwargs in ({"num_heads": 0}, {"num_layers": 0}, {"num_heads": 1.5}, {"loss_decay": 0.0},
                   {"loss_decay": 1.5}):
        with pytest.raises(ValueError):
            HydraConfig(hidden_size=32, vocab_size=128, **kwargs)
    heads = _heads(tiny_llama, num_heads=2)
    with pytest.raises(ValueError):
        HydraDrafter(heads, tree_choices=[[0], [0, 0], [0, 0, 0]])  # deeper than the heads
    with pytest.raises(ValueError):
        HydraDrafter(heads, tree_choices=[[0, 0]])  # missing parent
    with pytest.raises(ValueError):
        HydraDrafter(heads, max_nodes=0)
    with pytest.raises(ValueError):
        HydraDrafter(123)
    with pytest.raises(ValueError):
        heads.head_logits(3, torch.zeros(1, 32), torch.zeros(1, 3, dtype=torch.long))
    with pytest.raises(ValueError):
        heads.head_logits(2, torch.zeros(1, 32), torch.zeros(1, 1, dtype=torch.long))
    with pytest.raises(ValueError):
        heads(torch.zeros(1, 32), torch.zeros(1, 1, dtype=torch.long))
    wide = HydraHeads(HydraConfig(hidden_size=48, vocab_size=128, num_heads=2))
    with pytest.raises(ValueError, match="hidden size"):
        wide.attach(tiny_llama)
