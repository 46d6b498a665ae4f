"""Issue 4 on the real default model (SmolLM2-135M-Instruct, fp32, CPU): each contrastive configuration shows its
paper's core quantity on the shipped evaluation data (``hf_decoding_ext/data/contrastive``).

Subsets keep the run short; the full-set figures are in ``results/contrastive_quality.json``
(``scripts/bench_contrastive.py``). Thresholds sit well inside the measured differences.
"""

from __future__ import annotations

import pytest
import torch

from hf_decoding_ext.bench.contrastive import (
    eval_instructions,
    eval_knowledge_conflict,
    eval_leading_queries,
    eval_open_ended,
    generate_texts,
)
from hf_decoding_ext.contrastive import (
    ClassifierFreeGuidanceProcessor,
    ContextAwareDecodingProcessor,
    ContrastiveDecodingProcessor,
    InstructiveDecodingProcessor,
    LeadingQueryContrastiveProcessor,
)
from hf_decoding_ext.contrastive.cad import cad_scores
from hf_decoding_ext.contrastive.dola import DoLa, dola_scorer
from hf_decoding_ext.bench.tasks.contrastive import evaluate_multiple_choice, load_factual_mc, model_scorer
from hf_decoding_ext.core.models import encode_prompts

pytestmark = pytest.mark.real_model
GREEDY = {"do_sample": False, "temperature": None, "top_k": None, "top_p": None}


def test_cad_follows_counterfactual_context_more_often(smollm):
    """CAD (alpha = 1, the paper's knowledge-conflict setting) makes answers follow the context instead of the
    model's memory far more often than greedy decoding (first 30 of 60 items)."""
    model, tokenizer = smollm
    res = eval_knowledge_conflict(model, tokenizer, alphas=(1.0,), limit=30, batch_size=15)
    greedy, cad = res["rates"]["greedy"], res["rates"]["cad_alpha_1.0"]
    assert cad["context"] >= greedy["context"] + 0.25, res["rates"]
    assert cad["memory"] < greedy["memory"], res["rates"]


def test_cad_batch_logits_equal_the_formula_on_the_real_model(smollm):
    """The processor's first-step scores in a left-padded batch equal (1 + a) z(c, x) - a z(x) from separate
    unpadded forwards."""
    model, tokenizer = smollm
    with_ctx = ["Context: The Moon is made of cheese.\nQuestion: What is the Moon made of?",
                "Context: Water boils at 40 degrees.\nQuestion: At what temperature does water boil?"]
    without = ["Question: What is the Moon made of?", "Question: At what temperature does water boil?"]
    proc = ContextAwareDecodingProcessor.for_model(model, tokenizer, no_context_prompts=without, alpha=1.0)
    enc = encode_prompts(tokenizer, with_ctx)
    with torch.no_grad():
        main = model(**enc).logits[:, -1].float()
        got = proc(enc["input_ids"], main.clone())
        for i in range(2):
            second = model(**encode_prompts(tokenizer, without[i])).logits[0, -1].float()
            torch.testing.assert_close(got[i], cad_scores(main[i], second, 1.0), atol=2e-3, rtol=1e-4)


@torch.no_grad()
def _logprob(model, tokenizer, prompt: str, continuation: list[int]) -> float:
    enc = encode_prompts(tokenizer, prompt)
    ids = torch.cat([enc["input_ids"][0], torch.tensor(continuation)])[None]
    logits = model(input_ids=ids).logits[0, enc["input_ids"].shape[1] - 1:-1]
    return float(torch.log_softmax(logits.float(), -1).gather(-1, torch.tensor(continuation)[:, None]).sum())


