"""Monitor-guided decoding (arXiv 2306.10763): the dereference monitor over jedi.

Core property (real model, plain code-completion prompts): on small repositories whose classes have unusual member
names, plain greedy decoding after ``obj.`` invents attributes that do not exist, while the monitored greedy run
only produces members of the receiver's class. Membership is checked independently of the monitor, from the class
definitions (``ast``), and for every later dereference in the continuation with a fresh jedi analyser.
"""

from __future__ import annotations

import ast
import json
import math
import re
import time
from importlib import resources

import pytest
import torch

from hf_decoding_ext.structured.monitor_guided import (
    IdentifierTokenIndex,
    JediMemberResolver,
    MonitorGuidedLogitsProcessor,
    find_dereference,
    is_identifier_char,
)

_DOT_IDENT = re.compile(r"\.(?=[^\W\d])")

# ---------------------------------------------------------------------------------------------- toy tokenizer
_SINGLES = [chr(c) for c in range(32, 127)] + ["\n"]
_MULTIS = ["res", "tock", "_quota", "name", "pallet", "_tally", "get", "()", "):", "._", ".q", ".r", "self",
           "    ", "ly", "__", "rest", "ock_q", "quota(", "ally)", "foo", "bar", "x = ", "import ", "class ", "def "]

CLASS_SRC = (
    "class Warehouse:\n"
    "    def __init__(self):\n"
    "        self.pallet_tally = 0\n"
    "        self.name = 'w'\n"
    "\n"
    "    def restock_quota(self, sku):\n"
    "        return 1\n"
    "\n"
    "\n"
    "w = Warehouse()\n"
)
MEMBERS = {"pallet_tally", "name", "restock_quota"}


@pytest.fixture(scope="module")
def toy_tok():
    """A 126-token tokenizer (single characters + a few multi-character pieces) for the tiny 128-vocab models."""
    from tokenizers import Tokenizer, decoders, models
    from transformers import PreTrainedTokenizerFast

    vocab = ["<pad>", "<bos>", "<eos>"] + _SINGLES + [m for m in _MULTIS if m not in _SINGLES]
    tk = Tokenizer(models.WordLevel(vocab={s: i for i, s in enumerate(vocab)}, unk_token="<pad>"))
    tk.decoder = decoders.Fuse()
    return PreTrainedTokenizerFast(tokenizer_object=tk, bos_token="<bos>", eos_token="<eos>", pad_token="<pad>")


def _ids(tok, pieces):
    return [tok.convert_tokens_to_ids(p) for p in pieces]


def _brute_force_allowed(strings, partial, members):
    """The monitor's rule, applied token by token over the whole vocabulary."""
    out = []
    for i, s in enumerate(strings):
        if not s:
            continue
        k = 0
        while k < len(s) and is_identifier_char(s[k]):
            k += 1
        full = partial + s[:k]
        ok = any(m.startswith(full) for m in members) if k == len(s) else full in members
        if ok:
            out.append(i)
    return out


def _flat_scores(vocab, favour=None, rows=1):
    scores = torch.zeros(rows, vocab)
    for i, tid in enumerate(favour or []):
        scores[:, tid] = 10.0 - i
    return scores


# ---------------------------------------------------------------------------------------------- unit tests
def test_find_dereference():
    assert find_dereference("w.") == ("w.", "")
    assert find_dereference("x = w.rest") == ("x = w.", "rest")
    assert find_dereference("f(a).b_2") == ("f(a).", "b_2")
    for text in ["w", "w.rest(", "x = 1.5", "w. ", "", "w.x\n"]:
        assert find_dereference(text) is None, text


def test_allowed_ids_match_brute_force(toy_tok):
    index = IdentifierTokenIndex.for_tokenizer(toy_tok)
    assert IdentifierTokenIndex.for_tokenizer(toy_tok) is index  # built once per tokenizer
    members = MEMBERS | {"__init__"}
    for partial in ["", "r", "res", "restock", "restock_quota", "pallet_t", "_", "zz", "name"]:
        got = index.allowed_ids(partial, members)
        assert got == _brute_force_allowed(index.strings, partial, members), partial
    s = lambda partial: {index.strings[i] for i in index.allowed_ids(partial, members)}  # noqa: E731
    assert {"res", "rest", "r", "pallet", "name", "_", "__"} <= s("")
    assert "tock" in s("res") and "_quota" not in s("res") and "(" not in s("res")
    assert {"_quota", "_", "_q"} & s("restock") == {"_quota", "_"}
    assert {"(", "()", " ", ")", "\n", "quota("} & s("restock_quota") == {"(", "()", " ", ")", "\n"}
    assert "ally)" in s("pallet_t") and "ly" not in s("pallet_t")
    assert s("zz") == set() and "<eos>" in s("name") and "<eos>" not in s("nam")


