"""MLP speculator (Wertheimer et al., arXiv 2404.19124): head, tree drafter and training on tiny random models.

Checked: the reference's stage weighting, a checkpoint without base-model weights, a safetensors round trip, the
batched tree expansion against a per-path recomputation (node index -> rank path map), greedy output token-identical
to plain greedy ``generate()`` through the engine, tree size limits, a short ``train_head`` run on self-distilled data
that lowers the loss and beats the untrained head's held-out top-1, and clear errors for bad arguments.
"""

from __future__ import annotations

import copy
import json
import math

import pytest
import torch

from hf_decoding_ext.speculative import SpeculativeDecoding
from hf_decoding_ext.speculative.drafters.mlp_speculator import MLPSpeculatorDrafter
from hf_decoding_ext.speculative.heads.mlp_speculator import MLPSpeculator, MLPSpeculatorConfig
from hf_decoding_ext.core.tree import build_choice_tree, normalize_choices
from hf_decoding_ext.training.data import DistillData, extract_features, generate_responses, read_responses
from hf_decoding_ext.training.trainer import TrainConfig, evaluate_head, train_head

TREE = [[0], [1], [2], [0, 0], [0, 1], [1, 0], [2, 0], [2, 1], [0, 0, 0], [0, 1, 0], [1, 0, 0], [1, 0, 1],
        [2, 1, 0]]


def _spec(model, seed: int = 0, **kwargs) -> MLPSpeculator:
    torch.manual_seed(seed)
    cfg = MLPSpeculatorConfig(hidden_size=model.config.hidden_size, vocab_size=model.config.vocab_size,
                              **{"n_predict": 3, **kwargs})
    return MLPSpeculator(cfg).attach(model)


def _prompts(n: int = 4, seed: int = 1) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(3, 128, (1, int(torch.randint(3, 10, (1,), generator=g))), generator=g) for _ in range(n)]


def _assert_lossless(model, drafter, prompts, max_new_tokens: int = 24) -> list[dict]:
    summaries = []
    for x in prompts:
        ref = model.generate(x, max_new_tokens=max_new_tokens, do_sample=False)
        sd = SpeculativeDecoding(drafter)
        out = model.generate(x, max_new_tokens=max_new_tokens, do_sample=False, custom_generate=sd)
        assert torch.equal(ref, out), (x.tolist(), ref.tolist(), out.tolist())
        summaries.append(sd.summary())
    return summaries


class _Tok:
    """Whitespace-separated integer ids (no chat template)."""

    chat_template = None
    pad_token_id = 0
    eos_token_id = 2

    def __call__(self, text, add_special_tokens=True):
        return {"input_ids": [int(t) for t in text.split()]}


@pytest.fixture(scope="module")
def trained(tiny_model, tmp_path_factory):
    """Self-distilled data of ``tiny_model`` and a speculator trained on it with ``train_head`` (~1 s)."""
    d = tmp_path_factory.mktemp("mlp_spec")
    g = torch.Generator().manual_seed(0)
    prompts = [{"id": f"p{i}", "prompt": " ".join(str(int(t)) for t in torch.randint(3, 128, (4 + i % 6,),
                                                                                       generator=g))}
               for i in range(120)]
    generate_responses(tiny_model, _Tok(), prompts, d / "r.jsonl", batch_size=8, max_new_tokens=24, progress=False)
    extract_features(tiny_model, read_responses(d / "r.jsonl"), d / "f.safetensors", progress=False)
    data = DistillData(d / "f.safetensors")
    untrained = _spec(tiny_model)
    before = evaluate_head(untrained, data.heldout)
    head = train_head(_spec(tiny_model), data, d / "out",
                      TrainConfig(steps=300, batch_size=64, lr=1e-2, warmup=20, log_every=20,
                                  checkpoint_every=100), progress=False)
    log = [json.loads(line) for line in (d / "out" / "train_log.jsonl").read_text().splitlines()]
    return {"model": tiny_model, "data": data, "before": before, "head": head, "log": log, "dir": d / "out"}


