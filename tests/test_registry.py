"""Every registered method is complete, importable, documented, and (if done) covered by a real-model test."""

import dataclasses
from pathlib import Path

import pytest
import torch
from transformers import LogitsProcessor, StoppingCriteria

from hf_decoding_ext.core.loop import DecodingLoop
from hf_decoding_ext.plug import generate_kwargs
from hf_decoding_ext.speculative.drafters.base import Drafter
from hf_decoding_ext.registry import EFFECTS, FAMILY_FOLDERS, KINDS, METHODS, MethodSpec, check_unique, \
    find_methods, format_table, get_method, list_methods, markdown_table, naming_problems, normalise_identifier, \
    readme_block, register

TESTS = Path(__file__).parent
ISSUE_2_METHODS = {"mirostat-v1", "mirostat-v2", "momentum", "adaptive-top-k", "knn-lm", "adadec", "cautious-ntp",
                   "superposed", "ips"}
ISSUE_3_METHODS = {"prompt-lookup", "token-recycling", "lookahead", "jacobi", "draft-model"}
ISSUE_4_METHODS = {"cad", "cfg", "instructive", "lqcd", "contrastive-decoding", "dola", "lol", "speculative-contrastive"}


def test_names_unique_and_fields_valid():
    names = [m.name for m in METHODS]
    assert len(names) == len(set(names))
    for m in METHODS:
        assert m.kind in KINDS and m.title and m.family and m.arxiv.replace(".", "").isdigit()


def test_issue_2_3_and_4_methods_registered_as_done():
    done = {m.name for m in METHODS if m.status == "done"}
    assert ISSUE_2_METHODS | ISSUE_3_METHODS | ISSUE_4_METHODS <= done
    assert {m.name for m in METHODS if m.family == "contrastive"} >= ISSUE_4_METHODS
    assert {m.name for m in METHODS if m.family == "speculative" and m.lossless} >= ISSUE_3_METHODS


@pytest.mark.parametrize("spec", METHODS, ids=lambda m: m.name)
def test_component_matches_kind_and_is_documented(spec: MethodSpec):
    cls = spec.load()
    expected = {"processor": LogitsProcessor, "stopping_criterion": StoppingCriteria,
                "decoding_loop": DecodingLoop, "candidate_generator": Drafter}.get(spec.kind)
    if expected is not None:
        assert issubclass(cls, expected), f"{spec.target} is not a {expected.__name__}"
    doc = cls.__doc__ or ""
    assert spec.arxiv in doc, f"{spec.target} docstring does not cite arXiv {spec.arxiv}"
    assert ">>>" in doc, f"{spec.target} docstring has no example"
    assert set(spec.defaults) <= set(spec.parameters())
    assert set(spec.example) <= set(spec.parameters())


@pytest.mark.parametrize("spec", [m for m in METHODS if m.status == "done"], ids=lambda m: m.name)
def test_done_methods_have_a_real_model_test(spec: MethodSpec):
    cls_name = spec.target.split(":")[1]
    hits = [p for p in TESTS.glob("test_*.py")
            if cls_name in (text := p.read_text()) and "real_model" in text and p.name != "test_registry.py"]
    assert hits, f"{spec.name} is 'done' but no test file exercises {cls_name} on the real model"


def test_lookup_and_tables():
    with pytest.raises(ValueError, match="registered methods"):
        get_method("no-such-method")
    table = format_table()
    md = markdown_table()
    for m in METHODS:
        assert m.name in table and m.name in md


def test_unknown_parameter_lists_valid_ones():
    spec = METHODS[0]
    with pytest.raises(ValueError, match="valid parameters"):
        spec.build(no_such_parameter=1)


def test_readme_table_is_generated_from_the_registry():
    readme = (TESTS.parent / "README.md").read_text()
    assert markdown_table() in readme, "run: python scripts/update_readme_table.py"
    block = readme.split("<!-- registry-table:start -->\n")[1].split("<!-- registry-table:end -->")[0]
    assert block == readme_block(), "run: python scripts/update_readme_table.py"
    header = next(line for line in block.splitlines() if line.startswith("| name |"))
    assert "| status | effect |" in header
    for m in METHODS:  # every row shows the method's effect and its note
        row = next(line for line in block.splitlines() if line.startswith(f"| {m.name} |"))
        assert f"| **{m.effect}**: {m.effect_note} |" in row, m.name


