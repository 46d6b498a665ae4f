"""Run generated Python programs against assert-style test cases in a separate, limited process.

Code search (planning-guided decoding, sampling + filtering) rewards a generated program with the fraction of unit
tests it passes. The program is model-written, so it never runs in the calling process: :class:`Sandbox` starts a
fresh Python interpreter for every program and

* runs it in isolated mode without ``site`` (``python -I -S``: no ``PYTHON*`` variables, no user or site packages,
  no current directory on ``sys.path``), with a minimal environment, in a new temporary working directory (``HOME``
  and ``TMPDIR`` point there too) that is deleted afterwards;
* in its own session (process group), killed as a whole on the wall-clock ``timeout``;
* under resource limits set before the interpreter starts: address space (``memory_mb``), CPU seconds, file size,
  open files, no core dumps, and ``RLIMIT_NPROC`` = 0 (no new processes or threads: fork bombs fail) where the
  platform enforces it (Linux does not enforce ``RLIMIT_NPROC`` for root, so when the caller is root the child
  first drops to the ``nobody`` user and group, ``drop_privileges=True``, if the interpreter is readable by
  ``nobody``; otherwise the child stays root and only the guard below stops forks: see
  :attr:`Sandbox.nproc_enforced`);
* behind an in-process guard installed by the harness before the program runs: the socket module's constructors
  and ``_socket`` are replaced by functions that raise (no network), and ``os.fork``/``os.system``/``os.exec*``/
  ``os.spawn*``/``os.posix_spawn*``/``os.kill`` (and their ``posix`` twins) and ``subprocess.Popen`` raise,
  and ``ctypes``, ``_posixsubprocess`` and ``multiprocessing`` cannot be imported (a second barrier against
  fork bombs);
* each test case under its own time limit (``per_test_timeout``, ``SIGALRM``), reporting one result line per test
  tagged with a random nonce on the original standard output (the program's own prints are captured and do not
  count).

A test case is passed only when its result line says so; a program that does not compile, raises, loops, exhausts
memory, kills itself or times out simply fails the test cases it did not pass: :meth:`Sandbox.run` never raises
because of what the program does. The guard is a toy-scale precaution for model-written code on a developer
machine, not a security boundary against a determined adversary.

Example:
    >>> from hf_decoding_ext.core.sandbox import Sandbox
    >>> box = Sandbox(timeout=5.0)
    >>> result = box.run("def add(a, b):\\n    return a + b\\n", ["assert add(1, 2) == 3", "assert add(1, 1) == 3"])
    >>> result.passed, result.fraction, result.status
    ([True, False], 0.5, 'ok')
"""

from __future__ import annotations

import json
import os
import resource
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass, field

STATUSES = ("ok", "error", "timeout", "crash")
"""How a sandboxed run ended: ``"ok"`` (the harness reported every test), ``"error"`` (the program itself raised
or did not compile: every test fails), ``"timeout"`` (killed at the wall-clock limit), ``"crash"`` (the interpreter
died, e.g. killed by a resource limit, or exited before reporting every test)."""

# The harness runs in the child interpreter. It reads {"program", "tests", "nonce", "per_test_timeout"} as JSON on
# stdin, installs the guard, execs the program in a fresh namespace, then each test in a copy-free shared namespace,
# and writes one line per test "<nonce> <index> PASS|FAIL" to the original stdout.
_HARNESS = r'''
import json, os, signal, sys, io
payload = json.loads(sys.stdin.read())
nonce = payload["nonce"]
out = os.fdopen(os.dup(1), "w", buffering=1)
def report(line):
    out.write(nonce + " " + line + "\n")
    out.flush()
def _blocked(*args, **kwargs):
    raise PermissionError("blocked by the sandbox")
import socket, _socket
for _name in ("socket", "socketpair", "create_connection", "create_server", "fromfd", "getaddrinfo",
              "gethostbyname", "gethostbyname_ex", "gethostbyaddr"):
    if hasattr(socket, _name):
        setattr(socket, _name, _blocked)
    if hasattr(_socket, _name):
        setattr(_socket, _name, _blocked)
sys.modules["_socket"] = None
import subprocess, posix
subprocess.Popen = _blocked
for _mod in (os, posix):
    for _name in dir(_mod):
        if _name in ("fork", "forkpty", "system", "popen", "kill", "killpg", "register_at_fork") or _name.startswith(
                ("exec", "spawn", "posix_spawn")):
            setattr(_mod, _name, _blocked)
for _name in ("_posixsubprocess", "ctypes", "_ctypes", "multiprocessing", "_multiprocessing"):
    sys.modules[_name] = None
captured = io.StringIO()
sys.stdout = captured
sys.stderr = captured
sys.stdin = io.StringIO("")
class TimeLimit(BaseException):
    pass
def _alarm(signum, frame):
    raise TimeLimit()
signal.signal(signal.SIGALRM, _alarm)
limit = float(payload["per_test_timeout"])
namespace = {"__name__": "__sandbox__", "__builtins__": __builtins__}
try:
    signal.setitimer(signal.ITIMER_REAL, limit)
    exec(compile(payload["program"], "<program>", "exec"), namespace)
    signal.setitimer(signal.ITIMER_REAL, 0)
except BaseException as exc:
    signal.setitimer(signal.ITIMER_REAL, 0)
    report("PROGRAM " + type(exc).__name__)
    raise SystemExit(0)
report("PROGRAM ok")
for i, test in enumerate(payload["tests"]):
    ok = False
    try:
        signal.setitimer(signal.ITIMER_REAL, limit)
        exec(compile(test, "<test %d>" % i, "exec"), namespace)
        signal.setitimer(signal.ITIMER_REAL, 0)
        ok = True
    except BaseException:
        signal.setitimer(signal.ITIMER_REAL, 0)
    report("%d %s" % (i, "PASS" if ok else "FAIL"))
'''


