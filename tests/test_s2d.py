"""S2D (arXiv 2407.01955): the SoFT objective and its batches, the sorted draft (adapter folded into copied layers),
the adaptive-exit drafter (exact lazy KV of early exits, lossless on the engine for any target sharing the
tokenizer), and a seconds-long SoFT fine-tune of a tiny model that lowers every sub-model's loss and makes each
sorted sub-model accept more than the same-depth untrained truncation."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from conftest import _char_tokenizer, perturbed_copy
from transformers import GenerationConfig, LogitsProcessorList

from hf_decoding_ext.core.anatomy import early_exit
from hf_decoding_ext.speculative import SpeculativeDecoding
from hf_decoding_ext.speculative.s2d import (
    DEFAULT_DEPTHS,
    PAPER_FIDELITY,
    S2DDrafter,
    build_sorted_draft,
    export_sorted_adapter,
    s2d_batches,
    soft_exit_logits,
    soft_loss,
)
from hf_decoding_ext.training.finetune import (
    OBJECTIVES,
    FineTuneConfig,
    finetune,
    resolve_objective,
)

DEPTHS = (1, 2, 4)
PROMPTS = ([13, 14, 15, 16], [40, 77, 5], [90, 91, 92, 93, 94, 95, 96], [7])


def _tiny(kind="llama", layers=6):
    from transformers import (
        GPT2Config,
        GPT2LMHeadModel,
        LlamaConfig,
        LlamaForCausalLM,
        Qwen2Config,
        Qwen2ForCausalLM,
    )

    torch.manual_seed(0)
    common = {"vocab_size": 128, "bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 0}
    if kind == "gpt2":
        return GPT2LMHeadModel(GPT2Config(n_embd=32, n_layer=layers, n_head=4, **common)).eval()
    size = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=layers, num_attention_heads=4,
                num_key_value_heads=2, **common)
    cls, cfg = (Qwen2ForCausalLM, Qwen2Config) if kind == "qwen2" else (LlamaForCausalLM, LlamaConfig)
    return cls(cfg(**size)).eval()


def _greedy(model, prompt, **kw):
    x = torch.tensor([prompt])
    return model.generate(x, attention_mask=torch.ones_like(x), do_sample=False, pad_token_id=0, **kw)


def _two_counters(n=64, length=24):
    """Two interleaved counters (``a, b, a + 1, b + 1, ...``): the next token depends on the one two back, which the
    untrained shallow exits of a model trained on it do not read."""
    rows = []
    for i in range(n):
        a, b = (i * 7) % 100, (i * 13 + 50) % 100
        rows.append({"input_ids": [3 + ((a if j % 2 == 0 else b) + j // 2) % 100 for j in range(length)],
                     "response_start": 4})
    return rows


@pytest.fixture(scope="module")
def target(tmp_path_factory):
    """A tiny 6-layer Llama trained (full, 100 steps, a few seconds) on two interleaved counters: its greedy outputs
    are the self-distillation data of the SoFT fine-tune."""
    model = _tiny()
    cfg = FineTuneConfig(steps=100, batch_size=16, lr=5e-3, mode="full", warmup=5, max_length=32, log_every=1000,
                         checkpoint_every=10_000)
    torch.manual_seed(0)
    return finetune(model, None, _two_counters(), None, tmp_path_factory.mktemp("target"), cfg, progress=False,
                    resume=False).eval()


def _self_data(model, n=48):
    """The target's own greedy continuations of 4-token prompts (self-distillation), one batched generate."""
    x = torch.tensor([r["input_ids"][:4] for r in _two_counters(n)])
    out = model.generate(x, attention_mask=torch.ones_like(x), do_sample=False, max_new_tokens=20, pad_token_id=0)
    return [{"input_ids": r.tolist(), "response_start": 4} for r in out]


TRAINED = [r["input_ids"][:4] for r in _two_counters(48)[40:42]]  # prompts of the fine-tuning data