# ---------------------------------------------------------------------------------------------- effect at this scale
def test_effect_field_is_validated():
    assert _spec("x").effect is None  # extensions may leave it unassessed
    assert _spec("x", effect="reproduced", effect_note="0.8 vs 0.4 (results/x.json)").effect == "reproduced"
    with pytest.raises(ValueError, match="effect must be one of .* got 'done'"):
        _spec("x", effect="done", effect_note="0.8")
    with pytest.raises(ValueError, match="'not reproduced' needs an effect_note .the measured figure"):
        _spec("x", effect="not reproduced")
    with pytest.raises(ValueError, match=r"'not measurable here' needs an effect_note \(the reason\)"):
        _spec("x", effect="not measurable here", effect_note="  ")
    with pytest.raises(ValueError, match="'reproduced' needs an effect_note"):
        _spec("x", effect="reproduced")
    with pytest.raises(ValueError, match="without an effect"):
        _spec("x", effect_note="0.8 vs 0.4")
    with pytest.raises(ValueError, match="without '|'"):
        _spec("x", effect="reproduced", effect_note="a | b")
    assert [m.name for m in list_methods(effect="not measurable here")] == [
        m.name for m in METHODS if m.effect == "not measurable here"]
    with pytest.raises(ValueError, match="effect must be one of"):
        list_methods(effect="yes")


def test_model_cards_show_the_effect():
    """Each trained head's card (and its checkpoint's Hub README) and the induced amateur's card (LOL) state the
    registry's effect and note (``python scripts/write_model_cards.py`` regenerates the heads' cards)."""
    from hf_decoding_ext.speculative.drafters.feature_head import SHIPPED, shipped_head_path
    from hf_decoding_ext.speculative.heads import head_class

    cards = TESTS.parent / "model_cards"
    for kind, name in SHIPPED.items():
        spec = get_method(head_class(kind).method)
        note = spec.effect_note[0].upper() + spec.effect_note[1:]
        line = f"**The paper's effect at this scale: {spec.effect}.** {note}."
        assert line in (cards / f"{name}.md").read_text(), name
        assert line in (shipped_head_path(kind) / "README.md").read_text(), name
    for spec in METHODS:  # shipped fine-tunes (scripts/write_finetune_cards.py): card and folder README
        if spec.served_model:
            note = spec.effect_note[0].upper() + spec.effect_note[1:]
            line = f"**The paper's effect at this scale: {spec.effect}.** {note}."
            folder = TESTS.parent / "hf_decoding_ext" / "data" / "finetuned" / spec.name
            assert line in (cards / f"smollm2-135m-instruct-{spec.name}.md").read_text(), spec.name
            assert line in (folder / "README.md").read_text(), spec.name
    lol = get_method("lol")
    amateur = (cards / "induced-amateur-smollm2-135m.md").read_text()
    assert f"**LOL's effect at this scale (registry): {lol.effect}.**" in amateur
    assert lol.effect_note[1:] in amateur


def _cited_files(note: str) -> list[Path]:
    """The results/, tests/ and README files a note cites (``results/sampling_{quality,speed}.json`` is two)."""
    import re

    out = []
    for ref in re.findall(r"(?:results|tests)/[\w{},.-]+|README", note):
        ref = ref.rstrip(".,")
        brace = re.search(r"\{([^}]*)\}", ref)
        names = [ref[:brace.start()] + alt + ref[brace.end():] for alt in brace.group(1).split(",")] if brace else [ref]
        out += [TESTS.parent / (n if n != "README" else "README.md") for n in names]
    return out


@pytest.mark.parametrize("spec", METHODS, ids=lambda m: m.name)
def test_every_method_states_its_effect_with_evidence(spec: MethodSpec):
    assert spec.effect in EFFECTS, f"{spec.name}: no effect at this scale"
    note = spec.effect_note
    assert len(note) > 40, note
    cited = _cited_files(note)
    assert all(p.exists() for p in cited), [str(p) for p in cited if not p.exists()]
    if spec.effect == "reproduced":  # never without a committed figure against the baseline
        assert cited and any(ch.isdigit() for ch in note) and "not measured yet" not in note, note
    if spec.effect == "not reproduced" and not any(ch.isdigit() for ch in note):
        assert "not measured yet" in note, note


