"""Momentum decoding (arXiv:2212.02175): unit tests on tiny models and the core property on the real model."""

from __future__ import annotations

import math
import time

import pytest
import torch

from hf_decoding_ext.sampling.momentum import RESISTANCE_FUNCTIONS, MomentumLogitsProcessor
from hf_decoding_ext.core.ngram import distinct_n, rep_n


def _scores(vocab, probs: dict[int, float]):
    """Logits whose softmax puts ``probs`` on the given tokens and the rest uniformly on the others."""
    rest = (1.0 - sum(probs.values())) / (vocab - len(probs))
    p = torch.full((vocab,), rest)
    for t, v in probs.items():
        p[t] = v
    return p.log().unsqueeze(0)


def _brute_depth(tokens, cand, n):
    """The authors' definition: longest m <= n with (last m-1 tokens + cand) already in the sequence; 0 if unseen."""
    if cand not in tokens:
        return 0
    for m in range(n, 1, -1):
        if m - 1 > len(tokens):
            continue
        query = tuple(tokens[len(tokens) - m + 1:]) + (cand,)
        if any(tuple(tokens[j - m + 1:j + 1]) == query for j in range(m - 1, len(tokens))):
            return m
    return 1


def test_circle_depth_matches_definition():
    gen = torch.Generator().manual_seed(0)
    proc = MomentumLogitsProcessor(ngram_size=5)
    for _ in range(200):
        length = int(torch.randint(1, 30, (1,), generator=gen))
        vocab = int(torch.randint(2, 6, (1,), generator=gen))
        tokens = torch.randint(0, vocab, (length,), generator=gen).tolist()
        depth = proc.circle_depth(torch.tensor([tokens]), torch.arange(vocab)[None])[0].tolist()
        assert depth == [_brute_depth(tokens, c, 5) for c in range(vocab)]


def test_revisit_is_penalised_hand_built():
    # history 5 6 7 5 6: emitting 7 closes the circle 5 -> 6 -> 7 -> 5 (depth 3: "5 6 7" repeats)
    ids = torch.tensor([[5, 6, 7, 5, 6]])
    scores = _scores(32, {7: 0.40, 9: 0.30, 5: 0.25})
    proc = MomentumLogitsProcessor(top_k=3, alpha=0.2)
    assert proc.circle_depth(ids, torch.tensor([[7, 9, 5, 6]])).tolist() == [[3, 0, 1, 1]]
    out = proc(ids, scores)
    # momentum scores: p - alpha * R(d) with R(d) = d on the top-3, -inf elsewhere
    assert out[0, 7].item() == pytest.approx(0.40 - 0.2 * 3, abs=1e-5)
    assert out[0, 9].item() == pytest.approx(0.30, abs=1e-5)
    assert out[0, 5].item() == pytest.approx(0.25 - 0.2 * 1, abs=1e-5)
    assert torch.isinf(out[0, 6]) and out[0, 6] < 0  # outside the top-k
    assert out.argmax(-1).item() == 9  # greedy would pick 7; momentum explores the new node 9
    # without resistance momentum decoding is greedy
    assert MomentumLogitsProcessor(top_k=3, alpha=0.0)(ids, scores).argmax(-1).item() == 7
    # a weak revisit (depth 1) of a much more likely token is still allowed
    scores2 = _scores(32, {5: 0.60, 9: 0.30})
    assert proc(ids, scores2).argmax(-1).item() == 5


def test_blocking_and_custom_resistance():
    ids = torch.tensor([[1, 2, 3, 4, 1, 2, 3]])
    scores = _scores(16, {4: 0.5, 1: 0.3})  # 4 closes "1 2 3 4" (depth 4), 1 has depth 1
    block = MomentumLogitsProcessor(top_k=2, resistance="blocking")
    assert block(ids, scores).argmax(-1).item() == 1
    # every candidate blocked (depth 5 > table): the most probable one is still chosen
    ids5 = torch.tensor([[1, 2, 3, 4, 5, 1, 2, 3, 4, 6, 1, 2, 3, 4]])
    scores5 = _scores(16, {5: 0.3, 6: 0.5})
    table = MomentumLogitsProcessor(top_k=2, resistance=[0.0, 0.0, 0.0, 0.0, math.inf])
    assert table.circle_depth(ids5, torch.tensor([[5, 6]])).tolist() == [[5, 5]]
    assert table(ids5, scores5).argmax(-1).item() == 6
    custom = MomentumLogitsProcessor(top_k=2, alpha=1.0, resistance=lambda d: 0.0 if d < 4 else 1.0)
    assert custom(ids, scores).argmax(-1).item() == 1
    for name in RESISTANCE_FUNCTIONS:
        MomentumLogitsProcessor(resistance=name)(ids, scores)


