"""Monitor-guided decoding (MGD): a static-analysis monitor that keeps ``obj.member`` dereferences type-consistent.

The monitor watches the code being generated. When the code ends at an object dereference (``obj.`` followed by a
possibly empty partial identifier) it asks a static analyser (`jedi <https://jedi.readthedocs.io>`_) which members
exist on the inferred type of ``obj``, and masks the next-token logits so that the identifier can only grow into one
of them. Everywhere else it is inactive.

* :func:`find_dereference`: is the code at a dereference, and with which partial identifier?
* :class:`JediMemberResolver`: the analyser: members of the receiver at a trailing ``.``, with the repository's
  other files as global context; cached per trigger.
* :class:`IdentifierTokenIndex`: the per-tokenizer index of decoded token strings that turns (partial identifier,
  member names) into allowed token ids without scanning the vocabulary.
* :class:`MonitorGuidedLogitsProcessor`: the ``LogitsProcessor``.
"""

from __future__ import annotations

import math
import os
import re
import shutil
import tempfile
import weakref
from collections.abc import Iterable, Mapping

import torch
from transformers import LogitsProcessor

from hf_decoding_ext.structured.prompt_rows import PromptTrackingProcessor

__all__ = ["find_dereference", "is_identifier_char", "JediMemberResolver", "IdentifierTokenIndex",
           "MonitorGuidedLogitsProcessor"]

# ``.`` then an optional partial identifier at the very end of the text (an identifier cannot start with a digit,
# which also keeps float literals such as ``1.5`` out)
_DEREF_AT_END = re.compile(r"\.(?P<partial>[^\W\d]\w*)?\Z")
# a dereference dot inside a token: ``.`` followed by an identifier start
_DOT_IDENT = re.compile(r"\.(?=[^\W\d])")
# jedi completion types that are not members of the receiver
_NOT_MEMBERS = frozenset({"keyword", "path", "param"})


def is_identifier_char(ch: str) -> bool:
    """Whether ``ch`` can continue a Python identifier (letters, digits, ``_`` and Unicode identifier characters).

    >>> [is_identifier_char(c) for c in "a_9(. "]
    [True, True, True, False, False, False]
    """
    return ("_" + ch).isidentifier()


def _identifier_head(s: str) -> int:
    """Length of the leading run of identifier characters of ``s``."""
    n = 0
    for ch in s:
        if not is_identifier_char(ch):
            break
        n += 1
    return n


def find_dereference(code: str) -> tuple[str, str] | None:
    """Split ``code`` that ends at a dereference into ``(code up to and including the dot, partial identifier)``.

    This is the monitor's cheap textual trigger; whether the dot really is an attribute access on an object of known
    type (and not in a comment, a string or a float literal) is decided by the analyser
    (:meth:`JediMemberResolver.members`).

    >>> find_dereference("w = Warehouse()\\nw.res")
    ('w = Warehouse()\\nw.', 'res')
    >>> find_dereference("total = w.")
    ('total = w.', '')
    >>> find_dereference("x = 1.5") is None, find_dereference("w.restock(") is None
    (True, True)
    """
    m = _DEREF_AT_END.search(code)
    if m is None:
        return None
    return code[: m.start() + 1], m.group("partial") or ""


