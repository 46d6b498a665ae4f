"""Draft-model drafter: ``assistant_model=`` routing and parity with transformers' assisted generation."""

from __future__ import annotations

import pytest
import torch

from hf_decoding_ext.bench.speed import ForwardCounter
from hf_decoding_ext.core.anatomy import decoder_layers, embeddings
from hf_decoding_ext.core.models import encode_prompts, truncated_model
from hf_decoding_ext.speculative import SpeculativeDecoding
from hf_decoding_ext.speculative.drafters.draft_model import DraftModelDrafter
from hf_decoding_ext.speculative.drafters.prompt_lookup import PromptLookupDrafter


def _assisted_pair(model, assistant, ids, max_new_tokens, **kw):
    """(transformers output, its target forwards, our output, our target forwards, our loop)."""
    with ForwardCounter(model) as c_hf:
        hf = model.generate(ids, max_new_tokens=max_new_tokens, do_sample=False, assistant_model=assistant, **kw)
    loop = SpeculativeDecoding()
    with ForwardCounter(model) as c_ours:
        ours = model.generate(ids, max_new_tokens=max_new_tokens, do_sample=False, assistant_model=assistant,
                              custom_generate=loop, **kw)
    return hf, c_hf.count, ours, c_ours.count, loop


def test_truncated_model_is_early_exit_with_shared_weights(tiny_model):
    small = truncated_model(tiny_model, 1)  # layers found by core.anatomy (model.layers or transformer.h)
    assert small.config.num_hidden_layers == 1 and len(decoder_layers(small)) == 1
    assert embeddings(small).weight.data_ptr() == embeddings(tiny_model).weight.data_ptr()
    ids = torch.randint(3, 128, (1, 9), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        hidden = tiny_model(ids, output_hidden_states=True).hidden_states[1]
        norm = tiny_model.model.norm if hasattr(tiny_model, "model") else tiny_model.transformer.ln_f
        torch.testing.assert_close(small(ids).logits, tiny_model.lm_head(norm(hidden)), rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="num_layers"):
        truncated_model(tiny_model, 2)
    with pytest.raises(ValueError, match="Linear"):
        truncated_model(torch.nn.Linear(2, 2), 1)


@pytest.mark.parametrize("schedule", ["constant", "heuristic_transient"])
def test_parity_with_transformers_assisted_generation_tiny(tiny_llama, schedule):
    assistant = truncated_model(tiny_llama, 1)
    assistant.generation_config.num_assistant_tokens = 3
    assistant.generation_config.num_assistant_tokens_schedule = schedule
    assistant.generation_config.assistant_confidence_threshold = 0.0
    for seed in range(3):
        ids = torch.randint(3, 20, (1, 12), generator=torch.Generator().manual_seed(seed))
        greedy = tiny_llama.generate(ids, max_new_tokens=40, do_sample=False)
        hf, n_hf, ours, n_ours, loop = _assisted_pair(tiny_llama, assistant, ids, 40)
        assert torch.equal(ours, greedy) and torch.equal(hf, greedy)
        assert n_ours == n_hf  # same drafts, same acceptance: the same number of target forwards
        sizes = [s.draft_size for s in loop.last_stats]
        assert sizes[0] == 3
        if schedule == "constant":
            assert all(s <= 3 for s in sizes)


def test_heuristic_schedule_carries_over_between_calls(tiny_llama):
    drafter = DraftModelDrafter(truncated_model(tiny_llama, 1), num_tokens=3, confidence_threshold=0.0,
                                schedule="heuristic")
    loop = SpeculativeDecoding(drafter)
    ids = torch.randint(3, 20, (1, 12), generator=torch.Generator().manual_seed(0))
    tiny_llama.generate(ids, max_new_tokens=20, do_sample=False, custom_generate=loop)
    carried = drafter.length_policy.length()
    tiny_llama.generate(ids, max_new_tokens=20, do_sample=False, custom_generate=loop)
    assert loop.last_stats[0].draft_size == min(carried, 20 - 1)
    drafter.reset()
    tiny_llama.generate(ids, max_new_tokens=20, do_sample=False, custom_generate=loop)
    assert loop.last_stats[0].draft_size == 3


def test_heuristic_schedule_carries_over_like_transformers(tiny_llama):
    """Under ``"heuristic"`` the length carried from call to call equals transformers' (which writes it to the
    assistant's generation config), an empty last draft (no room left) counting as fully accepted; with the carried
    length the next call makes the same drafts (same output, same number of target forwards)."""
    theirs = truncated_model(tiny_llama, 1)
    theirs.generation_config.num_assistant_tokens = 3
    theirs.generation_config.num_assistant_tokens_schedule = "heuristic"
    theirs.generation_config.assistant_confidence_threshold = 0.0
    drafter = DraftModelDrafter(truncated_model(tiny_llama, 1), num_tokens=3, confidence_threshold=0.0,
                                schedule="heuristic")
    loop = SpeculativeDecoding(drafter)
    empty_last = 0
    for seed in range(4):
        ids = torch.randint(3, 20, (1, 12), generator=torch.Generator().manual_seed(seed))
        with ForwardCounter(tiny_llama) as c_hf:
            hf = tiny_llama.generate(ids, max_new_tokens=20, do_sample=False, assistant_model=theirs)
        with ForwardCounter(tiny_llama) as c_ours:
            ours = tiny_llama.generate(ids, max_new_tokens=20, do_sample=False, custom_generate=loop)
        assert torch.equal(ours, hf) and c_ours.count == c_hf.count, seed
        assert drafter.length_policy.length() == theirs.generation_config.num_assistant_tokens, seed
        empty_last += loop.last_stats[-1].draft_size == 0
    assert empty_last  # the empty-draft case was exercised


def test_assistant_model_routing_and_errors(tiny_llama, tiny_gpt2):
    from transformers import LlamaConfig, LlamaForCausalLM

    assistant = truncated_model(tiny_llama, 1)
    ids = torch.randint(3, 128, (1, 10), generator=torch.Generator().manual_seed(1))
    greedy = tiny_llama.generate(ids, max_new_tokens=12, do_sample=False)
    # generate(assistant_model=...) feeds SpeculativeDecoding() and DraftModelDrafter() without a model of its own
    for loop in (SpeculativeDecoding(), SpeculativeDecoding(DraftModelDrafter())):
        out = tiny_llama.generate(ids, max_new_tokens=12, do_sample=False, assistant_model=assistant,
                                  custom_generate=loop)
        assert torch.equal(out, greedy) and loop.drafter.assistant is assistant
    with pytest.raises(ValueError, match="needs an assistant model"):
        tiny_llama.generate(ids, max_new_tokens=4, do_sample=False, custom_generate=SpeculativeDecoding())
    with pytest.raises(ValueError, match="does not use an assistant model"):
        tiny_llama.generate(ids, max_new_tokens=4, do_sample=False, assistant_model=assistant,
                            custom_generate=SpeculativeDecoding(PromptLookupDrafter()))
    with pytest.raises(ValueError, match="two different assistant models"):
        tiny_llama.generate(ids, max_new_tokens=4, do_sample=False, assistant_model=truncated_model(tiny_llama, 1),
                            custom_generate=SpeculativeDecoding(DraftModelDrafter(assistant)))
    other = LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                         num_attention_heads=2, num_key_value_heads=1)).eval()
    with pytest.raises(ValueError, match="vocabulary"):
        tiny_llama.generate(ids, max_new_tokens=4, do_sample=False,
                            custom_generate=SpeculativeDecoding(DraftModelDrafter(other)))
    # a decoding loop that has no use for an assistant refuses it instead of ignoring it
    from hf_decoding_ext.core.loop import DecodingLoop

    class Greedy(DecodingLoop):
        def run(self, state):
            while not state.done:
                logits, _ = state.next_token_logits()
                state.append(state.select(state.process(logits))[:, None])

    assert torch.equal(tiny_llama.generate(ids, max_new_tokens=12, do_sample=False, custom_generate=Greedy()), greedy)
    with pytest.raises(ValueError, match="does not use an assistant model"):
        tiny_llama.generate(ids, max_new_tokens=4, do_sample=False, assistant_model=assistant,
                            custom_generate=Greedy())
    for bad in ({"num_tokens": 0}, {"confidence_threshold": 1.0}, {"schedule": "fast"}):
        with pytest.raises(ValueError):
            DraftModelDrafter(assistant, **bad)


@pytest.mark.real_model
def test_parity_with_transformers_assisted_generation_real_model(smollm):
    """Same output and the same number of target forwards as transformers' assisted generation (its defaults: 20
    draft tokens, constant schedule, confidence threshold 0.4), with the default model's first 4 layers as the
    assistant."""
    from hf_decoding_ext.bench.prompts import load_prompts

    model, tokenizer = smollm
    assistant = truncated_model(model, 4)
    for row in load_prompts(categories=["summarization", "qa"], per_category=1):
        enc = encode_prompts(tokenizer, row["prompt"])
        greedy = model.generate(**enc, max_new_tokens=32, do_sample=False)
        hf, n_hf, ours, n_ours, loop = _assisted_pair(model, assistant, enc["input_ids"], 32,
                                                      attention_mask=enc["attention_mask"])
        assert torch.equal(ours, greedy) and torch.equal(hf, greedy), row["id"]
        assert n_ours == n_hf, (row["id"], n_ours, n_hf)
        # drafts were made and verified (this untrained early-exit assistant rarely gets a token accepted)
        assert all(s.draft_size > 0 for s in loop.last_stats[:-1])
