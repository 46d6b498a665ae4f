"""Adaptive Skeleton Graph Decoding (Jin et al., arXiv 2402.12280): skeleton DAG, wave scheduler, model routing."""

from __future__ import annotations

import json

import pytest
import torch

from hf_decoding_ext.search.skeleton_graph import (
    SkeletonGraphDecoding,
    parse_skeleton,
    skeleton_schema,
    topological_waves,
)

PROMPT = "hello world, this"
DIAMOND = [  # 1 and 2 independent, 3 <- 1, 4 <- 1, 2, 5 <- 3, 4: waves [1, 2], [3, 4], [5]
    {"summary": "a", "dependency": [], "difficulty": 2},
    {"summary": "bb", "dependency": [], "difficulty": 2},
    {"summary": "c", "dependency": [1], "difficulty": 2},
    {"summary": "dd", "dependency": [1, 2], "difficulty": 2},
    {"summary": "e", "dependency": [3, 4], "difficulty": 2},
]
CHAIN = [{"summary": s, "dependency": [k] if k else [], "difficulty": 2} for k, s in enumerate(["a", "bb", "c"])]


def _ids(tok, text=PROMPT):
    return torch.tensor([tok(text)["input_ids"]])


def _run(model, loop, ids, new=200, **kw):
    return model.generate(ids, custom_generate=loop, max_new_tokens=new, do_sample=False, pad_token_id=0,
                          return_dict_in_generate=True, **kw)


def _count_forwards(model):
    """Forward hook recording the batch size of every forward of ``model``."""
    calls = []
    handle = model.register_forward_hook(lambda m, args, kwargs, out: calls.append(kwargs["input_ids"].shape[0]),
                                         with_kwargs=True)
    return calls, handle


def _greedy(model, ids, n, eos=2):
    """Plain greedy generate() of at most ``n`` tokens; the tokens before eos and the number generated."""
    out = model.generate(ids, max_new_tokens=n, do_sample=False, pad_token_id=0, eos_token_id=eos)[0, ids.shape[1]:]
    tokens = out.tolist()
    if eos in tokens:
        return tokens[:tokens.index(eos)], tokens.index(eos) + 1
    return tokens, len(tokens)


# ------------------------------------------------------------------------------------------------ skeleton and DAG
def test_parse_refuses_forward_references_and_dedupes():
    nodes = parse_skeleton(json.dumps([{"summary": "x", "dependency": [], "difficulty": 1},
                                       {"summary": "y", "dependency": [1, 1], "difficulty": 3}]), 3)
    assert nodes[1].dependency == [0]  # the repair: repeated dependencies dropped, 0-based
    with pytest.raises(ValueError, match="only earlier steps"):
        parse_skeleton([{"summary": "x", "dependency": [2], "difficulty": 1},
                        {"summary": "y", "dependency": [1], "difficulty": 1}])  # a cycle needs a forward reference
    with pytest.raises(ValueError, match="only earlier steps"):
        parse_skeleton([{"summary": "x", "dependency": [1], "difficulty": 1}])  # self-reference
    with pytest.raises(ValueError, match="difficulty"):
        parse_skeleton([{"summary": "x", "dependency": [], "difficulty": 4}], 3)
    assert topological_waves(parse_skeleton(DIAMOND)) == [[0, 1], [2, 3], [4]]
    assert topological_waves(parse_skeleton(CHAIN)) == [[0], [1], [2]]


def test_schema_allows_only_earlier_dependencies():
    schema = skeleton_schema(3, 3, 10)
    assert schema["prefixItems"][0]["properties"]["dependency"]["maxItems"] == 0
    assert schema["prefixItems"][2]["properties"]["dependency"]["items"]["enum"] == [1, 2]
    assert schema["maxItems"] == 3 and schema["items"] is False