class JediMemberResolver:
    r"""
    The monitor's static analysis: the member names that exist on the receiver of a trailing ``.``, from jedi.

    Args:
        project_files (`dict[str, str]`, *optional*): the other files of the repository, ``{relative path: source}``;
            they are written to a temporary directory (removed when this object is garbage-collected or
            :meth:`close` d) that serves as a ``jedi.Project`` root, so imports such as ``from inventory.models
            import Warehouse`` in the analysed code resolve.
        project_root (`str`, *optional*): an existing repository directory to use as the project root instead.
        file_path (`str`, *optional*, defaults to ``"main.py"``): the path, relative to the project root, of the file
            being generated (relative imports and the module name depend on it).

    :meth:`members` returns ``None`` (monitor stays inactive) when the dot is not an attribute access in code (a
    comment, a string, a float literal, ``from .``) or when jedi cannot infer the receiver's type (no completions).
    Results are cached by the code up to the dot: each trigger is analysed once.

    >>> r = JediMemberResolver()
    >>> "append" in r.members("xs = [1, 2]\nxs.")
    True
    >>> r.members("# see xs.") is None, r.members("undefined_name.") is None
    (True, True)
    """

    def __init__(self, project_files: Mapping[str, str] | None = None, project_root: str | os.PathLike | None = None,
                 file_path: str = "main.py"):
        import jedi
        import parso

        if project_files is not None and project_root is not None:
            raise ValueError("give either `project_files` (sources, written to a temporary directory) or "
                             "`project_root` (an existing directory), not both")
        if not isinstance(file_path, str) or not file_path or os.path.isabs(file_path) \
                or ".." in file_path.replace("\\", "/").split("/"):
            raise ValueError(f"`file_path` must be a non-empty relative path inside the project, got {file_path!r}")
        self._tmpdir = None
        root = None
        if project_files is not None:
            files = _check_project_files(project_files)
            self._tmpdir = tempfile.mkdtemp(prefix="mgd_project_")
            self._finalizer = weakref.finalize(self, shutil.rmtree, self._tmpdir, True)
            for rel, source in files.items():
                dest = os.path.join(self._tmpdir, rel)
                os.makedirs(os.path.dirname(dest), exist_ok=True)
                with open(dest, "w", encoding="utf-8") as fh:
                    fh.write(source)
            root = self._tmpdir
        elif project_root is not None:
            root = os.fspath(project_root)
            if not os.path.isdir(root):
                raise ValueError(f"`project_root` {root!r} is not a directory")
        self.root = root
        self.file_path = file_path
        self._jedi = jedi
        self._project = jedi.Project(root) if root is not None else None
        self._path = os.path.join(root, file_path) if root is not None else None
        self._grammar = parso.load_grammar()
        self._cache: dict[str, frozenset[str] | None] = {}
        self.calls = 0  # analyser queries (cache misses that reached jedi)

    def close(self) -> None:
        """Remove the temporary project directory (if any)."""
        if self._tmpdir is not None:
            self._finalizer()

    def clear_cache(self) -> None:
        self._cache.clear()

    def _is_attribute_dot(self, code: str) -> bool:
        """Parse-tree check: the last token is a ``.`` operator in code, after a name, a string or a bracket."""
        module = self._grammar.parse(code, error_recovery=True)
        end = module.get_last_leaf()
        if end.prefix:  # trailing comment / whitespace: the dot is not the last code token
            return False
        dot = end.get_previous_leaf()
        if dot is None or dot.type != "operator" or dot.value != "." or dot.end_pos != end.start_pos:
            return False
        prev = dot.get_previous_leaf()
        if prev is None:
            return False
        return prev.type in ("name", "string", "fstring_end") or (prev.type == "operator" and prev.value in ")]}")

    def members(self, code_upto_dot: str) -> frozenset[str] | None:
        """Names of the members of the receiver of the trailing ``.`` of ``code_upto_dot``, or ``None`` (inactive)."""
        if code_upto_dot in self._cache:
            return self._cache[code_upto_dot]
        result = None
        if code_upto_dot.endswith(".") and self._is_attribute_dot(code_upto_dot):
            self.calls += 1
            lines = code_upto_dot.split("\n")
            try:
                script = self._jedi.Script(code_upto_dot, path=self._path, project=self._project)
                completions = script.complete(len(lines), len(lines[-1]))
                names = frozenset(c.name for c in completions if c.type not in _NOT_MEMBERS and c.name.isidentifier())
            except Exception:  # noqa: BLE001 - analyser failure: the monitor stays inactive, as for unknown types
                names = frozenset()
            result = names or None
        self._cache[code_upto_dot] = result
        return result


def _check_project_files(project_files) -> dict[str, str]:
    if not isinstance(project_files, Mapping):
        raise ValueError("`project_files` must be a dict {relative path: source}, got "
                         f"{type(project_files).__name__}")
    out = {}
    for rel, source in project_files.items():
        if not isinstance(rel, str) or not isinstance(source, str):
            raise ValueError("`project_files` maps relative path strings to source strings")
        norm = rel.replace("\\", "/")
        if not norm or os.path.isabs(rel) or norm.startswith("/") or ".." in norm.split("/"):
            raise ValueError(f"`project_files` paths must be relative and stay inside the project, got {rel!r}")
        out[norm] = source
    return out