def _json(name):
    import json

    return json.loads((TESTS.parent / "results" / name).read_text())


def test_effects_agree_with_the_committed_figures():
    """The verdicts and figures of the notes are those of results/*.json (a wrong figure or verdict fails)."""
    c = _json("contrastive_quality.json")
    mc = c["factual_mc"]["accuracy"]
    dola = get_method("dola")
    assert dola.effect == "not reproduced" and mc["dola_high"] <= mc["plain"] and mc["dola_low"] <= mc["plain"]
    assert f"plain {mc['plain']:.3f}, DoLa {mc['dola_high']:.3f}" in dola.effect_note
    lol = get_method("lol")
    assert lol.effect == "not reproduced" and mc["lol"] <= mc["plain"]
    assert f"LOL {mc['lol']:.3f}, plain {mc['plain']:.3f}" in lol.effect_note
    assert f"induced amateur alone {mc['lol_amateur']:.3f}" in lol.effect_note
    assert f"mean {c['factual_mc']['lol_lower_layer_term']['mean_abs']:.2f} nats" in lol.effect_note
    kc = c["knowledge_conflict"]["rates"]
    cad = get_method("cad")
    assert cad.effect == "reproduced" and kc["cad_alpha_1.0"]["context"] > kc["greedy"]["context"] + 0.2
    assert f"greedy {kc['greedy']['context']:.3f}" in cad.effect_note
    assert f"a=1 {kc['cad_alpha_1.0']['context']:.3f}" in cad.effect_note
    ins = c["instructions"]["rates"]
    assert f"greedy {ins['greedy']['follows']:.3f}" in get_method("instructive").effect_note
    assert f"{ins['instructive_eps_0.3']['follows']:.3f}" in get_method("instructive").effect_note
    # lossless accelerators: the paper's effect is a speed-up at equal output, measured against greedy decoding
    # with the same CPU kernels (the method's own speed-up); "reproduced" needs at least 1.2x there.
    speed = _json("speed.json")["methods"]
    ref = speed["repeat-last-token (reference)"]["overall"]["speed_ratio_same_kernel"]
    for name in ("prompt-lookup", "token-recycling", "auto-speculative", "lookahead", "jacobi", "medusa", "hydra",
                 "mlp-speculator", "eagle-fspad"):
        spec, o = get_method(name), speed[name]["overall"]
        own = o["speed_ratio_same_kernel"]
        assert o["match_baseline_rate"] == 1.0, name
        assert f"{own:.2f}x same-kernel greedy [{o['speed_ratio_same_kernel_min']:.2f}-" in spec.effect_note, name
        assert f"{o['speed_ratio']:.2f}x stock greedy" in spec.effect_note, name
        assert f"{o['tokens_per_forward']:.2f} tokens per forward" in spec.effect_note, name
        assert spec.effect == ("reproduced" if own >= 1.2 else "not reproduced"), name
        if spec.family == "trained-heads":
            assert f"reference ({ref:.2f}x)" in spec.effect_note, name
    # the verification schemes with the distilled draft (one interleaved run, greedy and T=1)
    vs = _json("verification_speed.json")["methods"]
    o, note = vs["draft-model"]["overall"], get_method("draft-model").effect_note
    assert o["match_baseline_rate"] == 1.0 and f"{o['speed_ratio_same_kernel']:.2f}x same-kernel greedy" in note
    assisted = vs["assisted (transformers)/fast-kernels"]["overall"]["speed_ratio_same_kernel"]
    assert f"assisted generation with the same draft {assisted:.2f}x" in note
    assert get_method("draft-model").effect == ("reproduced" if o["speed_ratio_same_kernel"] >= 1.2
                                                else "not reproduced")
    # the T=1 figures come from the T=1 re-run (bench_verification.py --t1-only), one interleaved run of its own
    vt = _json("verification_speed_t1.json")["methods"]
    t1_draft = vt["draft-model T=1"]["overall"]
    assert f"T=1 {t1_draft['speed_ratio_same_kernel']:.2f}x same-kernel sampling" in note
    assert f"{t1_draft['draft_forwards_per_token']:.1f} draft forwards per token" in note
    for name in ("spectr", "mcsd", "rsd", "dyspec", "staged-speculative"):
        spec, g, t1 = get_method(name), vs[name]["overall"], vt[f"{name} T=1"]["overall"]
        assert g["match_baseline_rate"] == 1.0, name
        assert f"greedy {g['speed_ratio_same_kernel']:.2f}x same-kernel greedy" in spec.effect_note, name
        assert f"T=1 {t1['speed_ratio_same_kernel']:.2f}x same-kernel sampling" in spec.effect_note, name
        assert spec.effect == ("reproduced" if t1["speed_ratio_same_kernel"] >= 1.2 else "not reproduced"), name
    scd = _json("scd_speed.json")["methods"]["scd_greedy"]["overall"]["speed_ratio"]
    assert scd < 1 and f"{scd:.2f}x plain" in get_method("speculative-contrastive").effect_note
    js, note = _json("jsonschemabench.json")["generation"]["metrics"]["all"], get_method("json-schema").effect_note
    budgeted, plain = js["budgeted"], js["constrained"]
    assert js["compliance"] == budgeted["compliance"] > js["unconstrained_valid"]
    assert plain["compliance_of_completed"] == 1.0 and budgeted["compliance_of_completed"] == 1.0
    assert (f"compliance {budgeted['compliance']:.2f} with the budget, {plain['compliance']:.2f} without, "
            f"{js['unconstrained_valid']:.2f} unconstrained") in note
    assert f"{100 * plain['cut_by_budget']:.0f}% of outputs were cut" in note
    assert f"{budgeted['tpot_ratio']:.2f}x unconstrained time per token with the budget" in note
    assert f"({plain['tpot_ratio']:.2f}x without)" in note
    sq = _json("sampling_quality.json")["methods"]
    mom, greedy = sq["momentum"]["overall"], sq["greedy"]["overall"]
    assert mom["rep_2"] < greedy["rep_2"] and mom["distinct_2"] > greedy["distinct_2"]
    assert f"rep-2 {mom['rep_2']:.3f} vs {greedy['rep_2']:.3f}" in get_method("momentum").effect_note
    knn = sq["knn-lm"]["overall"]
    assert get_method("knn-lm").effect != "reproduced" or knn["distinct_2"] <= greedy["distinct_2"]
    assert f"rep-2 {knn['rep_2']:.3f} vs {greedy['rep_2']:.3f}" in get_method("knn-lm").effect_note


