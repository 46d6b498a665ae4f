"""Planning-Guided Transformer Decoding (PG-TD): Monte-Carlo tree search over tokens for code generation, rewarded by
the public unit tests (Zhang, Chen, Shen, Ding, Tenenbaum, Gan, "Planning with Large Language Models for Code
Generation", ICLR 2023, arXiv:2303.05510; official code ``shunzh/Code-AI-Tree-Search``).

* :class:`PlanningGuidedTransformerDecoding`: the ``custom_generate`` loop.
* :func:`extract_program`: the program of a completion (its first fenced code block).
* :func:`load_code_tasks`: the committed toy tasks (``data/search/code_tasks.jsonl``, dev / test).
* :func:`code_task_prompt`: the instruction used for them with the default model.
"""

from __future__ import annotations

import math
import re
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from transformers import StoppingCriteria, StoppingCriteriaList

from hf_decoding_ext.core.loop import DecodingLoop, GenerationState
from hf_decoding_ext.core.resources import read_jsonl
from hf_decoding_ext.core.sandbox import Sandbox
from hf_decoding_ext.core.step_search import (
    SearchNode,
    SearchStats,
    StepSearch,
    append_trace,
)

UCT_ALGS = ("var_p_uct", "p_uct", "uct")
PROGRAM_FORMATS = ("code_block", "text")
_FENCE = re.compile(r"```[^\n`]*\n?(.*?)(```|\Z)", re.DOTALL)


# ------------------------------------------------------------------------------------------------- programs
def extract_program(completion: str, program_format: str = "code_block") -> str:
    """The program of a completion: with ``"code_block"``, the content of its first fenced block (```` ``` ````,
    with or without a language tag; up to the end of the text when the block is not closed), or the whole completion
    when it has no fence; with ``"text"``, the whole completion.

    Example:
        >>> extract_program("Sure!\\n```python\\ndef f():\\n    return 1\\n```\\nThis returns 1.")
        'def f():\\n    return 1\\n'
    """
    if program_format == "text" or "```" not in completion:
        return completion
    m = _FENCE.search(completion)
    return m.group(1) if m else completion


def closed_code_block(completion: str) -> bool:
    """Whether ``completion`` holds a closed fenced code block (the program is complete)."""
    first = completion.find("```")
    return first >= 0 and completion.find("```", first + 3) >= 0


class ClosedCodeBlockCriteria(StoppingCriteria):
    """Ends a sequence once its generated text (after ``prompt_length``) holds a closed fenced code block."""

    def __init__(self, tokenizer, prompt_length: int):
        self.tokenizer, self.prompt_length = tokenizer, prompt_length

    def __call__(self, input_ids, scores=None, **kwargs):
        texts = self.tokenizer.batch_decode(input_ids[:, self.prompt_length:], skip_special_tokens=True)
        return torch.tensor([closed_code_block(t) for t in texts], dtype=torch.bool, device=input_ids.device)


def load_code_tasks(split: str | None = None) -> list[dict[str, Any]]:
    """The committed toy coding tasks (``data/search/code_tasks.jsonl``: id, split, entry_point, prompt = signature
    + docstring, 2 ``public_tests`` and 2 ``hidden_tests`` asserts), optionally one split (``"dev"``/``"test"``)."""
    if split not in (None, "dev", "test"):
        raise ValueError(f"split must be None, 'dev' or 'test', got {split!r}")
    return [rec for rec in read_jsonl("search", "code_tasks.jsonl") if split is None or rec["split"] == split]


def code_task_prompt(task: dict[str, Any]) -> str:
    """The user turn for a task (chat template applied by the caller): complete the function, code only."""
    return "Complete this Python function. Reply with code only.\n```python\n" + task["prompt"] + "```"