def test_resolver_uses_project_files_and_stays_inactive_outside_code():
    repo = {"shop/__init__.py": "", "shop/models.py": CLASS_SRC.replace("\n\nw = Warehouse()\n", "\n")}
    code = "from shop.models import Warehouse\n\nsite = Warehouse()\nsite."
    with_repo = JediMemberResolver(project_files=repo, file_path="app/main.py")
    members = with_repo.members(code)
    assert MEMBERS <= members and "get" not in members
    calls = with_repo.calls
    assert with_repo.members(code) is members and with_repo.calls == calls  # one analysis per trigger
    assert JediMemberResolver().members(code) is None  # without the repository the type is unknown: inactive
    same_file = JediMemberResolver()
    assert MEMBERS <= same_file.members(CLASS_SRC + "w.")
    for code in ["# see w.", "s = 'w.", "x = 1.", "undefined_thing.", "from ."]:
        assert same_file.members(CLASS_SRC + code) is None, code
    with_repo.close()


def _random_scores(toy_tok, vocab=128):
    """Random scores with the fused dot tokens (".q", "._", ...) switched off: they have their own test."""
    scores = torch.randn(1, vocab)
    scores[:, IdentifierTokenIndex.for_tokenizer(toy_tok).fused_ids] = -math.inf
    return scores


def test_processor_inactive_outside_dereference(toy_tok):
    torch.manual_seed(0)
    for code in ["x = 1", "w.restock_quota(", "# see w.", "s = 'w.", "undefined_thing.", "w.zz"]:
        proc = MonitorGuidedLogitsProcessor(toy_tok, prompt_code=CLASS_SRC + code)
        scores = _random_scores(toy_tok)
        out = proc(torch.tensor([_ids(toy_tok, ["x"])]), scores.clone())
        assert torch.equal(out, scores), code
        assert proc.last_active == [False]


def test_processor_masks_tokens_while_identifier_is_generated(toy_tok):
    torch.manual_seed(0)
    index = IdentifierTokenIndex.for_tokenizer(toy_tok)
    fused = set(index.fused_ids.tolist())
    proc = MonitorGuidedLogitsProcessor(toy_tok, prompt_code=CLASS_SRC + "print(w.")
    prompt = _ids(toy_tok, ["x"])
    steps = [([], ""), (["res"], "res"), (["res", "tock"], "restock"), (["pallet", "_tally"], "pallet_tally")]
    for generated, partial in steps:
        out = proc(torch.tensor([prompt + _ids(toy_tok, generated)]), _random_scores(toy_tok))
        finite = torch.isfinite(out[0]).nonzero().flatten().tolist()
        members = set(proc.resolver.members(CLASS_SRC + "print(w."))
        expected = [i for i in _brute_force_allowed(index.strings, partial, members) if i not in fused]
        assert finite == expected and len(expected) > 0
        assert 126 not in finite and 127 not in finite  # model ids beyond the tokenizer are never allowed
        assert proc.last_active == [True]
    # a token that completes the member and leaves the identifier releases the monitor
    scores = _random_scores(toy_tok)
    out = proc(torch.tensor([prompt + _ids(toy_tok, ["pallet", "_tally", ")"])]), scores.clone())
    assert torch.equal(out, scores) and proc.last_active == [False]
    assert proc.stats["triggers"] == 1


