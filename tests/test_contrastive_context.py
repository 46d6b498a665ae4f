"""Contrastive / guidance processors: each configuration equals its paper's formula computed by hand (full forwards
without cache) inside real generate() runs, the second-view cache survives rollbacks, and bad inputs are refused."""

from __future__ import annotations

import math

import pytest
import torch

from hf_decoding_ext.contrastive import (
    ClassifierFreeGuidanceProcessor,
    ContextAwareDecodingProcessor,
    ContrastiveContextProcessor,
    ContrastiveDecodingProcessor,
    InstructiveDecodingProcessor,
    LeadingQueryContrastiveProcessor,
    contrastive_decoding_scores,
    noisy_instruction_prompt,
    pad_left,
)

# main prompts and second-view prompts of different lengths per row (left padding in both views)
MAIN = [[5, 6, 7, 8, 9, 10], [11, 12, 13]]
SECOND = [[20, 21], [22, 23, 24, 25, 26, 27, 28]]
STEPS = 5


def _amateur(arch: str):
    from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

    torch.manual_seed(123)
    if arch == "llama":
        cfg = LlamaConfig(vocab_size=128, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                          num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=512,
                          bos_token_id=1, eos_token_id=2, pad_token_id=0)
        return LlamaForCausalLM(cfg).eval()
    cfg = GPT2Config(vocab_size=128, n_embd=16, n_layer=1, n_head=2, n_positions=512, bos_token_id=1,
                     eos_token_id=2, pad_token_id=0)
    return GPT2LMHeadModel(cfg).eval()