def test_cfg_outputs_are_more_specific_to_the_condition(smollm):
    """Classifier-free guidance (gamma = 2) raises the pointwise mutual information between the output and the
    condition, log p(y | x) - log p(y), per token: the 'more specific' outputs of the paper."""
    model, tokenizer = smollm
    cases = [("Answer in the voice of a pirate.", "Describe the weather today."),
             ("Mention a cat in your answer.", "Write one sentence about the morning."),
             ("Use only words about the sea.", "Describe a quiet evening."),
             ("Answer as a medieval knight.", "What do you like to eat?")]
    pmi = {1.0: [], 2.0: []}
    for condition, task in cases:
        prompt = f"{condition}\n{task}"
        enc = encode_prompts(tokenizer, prompt)
        for gamma in pmi:
            cfg = ClassifierFreeGuidanceProcessor.for_model(model, tokenizer, unconditional_prompts=[task],
                                                            gamma=gamma)
            out = model.generate(**enc, logits_processor=[cfg], max_new_tokens=24, **GREEDY)
            new = out[0, enc["input_ids"].shape[1]:].tolist()
            pmi[gamma].append((_logprob(model, tokenizer, prompt, new) - _logprob(model, tokenizer, task, new))
                              / len(new))
    mean = {g: sum(v) / len(v) for g, v in pmi.items()}
    assert mean[2.0] > mean[1.0] + 0.1, pmi
    assert sum(b > a for a, b in zip(pmi[1.0], pmi[2.0])) >= 3, pmi


@pytest.mark.slow
def test_instructive_decoding_follows_instructions_more_often(smollm):
    """Instructive decoding ('opposite' noisy instruction, epsilon = 0.3) on the 32 checkable instructions follows
    strictly more instructions than greedy decoding on the same items (the paper's claim; measured on this set,
    results/contrastive_quality.json: greedy 0.250, instructive 0.375, CFG gamma 2 0.4375). A no-op processor
    (outputs = greedy's) fails: the rates would be equal. In the slow run (71 s) to keep the default run under 30
    minutes."""
    model, tokenizer = smollm
    res = eval_instructions(model, tokenizer)
    rates = res["rates"]
    assert rates["instructive_eps_0.3"]["follows"] > rates["greedy"]["follows"], rates
    assert rates["cfg_gamma_2.0"]["follows"] > rates["greedy"]["follows"], rates


def test_lqcd_suppresses_the_leading_cue(smollm):
    """LQCD: answers repeat a wrong leading cue less often than greedy decoding on the leading query, and no more
    often than greedy on the neutral query (first 30 factual questions)."""
    model, tokenizer = smollm
    res = eval_leading_queries(model, tokenizer, limit=30, batch_size=15)
    r = res["rates"]
    assert r["lqcd_alpha_1.0"]["follows_cue"] <= r["greedy_neutral"]["follows_cue"], r
    assert r["lqcd_alpha_1.0"]["follows_cue"] < r["greedy_leading"]["follows_cue"] - 0.2, r


def test_contrastive_decoding_is_less_generic_than_greedy_and_more_coherent_than_nucleus(smollm):
    """Contrastive decoding with the registry's amateur (the expert's first 4 layers) on the paper's two axes.

    Diversity: more diverse (distinct-2) open-ended text than greedy decoding: CD penalises what the amateur also
    predicts (generic, repeated continuations). On the 8-prompt benchmark the repetition rate itself is not lower
    (greedy already repeats little at 64 tokens on this model; see results/contrastive_quality.json).

    Coherence: the paper scores it with SimCSE similarity of prompt and continuation (CD above nucleus sampling and
    greedy); no sentence encoder is available offline, so the stand-in is the expert's own perplexity of the
    continuation. CD is more coherent than nucleus sampling (top_p = 0.95, the paper's baseline) and, as the price
    of avoiding the most likely (generic) tokens, less likely than greedy's output, which maximises this stand-in
    by construction (the paper's CD > greedy direction is not measurable with it). Measured (3 prompts x 48
    tokens): perplexity greedy 2.12, CD 4.27, nucleus 7.70 (2 seeds); a no-op processor (CD = greedy) fails the
    diversity check and the greedy < CD inequality, random tokens fail the nucleus one.
    """
    from hf_decoding_ext.bench.quality import continuation_surprise

    model, tokenizer = smollm
    prompts = ["Write a short story about a lighthouse keeper.", "Tell me about your favourite season.",
               "Describe a walk through an old city."]
    res = eval_open_ended(model, tokenizer, prompts=prompts, max_new_tokens=48)
    m = res["metrics"]
    assert m["contrastive_decoding"]["distinct_2"] > m["greedy"]["distinct_2"], m
    bits = []
    for p in prompts:
        enc = encode_prompts(tokenizer, p)
        for seed in (0, 1):
            torch.manual_seed(seed)
            out = model.generate(**enc, do_sample=True, top_p=0.95, top_k=None, temperature=1.0, max_new_tokens=48)
            bits.extend(continuation_surprise(model, enc["input_ids"][0],
                                              out[0, enc["input_ids"].shape[1]:].tolist()).tolist())
    nucleus = 2.0 ** (sum(bits) / len(bits))
    cd, greedy = m["contrastive_decoding"]["perplexity"], m["greedy"]["perplexity"]
    print(f"perplexity: greedy {greedy:.2f}, CD {cd:.2f}, nucleus {nucleus:.2f}")
    assert greedy < cd < nucleus, (greedy, cd, nucleus)
    # eval_open_ended builds its processor with the registry's factory
    assert type(ContrastiveDecodingProcessor.for_model(model, tokenizer)).__name__ == "ContrastiveDecodingProcessor"


