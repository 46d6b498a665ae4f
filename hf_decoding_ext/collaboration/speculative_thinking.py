"""Speculative Thinking (Wang Yang, Xiang Yue, Vipin Chaudhary, Xiaotian Han, "Speculative Thinking: Enhancing
Small-Model Reasoning with Large Model Guidance at Inference Time", arXiv 2504.12329, 2025). Official code:
uservan/speculative_thinking (``speculative/speculative_hf.py``, ``speculative/utils.py``,
``speculative/config/1b_32b.yml``); this is an independent implementation following its rules and defaults."""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from hf_decoding_ext.core.router import Decoder, RouterLoop, RouterRun, decode_tail, make_decoder

TRIGGERS = ("\n\n",)
"""Official ``TRIGGER_TOKENS``: a small-model token whose decoded text contains one of these is a trigger."""

KEYWORDS = {
    "verify": ("verify", "think again", "recap", "check"),
    "negative": ("wait", "alternatively", "hold on", "another"),
    "positive": ("yeah", "yes", "final answer", "confident"),
}
"""Official ``TARGET_VALIDATION_KEYWORDS`` (matched as lower-case substrings)."""

RECAP_PROMPT = "Let me check whether there are some wrong steps:"
"""Official ``help_recap_words``, inserted before the large model's recap."""

DEFAULTS = {"snippet_tokens": 20, "verify_tokens": 125, "recap_tokens": 125, "recap_after": 15, "recap_step": 25,
            "max_recap_tokens": 200, "negative_step": 5, "max_negative": 30}
"""Official budgets (``1b_32b.yml``): ``max_target_tokens`` 20, ``original_recap_token_num`` 125 (also the verify
span), ``recap_after_negative_num`` 15, ``add_each_recap`` 25, ``max_recap_token_num`` 200, ``add_each_neg`` 5,
``max_negative_num`` 30."""

PAPER_FIDELITY = (
    ("trigger", ("faithful: after each token the small model writes, its decoded text (that one token) is searched "
                 "for '\\n\\n'; tokens the large model writes do not trigger. Extension: trigger_window=k decodes "
                 "the last k generated tokens (a trigger split over tokens, e.g. SmolLM2 writing two '\\n' tokens); "
                 "it fires once, on the token that completes it")),
    ("snippet classification", ("faithful: at a trigger the small model drafts the next 20 tokens (look-ahead) and "
                                "the text is scored as in the official sentiment_analysis: counts of positive "
                                "keywords against negative + verify keywords (lower-case substrings); more positive "
                                "-> +1, more negative or a tie above zero -> -1, none -> 0")),
    ("reflective hand-over", ("faithful to the official config (choose_large: true): a snippet scoring != 0 is "
                              "discarded and the large model writes the 20 tokens from the same point; the "
                              "choose_large=false comparison of both snippets is not implemented (simplification)")),
    ("verify span", ("faithful: if the large model's snippet contains a verify keyword it also writes the next 125 "
                     "tokens")),
    ("negative counter and recap", ("faithful: a large snippet scoring -1 counts one negative sentence; at the next "
                                    "trigger once the count reaches 15 the recap prompt 'Let me check whether there "
                                    "are some wrong steps:' is appended to the sequence (both models are fed it) and "
                                    "the large model writes 125 tokens; then the count resets, the recap budget grows "
                                    "by 25 (at most 200) and the threshold by 5 (at most 30). Inserted tokens are "
                                    "recorded with model 'inserted' and are not counted as produced by either model; "
                                    "with output_scores they have no score (scores are shorter than the new tokens)")),
    ("non-reflective snippet", ("faithful to the HF code: the look-ahead draft is discarded and the small model goes "
                                "on token by token (with greedy decoding it rewrites the same tokens); the "
                                "look-ahead's compute is counted in the small model's forwards and tokens fed, and "
                                "separately as lookahead_tokens_fed")),
    ("begin / help_think_word / time_out", ("simplification: the official options begin (large model writes the "
                                            "first 100 tokens; false in the config), help_think_word (null) and "
                                            "time_out are not implemented")),
    ("sampling", ("the caller's generate() settings (greedy or sampling, processors) apply to both models and to "
                  "the look-ahead; the official runs use temperature 0.6, top-p 0.95, top-k 50")),
    ("models", ("deviation: small = the library's distilled draft of SmolLM2-135M-Instruct, large = the full model "
                "(paper: DeepSeek-R1-Distill-Qwen 1.5B guided by 32B); SmolLM2 rarely emits the keywords, so at "
                "135M only the mechanics are exercised")),
    ("batch", "deviation: batch size 1 only"),
)


