"""Trained draft heads on tiny random models: the shared machinery (base class, choice trees, data pipeline,
trainer with resumable checkpoints, the ``train`` CLI) and the Medusa and EAGLE/FSPAD drafters (lossless greedy on two
architectures, save/load, training improves held-out accuracy)."""

from __future__ import annotations

import json

import pytest
import torch

from hf_decoding_ext.speculative import SpeculativeDecoding
from hf_decoding_ext.speculative.drafters.eagle import EagleDrafter
from hf_decoding_ext.speculative.drafters.medusa import MedusaDrafter
from hf_decoding_ext.speculative.heads.eagle import EagleDrafterConfig, EagleDrafterModel
from hf_decoding_ext.speculative.heads.medusa import MedusaConfig, MedusaHeads
from hf_decoding_ext.core.tree import build_choice_tree, choices_from_accuracies, normalize_choices
from hf_decoding_ext.training.data import DistillData, extract_features, generate_responses, position_examples, \
    read_responses
from hf_decoding_ext.training.trainer import TrainConfig, evaluate_head, train_head


class _CharTokenizer:
    """Enough of a tokenizer for the data pipeline on tiny models (no chat template)."""

    chat_template = None
    pad_token_id = 0
    eos_token_id = 2

    def __call__(self, text, add_special_tokens=True):
        return {"input_ids": [3 + (ord(c) % 120) for c in text]}


@pytest.fixture(scope="module")
def tiny_data(tmp_path_factory, tiny_llama):
    d = tmp_path_factory.mktemp("distill")
    prompts = [{"id": f"p{i}", "prompt": f"prompt {i} about {'abc'[i % 3]}" * (1 + i % 2)} for i in range(40)]
    generate_responses(tiny_llama, _CharTokenizer(), prompts, d / "r.jsonl", batch_size=8, max_new_tokens=20,
                       progress=False)
    rows = read_responses(d / "r.jsonl")
    extract_features(tiny_llama, rows, d / "f.safetensors", progress=False)
    return DistillData(d / "f.safetensors"), rows, d


def _medusa(model, **kw):
    return MedusaHeads(MedusaConfig(hidden_size=model.config.hidden_size, vocab_size=model.config.vocab_size, **kw))


def _eagle(model, **kw):
    cfg = EagleDrafterConfig(hidden_size=model.config.hidden_size, vocab_size=model.config.vocab_size, **kw)
    cfg.from_base_config(model.config)
    return EagleDrafterModel(cfg)


PROMPTS = [[5, 6, 7, 8, 9], [40, 41, 42, 43, 44, 45, 46, 47], [100, 3, 90, 4, 80], [11, 12]]


# ---------------------------------------------------------------------------------------------- choice trees
def test_choices_from_accuracies_is_prefix_closed_and_ranks_paths_by_value():
    acc = [[0.7, 0.15, 0.05], [0.6, 0.2, 0.1], [0.5, 0.2]]
    choices = choices_from_accuracies(acc, num_nodes=8)
    assert len(choices) == 8 and set(choices) == set(normalize_choices(choices))
    assert all(c[:-1] in choices for c in choices if len(c) > 1)
    value = {c: torch.tensor([acc[d][i] for d, i in enumerate(c)]).prod().item() for c in choices}
    # every picked path is worth at least as much as any unpicked child of a picked path
    worst = min(value.values())
    for c in choices:
        if len(c) < len(acc):
            for i, a in enumerate(acc[len(c)]):
                if c + (i,) not in choices:
                    assert value[c] * a <= worst + 1e-12
    assert choices_from_accuracies(acc, 8, max_depth=1) == [(0,), (1,), (2,)]


def test_choice_tree_validation_and_filling():
    with pytest.raises(ValueError, match="parent"):
        normalize_choices([(0, 0)])
    with pytest.raises(ValueError):
        normalize_choices([()])
    calls = []

    def topk(depth, parents, k):
        calls.append((depth, list(parents), k))
        return torch.tensor([[100 * depth + 10 * (p + 1) + i for i in range(k)] for p in parents])

    tree = build_choice_tree([(1,), (0,), (0, 0), (0, 1), (1, 0)], topk)
    assert tree.parents.tolist() == [-1, -1, 0, 0, 1]
    assert calls == [(1, [-1], 2), (2, [0, 1], 2)]  # one batched call per depth
    assert tree.tokens.tolist() == [100, 101, 210, 211, 220]


