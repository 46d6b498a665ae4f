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


def test_unknown_method_and_parameter_are_clear_errors(capsys):
    assert main(["generate", "--method", "nope", "--prompt", "hi"]) == 2
    err = capsys.readouterr().err
    assert "Unknown method 'nope'" in err and METHODS[0].name in err
    assert main(["generate", "--method", METHODS[0].name, "--param", "bogus=1", "--prompt", "hi"]) == 2
    assert "valid parameters" in capsys.readouterr().err


@pytest.mark.real_model
@pytest.mark.parametrize("spec", METHODS, ids=lambda m: m.name)
def test_generate_every_method_on_default_model(spec, capsys, smollm):
    params = [f"--param={k}={v}" for k, v in spec.example.items()]
    rc = main(["generate", "--method", spec.name, "--prompt", "Name a fruit.", "--max-new-tokens", "8", *params])
    assert rc == 0
    assert capsys.readouterr().out.strip()