def test_generated_skeleton_is_always_schema_valid(tiny_llama, tiny_gpt2, char_tokenizer):
    # the random tiny models write junk, but under the schema every skeleton parses, with earlier dependencies only
    jsonschema = pytest.importorskip("jsonschema")
    schema = skeleton_schema(2, 3, 6)
    for model, text in ((tiny_llama, PROMPT), (tiny_llama, "abc"), (tiny_llama, "zzz yy"), (tiny_gpt2, PROMPT)):
        loop = SkeletonGraphDecoding(char_tokenizer, max_nodes=2, max_summary_chars=6, max_skeleton_tokens=64,
                                     max_node_tokens=1, stop_strings=())
        out = _run(model, loop, _ids(char_tokenizer, text))
        assert out.search_stats["skeleton_valid"]
        doc = json.loads(out.skeleton_text)
        jsonschema.validate(doc, schema)
        assert out.search_stats["skeleton_tokens"] <= 64
        assert [n["summary"] for n in out.skeleton] == [n["summary"] for n in doc]
    # tokens the schema forces are appended without a forward: the same skeleton in fewer forwards
    slow = SkeletonGraphDecoding(char_tokenizer, max_nodes=2, max_summary_chars=6, max_skeleton_tokens=64,
                                 max_node_tokens=1, stop_strings=(), jump_forward=False)
    ref = _run(tiny_gpt2, slow, _ids(char_tokenizer))
    assert ref.skeleton_text == out.skeleton_text and ref.search_stats["skeleton_forced_tokens"] == 0
    forced = out.search_stats["skeleton_forced_tokens"]
    assert forced > 0
    assert ref.search_stats["skeleton_forwards"] == out.search_stats["skeleton_forwards"] + forced


# ------------------------------------------------------------------------------------------------ scheduler
def test_no_node_starts_before_its_dependencies_and_one_batched_forward_per_step(tiny_llama, char_tokenizer):
    loop = SkeletonGraphDecoding(char_tokenizer, skeleton=DIAMOND, max_node_tokens=4, stop_strings=())
    ids = _ids(char_tokenizer)
    calls, handle = _count_forwards(tiny_llama)
    try:
        out = _run(tiny_llama, loop, ids)
    finally:
        handle.remove()
    sched, stats, nodes = out.schedule, out.search_stats, out.skeleton
    assert sched["waves"] == [[0, 1], [2, 3], [4]]
    for i, node in enumerate(nodes):
        for d in node["dependency"]:  # every parent finished at an earlier step than the node's first step
            assert sched["finished_at"][d] < sched["started_at"][i]
    for step in sched["steps"]:
        assert len(step["calls"]) == 1  # one model: one batched forward per step
        (name, rows), = step["calls"]
        assert name == "large" and set(rows) <= set(sched["waves"][step["wave"]])
        for i in rows:
            assert all(sched["finished_at"][d] < sched["started_at"][i] for d in nodes[i]["dependency"])
    # the hook's own count: 1 prompt prefill, then one forward per step, whose batch is the wave's unfinished rows
    assert calls[0] == 1 and len(calls) == 1 + len(sched["steps"]) == stats["model_calls"]
    assert calls[1:] == [len(s["calls"][0][1]) for s in sched["steps"]]
    assert calls[1] == 2  # the first wave's two nodes together
    lengths = [n["length"] for n in nodes]
    wave_max = [max(lengths[i] for i in w) for w in sched["waves"]]
    assert stats["node_forwards"] == sum(wave_max) == stats["node_steps"] < sum(lengths)
    assert stats["sequential_node_forwards"] == sum(lengths)


