"""The shared decoding-loop machinery reproduces generate() and honours its flags."""

import pytest
import torch
from transformers import LogitsProcessorList, TemperatureLogitsWarper

from hf_decoding_ext.core.loop import DecodingLoop


class _Plain(DecodingLoop):
    """Reference loop: plain greedy / multinomial sampling through GenerationState."""

    def run(self, state):
        while not state.done:
            logits, _ = state.next_token_logits()
            scores = state.process(logits)
            state.record(scores, logits)
            state.append(state.select(scores))


class _BatchOne(_Plain):
    supports_batch = False


def _batch():
    ids = torch.tensor([[0, 0, 5, 6, 7], [3, 4, 5, 6, 7]])
    mask = torch.tensor([[0, 0, 1, 1, 1], [1, 1, 1, 1, 1]])
    return ids, mask


def test_greedy_equals_generate_with_left_padding(tiny_model):
    ids, mask = _batch()
    ref = tiny_model.generate(ids, attention_mask=mask, max_new_tokens=24, do_sample=False)
    out = tiny_model.generate(ids, attention_mask=mask, max_new_tokens=24, do_sample=False, custom_generate=_Plain())
    assert torch.equal(ref, out)


def test_sampling_equals_generate_with_same_seed(tiny_model):
    ids, mask = _batch()
    torch.manual_seed(3)
    ref = tiny_model.generate(ids, attention_mask=mask, max_new_tokens=16, do_sample=True, top_k=0, temperature=0.7)
    torch.manual_seed(3)
    out = tiny_model.generate(ids, attention_mask=mask, max_new_tokens=16, do_sample=True, top_k=0, temperature=0.7,
                              custom_generate=_Plain())
    assert torch.equal(ref, out)


def test_eos_pads_finished_rows_and_max_new_tokens_exact(tiny_llama):
    ids, mask = _batch()
    free = tiny_llama.generate(ids, attention_mask=mask, max_new_tokens=10, do_sample=False, custom_generate=_Plain())
    eos = int(free[0, 6])  # make the 2nd generated token of row 0 the eos
    out = tiny_llama.generate(ids, attention_mask=mask, max_new_tokens=10, do_sample=False, eos_token_id=eos,
                              pad_token_id=0, custom_generate=_Plain())
    ref = tiny_llama.generate(ids, attention_mask=mask, max_new_tokens=10, do_sample=False, eos_token_id=eos,
                              pad_token_id=0)
    assert torch.equal(out, ref)
    assert (out[0, 7:] == 0).all()
    assert out.shape[1] <= ids.shape[1] + 10


def test_return_dict_scores_and_processors(tiny_gpt2):
    ids, mask = _batch()
    procs = LogitsProcessorList([TemperatureLogitsWarper(0.5)])
    out = tiny_gpt2.generate(ids, attention_mask=mask, max_new_tokens=6, do_sample=False, logits_processor=procs,
                             return_dict_in_generate=True, output_scores=True, output_logits=True,
                             custom_generate=_Plain())
    assert out.sequences.shape == (2, 11)
    assert len(out.scores) == 6 and len(out.logits) == 6
    torch.testing.assert_close(out.scores[0], out.logits[0] / 0.5)


def test_streamer_receives_every_token(tiny_llama):
    class Collect:
        def __init__(self):
            self.chunks, self.ended = [], False

        def put(self, value):
            self.chunks.append(value)

        def end(self):
            self.ended = True

    s = Collect()
    ids = torch.tensor([[3, 4, 5]])
    out = tiny_llama.generate(ids, max_new_tokens=5, do_sample=False, streamer=s, custom_generate=_Plain())
    assert s.ended and len(s.chunks) == 1 + 5  # prompt, then one chunk per token
    assert torch.equal(torch.cat([c.reshape(-1) for c in s.chunks[1:]]), out[0, 3:])


def test_batch_refusal_is_clear(tiny_llama):
    ids, mask = _batch()
    with pytest.raises(ValueError, match="batch size 1"):
        tiny_llama.generate(ids, attention_mask=mask, max_new_tokens=3, custom_generate=_BatchOne())


@pytest.mark.real_model
def test_greedy_equals_generate_on_default_model(smollm):
    from hf_decoding_ext.core.models import encode_prompts

    model, tok = smollm
    enc = encode_prompts(tok, ["Name three colours.", "What is 2+2? Answer briefly and explain."])
    ref = model.generate(**enc, max_new_tokens=24, do_sample=False)
    out = model.generate(**enc, max_new_tokens=24, do_sample=False, custom_generate=_Plain())
    assert torch.equal(ref, out)
