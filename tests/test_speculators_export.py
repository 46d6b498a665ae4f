"""Export of the EAGLE/FSPAD drafter to vLLM's ``speculators`` format (and back) on tiny random models."""

from __future__ import annotations

import json
import os

import pytest
import torch
from safetensors.torch import load_file, save_file

from hf_decoding_ext.speculative.heads.eagle import EagleDrafterConfig, EagleDrafterModel
from hf_decoding_ext.speculative.heads.speculators_export import (
    EXTRA_PREFIX,
    SPECULATORS_FORMAT_VERSION,
    export_speculators,
    load_speculators,
)

H, V, D = 32, 128, 40
# key names of speculators' Eagle3DraftModel / vLLM's Eagle3LlamaForCausalLM (besides layers.0.*)
EAGLE3_KEYS = {"fc.weight", "norm.weight", "lm_head.weight", "embed_tokens.weight", "d2t", "t2d"}
LAYER_KEYS = {"input_layernorm.weight", "post_attention_layernorm.weight", "self_attn.q_proj.weight",
              "self_attn.k_proj.weight", "self_attn.v_proj.weight", "self_attn.o_proj.weight",
              "mlp.gate_proj.weight", "mlp.up_proj.weight", "mlp.down_proj.weight"}
FSPAD_KEYS = {"fs_feature.weight", "fs_embed.weight", "fs_out.weight", "logit_adapter.linear.weight",
              "logit_adapter.linear.bias"}


def _drafter(base, vocab_ids=None, seed=0) -> EagleDrafterModel:
    cfg = EagleDrafterConfig(hidden_size=H, vocab_size=V, num_draft_tokens=3)
    cfg.from_base_config(base.config)
    drafter = EagleDrafterModel(cfg).attach(base)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():  # random weights everywhere, FSPAD extras included (they start at zero)
        for p in drafter.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.3)
    if vocab_ids is None:
        vocab_ids = torch.randperm(V, generator=g)[:D]  # frequency order: not sorted by id
    drafter.set_draft_vocab(vocab_ids)
    return drafter.eval()


@pytest.fixture(scope="module")
def drafter(tiny_llama):
    return _drafter(tiny_llama)


@pytest.fixture(scope="module")
def exported(drafter, tmp_path_factory):
    """The EAGLE-3 storage layout, requested explicitly (the default is the EAGLE-1 type)."""
    out = tmp_path_factory.mktemp("eagle3")
    export_speculators(drafter, out, verifier_name_or_path="tiny-llama", verifier_architectures=["LlamaForCausalLM"],
                       speculators_model_type="eagle3")
    with open(out / "config.json") as f:
        return out, json.load(f), load_file(out / "model.safetensors")


def _draft(drafter, seed=1):
    """Predicted features and logits for random features / tokens (two rows, one padded)."""
    g = torch.Generator().manual_seed(seed)
    feats = torch.randn(2, 7, H, generator=g)
    ids = torch.randint(0, V, (2, 7), generator=g)
    valid = torch.ones(2, 7, dtype=torch.bool)
    valid[1, 5:] = False
    pos = torch.arange(7)[None].expand(2, -1)
    with torch.no_grad():
        pred = drafter(feats, ids, pos, drafter._causal_mask(valid))
        logits = drafter.logits_from(pred)
    return pred, logits, drafter.to_target(logits.topk(5, dim=-1).indices)


