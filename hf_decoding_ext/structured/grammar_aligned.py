"""Grammar-aligned decoding: ASAp (adaptive sampling with approximate expected futures)."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from hf_decoding_ext.core.loop import DecodingLoop, GenerationState
from hf_decoding_ext.structured.grammar import Grammar, RowMatchers, as_grammar, compile_grammar, eos_ids_of


@dataclass
class _Node:
    """A visited prefix: the allowed probability mass under the target distribution and the visited children's
    probabilities."""

    mass: float
    children: dict[int, float] = field(default_factory=dict)


class GrammarAlignedSampling(DecodingLoop):
    r"""
    ASAp, from "Grammar-Aligned Decoding" (Park, Wang, Berg-Kirkpatrick, Polikarpova, D'Antoni; arXiv 2405.21047):
    sampling under a grammar whose output distribution converges to the model's distribution *conditioned on
    grammaticality*, ``P(w | w in L(G)) \propto P(w) 1[w in L(G)]``, which plain grammar-constrained decoding (GCD)
    does not give.

    The exact sampler would draw ``w_i`` with probability ``P(w_i | w_<i) EFG(w_<=i) / EFG(w_<i)``, where the
    *expected future grammaticality* ``EFG(w) = sum over completions u of P(u | w) 1[wu in L(G)]`` is intractable.
    GCD uses the crudest over-approximation ``EFG(w) ~ 1[w is a viable prefix]`` (the grammar's token mask). ASAp
    keeps a trie of every prefix it has sampled and, after each sample, tightens the approximation bottom-up along
    the sampled path:

    .. math:: \widetilde{EFG}(w) = \sum_{t} P(t \mid w)\, \widetilde{EFG}(w t), \qquad
              \widetilde{EFG}(w t) = 1[w t \text{ viable}] \text{ for unvisited children, } 1 \text{ for } t = eos

    (``sum over allowed t of P(t|w)`` minus ``P(c|w) (1 - EFG~(wc))`` for every visited child ``c``). The next sample
    draws from ``P(t | w) EFG~(w t)`` normalised. The approximations only decrease and stay upper bounds, and once
    every prefix is explored they are exact, so the sampling distribution converges to the conditional one. The trie
    lives on this instance and keeps learning across ``generate()`` calls for the same prompt (keyed by the prompt's
    tokens); :meth:`reset` forgets it.

    ``P`` is the model's own next-token distribution (temperature 1, no truncation), as in the paper. The caller's
    logits processors (temperature, top-k, top-p, ...) act on ASAp's proposal, as they act on the masked scores in
    :class:`~hf_decoding_ext.structured.json_schema.GrammarConstrainedLogitsProcessor`; for the exact algorithm pass
    ``top_k=0`` (transformers' default generation config has ``top_k=50``) and no other warpers.
    ``do_sample=True`` is required.

    Args:
        tokenizer: the model's fast tokenizer.
        grammar: a :class:`~hf_decoding_ext.structured.grammar.Grammar` or a JSON-schema dict; or one of
        json_schema, regex, lark: the constraint as in
            :class:`~hf_decoding_ext.structured.json_schema.GrammarConstrainedLogitsProcessor`.
        eos_token_id: eos id(s) (default: the tokenizer's; :meth:`for_model` takes the model's generation config).
        vocab_size: width of the model's logits (default ``len(tokenizer)``).

    Deviations: rows of one batch (or ``num_return_sequences`` copies) are drawn in parallel from the same trie
    snapshot and the trie is updated after the batch; the paper draws samples one after the other (call
    ``generate()`` with batch size 1 repeatedly for the strictly sequential algorithm). A sample cut by
    ``max_new_tokens`` updates its path with its last prefix left unexpanded (EFG~ = 1).

    Example:
        >>> from hf_decoding_ext.structured import grammar as G
        >>> from hf_decoding_ext.structured.grammar_aligned import GrammarAlignedSampling
        >>> asap = GrammarAlignedSampling.for_model(model, tokenizer, G.regex("(yes|no|maybe)"))  # doctest: +SKIP
        >>> for _ in range(100):  # every sample tightens the approximation for this prompt
        ...     out = model.generate(**inputs, custom_generate=asap, do_sample=True, top_k=0,
        ...                          max_new_tokens=8)  # doctest: +SKIP
        >>> asap.expected_future_grammaticality(inputs.input_ids[0], [])  # EFG~ of the empty prefix  # doctest: +SKIP
    """

    supports_greedy = False

    def __init__(self, tokenizer, grammar: Grammar | dict | None = None, *, json_schema=None, regex=None, lark=None,
                 eos_token_id=None, vocab_size: int | None = None):
        self.grammar = as_grammar(grammar, json_schema_=json_schema, regex_=regex, lark_=lark)
        self.eos_token_ids = eos_ids_of(None, tokenizer, eos_token_id)
        if vocab_size is not None and vocab_size < len(tokenizer):
            raise ValueError(f"vocab_size {vocab_size} is smaller than the tokenizer ({len(tokenizer)} tokens)")
        self.vocab_size = vocab_size or len(tokenizer)
        self.compiled = compile_grammar(tokenizer, self.grammar, self.eos_token_ids, self.vocab_size)
        self.nodes: dict[tuple, _Node] = {}
        self.efg: dict[tuple, float] = {}
        self.num_samples = 0

    @classmethod
    def for_model(cls, model=None, tokenizer=None, grammar=None, **kwargs) -> GrammarAlignedSampling:
        """Build for ``model`` (eos ids from its generation config, mask width from its vocabulary)."""
        if tokenizer is None:
            raise ValueError(f"{cls.__name__} needs the model's tokenizer")
        if model is not None:
            kwargs.setdefault("eos_token_id", eos_ids_of(model, tokenizer))
            kwargs.setdefault("vocab_size", max(int(model.config.vocab_size), len(tokenizer)))
        if isinstance(grammar, str):  # CLI: a regular expression
            kwargs["regex"], grammar = grammar, None
        return cls(tokenizer, grammar, **kwargs)

    def reset(self) -> None:
        """Forget every sample (the next call starts from plain grammar-constrained decoding)."""
        self.nodes.clear()
        self.efg.clear()
        self.num_samples = 0

    # ------------------------------------------------------------------------------------------------ trie
    @staticmethod
    def _prompt_key(prompt_ids, attention_mask=None) -> tuple:
        ids = prompt_ids if attention_mask is None else prompt_ids[attention_mask.bool()]
        return tuple(int(t) for t in ids)

    def expected_future_grammaticality(self, prompt_ids, prefix) -> float:
        """Current over-approximation ``EFG~`` of a viable ``prefix`` (generated token ids) after ``prompt_ids``
        (without padding); 1.0 for a prefix never expanded (the GCD approximation)."""
        key = (self._prompt_key(torch.as_tensor(prompt_ids)), tuple(int(t) for t in prefix))
        return self.efg.get(key, 1.0)

    def _child_value(self, key: tuple, token: int) -> float:
        if token in self.eos_token_ids:
            return 1.0  # a complete grammatical string
        return self.efg.get((key[0], key[1] + (token,)), 1.0)

    def _update(self, pkey: tuple, tokens: list[int]) -> None:
        """Recompute EFG~ bottom-up along a sampled path (``tokens`` without trailing padding)."""
        for i in range(len(tokens) - 1, -1, -1):
            key = (pkey, tuple(tokens[:i]))
            node = self.nodes.get(key)
            if node is None:
                continue
            value = node.mass - sum(p * (1.0 - self._child_value(key, c)) for c, p in node.children.items())
            self.efg[key] = min(node.mass, max(0.0, value))

    # ------------------------------------------------------------------------------------------------ loop
    def proposal_logits(self, key: tuple, logprobs: torch.Tensor, allowed: torch.Tensor,
                        node: _Node | None = None) -> torch.Tensor:
        """``log P(t|w) + log EFG~(wt)`` over the vocabulary (``-inf`` where the grammar forbids ``t``)."""
        out = logprobs.masked_fill(~allowed, float("-inf"))
        node = node if node is not None else self.nodes.get(key)
        if node is not None and node.children:
            idx = torch.tensor(list(node.children), device=out.device)
            vals = torch.tensor([self._child_value(key, c) for c in node.children], device=out.device,
                                dtype=out.dtype)
            out[idx] = out[idx] + torch.log(vals)  # log 0 = -inf: a child proven ungrammatical
        if not torch.isfinite(out).any():  # only when every allowed child is proven dead: fall back to GCD
            out = logprobs.masked_fill(~allowed, float("-inf"))
        return out

    @torch.no_grad()
    def proposal_logprob(self, model, prompt_ids: torch.Tensor, tokens) -> float:
        """Log-probability that the *current* sampler (before the caller's processors) draws ``tokens`` (ending with
        eos) after ``prompt_ids`` ``(1, n)`` without padding: for exact checks of convergence on small grammars."""
        tokens = [int(t) for t in tokens]
        ids = torch.cat([prompt_ids[0], torch.tensor(tokens, dtype=torch.long, device=prompt_ids.device)])[None]
        logprobs = torch.log_softmax(model(input_ids=ids).logits[0].double(), dim=-1)
        n = prompt_ids.shape[1]
        pkey = self._prompt_key(prompt_ids[0])
        rows = RowMatchers(self.compiled, 1)
        total = 0.0
        for i, t in enumerate(tokens):
            rows.sync([tokens[:i]])
            allowed = rows.allowed(logprobs.shape[-1], logprobs.device)[0]
            key = (pkey, tuple(tokens[:i]))
            prop = self.proposal_logits(key, logprobs[n - 1 + i], allowed)
            total += float(torch.log_softmax(prop, dim=-1)[t])
        return total

    def run(self, state: GenerationState):
        rows = RowMatchers(self.compiled, state.batch_size)
        pkeys = [self._prompt_key(state.input_ids[r], state.attention_mask[r]) for r in range(state.batch_size)]
        while not state.done:
            logits, _ = state.next_token_logits()
            logprobs = torch.log_softmax(logits.double(), dim=-1)  # float64: EFG~ subtracts nearly equal masses
            generated = state.new_tokens.tolist()
            rows.sync(generated)
            allowed = rows.allowed(logprobs.shape[-1], logprobs.device)
            proposal = torch.full_like(logprobs, float("-inf"))
            keys = []
            for r in range(state.batch_size):
                key = (pkeys[r], tuple(generated[r]))
                keys.append(key)
                if not bool(state.unfinished[r]):
                    proposal[r, self.eos_token_ids[0]] = 0.0
                    continue
                node = self.nodes.get(key)
                if node is None:
                    mass = float(logprobs[r][allowed[r]].exp().sum())
                    node = self.nodes[key] = _Node(mass)
                proposal[r] = self.proposal_logits(key, logprobs[r], allowed[r], node)
            scores = state.process(proposal)  # the caller's processors (temperature, top-k, ...) act on the proposal
            scores = torch.where(torch.isfinite(scores).any(-1, keepdim=True), scores, proposal)
            state.record(scores.float(), logits)
            tokens = torch.multinomial(torch.softmax(scores, dim=-1), 1).squeeze(1)
            for r in range(state.batch_size):
                if bool(state.unfinished[r]):
                    t = int(tokens[r])
                    self.nodes[keys[r]].children[t] = float(logprobs[r, t].exp())
            state.append(tokens)
        eos = set(self.eos_token_ids)
        for r, gen in enumerate(state.new_tokens.tolist()):
            # the path up to and including the first eos; padding after it is not part of the sample
            end = next((i + 1 for i, t in enumerate(gen) if t in eos), len(gen))
            self._update(pkeys[r], gen[:end])
            self.num_samples += 1
        return None


def enumerate_constrained(model, compiled, prompt_ids: torch.Tensor, max_tokens: int = 8,
                          processors=None) -> list[tuple[tuple[int, ...], float]]:
    """Every token sequence the grammar accepts within ``max_tokens`` tokens (eos included), with its log-probability
    under ``model`` after ``prompt_ids`` ``(1, n)`` (after ``processors`` if given). For exact checks on small
    grammars: the constrained distribution is ``exp(logp) / sum exp(logp)``.

    Returns ``[(tokens, logp), ...]``; ``tokens`` ends with an eos id.
    """
    from hf_decoding_ext.structured.grammar import bitmask_to_bool

    import llguidance.torch as lt

    eos = set(compiled.eos_token_ids)
    results = []
    bitmask = torch.zeros(1, (compiled.vocab_size + 31) // 32, dtype=torch.int32)
    frontier = [((), compiled.matcher(), 0.0)]
    device = prompt_ids.device
    for _depth in range(max_tokens + 1):
        if not frontier:
            break
        ids = torch.stack([torch.cat([prompt_ids[0], torch.tensor(p, dtype=torch.long, device=device)])
                           for p, _, _ in frontier])
        with torch.no_grad():
            logits = model(input_ids=ids).logits[:, -1, :].double()
        if processors is not None:
            logits = processors(ids, logits)
        logprobs = torch.log_softmax(logits, dim=-1)
        nxt = []
        for (prefix, m, lp), row in zip(frontier, logprobs):
            lt.fill_next_token_bitmask(m, bitmask, 0)
            allowed = bitmask_to_bool(bitmask, logprobs.shape[-1])[0].nonzero().flatten().tolist()
            for t in allowed:
                if not math.isfinite(float(row[t])):
                    continue
                if t in eos:
                    results.append((prefix + (t,), lp + float(row[t])))
                elif len(prefix) + 1 < max_tokens:
                    child = m.deep_copy()
                    if child.consume_token(t):
                        nxt.append((prefix + (t,), child, lp + float(row[t])))
        frontier = nxt
    return results