@pytest.fixture(scope="module")
def sorted_run(target, tmp_path_factory):
    """SoFT LoRA fine-tune of a copy of ``target`` (depths 1, 2, 4 of 6 layers), the adapter exported and folded into
    a sorted draft; returns ``(draft, losses_before, losses_after, adapter_dir)``."""
    import copy

    data = _self_data(target)
    cfg = FineTuneConfig(steps=80, batch_size=16, lr=1e-2, mode="lora", lora_rank=8, warmup=5, max_length=32,
                         log_every=1000, checkpoint_every=10_000)
    stream = s2d_batches(data, cfg, _char_tokenizer(), depths=DEPTHS)
    probe = next(iter(stream(123)))
    with torch.no_grad():
        before = soft_loss(target, probe)[1]
    model = copy.deepcopy(target)
    out = tmp_path_factory.mktemp("soft")
    torch.manual_seed(0)
    tuned = finetune(model, None, stream, soft_loss, out, cfg, progress=False, resume=False)
    with torch.no_grad():
        after = soft_loss(tuned, probe)[1]
    exported = export_sorted_adapter(out, tmp_path_factory.mktemp("export"), depths=DEPTHS)
    draft = build_sorted_draft(target, DEPTHS, exported)
    return draft, before, after, exported, tuned


# ------------------------------------------------------------------------------------------------ objective
def test_objective_registered():
    assert OBJECTIVES["s2d"] == (soft_loss, s2d_batches)
    assert resolve_objective("s2d") == (soft_loss, s2d_batches)
    assert DEFAULT_DEPTHS == (6, 9, 12) and len(PAPER_FIDELITY) >= 5


def test_batches_and_loss_by_hand():
    """Batches carry the depths; the loss is the mean of the sub-models' cross-entropies computed by hand."""
    model = _tiny()
    cfg = FineTuneConfig(batch_size=2, max_length=16)
    seqs = [{"input_ids": [5, 6, 7, 8, 9], "response_start": 2}, {"input_ids": [10, 11, 12], "response_start": 1}]
    batch = next(iter(s2d_batches(seqs, cfg, _char_tokenizer(), depths=(1, 3))(0)))
    assert batch["s2d_depths"].tolist() == [1, 3]
    assert batch["input_ids"].shape == (2, 5)
    loss, metrics = soft_loss(model, batch)
    assert metrics["tokens"] == 3 + 2
    manual = []
    for d in (1, 3):
        view = early_exit(model, d)
        ce = []
        for r, seq in enumerate(seqs):
            ids = torch.tensor([seq["input_ids"]])
            logits = view(input_ids=ids, use_cache=False).logits[0].float()
            for t in range(seq["response_start"], len(seq["input_ids"])):
                ce.append(-torch.log_softmax(logits[t - 1], -1)[seq["input_ids"][t]])
        manual.append(torch.stack(ce).mean())
        assert metrics[f"loss_l{d}"] == pytest.approx(float(manual[-1]), rel=1e-5)
    assert float(loss) == pytest.approx(float(torch.stack(manual).mean()), rel=1e-5)
    with pytest.raises(ValueError, match="strictly increasing"):
        soft_loss(model, batch, depths=(3, 1))
    with pytest.raises(ValueError, match="exceed"):
        soft_exit_logits(model, batch["input_ids"], depths=(1, 7))


# ------------------------------------------------------------------------------------------------ fine-tune
def test_soft_lowers_every_submodel_loss(sorted_run):
    _, before, after, _, _ = sorted_run
    for d in DEPTHS:
        assert after[f"loss_l{d}"] < 0.85 * before[f"loss_l{d}"], (d, before, after)


def test_sorted_draft_equals_fine_tuned_layers(sorted_run, target):
    """The exported adapter (layers below the deepest depth only) folded into copied layers gives the fine-tuned
    model's sub-model logits; the target is unchanged (embeddings and head shared, layers copied)."""
    draft, _, _, exported, tuned = sorted_run
    from safetensors.torch import load_file

    names = load_file(str(exported / "adapter.safetensors"))
    assert names and all(int(n.split("layers.")[1].split(".")[0]) < DEPTHS[-1] for n in names)
    ids = torch.tensor([[5, 9, 14, 22, 30, 31]])
    with torch.no_grad():
        a = soft_exit_logits(draft, ids, depths=DEPTHS)
        b = soft_exit_logits(tuned, ids, depths=DEPTHS)
    for d in DEPTHS:
        torch.testing.assert_close(a[d], b[d], atol=1e-4, rtol=1e-4)
    assert draft.get_input_embeddings().weight.data_ptr() == target.get_input_embeddings().weight.data_ptr()
    assert draft.model.layers[0].mlp.up_proj.weight.data_ptr() != target.model.layers[0].mlp.up_proj.weight.data_ptr()
    assert draft.config.s2d["depths"] == list(DEPTHS)