def test_fused_dot_tokens_are_checked(toy_tok):
    vocab = 128
    dot_q, dot_r, dot_us = _ids(toy_tok, [".q", ".r", "._"])
    proc = MonitorGuidedLogitsProcessor(toy_tok, prompt_code=CLASS_SRC + "y = w", fused_min_prob=0.0)
    out = proc(torch.tensor([[5]]), _flat_scores(vocab, [dot_q, dot_r, dot_us]))
    assert out[0, dot_q] == -math.inf  # "w.q...": no member starts with q
    assert torch.isfinite(out[0, dot_r]) and torch.isfinite(out[0, dot_us])  # restock_quota, dunders
    assert int(out[0].argmax()) == dot_r and proc.stats["fused_blocked"] == 1
    # unknown receiver: no constraint
    proc = MonitorGuidedLogitsProcessor(toy_tok, prompt_code="y = unknown_thing")
    scores = _flat_scores(vocab, [dot_q])
    assert torch.equal(proc(torch.tensor([[5]]), scores.clone()), scores)
    # below fused_min_prob only the argmax is checked, and whatever becomes the argmax after blocking
    proc = MonitorGuidedLogitsProcessor(toy_tok, prompt_code=CLASS_SRC + "y = w", fused_min_prob=1.0)
    out = proc(torch.tensor([[5]]), _flat_scores(vocab, [dot_q, dot_r]))
    assert out[0, dot_q] == -math.inf and int(out[0].argmax()) == dot_r


def _check_continuation(text: str) -> bool:
    """Whether the identifier that starts ``text`` (right after ``w.``) is a member or a prefix of one."""
    ident = re.match(r"\w*", text).group(0)
    if len(ident) == len(text):
        return any(m.startswith(ident) for m in MEMBERS | set(dir(object)))
    return ident in MEMBERS | set(dir(object))


def test_generate_batch_rows_are_independent(tiny_model, toy_tok):
    prompt = torch.tensor([_ids(toy_tok, ["w", "."])] * 3)
    codes = [CLASS_SRC + "print(w.", "x = 1\n", CLASS_SRC + "w.res"]
    kwargs = dict(max_new_tokens=6, do_sample=False, pad_token_id=0, eos_token_id=2)
    plain = tiny_model.generate(prompt, attention_mask=torch.ones_like(prompt), **kwargs)
    proc = MonitorGuidedLogitsProcessor(toy_tok, prompt_code=codes)
    out = tiny_model.generate(prompt, attention_mask=torch.ones_like(prompt), logits_processor=[proc], **kwargs)
    texts = [toy_tok.decode(row[2:], skip_special_tokens=True) for row in out]
    assert _check_continuation(texts[0]), texts[0]
    assert _check_continuation("res" + texts[2]), texts[2]
    assert torch.equal(out[1], plain[1])  # the row with no dereference is plain greedy
    assert proc.stats["triggers"] >= 2
    # beam search: the rows of each prompt map to its code; a second call with another batch resets the state
    proc2 = MonitorGuidedLogitsProcessor(toy_tok, prompt_code=codes[:2])
    for _ in range(2):
        beams = tiny_model.generate(prompt[:2], attention_mask=torch.ones_like(prompt[:2]), logits_processor=[proc2],
                                    num_beams=2, num_return_sequences=2, **kwargs)
        for row in beams[:2]:
            assert _check_continuation(toy_tok.decode(row[2:], skip_special_tokens=True))
        assert torch.equal(beams[2:], tiny_model.generate(prompt[1:2], attention_mask=torch.ones_like(prompt[1:2]),
                                                          num_beams=2, num_return_sequences=2, **kwargs))