# ---------------------------------------------------------------------------------------------- base class
def test_attach_checks_dimensions_and_draft_vocab(tiny_llama, tiny_gpt2):
    head = _medusa(tiny_llama)
    wrong = MedusaHeads(MedusaConfig(hidden_size=16, vocab_size=128))
    with pytest.raises(ValueError, match="hidden size"):
        wrong.attach(tiny_llama)
    with pytest.raises(RuntimeError, match="attach"):
        head.draft_logits(torch.zeros(32))
    head.attach(tiny_gpt2)  # same geometry, another architecture
    head.set_draft_vocab(torch.tensor([7, 3, 99]))
    assert head.draft_logits(torch.zeros(2, 32)).shape == (2, 3)
    assert head.target_to_draft()[torch.tensor([7, 3, 99, 5])].tolist() == [0, 1, 2, -100]
    with pytest.raises(ValueError):
        head.set_draft_vocab(torch.tensor([3, 3]))
    with pytest.raises(ValueError):
        head.set_draft_vocab(torch.tensor([500]))
    with pytest.raises(ValueError):
        MedusaConfig(num_heads=0)


def test_untrained_medusa_head_repeats_the_base_prediction(tiny_llama):
    """Medusa's zero initialisation: each head starts as the identity, i.e. the base lm_head's prediction."""
    head = _medusa(tiny_llama).attach(tiny_llama)
    h = torch.randn(5, 32)
    assert torch.allclose(head(h)[2], tiny_llama.lm_head(h), atol=1e-6)


def test_position_examples_targets(tiny_data):
    data, _, _ = tiny_data
    s = data.train[0]
    hidden, tokens = position_examples([s], depth=3)
    j0 = s.response_start - 1
    assert torch.equal(hidden[0], s.hidden[j0])
    assert tokens[0].tolist() == s.input_ids[j0 + 1: j0 + 5].tolist()
    assert tokens[-1].tolist()[1:] == [-100, -100, -100]


# ---------------------------------------------------------------------------------------------- drafters
@pytest.mark.parametrize("kind", ["medusa", "eagle"])
def test_greedy_is_token_identical_on_two_architectures(kind, tiny_model):
    torch.manual_seed(1)
    head = _medusa(tiny_model, num_heads=3) if kind == "medusa" else _eagle(tiny_model, num_draft_tokens=3)
    with torch.no_grad():  # random (not identity) heads: drafts that are sometimes right, sometimes wrong
        for p in head.parameters():
            if p.dim() == 2:
                p.normal_(0, 0.3)
    drafter = MedusaDrafter(head, max_nodes=10) if kind == "medusa" else EagleDrafter(head, max_nodes=10)
    for ids in PROMPTS:
        x = torch.tensor([ids])
        ref = tiny_model.generate(x, max_new_tokens=24, do_sample=False)
        loop = SpeculativeDecoding(drafter)
        out = tiny_model.generate(x, max_new_tokens=24, do_sample=False, custom_generate=loop)
        assert torch.equal(out, ref), (kind, ids)
        assert all(s.draft_size <= 10 for s in loop.last_stats)
        assert loop.last_stats[0].draft_size == 0  # nothing to draft from before the prompt's features exist


@pytest.mark.parametrize("kind", ["medusa", "eagle"])
def test_merged_with_prompt_lookup_tracks_features_of_every_accepted_token(kind, tiny_llama):
    """Merged with prompt lookup, a head still sees the features of tokens accepted from the lookup's nodes."""
    from hf_decoding_ext.speculative.drafters.merged import MergedDrafter
    from hf_decoding_ext.speculative.drafters.prompt_lookup import PromptLookupDrafter

    torch.manual_seed(2)
    head = _medusa(tiny_llama, num_heads=3) if kind == "medusa" else _eagle(tiny_llama, num_draft_tokens=3)
    seen = []

    class Head(MedusaDrafter if kind == "medusa" else EagleDrafter):
        def on_features(self, state, features, result):
            seen.append((state.input_ids.shape[1], features.shape[0], len(result.accepted)))
            super().on_features(state, features, result)

    merged = MergedDrafter([Head(head, max_nodes=4), PromptLookupDrafter()])
    assert merged.wants_hidden_states and merged.kernel_modules() == [head]
    x = torch.tensor([[5, 6, 7, 8, 9, 5, 6, 7, 8, 9, 5, 6, 7]])
    ref = tiny_llama.generate(x, max_new_tokens=30, do_sample=False)
    loop = SpeculativeDecoding(merged)
    out = tiny_llama.generate(x, max_new_tokens=30, do_sample=False, custom_generate=loop)
    assert torch.equal(out, ref)
    assert sum(s.accepted for s in loop.last_stats) > 0
    # after each step the features cover the committed sequence and the accepted path (all but the bonus token)
    total = 0
    for length, m, accepted in seen:
        total += m
        assert total == length + accepted


