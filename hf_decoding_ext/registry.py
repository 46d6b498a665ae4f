"""The one registry of decoding methods.

Every method the library ships is listed here once, with its paper, family, component kind and status. The CLI
(``hf-decoding-ext list`` / ``generate``), the docs table (``python -m hf_decoding_ext.registry --markdown``) and the
parametrised tests all read this list. A method is ``done`` only when a test shows the paper's core property on the
real default model.
"""

from __future__ import annotations

import importlib
import inspect
from dataclasses import dataclass, field
from typing import Any

KINDS = ("processor", "stopping_criterion", "candidate_generator", "decoding_loop")
STATUSES = ("done", "experimental")


@dataclass(frozen=True)
class MethodSpec:
    """One registered decoding method.

    Attributes:
        name: CLI name, e.g. ``"mirostat-v2"``.
        title: the paper's title.
        arxiv: the paper's arXiv id.
        family: method family (``"sampling"``, ``"speculative"``, ...).
        kind: one of :data:`KINDS`: how the method plugs into ``generate()``.
        target: ``"module:Class"`` of the component.
        lossless: whether the output equals the base decoding (greedy or the model's distribution).
        needs_training: whether the method needs trained weights or a fitted artefact beyond the base model.
        status: ``"done"`` (core property tested on the real model) or ``"experimental"``.
        do_sample: whether ``generate()`` should sample (``True``) or be greedy by default for this method.
        defaults: default constructor parameters used by the CLI.
        summary: one line describing the method.
        example: parameters for a demonstration run with the prompt "Name a fruit." (the CLI test and docs), for
            methods that need per-prompt inputs such as a second-view prompt; empty when none are needed.
    """

    name: str
    title: str
    arxiv: str
    family: str
    kind: str
    target: str
    lossless: bool
    needs_training: bool
    status: str
    do_sample: bool = False
    defaults: dict[str, Any] = field(default_factory=dict)
    summary: str = ""
    example: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self):
        if self.kind not in KINDS:
            raise ValueError(f"{self.name}: kind must be one of {KINDS}, got {self.kind!r}")
        if self.status not in STATUSES:
            raise ValueError(f"{self.name}: status must be one of {STATUSES}, got {self.status!r}")

    def load(self):
        """Import and return the component class (or factory)."""
        module, _, attr = self.target.partition(":")
        return getattr(importlib.import_module(module), attr)

    def factory(self):
        """The callable that builds the component: ``Class.for_model`` when defined, else the class."""
        cls = self.load()
        return getattr(cls, "for_model", cls)

    def parameters(self) -> list[str]:
        """Names of the user-settable constructor parameters."""
        skip = {"self", "model", "tokenizer", "args", "kwargs"}
        sig = inspect.signature(self.factory())
        return [p for p in sig.parameters if p not in skip and sig.parameters[p].kind not in (
            inspect.Parameter.VAR_POSITIONAL, inspect.Parameter.VAR_KEYWORD)]

    def build(self, model=None, tokenizer=None, **params):
        """Instantiate the component, raising a clear ``ValueError`` on unknown parameters."""
        valid = self.parameters()
        unknown = sorted(set(params) - set(valid))
        if unknown:
            raise ValueError(
                f"Unknown parameter(s) {unknown} for method {self.name!r}; valid parameters: {valid or 'none'}"
            )
        kwargs = {**self.defaults, **params}
        fac = self.factory()
        sig = inspect.signature(fac).parameters
        if "model" in sig:
            kwargs["model"] = model
        if "tokenizer" in sig:
            kwargs["tokenizer"] = tokenizer
        return fac(**kwargs)


def _m(**kw) -> MethodSpec:
    return MethodSpec(**kw)