def test_bad_arguments(toy_tok):
    with pytest.raises(ValueError, match="tokenizer"):
        MonitorGuidedLogitsProcessor(None)
    with pytest.raises(ValueError, match="tokenizer"):
        MonitorGuidedLogitsProcessor.for_model(None, None)
    with pytest.raises(ValueError, match="prompt_code"):
        MonitorGuidedLogitsProcessor(toy_tok, prompt_code=3)
    with pytest.raises(ValueError, match="prompt_code"):
        MonitorGuidedLogitsProcessor(toy_tok, prompt_code=[])
    for bad in ["x.py", {"/abs/x.py": ""}, {"../up.py": ""}, {"a.py": 3}]:
        with pytest.raises(ValueError, match="project_files"):
            MonitorGuidedLogitsProcessor(toy_tok, project_files=bad)
    with pytest.raises(ValueError, match="not both"):
        MonitorGuidedLogitsProcessor(toy_tok, project_files={}, project_root=".")
    with pytest.raises(ValueError, match="not a directory"):
        MonitorGuidedLogitsProcessor(toy_tok, project_root="/nonexistent/dir/for/mgd")
    with pytest.raises(ValueError, match="file_path"):
        MonitorGuidedLogitsProcessor(toy_tok, file_path="../outside.py")
    for bad in [-0.1, 1.5, "x"]:
        with pytest.raises(ValueError, match="fused_min_prob"):
            MonitorGuidedLogitsProcessor(toy_tok, fused_min_prob=bad)
    proc = MonitorGuidedLogitsProcessor(toy_tok, prompt_code=["a", "b", "c"])
    with pytest.raises(ValueError, match="3 entries but the batch has 2 rows"):
        proc(torch.zeros(2, 3, dtype=torch.long), torch.zeros(2, 128))
    with pytest.raises(ValueError, match="rows"):
        proc(torch.zeros(2, 3, dtype=torch.long), torch.zeros(1, 128))


# ---------------------------------------------------------------------------------------------- real model
def _snippets():
    path = resources.files("hf_decoding_ext") / "data" / "monitor_snippets.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _class_members(snippet) -> set[str]:
    """Members from the class definitions themselves (ast): methods, class attributes, ``self.x = ...`` and
    ``object``'s attributes; independent of jedi and of the monitor."""
    names = set(dir(object))
    for file, cname in snippet["classes"]:
        # the prefix ends at ``obj.``; ``_`` makes it parse
        src = snippet["prefix"] + "_" if file == "<prefix>" else snippet["files"][file]
        found = False
        for node in ast.walk(ast.parse(src)):
            if isinstance(node, ast.ClassDef) and node.name == cname:
                found = True
                for item in node.body:
                    if isinstance(item, (ast.FunctionDef, ast.AsyncFunctionDef)):
                        names.add(item.name)
                    elif isinstance(item, ast.Assign):
                        names.update(t.id for t in item.targets if isinstance(t, ast.Name))
                    elif isinstance(item, ast.AnnAssign) and isinstance(item.target, ast.Name):
                        names.add(item.target.id)
                for item in ast.walk(node):
                    if (isinstance(item, ast.Attribute) and isinstance(item.ctx, ast.Store)
                            and isinstance(item.value, ast.Name) and item.value.id == "self"):
                        names.add(item.attr)
        assert found, (snippet["id"], cname)
    return names


def _invented_after_prompt(snippet, generated: str) -> bool:
    ident = re.match(r"\w*", generated).group(0)
    return ident not in _class_members(snippet)


def _invented_dereferences(snippet, generated: str) -> list[str]:
    """Every ``.name`` in prompt-end + continuation whose receiver type jedi knows but that is not a member."""
    resolver = JediMemberResolver(project_files=snippet["files"], file_path=snippet["file_path"])
    code = snippet["prefix"] + generated
    bad = []
    for m in _DOT_IDENT.finditer(code, len(snippet["prefix"]) - 1):
        members = resolver.members(code[: m.start() + 1])
        if members is None:
            continue
        ident = re.match(r"\w*", code[m.start() + 1:]).group(0)
        at_end = m.start() + 1 + len(ident) == len(code)
        if not (any(n.startswith(ident) for n in members) if at_end else ident in members):
            bad.append(ident)
    resolver.close()
    return bad


MAX_NEW = 8


def _greedy(model, enc, processors=()):
    out = model.generate(**enc, logits_processor=list(processors), do_sample=False, max_new_tokens=MAX_NEW,
                         temperature=None, top_p=None, top_k=None)
    return out[:, enc["input_ids"].shape[1]:]