@torch.no_grad()
def _full_logits(model, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Next-token logits after ``ids`` by one forward over the whole sequence, no cache."""
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    out = model(input_ids=ids, attention_mask=mask, position_ids=positions, use_cache=False)
    return out.logits[:, -1, :].float()


def _ls(x):
    return torch.log_softmax(x, dim=-1)


# hand-written formulas of the papers (independent of the library's helpers)
def _cad(main, second, alpha=0.5):
    return (1 + alpha) * main - alpha * second


def _cfg(main, second, gamma=2.0):
    return _ls(second) + gamma * (_ls(main) - _ls(second))


def _id(main, second, eps=0.3):
    return main - eps * second


def _lqcd(main, second, alpha=1.0, beta=0.1):
    p = torch.softmax(main, -1)
    out = (1 + alpha) * main - alpha * second
    return torch.where(p >= beta * p.max(-1, keepdim=True).values, out, torch.full_like(out, -math.inf))


def _cd(main, second, alpha=0.1, tau=0.5):
    p = torch.softmax(main, -1)
    out = _ls(main) - _ls(second / tau)
    return torch.where(p >= alpha * p.max(-1, keepdim=True).values, out, torch.full_like(out, -math.inf))


CONFIGS = {
    "cad": (lambda m, ids, mask: ContextAwareDecodingProcessor(m, ids, mask, alpha=0.5), _cad),
    "cfg": (lambda m, ids, mask: ClassifierFreeGuidanceProcessor(m, ids, mask, gamma=2.0), _cfg),
    "instructive": (lambda m, ids, mask: InstructiveDecodingProcessor(m, ids, mask, epsilon=0.3), _id),
    "lqcd": (lambda m, ids, mask: LeadingQueryContrastiveProcessor(m, ids, mask, alpha=1.0, beta=0.1), _lqcd),
}


def _arch(model) -> str:
    return "llama" if "Llama" in type(model).__name__ else "gpt2"


def _generate(model, proc, ids, mask, steps=STEPS):
    return model.generate(input_ids=ids, attention_mask=mask, logits_processor=[proc], do_sample=False,
                          max_new_tokens=steps, min_new_tokens=steps, output_scores=True,
                          return_dict_in_generate=True, pad_token_id=0, eos_token_id=None)


def _check_steps(model, second_model, out, ids, mask, ids2, mask2, formula):
    gen = out.sequences[:, ids.shape[1]:]
    assert gen.shape[1] == len(out.scores) == STEPS
    for t in range(STEPS):
        ones = torch.ones((ids.shape[0], t), dtype=torch.long)
        main = _full_logits(model, torch.cat([ids, gen[:, :t]], 1), torch.cat([mask, ones], 1))
        second = _full_logits(second_model, torch.cat([ids2, gen[:, :t]], 1), torch.cat([mask2, ones], 1))
        torch.testing.assert_close(out.scores[t], formula(main, second), atol=2e-4, rtol=1e-4)


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_prompt_contrast_matches_formula_in_generate(tiny_model, name):
    build, formula = CONFIGS[name]
    ids, mask = pad_left(MAIN, 0)
    ids2, mask2 = pad_left(SECOND, 0)
    proc = build(tiny_model, ids2, mask2)
    out = _generate(tiny_model, proc, ids, mask)
    _check_steps(tiny_model, tiny_model, out, ids, mask, ids2, mask2, formula)
    # one second-view forward per step: the cache feeds only the new token
    assert proc.stats["second_view_forwards"] == STEPS
    if name != "cad":
        return
    # a fresh generate() with other prompts (same shape) resets the state and is still exact
    ids_b, mask_b = pad_left([[30, 31, 32, 33], [34, 35, 36, 37, 38, 39]], 0)
    out_b = _generate(tiny_model, proc, ids_b, mask_b)
    _check_steps(tiny_model, tiny_model, out_b, ids_b, mask_b, ids2, mask2, formula)


def test_contrastive_decoding_matches_formula_in_generate(tiny_model):
    # amateur: another (smaller) model of the same vocabulary, in float64 (its own dtype), same prompt as the expert
    amateur = _amateur(_arch(tiny_model)).double()
    ids, mask = pad_left(MAIN, 0)
    proc = ContrastiveDecodingProcessor(amateur, prompt_attention_mask=mask, vocab_size=128)
    out = _generate(tiny_model, proc, ids, mask)
    assert out.scores[0].dtype == torch.float32
    _check_steps(tiny_model, amateur, out, ids, mask, ids, mask, _cd)
    # the pad id alone (no explicit mask) recovers the same left padding
    proc2 = ContrastiveDecodingProcessor(amateur, pad_token_id=0)
    out2 = _generate(tiny_model, proc2, ids, mask)
    assert torch.equal(out.sequences, out2.sequences)


def test_contrastive_decoding_scores_function():
    expert = torch.tensor([[3.0, 2.9, 0.0, -4.0]])
    amateur = torch.tensor([[3.0, 0.0, 0.0, 0.0]])
    s = contrastive_decoding_scores(expert, amateur, alpha=0.1, amateur_temperature=1.0)
    assert torch.isinf(s[0, 3]) and s[0, 3] < 0  # outside the plausible head
    assert int(s.argmax()) == 1  # the amateur's favourite is penalised
    torch.testing.assert_close(s, _cd(expert, amateur, 0.1, 1.0))


@pytest.mark.parametrize("name", ["cad", "lqcd"])  # the mechanism is shared: one raw-logit and one -inf config
def test_cache_rollback_equals_no_cache(tiny_llama, name):
    build, formula = CONFIGS[name]
    ids, mask = pad_left(MAIN, 0)
    ids2, mask2 = pad_left(SECOND, 0)
    proc = build(tiny_llama, ids2, mask2)

    def expected(gen):
        ones = torch.ones((2, gen.shape[1]), dtype=torch.long)
        main = _full_logits(tiny_llama, torch.cat([ids, gen], 1), torch.cat([mask, ones], 1))
        second = _full_logits(tiny_llama, torch.cat([ids2, gen], 1), torch.cat([mask2, ones], 1))
        return main, formula(main, second)

    gens = [
        torch.zeros((2, 0), dtype=torch.long),  # the first call sees the prompt alone (as in generate())
        torch.tensor([[40, 41, 42, 43, 44], [50, 51, 52, 53, 54]]),  # a long generated part
        torch.tensor([[40, 41], [50, 51]]),  # rolled back to a prefix
        torch.tensor([[40, 41, 60, 61], [50, 70, 71, 72]]),  # replaced after a common prefix (differs per row)
        torch.tensor([[40, 41, 60, 61], [50, 70, 71, 72]]),  # the same input again (no forward)
        torch.zeros((2, 0), dtype=torch.long),  # back to the prompt alone
        torch.tensor([[90, 91, 92], [93, 94, 95]]),  # nothing in common
        torch.tensor([[93, 94, 95, 96], [90, 91, 92, 97]]),  # rows swapped (beam reordering is not allowed here:
    ]                                                       # the rows' second-view prompts differ)
    for gen in gens:
        main, want = expected(gen)
        got = proc(torch.cat([ids, gen], 1), main.clone())
        torch.testing.assert_close(got, want, atol=2e-4, rtol=1e-4)
    forwards = proc.stats["second_view_forwards"]
    proc(torch.cat([ids, gens[-1]], 1), expected(gens[-1])[0])
    assert proc.stats["second_view_forwards"] == forwards  # unchanged input: cached logits reused


def test_beam_reordering_reuses_cache(tiny_llama):
    # two beams of one prompt (same second-view prompt): permuted rows are matched and the cache reordered
    ids, mask = pad_left([MAIN[0], MAIN[0]], 0)
    ids2, mask2 = pad_left([SECOND[1]], 0)
    proc = ContextAwareDecodingProcessor(tiny_llama, ids2, mask2, alpha=0.5)
    gen1 = torch.tensor([[40, 41, 42], [50, 51, 52]])
    gen2 = torch.tensor([[50, 51, 52, 53], [40, 41, 42, 43]])
    for gen in (torch.zeros((2, 0), dtype=torch.long), gen1, gen2):
        ones = torch.ones((2, gen.shape[1]), dtype=torch.long)
        main = _full_logits(tiny_llama, torch.cat([ids, gen], 1), torch.cat([mask, ones], 1))
        second = _full_logits(tiny_llama, torch.cat([ids2.expand(2, -1), gen], 1),
                              torch.cat([mask2.expand(2, -1), ones], 1))
        got = proc(torch.cat([ids, gen], 1), main.clone())
        torch.testing.assert_close(got, _cad(main, second), atol=2e-4, rtol=1e-4)
    assert proc.stats["second_view_tokens"] == ids2.numel() * 2 + 3 * 2 + 1 * 2


def test_one_second_prompt_for_the_whole_batch_and_beam_search(tiny_gpt2):
    ids, mask = pad_left(MAIN, 0)
    uncond = torch.tensor([[1]])
    proc = ClassifierFreeGuidanceProcessor(tiny_gpt2, uncond, gamma=1.5)
    out = _generate(tiny_gpt2, proc, ids, mask)
    gen = out.sequences[:, ids.shape[1]:]
    t = 3
    ones = torch.ones((2, t), dtype=torch.long)
    main = _full_logits(tiny_gpt2, torch.cat([ids, gen[:, :t]], 1), torch.cat([mask, ones], 1))
    second = _full_logits(tiny_gpt2, torch.cat([uncond.expand(2, 1), gen[:, :t]], 1), torch.ones((2, 1 + t),
                                                                                                     dtype=torch.long))
    torch.testing.assert_close(out.scores[t], _cfg(main, second, 1.5), atol=2e-4, rtol=1e-4)
    # beam search (rows expanded and reordered by generate) runs through the same processor
    beams = tiny_gpt2.generate(input_ids=ids, attention_mask=mask, logits_processor=[proc], num_beams=2,
                               do_sample=False, max_new_tokens=4, pad_token_id=0)
    assert beams.shape == (2, ids.shape[1] + 4)


def test_errors(tiny_llama, tiny_gpt2):
    ids2, mask2 = pad_left(SECOND, 0)
    with pytest.raises(ValueError, match="second-view prompt"):
        ContextAwareDecodingProcessor(tiny_llama)
    with pytest.raises(ValueError, match="alpha"):
        ContextAwareDecodingProcessor(tiny_llama, ids2, mask2, alpha=-0.1)
    with pytest.raises(ValueError, match="gamma"):
        ClassifierFreeGuidanceProcessor(tiny_llama, ids2, mask2, gamma=0.5)
    with pytest.raises(ValueError, match="epsilon"):
        InstructiveDecodingProcessor(tiny_llama, ids2, mask2, epsilon=-0.3)
    with pytest.raises(ValueError, match="beta"):
        LeadingQueryContrastiveProcessor(tiny_llama, ids2, mask2, beta=1.5)
    with pytest.raises(ValueError, match="alpha"):
        LeadingQueryContrastiveProcessor(tiny_llama, ids2, mask2, alpha=float("nan"))
    with pytest.raises(ValueError, match="alpha"):
        ContrastiveDecodingProcessor(tiny_gpt2, alpha=1.5)
    with pytest.raises(ValueError, match="amateur_temperature"):
        ContrastiveDecodingProcessor(tiny_gpt2, amateur_temperature=0.0)
    with pytest.raises(ValueError, match="mask"):
        ContextAwareDecodingProcessor(tiny_llama, ids2, mask2[:, 1:])
    # mismatched batch sizes: 3 second-view prompts for a batch of 2
    ids, mask = pad_left(MAIN, 0)
    three, three_mask = pad_left([[20], [21], [22]], 0)
    proc = ContextAwareDecodingProcessor(tiny_llama, three, three_mask)
    with pytest.raises(ValueError, match="second-view prompt"):
        _generate(tiny_llama, proc, ids, mask)
    # an amateur with another vocabulary
    from transformers import GPT2Config, GPT2LMHeadModel

    other = GPT2LMHeadModel(GPT2Config(vocab_size=64, n_embd=16, n_layer=1, n_head=2, n_positions=64)).eval()
    with pytest.raises(ValueError, match="vocabulary"):
        ContrastiveDecodingProcessor(other, vocab_size=128)
    proc = ContrastiveDecodingProcessor(other, prompt_attention_mask=mask)
    with pytest.raises(ValueError, match="vocabulary"):
        _generate(tiny_llama, proc, ids, mask)


def _word_tokenizer():
    from tokenizers import Tokenizer
    from tokenizers.models import WordLevel
    from tokenizers.pre_tokenizers import Whitespace
    from transformers import PreTrainedTokenizerFast

    words = ["<pad>", "<s>", "</s>", "<unk>"] + [f"w{i}" for i in range(124)]
    tok = Tokenizer(WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    tok.pre_tokenizer = Whitespace()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", bos_token="<s>", eos_token="</s>",
                                   unk_token="<unk>")
    fast.padding_side = "left"
    return fast


def test_for_model_from_text(tiny_llama):
    tok = _word_tokenizer()
    main = tok(["w5 w6 w7 w8", "w9 w10"], return_tensors="pt", padding=True)
    cad = ContextAwareDecodingProcessor.for_model(tiny_llama, tok, no_context_prompts=["w7 w8", "w1 w2 w3 w10"],
                                                  alpha=1.0)
    assert cad.second_attention_mask.tolist() == [[0, 0, 1, 1], [1, 1, 1, 1]]
    out = _generate(tiny_llama, cad, main["input_ids"], main["attention_mask"])
    assert len(out.scores) == STEPS
    cfg = ClassifierFreeGuidanceProcessor.for_model(tiny_llama, tok)  # unconditional prompt: BOS for all rows
    assert cfg.second_input_ids.tolist() == [[tok.bos_token_id]]
    _generate(tiny_llama, cfg, main["input_ids"], main["attention_mask"])
    ins = InstructiveDecodingProcessor.for_model(tiny_llama, tok, task_inputs=["w7 w8", "w10"], variant="null")
    assert ins.second_input_ids.shape[0] == 2
    lq = LeadingQueryContrastiveProcessor.for_model(tiny_llama, tok, leading_prompts="w5 w6 w7 w8 w99")
    _generate(tiny_llama, lq, main["input_ids"], main["attention_mask"])
    cd = ContrastiveDecodingProcessor.for_model(tiny_llama, tok, amateur="self:1")
    _generate(tiny_llama, cd, main["input_ids"], main["attention_mask"])
    with pytest.raises(ValueError, match="no_context_prompts"):
        ContextAwareDecodingProcessor.for_model(tiny_llama, tok)
    with pytest.raises(ValueError, match="task_inputs"):
        InstructiveDecodingProcessor.for_model(tiny_llama, tok)
    assert noisy_instruction_prompt("Input: x").startswith("Always respond with the opposite")


def test_generic_combine_and_reset(tiny_gpt2):
    ids2, mask2 = pad_left(SECOND, 0)
    proc = ContrastiveContextProcessor(tiny_gpt2, ids2, mask2, combine=lambda a, b: a - b, space="log_probs")
    ids, mask = pad_left(MAIN, 0)
    _generate(tiny_gpt2, proc, ids, mask)
    assert proc.main_prompt_length == ids.shape[1]
    proc.reset()
    assert proc.main_prompt_length is None
    with pytest.raises(ValueError, match="space"):
        ContrastiveContextProcessor(tiny_gpt2, ids2, mask2, combine=lambda a, b: a, space="probs")


def test_speculative_engine_calls_at_tree_nodes(tiny_llama):
    # the engine calls processors at draft-tree nodes (rolled-back / replaced generated parts): greedy speculative
    # decoding with the processor must give exactly the plain greedy output with it
    from hf_decoding_ext.core.models import truncated_model
    from hf_decoding_ext.speculative import SpeculativeDecoding
    from hf_decoding_ext.speculative.drafters.draft_model import DraftModelDrafter

    ids = torch.tensor([[5, 6, 7, 8, 5, 6, 7, 8, 5, 6]])
    ids2 = torch.tensor([[20, 21, 5, 6]])
    kw = dict(do_sample=False, max_new_tokens=16, pad_token_id=0, eos_token_id=None)
    plain = tiny_llama.generate(input_ids=ids, logits_processor=[ContextAwareDecodingProcessor(tiny_llama, ids2)],
                                **kw)
    proc = ContextAwareDecodingProcessor(tiny_llama, ids2)
    spec = tiny_llama.generate(input_ids=ids, logits_processor=[proc],
                               custom_generate=SpeculativeDecoding(DraftModelDrafter(truncated_model(tiny_llama, 1))),
                               **kw)
    assert torch.equal(plain, spec)


def test_base_mechanism_needs_a_combination(tiny_llama):
    from hf_decoding_ext.contrastive.context import ContrastiveContextProcessor

    with pytest.raises(ValueError, match="needs a combination"):
        ContrastiveContextProcessor(tiny_llama, second_input_ids=torch.tensor([[3, 4]]))