# ------------------------------------------------------------------------------------------------- tree
@dataclass(eq=False)
class _Decision:
    """A state: the tokens after the prompt (MCTS decision node)."""

    tokens: list[int]
    parent: _Chance | None
    terminal: bool
    children: list[_Chance] = field(default_factory=list)
    visits: int = 1  # as in the official code: a decision node counts as visited once when created
    snode: SearchNode | None = None  # its StepSearch node (KV cache), made when the model must run from it


@dataclass(eq=False)
class _Chance:
    """A (state, token) pair with the token's prior (MCTS chance node)."""

    parent: _Decision
    token: int
    prior: float
    returns: list[float] = field(default_factory=list)
    child: _Decision | None = None


class _RowSearch:
    """PG-TD on one prompt row."""

    def __init__(self, loop: PlanningGuidedTransformerDecoding, state: GenerationState, row: int, tests, stats):
        self.loop, self.row, self.tests = loop, row, tests
        self.stats = stats
        view = state
        if loop.program_format == "code_block":  # a closed code block ends a rollout and makes a state terminal
            view = object.__new__(GenerationState)
            view.__dict__.update(state.__dict__)
            view.stopping_criteria = StoppingCriteriaList(
                [*state.stopping_criteria, ClosedCodeBlockCriteria(loop.tokenizer, state.input_ids.shape[1])])
        self.view = view
        self.search = StepSearch(view, row, None, tokenizer=loop.tokenizer, stats=stats)
        eos = getattr(state.generation_config, "_eos_token_tensor", None)
        self.eos = set() if eos is None else {int(t) for t in eos.reshape(-1).tolist()}
        self.top_k_cache: dict[tuple[int, ...], tuple[list[int], list[float]]] = {}
        self.seq_cache: list[list[int]] = []
        self.rewards: OrderedDict[str, float] = OrderedDict()  # program text -> public reward, in evaluation order
        self.token_programs: OrderedDict[tuple[int, ...], str] = OrderedDict()  # complete token sequences
        self.hits = {"top_k": 0, "sequence": 0, "reward": 0}
        self.generations = 0
        self.iterations = 0
        self.states = 0

    # ------------------------------------------------------------------------------------------ model queries
    def _snode(self, node: _Decision) -> SearchNode:
        """The node's StepSearch node, its parent being the nearest ancestor whose KV cache exists (one forward
        feeds the tokens in between)."""
        if node.snode is None and not node.tokens:
            node.snode = self.search.root
        if node.snode is None:
            anc = node.parent.parent if node.parent is not None else None
            while anc is not None and anc.snode is None:
                anc = anc.parent.parent if anc.parent is not None else None
            base = anc.snode if anc is not None else self.search.root
            node.snode = SearchNode(tokens=list(node.tokens), step=node.tokens[len(base.tokens):], parent=base,
                                    depth=base.depth + 1)
        return node.snode

    def _input_ids(self, tokens: list[int]) -> torch.Tensor:
        extra = torch.tensor([tokens], dtype=self.search.prompt_ids.dtype, device=self.search.prompt_ids.device)
        return torch.cat([self.search.prompt_ids, extra], dim=1)

    def _process(self, tokens: list[int], logits: torch.Tensor) -> torch.Tensor:
        if self.search.process is None:
            return logits
        return self.search.process(self._input_ids(tokens), logits.clone())

    def _top_k_of(self, scores: torch.Tensor) -> tuple[list[int], list[float]]:
        values, ids = torch.topk(scores.float().reshape(-1), k=self.loop.width, sorted=True)
        return ids.tolist(), torch.softmax(values, dim=-1).tolist()

    def top_k(self, node: _Decision) -> tuple[list[int], list[float]]:
        """The ``width`` most likely next tokens of a state and their priors (softmax over the ``width`` processed
        scores, as in the official code), from the top-k cache when a rollout went through the state."""
        key = tuple(node.tokens)
        if self.loop.use_top_k_cache and key in self.top_k_cache:
            self.hits["top_k"] += 1
            self.stats.cache_hits += 1
            return self.top_k_cache[key]
        logits = self.search.materialize(self._snode(node))
        out = self._top_k_of(self._process(node.tokens, logits))
        if self.loop.use_top_k_cache:
            self.top_k_cache[key] = out
        return out

    def complete(self, node: _Decision) -> list[int]:
        """The greedy completion of a state (beam search with one beam), from the sequence cache when the state is a
        prefix of a sequence already generated (greedy decoding from it would give that sequence)."""
        if self.loop.use_seq_cache:
            n = len(node.tokens)
            for seq in self.seq_cache:
                if len(seq) >= n and seq[:n] == node.tokens:
                    self.hits["sequence"] += 1
                    self.stats.cache_hits += 1
                    return seq
        snode = self._snode(node)
        r = self.search.complete(snode, 1, do_sample=False, return_steps=True)
        self.generations += 1
        cont = r.token_lists()[0]
        seq = node.tokens + cont
        if self.loop.use_seq_cache:
            self.seq_cache.append(seq)
        if self.loop.use_top_k_cache:  # the top-k of every state the rollout went through
            for i in range(len(cont)):
                key = tuple(seq[:len(node.tokens) + i])
                if key not in self.top_k_cache:
                    self.top_k_cache[key] = self._top_k_of(r.step_scores[0][i])
        return seq

    # ------------------------------------------------------------------------------------------ rewards
    def is_terminal(self, tokens: list[int]) -> bool:
        """A state is terminal after an eos token or when the stopping criteria fire (``max_new_tokens``, a closed
        code block with ``program_format="code_block"``, the caller's criteria)."""
        if tokens and tokens[-1] in self.eos:
            return True
        return bool(self.view.stopping_criteria(self._input_ids(tokens), None)[0])

    def program(self, tokens: list[int]) -> str:
        text = self.loop.tokenizer.decode(tokens, skip_special_tokens=True)
        return self.loop.program_prefix + extract_program(text, self.loop.program_format) + self.loop.program_suffix

    def reward(self, tokens: list[int]) -> float:
        """Public reward of a complete program (cached by program text: programs run once)."""
        program = self.program(tokens)
        self.token_programs.setdefault(tuple(tokens), program)
        if program in self.rewards:
            self.hits["reward"] += 1
            self.stats.cache_hits += 1
            return self.rewards[program]
        value = float(self.loop.evaluate(program, self.tests))
        if not 0.0 <= value <= 1.0 or math.isnan(value):
            raise ValueError(f"the reward must lie in [0, 1] (1 = every public test passes), got {value!r}")
        self.stats.program_runs += 1
        self.rewards[program] = value
        return value

    # ------------------------------------------------------------------------------------------ MCTS
    def new_decision(self, tokens: list[int], parent: _Chance | None) -> _Decision:
        node = _Decision(tokens=tokens, parent=parent, terminal=self.is_terminal(tokens) if tokens else False)
        self.states += 1
        if not node.terminal:  # the official code also queries a terminal state's top-k; it is never used
            ids, priors = self.top_k(node)
            node.children = [_Chance(node, t, p) for t, p in zip(ids, priors)]
        return node

    def value(self, chance: _Chance) -> float:
        return max(chance.returns) if chance.returns else 0.0  # ts_mode "best"

    def ucb(self, chance: _Chance) -> float:
        loop, n = self.loop, chance.parent.visits
        explore = math.sqrt(math.log(n)) / (1 + len(chance.returns))
        if loop.uct_alg == "uct":
            return self.value(chance) + loop.ucb_constant * explore
        if loop.uct_alg == "p_uct":
            return self.value(chance) + loop.ucb_constant * chance.prior * explore
        weight = math.log((n + loop.ucb_base + 1) / loop.ucb_base) + loop.ucb_constant
        return self.value(chance) + weight * chance.prior * explore

    def stop_now(self) -> bool:
        loop = self.loop
        if self.iterations >= loop.rollouts:
            return True
        if loop.max_program_runs is not None and self.stats.program_runs >= loop.max_program_runs:
            return True
        if loop.max_generations is not None and self.generations >= loop.max_generations:
            return True
        return loop.early_stop and any(v >= 1.0 for v in self.rewards.values())

    def run(self) -> list[int]:
        root = self.root = self.new_decision([], None)
        while not self.stop_now():
            self.iterations += 1
            rewards: list[float] = []
            node: _Decision | _Chance = root
            terminal = False
            while True:  # selection
                if isinstance(node, _Decision):
                    if node.terminal:
                        break
                    node = max(node.children, key=self.ucb)  # first of equal scores, as Python's max
                else:
                    tokens = node.parent.tokens + [node.token]
                    terminal = self.is_terminal(tokens)
                    rewards.append(self.reward(tokens) if terminal else 0.0)
                    if node.child is not None:
                        node = node.child
                    else:
                        break
            if isinstance(node, _Chance):  # expansion
                node.child = self.new_decision(node.parent.tokens + [node.token], node)
                node = node.child
            if not node.terminal:  # evaluation: the public reward of the greedy completion
                estimate = self.reward(self.complete(node))
            else:
                estimate = 0.0  # the reward sits on the terminating transition
            node.visits += 1  # back-propagation (gamma = 1)
            chance = node.parent
            while chance is not None:
                if rewards:
                    estimate = rewards.pop() + estimate
                chance.returns.append(estimate)
                chance.parent.visits += 1
                chance = chance.parent.parent
        if not self.token_programs:  # budget spent before any program completed (cannot happen with rollouts >= 1)
            return []
        best = max(self.rewards.values())
        for tokens, program in self.token_programs.items():  # first complete program with the best public reward
            if self.rewards[program] == best:
                self.best_program = program
                return list(tokens)
        return []