@pytest.fixture(scope="module")
def snippet_runs(smollm):
    """All snippets in one left-padded batch: plain greedy, then monitored greedy (one state per row). The
    snippets' files use distinct packages, so together they form one repository for the monitor."""
    from hf_decoding_ext.core.models import encode_prompts

    model, tok = smollm
    snippets = _snippets()
    repo: dict[str, str] = {}
    for sn in snippets:
        for path, src in sn["files"].items():
            assert repo.setdefault(path, src) == src, path
    prefixes = [sn["prefix"] for sn in snippets]
    enc = encode_prompts(tok, prefixes, chat=False)  # plain code completion, no chat template
    t0 = time.perf_counter()
    plain = tok.batch_decode(_greedy(model, enc), skip_special_tokens=True)
    t1 = time.perf_counter()
    proc = MonitorGuidedLogitsProcessor.for_model(model, tok, prompt_code=prefixes, project_files=repo)
    mgd = tok.batch_decode(_greedy(model, enc, [proc]), skip_special_tokens=True)
    t2 = time.perf_counter()
    print(f"plain greedy {t1 - t0:.1f}s, monitored {t2 - t1:.1f}s ({proc.resolver.calls} jedi queries), "
          f"stats {proc.stats}")
    return {"snippets": snippets, "plain": plain, "mgd": mgd, "stats": dict(proc.stats)}


@pytest.mark.real_model
def test_core_property_greedy_invents_attributes_monitored_does_not(snippet_runs):
    snippets, plain, mgd = snippet_runs["snippets"], snippet_runs["plain"], snippet_runs["mgd"]
    n = len(snippets)
    plain_bad = [sn["id"] for sn, g in zip(snippets, plain) if _invented_after_prompt(sn, g)]
    mgd_bad = [sn["id"] for sn, g in zip(snippets, mgd) if _invented_after_prompt(sn, g)]
    for sn, a, b in zip(snippets, plain, mgd):
        print(f"{sn['id']:24s} plain={a!r:40s} mgd={b!r}")
    print(f"invented attribute after obj.: greedy {len(plain_bad)}/{n}, monitored {len(mgd_bad)}/{n}")
    assert n >= 5
    assert len(plain_bad) >= 5, plain_bad
    assert mgd_bad == []
    # every dereference in the monitored continuations that jedi can type is a real member
    assert all(_invented_dereferences(sn, g) == [] for sn, g in zip(snippets, mgd))
    assert snippet_runs["stats"]["triggers"] >= n


@pytest.mark.real_model
def test_global_context_drives_the_monitor(smollm, snippet_runs):
    """Without the repository's files jedi cannot type the receiver: the monitor never acts and greedy invents."""
    model, tok = smollm
    sn = next(s for s in snippet_runs["snippets"] if s["id"] == "thermo-probe")
    enc = tok(sn["prefix"], return_tensors="pt")
    proc = MonitorGuidedLogitsProcessor.for_model(model, tok, prompt_code=sn["prefix"], file_path=sn["file_path"])
    alone = tok.decode(_greedy(model, enc, [proc])[0], skip_special_tokens=True)
    assert proc.stats["masked_steps"] == 0 and proc.stats["fused_blocked"] == 0  # scores never touched
    assert _invented_after_prompt(sn, alone)
    with_repo = MonitorGuidedLogitsProcessor.for_model(model, tok, prompt_code=sn["prefix"],
                                                       project_files=sn["files"], file_path=sn["file_path"])
    assert with_repo.allowed_token_ids(sn["prefix"]) is not None


@pytest.mark.real_model
def test_allowed_ids_real_tokenizer(smollm):
    _, tok = smollm
    index = IdentifierTokenIndex.for_tokenizer(tok)
    members = {"pallet_tally", "restock_quota", "_sku_ledger", "is_overfull", "__init__"}
    for partial in ["", "pal", "restock_quota", "_"]:
        assert index.allowed_ids(partial, members) == _brute_force_allowed(index.strings, partial, members)
    assert tok.eos_token_id in index.allowed_ids("restock_quota", members)
    assert tok.eos_token_id not in index.allowed_ids("restock", members)


@pytest.mark.real_model
def test_inactive_on_cli_demo_prompt(smollm):
    """The CLI demo ("Name a fruit." through the chat template, registry defaults {}) is plain greedy."""
    from hf_decoding_ext.core.models import encode_prompts

    model, tok = smollm
    enc = encode_prompts(tok, "Name a fruit.")
    proc = MonitorGuidedLogitsProcessor.for_model(model, tok)
    assert torch.equal(_greedy(model, enc, [proc]), _greedy(model, enc))
    assert proc.stats["masked_steps"] == 0 and proc.stats["steps"] > 0