def test_tree_choices_and_bad_arguments(tiny_llama):
    head = _medusa(tiny_llama, num_heads=2)
    d = MedusaDrafter(head, tree_choices=[[0], [1], [0, 0]])
    assert d.choices == [(0,), (1,), (0, 0)]
    with pytest.raises(ValueError, match="depth"):
        MedusaDrafter(head, tree_choices=[[0], [0, 0], [0, 0, 0]])
    with pytest.raises(ValueError):
        MedusaDrafter(head, max_nodes=0)
    with pytest.raises(ValueError):
        MedusaDrafter(3.5)
    assert len(MedusaDrafter(head, max_nodes=5).choices) == 5


def test_eagle_drafter_tree_matches_a_brute_force_rollout(tiny_llama):
    """Each node's candidates equal the drafter model run on the true features of the prefix, then on its own
    predicted features along the node's path (checks the drafter's cache, tree mask and positions)."""
    torch.manual_seed(2)
    head = _eagle(tiny_llama, num_draft_tokens=3).attach(tiny_llama)
    with torch.no_grad():
        for p in head.parameters():
            if p.dim() == 2:
                p.normal_(0, 0.3)
    drafter = EagleDrafter(head, tree_choices=[[0], [1], [0, 0], [0, 1], [1, 0], [0, 0, 0]])
    x = torch.tensor([PROMPTS[1]])
    loop = SpeculativeDecoding(drafter)
    captured = []
    orig = drafter.propose

    def spy(state):
        draft = orig(state)
        captured.append((state.input_ids.clone(), draft.tree, torch.cat([f for f in [drafter._all_features()]])
                         if hasattr(drafter, "_all_features") else None))
        return draft

    drafter.propose = spy
    tiny_llama.generate(x, max_new_tokens=6, do_sample=False, custom_generate=loop)
    ids, tree, _ = captured[2]
    # brute force: target features of the committed prefix (all but the last token)
    with torch.no_grad():
        feats = tiny_llama(ids, output_hidden_states=True).hidden_states[-1][0, :-1]
        t = feats.shape[0]

        def run(f, toks):
            n = f.shape[0]
            mask = torch.zeros(1, 1, n, n).masked_fill(~torch.tril(torch.ones(n, n, dtype=torch.bool)), -1e30)
            return head(f[None], toks[None], torch.arange(n)[None], mask)[0]

        base = run(feats, ids[0, 1:])
        for node in range(len(tree)):
            path = tree.path_to(node)
            f, toks, pred = feats, ids[0, 1:], base[-1]
            for anc in path[:-1]:
                f = torch.cat([f, pred[None]])
                toks = torch.cat([toks, tree.tokens[anc:anc + 1]])
                pred = run(f, toks)[-1]
            rank = drafter.choices[node][-1]
            expected = head.to_target(head.logits_from(pred).topk(rank + 1).indices)[rank]
            assert int(tree.tokens[node]) == int(expected), node
    assert t == ids.shape[1] - 1