# ---------------------------------------------------------------------------------------------- aliases and search
def test_aliases_resolve_to_their_method_whatever_the_case_and_separators():
    cases = {"GAD": "asap", "grammar-aligned decoding": "asap", "Grammar Aligned Decoding": "asap",
             "FSPAD": "eagle-fspad", "eagle": "eagle-fspad", "SGCD": "sketch-guided", "MGD": "monitor-guided",
             "CD": "contrastive-decoding", "cad": "cad", "CFG": "cfg", "ID": "instructive", "LQCD": "lqcd",
             "SCD": "speculative-contrastive", "TR": "token-recycling", "PLD": "prompt-lookup", "kNN-LM": "knn-lm",
             "CNTP": "cautious-ntp", "IPS": "ips", "DBA": "lexical-dba", "prompt_lookup": "prompt-lookup",
             "Mirostat-V2": "mirostat-v2"}
    for query, name in cases.items():
        assert get_method(query).name == name, query
    for m in METHODS:
        for alias in m.names:
            assert get_method(alias) is m, alias
            assert get_method(alias.upper()) is m, alias
    with pytest.raises(ValueError, match="Unknown method 'GADD'"):
        get_method("GADD")


def test_every_method_has_an_alias_and_names_are_unique():
    assert all(m.aliases for m in METHODS), [m.name for m in METHODS if not m.aliases]
    keys = [normalise_identifier(n) for m in METHODS for n in m.names]
    assert len(keys) == len(set(keys))
    check_unique(METHODS)


def _spec(name, aliases=(), **kw):
    fields = dict(title="A Title", arxiv="1234.5678", family="sampling", kind="processor",
                  target="hf_decoding_ext.sampling.mirostat:MirostatV2LogitsProcessor", lossless=False,
                  needs_training=False, status="done")
    return MethodSpec(name=name, aliases=tuple(aliases), **{**fields, **kw})