def test_batch_rows_independent_and_left_padding():
    torch.manual_seed(0)
    vocab, pad = 40, 0
    proc = MomentumLogitsProcessor(top_k=6, alpha=0.2, pad_token_id=pad)
    rows = [[3, 4, 5, 3, 4, 5, 3, 4], [7, 8, 9, 10], [2, 0, 3, 2, 0]]  # the last one contains the pad id inside
    scores = torch.randn(len(rows), vocab) * 2
    scores[:, [0, 5, 9, 2]] += 4.0  # make previously seen tokens (and the pad id) likely candidates
    width = max(len(r) for r in rows)
    padded = torch.tensor([[pad] * (width - len(r)) + r for r in rows])
    batched = proc(padded, scores)
    for i, r in enumerate(rows):
        single = proc(torch.tensor([r]), scores[i:i + 1])
        torch.testing.assert_close(batched[i:i + 1], single)
    # without pad_token_id the padding would count as visited nodes
    naive = MomentumLogitsProcessor(top_k=6, alpha=0.2)(padded, scores)
    assert not torch.equal(naive[1], batched[1])


def test_generate_left_padding_matches_single_rows(tiny_model):
    proc = MomentumLogitsProcessor(top_k=5, alpha=0.2, pad_token_id=0)
    prompts = [[5, 6, 7, 8, 9, 10], [11, 12, 13]]
    width = max(len(p) for p in prompts)
    ids = torch.tensor([[0] * (width - len(p)) + p for p in prompts])
    mask = (torch.arange(width)[None] >= torch.tensor([width - len(p) for p in prompts])[:, None]).long()
    kw = dict(do_sample=False, max_new_tokens=12, min_new_tokens=12, pad_token_id=0, logits_processor=[proc])
    out = tiny_model.generate(input_ids=ids, attention_mask=mask, **kw)[:, width:]
    for i, p in enumerate(prompts):
        alone = tiny_model.generate(input_ids=torch.tensor([p]), **kw)[0, len(p):]
        assert out[i].tolist() == alone.tolist()
    greedy = tiny_model.generate(input_ids=ids, attention_mask=mask, do_sample=False, max_new_tokens=12,
                                 min_new_tokens=12, pad_token_id=0)[:, width:]
    # momentum explores: fewer repeated tokens than greedy on a tiny random model
    assert sum(rep_n(r.tolist(), 1) for r in out) <= sum(rep_n(r.tolist(), 1) for r in greedy)


def test_follows_dtype_and_device():
    ids = torch.tensor([[1, 2, 3, 1, 2]])
    scores = torch.randn(1, 20, dtype=torch.float16)
    out = MomentumLogitsProcessor(top_k=3)(ids, scores)
    assert out.dtype == torch.float16 and out.device == scores.device
    assert torch.isfinite(out).sum().item() == 3


@pytest.mark.parametrize(
    "kwargs",
    [dict(top_k=0), dict(top_k=2.5), dict(alpha=-0.1), dict(alpha=float("nan")), dict(ngram_size=0),
     dict(resistance="nope"), dict(resistance=[1.0, 2.0]), dict(resistance=[-1.0] * 5), dict(resistance=3),
     dict(pad_token_id="0")],
)
def test_argument_errors(kwargs):
    with pytest.raises(ValueError):
        MomentumLogitsProcessor(**kwargs)


def test_for_model_takes_pad_from_tokenizer():
    class Tok:
        pad_token_id = 2

    assert MomentumLogitsProcessor.for_model(None, Tok()).pad_token_id == 2


# ---------------------------------------------------------------------------------------------- excluded tokens
def test_eos_in_the_context_is_not_a_revisited_node():
    # eos (2) closed the first answer after "5 6"; the model now wants to end again after "5 6"
    ids = torch.tensor([[5, 6, 2, 7, 5, 6]])
    scores = _scores(32, {2: 0.45, 9: 0.35, 7: 0.1})
    plain = MomentumLogitsProcessor(top_k=3, alpha=0.2)
    assert plain.circle_depth(ids, torch.tensor([[2]])).tolist() == [[3]]  # the mechanism would penalise it
    proc = MomentumLogitsProcessor(top_k=3, alpha=0.2, excluded_token_ids=[2])
    assert proc.excluded_token_ids == (2,)
    assert proc.circle_depth(ids, torch.tensor([[2, 9, 7]])).tolist() == [[0, 0, 1]]
    out = proc(ids, scores)
    assert out[0, 2].item() == pytest.approx(0.45, abs=1e-5)  # its probability, no resistance
    assert out[0, 7].item() == pytest.approx(0.1 - 0.2, abs=1e-5)  # ordinary revisits are still resisted
    assert out.argmax(-1).item() == 2


