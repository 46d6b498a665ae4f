"""Adaptive Skeleton Graph Decoding (SGD, Jin et al., arXiv 2402.12280): a skeleton of sub-problems with
dependencies and difficulties, decoded in parallel waves in dependency order, easy nodes on a smaller model.

The loop (:class:`SkeletonGraphDecoding`) runs in four phases:

1. **skeleton**: the model writes a JSON list of nodes ``{"summary", "dependency", "difficulty"}`` constrained by
   :class:`~hf_decoding_ext.structured.json_schema.JsonSchemaLogitsProcessor` (llguidance); the schema
   (:func:`skeleton_schema`) lets node ``k`` depend only on nodes ``1..k-1`` (``prefixItems`` with one item schema
   per position), so every parsed skeleton is a DAG by construction (no cycle, no forward reference);
   :func:`parse_skeleton` only drops repeated dependency entries (the one repair).
2. **scheduler**: :func:`topological_waves` groups the nodes into waves: every node whose dependencies are done.
3. **waves**: the nodes of a wave are decoded together, one batched forward per step per model, each row from a copy
   of the prompt's KV cache plus its own node prompt (the skeleton, the answers of its parents, then the node's own
   header); a node's answer ends at eos, a stop string or ``max_node_tokens``.
4. **answer**: headers and answers are concatenated in node order and appended to the sequence.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from transformers import DynamicCache

from hf_decoding_ext.core import lifecycle
from hf_decoding_ext.core.loop import DecodingLoop, GenerationState, repeat_cache
from hf_decoding_ext.core.step_search import SearchStats

SKELETON_INSTRUCTION = (
    "First I plan the answer as a JSON list of at most {max_nodes} steps. Each step has a short summary, "
    "the numbers of the earlier steps it depends on, and a difficulty from 1 (easy) to {max_difficulty} (hard).\n")
"""Default skeleton request, appended after the prompt (fields ``max_nodes``, ``max_difficulty``)."""

NODE_INSTRUCTION = "{parents}{header}"
"""Default node prompt, appended after the prompt: the parents' headers and answers, one per line, then the node's
header, which the answer continues. Fields a custom template may use: ``plan`` (one line per node), ``parents``,
``index`` (1-based), ``header``. (On the dev questions SmolLM2 answered the points well from the bare header and
copied or skipped them after a plan block with an instruction, so the default leaves the plan out.)"""


def skeleton_schema(max_nodes: int, max_difficulty: int, max_summary_chars: int) -> dict:
    """JSON schema of a skeleton of at most ``max_nodes`` nodes. Node ``k`` (1-based) is
    ``{"summary": str, "dependency": [int in 1..k-1], "difficulty": int in 1..max_difficulty}``: positional item
    schemas (``prefixItems``) make forward references and cycles unrepresentable."""
    def node(k: int) -> dict:
        dep = ({"type": "array", "maxItems": 0} if k == 1 else
               {"type": "array", "items": {"enum": list(range(1, k))}, "maxItems": k - 1})
        return {"type": "object",
                "properties": {"summary": {"type": "string", "minLength": 1, "maxLength": max_summary_chars,
                                           "pattern": r"^[^\n\r\"\\]*$"},
                               "dependency": dep,
                               "difficulty": {"type": "integer", "minimum": 1, "maximum": max_difficulty}},
                "required": ["summary", "dependency", "difficulty"], "additionalProperties": False}
    return {"type": "array", "minItems": 1, "maxItems": max_nodes, "prefixItems": [node(k) for k in range(1, max_nodes + 1)],
            "items": False}


@dataclass
class SkeletonNode:
    """One sub-problem: ``index`` (0-based), ``summary``, ``dependency`` (0-based indices of earlier nodes),
    ``difficulty``; filled while decoding: ``model`` ("large"/"small"), ``wave``, ``tokens`` (the answer, without
    eos), ``length`` (tokens generated, eos included), ``ended`` ("eos", "stop", "length")."""

    index: int
    summary: str
    dependency: list[int]
    difficulty: int
    model: str = "large"
    wave: int = -1
    tokens: list[int] = field(default_factory=list)
    length: int = 0
    ended: str = ""
    text: str = ""

    def as_dict(self) -> dict[str, Any]:
        return {"index": self.index, "summary": self.summary, "dependency": list(self.dependency),
                "difficulty": self.difficulty, "model": self.model, "wave": self.wave, "length": self.length,
                "ended": self.ended, "answer": self.text}


def parse_skeleton(nodes: Sequence[dict] | str, max_difficulty: int | None = None) -> list[SkeletonNode]:
    """Nodes from a skeleton (JSON text or a list of dicts with 1-based ``dependency`` lists).

    Repeated dependency entries are dropped (repair); a dependency that is not an earlier node (a forward reference,
    a self-reference, hence any cycle) or a difficulty out of range raises a ``ValueError`` (a skeleton generated
    under :func:`skeleton_schema` never has one)."""
    if isinstance(nodes, str):
        try:
            nodes = json.loads(nodes)
        except json.JSONDecodeError as err:
            raise ValueError(f"skeleton is not valid JSON: {err}") from None
    if not isinstance(nodes, (list, tuple)) or not nodes:
        raise ValueError(f"a skeleton is a non-empty list of nodes, got {nodes!r}")
    out = []
    for k, node in enumerate(nodes):
        summary = node.get("summary") if isinstance(node, dict) else None
        if not summary or not isinstance(summary, str):
            raise ValueError(f"skeleton node {k + 1} needs a non-empty string 'summary', got {node!r}")
        deps = node.get("dependency", [])
        if not isinstance(deps, (list, tuple)) or any(isinstance(d, bool) or not isinstance(d, int) for d in deps):
            raise ValueError(f"skeleton node {k + 1}: 'dependency' must be a list of step numbers, got {deps!r}")
        bad = [d for d in deps if not 1 <= d <= k]
        if bad:
            raise ValueError(f"skeleton node {k + 1} depends on {bad}: only earlier steps 1..{k} are allowed "
                             "(forward references and cycles are refused)")
        difficulty = node.get("difficulty", 1)
        if isinstance(difficulty, bool) or not isinstance(difficulty, int) or difficulty < 1 or (
                max_difficulty is not None and difficulty > max_difficulty):
            raise ValueError(f"skeleton node {k + 1}: difficulty must be an integer in 1..{max_difficulty}, got "
                             f"{difficulty!r}")
        out.append(SkeletonNode(k, node["summary"], sorted({d - 1 for d in deps}), difficulty))
    return out


def topological_waves(nodes: Sequence[SkeletonNode]) -> list[list[int]]:
    """Waves of node indices: wave ``w`` holds every node not yet scheduled whose dependencies are all in earlier
    waves (its depth in the DAG)."""
    done: set[int] = set()
    waves = []
    left = [n.index for n in nodes]
    while left:
        wave = [i for i in left if set(nodes[i].dependency) <= done]
        if not wave:
            raise ValueError(f"the skeleton has a cycle among nodes {left}")
        waves.append(wave)
        done.update(wave)
        left = [i for i in left if i not in done]
    return waves


class SkeletonGraphDecoding(DecodingLoop):
    r"""
    Adaptive Skeleton Graph Decoding from "Adaptive Skeleton Graph Decoding" (Jin, Wu, Zheng, Zhang, Lentz, Mao,
    Prakash, Qian, Zhuo; arXiv 2402.12280), which extends Skeleton-of-Thought (SoT, Ning et al., arXiv 2307.15337).
    The model first writes a *skeleton*: sub-problems, each with a short summary, a list of the earlier sub-problems
    it depends on and a difficulty. The skeleton is a DAG; its nodes are decoded in topological *waves*, all the
    nodes of a wave together in one batch (SoT's parallelism), and a dependent node's prompt holds its parents'
    answers (SGD's *information forwarding*, the fix for SoT's quality loss). With a second model, easy nodes
    (difficulty at most ``difficulty_threshold``) are decoded by it (SGD's *adaptive model selection*). The answer
    is the concatenation of the nodes' headers and answers, in node order.

    Greedy only; batch size 1 (call ``generate()`` once per prompt: a larger batch raises a ``ValueError``). With
    ``return_dict_in_generate=True`` the output also holds:

    * ``search_stats``: :class:`~hf_decoding_ext.core.step_search.SearchStats` counters (``model_calls`` = forwards of
      both models, ``generated_tokens``, ``rollouts`` = nodes, ``wall_seconds``) plus ``forwards_large`` /
      ``forwards_small``, ``tokens_large`` (skeleton included) / ``tokens_small``, ``skeleton_tokens``,
      ``skeleton_forwards`` (prompt prefill included), ``skeleton_forced_tokens``, ``skeleton_valid``, ``nodes``,
      ``waves``, ``width`` (largest wave), ``node_forwards`` (forwards of the node phase: the sum over waves of the
      longest node, per model), ``node_steps``, ``sequential_node_forwards`` (the sum of node lengths: what
      decoding the nodes one after the other takes) and ``wave_max_lengths``;
    * ``skeleton``: one dict per node (summary, 0-based dependencies, difficulty, model, wave, length, how it ended,
      answer text) and ``skeleton_text`` (the generated JSON; ``None`` with a fixed ``skeleton``);
    * ``schedule``: ``waves``, the ``started`` / ``finished`` node orders, ``started_at`` / ``finished_at`` (the
      decoding step at which each node started / ended) and ``steps`` (per step: its wave and the batched forwards
      it ran, as ``(model, node indices)``).

    Args:
        tokenizer: the model's tokenizer (prompts are built as text and encoded; the skeleton is parsed from text).
        max_nodes: most nodes in a generated skeleton.
        max_difficulty: difficulties are integers in ``1..max_difficulty``.
        max_skeleton_tokens: token budget of the skeleton (the JSON processor keeps a way to close the document
            within it, so the skeleton is always complete and valid provided the budget holds one node: about 25
            tokens with SmolLM2's tokenizer, 50 with a character-level one; otherwise the run falls back to a single
            node and reports ``skeleton_valid=False``).
        max_summary_chars: most characters of a node summary (the default model repeats itself inside open strings).
        max_node_tokens: most tokens of one node's answer.
        stop_strings: a node's answer also ends when its text, leading whitespace stripped, contains one of these
            (e.g. ``"\n"``); ``()``: none.
        small_model: a second model for easy nodes: a model object sharing the tokenizer, a name/path, or
            ``"self:N"`` (``truncated_model(model, N)``: the first ``N`` layers of the model, a layer-truncated view
            with shared weights, *not* a genuine small model); ``None``: every node on the model.
        difficulty_threshold: nodes with a difficulty at most this go to ``small_model`` (default 1 when a
            ``small_model`` is given; giving it without one is refused).
        schedule: ``"waves"`` (SGD: every ready node at once), ``"sequential"`` (one node at a time in index order,
            the same prompts: the baseline the forward counts are compared with).
        forward_information: put the parents' answers in a node's prompt (SGD). ``False`` with
            ``schedule="waves"`` and ``ignore_dependencies=True`` is Skeleton-of-Thought.
        ignore_dependencies: decode every node in the first wave (SoT); parents' answers are then never available.
        skeleton: a fixed skeleton (list of ``{"summary", "dependency" (1-based), "difficulty"}`` dicts or JSON
            text) instead of a generated one, for tests and user plans.
        skeleton_instruction, node_instruction: the text appended after the prompt to request the skeleton
            (fields ``{max_nodes}``, ``{max_difficulty}``) and a node's answer (fields ``{plan}``, ``{parents}``,
            ``{index}``, ``{header}``); see :data:`SKELETON_INSTRUCTION` and :data:`NODE_INSTRUCTION`.
        separator: text between two nodes in the final answer.
        jump_forward: while writing the skeleton, append a token the schema forces (the only allowed one) without a
            forward; it is fed with the next forward, several tokens at once (an optimisation, not in the paper:
            greedy constrained decoding picks the same token; only float rounding of the multi-token forward
            differs). ``False``: one forward per skeleton token.

    Example:
        >>> from hf_decoding_ext.core.models import load_model, encode_prompts
        >>> from hf_decoding_ext.search.skeleton_graph import SkeletonGraphDecoding
        >>> model, tok = load_model()  # doctest: +SKIP
        >>> loop = SkeletonGraphDecoding(tok, max_nodes=3, max_node_tokens=24, small_model="self:20")  # doctest: +SKIP
        >>> inputs = encode_prompts(tok, "Give three tips for sleeping better.")  # doctest: +SKIP
        >>> out = model.generate(**inputs, custom_generate=loop, do_sample=False, max_new_tokens=120,
        ...                      return_dict_in_generate=True)  # doctest: +SKIP
        >>> out.search_stats["waves"], out.search_stats["node_forwards"]  # doctest: +SKIP

    Deviations from the paper (no official code was found; details below are this implementation's):

    * The skeleton is requested by an instruction appended after the user's prompt (inside the assistant turn of a
      chat prompt) instead of the paper's few-shot skeleton prompt, and generated under a JSON schema
      (llguidance, :class:`~hf_decoding_ext.structured.json_schema.JsonSchemaLogitsProcessor`): a 135M model does
      not write parsable dependency skeletons unaided. The schema rules out forward references and cycles by
      construction; repeated dependencies are dropped (repair). Summaries are capped at ``max_summary_chars``.
    * Node prompts are the user's prompt followed by the parents' answers (each after its header) and the node's
      own header ``"<k>. <summary>:"``, which the answer continues (as in SoT's point-expanding prompt). SoT and the
      paper also show the whole skeleton and an instruction; the default template leaves them out because SmolLM2
      copied or skipped the points after them on the dev questions (``node_instruction`` with ``{plan}`` puts the
      skeleton back). Rows of a wave are left-padded between the prompt and their node prompt.
    * The difficulty scale (``1..max_difficulty``) and the routing threshold are this implementation's choices (the
      paper's scale is not verified here). The second model is, in the demo and tests, a layer-truncated view of the
      same model (``"self:N"``), not a genuine smaller model; the paper's quality claim needs real models of
      several sizes and is not reproduced here.
    * Tokens the schema forces while the skeleton is written are appended without a forward (``jump_forward``, an
      optimisation not in the paper; the skeleton is the one greedy constrained decoding writes).
    * Node answers are greedy and end at eos, a stop string (default ``"\n"``: SoT asks for one or two sentences per
      point) or ``max_node_tokens``; the user's (stateless) logits processors are applied to every node's scores
      (not to the skeleton's, which only the schema constrains), stateful ones are refused.
    * The prompt's keys and values are computed once per model into the caller's cache (it holds the prompt
      afterwards, not the answer, which is assembled from the nodes) and copied into every node row.
    * The answer is capped by ``generate()``'s ``max_new_tokens`` (and other stopping criteria) when appended; node
      lengths by ``max_node_tokens``. Greedy decoding only; no ``output_scores`` (the answer is not decoded as one
      sequence).
    """

    supports_batch = False
    supports_sampling = False
    supports_output_scores = False

    def __init__(self, tokenizer, *, max_nodes: int = 4, max_difficulty: int = 3, max_skeleton_tokens: int = 160,
                 max_summary_chars: int = 32, max_node_tokens: int = 32, stop_strings: Sequence[str] = ("\n",),
                 small_model=None, difficulty_threshold: int | None = None, schedule: str = "waves",
                 forward_information: bool = True, ignore_dependencies: bool = False,
                 skeleton: Sequence[dict] | str | None = None, skeleton_instruction: str = SKELETON_INSTRUCTION,
                 node_instruction: str = NODE_INSTRUCTION, separator: str = "\n", jump_forward: bool = True):
        if tokenizer is None:
            raise ValueError("SkeletonGraphDecoding needs the model's tokenizer (tokenizer=None given)")
        for name, value, low in (("max_nodes", max_nodes, 1), ("max_difficulty", max_difficulty, 1),
                                 ("max_skeleton_tokens", max_skeleton_tokens, 8), ("max_summary_chars",
                                 max_summary_chars, 1), ("max_node_tokens", max_node_tokens, 1)):
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise ValueError(f"{name} must be an integer >= {low}, got {value!r}")
        if difficulty_threshold is not None:
            if small_model is None:
                raise ValueError(f"difficulty_threshold={difficulty_threshold!r} routes nodes to small_model, which "
                                 "is not given")
            if (isinstance(difficulty_threshold, bool) or not isinstance(difficulty_threshold, int)
                    or not 0 <= difficulty_threshold <= max_difficulty):
                raise ValueError(f"difficulty_threshold must be an integer in 0..max_difficulty={max_difficulty}, "
                                 f"got {difficulty_threshold!r}")
        elif small_model is not None:
            difficulty_threshold = 1
        if schedule not in ("waves", "sequential"):
            raise ValueError(f"schedule must be 'waves' or 'sequential', got {schedule!r}")
        if isinstance(stop_strings, str) or not all(isinstance(s, str) and s for s in stop_strings):
            raise ValueError(f"stop_strings must be a sequence of non-empty strings, got {stop_strings!r}")
        if not (small_model is None or isinstance(small_model, (str, torch.nn.Module))):
            raise ValueError(f"small_model must be None, a model, a name/path or 'self:N', got {small_model!r}")
        for name, text, fields in (("skeleton_instruction", skeleton_instruction, ()),
                                   ("node_instruction", node_instruction, ("{header}",))):
            if not isinstance(text, str) or any(f not in text for f in fields):
                raise ValueError(f"{name} must be a string containing {list(fields)}, got {text!r}")
        self.tokenizer = tokenizer
        self.max_nodes, self.max_difficulty = max_nodes, max_difficulty
        self.max_skeleton_tokens, self.max_summary_chars = max_skeleton_tokens, max_summary_chars
        self.max_node_tokens, self.stop_strings = max_node_tokens, tuple(stop_strings)
        self.small_model, self.difficulty_threshold = small_model, difficulty_threshold
        self.schedule, self.forward_information = schedule, bool(forward_information)
        self.ignore_dependencies = bool(ignore_dependencies)
        self.skeleton = None if skeleton is None else parse_skeleton(skeleton, max_difficulty)
        self.skeleton_instruction, self.node_instruction = skeleton_instruction, node_instruction
        self.separator = separator
        self.jump_forward = bool(jump_forward)
        self._processors: dict[int, Any] = {}
        self._small: dict[int, Any] = {}

    # ------------------------------------------------------------------------------------------------ text
    def _encode(self, text: str) -> list[int]:
        return list(self.tokenizer(text, add_special_tokens=False)["input_ids"])

    @staticmethod
    def header(node: SkeletonNode) -> str:
        """The start of a node's answer: ``"<k>. <summary>:"``."""
        return f"{node.index + 1}. {node.summary}:"

    def node_prompt(self, nodes: Sequence[SkeletonNode], index: int) -> list[int]:
        """Token ids appended after the prompt to decode node ``index``: ``node_instruction`` filled with the plan,
        the parents' headers and answers (when ``forward_information`` and not ``ignore_dependencies``; the parents
        must be decoded) and the node's header."""
        plan = "".join(f"{n.index + 1}. {n.summary}\n" for n in nodes)
        parents = ""
        if self.forward_information and not self.ignore_dependencies:
            parents = "".join(f"{self.header(nodes[p])}{nodes[p].text}\n" for p in nodes[index].dependency)
        text = self.node_instruction.format(plan=plan, parents=parents, index=index + 1,
                                            header=self.header(nodes[index]))
        return self._encode(text)

    # ------------------------------------------------------------------------------------------------ models
    def _small_model(self, model):
        if self.small_model is None:
            return None
        key = id(model)
        if key not in self._small:
            from hf_decoding_ext.core.models import resolve_amateur

            small = resolve_amateur(model, self.small_model, role="small_model")
            if small.config.vocab_size != model.config.vocab_size:
                raise ValueError(f"small_model has a vocabulary of {small.config.vocab_size} tokens but the model "
                                 f"has {model.config.vocab_size}: they must share the tokenizer")
            self._small = {key: small}
        return self._small[key]

    def _json_processor(self, model):
        vocab = int(model.config.vocab_size)
        if vocab not in self._processors:
            from hf_decoding_ext.structured.json_schema import JsonSchemaLogitsProcessor

            schema = skeleton_schema(self.max_nodes, self.max_difficulty, self.max_summary_chars)
            self._processors[vocab] = JsonSchemaLogitsProcessor.for_model(
                model, self.tokenizer, schema=schema, max_new_tokens=self.max_skeleton_tokens)
        proc = self._processors[vocab]
        proc.reset()
        return proc

    @staticmethod
    def _forward(model, ids, mask, cache, counter: dict, name: str, rows: int):
        cached = cache.get_seq_length()
        positions = (mask.long().cumsum(-1) - 1).clamp(min=0)[:, cached:]
        out = model(input_ids=ids[:, cached:], attention_mask=mask, position_ids=positions, cache=cache,
                    use_cache=True, logits_to_keep=1, return_dict=True)
        counter["forwards_" + name] += 1
        counter["calls"].append((name, rows))
        return out.logits[:, -1, :].float()

    # ------------------------------------------------------------------------------------------------ run
    def run(self, state: GenerationState):
        if any(lifecycle.is_stateful(p) or lifecycle.implements_lifecycle(p) for p in state.logits_processor):
            raise ValueError("SkeletonGraphDecoding applies the logits processors to node prompts that are not "
                             "continuations of the prompt; stateful processors are not supported")
        model = state.model
        stats = SearchStats()
        counter = {"forwards_large": 0, "forwards_small": 0, "calls": []}
        eos = state.generation_config.eos_token_id
        eos = set() if eos is None else ({int(eos)} if isinstance(eos, int) else {int(e) for e in eos})
        pad = int(state.pad_token_id) if state.pad_token_id is not None else 0
        prompt, prompt_mask = state.input_ids, state.attention_mask
        # the prompt's KV cache, once per model (the caller's cache holds exactly the prompt afterwards)
        caches = {"large": state.cache}
        if state.cache.get_seq_length() < prompt.shape[1]:
            self._forward(model, prompt, prompt_mask, state.cache, counter, "large", 1)
        small = self._small_model(model)
        models = {"large": model, "small": small}

        # 1. skeleton
        skeleton_tokens = forced = 0
        valid = True
        if self.skeleton is not None:
            nodes = [SkeletonNode(n.index, n.summary, list(n.dependency), n.difficulty) for n in self.skeleton]
            skeleton_text = None
        else:
            proc = self._json_processor(model)
            request = self._encode(self.skeleton_instruction.format(max_nodes=self.max_nodes,
                                                                    max_difficulty=self.max_difficulty))
            ids = torch.cat([prompt, prompt.new_tensor([request])], dim=1)
            mask = torch.cat([prompt_mask, prompt_mask.new_ones((1, len(request)))], dim=1)
            cache = repeat_cache(state.cache, 1)
            generated: list[int] = []
            while len(generated) < self.max_skeleton_tokens:
                token = None
                if self.jump_forward and generated:  # the grammar allows one token: append it without a forward
                    allowed = proc.allowed_tokens(ids)[0]
                    if int(allowed.sum()) == 1:
                        token = int(allowed.nonzero()[0, 0])
                        forced += 1
                if token is None:
                    logits = self._forward(model, ids, mask, cache, counter, "large", 1)
                    token = int(proc(ids, logits.clone()).argmax(-1))
                generated.append(token)
                skeleton_tokens += 1
                if token in eos:
                    break
                ids = torch.cat([ids, ids.new_tensor([[token]])], dim=1)
                mask = torch.cat([mask, mask.new_ones((1, 1))], dim=1)
            del cache
            skeleton_text = self.tokenizer.decode([t for t in generated if t not in eos], skip_special_tokens=True)
            try:
                nodes = parse_skeleton(skeleton_text, self.max_difficulty)
            except ValueError:
                valid = False  # never seen under the schema; a single node keeps the answer going
                nodes = [SkeletonNode(0, "Answer", [], self.max_difficulty)]
        skeleton_forwards = counter["forwards_large"] + counter["forwards_small"]

        # 2. schedule
        for n in nodes:
            n.model = "small" if small is not None and n.difficulty <= self.difficulty_threshold else "large"
        if self.schedule == "sequential":
            waves = [[n.index] for n in nodes]  # index order is a topological order (dependencies are earlier)
        elif self.ignore_dependencies:
            waves = [[n.index for n in nodes]]
        else:
            waves = topological_waves(nodes)
        if small is not None and any(n.model == "small" for n in nodes) and "small" not in caches:
            caches["small"] = DynamicCache(config=small.config)
            self._forward(small, prompt, prompt_mask, caches["small"], counter, "small", 1)
        node_start = counter["forwards_large"] + counter["forwards_small"]

        # 3. waves
        schedule = {"waves": waves, "started": [], "finished": [], "started_at": {}, "finished_at": {}, "steps": []}
        tokens_per_model = {"large": 0, "small": 0}
        for w, wave in enumerate(waves):
            for i in wave:
                missing = [d for d in nodes[i].dependency if nodes[d].wave < 0 or nodes[d].ended == ""]
                if missing and not self.ignore_dependencies:
                    raise RuntimeError(f"node {i} scheduled before its dependencies {missing}")
                nodes[i].wave = w
                schedule["started"].append(i)
                schedule["started_at"][i] = len(schedule["steps"])
            groups = {name: [i for i in wave if nodes[i].model == name] for name in ("large", "small")}
            runs = {name: self._start_group(nodes, rows, prompt, prompt_mask, caches[name], pad)
                    for name, rows in groups.items() if rows}
            step = 0
            while runs:
                calls = []
                for name in list(runs):
                    run = runs[name]
                    logits = self._forward(models[name], run["ids"], run["mask"], run["cache"], counter, name,
                                           len(run["rows"]))
                    calls.append((name, list(run["rows"])))
                    scores = state.process(logits, input_ids=run["ids"])
                    chosen = scores.argmax(-1).tolist()
                    keep = []
                    for r, (i, token) in enumerate(zip(run["rows"], chosen)):
                        node = nodes[i]
                        node.length += 1
                        tokens_per_model[name] += 1
                        if token in eos:
                            node.ended = "eos"
                        else:
                            node.tokens.append(token)
                            node.text = self.tokenizer.decode(node.tokens, skip_special_tokens=True)
                            if any(s in node.text.lstrip() for s in self.stop_strings):
                                node.ended = "stop"
                            elif node.length >= self.max_node_tokens:
                                node.ended = "length"
                        if node.ended:
                            schedule["finished"].append(i)
                            schedule["finished_at"][i] = len(schedule["steps"])
                        else:
                            keep.append(r)
                    if not keep:
                        del runs[name]
                        continue
                    index = torch.tensor(keep, device=run["ids"].device)
                    new = run["ids"].new_tensor([[chosen[r]] for r in keep])
                    run["ids"] = torch.cat([run["ids"][index], new], dim=1)
                    run["mask"] = torch.cat([run["mask"][index], run["mask"].new_ones((len(keep), 1))], dim=1)
                    if len(keep) < len(run["rows"]):
                        run["cache"].batch_select_indices(index)
                    run["rows"] = [run["rows"][r] for r in keep]
                schedule["steps"].append({"wave": w, "step": step, "calls": calls})
                step += 1

        # 4. answer
        answer: list[int] = []
        for n in nodes:
            if answer and self.separator and not self.tokenizer.decode(answer).endswith(self.separator):
                answer += self._encode(self.separator)
            answer += self._encode(self.header(n)) + n.tokens
        eos_id = state.generation_config.eos_token_id
        if eos_id is not None:
            answer.append(int(eos_id) if isinstance(eos_id, int) else int(next(iter(eos_id))))
        state.append(prompt.new_tensor([answer]))

        total = counter["forwards_large"] + counter["forwards_small"]
        stats.model_calls = total
        stats.generated_tokens = skeleton_tokens + tokens_per_model["large"] + tokens_per_model["small"]
        stats.rollouts = len(nodes)
        stats.stop()
        node_forwards = total - node_start
        search_stats = {
            **stats.as_dict(),
            "forwards_large": counter["forwards_large"], "forwards_small": counter["forwards_small"],
            "tokens_large": tokens_per_model["large"] + skeleton_tokens, "tokens_small": tokens_per_model["small"],
            "skeleton_tokens": skeleton_tokens, "skeleton_forwards": skeleton_forwards,
            "skeleton_forced_tokens": forced,
            "skeleton_valid": valid, "nodes": len(nodes), "waves": len(waves), "width": max(len(w) for w in waves),
            "node_forwards": node_forwards,
            "node_steps": len(schedule["steps"]),
            "sequential_node_forwards": sum(n.length for n in nodes),
            "wave_max_lengths": [max(nodes[i].length for i in wave) for wave in waves],
        }
        del counter["calls"]
        return {"search_stats": search_stats, "skeleton": [n.as_dict() for n in nodes],
                "skeleton_text": skeleton_text, "schedule": schedule}

    def _start_group(self, nodes, rows, prompt, prompt_mask, prompt_cache, pad):
        """Batch of node prompts after the prompt: pads between the prompt and each (shorter) node prompt."""
        suffixes = [self.node_prompt(nodes, i) for i in rows]
        width = max(len(s) for s in suffixes)
        block = prompt.new_full((len(rows), width), pad)
        block_mask = prompt_mask.new_zeros((len(rows), width))
        for r, s in enumerate(suffixes):
            block[r, width - len(s):] = prompt.new_tensor(s)
            block_mask[r, width - len(s):] = 1
        ids = torch.cat([prompt.expand(len(rows), -1), block], dim=1)
        mask = torch.cat([prompt_mask.expand(len(rows), -1), block_mask], dim=1)
        return {"rows": list(rows), "ids": ids, "mask": mask, "cache": repeat_cache(prompt_cache, len(rows))}