# ------------------------------------------------------------------------------------------------- loop
class PlanningGuidedTransformerDecoding(DecodingLoop):
    r"""Planning-Guided Transformer Decoding (PG-TD) from "Planning with Large Language Models for Code Generation"
    (Zhang, Chen, Shen, Ding, Tenenbaum, Gan; ICLR 2023, arXiv:2303.05510), as in the official code
    (``shunzh/Code-AI-Tree-Search``: ``dyna_gym/agents/mcts.py``, ``dyna_gym/agents/uct.py``,
    ``generate/default_pi.py``, ``generate/uct.py``, ``generate/program_env.py``).

    Monte-Carlo tree search whose actions are tokens. Each iteration (a "rollout" in the paper)

    1. *selects* a path from the root, taking at each state the child token that maximises the P-UCB score
       (default ``var_p_uct``):
       :math:`\max_{a} Q(s,a) + \big(\log\frac{N(s)+b+1}{b} + c\big)\,P(a|s)\,\frac{\sqrt{\log N(s)}}{1+n(s,a)}`
       with :math:`Q` the best return seen through the token (``ts_mode="best"``), :math:`N(s)` the state's visits
       (a new state counts one), :math:`n(s,a)` the returns recorded for the token, :math:`b` = ``ucb_base``,
       :math:`c` = ``ucb_constant`` and :math:`P` the model's prior;
    2. *expands* the first new state with its ``width`` most likely next tokens (priors: softmax over their
       ``width`` scores);
    3. *evaluates* it by completing the program greedily with the model (beam search with one beam) and running the
       complete program on the **public** test cases: reward = fraction passed;
    4. *back-propagates* the reward (no discount) to every token on the path.

    Information sharing (official defaults on): a greedy completion stores the top-k of every state it went through
    (top-k cache) and the sequence itself (sequence cache: a later state on that sequence completes to it without the
    model); rewards are cached per program. Every answer from a cache counts in ``search_stats["cache_hits"]``.
    The search stops after ``rollouts`` iterations, ``max_program_runs`` distinct programs run,
    ``max_generations`` model completions, or (``early_stop``) once a program passes every public test; the output
    is the complete program with the best public reward (the first one found among equals).

    Rewards: by default :class:`~hf_decoding_ext.core.sandbox.Sandbox` runs ``program_prefix + program +
    program_suffix`` and then the public ``tests`` (assert statements) in a separate, resource-limited Python
    process; ``reward`` replaces it by any callable ``reward(program_text) -> float`` in ``[0, 1]`` (1 = every
    public test passes). Generated code is never executed in the calling process.

    Args:
        tokenizer: decodes completions to programs (required).
        tests (list of `str`, or one list per prompt row, *optional*): the public test cases (Python statements,
            usually ``assert``); required unless ``reward`` is given.
        reward (`Callable[[str], float]`, *optional*): a user reward replacing the sandbox.
        rollouts (`int`, *optional*, defaults to 64): MCTS iterations per prompt (official ``--rollout``,
            default 1 there; the README example uses 16, the paper's experiments up to 256). An iteration that only
            walks states a completion already went through costs no model call (caches).
        width (`int`, *optional*, defaults to 3): children per state (official ``--width 3``).
        uct_alg (`str`, *optional*, defaults to ``"var_p_uct"``): ``"var_p_uct"``, ``"p_uct"`` or ``"uct"``.
        ucb_constant (`float`, *optional*, defaults to 4.0): :math:`c` (official ``--ucb-constant 4``).
        ucb_base (`float`, *optional*, defaults to 10.0): :math:`b` of ``var_p_uct`` (official ``--ucb-base 10``).
        max_program_runs (`int`, *optional*): stop after this many distinct programs were rewarded (sandbox runs,
            or calls of ``reward``; ``search_stats["program_runs"]`` counts them).
        max_generations (`int`, *optional*): stop after this many model completions (official
            ``--max-sample-times``, default 768 there; cache answers do not count).
        early_stop (`bool`, *optional*, defaults to `True`): stop once a program passes every public test.
        use_top_k_cache (`bool`, *optional*, defaults to `True`), use_seq_cache (`bool`, *optional*, defaults to
            `True`): the two caches.
        program_format (`str`, *optional*, defaults to ``"code_block"``): ``"code_block"``: the program is the
            completion's first fenced code block (the whole completion without a fence) and a closed block ends the
            generation; ``"text"``: the whole completion.
        program_prefix (`str`, *optional*, defaults to ``""``), program_suffix (`str`, *optional*, defaults to
            ``""``): text around the program before the tests run (e.g. the prompt's function signature, or
            ``"answer = '''"`` / ``"'''"`` to test a plain-text answer).
        sandbox (:class:`~hf_decoding_ext.core.sandbox.Sandbox`, *optional*): the sandbox (a default one if
            ``None``).

    Deviations from the paper / official code:

    * the model is SmolLM2-135M-Instruct (chat template, a fenced code block as the answer) on 20 hand-written
      one-line Python tasks (``data/search/code_tasks.jsonl``) instead of APPS-fine-tuned GPT-2/GPT-Neo on APPS /
      CodeContests; the reward runs in this repository's subprocess sandbox instead of the APPS harness;
    * completions are greedy with one beam only (official ``--num-beams`` > 1 and ``--ts-mode sample`` are not
      offered), so the sequence cache is exact;
    * rewards are cached per program *text* (the extracted code block), not per token sequence, so two completions
      that differ only outside the code block run once; ``max_program_runs`` counts distinct programs;
    * a terminal state (eos, ``max_new_tokens``, a closed code block) gets no top-k query (the official code makes
      one and never uses it); a closed code block as a terminal condition is this port's (the APPS models end with
      eos);
    * ``early_stop`` defaults to on (official ``--early-stop`` flag, off by default); the official time limit is
      not offered (budgets are counts); the budgets stop the search when reached (``>=``; the official
      ``--max-sample-times`` test is ``>``);
    * the public tests are given to the constructor (``tests``, one list per prompt row for a batch), not read from
      a dataset file; they are assert statements run after the program (HumanEval style), not the APPS
      stdin/stdout cases;
    * the next-token scores are those of the ``generate()`` logits processors (the raw model's when there are none,
      as for greedy decoding); a state's KV cache is computed once, from the nearest ancestor whose cache exists, in
      one forward (:class:`~hf_decoding_ext.core.step_search.StepSearch`), not re-run from the prompt;
    * prompts of a batch are searched one after the other (row by row).

    Offline stand-in: the public unit tests of the toy tasks, run by :class:`~hf_decoding_ext.core.sandbox.Sandbox`
    (or the user's ``reward``). No second model, reward model or value model (the paper's optional value function is
    not used, as in its default runs).

    Example:
        >>> from hf_decoding_ext import load_model, encode_prompts
        >>> from hf_decoding_ext.search.pg_td import (PlanningGuidedTransformerDecoding, code_task_prompt,
        ...                                           load_code_tasks)
        >>> model, tokenizer = load_model()  # doctest: +SKIP
        >>> task = load_code_tasks("dev")[0]  # def add(a, b) with its docstring, public and hidden asserts
        >>> loop = PlanningGuidedTransformerDecoding(tokenizer=tokenizer, tests=task["public_tests"],
        ...                                          rollouts=8)  # doctest: +SKIP
        >>> out = model.generate(**encode_prompts(tokenizer, code_task_prompt(task)), custom_generate=loop,
        ...                      max_new_tokens=48, do_sample=False, return_dict_in_generate=True)  # doctest: +SKIP
        >>> out.best_programs[0], out.search_stats[0]["program_runs"]  # doctest: +SKIP
    """

    supports_sampling = False
    supports_output_scores = False

    def __init__(self, tokenizer=None, tests: Sequence[str] | Sequence[Sequence[str]] | None = None,
                 reward: Callable[[str], float] | None = None, rollouts: int = 64, width: int = 3,
                 uct_alg: str = "var_p_uct", ucb_constant: float = 4.0, ucb_base: float = 10.0,
                 max_program_runs: int | None = None, max_generations: int | None = None, early_stop: bool = True,
                 use_top_k_cache: bool = True, use_seq_cache: bool = True, program_format: str = "code_block",
                 program_prefix: str = "", program_suffix: str = "", sandbox: Sandbox | None = None):
        if tokenizer is None:
            raise ValueError("PlanningGuidedTransformerDecoding decodes completions into programs: pass the tokenizer")
        for name, value in (("rollouts", rollouts), ("width", width)):
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        for name, value in (("max_program_runs", max_program_runs), ("max_generations", max_generations)):
            if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < 1):
                raise ValueError(f"{name} must be None or a positive integer, got {value!r}")
        if uct_alg not in UCT_ALGS:
            raise ValueError(f"uct_alg must be one of {UCT_ALGS}, got {uct_alg!r}")
        for name, value in (("ucb_constant", ucb_constant), ("ucb_base", ucb_base)):
            if not isinstance(value, (int, float)) or isinstance(value, bool) or not math.isfinite(value) \
                    or value < 0 or (name == "ucb_base" and value == 0):
                raise ValueError(f"{name} must be a finite non-negative number (ucb_base > 0), got {value!r}")
        for name, value in (("early_stop", early_stop), ("use_top_k_cache", use_top_k_cache),
                            ("use_seq_cache", use_seq_cache)):
            if not isinstance(value, bool):
                raise ValueError(f"{name} must be a bool, got {value!r}")  # noqa: TRY004 (the library's convention)
        if program_format not in PROGRAM_FORMATS:
            raise ValueError(f"program_format must be one of {PROGRAM_FORMATS}, got {program_format!r}")
        for name, value in (("program_prefix", program_prefix), ("program_suffix", program_suffix)):
            if not isinstance(value, str):
                raise ValueError(f"{name} must be a string, got {value!r}")  # noqa: TRY004 (the library's convention)
        if reward is not None and not callable(reward):
            raise ValueError(f"reward must be a callable program_text -> float in [0, 1], got {reward!r}")
        if reward is None and tests is None:
            raise ValueError("PG-TD needs the public tests (tests=[...] assert statements) or a reward callable")
        if tests is not None:
            if isinstance(tests, str):
                raise ValueError(f"tests must be a list of test statements (or one list per prompt row), got the "
                                 f"string {tests!r}")
            tests = list(tests)
            per_row = bool(tests) and all(isinstance(t, (list, tuple)) for t in tests)
            if per_row:
                tests = [list(t) for t in tests]
                bad = [t for row in tests for t in row if not isinstance(t, str)]
            else:
                bad = [t for t in tests if not isinstance(t, str)]
            if bad:
                raise ValueError(f"tests must be strings (Python statements), got {bad!r}")
            self._per_row = per_row
        else:
            self._per_row = False
        if sandbox is not None and not isinstance(sandbox, Sandbox):
            raise ValueError(f"sandbox must be a Sandbox, got {type(sandbox).__name__}")
        self.tokenizer = tokenizer
        self.tests = tests
        self.reward = reward
        self.rollouts = rollouts
        self.width = width
        self.uct_alg = uct_alg
        self.ucb_constant = float(ucb_constant)
        self.ucb_base = float(ucb_base)
        self.max_program_runs = max_program_runs
        self.max_generations = max_generations
        self.early_stop = early_stop
        self.use_top_k_cache = use_top_k_cache
        self.use_seq_cache = use_seq_cache
        self.program_format = program_format
        self.program_prefix = program_prefix
        self.program_suffix = program_suffix
        self.sandbox = sandbox if sandbox is not None else (Sandbox() if reward is None else None)

    def evaluate(self, program: str, tests) -> float:
        """The public reward of a program: the user's ``reward`` or the fraction of ``tests`` passed in the
        sandbox."""
        if self.reward is not None:
            return self.reward(program)
        return self.sandbox.run(program, tests).fraction

    def _row_tests(self, row: int, batch: int):
        if self.tests is None:
            return None
        if self._per_row:
            if len(self.tests) != batch:
                raise ValueError(f"tests holds one list per prompt row ({len(self.tests)} lists) but the batch has "
                                 f"{batch} rows")
            return self.tests[row]
        return self.tests

    def run(self, state: GenerationState):
        from hf_decoding_ext.core import lifecycle

        if lifecycle.has_stateful(state.logits_processor):
            raise ValueError("PG-TD scores many branching prefixes; a stateful logits processor cannot follow them: "
                             "use it with plain generate()")
        traces, stats_out, programs, best_programs, best_rewards, details, trees = [], [], [], [], [], [], []
        for row in range(state.batch_size):
            stats = SearchStats()
            search = _RowSearch(self, state, row, self._row_tests(row, state.batch_size), stats)
            tokens = search.run()
            stats.stop()
            traces.append(tokens)
            stats_out.append(stats.as_dict())
            programs.append(list(search.rewards.items()))
            best_programs.append(getattr(search, "best_program", None))
            best_rewards.append(max(search.rewards.values()) if search.rewards else None)
            details.append({"iterations": search.iterations, "generations": search.generations,
                            "cache_hits": dict(search.hits), "tree_states": search.states})
            trees.append(search.root)
        append_trace(state, traces)
        if not state.return_dict:
            return None
        return {"search_stats": stats_out, "programs": programs, "best_programs": best_programs,
                "best_rewards": best_rewards, "pg_td": details, "trees": trees}