def test_batched_waves_equal_sequential_schedule_and_greedy_per_node(tiny_llama, char_tokenizer):
    ids = _ids(char_tokenizer)
    waves = _run(tiny_llama, SkeletonGraphDecoding(char_tokenizer, skeleton=DIAMOND, max_node_tokens=5,
                                                   stop_strings=()), ids)
    seq_loop = SkeletonGraphDecoding(char_tokenizer, skeleton=DIAMOND, max_node_tokens=5, stop_strings=(),
                                     schedule="sequential")
    seq = _run(tiny_llama, seq_loop, ids)
    assert [n["answer"] for n in waves.skeleton] == [n["answer"] for n in seq.skeleton]
    assert torch.equal(waves.sequences, seq.sequences)
    assert seq.search_stats["node_forwards"] == seq.search_stats["sequential_node_forwards"]
    assert waves.search_stats["node_forwards"] < seq.search_stats["node_forwards"]
    # each node's answer is plain greedy decoding of its prompt (the parents' answers forwarded)
    nodes = parse_skeleton(DIAMOND)
    for i, node in enumerate(nodes):
        suffix = seq_loop.node_prompt(nodes, i)
        tokens, length = _greedy(tiny_llama, torch.cat([ids, torch.tensor([suffix])], dim=1), 5)
        node.tokens, node.text = tokens, char_tokenizer.decode(tokens)
        assert node.text == waves.skeleton[i]["answer"] and length == waves.skeleton[i]["length"]
    parent_text = f"1. a:{nodes[0].text}\n"
    assert parent_text in char_tokenizer.decode(seq_loop.node_prompt(nodes, 2))  # information forwarding


def test_chain_reproduces_sequential_greedy_decoding_exactly(tiny_gpt2, char_tokenizer):
    ids = _ids(char_tokenizer)
    loop = SkeletonGraphDecoding(char_tokenizer, skeleton=CHAIN, max_node_tokens=6, stop_strings=())
    out = _run(tiny_gpt2, loop, ids)
    nodes = parse_skeleton(CHAIN)
    answer = []
    for i, node in enumerate(nodes):  # one after the other, each prompt holding the previous answers
        tokens, length = _greedy(tiny_gpt2, torch.cat([ids, torch.tensor([loop.node_prompt(nodes, i)])], dim=1), 6)
        node.tokens, node.text = tokens, char_tokenizer.decode(tokens)
        assert out.skeleton[i]["answer"] == node.text and out.skeleton[i]["length"] == length
        answer += ([] if not i else char_tokenizer("\n")["input_ids"]) + char_tokenizer(f"{i + 1}. {node.summary}:")[
            "input_ids"] + tokens
    assert out.sequences[0, ids.shape[1]:].tolist() == answer + [2]
    stats = out.search_stats
    assert stats["waves"] == 3 and stats["width"] == 1
    assert stats["node_forwards"] == stats["sequential_node_forwards"]  # no parallelism in a chain


def test_sot_mode_puts_every_node_in_one_wave(tiny_llama, char_tokenizer):
    loop = SkeletonGraphDecoding(char_tokenizer, skeleton=DIAMOND, max_node_tokens=3, stop_strings=(),
                                 ignore_dependencies=True)
    out = _run(tiny_llama, loop, _ids(char_tokenizer))
    assert out.schedule["waves"] == [[0, 1, 2, 3, 4]]
    assert out.search_stats["node_forwards"] == max(n["length"] for n in out.skeleton)
    assert "1. a:" not in char_tokenizer.decode(loop.node_prompt(parse_skeleton(DIAMOND), 2))


