"""VocabTrim (arXiv 2506.22694): the shared transform and the drafter, on tiny models (+ the committed results)."""

import json
from pathlib import Path

import pytest
import torch

from hf_decoding_ext.speculative import SpeculativeDecoding
from hf_decoding_ext.speculative.drafters.direct_alignment import init_draft
from hf_decoding_ext.speculative.drafters.vocab_trim import VocabTrimDrafter
from hf_decoding_ext.speculative.vocab_trim import (
    TRANSFORMS,
    TrimmedLMHead,
    VocabTrim,
    get_transform,
    register_transform,
    select_vocab,
    target_token_counts,
    token_counts,
)

RESULTS = Path(__file__).resolve().parents[1] / "results" / "vocab_trim_eval.json"


def test_counts_and_selection():
    counts = token_counts([[1, 2, 2, 3], torch.tensor([2, 3])], 5)
    assert counts.tolist() == [0, 1, 3, 2, 0]
    ids, cov = select_vocab(counts, 2)
    assert ids.tolist() == [2, 3] and cov == pytest.approx(5 / 6)
    assert torch.equal(ids, counts.argsort(descending=True)[:2])  # the pipeline's historical selection
    with pytest.raises(ValueError, match="size"):
        select_vocab(counts, 6)
    with pytest.raises(ValueError, match="token ids"):
        token_counts([[7]], 5)


def test_target_counts_from_the_committed_target_responses():
    counts = target_token_counts(49152)
    assert counts.sum() > 10_000
    ids, cov = select_vocab(counts, 8192)
    assert cov > 0.99


def test_trimmed_head_equals_the_full_rows_and_is_minus_inf_elsewhere():
    torch.manual_seed(0)
    head = torch.nn.Linear(8, 20, bias=True)
    ids = torch.tensor([5, 0, 17, 3])
    trimmed = TrimmedLMHead(head, ids)
    h = torch.randn(2, 3, 8)
    full, out = head(h), trimmed(h)
    assert out.shape == full.shape
    torch.testing.assert_close(out[..., ids], full[..., ids])
    rest = torch.ones(20, dtype=torch.bool)
    rest[ids] = False
    assert torch.isinf(out[..., rest]).all() and (out[..., rest] < 0).all()
    assert set(out.argmax(-1).reshape(-1).tolist()) <= set(ids.tolist())
    assert trimmed.macs_per_token() / head.weight.numel() == pytest.approx(4 / 20)  # cost ~ K / V
    with pytest.raises(ValueError, match="repeats"):
        TrimmedLMHead(head, torch.tensor([1, 1]))


def test_view_trims_the_draft_only(tiny_llama):
    draft = init_draft(tiny_llama, 1)
    ids = torch.arange(10, 42)
    view = VocabTrim(ids).apply(draft)
    assert isinstance(view.get_output_embeddings(), TrimmedLMHead)
    assert isinstance(draft.get_output_embeddings(), torch.nn.Linear)  # the draft keeps its head
    assert isinstance(tiny_llama.get_output_embeddings(), torch.nn.Linear)  # and so does the target
    x = torch.tensor([[3, 4, 5, 6]])
    with torch.no_grad():
        a, b = draft(x).logits, view(x).logits
    torch.testing.assert_close(b[..., ids], a[..., ids])
    assert torch.isinf(b[..., :10]).all()
    with pytest.raises(ValueError, match="DraftHeadModel or a causal LM"):
        VocabTrim(ids).apply(object())


def test_head_trim_round_trips_d2t(tiny_llama, tmp_path):
    from hf_decoding_ext.speculative.heads.medusa import MedusaConfig, MedusaHeads

    torch.manual_seed(0)
    head = MedusaHeads(MedusaConfig(num_heads=2, hidden_size=32, vocab_size=128)).attach(tiny_llama)
    ids = torch.tensor([9, 4, 100, 7, 33])
    assert VocabTrim(ids).apply(head) is head
    assert torch.equal(head.d2t, ids) and head.draft_weight().shape == (5, 32)
    head.save_pretrained(tmp_path)
    back = MedusaHeads.from_pretrained(tmp_path)
    assert torch.equal(back.d2t, ids) and back.config.draft_vocab_size == 5