_REFS: dict = {}


def _ref(model, p, n):
    key = (id(model), tuple(p), n)
    if key not in _REFS:
        _REFS[key] = _greedy(model, p, max_new_tokens=n)
    return _REFS[key]


def _acceptance(model, drafter, prompts=TRAINED, n=16):
    """(accepted / drafted, tokens per target forward), checking the output equals greedy decoding."""
    loop = SpeculativeDecoding(drafter)
    drafted = accepted = forwards = tokens = 0
    for p in prompts:
        out = _greedy(model, p, max_new_tokens=n, custom_generate=loop)
        assert torch.equal(out, _ref(model, p, n))  # lossless
        s = loop.summary()
        drafted += sum(st.draft_size for st in loop.last_stats)
        accepted += sum(st.accepted for st in loop.last_stats)
        forwards += s["steps"]
        tokens += s["tokens"]
    return accepted / max(1, drafted), tokens / forwards


def test_sorted_submodels_beat_untrained_truncations(sorted_run, target):
    """Each sorted sub-model (fixed depth) accepts more than the same-depth untrained truncation of the target, and
    gives more than 1 token per target forward."""
    draft = sorted_run[0]
    for d in DEPTHS:
        acc_sorted, tpf = _acceptance(target, S2DDrafter(draft, depths=(d,), num_tokens=4))
        acc_self, _ = _acceptance(target, S2DDrafter("self", depths=(d,), num_tokens=4))
        assert acc_sorted > acc_self, (d, acc_sorted, acc_self)
        assert tpf > 1.5, (d, tpf)


def _mid_threshold(draft, model):
    """The median top probability of the shallowest sorted sub-model along the target's greedy outputs: a threshold
    that lets about half of the tokens exit there."""
    conf = []
    for p in TRAINED:
        with torch.no_grad():
            logits = soft_exit_logits(draft, _ref(model, p, 16), depths=DEPTHS[:1])[DEPTHS[0]]
        conf.append(torch.softmax(logits, -1).max(-1).values)
    return float(torch.cat(conf).median())


def test_adaptive_exit_follows_threshold(sorted_run, target):
    draft = sorted_run[0]
    mid = _mid_threshold(draft, target)
    counts = {}
    for th in (0.0, mid, 1.5):
        d = S2DDrafter(draft, depths=DEPTHS, threshold=th, num_tokens=4)
        _acceptance(target, d)
        counts[th] = d.last_stats["depth_counts"]
    assert set(counts[0.0]) == set(DEPTHS)
    assert counts[0.0][1] > 0 and counts[0.0][2] == counts[0.0][4] == 0  # always the shallowest
    assert counts[1.5][4] > 0 and counts[1.5][1] == counts[1.5][2] == 0  # above 1: always the deepest
    assert counts[mid][1] > 0 and counts[mid][2] + counts[mid][4] > 0  # a mid threshold mixes exits
    mean = {th: sum(k * v for k, v in c.items()) / sum(c.values()) for th, c in counts.items()}
    assert mean[0.0] < mean[mid] < mean[1.5]


# ------------------------------------------------------------------------------------------------ mechanism
def _state(model, ids):
    ids = torch.tensor([ids])
    return SimpleNamespace(model=model, input_ids=ids, attention_mask=torch.ones_like(ids), do_sample=False,
                           logits_processor=LogitsProcessorList(),
                           generation_config=GenerationConfig(max_length=ids.shape[1] + 50))


def _reference_draft(draft, ids, depths, threshold, k):
    """Cache-free reference: each token from the shallowest sub-model (a full recompute of its early exit over the
    whole sequence) whose top probability reaches ``threshold``."""
    ids, toks, chosen = list(ids), [], []
    for _ in range(k):
        x = torch.tensor([ids])
        for j, d in enumerate(depths):
            logits = early_exit(draft, d)(input_ids=x, use_cache=False).logits[0, -1].float()
            if j + 1 == len(depths) or float(torch.softmax(logits, -1).max()) >= threshold:
                break
        chosen.append(d)
        toks.append(int(logits.argmax()))
        ids.append(toks[-1])
    return toks, chosen