def test_excluded_tokens_are_not_graph_nodes():
    # n-grams do not run through an excluded token: "3 1 4" would be a depth-3 circle, with 1 excluded only the
    # node 4 itself is revisited (depth 1); the excluded 1 is no node (depth 0)
    ids = torch.tensor([[3, 1, 4, 8, 3, 1]])
    cands = torch.tensor([[4, 1, 8]])
    assert MomentumLogitsProcessor().circle_depth(ids, cands).tolist() == [[3, 1, 1]]
    assert MomentumLogitsProcessor(excluded_token_ids={1}).circle_depth(ids, cands).tolist() == [[1, 0, 1]]
    # batched rows with left padding and exclusions equal the rows alone
    proc = MomentumLogitsProcessor(top_k=4, pad_token_id=0, excluded_token_ids=[1, 2])
    rows = [[3, 1, 4, 8, 3, 1], [9, 2, 9]]
    padded = torch.tensor([[0] * (6 - len(r)) + r for r in rows])
    scores = torch.randn(2, 12)
    scores[:, [1, 2, 4, 9]] += 3.0
    for i, r in enumerate(rows):
        torch.testing.assert_close(proc(padded, scores)[i:i + 1], proc(torch.tensor([r]), scores[i:i + 1]))


def test_for_model_excludes_special_and_eos_tokens():
    class Tok:
        pad_token_id = 0
        eos_token_id = 2
        all_special_ids = [0, 1, 2]

    class Model:
        class generation_config:
            pad_token_id = 0
            eos_token_id = [2, 7]

    proc = MomentumLogitsProcessor.for_model(Model(), Tok())
    assert proc.excluded_token_ids == (0, 1, 2, 7)
    ids = torch.tensor([[5, 7, 6, 5]])
    assert proc.circle_depth(ids, torch.tensor([[7, 6]])).tolist() == [[0, 1]]
    assert MomentumLogitsProcessor.for_model(Model(), Tok(), excluded_token_ids=()).excluded_token_ids == ()
    assert MomentumLogitsProcessor.for_model(Model(), Tok(), excluded_token_ids=[5]).excluded_token_ids == (5,)


@pytest.mark.parametrize("bad", ["2", [1.5], [-1], [True], 3])
def test_excluded_token_ids_are_validated(bad):
    with pytest.raises(ValueError, match="excluded_token_ids"):
        MomentumLogitsProcessor(excluded_token_ids=bad)


@pytest.mark.real_model
def test_chat_eos_is_never_resisted_real_model(smollm):
    """On a chat prompt, the end of turn (eos) keeps its probability at every step: with the fix momentum ends the
    answer where greedy does (before it, "<|im_end|>" after "." revisited the ". <|im_end|>" of the prompt and the
    answer ran on)."""
    from hf_decoding_ext.core.models import encode_prompts

    model, tokenizer = smollm
    proc = MomentumLogitsProcessor.for_model(model, tokenizer)
    eos = tokenizer.eos_token_id
    assert {eos, *tokenizer.all_special_ids} <= set(proc.excluded_token_ids)
    im_start = tokenizer.convert_tokens_to_ids("<|im_start|>")
    assert im_start in proc.excluded_token_ids
    enc = encode_prompts(tokenizer, "Name a fruit.")
    n = enc.input_ids.shape[1]
    kw = dict(do_sample=False, max_new_tokens=24, return_dict_in_generate=True, output_scores=True,
              output_logits=True)
    out = model.generate(**enc, logits_processor=[proc], **kw)
    greedy = model.generate(**enc, do_sample=False, max_new_tokens=24)[0, n:]
    steps = 0
    for t, (score, logit) in enumerate(zip(out.scores, out.logits)):
        p = logit[0].float().softmax(-1)
        if eos in logit[0].topk(proc.top_k).indices:  # eos among the candidates: no resistance
            # float32 round-off differs across CPU kernels (1.3e-5 seen on one CI machine); resistance would move
            # eos's probability by orders of magnitude more
            assert score[0, eos].item() == pytest.approx(p[eos].item(), abs=1e-4)
            steps += 1
    assert steps >= 1
    seq = out.sequences[0, n:]
    assert int(seq[-1]) == eos and int(greedy[-1]) == eos
    assert seq.shape[0] <= greedy.shape[0], (tokenizer.decode(seq), tokenizer.decode(greedy))