class IdentifierTokenIndex:
    r"""
    Decoded token strings of a tokenizer, indexed for the monitor's mask.

    Every token's text is split into its *head* (the leading run of identifier characters) and the rest. Given the
    partial identifier ``p`` after ``obj.`` and the member names ``M``, a token ``t`` is allowed iff

    * ``t`` is all identifier characters and ``p + t`` is a prefix of some member (the identifier keeps growing), or
    * ``t`` = head + rest with a non-identifier first character of rest, and ``p + head`` is a member (the
      identifier is completed and the monitor releases).

    Tokens decoding to the empty string are never allowed while the monitor is active. :meth:`allowed_ids` looks the
    candidates up by string (``O(sum of member lengths)`` dictionary lookups), not by scanning the vocabulary.
    Build it once per tokenizer with :meth:`for_tokenizer` (cached for as long as the tokenizer object lives).

    Args:
        tokenizer: a Hugging Face tokenizer.
    """

    _instances: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()

    def __init__(self, tokenizer):
        n = len(tokenizer)
        ids = list(range(n))
        strings = tokenizer.batch_decode([[i] for i in ids], skip_special_tokens=False,
                                         clean_up_tokenization_spaces=False)
        raw = tokenizer.convert_ids_to_tokens(ids)
        for i, (s, r) in enumerate(zip(strings, raw)):
            # SentencePiece-style vocabularies drop the word-boundary space when a token is decoded on its own
            if isinstance(r, str) and r.startswith("\u2581") and not s.startswith(" "):
                strings[i] = " " + s
        self.vocab_size = n
        self.strings: list[str] = strings
        self.pure: dict[str, list[int]] = {}  # token text (all identifier chars) -> ids
        self.headed: dict[str, list[int]] = {}  # head -> ids of tokens with a non-identifier character after the head
        fused = []
        for i, s in enumerate(strings):
            if not s:
                continue
            k = _identifier_head(s)
            if k == len(s):
                self.pure.setdefault(s, []).append(i)
            else:
                self.headed.setdefault(s[:k], []).append(i)
            if _DOT_IDENT.search(s):
                fused.append(i)
        # tokens that contain a dereference dot followed by identifier characters (e.g. "._"): they open a
        # dereference and start its identifier in one step, so they are checked by simulation
        self.fused_ids = torch.tensor(fused, dtype=torch.long)
        self._fused_set = frozenset(fused)

    @classmethod
    def for_tokenizer(cls, tokenizer) -> IdentifierTokenIndex:
        """The index of ``tokenizer``, built on first use and reused while the tokenizer object is alive."""
        try:
            index = cls._instances.get(tokenizer)
        except TypeError:  # not weak-referenceable: no caching
            return cls(tokenizer)
        if index is None or index.vocab_size != len(tokenizer):
            index = cls(tokenizer)
            cls._instances[tokenizer] = index
        return index

    def is_fused(self, token_id: int) -> bool:
        return token_id in self._fused_set

    def allowed_ids(self, partial: str, members: Iterable[str]) -> list[int]:
        """Token ids that keep ``partial`` a prefix of a member or complete a member followed by a non-identifier
        character (see the class docstring). Sorted, without duplicates."""
        allowed: set[int] = set()
        n = len(partial)
        for name in members:
            if not name.startswith(partial):
                continue
            rest = name[n:]
            for end in range(1, len(rest) + 1):  # tokens that are a prefix of the remaining identifier
                allowed.update(self.pure.get(rest[:end], ()))
            if name:  # tokens that finish the identifier and then leave it
                allowed.update(self.headed.get(rest, ()))
        return sorted(allowed)