@dataclass
class SandboxResult:
    """The outcome of one sandboxed program.

    Attributes:
        passed: one flag per test case (``False`` for every test the harness did not report as passed).
        status: one of :data:`STATUSES`.
        detail: the program's exception name (status ``"error"``), the signal or exit code (``"crash"``), or ``""``.
        seconds: wall-clock seconds of the run.
        output: the tail of the child's standard error (harness-level failures), for debugging.
    """

    passed: list[bool]
    status: str
    detail: str = ""
    seconds: float = 0.0
    output: str = field(default="", repr=False)

    @property
    def fraction(self) -> float:
        """Fraction of the test cases passed (1.0 when there are none and the program ran)."""
        if not self.passed:
            return 1.0 if self.status == "ok" else 0.0
        return sum(self.passed) / len(self.passed)

    @property
    def all_passed(self) -> bool:
        return self.status == "ok" and all(self.passed)


def _nobody_ids() -> tuple[int, int]:
    try:
        import pwd

        entry = pwd.getpwnam("nobody")
        return entry.pw_uid, entry.pw_gid
    except (ImportError, KeyError):
        return 65534, 65534


class Sandbox:
    """Run a program and its assert-style test cases in a separate, resource-limited Python process.

    Args:
        timeout (`float`, *optional*, defaults to 10.0): wall-clock seconds for the whole run (interpreter start,
            program, all tests); the process group is killed after it.
        per_test_timeout (`float`, *optional*, defaults to 2.0): seconds for the program's top level and for each
            test case (``SIGALRM`` in the child).
        memory_mb (`int`, *optional*, defaults to 512): address-space limit (``RLIMIT_AS``) in MiB.
        max_output_mb (`int`, *optional*, defaults to 8): largest file the program may write (``RLIMIT_FSIZE``).
        python (`str`, *optional*): the interpreter (defaults to ``sys.executable``).
        drop_privileges (`bool`, *optional*, defaults to `True`): when the caller is root, run the child as
            ``nobody`` (so that ``RLIMIT_NPROC`` is enforced and the program cannot write the caller's files).

    Example:
        >>> from hf_decoding_ext.core.sandbox import Sandbox
        >>> Sandbox(timeout=5.0).run("while True:\\n    pass\\n", ["assert True"]).status
        'error'
    """

    def __init__(self, timeout: float = 10.0, per_test_timeout: float = 2.0, memory_mb: int = 512,
                 max_output_mb: int = 8, python: str | None = None, drop_privileges: bool = True):
        for name, value in (("timeout", timeout), ("per_test_timeout", per_test_timeout)):
            if not isinstance(value, (int, float)) or isinstance(value, bool) or not value > 0:
                raise ValueError(f"{name} must be a positive number of seconds, got {value!r}")
        for name, value, low in (("memory_mb", memory_mb, 64), ("max_output_mb", max_output_mb, 1)):
            if not isinstance(value, int) or isinstance(value, bool) or value < low:
                raise ValueError(f"{name} must be an integer >= {low} (MiB), got {value!r}")
        if not isinstance(drop_privileges, bool):
            raise ValueError(f"drop_privileges must be a bool, got {drop_privileges!r}")  # noqa: TRY004
        self.timeout = float(timeout)
        self.per_test_timeout = float(per_test_timeout)
        self.memory_mb = memory_mb
        self.max_output_mb = max_output_mb
        self.python = python or sys.executable
        self.drop_privileges = drop_privileges
        self.runs = 0
        self._drop_ok: bool | None = None

    # ------------------------------------------------------------------------------------------ child setup
    def _can_drop(self) -> bool:
        """Whether the interpreter runs as ``nobody`` (probed once: it may live under root's home)."""
        if self._drop_ok is None:
            ids = _nobody_ids()
            try:
                subprocess.run([self.python, "-I", "-S", "-c", "pass"], cwd="/", env={"PATH": "/usr/bin:/bin"},
                               preexec_fn=self._limits(True, ids), capture_output=True, timeout=30, check=True)
                self._drop_ok = True
            except (OSError, subprocess.SubprocessError):
                self._drop_ok = False
        return self._drop_ok

    @property
    def nproc_enforced(self) -> bool:
        """Whether ``RLIMIT_NPROC`` binds the child (not for root: then only the harness guard stops forks)."""
        return os.geteuid() != 0 or (self.drop_privileges and self._can_drop())

    def _limits(self, drop: bool, ids: tuple[int, int]):
        memory = self.memory_mb * 1024 * 1024
        cpu = int(self.timeout) + 1
        fsize = self.max_output_mb * 1024 * 1024

        def preexec():  # runs in the forked child before exec
            if drop:
                os.setgroups([])
                os.setgid(ids[1])
                os.setuid(ids[0])
            resource.setrlimit(resource.RLIMIT_AS, (memory, memory))
            resource.setrlimit(resource.RLIMIT_CPU, (cpu, cpu))
            resource.setrlimit(resource.RLIMIT_FSIZE, (fsize, fsize))
            resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
            resource.setrlimit(resource.RLIMIT_NOFILE, (64, 64))
            if hasattr(resource, "RLIMIT_NPROC"):
                resource.setrlimit(resource.RLIMIT_NPROC, (0, 0))

        return preexec

    def run(self, program: str, tests: Sequence[str]) -> SandboxResult:
        """Run ``program`` then each test case of ``tests`` (Python statements, usually ``assert ...``) in a fresh
        child process; returns a :class:`SandboxResult` (never raises because of the program's behaviour)."""
        if not isinstance(program, str):
            raise ValueError(f"program must be a string, got {type(program).__name__}")  # noqa: TRY004
        if isinstance(tests, str) or not all(isinstance(t, str) for t in tests):
            raise ValueError(f"tests must be a sequence of strings, got {tests!r}")
        tests = list(tests)
        nonce = secrets.token_hex(16)
        payload = json.dumps({"program": program, "tests": tests, "nonce": nonce,
                              "per_test_timeout": self.per_test_timeout})
        drop = self.drop_privileges and os.geteuid() == 0 and self._can_drop()
        ids = _nobody_ids()
        workdir = tempfile.mkdtemp(prefix="hfde-sandbox-")
        if drop:
            os.chown(workdir, ids[0], ids[1])
        env = {"PATH": "/usr/bin:/bin", "HOME": workdir, "TMPDIR": workdir, "LANG": "C.UTF-8",
               "PYTHONDONTWRITEBYTECODE": "1"}
        self.runs += 1
        start = time.perf_counter()
        status, detail = "ok", ""
        try:
            proc = subprocess.Popen([self.python, "-I", "-S", "-c", _HARNESS], stdin=subprocess.PIPE,
                                    stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd=workdir, env=env,
                                    start_new_session=True, preexec_fn=self._limits(drop, ids),  # noqa: PLW1509
                                    close_fds=True)  # (setrlimit / setuid must run in the child before exec)
            try:
                stdout, stderr = proc.communicate(payload.encode("utf-8"), timeout=self.timeout)
            except subprocess.TimeoutExpired:
                status, detail = "timeout", f"killed after {self.timeout:g} s"
                self._kill(proc)
                stdout, stderr = proc.communicate()
        finally:
            shutil.rmtree(workdir, ignore_errors=True)
        seconds = time.perf_counter() - start
        passed = [False] * len(tests)
        program_status = None
        for line in stdout.decode("utf-8", "replace").splitlines():
            parts = line.split()
            if len(parts) != 3 or parts[0] != nonce:
                continue
            if parts[1] == "PROGRAM":
                program_status = parts[2]
            elif parts[1].isdigit() and int(parts[1]) < len(tests):
                passed[int(parts[1])] = parts[2] == "PASS"
        if status == "ok":
            if program_status is not None and program_status != "ok":
                status, detail = "error", program_status
                passed = [False] * len(tests)
            elif proc.returncode != 0 or program_status is None:
                status = "crash"
                code = proc.returncode
                detail = f"signal {-code}" if code is not None and code < 0 else f"exit code {code}"
        return SandboxResult(passed=passed, status=status, detail=detail, seconds=seconds,
                             output=stderr.decode("utf-8", "replace")[-2000:])

    @staticmethod
    def _kill(proc: subprocess.Popen) -> None:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            proc.kill()

    def fraction(self, program: str, tests: Sequence[str]) -> float:
        """The fraction of ``tests`` that ``program`` passes (PG-TD's reward)."""
        return self.run(program, tests).fraction
