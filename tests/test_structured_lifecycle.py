"""The structured processors stay exact inside this library's loops and engine (issue 15, "methods combined must stay
exact", structured family).

Each structured logits processor (the grammar / JSON-schema processor, the extractive-span processor, the
monitor-guided processor) is combined with each loop that calls logits processors (AdaDec, Cautious NTP, Superposed
Decoding, IPS, the speculative engine with a training-free drafter in greedy and sampling mode, the draft-model
drafter, Dynamic Beam Allocation, which reorders beams). A stateless recorder placed after the processor sees every call the loop makes (main steps, lookahead
branches, trials, drafts, tree nodes); the mask of every call must equal the mask of a fresh processor replayed
token by token on the same row (what ``generate()`` would compute for that prefix), every returned row must be made
of tokens its mask allowed, the engine in greedy mode must be token-identical to plain greedy generation and DBA
without constraints to ``generate()``'s beam search. DBA must also carry the per-row state of lifecycle processors
through its beam reordering, and refuse a stateful processor without the lifecycle.
"""

from __future__ import annotations


import pytest
import torch
from transformers import LogitsProcessor

from hf_decoding_ext.core.lifecycle import StatefulLogitsProcessor
from hf_decoding_ext.core.tree import DraftTree
from hf_decoding_ext.sampling.adadec import AdaDec
from hf_decoding_ext.sampling.cautious import CautiousNTP
from hf_decoding_ext.sampling.ips import IsotropicProximalSearch
from hf_decoding_ext.sampling.superposed import SuperposedDecoding
from hf_decoding_ext.speculative import SpeculativeDecoding
from hf_decoding_ext.speculative.drafters.base import Draft, Drafter
from hf_decoding_ext.speculative.drafters.draft_model import DraftModelDrafter
from hf_decoding_ext.speculative.drafters.prompt_lookup import PromptLookupDrafter
from hf_decoding_ext.structured.exact_extractive import ExtractiveSpanLogitsProcessor
from hf_decoding_ext.structured.json_schema import (
    GrammarConstrainedLogitsProcessor,
    JsonSchemaLogitsProcessor,
)
from hf_decoding_ext.structured.lexical_dba import DynamicBeamAllocation
from conftest import StatefulWithoutLifecycle, perturbed_copy

VOCAB, EOS = 128, 2
REGEX = r"[a-z]{1,4}( [a-z]{1,4}){0,5}"
SCHEMA = {"type": "object", "properties": {"a": {"type": "integer"}, "b": {"type": "string", "maxLength": 4}},
          "required": ["a", "b"], "additionalProperties": False}
CONTEXT = "hello world, this is the tiny test of tea at ten"
CODE = ("class Box:\n    def __init__(self):\n        self.width = 0\n        self.weight = 1\n\n"
        "box = Box()\nprint(box.")


def _ids(tokenizer, text):
    return torch.tensor([tokenizer(text, add_special_tokens=False)["input_ids"]])


PROCESSORS = {
    "grammar": (lambda tok: GrammarConstrainedLogitsProcessor(tok, regex=REGEX, eos_token_id=EOS, vocab_size=VOCAB),
                "Say a few words: "),
    "json": (lambda tok: JsonSchemaLogitsProcessor(tok, SCHEMA, whitespace_flexible=True, eos_token_id=EOS,
                                                   vocab_size=VOCAB), "JSON: "),
    "extractive": (lambda tok: ExtractiveSpanLogitsProcessor(_ids(tok, CONTEXT)[0], eos_token_id=EOS),
                   CONTEXT + "\nQ: what? A: "),
    "monitor": (None, CODE),
}


def _make(name, tokenizer):
    if name == "monitor":
        pytest.importorskip("jedi")
        from hf_decoding_ext.structured.monitor_guided import (
            MonitorGuidedLogitsProcessor,
        )

        return MonitorGuidedLogitsProcessor(tokenizer, prompt_code=CODE, file_path="app.py")
    return PROCESSORS[name][0](tokenizer)


class _Recorder(LogitsProcessor):
    """Stateless: records the rows and the mask (finite scores) of every call it sees."""

    def __init__(self):
        self.calls = []

    def __call__(self, input_ids, scores):
        self.calls.append((input_ids.detach().cpu().clone(), torch.isfinite(scores).cpu()))
        return scores


