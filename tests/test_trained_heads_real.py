"""Issue 6 on the real model: the shipped trained drafters (Medusa, Hydra, MLP speculator, EAGLE/FSPAD) for
SmolLM2-135M-Instruct.

- Greedy acceptance is lossless: token-identical to plain greedy ``generate()`` on 6 benchmark prompts (one per
  category) x 32 tokens in the default run (20 x 64 in the slow run of ``test_verification_real.py``), with drafts
  accepted (more than 1.3 tokens per target forward).
- Every shipped checkpoint is safetensors only, under 20 MB, trained for this base model, with a model card.
- Loading by Hub id works offline from a local Hugging Face cache laid out as the Hub would; publishing lists the
  files it would upload.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from hf_decoding_ext.plug import generate_kwargs
from hf_decoding_ext.bench.parity import greedy_parity, greedy_references
from hf_decoding_ext.bench.prompts import interleaved_prompts
from hf_decoding_ext.registry import METHODS
from hf_decoding_ext.speculative.drafters.feature_head import SHIPPED, shipped_head_path
from hf_decoding_ext.speculative.heads.hub import publish, seed_hub_cache

N_PROMPTS = 6
MAX_NEW_TOKENS = 32
TRAINED = [m for m in METHODS if m.family == "trained-heads"]
PINNED_NODES = 5
"""The node budget of the parity test. ``max_nodes="auto"`` tunes the tree on the machine's measured verify-cost
curve (5 nodes on the development CPUs, 1-2 on a CI machine whose wide forwards cost more), so the test pins it:
what it checks is the heads' drafts, not the machine's tuner (tested in ``test_policies.py`` and ``test_tuning.py``)."""
EXPECTED_CLASS = {"medusa": "MedusaDrafter", "hydra": "HydraDrafter", "mlp-speculator": "MLPSpeculatorDrafter",
                  "eagle-fspad": "EagleDrafter",
                  # issue 23 (registered so far; the trained kinds are registered once their checkpoints ship)
                  "blockwise-parallel": "BlockwiseDrafter", "blockwise-draft-refinement": "BlockwiseRefinementDrafter",
                  "online-speculative": "OnlineSpeculativeDrafter", "vocab-trim": "VocabTrimDrafter",
                  "clover": "CloverDrafter", "chimera": "ChimeraDrafter",
                  "jakiro": "JakiroDrafter", "hidden-transfer": "HiddenTransferDrafter",
                  "ppd": "PPDDrafter", "longspec": "LongSpecDrafter"}
MIN_TOKENS_PER_FORWARD = {"online-speculative": 1.1, "vocab-trim": 1.1, "blockwise-parallel": 1.15,
                          "blockwise-draft-refinement": 1.15, "ppd": 1.1,
                          "longspec": 1.1}
"""Methods drafting with the 4-layer distilled draft model instead of a head reach about 1.2 tokens per target
forward on these prompts (the registry's direct-alignment figure), and blockwise decoding verifies one chain (the
paper's single block; measured 1.24 at these settings), where the tree heads reach 1.4-1.6; the default is 1.3. PPD
sizes its tree from the verify-cost curve the running process measures: under the test run's load it picks 2 nodes
with 1 prompt token (measured 1.19 here; uncontended, 5 nodes with 2 prompt tokens reach 1.38, results/ppd_eval.json). The shipped LongSpec layer was
trained at the small budget (held-out top-1 .18): 1.27 tokens per forward on short prompts (results/longspec_eval.json)."""
MODEL_CARDS = Path(__file__).parent.parent / "model_cards"


@pytest.fixture(scope="module")
def greedy_refs(smollm):
    model, tokenizer = smollm
    return greedy_references(model, tokenizer, interleaved_prompts(N_PROMPTS), MAX_NEW_TOKENS)


def test_trained_drafters_are_registered():
    assert {m.name for m in TRAINED} == set(EXPECTED_CLASS)
    assert all(m.lossless and m.needs_training and m.kind == "candidate_generator" for m in TRAINED)


@pytest.mark.real_model
@pytest.mark.parametrize("spec", TRAINED, ids=lambda m: m.name)
def test_greedy_token_identical_over_benchmark_prompts(spec, smollm, greedy_refs):
    model, tokenizer = smollm
    kwargs = generate_kwargs(spec, model=model, tokenizer=tokenizer, max_nodes=PINNED_NODES)
    loop = kwargs["custom_generate"]
    assert type(loop.drafter).__name__ == EXPECTED_CLASS[spec.name]
    r = greedy_parity(model, kwargs, greedy_refs, MAX_NEW_TOKENS)
    mismatches, tokens, forwards, accepted = r.mismatches, r.tokens, r.forwards, r.accepted
    assert not mismatches, f"{spec.name}: output differs from greedy generate() on {mismatches}"
    # the trained drafter's drafts are used: clearly more than one token per target forward (measured 1.4-1.6 for
    # the shipped heads on these prompts at 5 nodes)
    assert accepted > 0 and tokens / forwards > MIN_TOKENS_PER_FORWARD.get(spec.name, 1.3), (spec.name, tokens, forwards)


@pytest.mark.parametrize("kind", sorted(SHIPPED))
def test_shipped_checkpoint_is_small_safetensors_with_a_model_card(kind):
    folder = shipped_head_path(kind)
    files = {p.name for p in folder.iterdir()}
    assert {"config.json", "model.safetensors", "README.md"} <= files
    assert not any(Path(f).suffix in (".bin", ".pt", ".pth", ".pkl") for f in files)
    assert (folder / "model.safetensors").stat().st_size < 20 * 2 ** 20
    cfg = json.loads((folder / "config.json").read_text())
    assert cfg["base_model_name_or_path"] == "smollm2-135m-instruct" or "SmolLM2" in cfg["base_model_name_or_path"]
    assert cfg["head_accuracies"] and cfg["tree_choices"] and cfg["training"]["steps"] > 0
    card = (MODEL_CARDS / f"{SHIPPED[kind]}.md").read_text()
    assert card == (folder / "README.md").read_text()
    for section in ("Base model", "Training data", "Training", "Acceptance", "Speed", "License", "Intended use"):
        assert section in card, (kind, section)
    # the card quotes the measured per-depth top-1 accuracies of the checkpoint
    assert f"{cfg['head_accuracies'][0][0]:.3f}" in card


def test_load_by_hub_id_offline_from_a_local_cache(tmp_path):
    """A cache laid out as huggingface_hub lays out a download, HF_HUB_OFFLINE=1, no network: ``from_pretrained``
    by Hub id gives the shipped weights."""
    repo_id = "hf-decoding-ext/smollm2-135m-instruct-medusa"
    snapshot = seed_hub_cache("medusa", repo_id, tmp_path / "hub")
    assert (snapshot / "model.safetensors").resolve().parent.name == "blobs"
    code = f"""
import torch
from hf_decoding_ext.speculative.heads.medusa import MedusaHeads
from hf_decoding_ext.speculative.drafters.medusa import MedusaDrafter
from hf_decoding_ext.speculative.drafters.feature_head import shipped_head_path
a = MedusaHeads.from_pretrained({repo_id!r})
b = MedusaHeads.from_pretrained(str(shipped_head_path("medusa")))
assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))
assert MedusaDrafter({repo_id!r}).head.config.tree_choices == b.config.tree_choices
print("OK")
"""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HUB_CACHE": str(tmp_path / "hub"),
           "HF_HOME": str(tmp_path / "home"), "HF_HUB_DISABLE_TELEMETRY": "1"}
    res = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0 and "OK" in res.stdout, res.stderr[-2000:]
    # an id absent from the cache fails offline instead of reaching the network
    bad = code.replace(repo_id, "hf-decoding-ext/not-cached")
    res = subprocess.run([sys.executable, "-c", bad], env=env, capture_output=True, text=True, timeout=300)
    assert res.returncode != 0


def test_publish_is_one_command_dry_run():
    from hf_decoding_ext.cli import main

    assert publish("eagle", "me/smollm2-eagle", dry_run=True) == ["config.json", "model.safetensors", "README.md"]
    assert main(["publish", "medusa", "--repo-id", "me/x", "--dry-run"]) == 0
    with pytest.raises(ValueError):
        publish("medusa", "no-slash", dry_run=True)