# ---------------------------------------------------------------------------------------------- training
@pytest.mark.parametrize("kind", ["medusa", "eagle"])
def test_training_improves_heldout_accuracy_and_round_trips(kind, tiny_llama, tiny_data, tmp_path):
    data, _, _ = tiny_data
    head = (_medusa(tiny_llama, num_heads=3) if kind == "medusa" else _eagle(tiny_llama, num_draft_tokens=3))
    head.attach(tiny_llama)
    before = evaluate_head(head, data.heldout, topk=1)["top1"][0]
    cfg = TrainConfig(steps=80, batch_size=64 if kind == "medusa" else 8, lr=1e-2, log_every=10,
                      checkpoint_every=1000, tree_nodes=6)
    head = train_head(head, data, tmp_path / kind, cfg, progress=False)
    after = head.config.training["heldout_top1"][0]
    assert after > before + 0.05, (before, after)
    assert len(head.config.tree_choices) == 6 and len(head.config.head_accuracies) == 3
    log = [json.loads(line) for line in open(tmp_path / kind / "train_log.jsonl")]
    assert log[-1]["loss"] < log[0]["loss"]
    cls = MedusaHeads if kind == "medusa" else EagleDrafterModel
    loaded = cls.from_pretrained(tmp_path / kind)
    assert (tmp_path / kind / "model.safetensors").exists()
    assert not list((tmp_path / kind).glob("*.bin")) and not list((tmp_path / kind).glob("*.pt"))
    for (n, a), (_, b) in zip(head.state_dict().items(), loaded.state_dict().items()):
        assert torch.equal(a, b), n
    assert loaded.config.tree_choices == head.config.tree_choices
    # the trained drafter is lossless and uses its tree from the measured accuracies
    drafter = (MedusaDrafter if kind == "medusa" else EagleDrafter)(loaded, max_nodes=None)
    assert drafter.choices == [tuple(c) for c in head.config.tree_choices]
    s = data.heldout[0]
    x = s.input_ids[: s.response_start][None]
    ref = tiny_llama.generate(x, max_new_tokens=16, do_sample=False)
    loop = SpeculativeDecoding(drafter)
    assert torch.equal(tiny_llama.generate(x, max_new_tokens=16, do_sample=False, custom_generate=loop), ref)
    assert loop.summary()["mean_accepted"] > 0


def test_training_resumes_from_its_checkpoint(tiny_llama, tiny_data, tmp_path):
    data, _, _ = tiny_data
    cfg = TrainConfig(steps=20, batch_size=32, lr=1e-2, log_every=5, checkpoint_every=10)
    full = train_head(_medusa(tiny_llama, num_heads=2).attach(tiny_llama), data, tmp_path / "a", cfg, progress=False)
    # a run interrupted after its step-10 checkpoint, then resumed, ends with the same weights
    part = TrainConfig(**{**cfg.__dict__, "steps": 20})
    head = _medusa(tiny_llama, num_heads=2).attach(tiny_llama)
    import shutil

    shutil.copytree(tmp_path / "a" / "checkpoint", tmp_path / "b" / "checkpoint")
    state = json.loads((tmp_path / "b" / "checkpoint" / "trainer_state.json").read_text())
    assert state["step"] == 10
    resumed = train_head(head, data, tmp_path / "b", part, progress=False)
    for (n, a), (_, b) in zip(full.state_dict().items(), resumed.state_dict().items()):
        assert torch.allclose(a, b, atol=1e-6), n
    assert (tmp_path / "b" / "checkpoint" / "optimizer.safetensors").exists()


def test_generate_responses_is_resumable(tiny_llama, tmp_path):
    tok = _CharTokenizer()
    prompts = [{"id": f"q{i}", "prompt": "x" * (i + 1)} for i in range(6)]
    path = tmp_path / "r.jsonl"
    generate_responses(tiny_llama, tok, prompts[:3], path, batch_size=2, max_new_tokens=5, progress=False)
    with open(path, "a") as f:
        f.write('{"id": "q3", "prompt_')  # a line cut by an interrupted run
    generate_responses(tiny_llama, tok, prompts, path, batch_size=2, max_new_tokens=5, progress=False)
    rows = read_responses(path)
    assert sorted(r["id"] for r in rows) == [f"q{i}" for i in range(6)]
    # responses are the model's own greedy continuations
    r = next(r for r in rows if r["id"] == "q4")
    ref = tiny_llama.generate(torch.tensor([r["prompt_ids"]]), max_new_tokens=5, do_sample=False)
    assert ref[0, len(r["prompt_ids"]):].tolist()[: len(r["response_ids"])] == r["response_ids"]
    with pytest.raises(ValueError):
        generate_responses(tiny_llama, tok, prompts, path, batch_size=0)