def fidelity_markdown() -> str:
    return "\n".join(f"- **{k}**: {v}" for k, v in PAPER_FIDELITY)


def count_keywords(text: str, words: Sequence[str]) -> tuple[int, int]:
    """``(occurrences, last index)`` of the keywords in lower-cased ``text`` (index -1 when none)."""
    text = text.lower()
    return sum(text.count(w) for w in words), max((text.rfind(w) for w in words), default=-1)


def classify_snippet(text: str, keywords: dict[str, Sequence[str]] = KEYWORDS) -> int:
    """The official snippet score: +1 when positive keywords outnumber negative + verify ones, -1 when the latter
    outnumber the former or tie above zero, 0 when none occurs. ``-1`` or ``+1`` makes the snippet reflective."""
    pos, _ = count_keywords(text, keywords["positive"])
    neg, _ = count_keywords(text, tuple(keywords["negative"]) + tuple(keywords["verify"]))
    if pos > neg:
        return 1
    if neg > 0:
        return -1
    return 0


def contains_keyword(text: str, words: Sequence[str]) -> bool:
    text = text.lower()
    return any(w in text for w in words)


def _positive_int(name, value, allow_zero=False):
    low = 0 if allow_zero else 1
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise ValueError(f"{name} must be an integer >= {low}, got {value!r}")
    return value