def test_easy_nodes_go_to_the_small_model(tiny_llama, char_tokenizer):
    from hf_decoding_ext.core.models import truncated_model

    small = truncated_model(tiny_llama, 1)
    skeleton = [dict(n, difficulty=d) for n, d in zip(DIAMOND, [1, 3, 1, 3, 2])]
    loop = SkeletonGraphDecoding(char_tokenizer, skeleton=skeleton, max_node_tokens=4, stop_strings=(),
                                 small_model=small, difficulty_threshold=1)
    ids = _ids(char_tokenizer)
    big_calls, h1 = _count_forwards(tiny_llama)
    small_calls, h2 = _count_forwards(small)
    try:
        out = _run(tiny_llama, loop, ids)
    finally:
        h1.remove()
        h2.remove()
    stats, nodes = out.search_stats, out.skeleton
    assert [n["model"] for n in nodes] == ["small", "large", "small", "large", "large"]
    assert stats["forwards_small"] == len(small_calls) and stats["forwards_large"] == len(big_calls)
    assert stats["tokens_small"] == nodes[0]["length"] + nodes[2]["length"]
    for step in out.schedule["steps"]:  # at most one batched forward per model per step
        names = [c[0] for c in step["calls"]]
        assert len(names) == len(set(names))
    # a small node's answer is greedy decoding of its prompt by the small model
    parsed = parse_skeleton(skeleton)
    tokens, _ = _greedy(small, torch.cat([ids, torch.tensor([loop.node_prompt(parsed, 0)])], dim=1), 4)
    assert nodes[0]["answer"] == char_tokenizer.decode(tokens)


def test_answer_is_capped_by_max_new_tokens(tiny_llama, char_tokenizer):
    loop = SkeletonGraphDecoding(char_tokenizer, skeleton=CHAIN, max_node_tokens=6, stop_strings=())
    ids = _ids(char_tokenizer)
    full = _run(tiny_llama, loop, ids).sequences
    short = _run(tiny_llama, loop, ids, new=5).sequences
    assert torch.equal(short, full[:, :ids.shape[1] + 5])


def test_arguments_and_unsupported_settings_are_refused(tiny_llama, char_tokenizer):
    with pytest.raises(ValueError, match="max_nodes"):
        SkeletonGraphDecoding(char_tokenizer, max_nodes=0)
    with pytest.raises(ValueError, match="schedule"):
        SkeletonGraphDecoding(char_tokenizer, schedule="random")
    with pytest.raises(ValueError, match="difficulty_threshold"):
        SkeletonGraphDecoding(char_tokenizer, difficulty_threshold=5, max_difficulty=3, small_model="self:1")
    with pytest.raises(ValueError, match="not given"):
        SkeletonGraphDecoding(char_tokenizer, difficulty_threshold=2)
    with pytest.raises(ValueError, match="stop_strings"):
        SkeletonGraphDecoding(char_tokenizer, stop_strings="\n")
    with pytest.raises(ValueError, match="tokenizer"):
        SkeletonGraphDecoding(None)
    loop = SkeletonGraphDecoding(char_tokenizer, skeleton=CHAIN, max_node_tokens=2)
    ids = _ids(char_tokenizer)
    with pytest.raises(ValueError, match="batch size 1"):
        tiny_llama.generate(torch.cat([ids, ids]), custom_generate=loop, max_new_tokens=4, do_sample=False,
                            pad_token_id=0)
    with pytest.raises(ValueError, match="do_sample=False"):
        tiny_llama.generate(ids, custom_generate=loop, max_new_tokens=4, do_sample=True, pad_token_id=0)


# ------------------------------------------------------------------------------------------------ real model
@pytest.mark.real_model
def test_real_model_skeleton_is_valid_and_waves_save_forwards(smollm):
    from hf_decoding_ext.core.models import encode_prompts

    model, tok = smollm
    inputs = encode_prompts(tok, "Name three primary colors.")
    loop = SkeletonGraphDecoding(tok, max_nodes=3, max_skeleton_tokens=72, max_summary_chars=16, max_node_tokens=8,
                                 ignore_dependencies=True)  # SoT-style: every node in one wave
    out = model.generate(**inputs, custom_generate=loop, do_sample=False, max_new_tokens=120,
                         return_dict_in_generate=True)
    stats = out.search_stats
    assert stats["skeleton_valid"] and stats["skeleton_tokens"] <= 72
    parse_skeleton(out.skeleton_text, 3)
    assert stats["node_forwards"] == max(n["length"] for n in out.skeleton)
    if stats["nodes"] > 1:
        assert stats["node_forwards"] < stats["sequential_node_forwards"]