# ---------------------------------------------------------------------------------------------------- the head
def test_reference_weighting_and_size(tiny_llama):
    spec = _spec(tiny_llama, n_predict=4)
    # state_0 keeps half of the state's magnitude (squared) after the last stage; the terms' squares sum to one
    assert spec.state_weight ** (2 * 4) == pytest.approx(0.5)
    assert spec.state_weight ** 2 + spec.emb_weight ** 2 / (spec.config.inner_dim / 2) == pytest.approx(1.0)
    assert spec.config.inner_dim == 32 and spec.depth == 4
    # no vocabulary-sized tensor in the checkpoint: embeddings and lm_head are the base model's
    h = 32
    assert spec.num_own_parameters() == 4 * (3 * h * h + 2 * h)
    for name, t in spec.state_dict().items():
        assert name == "d2t" or 128 not in t.shape, name
    narrow = _spec(tiny_llama, inner_dim=16)
    logits = narrow(torch.randn(5, 32), torch.randint(0, 128, (5, 3)))
    assert logits.shape == (3, 5, 128)


def test_forward_matches_stagewise_steps(tiny_llama):
    spec = _spec(tiny_llama)
    hidden, ids = torch.randn(4, 32), torch.randint(0, 128, (4, 3))
    logits = spec(hidden, ids)
    state = spec.initial_state(hidden)
    for stage in (1, 2, 3):
        state = spec.step(stage, state, ids[:, stage - 1])
        torch.testing.assert_close(spec.stage_logits(stage, state), logits[stage - 1])
    # the tokens condition the prediction: a different first token changes every stage
    other = ids.clone()
    other[:, 0] = (other[:, 0] + 1) % 128
    assert not torch.allclose(spec(hidden, other), logits)


def test_save_load_round_trip(tiny_model, tmp_path):
    spec = _spec(tiny_model, seed=3, inner_dim=24)
    spec.set_draft_vocab(torch.arange(127, 27, -1))
    spec.config.head_accuracies = [[0.5, 0.2], [0.4, 0.1], [0.3, 0.1]]
    spec.save_pretrained(tmp_path)
    assert (tmp_path / "model.safetensors").exists()
    loaded = MLPSpeculator.from_pretrained(tmp_path)
    assert isinstance(loaded.config, MLPSpeculatorConfig)
    strip = lambda c: {k: v for k, v in c.to_dict().items() if k != "_name_or_path"}  # noqa: E731
    assert strip(loaded.config) == strip(spec.config)
    assert loaded.config.model_type == "hf_decoding_ext_mlp_speculator"
    sd, sd2 = spec.state_dict(), loaded.state_dict()
    assert sd.keys() == sd2.keys()
    for k in sd:
        assert torch.equal(sd[k], sd2[k]), k
    loaded.attach(tiny_model)
    hidden, ids = torch.randn(2, 32), torch.randint(0, 128, (2, 3))
    assert torch.equal(loaded(hidden, ids), spec(hidden, ids))


def test_training_loss_masks_and_ranked_candidates(tiny_llama):
    spec = _spec(tiny_llama)
    t2d = spec.target_to_draft()
    tokens = torch.tensor([[5, 6, 7, 8], [9, 10, -100, -100], [11, -100, -100, -100]])
    batch = {"hidden": torch.randn(3, 32).half(), "tokens": tokens}
    loss, metrics = spec.training_loss(batch, t2d)
    assert loss.requires_grad and set(metrics) == {"loss_1", "loss_2", "loss_3"}
    assert float(loss) == pytest.approx(sum(metrics.values()), rel=1e-5)  # the reference's unweighted sum
    cands, targets = spec.ranked_candidates(batch, topk=4)
    assert cands.shape == (3, 3, 4) and torch.equal(targets, tokens[:, 1:].T)
    logits = spec(batch["hidden"], tokens[:, :-1].clamp(min=0))
    assert torch.equal(cands[:, :, 0], logits.argmax(-1))
    # a batch without any target still gives a differentiable zero
    empty = {"hidden": torch.randn(2, 32), "tokens": torch.tensor([[5, -100, -100, -100]] * 2)}
    loss, metrics = spec.training_loss(empty, t2d)
    assert float(loss) == 0.0 and not metrics
    loss.backward()