def test_lazy_kv_of_early_exits_is_exact(sorted_run, target):
    """Drafts with mixed exit depths, across steps whose committed tokens diverge from the draft (crops), equal a
    cache-free recompute of every sub-model on the whole sequence."""
    draft = sorted_run[0]
    base = _ref(target, TRAINED[0], 16)[0, :8].tolist()
    mid = _mid_threshold(draft, target)
    mixed = set()
    for th in (0.8 * mid, mid, 1.2 * mid):
        drafter = S2DDrafter(draft, depths=DEPTHS, threshold=th, num_tokens=5)
        drafter.begin(_state(draft, base))
        seq = list(base)
        for step in range(5):
            with torch.no_grad():
                tokens = drafter.propose(_state(draft, seq)).tree.tokens.tolist()
                ref, chosen = _reference_draft(draft, seq, DEPTHS, th, 5)
            assert tokens == ref, (th, step)
            mixed |= set(chosen)
            keep = step % 3  # accept a prefix of the draft, then a token the draft did not propose
            seq = seq + tokens[:keep] + [(tokens[keep] + 17) % 128]
    assert len(mixed) >= 2  # the check covered tokens exiting at different depths


@pytest.mark.parametrize("kind", ["llama", "qwen2", "gpt2"])
@pytest.mark.parametrize("threshold", [0.0, 0.03, 2.0])
def test_lossless_untrained(kind, threshold):
    model = _tiny(kind)
    loop = SpeculativeDecoding(S2DDrafter("self", depths=(1, 3, 6), threshold=threshold, num_tokens=3))
    for prompt in PROMPTS[:2]:
        for n in (1, 13):
            assert torch.equal(_greedy(model, prompt, max_new_tokens=n, custom_generate=loop),
                               _greedy(model, prompt, max_new_tokens=n)), (prompt, n)
        assert sum(s.draft_size for s in loop.last_stats) > 0  # it drafted
        if threshold > 1:  # always the deepest sub-model, here the whole target: every draft token accepted
            assert loop.summary()["tokens_per_forward"] > 2


def test_multi_target_and_sampling(sorted_run, target):
    """One sorted draft serves a second target (a perturbed fine-tune sharing the tokenizer, with one added token):
    greedy output identical to that target's; sampling runs through the exact rule and reproduces with a seed."""
    draft = sorted_run[0]
    second = perturbed_copy(target, 0.05)
    second.resize_token_embeddings(129, mean_resizing=False)
    drafter = S2DDrafter(draft, threshold=0.8, num_tokens=4)
    loop = SpeculativeDecoding(drafter)
    for model in (target, second):
        for p in TRAINED:
            assert torch.equal(_greedy(model, p, max_new_tokens=16, custom_generate=loop), _ref(model, p, 16))
        assert loop.summary()["tokens_per_forward"] > 1
    seeded = SpeculativeDecoding(drafter, seed=0)
    x = torch.tensor([TRAINED[0]])
    kw = {"attention_mask": torch.ones_like(x), "do_sample": True, "max_new_tokens": 12, "pad_token_id": 0,
          "top_k": 0, "custom_generate": seeded}
    runs = []
    for _ in range(2):
        torch.manual_seed(0)  # the drafter samples from torch's generator, the acceptance rule from the seeded one
        runs.append(second.generate(x, **kw))
    assert torch.equal(runs[0], runs[1]) and runs[0].shape[1] == x.shape[1] + 12
    assert sum(s.draft_size for s in seeded.last_stats) > 0