def test_dola_chooses_the_max_divergence_layer_on_the_real_model(smollm):
    """DoLa on SmolLM2: at each step the chosen premature layer is the candidate whose early exit diverges most
    (JSD) from the final layer, recomputed from a cache-free forward; the contrast changes some greedy tokens."""
    from hf_decoding_ext.contrastive.dola import layer_divergence

    model, tokenizer = smollm
    loop = DoLa(dola_layers="high", repetition_penalty=1.2)
    enc = encode_prompts(tokenizer, "Who wrote the play Romeo and Juliet?")
    out = model.generate(**enc, custom_generate=loop, max_new_tokens=12, **GREEDY)
    layers = loop.candidate_layers(model)
    with torch.no_grad():
        full = model(input_ids=out[:, :-1], output_hidden_states=True)
    start = enc["input_ids"].shape[1] - 1
    for step, chosen in enumerate(loop.last_premature_layers):
        pos = start + step
        final = full.logits[:, pos].float()
        prem = torch.stack([model.lm_head(model.model.norm(full.hidden_states[j][:, pos])).float()
                            for j in layers])
        div = layer_divergence(final, prem, "js")[:, 0]
        assert layers[int(div.argmax())] == chosen[0] or torch.isclose(div.max(), div[layers.index(chosen[0])],
                                                                        rtol=1e-3)
    plain = model.generate(**enc, max_new_tokens=12, repetition_penalty=1.2, **GREEDY)
    assert not torch.equal(plain, out)


def test_factual_mc_scorers_run_on_the_real_model(smollm):
    """Likelihood-based multiple choice under the plain model and under DoLa's contrast (first 8 questions): both
    give a valid prediction per item, and DoLa's per-token scores are the reference's (finite, -1000 off the head)."""
    model, tokenizer = smollm
    items = load_factual_mc()[:8]
    scorer = dola_scorer(model, "high")
    plain = evaluate_multiple_choice(items, tokenizer, model_scorer(model))
    dola = evaluate_multiple_choice(items, tokenizer, scorer)
    assert plain["n"] == dola["n"] == 8
    ids = encode_prompts(tokenizer, "Question: What is the capital of France?\nAnswer:")["input_ids"]
    lp = scorer(ids, first=ids.shape[1] - 2)
    assert lp.shape == (2, model.config.vocab_size)
    # reference lm_score values (issue 15): not renormalised; tokens outside the head get -1000
    assert (lp == -1000.0).any(dim=-1).all() and (lp > -1000.0).any(dim=-1).all()
    assert torch.isfinite(lp).all()


def test_second_view_processors_run_in_a_batch_on_the_real_model(smollm):
    """Instructive decoding and LQCD in one left-padded batch of two prompts of different lengths: each row equals
    the same processor run on that row alone."""
    model, tokenizer = smollm
    prompts = ["Answer in one word.\nWhat colour is the sky?", "Answer with a number.\nHow many legs has a cat?"]
    tasks = ["What colour is the sky?", "How many legs has a cat?"]
    leading = [t + " It is green, right?" for t in tasks]
    makers = [lambda idx: [InstructiveDecodingProcessor.for_model(model, tokenizer, task_inputs=[tasks[i] for i in idx])],
              lambda idx: [LeadingQueryContrastiveProcessor.for_model(model, tokenizer,
                                                                      leading_prompts=[leading[i] for i in idx])]]
    for make in makers:
        batch = generate_texts(model, tokenizer, prompts, make, max_new_tokens=8, batch_size=2)
        single = [generate_texts(model, tokenizer, [p], lambda idx, i=i: make([i]), max_new_tokens=8)[0]
                  for i, p in enumerate(prompts)]
        assert batch == single