class _Reference:
    """The mask a processor gives each row in plain ``generate()``: one fresh processor (reset) per row, called on
    the prompt and then on every prefix, one token at a time."""

    def __init__(self, processor, prompt_length: int):
        self.processor, self.prompt_length, self.memo = processor, prompt_length, {}

    def mask(self, row: torch.Tensor) -> torch.Tensor:
        key = tuple(row.tolist())
        if key not in self.memo:
            self.processor.reset()
            for t in range(self.prompt_length, row.shape[0] + 1):
                out = self.processor(row[None, :t], torch.zeros(1, VOCAB))
            self.memo[key] = torch.isfinite(out[0])
        return self.memo[key]


def _check_every_call(recorder, reference):
    assert recorder.calls, "the processors were never called"
    bad = []
    for i, (ids, mask) in enumerate(recorder.calls):
        for r in range(ids.shape[0]):
            if not torch.equal(mask[r], reference.mask(ids[r])):
                bad.append((i, r, ids.shape))
    assert not bad, f"{len(bad)} of {sum(c[0].shape[0] for c in recorder.calls)} masks differ from plain " \
                    f"generate()'s, first (call, row, ids shape): {bad[:3]}"


def _check_valid(sequences, reference):
    """Every generated token (up to the first eos) was allowed after its prefix."""
    p = reference.prompt_length
    for row in sequences:
        for t in range(p, row.shape[0]):
            assert bool(reference.mask(row[:t])[row[t]]), f"token {int(row[t])} at {t} is not allowed"
            if int(row[t]) == EOS:
                break


# ------------------------------------------------------------------------------------------------ the loops


class _PathTree(Drafter):
    """Training-free tree drafter: a branch that follows a reference continuation (accepted when the target agrees)
    and distractor siblings at every depth, so that nodes off the accepted path are drafted and rejected."""

    def __init__(self, reference: torch.Tensor):
        self.reference = reference

    def propose(self, state) -> Draft:
        pos = state.input_ids.shape[1]
        ref = self.reference[0, pos: pos + 3].tolist()
        if not ref:
            return Draft(DraftTree(torch.zeros(0, dtype=torch.long), []))
        tokens, parents = [], []
        parent = -1
        for t in ref:
            tokens += [(t + 1) % VOCAB, t]
            parents += [parent, parent]
            parent = len(tokens) - 1
        return Draft(DraftTree(tokens, parents))


LOOPS = {
    "adadec": (lambda model, ref: AdaDec(threshold=0.0, top_k=3, lookahead_length=3), False),
    "cautious": (lambda model, ref: CautiousNTP(punctuation_ids=[4, 16, 18], min_trials=3, max_trials=3,
                                                max_trial_tokens=3), True),
    "superposed": (lambda model, ref: SuperposedDecoding(num_drafts=2, alpha=0.0), False),
    "ips": (lambda model, ref: IsotropicProximalSearch(alpha=0.6, top_k=3, first_steps=1), False),
    "tree-greedy": (lambda model, ref: SpeculativeDecoding(_PathTree(ref)), False),
    "tree-sampling": (lambda model, ref: SpeculativeDecoding(_PathTree(ref), seed=0), True),
    "prompt-lookup": (lambda model, ref: SpeculativeDecoding(PromptLookupDrafter(num_tokens=3)), False),
    "draft-model-greedy": (lambda model, ref: SpeculativeDecoding(DraftModelDrafter(perturbed_copy(model, 0.3),
                                                                                    num_tokens=3)), False),
    "draft-model-sampling": (lambda model, ref: SpeculativeDecoding(DraftModelDrafter(perturbed_copy(model, 0.3),
                                                                                      num_tokens=3), seed=0), True),
    "dba": (lambda model, ref: DynamicBeamAllocation(constraints=None, num_beams=2), False),  # plain beam search
}
MAX_NEW = 8


def _generate(model, prompt, processors, loop=None, sample=False, seed=0):
    torch.manual_seed(seed)
    kwargs = {} if loop is None else {"custom_generate": loop}
    return model.generate(prompt, attention_mask=torch.ones_like(prompt), logits_processor=processors,
                          do_sample=sample, top_k=0 if sample else None, max_new_tokens=MAX_NEW, pad_token_id=0,
                          eos_token_id=EOS, return_dict_in_generate=True, **kwargs)