# ---------------------------------------------------------------------------------------------------- the drafter
def test_tree_nodes_follow_their_parents_paths(tiny_model):
    spec = _spec(tiny_model, seed=5)
    drafter = MLPSpeculatorDrafter(spec, tree_choices=TREE)
    feature, root = torch.randn(32), torch.tensor(17)
    with torch.inference_mode():
        drafter.prepare(None, feature, root)
        tree = build_choice_tree(drafter.choices, drafter.topk)
        paths = normalize_choices(TREE)
        assert len(tree) == len(paths)
        children_sets = {}
        for i, path in enumerate(paths):  # recompute node i = choices[i] along its own path, one stage at a time
            state, token = spec.initial_state(feature[None]), root.reshape(1)
            for depth, rank in enumerate(path, start=1):
                state = spec.step(depth, state, token)
                cands = spec.to_target(spec.stage_logits(depth, state).topk(rank + 1, dim=-1).indices)[0]
                token = cands[rank:rank + 1]
            assert int(tree.tokens[i]) == int(token), (i, path)
            parent = int(tree.parents[i])
            assert (paths[parent] if parent >= 0 else ()) == path[:-1]
            children_sets.setdefault(path[:-1], []).append(int(tree.tokens[i]))
    # conditioning: the best child differs between some parents of the same depth (unlike Medusa's heads)
    assert len({tuple(children_sets[p][:1]) for p in [(0,), (1,), (2,)]}) > 1


def test_greedy_lossless_untrained(tiny_model):
    spec = _spec(tiny_model, seed=1)
    _assert_lossless(tiny_model, MLPSpeculatorDrafter(spec, tree_choices=TREE), _prompts(3))
    _assert_lossless(tiny_model, MLPSpeculatorDrafter.for_model(tiny_model, heads=spec, max_nodes=5), _prompts(2, 7))


def test_greedy_lossless_trained_and_accepts(trained):
    model, head = trained["model"], trained["head"]
    drafter = MLPSpeculatorDrafter.for_model(model, heads=head)
    summaries = _assert_lossless(model, drafter, _prompts(4, seed=11), max_new_tokens=32)
    assert sum(s["mean_accepted"] for s in summaries) > 0  # the trained speculator drafts accepted tokens
    # max_nodes="auto": the tree size tuned from the model's measured verify-cost curve and the head's accuracies
    from hf_decoding_ext.speculative.policies.tree_policy import node_budget
    from hf_decoding_ext.speculative.policies.tuning import device_curve

    size = max(1, node_budget(device_curve(model), drafter.expected_gains()))
    assert len(drafter.choices) == size and max(s["mean_draft_size"] for s in summaries) <= size


def test_trimmed_draft_vocabulary_lossless(tiny_llama):
    spec = _spec(tiny_llama, seed=2)
    keep = torch.arange(3, 43)
    spec.set_draft_vocab(keep)
    drafter = MLPSpeculatorDrafter(spec, tree_choices=TREE)
    with torch.inference_mode():
        drafter.prepare(None, torch.randn(32), torch.tensor(50))
        tree = build_choice_tree(drafter.choices, drafter.topk)
    assert bool(torch.isin(tree.tokens, keep).all())
    _assert_lossless(tiny_llama, drafter, _prompts(2))


def test_tree_size_limits(trained):
    head = trained["head"]
    assert head.config.head_accuracies and head.config.tree_choices
    for n in (1, 4, 9):
        drafter = MLPSpeculatorDrafter(head, max_nodes=n)
        assert len(drafter.choices) == n
        sd = SpeculativeDecoding(drafter)
        trained["model"].generate(_prompts(1)[0], max_new_tokens=12, do_sample=False, custom_generate=sd)
        assert all(s.draft_size <= n for s in sd.last_stats)
    explicit = MLPSpeculatorDrafter(head, tree_choices=[[0], [0, 0], [0, 0, 0]])
    assert explicit.choices == [(0,), (0, 0), (0, 0, 0)]
    untrained = MLPSpeculatorDrafter(_spec(trained["model"]), max_nodes=6)
    assert len(untrained.choices) == 6 and max(len(c) for c in untrained.choices) <= 3


