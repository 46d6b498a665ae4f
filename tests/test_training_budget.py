"""Issue 23 core: intermediate-layer features, the shared sequence collation and equal training budgets."""

from __future__ import annotations

import pytest
import torch

from hf_decoding_ext.speculative.heads.medusa import MedusaConfig, MedusaHeads
from hf_decoding_ext.training.budget import BUDGETS, TrainingBudget, resolve_budget
from hf_decoding_ext.training.data import collate_sequences, extract_layer_features, layer_features_path
from hf_decoding_ext.training.trainer import TrainConfig, train_head


def test_layer_features_equal_the_models_hidden_states(tiny_distill_data):
    model, data = tiny_distill_data
    s = data.heldout[0]
    with torch.no_grad():
        ref = model(s.input_ids[None], output_hidden_states=True).hidden_states
    assert set(s.layers) == {1}
    torch.testing.assert_close(s.layers[1].float(), ref[1][0].float(), atol=2e-3, rtol=2e-3)
    # the cached last-layer feature is the final-normed state, not a decoder layer's output
    torch.testing.assert_close(s.hidden.float(), ref[-1][0].float(), atol=2e-3, rtol=2e-3)
    assert not torch.allclose(s.layers[1].float(), s.hidden.float(), atol=1e-2)


def test_layer_features_are_cached_once_and_validated(tiny_distill_data, tmp_path):
    model, data = tiny_distill_data
    path = layer_features_path(data.path, 1)
    stamp = path.stat().st_mtime_ns
    assert extract_layer_features(model, data.path, (1,), progress=False) == [path]
    assert path.stat().st_mtime_ns == stamp  # existing layers are not recomputed
    with pytest.raises(ValueError, match="layer must be in"):
        extract_layer_features(model, data.path, (model.config.num_hidden_layers,), progress=False)
    from hf_decoding_ext.training.data import DistillData

    with pytest.raises(ValueError, match="no layer-0 features"):
        DistillData(data.path, layers=(0,))


def test_collate_sequences_pads_right_and_carries_layers(tiny_distill_data):
    _, data = tiny_distill_data
    seqs = data.train[:3]
    b = collate_sequences(seqs, max_length=12, hidden_size=data.hidden_size, layers=(1,))
    assert b["input_ids"].shape == b["valid"].shape == b["labels"].shape
    assert b["layer1"].shape == b["hidden"].shape and b["hidden"].dtype == torch.float16
    for i, s in enumerate(seqs):
        n = min(12, s.input_ids.shape[0])
        assert int(b["valid"][i].sum()) == n
        assert b["input_ids"][i, :n].tolist() == s.input_ids[-n:].tolist()
        torch.testing.assert_close(b["layer1"][i, :n], s.layers[1][-n:])
        assert b["labels"][i, :n].tolist() == s.labels[-n:].tolist()
    with pytest.raises(ValueError, match="no layer-0 features"):
        collate_sequences(seqs, 12, data.hidden_size, layers=(0,))


def test_budget_sets_steps_from_positions_and_the_trainer_counts_them(tiny_distill_data, tmp_path):
    model, data = tiny_distill_data
    head = MedusaHeads(MedusaConfig(hidden_size=32, vocab_size=128, num_heads=2)).attach(model)
    budget = TrainingBudget(640)
    steps = budget.steps_for(head, data.train, batch_size=32)
    # a position batch of 32 carries up to 32 depth-1 targets (none at a sequence's last position)
    assert 20 <= steps <= 22
    trained = train_head(head, data, tmp_path, TrainConfig(steps=steps, batch_size=32, log_every=5), progress=False)
    assert 640 - 32 <= trained.config.training["positions"] <= 640 + 32
    # sequence heads count valid positions, not sequences
    from hf_decoding_ext.speculative.heads.eagle import EagleDrafterConfig, EagleDrafterModel

    cfg = EagleDrafterConfig(hidden_size=32, vocab_size=128)
    cfg.from_base_config(model.config)
    eagle = EagleDrafterModel(cfg).attach(model)
    batch = next(eagle.train_batches(data.train, 2))
    assert eagle.batch_positions(batch) == int(batch["valid"][:, 1:].sum()) > 2


def test_resolve_budget():
    assert resolve_budget("comparison") is BUDGETS["comparison"]
    assert resolve_budget(1234).positions == 1234 and resolve_budget(None) is None
    with pytest.raises(ValueError, match="'lots'"):
        resolve_budget("lots")
    with pytest.raises(ValueError, match="-5"):
        TrainingBudget(-5)