# ---------------------------------------------------------------------------------------------- head declarations
def test_head_classes_declare_their_kind_drafter_and_training_options():
    from dataclasses import fields

    from hf_decoding_ext.core.resources import data_path
    from hf_decoding_ext.registry import METHODS, get_method
    from hf_decoding_ext.speculative.drafters.base import Drafter
    from hf_decoding_ext.speculative.drafters.feature_head import SHIPPED, shipped_head_path
    from hf_decoding_ext.speculative.heads import head_class, head_classes
    from hf_decoding_ext.speculative.heads.base import DraftHeadConfig, DraftHeadModel
    from hf_decoding_ext.training.budget import resolve_budget

    classes = head_classes()
    assert list(classes)[:4] == ["medusa", "hydra", "mlp-speculator", "eagle"]
    train_fields = {f.name for f in fields(TrainConfig)}
    for kind, cls in classes.items():
        assert issubclass(cls, DraftHeadModel) and cls.head_kind == kind and head_class(kind) is cls
        assert issubclass(cls.config_class, DraftHeadConfig) and cls.config_class is not DraftHeadConfig
        assert cls.display_name and set(cls.training_defaults) <= train_fields
        assert set(cls.shipped_recipe) - {"head_options", "save_dtype", "budget"} <= train_fields
        assert set(cls.shipped_recipe.get("head_options", {})) <= set(cls.config_class().to_dict())
        assert set(cls.card_config_keys) <= set(cls.config_class().to_dict())
        # the declared drafter runs this head class and is the registered method's component
        drafter = cls.load_drafter_class()
        assert issubclass(drafter, Drafter)
        if not cls.shipped_name:  # a kind can be trained before its method is registered (nothing to run yet)
            assert kind not in SHIPPED
            if cls.method in {m.name for m in METHODS}:
                assert get_method(cls.method).target == cls.drafter
            continue
        assert get_method(cls.method).target == cls.drafter
        # the shipped table is read from the declarations, and the folder holds a checkpoint of this class
        assert SHIPPED[kind] == cls.shipped_name and shipped_head_path(kind) == data_path("heads", cls.shipped_name)
        config = json.loads((shipped_head_path(kind) / "config.json").read_text())
        assert config["model_type"] == cls.config_class.model_type
        if "budget" in cls.shipped_recipe:
            assert config["training"]["budget"]["positions"] == resolve_budget(cls.shipped_recipe["budget"]).positions
            assert config["training"]["positions"] >= 0.95 * config["training"]["budget"]["positions"]
        else:
            assert config["training"]["steps"] == cls.shipped_recipe["steps"]
        assert config["training"]["lr"] == cls.shipped_recipe.get("lr", cls.training_defaults.get("lr"))
    with pytest.raises(ValueError, match="unknown head kind 'nope'"):
        head_class("nope")


def test_training_pipeline_reads_the_declarations(tiny_llama, monkeypatch):
    from hf_decoding_ext.speculative.heads import head_classes
    from hf_decoding_ext.training.pipeline import build_head, recipe_options, run_training

    for kind, cls in head_classes().items():
        options = recipe_options(kind)
        assert options == {"train": cls.training_defaults, "head_options": {}, "save_dtype": None, "budget": None}
        shipped = recipe_options(kind, "shipped")
        if "budget" in cls.shipped_recipe:  # steps follow from the budget and the head's batches
            assert shipped["budget"] == cls.shipped_recipe["budget"] and "steps" not in cls.shipped_recipe
        else:
            assert shipped["train"]["steps"] == cls.shipped_recipe["steps"]
        head = build_head(kind, tiny_llama, "tiny", **shipped["head_options"])
        assert type(head) is cls and head.attached
    assert recipe_options("eagle", "shipped")["save_dtype"] == "float16"
    # a changed declaration changes what the pipeline does, with no per-kind code to update
    monkeypatch.setattr(MedusaHeads, "training_defaults", {"lr": 0.123, "batch_size": 7})
    assert recipe_options("medusa")["train"] == {"lr": 0.123, "batch_size": 7}
    with pytest.raises(ValueError, match="recipe must be one of"):
        recipe_options("medusa", "fast")
    with pytest.raises(ValueError, match="unknown head kind"):
        run_training("no-such-head")