# fmt: off
METHODS: list[MethodSpec] = [
    # ---------------------------------------------------------------------------------------------- sampling
    _m(name="mirostat-v1", title="Mirostat: A Neural Text Decoding Algorithm that Directly Controls Perplexity",
       arxiv="2007.14966", family="sampling", kind="processor",
       target="hf_decoding_ext.sampling.mirostat:MirostatV1LogitsProcessor", lossless=False, needs_training=False,
       status="done", do_sample=True, defaults={"tau": 3.0, "eta": 0.1},
       summary="Zipf-estimated top-k with a feedback loop keeping the observed surprise at tau bits"),
    _m(name="mirostat-v2", title="Mirostat: A Neural Text Decoding Algorithm that Directly Controls Perplexity",
       arxiv="2007.14966", family="sampling", kind="processor",
       target="hf_decoding_ext.sampling.mirostat:MirostatV2LogitsProcessor", lossless=False, needs_training=False,
       status="done", do_sample=True, defaults={"tau": 3.0, "eta": 0.1},
       summary="keep tokens with surprise <= mu; mu adapts so the observed surprise converges to tau bits"),
    _m(name="adaptive-top-k", title="Foundations of Top-k Decoding For Language Models", arxiv="2505.19371",
       family="sampling", kind="processor",
       target="hf_decoding_ext.sampling.adaptive_topk:AdaptiveTopKLogitsProcessor", lossless=False,
       needs_training=False, status="done", do_sample=True, defaults={"lam": 0.01},
       summary="l0-penalised Bregman decoder: per-step k by binary search on a convex objective; KL = top-k"),
    _m(name="momentum", title="Momentum Decoding: Open-ended Text Generation As Graph Exploration",
       arxiv="2212.02175", family="sampling", kind="processor",
       target="hf_decoding_ext.sampling.momentum:MomentumLogitsProcessor", lossless=False, needs_training=False,
       status="done", do_sample=False,
       defaults={"top_k": 5, "alpha": 0.2, "resistance": "linear", "ngram_size": 5},
       summary="greedy over the top-k minus alpha*R(depth) for candidates that would close a loop in the n-gram graph"),
    _m(name="knn-lm", title="KNN-LM Does Not Improve Open-ended Text Generation", arxiv="2305.14625",
       family="sampling", kind="processor", target="hf_decoding_ext.sampling.knn_lm:KNNLMLogitsProcessor",
       lossless=False, needs_training=False, status="done", do_sample=False,
       defaults={"lmbda": 0.25, "k": 1024, "temperature": 1.0},
       summary="kNN-LM (Khandelwal et al. 2020): mix the LM with a kNN distribution over a hidden-state datastore"),
    _m(name="adadec", title="Towards Better Code Generation: Adaptive Decoding with Uncertainty Guidance",
       arxiv="2506.08980", family="sampling", kind="decoding_loop", target="hf_decoding_ext.sampling.adadec:AdaDec",
       lossless=False, needs_training=True, status="done", do_sample=False,
       summary="greedy that pauses when entropy exceeds a fitted per-model threshold and reranks top-k by lookahead"),
    _m(name="cautious-ntp", title="Cautious Next Token Prediction", arxiv="2507.03038", family="sampling",
       kind="decoding_loop", target="hf_decoding_ext.sampling.cautious:CautiousNTP", lossless=False,
       needs_training=False, status="done", do_sample=True,
       summary="at uncertain steps sample 1-10 trials up to punctuation and keep the lowest-perplexity one"),
    _m(name="superposed", title="Superposed Decoding: Multiple Generations from a Single Autoregressive Inference Pass",
       arxiv="2405.18400", family="sampling", kind="decoding_loop",
       target="hf_decoding_ext.sampling.superposed:SuperposedDecoding", lossless=False, needs_training=False,
       status="done", do_sample=False,
       summary="k drafts from one pass: superposed draft embeddings as input, n-gram-interpolated pruning to top k"),
    _m(name="ips", title="Fine-grained Conversational Decoding via Isotropic and Proximal Search",
       arxiv="2310.08130", family="sampling", kind="decoding_loop",
       target="hf_decoding_ext.sampling.ips:IsotropicProximalSearch", lossless=False, needs_training=False,
       status="done", do_sample=False,
       summary="dialogue decoding: confidence + proximity of response tokens - similarity to context utterances"),
    # ------------------------------------------------------------------------------------------- speculative
    # (issue 3 in progress: lossless tests pass; speed benchmark pending, hence "experimental")
    _m(name="prompt-lookup", title="Fast Inference from Transformers via Speculative Decoding", arxiv="2211.17192",
       family="speculative", kind="candidate_generator",
       target="hf_decoding_ext.speculative.drafters.prompt_lookup:PromptLookupDrafter", lossless=True,
       needs_training=False, status="done",
       summary="n-gram lookup in the prompt and output so far (prompt lookup decoding), verified by the engine"),
    _m(name="token-recycling", title="Turning Trash into Treasure: Accelerating Inference of Large Language Models "
       "with Token Recycling", arxiv="2408.08696", family="speculative", kind="candidate_generator",
       target="hf_decoding_ext.speculative.drafters.token_recycling:TokenRecyclingDrafter", lossless=True,
       needs_training=False, status="done",
       summary="adjacency matrix of recycled top-k candidates, static draft tree (the paper's 80 nodes; its 16 "
               "most-accepted nodes on CPU)"),
    _m(name="lookahead", title="Break the Sequential Dependency of LLM Inference Using Lookahead Decoding",
       arxiv="2402.02057", family="speculative", kind="candidate_generator",
       target="hf_decoding_ext.speculative.drafters.lookahead:LookaheadDrafter", lossless=True,
       needs_training=False, status="done",
       defaults={"window_size": 4, "ngram_size": 4, "max_guesses": 3, "pool_from_prompt": True},
       summary="2D Jacobi lookahead window collects n-grams; matching n-grams verified in the same forward "
               "(registry defaults W=4, N=4, G=3 + prompt n-grams, sized for CPU; the paper's GPU setting is "
               "W=15, N=5, G=15)"),
    _m(name="jacobi", title="Accelerating Transformer Inference for Translation via Parallel Decoding",
       arxiv="2305.10427", family="speculative", kind="candidate_generator",
       target="hf_decoding_ext.speculative.drafters.jacobi:JacobiDrafter", lossless=True,
       needs_training=False, status="done",
       summary="GS-Jacobi fixed-point iteration over blocks of guessed tokens, verified as a chain"),
    _m(name="draft-model", title="Fast Inference from Transformers via Speculative Decoding", arxiv="2211.17192",
       family="speculative", kind="candidate_generator",
       target="hf_decoding_ext.speculative.drafters.draft_model:DraftModelDrafter", lossless=True,
       needs_training=False, status="done", defaults={"assistant": "self:4"},
       summary="a small causal LM sharing the tokenizer drafts a chain (assisted generation); default assistant: "
               "the target's first 4 layers"),
    # ------------------------------------------------------------------------------------------- trained heads
    _m(name="medusa", title="Medusa: Simple LLM Inference Acceleration Framework with Multiple Decoding Heads",
       arxiv="2401.10774", family="trained-heads", kind="candidate_generator",
       target="hf_decoding_ext.speculative.drafters.medusa:MedusaDrafter", lossless=True, needs_training=True,
       status="done", defaults={"heads": "shipped"},
       summary="Medusa-1 heads (residual block per head, shared frozen lm_head) over the target's last feature; "
               "sparse tree from measured head accuracies; shipped heads for SmolLM2-135M-Instruct"),
    _m(name="hydra", title="Hydra: Sequentially-Dependent Draft Heads for Medusa Decoding", arxiv="2402.05109",
       family="trained-heads", kind="candidate_generator",
       target="hf_decoding_ext.speculative.drafters.hydra:HydraDrafter", lossless=True, needs_training=True,
       status="done", defaults={"heads": "shipped"},
       summary="draft heads conditioned on the target feature and the embeddings of the draft prefix; shipped heads"),
    _m(name="mlp-speculator", title="Accelerating Production LLMs with Combined Token/Embedding Speculators",
       arxiv="2404.19124", family="trained-heads", kind="candidate_generator",
       target="hf_decoding_ext.speculative.drafters.mlp_speculator:MLPSpeculatorDrafter", lossless=True,
       needs_training=True, status="done", defaults={"heads": "shipped"},
       summary="multi-stage MLP speculator: state from the target feature, each stage conditioned on the previous "
               "token; shipped weights"),
    _m(name="eagle-fspad", title="Boosting Lossless Speculative Decoding via Feature Sampling and Partial Alignment "
       "Distillation", arxiv="2408.15562", family="trained-heads", kind="candidate_generator",
       target="hf_decoding_ext.speculative.drafters.eagle:EagleDrafter", lossless=True, needs_training=True,
       status="done", defaults={"drafter": "shipped"},
       summary="EAGLE-style one-layer feature drafter (own KV cache, tree drafting) trained with FSPAD's feature "
               "sampling and partial alignment distillation; shipped weights; exports to vLLM speculators"),
    # ------------------------------------------------------------------------------------------- contrastive
    _m(name="cad", title="Context-aware Decoding Reduces Hallucination in Query-focused Summarization",
       arxiv="2312.14335", family="contrastive", kind="processor",
       target="hf_decoding_ext.contrastive.cad:ContextAwareDecodingProcessor", lossless=False,
       needs_training=False, status="done", defaults={"alpha": 0.5},
       example={"no_context_prompts": "Name something."},
       summary="context-aware decoding (Shi et al. 2023): (1+a) logit(y|c,x) - a logit(y|x), second view without "
               "the context"),
    _m(name="cfg", title="Guiding Image Captioning Models Toward More Specific Captions", arxiv="2307.16686",
       family="contrastive", kind="processor",
       target="hf_decoding_ext.contrastive.cfg:ClassifierFreeGuidanceProcessor", lossless=False,
       needs_training=False, status="done", defaults={"gamma": 2.0},
       summary="classifier-free guidance: log p(y) + gamma (log p(y|x) - log p(y)), any conditional text prompt"),
    _m(name="instructive", title="Distort, Distract, Decode: Instruction-Tuned Model Can Refine its Response from "
       "Noisy Instructions", arxiv="2311.00233", family="contrastive", kind="processor",
       target="hf_decoding_ext.contrastive.instructive:InstructiveDecodingProcessor", lossless=False,
       needs_training=False, status="done", defaults={"epsilon": 0.3, "variant": "opposite"},
       example={"task_inputs": "Name a fruit."},
       summary="instructive decoding: z - eps * z(noisy 'opposite' instruction)"),
    _m(name="lqcd", title="Towards Analyzing and Mitigating Sycophancy in Large Vision-Language Models",
       arxiv="2408.11261", family="contrastive", kind="processor",
       target="hf_decoding_ext.contrastive.leading_query:LeadingQueryContrastiveProcessor", lossless=False,
       needs_training=False, status="done", defaults={"alpha": 1.0, "beta": 0.1},
       example={"leading_prompts": "Name a fruit. It is a carrot, right?"},
       summary="leading-query contrastive decoding: neutral-query logits contrasted with the leading query's, "
               "within the plausible head"),
    _m(name="contrastive-decoding", title="Contrastive Decoding: Open-ended Text Generation as Optimization",
       arxiv="2210.15097", family="contrastive", kind="processor",
       target="hf_decoding_ext.contrastive.contrastive_decoding:ContrastiveDecodingProcessor", lossless=False,
       needs_training=False, status="done",
       defaults={"amateur": "self:4", "alpha": 0.1, "amateur_temperature": 0.5},
       summary="expert minus amateur log-probabilities over the expert's plausible head (default amateur: the "
               "expert's first 4 layers)"),
    _m(name="dola", title="DoLa: Decoding by Contrasting Layers Improves Factuality in Large Language Models",
       arxiv="2309.03883", family="contrastive", kind="decoding_loop", target="hf_decoding_ext.contrastive.dola:DoLa",
       lossless=False, needs_training=False, status="done",
       defaults={"dola_layers": "high", "alpha": 0.1, "repetition_penalty": 1.2},
       summary="final layer minus the dynamically chosen (max-JSD) premature layer, plausibility constraint"),
    _m(name="lol", title="Lower Layer Matters: Alleviating Hallucination via Multi-Layer Fusion Contrastive Decoding "
       "with Truthfulness Refocused", arxiv="2408.08769", family="contrastive", kind="decoding_loop",
       target="hf_decoding_ext.contrastive.lol:LOL", lossless=False, needs_training=True, status="done",
       defaults={"amateur": "induced", "lam": 1.0, "lam_lower": 1.0, "omega": 1.0, "alpha": 0.1},
       summary="final-layer and lower-layer contrast with a hallucination-induced amateur (shipped for the default "
               "model), fused; truthfulness-refocusing instruction"),
    _m(name="speculative-contrastive", title="Speculative Contrastive Decoding", arxiv="2311.08981",
       family="contrastive", kind="decoding_loop",
       target="hf_decoding_ext.contrastive.speculative_contrastive:SpeculativeContrastiveDecoding", lossless=False,
       needs_training=False, status="done",
       defaults={"amateur": "self:4", "beta": 0.5, "alpha": 0.1, "num_tokens": 4},
       summary="the amateur drafts, the expert verifies against the contrastive target (same output distribution "
               "as contrastive decoding)"),
    # ---- constrained and structured generation (issue 5)
    _m(name="json-schema", title="Generating Structured Outputs from Language Models: Benchmark and Studies",
       arxiv="2501.10868", family="structured", kind="processor",
       target="hf_decoding_ext.structured.constrained:JsonSchemaLogitsProcessor", lossless=False,
       needs_training=False, status="done", defaults={"schema": True},
       example={"schema": {"type": "object", "properties": {"fruit": {"type": "string", "maxLength": 12}},
                           "required": ["fruit"], "additionalProperties": False}},
       summary="JSON-schema constrained decoding with llguidance token masks (regex and Lark grammars via "
               "GrammarConstrainedLogitsProcessor); one matcher per row, rollback for speculative decoding"),
    _m(name="asap", title="Grammar-Aligned Decoding", arxiv="2405.21047", family="structured",
       kind="decoding_loop", target="hf_decoding_ext.structured.grammar_aligned:GrammarAlignedSampling",
       lossless=False, needs_training=False, status="done", do_sample=True, defaults={},
       example={"grammar": "(apple|banana|cherry)"},
       summary="ASAp: grammar-constrained sampling that learns expected future grammaticality from earlier samples "
               "and converges to the model's distribution conditioned on the grammar"),
    _m(name="awrs", title="Fast Controlled Generation from Language Models with Adaptive Weighted Rejection Sampling",
       arxiv="2504.05410", family="structured", kind="decoding_loop",
       target="hf_decoding_ext.structured.awrs:AdaptiveWeightedRejectionSampling", lossless=False,
       needs_training=False, status="done", do_sample=True, defaults={"constraint": "no-letter-e"},
       summary="adaptive rejection sampling without replacement: the constraint (predicate or grammar) is evaluated "
               "only on drawn tokens, with unbiased importance weights of the local normaliser"),
    _m(name="monitor-guided", title="Guiding Language Models of Code with Global Context using Monitors",
       arxiv="2306.10763", family="structured", kind="processor",
       target="hf_decoding_ext.structured.monitor_guided:MonitorGuidedLogitsProcessor", lossless=False,
       needs_training=False, status="done", defaults={},
       summary="dereference monitor over jedi: after `obj.` only tokens spelling a member of obj's inferred type "
               "(other repository files as global context); inactive elsewhere"),
    _m(name="exact-extractive", title="How Optimal is Greedy Decoding for Extractive Question Answering?",
       arxiv="2108.05857", family="structured", kind="decoding_loop",
       target="hf_decoding_ext.structured.exact_extractive:ExactExtractiveDecoding", lossless=False,
       needs_training=False, status="done", defaults={"nodes_per_forward": 16},
       example={"context": "Apples, bananas and cherries are fruits."},
       summary="exact-extract: the most probable span of a context, by exact best-first branch and bound over the "
               "trie of spans (tree-attention forwards on the prompt's KV cache)"),
    _m(name="extractive-span", title="How Optimal is Greedy Decoding for Extractive Question Answering?",
       arxiv="2108.05857", family="structured", kind="processor",
       target="hf_decoding_ext.structured.exact_extractive:ExtractiveSpanLogitsProcessor", lossless=False,
       needs_training=False, status="done", defaults={},
       example={"context": "Apples, bananas and cherries are fruits."},
       summary="extractive constraint: only tokens extending a span of the context, eos after at least one token"),
    _m(name="sketch-guided",
       title="Sketch-Guided Constrained Decoding for Boosting Blackbox Large Language Models without Logit Access",
       arxiv="2401.09967", family="structured", kind="decoding_loop",
       target="hf_decoding_ext.structured.sketch_guided:SketchGuidedDecoding", lossless=False,
       needs_training=False, status="done", defaults={},
       example={"sketch": "Apples are a fruit.", "regex": "(apple|banana|cherry)"},
       summary="a local model refines a blackbox LLM's unconstrained sketch into a grammar-valid output: few-shot "
               "prompt (input, sketch) -> output, decoded under llguidance constraints"),
    _m(name="lexical-dba",
       title="Fast Lexically Constrained Decoding with Dynamic Beam Allocation for Neural Machine Translation",
       arxiv="1804.06609", family="structured", kind="decoding_loop",
       target="hf_decoding_ext.structured.lexical_dba:DynamicBeamAllocation", lossless=False,
       needs_training=False, status="done", defaults={"num_beams": 4}, example={"constraints": ["banana"]},
       summary="beam search whose every output contains given phrases: constraint candidates, beam split into banks "
               "by constraint tokens met (dynamic beam allocation); eos only once all are met"),
]
# fmt: on