# ---------------------------------------------------------------------------------------------------- config
def test_default_type_is_eagle_1(drafter, tiny_llama, tmp_path):
    """The drafter reads one feature layer fused with the token embedding (EAGLE-1's architecture): without a
    type argument the export is speculators' EAGLE-1/HASS type with its config fields, none of EAGLE-3's."""
    export_speculators(drafter, tmp_path)
    cfg = json.loads((tmp_path / "config.json").read_text())
    assert cfg["speculators_model_type"] == "eagle"
    assert cfg["speculators_config"]["algorithm"] == "eagle"
    assert cfg["architectures"] == ["EagleSpeculator", "LlamaDecoderLayer"]
    assert cfg["transformer_layer_architecture"] == "LlamaDecoderLayer"
    assert cfg["layernorms"] is False and cfg["fusion_bias"] is True
    assert not {"draft_vocab_size", "norm_before_residual", "target_hidden_size",
                "eagle_aux_hidden_state_layer_ids"} & cfg.keys()
    assert cfg["transformer_layer_config"]["num_hidden_layers"] == 1
    t = load_file(tmp_path / "model.safetensors")
    assert t["fusion_fc.weight"].shape == (H, 2 * H)  # one feature + one embedding: EAGLE-1's fusion
    assert not {"fc.weight", "d2t", "t2d", "lm_head.weight"} & t.keys()
    _assert_same_drafter(load_speculators(tmp_path), drafter, tiny_llama)


def test_config_fields(exported, drafter):
    _, cfg, _ = exported
    assert cfg["speculators_model_type"] == "eagle3"
    assert cfg["architectures"] == ["Eagle3Speculator"]
    assert cfg["speculators_version"] == SPECULATORS_FORMAT_VERSION
    assert cfg["draft_vocab_size"] == D
    assert cfg["norm_before_residual"] is False and cfg["target_hidden_size"] == H
    sc = cfg["speculators_config"]
    assert sc["algorithm"] == "eagle3" and sc["default_proposal_method"] == "greedy"
    assert sc["proposal_methods"] == [{"proposal_type": "greedy", "speculative_tokens": 3, "verifier_accept_k": 1,
                                       "accept_tolerance": 0.0}]
    assert sc["verifier"] == {"name_or_path": "tiny-llama", "architectures": ["LlamaForCausalLM"]}
    tl = cfg["transformer_layer_config"]
    assert isinstance(tl, dict) and tl["model_type"] == "llama" and tl["num_hidden_layers"] == 1
    lc = drafter.config.llama_config()
    for key in ("hidden_size", "vocab_size", "intermediate_size", "num_attention_heads", "num_key_value_heads",
                "head_dim", "rms_norm_eps", "max_position_embeddings", "hidden_act"):
        assert tl[key] == getattr(lc, key), key
    assert tl["rope_theta"] == tl["rope_parameters"]["rope_theta"] == 10000.0
    assert tl["vocab_size"] == V  # the verifier vocabulary; the draft vocabulary is draft_vocab_size
    assert cfg["hf_decoding_ext"]["drafter_class"] == "EagleDrafterModel"
    # what vLLM's SpeculatorsConfig reads: method and num_speculative_tokens
    assert (cfg["speculators_model_type"], sc["proposal_methods"][0]["speculative_tokens"]) == ("eagle3", 3)


def test_config_defaults_and_overrides(drafter, tmp_path):
    drafter.config.base_model_name_or_path = "org/base"
    try:
        export_speculators(drafter, tmp_path, speculative_tokens=5)
    finally:
        drafter.config.base_model_name_or_path = None
    cfg = json.loads((tmp_path / "config.json").read_text())
    assert cfg["speculators_config"]["verifier"] == {"name_or_path": "org/base", "architectures": []}
    assert cfg["speculators_config"]["proposal_methods"][0]["speculative_tokens"] == 5
    loaded = load_speculators(tmp_path)  # the speculators fields map back
    assert loaded.config.num_draft_tokens == 5 and loaded.config.base_model_name_or_path == "org/base"