def test_bf16_model_drafts(tiny_llama):
    model = copy.deepcopy(tiny_llama).to(torch.bfloat16)
    drafter = MLPSpeculatorDrafter.for_model(model, heads=_spec(tiny_llama))
    assert drafter.head.dtype == torch.bfloat16
    x = _prompts(1)[0]
    out = model.generate(x, max_new_tokens=10, do_sample=False, custom_generate=SpeculativeDecoding(drafter))
    assert out.shape == (1, x.shape[1] + 10)


# ---------------------------------------------------------------------------------------------------- training
def test_train_head_smoke(trained):
    log, before, head = trained["log"], trained["before"], trained["head"]
    assert log[-1]["loss"] < log[0]["loss"]
    after = head.config.training["heldout_top1"]
    assert after[0] > before["top1"][0] + 0.2, (before["top1"], after)
    assert len(head.config.head_accuracies) == 3
    reloaded = MLPSpeculator.from_pretrained(trained["dir"]).attach(trained["model"])
    assert reloaded.config.training["heldout_top1"] == after
    assert evaluate_head(reloaded, trained["data"].heldout)["top1"][0] == pytest.approx(after[0], abs=1e-4)


def test_pipeline_builds_the_head(tiny_llama):
    from hf_decoding_ext.training.pipeline import build_head

    head = build_head("mlp-speculator", tiny_llama, "tiny", n_predict=2)
    assert isinstance(head, MLPSpeculator) and head.attached and head.depth == 2


# ---------------------------------------------------------------------------------------------------- errors
def test_bad_arguments(tiny_llama):
    for kwargs in ({"n_predict": 0}, {"n_predict": 1.5}, {"n_predict": True}, {"inner_dim": -4},
                   {"inner_dim": 2.0}):
        with pytest.raises(ValueError):
            MLPSpeculatorConfig(hidden_size=32, vocab_size=128, **kwargs)
    spec = _spec(tiny_llama)
    with pytest.raises(ValueError, match="max_nodes"):
        MLPSpeculatorDrafter(spec, max_nodes=0)
    with pytest.raises(ValueError, match="depth"):
        MLPSpeculatorDrafter(spec, tree_choices=[[0], [0, 0], [0, 0, 0], [0, 0, 0, 0]])
    with pytest.raises(ValueError, match="parent"):
        MLPSpeculatorDrafter(spec, tree_choices=[[0], [1, 0]])
    with pytest.raises(ValueError):
        MLPSpeculatorDrafter(42)
    small = _spec(tiny_llama)
    small.set_draft_vocab(torch.arange(3, 6))
    with pytest.raises(ValueError, match="draft vocabulary"):
        MLPSpeculatorDrafter(small, tree_choices=[[0], [3]])
    with pytest.raises(ValueError, match="stage"):
        spec.step(4, torch.randn(1, 32), torch.tensor([5]))
    with pytest.raises(ValueError, match="input_ids"):
        spec(torch.randn(2, 32), torch.zeros(2, 2, dtype=torch.long))
    with pytest.raises(RuntimeError, match="attach"):
        MLPSpeculator(MLPSpeculatorConfig(hidden_size=32, vocab_size=128))(torch.randn(1, 32),
                                                                         torch.zeros(1, 4, dtype=torch.long))


def test_attach_rejects_other_hidden_size(tiny_llama, tiny_gpt2):
    wide = MLPSpeculator(MLPSpeculatorConfig(hidden_size=48, vocab_size=128))
    with pytest.raises(ValueError, match="hidden size"):
        wide.attach(tiny_llama)
    other_vocab = MLPSpeculator(MLPSpeculatorConfig(hidden_size=32, vocab_size=256))
    with pytest.raises(ValueError, match="vocabulary"):
        other_vocab.attach(tiny_gpt2)
    assert math.isclose(_spec(tiny_gpt2).state_weight, 0.5 ** (0.5 / 3))