def register(spec: MethodSpec) -> MethodSpec:
    """Add a method (used by extensions); names must be unique."""
    if any(m.name == spec.name for m in METHODS):
        raise ValueError(f"method {spec.name!r} is already registered")
    METHODS.append(spec)
    return spec


def get_method(name: str) -> MethodSpec:
    """Look a method up by name; unknown names raise a ``ValueError`` listing the valid ones."""
    for m in METHODS:
        if m.name == name:
            return m
    raise ValueError(f"Unknown method {name!r}; registered methods: {', '.join(m.name for m in METHODS)}")


def list_methods(family: str | None = None, status: str | None = None) -> list[MethodSpec]:
    return [m for m in METHODS if (family is None or m.family == family) and (status is None or m.status == status)]


COLUMNS = ("name", "family", "kind", "lossless", "needs_training", "status", "arxiv", "title")


def table_rows(methods=None) -> list[list[str]]:
    rows = []
    for m in methods if methods is not None else METHODS:
        rows.append([m.name, m.family, m.kind, "yes" if m.lossless else "no", "yes" if m.needs_training else "no",
                     m.status, m.arxiv, m.title])
    return rows


def format_table(methods=None) -> str:
    rows = [list(COLUMNS)] + table_rows(methods)
    widths = [max(len(r[i]) for r in rows) for i in range(len(COLUMNS))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def markdown_table(methods=None) -> str:
    rows = table_rows(methods)
    out = ["| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    for r in rows:
        r = r[:6] + [f"[{r[6]}](https://arxiv.org/abs/{r[6]})", r[7]]
        out.append("| " + " | ".join(r) + " |")
    return "\n".join(out)


if __name__ == "__main__":  # pragma: no cover
    import sys

    print(markdown_table() if "--markdown" in sys.argv else format_table())