def test_uniqueness_check_raises_on_a_duplicate_name_or_alias():
    with pytest.raises(ValueError, match="'GAD' .*clashes with 'GAD'"):
        check_unique([*METHODS, _spec("new-method", ["GAD"])])
    with pytest.raises(ValueError, match="clashes"):  # an alias equal to another method's name, modulo case/separators
        check_unique([*METHODS, _spec("new-method", ["Token_Recycling"])])
    with pytest.raises(ValueError, match="clashes"):  # a name equal to an alias
        check_unique([*METHODS, _spec("fspad")])
    with pytest.raises(ValueError, match="clashes"):  # repeated within one method
        check_unique([_spec("x", ["y", "Y"])])
    n = len(METHODS)
    with pytest.raises(ValueError, match="clashes"):
        register(_spec("another-method", ["CFG"]))
    assert len(METHODS) == n
    with pytest.raises(ValueError, match="aliases"):
        _spec("x", "not-a-tuple")


def test_find_methods_examples_and_ranking():
    def names(q):
        return [m.name for m in find_methods(q)]

    assert names("grammar-aligned") == ["asap"]
    assert names("2402.05109") == ["hydra"]
    assert names("arXiv:2402.05109v2") == ["hydra"]
    assert names("eagle") == ["eagle-fspad"]
    assert names("GAD") == ["asap"]
    # title words, case-insensitive, in any order and as word prefixes
    assert names("Sycophancy") == ["lqcd"]
    assert names("perplexity mirostat") == ["mirostat-v1", "mirostat-v2"]
    assert names("contrasting layers") == ["dola"]
    # an exact alias first, then names/aliases containing the query, then title words
    ranked = names("speculative decoding")
    assert ranked[0] == "draft-model" and {"prompt-lookup", "speculative-contrastive", "eagle-fspad"} <= set(ranked)
    assert names("extractive")[:2] == ["exact-extractive", "extractive-span"]
    # a shared arXiv id finds every method of the paper
    assert names("2108.05857") == ["exact-extractive", "extractive-span"]
    assert find_methods("no such decoding method anywhere") == []
    assert [m.name for m in find_methods("aligned", list_methods(family="sampling"))] == []
    with pytest.raises(ValueError, match="non-empty"):
        find_methods("  ")


def test_find_methods_is_on_the_face():
    import hf_decoding_ext

    assert hf_decoding_ext.find_methods is find_methods


# ---------------------------------------------------------------------------------------------- naming rule
NAMING_EXCEPTIONS: dict[str, str] = {}  # method -> why its module or class is not named after it


def test_normalisation():
    assert normalise_identifier("Grammar-Aligned_decoding") == normalise_identifier("GrammarAlignedDecoding")
    assert normalise_identifier("KNNLMLogitsProcessor") == "knnlmlogitsprocessor"
    assert normalise_identifier("Isotropic and Proximal Search") == normalise_identifier("IsotropicProximalSearch")
    assert normalise_identifier("mirostat-v1") != normalise_identifier("mirostat-v2")


@pytest.mark.parametrize("spec", METHODS, ids=lambda m: m.name)
def test_module_and_class_are_named_after_the_method(spec: MethodSpec):
    problems = naming_problems(spec)
    if spec.name in NAMING_EXCEPTIONS:
        assert problems, f"{spec.name} now follows the naming rule: remove it from NAMING_EXCEPTIONS"
        return
    assert not problems, problems
    assert FAMILY_FOLDERS[spec.family] == spec.target.split(".")[1]