@pytest.mark.parametrize("loop_name", sorted(LOOPS))
@pytest.mark.parametrize("proc_name", sorted(PROCESSORS))
def test_structured_processor_in_loop_is_exact(tiny_llama, char_tokenizer, proc_name, loop_name):
    make_loop, sample = LOOPS[loop_name]
    prompt = _ids(char_tokenizer, PROCESSORS[proc_name][1])
    reference = _Reference(_make(proc_name, char_tokenizer), prompt.shape[1])
    plain = _generate(tiny_llama, prompt, [_make(proc_name, char_tokenizer)], sample=sample)
    _check_valid(plain.sequences, reference)
    recorder = _Recorder()
    loop = make_loop(tiny_llama, plain.sequences)
    out = _generate(tiny_llama, prompt, [_make(proc_name, char_tokenizer), recorder], loop=loop, sample=sample)
    _check_every_call(recorder, reference)
    _check_valid(out.sequences, reference)
    if isinstance(loop, SpeculativeDecoding):
        if loop_name.startswith("tree"):
            assert sum(s.draft_size for s in loop.last_stats) > sum(s.accepted for s in loop.last_stats)
        if not sample:  # lossless: token-identical to plain greedy with the processor
            assert torch.equal(out.sequences, plain.sequences)
    if loop_name == "dba":  # without constraints DBA is generate()'s beam search, with the processor too
        torch.manual_seed(0)
        beams = tiny_llama.generate(prompt, attention_mask=torch.ones_like(prompt), num_beams=2, do_sample=False,
                                    logits_processor=[_make(proc_name, char_tokenizer)], max_new_tokens=MAX_NEW,
                                    pad_token_id=0, eos_token_id=EOS)
        assert torch.equal(out.sequences, beams)


# ------------------------------------------------------------------------------------------------ beam reordering
class _RowHistory(StatefulLogitsProcessor, LogitsProcessor):
    """Per-row state kept by row index and updated from the last token only (nothing re-synchronises it): it
    stays equal to each row's generated tokens only if the loop tells it how rows are reordered."""

    state_attributes = ("seen",)

    def __init__(self):
        self.reset()
        self.consistent: list[bool] = []
        self.reorders = 0

    def reset(self):
        self.seen, self.prompt_length = None, None

    def begin(self, input_ids):
        self.prompt_length = input_ids.shape[1]
        self.seen = [[] for _ in range(input_ids.shape[0])]

    def select_rows(self, indices):
        indices = indices.tolist()
        self.reorders += indices != sorted(indices)
        self.seen = [list(self.seen[i]) for i in indices]

    def __call__(self, input_ids, scores):
        generated = input_ids[:, self.prompt_length:].tolist()
        for row, tokens in zip(self.seen, generated):
            if tokens:
                row.append(tokens[-1])
        self.consistent.append(self.seen == generated)
        return scores


def test_dba_reorders_the_processors_rows_with_its_beams(tiny_llama):
    history = _RowHistory()
    prompt = torch.tensor([[1, 17, 33, 45, 9, 60, 71]])
    tiny_llama.generate(prompt, attention_mask=torch.ones_like(prompt), logits_processor=[history],
                        custom_generate=DynamicBeamAllocation(constraints=[[40], [50, 51]], num_beams=4),
                        num_beams=4, do_sample=False, max_new_tokens=8, pad_token_id=0, eos_token_id=EOS)
    assert len(history.consistent) > 4 and all(history.consistent)
    assert history.reorders > 0  # beams were reordered, and the processor was told


_Unsupported = StatefulWithoutLifecycle


def test_dba_refuses_a_stateful_processor_without_the_lifecycle(tiny_llama):
    proc = _Unsupported()
    prompt = torch.tensor([[1, 17, 33, 45]])
    with pytest.raises(ValueError, match="DynamicBeamAllocation.*lifecycle"):
        tiny_llama.generate(prompt, attention_mask=torch.ones_like(prompt), logits_processor=[proc],
                            custom_generate=DynamicBeamAllocation(num_beams=2), max_new_tokens=4, pad_token_id=0)
    assert proc.calls == 0