def test_chat_template_token_ids_stub():
    class Tok:
        chat_template = "x"
        all_special_ids = [0, 1]

        def apply_chat_template(self, messages, tokenize=False, add_generation_prompt=False):
            text = "".join(f"<s>{m['role']}\n{m['content']}</s>\n" for m in messages)
            return text + ("<s>assistant\n" if add_generation_prompt else "")

        def __call__(self, text, add_special_tokens=False):
            vocab = {"<s>": 0, "</s>": 1, "\n": 3, "system": 4, "user": 5, "assistant": 6}
            words = text.replace("<s>", " <s> ").replace("</s>", " </s> ").replace("\n", " \n ").split(" ")
            return {"input_ids": [vocab.get(w, 99) for w in words if w]}

        def decode(self, ids):
            return "".join({3: "\n", 99: "text"}.get(i, "w") for i in ids)

    from hf_decoding_ext.sampling.momentum import chat_template_token_ids

    assert chat_template_token_ids(Tok()) == (0, 1, 4, 5, 6)  # role names and markers, not the newline


@pytest.mark.real_model
def test_chat_template_token_ids_real_tokenizer(smollm):
    from hf_decoding_ext.sampling.momentum import chat_template_token_ids

    _, tokenizer = smollm
    ids = set(chat_template_token_ids(tokenizer))
    for text in ("<|im_start|>", "<|im_end|>", "system", "user", "assistant"):  # "assistant" is two tokens
        assert set(tokenizer(text, add_special_tokens=False)["input_ids"]) <= ids, text
    newline = tokenizer("\n", add_special_tokens=False)["input_ids"]
    assert not set(newline) & ids
    proc = MomentumLogitsProcessor.for_model(None, tokenizer, chat_template_tokens=True)
    assert ids <= set(proc.excluded_token_ids)


PROMPTS = [
    "Write a story about a lighthouse keeper who finds a message in a bottle.",
    "Write a story about a robot who wants to learn how to paint.",
    "Continue this paragraph: The old library at the edge of town had been closed for decades, but every night "
    "a single light burned in its highest window.",
    "Write a short essay about why people enjoy walking in the rain.",
]


@pytest.mark.real_model
def test_momentum_reduces_repetition_and_is_fast(smollm):
    model, tokenizer = smollm
    from hf_decoding_ext.core.models import encode_prompts

    enc = encode_prompts(tokenizer, PROMPTS)
    n_new = 128
    proc = MomentumLogitsProcessor.for_model(model, tokenizer)  # paper defaults: k=5, alpha=0.2, R(d)=d, depth<=5

    def run(processors, n=n_new):
        t0 = time.perf_counter()
        out = model.generate(**enc, do_sample=False, max_new_tokens=n, min_new_tokens=n,
                             logits_processor=processors)
        return time.perf_counter() - t0, out[:, enc.input_ids.shape[1]:]

    run([proc], 16)  # warm-up (a short run: kernels and the processor's caches)
    times = {"greedy": [], "momentum": []}
    outs = {}
    for _ in range(2):  # interleaved
        for name, procs in (("greedy", []), ("momentum", [proc])):
            dt, tokens = run(procs)
            times[name].append(dt)
            outs[name] = [row.tolist() for row in tokens]
    for rows in outs.values():
        assert all(len(r) == n_new for r in rows)

    def metrics(rows):
        return {
            "rep-2": sum(rep_n(r, 2) for r in rows) / len(rows),
            "rep-3": sum(rep_n(r, 3) for r in rows) / len(rows),
            "distinct-2": distinct_n(rows, 2),
            "distinct-3": distinct_n(rows, 3),
        }

    g, m = metrics(outs["greedy"]), metrics(outs["momentum"])
    ratio = min(times["momentum"]) / min(times["greedy"])
    print(f"\ngreedy   {g}\nmomentum {m}\ntime greedy {times['greedy']} momentum {times['momentum']} "
          f"ratio(min) {ratio:.3f}")
    assert m["rep-2"] < g["rep-2"] and m["rep-3"] < g["rep-3"]
    assert m["distinct-2"] > g["distinct-2"] and m["distinct-3"] > g["distinct-3"]
    assert ratio <= 1.2