def test_naming_check_catches_misplaced_and_misnamed_components():
    # the family folder: a sampling method living in the contrastive folder
    bad = _spec("momentum", target="hf_decoding_ext.contrastive.momentum:MomentumLogitsProcessor")
    assert any("not under hf_decoding_ext/sampling/" in p for p in naming_problems(bad, []))
    # trained heads live in the speculative folder
    ok = _spec("medusa", family="trained-heads", kind="candidate_generator",
               target="hf_decoding_ext.speculative.drafters.medusa:MedusaDrafter")
    assert naming_problems(ok, []) == []
    # a module file and a class named after something else
    bad = _spec("my-method", target="hf_decoding_ext.sampling.helpers:OtherLogitsProcessor")
    problems = naming_problems(bad, [])
    assert len(problems) == 2 and "helpers.py" in problems[0] and "OtherLogitsProcessor" in problems[1]
    # a module may hold variants whose names begin with the module's (mirostat.py: mirostat-v1, mirostat-v2)
    assert naming_problems(_spec("fancy-v2", target="hf_decoding_ext.sampling.fancy:FancyV2Processor"), []) == []
    # an alias names them; a suffix other than the allowed ones does not
    good = _spec("my-method", ["fancy decoding"], target="hf_decoding_ext.sampling.fancy:FancySampling")
    assert naming_problems(good, []) == []
    bad = _spec("my-method", ["fancy"], target="hf_decoding_ext.sampling.fancy:FancyThing")
    assert len(naming_problems(bad, [])) == 1
    # a second method of the same paper may live in the first one's module
    first = _spec("exact-fancy", arxiv="1111.2222", target="hf_decoding_ext.sampling.exact_fancy:ExactFancyDecoding")
    sibling = _spec("fancy-span", arxiv="1111.2222",
                    target="hf_decoding_ext.sampling.exact_fancy:FancySpanProcessor")
    assert naming_problems(sibling, [first, sibling]) == []
    assert naming_problems(sibling, [sibling])  # not without that sibling


# ---------------------------------------------------------------------------------------------- engine options
def test_engine_options_reach_the_speculative_engine(tiny_llama):
    from hf_decoding_ext.speculative import SpeculativeDecoding

    spec = dataclasses.replace(get_method("prompt-lookup"), engine={"acceptance": "greedy", "max_draft_nodes": 1})
    loop = generate_kwargs(spec)["custom_generate"]
    assert isinstance(loop, SpeculativeDecoding) and loop.acceptance == "greedy" and loop.max_draft_nodes == 1
    # options passed to generate_kwargs override the registered ones
    assert generate_kwargs(spec, engine={"max_draft_nodes": 2})["custom_generate"].max_draft_nodes == 2
    # they act on decoding: the cap on draft nodes holds, the output stays greedy's
    ids = torch.tensor([[5, 6, 7, 8, 9] * 6])
    ref = tiny_llama.generate(ids, max_new_tokens=10, do_sample=False)
    default = generate_kwargs("prompt-lookup")["custom_generate"]
    assert torch.equal(tiny_llama.generate(ids, max_new_tokens=10, do_sample=False, custom_generate=default), ref)
    assert max(s.draft_size for s in default.last_stats) > 1
    assert torch.equal(tiny_llama.generate(ids, max_new_tokens=10, do_sample=False, custom_generate=loop), ref)
    assert max(s.draft_size for s in loop.last_stats) == 1


def test_engine_options_are_validated():
    with pytest.raises(ValueError, match="candidate generators"):
        _spec("x", engine={"acceptance": "greedy"})  # a processor has no engine
    with pytest.raises(ValueError, match="Unknown engine option"):
        generate_kwargs("prompt-lookup", engine={"no_such_option": 1})
    with pytest.raises(ValueError, match="candidate generators"):
        generate_kwargs("mirostat-v2", engine={"acceptance": "greedy"})
    assert all(m.engine == {} or m.kind == "candidate_generator" for m in METHODS)


def test_fine_tuned_methods_name_the_model_they_serve():
    """Methods that fine-tune the model they run on (family "fine-tuned") name a served_model loader taking
    ``(path, device=)``, which the CLI uses instead of the plain default model; other methods have none, and
    asking them for one is a clear error."""
    import inspect as _inspect

    from hf_decoding_ext.registry import import_target

    for spec in METHODS:
        if spec.family == "fine-tuned" and spec.kind == "decoding_loop":
            assert spec.served_model, spec.name
            params = _inspect.signature(import_target(spec.served_model)).parameters
            assert list(params)[0] == "path" and "device" in params, spec.name
        elif spec.family != "fine-tuned":
            assert not spec.served_model, spec.name
    with pytest.raises(ValueError, match="runs on any model"):
        get_method("mirostat-v2").load_served_model()
