"""The command line: list, generate with every registered method on the default model, clear errors."""

import pytest

from hf_decoding_ext.cli import main, parse_params
from hf_decoding_ext.registry import METHODS


def test_parse_params():
    assert parse_params(["tau=3.0", "version=2", "name=abc", "flag=True"]) == {
        "tau": 3.0, "version": 2, "name": "abc", "flag": True}
    with pytest.raises(ValueError):
        parse_params(["novalue"])


def test_list_prints_every_method(capsys):
    assert main(["list"]) == 0
    out = capsys.readouterr().out
    for m in METHODS:
        assert m.name in out
    assert main(["list", "--markdown"]) == 0
    assert "| name |" in capsys.readouterr().out


def test_list_shows_aliases_and_searches(capsys):
    assert main(["list"]) == 0
    out = capsys.readouterr().out
    assert "aliases" in out.splitlines()[0]
    for m in METHODS:
        row = next(line for line in out.splitlines() if line.split()[0] == m.name)
        assert all(a in row for a in m.aliases), m.name
    assert main(["list", "--search", "grammar-aligned"]) == 0
    rows = capsys.readouterr().out.splitlines()[2:]
    assert [r.split()[0] for r in rows] == ["asap"]
    assert main(["list", "--search", "2402.05109"]) == 0
    assert [r.split()[0] for r in capsys.readouterr().out.splitlines()[2:]] == ["hydra"]
    assert main(["list", "--search", "contrastive", "--family", "contrastive", "--markdown"]) == 0
    md = capsys.readouterr().out
    assert "| speculative-contrastive |" in md and "| cad |" not in md
    assert main(["list", "--search", "no such method anywhere"]) == 1
    assert "no method matches" in capsys.readouterr().err


def test_list_shows_the_effect_at_this_scale(capsys):
    import re

    from hf_decoding_ext.registry import EFFECTS

    assert main(["list"]) == 0
    lines = capsys.readouterr().out.splitlines()
    header = re.split(r"\s{2,}", lines[0])
    assert header[header.index("status") + 1] == "effect"
    for m in METHODS:  # the effect column of each row holds the method's value
        row = re.split(r"\s{2,}", next(line for line in lines if line.split()[0] == m.name))
        assert row[header.index("effect")] == m.effect, m.name
    # the notes: the measured figure against the baseline, or the reason
    assert main(["list", "--notes"]) == 0
    out = capsys.readouterr().out
    for m in METHODS:
        line = rf"^{re.escape(m.name)} +{re.escape(m.effect)}: {re.escape(m.effect_note)}$"
        assert re.search(line, out, re.M), m.name
    # filter by effect
    for effect in EFFECTS:
        assert main(["list", "--effect", effect]) == 0
        rows = capsys.readouterr().out.splitlines()[2:]
        assert [r.split()[0] for r in rows] == [m.name for m in METHODS if m.effect == effect]
    assert main(["list", "--effect", "maybe"]) == 2
    assert "invalid choice: 'maybe'" in capsys.readouterr().err
    assert main(["list", "--markdown"]) == 0
    md = capsys.readouterr().out
    assert "| status | effect |" in md and all(f"**{m.effect}**: {m.effect_note}" in md for m in METHODS)


def test_generate_accepts_an_alias_and_checks_engine_options(capsys):
    # the alias resolves (the error names the method), and bad options fail before any model is loaded
    assert main(["generate", "--method", "GAD", "--param", "bogus=1", "--prompt", "hi"]) == 2
    assert "method 'asap'" in capsys.readouterr().err
    assert main(["generate", "--method", "PLD", "--engine", "bogus=1", "--prompt", "hi"]) == 2
    assert "Unknown engine option(s) ['bogus'] for method 'prompt-lookup'" in capsys.readouterr().err
    assert main(["generate", "--method", "mirostat-v2", "--engine", "acceptance=greedy", "--prompt", "hi"]) == 2
    assert "candidate generators" in capsys.readouterr().err


def test_train_kinds_are_the_declared_head_kinds(capsys):
    from hf_decoding_ext.cli import build_parser
    from hf_decoding_ext.speculative.heads import RECIPES, head_classes

    parser = build_parser()
    train = next(a for a in parser._subparsers._group_actions[0].choices.values() if a.prog.endswith(" train"))
    kind = next(a for a in train._actions if a.dest == "kind")
    recipe = next(a for a in train._actions if a.dest == "recipe")
    assert list(kind.choices) == list(head_classes()) and list(recipe.choices) == list(RECIPES)
    assert main(["train", "--help"]) == 0
    out = capsys.readouterr().out
    for name, cls in head_classes().items():
        assert f"  {name}: {cls.display_name}" in out
        assert " ".join(f"{k}={v}" for k, v in cls.training_defaults.items()) in out
    assert main(["train", "no-such-head", "--out", "x"]) == 2
    assert "invalid choice: 'no-such-head'" in capsys.readouterr().err


def test_unknown_method_and_parameter_are_clear_errors(capsys):
    assert main(["generate", "--method", "nope", "--prompt", "hi"]) == 2
    err = capsys.readouterr().err
    assert "Unknown method 'nope'" in err and METHODS[0].name in err
    assert main(["generate", "--method", METHODS[0].name, "--param", "bogus=1", "--prompt", "hi"]) == 2
    assert "valid parameters" in capsys.readouterr().err


@pytest.mark.real_model
@pytest.mark.parametrize("spec", METHODS, ids=lambda m: m.name)
def test_generate_every_method_on_default_model(spec, capsys, smollm, tmp_path):
    params = [f"--param={k}={v}" for k, v in spec.example.items()]
    if spec.name == "knn-lm":
        # the default datastore (built from all shipped docs at first use, about 2 min here) is tested on the tiny
        # model (tests/test_knn_lm.py); the CLI runs here with a small datastore passed as a path instead
        from hf_decoding_ext.sampling.knn_lm import KNNDatastore, stdlib_docs_texts

        store = tmp_path / "store.safetensors"
        KNNDatastore.build(*smollm, [t[:480] for t in stdlib_docs_texts()[:12]], progress=False).save(store)
        params.append(f"--param=datastore={store}")
    rc = main(["generate", "--method", spec.name, "--prompt", "Name a fruit.", "--max-new-tokens", "8", *params])
    assert rc == 0
    assert capsys.readouterr().out.strip()


@pytest.mark.real_model
def test_generate_gives_structured_processors_the_budget(capsys, monkeypatch):
    """`generate --method json-schema` tells the processor its --max-new-tokens: the document ends within it."""
    import json as _json

    from hf_decoding_ext.structured.json_schema import GrammarConstrainedLogitsProcessor

    seen = []
    original = GrammarConstrainedLogitsProcessor.set_budget

    def spy(self, max_new_tokens, **kw):
        seen.append(max_new_tokens)
        return original(self, max_new_tokens, **kw)

    monkeypatch.setattr(GrammarConstrainedLogitsProcessor, "set_budget", spy)
    schema = '{"type": "object", "properties": {"items": {"type": "array", "items": {"type": "string"}}}, "required": ["items"]}'
    assert main(["generate", "--method", "json-schema", "--param", f"schema={schema}", "--max-new-tokens", "12",
                 "--prompt", "List every fruit you know as JSON."]) == 0
    assert seen == [12]
    _json.loads(capsys.readouterr().out.strip())  # a complete document within 12 tokens