class SpeculativeThinking(RouterLoop):
    """Speculative Thinking (Yang et al., arXiv 2504.12329): the small model writes; after a small-model token whose
    text contains ``"\\n\\n"`` it drafts the next ``snippet_tokens`` (20) tokens, scored by keyword lists
    (:func:`classify_snippet`); a reflective snippet (score != 0) is replaced by ``snippet_tokens`` tokens of the
    large model, which also writes the next ``verify_tokens`` (125) when its snippet contains a verify keyword. Large
    snippets scoring -1 are counted; when the count reaches ``recap_after`` (15), the next trigger appends the recap
    prompt and the large model writes ``recap_tokens`` (125, then +25 per recap up to 200; the threshold +5 up to
    30). Lossy; both models ingest every token, each only when it writes (plus the small model's look-ahead).

    No trigger (or no keyword in any snippet) gives the small model's own output and the large model never runs.
    Records (``router_steps``) carry, on the token after a trigger, ``trigger``, ``snippet``/``snippet_len``/``snippet_score`` (the look-ahead), ``large_score``,
    ``action`` (``"reflect"``, ``"verify"``, ``"recap"``); inserted recap tokens have ``model == "inserted"``. The
    summary adds ``speculative_thinking``: triggers, reflective snippets, verify spans, recaps, inserted tokens,
    look-ahead forwards and tokens fed, final negative count.

    Deviations and simplifications: :data:`PAPER_FIDELITY`.

    Args:
        small: the small model (shares the large model's tokenizer).
        tokenizer: decodes tokens and encodes the recap prompt; or pass ``decode`` (and ``recap_ids``).
        decode: a ``list[int] -> str`` callable replacing ``tokenizer.decode``.
        recap_ids: token ids of the recap prompt (default: ``tokenizer`` encodes :data:`RECAP_PROMPT`; without a
            tokenizer no prompt is inserted and the large model writes the recap alone).
        triggers, keywords: :data:`TRIGGERS`, :data:`KEYWORDS` by default.
        snippet_tokens, verify_tokens, recap_tokens, recap_after, recap_step, max_recap_tokens, negative_step,
            max_negative: the official budgets (:data:`DEFAULTS`).
        trigger_window: generated tokens decoded for the trigger check (official: 1, the newest token only; with
            a tokenizer that writes "\\n\\n" as two "\\n" tokens, 2 is needed for any trigger to fire).

    Example:
        >>> from hf_decoding_ext.core.models import load_model
        >>> from hf_decoding_ext.collaboration.speculative_thinking import SpeculativeThinking, classify_snippet
        >>> model, tok = load_model()  # doctest: +SKIP
        >>> loop = SpeculativeThinking.for_model(model, tok)  # doctest: +SKIP
        >>> inputs = tok("What is 17 * 23? Think step by step.", return_tensors="pt")  # doctest: +SKIP
        >>> out = model.generate(**inputs, max_new_tokens=64, do_sample=False, custom_generate=loop,
        ...                      return_dict_in_generate=True)  # doctest: +SKIP
        >>> classify_snippet("Wait, let me check"), classify_snippet("Yes, final answer"), classify_snippet("so 4")
        (-1, 1, 0)
    """

    small_logits_every_step = False

    def __init__(self, small, tokenizer=None, decode: Decoder | None = None, recap_ids: Sequence[int] | None = None,
                 triggers: Sequence[str] = TRIGGERS, keywords: dict[str, Sequence[str]] | None = None,
                 snippet_tokens: int = 20, verify_tokens: int = 125, recap_tokens: int = 125,
                 recap_after: float = 15, recap_step: int = 25, max_recap_tokens: int = 200,
                 negative_step: int = 5, max_negative: int = 30, trigger_window: int = 1):
        self.decode = make_decoder(tokenizer, decode)
        if isinstance(triggers, str) or not triggers or not all(isinstance(t, str) and t for t in triggers):
            raise ValueError(f"triggers must be a non-empty sequence of non-empty strings, got {triggers!r}")
        keywords = dict(KEYWORDS if keywords is None else keywords)
        if set(keywords) != set(KEYWORDS) or any(isinstance(v, str) for v in keywords.values()):
            raise ValueError(f"keywords must map exactly {sorted(KEYWORDS)} to sequences of strings, got {keywords!r}")
        self.snippet_tokens = _positive_int("snippet_tokens", snippet_tokens)
        self.verify_tokens = _positive_int("verify_tokens", verify_tokens)
        self.recap_tokens = _positive_int("recap_tokens", recap_tokens)
        if recap_after != math.inf:
            _positive_int("recap_after", recap_after)
        self.recap_after = recap_after
        self.recap_step = _positive_int("recap_step", recap_step, allow_zero=True)
        self.max_recap_tokens = _positive_int("max_recap_tokens", max_recap_tokens)
        self.negative_step = _positive_int("negative_step", negative_step, allow_zero=True)
        self.max_negative = _positive_int("max_negative", max_negative)
        self.trigger_window = _positive_int("trigger_window", trigger_window)
        if recap_ids is None and tokenizer is not None and callable(tokenizer):
            recap_ids = tokenizer(RECAP_PROMPT, add_special_tokens=False)["input_ids"]
        recap_ids = tuple(recap_ids or ())
        if any(isinstance(t, bool) or not isinstance(t, int) or t < 0 for t in recap_ids):
            raise ValueError(f"recap_ids must be token ids (integers >= 0), got {recap_ids!r}")
        super().__init__(small)
        self.triggers = tuple(triggers)
        self.keywords = {k: tuple(w.lower() for w in v) for k, v in keywords.items()}
        self.recap_ids = recap_ids

    @classmethod
    def for_model(cls, model=None, tokenizer=None, small="distilled", **kwargs) -> SpeculativeThinking:
        """Registry/CLI factory. ``small``: a model, or a name as in
        :meth:`~hf_decoding_ext.speculative.drafters.draft_model.DraftModelDrafter.load_assistant` (``"distilled"``:
        the library's distilled draft of the default model; ``"self:N"``: the large model's first N layers). Without
        ``tokenizer`` the large model's own is loaded (``AutoTokenizer``). Other arguments: the constructor's."""
        if tokenizer is None and kwargs.get("decode") is None:
            from transformers import AutoTokenizer

            tokenizer = AutoTokenizer.from_pretrained(model.name_or_path)
        if isinstance(small, str):
            from hf_decoding_ext.speculative.drafters.draft_model import (
                DraftModelDrafter,
            )

            small = DraftModelDrafter.load_assistant(model, small)
        return cls(small, tokenizer, **kwargs)

    # ------------------------------------------------------------------------------------------------ accounting
    def summary(self):
        s = super().summary()
        if self.last_run is not None:
            x = self.last_run.extra
            s["speculative_thinking"] = {k: x[k] for k in ("triggers", "reflective", "verify_spans", "recaps",
                                                           "inserted_tokens", "lookahead_forwards",
                                                           "lookahead_tokens_fed", "negative")}
        return s

    def run(self, state):
        out = super().run(state)
        out["router"] = self.summary()
        return out

    def begin(self, state, run: RouterRun) -> None:
        run.extra.update(triggers=0, reflective=0, verify_spans=0, recaps=0, inserted_tokens=0, lookahead_forwards=0,
                         lookahead_tokens_fed=0, negative=0, check_from=None, recap_tokens=self.recap_tokens,
                         recap_after=self.recap_after)

    # ------------------------------------------------------------------------------------------------ look-ahead
    def draft(self, state, run: RouterRun, k: int) -> list[int]:
        """The small model's next ``k`` tokens (caller's processors, greedy or sampled) from the committed sequence,
        not committed: its cache is cropped back to all committed tokens but the last afterwards (the small model's next
        forward feeds that token again, for its logits). Stops at eos or ``max_length``.
        Its forwards are counted in the small model's accounting."""
        cache, committed = run.small_cache, state.input_ids.shape[1]
        limit = state.generation_config.max_length
        if limit is not None:
            k = min(k, limit - committed)
        eos = state.generation_config.eos_token_id
        eos = set() if eos is None else {eos} if isinstance(eos, int) else set(eos)
        ids, mask = state.input_ids, state.attention_mask
        device, tokens = self.small.device, []
        for _ in range(k):
            cached = cache.get_seq_length()
            new = ids[:, cached:]
            out = self.small(input_ids=new.to(device), attention_mask=mask.to(device),
                             position_ids=state.position_ids(mask)[:, cached:].to(device), past_key_values=cache,
                             use_cache=True, logits_to_keep=1, return_dict=True)
            self._count(run, "small", new.shape[1])
            run.extra["lookahead_forwards"] += 1
            run.extra["lookahead_tokens_fed"] += new.shape[1]
            raw = out.logits[:, -1, :].float().to(state.device)
            token = state.select(state.process(raw, input_ids=ids))
            tokens.append(int(token[0]))
            ids = torch.cat([ids, token[:, None].to(ids.dtype)], dim=1)
            mask = torch.cat([mask, mask.new_ones((1, 1))], dim=1)
            if tokens[-1] in eos:
                break
        extra = cache.get_seq_length() - (committed - 1)  # the last committed token is fed again for its logits
        if extra > 0:
            cache.crop(-extra)
        return tokens

    def insert(self, state, run: RouterRun, ids: Sequence[int]) -> int:
        """Append prompt tokens to the sequence (stopping criteria honoured), recorded with model ``"inserted"``."""
        if not ids:
            return 0
        appended = state.append(torch.tensor([list(ids)], device=state.device))
        for t in ids[:appended]:
            run.records.append({"step": len(run.records), "model": "inserted", "token": int(t),
                                "fed": {"small": 0, "large": 0}})
        run.extra["inserted_tokens"] += appended
        return appended

    # ------------------------------------------------------------------------------------------------ routing
    def triggered(self, state, run: RouterRun) -> bool:
        """Whether the newest token completes a trigger: the decoded text of the last ``trigger_window`` generated
        tokens contains a trigger string and, for a window > 1, the same text without the newest token does not
        (so a trigger fires once)."""
        ids, start, k = state.input_ids, run.prompt_length, self.trigger_window
        if not any(t in decode_tail(self.decode, ids, start, k) for t in self.triggers):
            return False
        return k == 1 or not any(t in decode_tail(self.decode, ids[:, :-1], start, k - 1) for t in self.triggers)

    def choose(self, state, run: RouterRun, small_logits):
        x, ids = run.extra, state.input_ids
        if x["check_from"] is not None:  # the large model just wrote a reflective snippet
            text = self.decode(ids[0, x["check_from"]:].tolist())
            x["check_from"] = None
            score = classify_snippet(text, self.keywords)
            if score < 0:
                x["negative"] += 1
            run.note(large_score=score)
            if contains_keyword(text, self.keywords["verify"]):
                x["verify_spans"] += 1
                run.note(action="verify")
                return "large", self.verify_tokens
        if run.current != "small" or not self.triggered(state, run):
            return "small"
        x["triggers"] += 1
        run.note(trigger=True)
        if x["negative"] >= x["recap_after"]:
            budget = x["recap_tokens"]
            x["negative"], x["recaps"] = 0, x["recaps"] + 1
            x["recap_tokens"] = min(budget + self.recap_step, self.max_recap_tokens)
            x["recap_after"] = min(x["recap_after"] + self.negative_step, self.max_negative)
            self.insert(state, run, self.recap_ids)
            run.note(action="recap")
            return "large", budget
        snippet = self.draft(state, run, self.snippet_tokens)
        text = self.decode(snippet)
        score = classify_snippet(text, self.keywords)
        run.note(snippet=text, snippet_len=len(snippet), snippet_score=score)
        if score == 0:
            return "small"
        x["reflective"] += 1
        x["check_from"] = ids.shape[1]
        run.note(action="reflect")
        return "large", self.snippet_tokens