class MonitorGuidedLogitsProcessor(PromptTrackingProcessor, LogitsProcessor):
    r"""
    [`LogitsProcessor`] for monitor-guided decoding (MGD) from "Guiding Language Models of Code with Global Context
    using Monitors" (Agrawal, Kanade, Goyal, Lahiri and Rajamani, NeurIPS 2023, arXiv 2306.10763), with the paper's
    dereference monitor for Python and jedi as the static analyser.

    The code analysed at each step is the code prefix (``prompt_code``) followed by the text generated so far, in the
    file ``file_path`` of a repository (``project_files`` or ``project_root``): the "global context" is whatever
    the analyser can see from there, such as classes defined in other files of the repository or above in the same
    file. The monitor follows the paper's state machine for each batch row:

    * **wait**: inactive; scores pass through unchanged.
    * **trigger** (``pre``): the code ends with ``obj.`` in code position (not a comment, string or float literal).
      The analyser is asked *once per trigger* for the members that exist on ``obj``'s inferred type (the answer is
      cached by the code up to the dot). If it knows none (type not inferred), the monitor stays in wait.
    * **masking** (``maskgen``): while the code ends with ``obj.`` + a partial identifier ``p``, only tokens ``t``
      such that ``p + t`` is a prefix of a member, or ``t`` completes a member and continues with a non-identifier
      character, keep a finite score (see :class:`IdentifierTokenIndex`); eos is a non-identifier token, so it is
      allowed only once the identifier is a complete member.
    * **release** (``update``): once a token puts a non-identifier character after a complete member, the code no
      longer ends at a dereference and the monitor is back in wait.

    The state is re-derived from each row's text at every step (the trigger's member set is cached), so rows are
    independent, left padding is fine, and it works with greedy search, sampling and beam search. The only state
    kept across calls is each row's prompt (its code prefix); inside this library's loops (lookahead branches,
    trials, Superposed drafts, the speculative engine) it follows the rows through the lifecycle of
    :mod:`hf_decoding_ext.core.lifecycle` (:class:`~hf_decoding_ext.structured.prompt_rows.PromptTrackingProcessor`),
    so branched rows keep their code prefix and generated text. ``stats`` counts every call, branches included.

    Args:
        tokenizer: the model's Hugging Face tokenizer (to decode the generated tokens).
        prompt_code (`str` or `list[str]`, *optional*): the code before the generation point, one string for every
            row or one per prompt (rows of ``num_beams`` / ``num_return_sequences`` expansion map to their prompt).
            Default: each row's prompt tokens decoded without special tokens; pass it explicitly when the prompt
            wraps the code in a chat template or instructions.
        project_files (`dict[str, str]`, *optional*): other files of the repository, ``{relative path: source}``.
        project_root (`str`, *optional*): an existing repository directory (instead of ``project_files``).
        file_path (`str`, *optional*, defaults to ``"main.py"``): path of the generated file inside the repository.
        fused_min_prob (`float`, *optional*, defaults to ``1e-4``): tokens whose text holds a dereference dot *and*
            identifier characters after it (``"._"`` in SmolLM2's vocabulary) open and start filling a dereference
            in one step; they are checked by simulating them through the monitor when their probability under the
            incoming scores is at least this (the argmax is always checked, so greedy search is fully covered).
            ``0`` checks them all.
        filter_value (`float`, *optional*, defaults to ``-inf``): score given to disallowed tokens.

    Deviations from the paper:

    * Static analysis is jedi's completion engine (the paper queries language servers through ``multilspy``); the
      member set is jedi's completion list at the dot (keywords and file paths removed).
    * When jedi infers no type (no completions), the monitor stays inactive, as the paper's monitor does for unknown
      types; if the prompt itself already holds a partial identifier that no member extends, it is released too.
    * "Fused" tokens (see ``fused_min_prob``) are an addition: the paper's monitor triggers only on a trailing dot.
    * The state is recomputed from the decoded text at every step instead of being updated incrementally.

    Examples:

    ```python
    >>> from hf_decoding_ext.core.models import load_model
    >>> from hf_decoding_ext.structured.monitor_guided import MonitorGuidedLogitsProcessor
    >>> model, tokenizer = load_model()  # doctest: +SKIP
    >>> repo = {"inventory/models.py": "class Warehouse:\n    def __init__(self):\n        self.pallet_tally = 0\n"}
    >>> code = "from inventory.models import Warehouse\n\nw = Warehouse()\nprint(w."
    >>> mgd = MonitorGuidedLogitsProcessor.for_model(model, tokenizer, prompt_code=code,
    ...                                             project_files=repo, file_path="app/report.py")  # doctest: +SKIP
    >>> inputs = tokenizer(code, return_tensors="pt")  # doctest: +SKIP
    >>> out = model.generate(**inputs, logits_processor=[mgd], do_sample=False, max_new_tokens=8)  # doctest: +SKIP
    >>> tokenizer.decode(out[0, inputs.input_ids.shape[1]:])  # doctest: +SKIP
    'pallet_tally)\n'
    ```
    """

    def __init__(self, tokenizer, prompt_code: str | list[str] | None = None,
                 project_files: Mapping[str, str] | None = None, project_root: str | None = None,
                 file_path: str = "main.py", fused_min_prob: float = 1e-4, filter_value: float = -math.inf):
        if tokenizer is None or not callable(getattr(tokenizer, "batch_decode", None)):
            raise ValueError("MonitorGuidedLogitsProcessor needs the model's tokenizer")
        if isinstance(prompt_code, (list, tuple)):
            if not prompt_code or not all(isinstance(c, str) for c in prompt_code):
                raise ValueError("`prompt_code` must be a string or a non-empty list of strings (one per prompt)")
            prompt_code = list(prompt_code)
        elif prompt_code is not None and not isinstance(prompt_code, str):
            raise ValueError("`prompt_code` must be a string or a non-empty list of strings (one per prompt)")
        if not isinstance(fused_min_prob, (int, float)) or not 0.0 <= float(fused_min_prob) <= 1.0:
            raise ValueError(f"`fused_min_prob` must be in [0, 1], got {fused_min_prob!r}")
        if not isinstance(filter_value, (int, float)) or math.isnan(filter_value):
            raise ValueError(f"`filter_value` must be a number, got {filter_value!r}")
        self.tokenizer = tokenizer
        self.prompt_code = prompt_code
        self.fused_min_prob = float(fused_min_prob)
        self.filter_value = float(filter_value)
        self.resolver = JediMemberResolver(project_files=project_files, project_root=project_root,
                                           file_path=file_path)
        self.index = IdentifierTokenIndex.for_tokenizer(tokenizer)
        self.reset()

    @classmethod
    def for_model(cls, model=None, tokenizer=None, prompt_code: str | list[str] | None = None,
                  project_files: Mapping[str, str] | None = None, project_root: str | None = None,
                  file_path: str = "main.py", fused_min_prob: float = 1e-4) -> MonitorGuidedLogitsProcessor:
        """Build for ``model`` and ``tokenizer`` (the model is not needed: the scores' width gives the vocabulary)."""
        if tokenizer is None:
            raise ValueError("MonitorGuidedLogitsProcessor.for_model needs the tokenizer")
        return cls(tokenizer, prompt_code=prompt_code, project_files=project_files, project_root=project_root,
                   file_path=file_path, fused_min_prob=fused_min_prob)

    # ------------------------------------------------------------------------------------------------ state
    state_attributes = PromptTrackingProcessor.state_attributes + ("_prefixes", "last_active")

    def reset(self) -> None:
        """Forget the recorded prompt (the next call starts a new generation); the analysis cache is kept."""
        super().reset()
        self._prefixes: list[str] | None = None  # code prefix of each prompt row
        self.last_active: list[bool] = []  # per row: was the monitor masking at the last step
        self.stats = {"steps": 0, "masked_steps": 0, "triggers": 0, "fused_blocked": 0}
        self._seen_triggers: set[tuple[int, str]] = set()

    def _start(self, input_ids: torch.Tensor) -> None:
        super()._start(input_ids)
        rows = input_ids.shape[0]
        if self.prompt_code is None:
            self._prefixes = [self.tokenizer.decode(row, skip_special_tokens=True, clean_up_tokenization_spaces=False)
                              for row in input_ids.tolist()]
        elif isinstance(self.prompt_code, str):
            self._prefixes = [self.prompt_code] * rows
        else:
            n = len(self.prompt_code)
            if rows % n != 0:
                raise ValueError(f"`prompt_code` has {n} entries but the batch has {rows} rows; give one string or "
                                 f"one per prompt (rows must be a multiple of the prompts)")
            per = rows // n
            self._prefixes = [self.prompt_code[r // per] for r in range(rows)]

    def select_rows(self, indices: torch.LongTensor) -> None:
        """Keep the rows ``indices`` (rows may repeat): their prompts, code prefixes and ``last_active`` follow."""
        super().select_rows(indices)
        if self.last_active:
            self.last_active = [self.last_active[i] for i in torch.as_tensor(indices).tolist()]

    def code_of_row(self, input_ids: torch.Tensor, row: int) -> str:
        """The code the monitor analyses for ``row``: its prompt's code + the text generated so far."""
        gen = input_ids[row, self.prompt_length:].tolist()
        text = self.tokenizer.decode(gen, skip_special_tokens=True, clean_up_tokenization_spaces=False) if gen else ""
        return self._prefixes[self.origin(row)] + text

    # ------------------------------------------------------------------------------------------------ monitor
    def allowed_token_ids(self, code: str) -> list[int] | None:
        """The monitor's mask for ``code``: allowed token ids while masking, ``None`` while inactive (wait)."""
        deref = find_dereference(code)
        if deref is None:
            return None
        upto_dot, partial = deref
        members = self.resolver.members(upto_dot)
        if members is None:
            return None
        allowed = self.index.allowed_ids(partial, members)
        return allowed or None  # nothing extends the partial identifier: release

    def _token_ok(self, code: str, token_id: int) -> bool:
        """Simulate a fused token: every dereference it opens must be consistent with the receiver's members."""
        new = code + self.index.strings[token_id]
        for m in _DOT_IDENT.finditer(new, max(len(code) - 1, 0)):
            if m.start() < len(code):
                continue
            members = self.resolver.members(new[: m.start() + 1])
            if members is None:
                continue
            j = m.start() + 1
            ident = new[j: j + _identifier_head(new[j:])]
            if j + len(ident) == len(new):
                if not any(name.startswith(ident) for name in members):
                    return False
            elif ident not in members:
                return False
        return True

    def _check_fused(self, code: str, row_scores: torch.Tensor, keep: torch.Tensor | None) -> list[int]:
        """Fused token ids to block in this row (see ``fused_min_prob``)."""
        fused = self.index.fused_ids
        vocab = row_scores.shape[-1]
        fused = fused[fused < vocab]
        if fused.numel() == 0:
            return []
        scores = row_scores.detach().float()
        if keep is not None:
            scores = scores.masked_fill(~keep, -math.inf)
        if not torch.isfinite(scores).any():
            return []
        logp = torch.log_softmax(scores, dim=-1)
        fused_logp = logp[fused.to(logp.device)].cpu()
        threshold = math.log(self.fused_min_prob) if self.fused_min_prob > 0 else -math.inf
        candidates = [int(t) for t, lp in zip(fused.tolist(), fused_logp.tolist())
                      if lp > -math.inf and lp >= threshold]
        blocked = [t for t in candidates if not self._token_ok(code, t)]
        # greedy coverage: whatever becomes the argmax after blocking must be checked too
        checked = set(candidates)
        while True:
            s = scores.clone()
            if blocked:
                s[torch.tensor(blocked, device=s.device)] = -math.inf
            if not torch.isfinite(s).any():
                break
            top = int(s.argmax())
            if not self.index.is_fused(top) or top in checked:
                break
            checked.add(top)
            if self._token_ok(code, top):
                break
            blocked.append(top)
        return blocked

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        if input_ids.shape[0] != scores.shape[0]:
            raise ValueError(f"input_ids has {input_ids.shape[0]} rows but scores has {scores.shape[0]}")
        self.generated(input_ids)  # a new generation starts when input_ids does not continue the prompt
        rows, vocab = scores.shape
        block = torch.zeros(rows, vocab, dtype=torch.bool)
        active = []
        for r in range(rows):
            code = self.code_of_row(input_ids, r)
            allowed = self.allowed_token_ids(code)
            keep = None
            if allowed is not None:
                ids = torch.tensor([i for i in allowed if i < vocab], dtype=torch.long)
                keep = torch.zeros(vocab, dtype=torch.bool)
                keep[ids] = True
                if keep.any():
                    block[r] = ~keep
                    upto_dot = find_dereference(code)[0]
                    if (self.origin(r), upto_dot) not in self._seen_triggers:
                        self._seen_triggers.add((self.origin(r), upto_dot))
                        self.stats["triggers"] += 1
                else:
                    keep = None
            active.append(keep is not None)
            if self.index.fused_ids.numel():
                fused_block = self._check_fused(code, scores[r], None if keep is None else keep.to(scores.device))
                if fused_block:
                    block[r, fused_block] = True
                    self.stats["fused_blocked"] += len(fused_block)
        self.last_active = active
        self.stats["steps"] += 1
        self.stats["masked_steps"] += sum(active)
        if not block.any():
            return scores
        return scores.masked_fill(block.to(scores.device), self.filter_value)