# ---------------------------------------------------------------------------------------------------- weights
def test_weight_names_and_shapes(exported, tiny_llama):
    _, _, t = exported
    q_out = 4 * 8  # heads x head_dim
    kv_out = 2 * 8
    expected = {
        "fc.weight": (H, 2 * H),  # EAGLE-3 would be (H, 3H): documented incompatibility
        "lm_head.weight": (D, H),
        "embed_tokens.weight": (V, H),
        "d2t": (D,),
        "t2d": (V,),
        "layers.0.input_layernorm.weight": (H,),
        "layers.0.post_attention_layernorm.weight": (H,),
        "layers.0.self_attn.q_proj.weight": (q_out, H),
        "layers.0.self_attn.k_proj.weight": (kv_out, H),
        "layers.0.self_attn.v_proj.weight": (kv_out, H),
        "layers.0.self_attn.o_proj.weight": (H, q_out),
        "layers.0.mlp.gate_proj.weight": (64, H),
        "layers.0.mlp.up_proj.weight": (64, H),
        "layers.0.mlp.down_proj.weight": (H, 64),
        EXTRA_PREFIX + "draft_order": (D,),
        EXTRA_PREFIX + "fc.bias": (H,),
        EXTRA_PREFIX + "fs_feature.weight": (H, H),
        EXTRA_PREFIX + "fs_embed.weight": (H, H),
        EXTRA_PREFIX + "fs_out.weight": (H, H),
        EXTRA_PREFIX + "logit_adapter.linear.weight": (H, H),
        EXTRA_PREFIX + "logit_adapter.linear.bias": (H,),
    }
    assert {k: tuple(v.shape) for k, v in t.items()} == expected
    # every key outside our prefix is an EAGLE-3 key name
    standard = {k for k in t if not k.startswith(EXTRA_PREFIX)}
    assert standard <= EAGLE3_KEYS | {"layers.0." + k for k in LAYER_KEYS}
    assert t["d2t"].dtype == torch.int64 and t["t2d"].dtype == torch.bool
    assert torch.equal(t["embed_tokens.weight"], tiny_llama.get_input_embeddings().weight)


def test_d2t_t2d_convention(exported, drafter, tiny_llama):
    _, _, t = exported
    ours = drafter.d2t
    ascending = torch.sort(ours).values
    assert not torch.equal(ours, ascending)  # the test vocabulary is in frequency order, not id order
    # EAGLE-3: target id = draft index + d2t[draft index], over the ids in ascending order
    assert torch.equal(torch.arange(D) + t["d2t"], ascending)
    # t2d: boolean mask of the draft vocabulary over the target vocabulary
    assert int(t["t2d"].sum()) == D and torch.equal(t["t2d"].nonzero().reshape(-1), ascending)
    # speculators' load_verifier_weights: lm_head = verifier lm_head[t2d]
    assert torch.equal(t["lm_head.weight"], tiny_llama.get_output_embeddings().weight[t["t2d"]])
    # our index j sits at exported row draft_order[j]
    assert torch.equal(ascending[t[EXTRA_PREFIX + "draft_order"]], ours)
    # vLLM's compute_logits: logits over the draft rows scattered to arange(D) + d2t, -inf elsewhere
    x = torch.randn(5, H, generator=torch.Generator().manual_seed(3))
    full = torch.full((5, V), float("-inf"))
    full[:, torch.arange(D) + t["d2t"]] = x @ t["lm_head.weight"].T
    mine = torch.full((5, V), float("-inf"))
    mine[:, ours] = drafter.draft_logits(x)
    torch.testing.assert_close(full, mine, rtol=0, atol=1e-6)


# ---------------------------------------------------------------------------------------------------- round trip
def _assert_same_drafter(loaded, drafter, base):
    assert loaded.config.to_dict() == drafter.config.to_dict()
    a, b = loaded.state_dict(), drafter.state_dict()
    assert a.keys() == b.keys()
    for k in a:
        assert a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]), k
    assert torch.equal(loaded.d2t, drafter.d2t)
    loaded.attach(base).eval()
    for x, y in zip(_draft(loaded), _draft(drafter)):
        assert torch.equal(x, y)


@pytest.mark.parametrize("layout", ["eagle3", "eagle"])
def test_round_trip(drafter, tiny_llama, tmp_path, layout):
    export_speculators(drafter, tmp_path, speculators_model_type=layout)
    _assert_same_drafter(load_speculators(tmp_path), drafter, tiny_llama)