def test_argument_validation(target, tmp_path):
    for bad in (-0.1, float("nan"), True, "0.5"):
        with pytest.raises(ValueError, match="threshold"):
            S2DDrafter(threshold=bad)
    for bad in (0, -1, 2.5, True):
        with pytest.raises(ValueError, match="num_tokens"):
            S2DDrafter(num_tokens=bad)
    for bad in ((), (2, 2), (3, 1), (0, 2), (1.5,), 4):
        with pytest.raises(ValueError, match="depths"):
            S2DDrafter(depths=bad)
    with pytest.raises(ValueError, match="draft must be"):
        S2DDrafter(draft=3)
    with pytest.raises(ValueError, match="exceed"):
        _greedy(target, PROMPTS[0], max_new_tokens=4,
                custom_generate=SpeculativeDecoding(S2DDrafter("self", depths=(2, 9))))
    small = _tiny(layers=2)
    small.resize_token_embeddings(200, mean_resizing=False)
    with pytest.raises(ValueError, match="smaller than the draft"):
        _greedy(target, PROMPTS[0], max_new_tokens=4,
                custom_generate=SpeculativeDecoding(S2DDrafter(small, depths=(1, 2))))
    with pytest.raises(ValueError, match="batch"):
        x = torch.tensor([PROMPTS[0], PROMPTS[0]])
        target.generate(x, attention_mask=torch.ones_like(x), do_sample=False, max_new_tokens=4, pad_token_id=0,
                        custom_generate=SpeculativeDecoding(S2DDrafter("self", depths=(1, 2))))
    with pytest.raises(ValueError, match="no S2D adapter"):
        build_sorted_draft(target, (1, 2), tmp_path)


# ------------------------------------------------------------------------------------------------ real model
RESULTS = Path(__file__).resolve().parents[1] / "results"


@pytest.mark.real_model
def test_real_model_shipped_sorted_draft_lossless_above_one_token_per_forward(smollm):
    """The shipped SoFT draft (hf_decoding_ext/data/finetuned/s2d) on the default model, adaptive exit at the default
    threshold: output identical to greedy generate() on 2 benchmark prompts x 24 tokens, more than one token per
    target forward, and the sorted 6-layer sub-model accepts more than the untrained 6-layer truncation there."""
    from hf_decoding_ext.bench.prompts import load_prompts
    from hf_decoding_ext.core.models import encode_prompts
    from hf_decoding_ext.speculative.s2d import load_s2d_draft

    model, tok = smollm
    draft = load_s2d_draft(model)
    assert draft.config.s2d["depths"] == list(DEFAULT_DEPTHS)
    loops = {"s2d": SpeculativeDecoding(S2DDrafter(draft)),
             "sorted:6": SpeculativeDecoding(S2DDrafter(draft, depths=(6,))),
             "self:6": SpeculativeDecoding(S2DDrafter("self", depths=(6,)))}
    tally = {k: [0, 0, 0] for k in loops}  # tokens, forwards, accepted
    for row in load_prompts(per_category=1)[:2]:
        enc = encode_prompts(tok, row["prompt"])
        ref = model.generate(**enc, max_new_tokens=24, do_sample=False)
        for name, loop in loops.items():
            out = model.generate(**enc, max_new_tokens=24, do_sample=False, custom_generate=loop)
            assert torch.equal(out, ref), name
            st = loop.last_stats
            tally[name][0] += sum(s.appended for s in st)
            tally[name][1] += len(st)
            tally[name][2] += sum(s.accepted for s in st)
    assert tally["s2d"][0] / tally["s2d"][1] > 1.0, tally
    assert tally["sorted:6"][2] > tally["self:6"][2], tally


def test_committed_results_decide_the_registry_verdict():
    """results/s2d_eval.json (scripts/eval_s2d.py) and results/s2d_speed.json (scripts/bench_speed.py --s2d): every
    configuration identical to its target's greedy output (both targets), each sorted sub-model accepts more than the
    same-depth untrained truncation, S2D takes more than one token per target forward on both targets. The registry's
    effect (the paper's claim: one sorted draft speeds up decoding of its targets) is "reproduced" exactly when S2D
    beats greedy with the same kernels in every timing pass."""
    import json

    from hf_decoding_ext.registry import get_method

    ev = json.loads((RESULTS / "s2d_eval.json").read_text())
    props = ev["properties"]
    assert props["lossless"] and all(v["identical_all"] for v in ev["summary"].values())
    assert all(v["holds"] for v in props["sorted_above_untrained"].values()), props["sorted_above_untrained"]
    assert set(props["tokens_per_forward_above_1"]) == {"s2d:0.8", "second/s2d:0.8"}
    assert all(props["tokens_per_forward_above_1"].values())
    speed = json.loads((RESULTS / "s2d_speed.json").read_text())["methods"]["s2d"]["overall"]
    beats = speed["speed_ratio_same_kernel_min"] > 1.0
    assert get_method("s2d").effect == ("reproduced" if beats else "not reproduced")