# ---------------------------------------------------------------------------------------------- the train command
def test_train_command_smoke_on_a_tiny_model(tmp_path):
    """``hf-decoding-ext train <kind> --base <model>`` end to end in seconds: a tiny random Llama with the default
    model's tokenizer answers 2 distillation prompts per category, features are cached, a head is trained, evaluated
    and saved (float16 on request), with the stage log written."""
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from hf_decoding_ext.cli import main
    from hf_decoding_ext.core.models import default_model_path

    tok = AutoTokenizer.from_pretrained(default_model_path())
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                      num_attention_heads=4, num_key_value_heads=2, eos_token_id=tok.eos_token_id,
                      pad_token_id=tok.pad_token_id, max_position_embeddings=2048)
    base = tmp_path / "tiny-base"
    LlamaForCausalLM(cfg).save_pretrained(base)
    tok.save_pretrained(base)
    for kind, extra in [("medusa", ["--head-param", "num_heads=2"]),
                        ("eagle", ["--head-param", "num_draft_tokens=2", "--save-dtype", "float16", "--recipe",
                                   "shipped"])]:
        out, log = tmp_path / f"out-{kind}", tmp_path / f"{kind}.log"
        rc = main(["train", kind, "--base", str(base), "--out", str(out), "--prompts", "2", "--max-new-tokens", "6",
                   "--steps", "3", "--batch-size", "4", "--draft-vocab-size", "512", "--work-dir", str(tmp_path / "w"),
                   "--log", str(log), *extra])
        assert rc == 0
        text = log.read_text()
        assert "stage 1/3" in text and "stage 3/3" in text and "done" in text
        cfg_out = json.loads((out / "config.json").read_text())
        assert cfg_out["draft_vocab_size"] == 512 and cfg_out["training"]["steps"] == 3
        assert cfg_out["training"]["data"]["sequences"] == 12 and cfg_out["head_accuracies"]
    assert json.loads((tmp_path / "out-eagle" / "config.json").read_text())["dtype"] == "float16"
    # options not given on the command line come from the head classes' declarations: the kind's training defaults,
    # or with --recipe shipped the options its shipped checkpoint was trained with
    medusa = json.loads((tmp_path / "out-medusa" / "config.json").read_text())
    assert medusa["training"]["lr"] == MedusaHeads.training_defaults["lr"] and medusa["training"]["weight_decay"] == 0
    eagle = json.loads((tmp_path / "out-eagle" / "config.json").read_text())
    recipe = EagleDrafterModel.shipped_recipe
    assert eagle["training"]["lr"] == recipe["lr"] and eagle["training"]["weight_decay"] == recipe["weight_decay"]
    assert eagle["cls_weight"] == recipe["head_options"]["cls_weight"] and eagle["num_draft_tokens"] == 2
    assert eagle["training"]["batch_size"] == 4 and eagle["training"]["steps"] == 3  # the command line wins
    # responses were generated once and reused by the second head
    assert len(read_responses(tmp_path / "w" / "responses.jsonl")) == 12
    assert main(["train", "no-such-head", "--base", str(base), "--out", str(tmp_path / "x")]) == 2


def test_medusa_typical_acceptance_runs_with_sampling(tiny_llama):
    """Medusa's typical acceptance (lossy) through the engine: sampled output, drafts accepted by the typical rule."""
    torch.manual_seed(3)
    head = _medusa(tiny_llama, num_heads=2)  # untrained: every head repeats the base prediction
    loop = SpeculativeDecoding(MedusaDrafter(head, max_nodes=4), acceptance="typical", seed=0)
    x = torch.tensor([PROMPTS[0]])
    out = tiny_llama.generate(x, max_new_tokens=20, do_sample=True, temperature=0.7, custom_generate=loop)
    assert out.shape[1] > x.shape[1] and loop.summary()["tokens"] == out.shape[1] - x.shape[1]


def test_eagle_float16_checkpoint_keeps_positions(tiny_llama, tmp_path):
    """A drafter stored in float16 (the shipped EAGLE checkpoint) and attached to a float32 model predicts what the
    float32 drafter predicts at far positions (its rotary frequencies are rebuilt in float32)."""
    torch.manual_seed(4)
    head = _eagle(tiny_llama, num_draft_tokens=2).attach(tiny_llama)
    head.to(torch.float16).save_pretrained(tmp_path / "fp16")
    head.to(torch.float32)
    loaded = EagleDrafterModel.from_pretrained(tmp_path / "fp16").attach(tiny_llama)
    assert loaded.dtype == torch.float32 and loaded.rotary_emb.inv_freq.dtype == torch.float32
    n = 300
    feats, ids = torch.randn(1, n, 32), torch.randint(0, 128, (1, n))
    mask = torch.zeros(1, 1, n, n).masked_fill(~torch.tril(torch.ones(n, n, dtype=torch.bool)), -1e30)
    with torch.no_grad():
        a = head.logits_from(head(feats, ids, torch.arange(n)[None], mask)).argmax(-1)
        b = loaded.logits_from(loaded(feats, ids, torch.arange(n)[None], mask)).argmax(-1)
    assert (a == b).float().mean() > 0.97