def test_transform_registry():
    assert get_transform("vocab-trim") is VocabTrim
    with pytest.raises(ValueError, match="already registered"):
        register_transform("vocab-trim", VocabTrim)
    with pytest.raises(ValueError, match="unknown transform"):
        get_transform("nope")
    register_transform("vocab-trim-copy", VocabTrim)
    TRANSFORMS.pop("vocab-trim-copy")


@pytest.mark.parametrize("arch", ["tiny_llama", "tiny_gpt2"])
def test_trimmed_draft_is_lossless_and_never_drafts_a_trimmed_token(arch, request):
    model = request.getfixturevalue(arch)
    counts = torch.arange(128)  # keep ids 127..64
    drafter = VocabTrimDrafter.for_model(model, drafter="self:1", size=64, calibration=counts, num_tokens=3)
    kept = set(drafter.token_ids.tolist())
    assert kept == set(range(64, 128)) and drafter.target_kind == "draft_model"
    loop = SpeculativeDecoding(drafter)
    for start in (3, 70, 90):
        ids = torch.tensor([[start, 4, 5, 66, 7]])
        ref = model.generate(ids, max_new_tokens=10, do_sample=False, pad_token_id=0)
        out = model.generate(ids, max_new_tokens=10, do_sample=False, pad_token_id=0, custom_generate=loop)
        assert torch.equal(out, ref)
    proposed = []
    orig = drafter.inner.propose

    def spy(state):
        d = orig(state)
        proposed.extend(d.tree.tokens.tolist())
        return d

    drafter.inner.propose = spy
    model.generate(torch.tensor([[3, 4, 5]]), max_new_tokens=10, do_sample=False, pad_token_id=0,
                   custom_generate=loop)
    assert proposed and set(proposed) <= kept
    full = VocabTrimDrafter.for_model(model, drafter="self:1", size=None)
    assert full.token_ids is None and full.target_kind is None
    m_trim, m_full = drafter.draft_macs_per_token(), full.draft_macs_per_token()
    assert m_trim["head"] * 2 == m_full["head"] and m_trim["layers"] == m_full["layers"]


def test_trimmed_head_drafter_is_lossless(tiny_llama):
    from hf_decoding_ext.speculative.drafters.medusa import MedusaDrafter
    from hf_decoding_ext.speculative.heads.medusa import MedusaConfig, MedusaHeads

    torch.manual_seed(0)
    heads = MedusaHeads(MedusaConfig(num_heads=2, hidden_size=32, vocab_size=128))
    drafter = VocabTrimDrafter(MedusaDrafter(heads, max_nodes=4), torch.arange(0, 128, 2))
    assert drafter.target_kind == "head" and drafter.draft_macs_per_token(tiny_llama)["head"] == 64 * 32
    loop = SpeculativeDecoding(drafter)
    ids = torch.tensor([[3, 4, 5, 6]])
    ref = tiny_llama.generate(ids, max_new_tokens=10, do_sample=False, pad_token_id=0)
    out = tiny_llama.generate(ids, max_new_tokens=10, do_sample=False, pad_token_id=0, custom_generate=loop)
    assert torch.equal(out, ref)
    with pytest.raises(ValueError, match="Drafter"):
        VocabTrimDrafter("not a drafter")


def test_pipeline_uses_the_transform():
    import inspect

    from hf_decoding_ext.training import pipeline

    src = inspect.getsource(pipeline.run_training)
    assert "select_vocab(" in src and "VocabTrim(" in src


def test_committed_results_show_lower_draft_cost_and_lossless_outputs():
    data = json.loads(RESULTS.read_text())
    vocab = data["settings"]["vocab"]
    for key, s in data["summary"].items():
        n = s["identical_to_greedy"].split("/")
        assert n[0] == n[1], key
        if not key.endswith(f"K={vocab}"):
            assert s["vs_full"]["head_macs_ratio"] < 1
    default = data["summary"]["distilled/K=8192"]["vs_full"]
    assert default["head_macs_ratio"] == pytest.approx(8192 / vocab, rel=1e-3)
    from hf_decoding_ext.registry import get_method  # the verdict: cheaper drafts at a small acceptance change

    cheaper = default["draft_ms_per_drafted_token_ratio"] < 1 and abs(default["acceptance_change"]) < 0.02
    assert get_method("vocab-trim").effect == ("reproduced" if cheaper else "not reproduced")