def test_round_trip_gpt2_base_full_vocab_unattached(tiny_gpt2, tmp_path):
    """Another architecture, an untrimmed (permuted) vocabulary and an unattached drafter (no base weights)."""
    drafter = _drafter(tiny_gpt2, vocab_ids=torch.randperm(V, generator=torch.Generator().manual_seed(5)))
    unattached = EagleDrafterModel(drafter.config)
    unattached.load_state_dict(drafter.state_dict())
    export_speculators(unattached, tmp_path, speculators_model_type="eagle3")  # EAGLE-3's vocabulary convention
    t = load_file(tmp_path / "model.safetensors")
    assert not {"d2t", "t2d", "lm_head.weight", "embed_tokens.weight"} & t.keys()  # D == V: no vocabulary maps
    assert json.loads((tmp_path / "config.json").read_text())["draft_vocab_size"] == V
    _assert_same_drafter(load_speculators(tmp_path), drafter, tiny_gpt2)


def test_eagle_layout(drafter, tmp_path):
    export_speculators(drafter, tmp_path, verifier_name_or_path="tiny-llama", speculators_model_type="eagle")
    cfg = json.loads((tmp_path / "config.json").read_text())
    assert cfg["speculators_model_type"] == "eagle" and cfg["speculators_config"]["algorithm"] == "eagle"
    assert cfg["architectures"] == ["EagleSpeculator", "LlamaDecoderLayer"]
    assert cfg["transformer_layer_architecture"] == "LlamaDecoderLayer"
    assert cfg["layernorms"] is False and cfg["fusion_bias"] is True and "draft_vocab_size" not in cfg
    t = load_file(tmp_path / "model.safetensors")
    assert t["fusion_fc.weight"].shape == (H, 2 * H) and t["fusion_fc.bias"].shape == (H,)
    assert {k for k in t if k.startswith("transformer.")} == {"transformer." + k for k in LAYER_KEYS}
    assert {k[len(EXTRA_PREFIX):] for k in t if k.startswith(EXTRA_PREFIX)} == FSPAD_KEYS | {"d2t"}
    assert torch.equal(t[EXTRA_PREFIX + "d2t"], drafter.d2t)
    assert not {"lm_head.weight", "embed_tokens.weight", "fc.weight"} & t.keys()


# ---------------------------------------------------------------------------------------------------- errors
def test_bad_arguments(drafter, tiny_llama, exported, tmp_path):
    with pytest.raises(ValueError):
        export_speculators(drafter, tmp_path / "a", speculators_model_type="eagle2")
    with pytest.raises(ValueError):
        export_speculators(drafter, tmp_path / "b", speculative_tokens=0)
    with pytest.raises(ValueError):
        export_speculators(tiny_llama, tmp_path / "c")
    with pytest.raises(ValueError):
        load_speculators(tmp_path / "missing")
    out, cfg, tensors = exported
    # a native EAGLE-3 config (no hf_decoding_ext block) cannot become an EagleDrafterModel
    native = {k: v for k, v in cfg.items() if k != "hf_decoding_ext"}
    os.makedirs(tmp_path / "native")
    (tmp_path / "native" / "config.json").write_text(json.dumps(native))
    with pytest.raises(ValueError, match="not written by export_speculators"):
        load_speculators(tmp_path / "native")
    # inconsistent geometry / vocabulary maps
    bad = json.loads(json.dumps(cfg))
    bad["transformer_layer_config"]["intermediate_size"] = 128
    os.makedirs(tmp_path / "bad")
    (tmp_path / "bad" / "config.json").write_text(json.dumps(bad))
    with pytest.raises(ValueError, match="intermediate_size"):
        load_speculators(tmp_path / "bad")
    os.makedirs(tmp_path / "maps")
    (tmp_path / "maps" / "config.json").write_text(json.dumps(cfg))
    t2d = tensors["t2d"].clone()
    t2d[int(torch.nonzero(~t2d)[0])] = True
    save_file({**tensors, "t2d": t2d}, tmp_path / "maps" / "model.safetensors")
    with pytest.raises(ValueError, match="d2t and t2d"):
        load_speculators(tmp_path / "maps")
