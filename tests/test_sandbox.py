"""The code sandbox (hf_decoding_ext.core.sandbox): programs and their asserts run in a separate, limited Python
process; passing, failing, crashing, looping and memory-hungry programs are results (failed test cases), never
errors of the caller, and nothing runs in the test process."""

from __future__ import annotations

import os
import sys

import pytest

from hf_decoding_ext.core.sandbox import Sandbox, SandboxResult

ADD = "def add(a, b):\n    return a + b\n"


@pytest.fixture(scope="module")
def box():
    return Sandbox(timeout=6.0, per_test_timeout=1.0)


def test_pass_and_fail_per_test_case(box):
    r = box.run(ADD, ["assert add(1, 2) == 3", "assert add(1, 1) == 3", "assert add(0, 0) == 0"])
    assert r.status == "ok" and r.passed == [True, False, True]
    assert r.fraction == pytest.approx(2 / 3) and not r.all_passed
    assert box.run(ADD, ["assert add(2, 2) == 4"]).all_passed


def test_program_errors_fail_every_test(box):
    for program, detail in [("def add(a, b)\n    return a + b\n", "SyntaxError"),
                            ("raise RuntimeError('boom')\n", "RuntimeError"),
                            ("import sys\nsys.exit(0)\n", "SystemExit")]:
        r = box.run(program, ["assert True", "assert 1 == 1"])
        assert r.status == "error" and r.detail == detail and r.passed == [False, False] and r.fraction == 0.0


def test_a_raising_or_looping_test_fails_only_itself(box):
    program = ADD + "def spin():\n    while True:\n        pass\n"
    r = box.run(program, ["spin()", "raise ValueError()", "assert add(1, 2) == 3"])
    assert r.status == "ok" and r.passed == [False, False, True]


def test_infinite_loop_at_top_level_is_a_failed_run(box):
    r = box.run("while True:\n    pass\n", ["assert True"])
    assert r.status == "error" and r.detail == "TimeLimit" and r.passed == [False]


def test_wall_clock_timeout_kills_a_program_that_ignores_alarms():
    box = Sandbox(timeout=2.0, per_test_timeout=1.0)
    program = "import signal\nsignal.signal(signal.SIGALRM, signal.SIG_IGN)\nwhile True:\n    pass\n"
    r = box.run(program, ["assert True"])
    assert r.status == "timeout" and r.passed == [False] and r.seconds < 5.0


def test_memory_bomb_is_a_failed_case(box):
    r = box.run("x = bytearray(8 * 1024 ** 3)\n", ["assert True"])
    assert r.status == "error" and r.detail == "MemoryError" and r.passed == [False]
    r = box.run(ADD + "def big():\n    return [0] * 10 ** 9\n", ["assert big()", "assert add(1, 1) == 2"])
    assert r.status == "ok" and r.passed == [False, True]


def test_crash_and_silent_exit_are_failed_cases(box):
    r = box.run("import os\nos.abort()\n", ["assert True"])
    assert r.status == "crash" and r.detail == "signal 6" and r.passed == [False]
    r = box.run("import os\nos._exit(0)\n", ["assert True"])
    assert r.status == "crash" and r.passed == [False]


@pytest.mark.parametrize("program", [
    "import os\nos.fork()\n",
    "import posix\nposix.fork()\n",
    "import os\nos.system('echo hi')\n",
    "import subprocess\nsubprocess.run(['true'])\n",
    "import ctypes\n",
    "import multiprocessing\n",
])
def test_no_new_processes(box, program):
    r = box.run(program, ["assert True"])
    assert r.status == "error" and r.passed == [False]


@pytest.mark.parametrize("program", [
    "import socket\nsocket.socket()\n",
    "import socket\nsocket.create_connection(('127.0.0.1', 80), timeout=1)\n",
    "import urllib.request\nurllib.request.urlopen('http://127.0.0.1:1', timeout=1)\n",
])
def test_no_network(box, program):
    r = box.run(program, ["assert True"])
    assert r.status == "error" and r.passed == [False]


def test_program_output_cannot_fake_results(box):
    r = box.run("print('0 PASS')\nprint('PROGRAM ok')\n", ["assert False"])
    assert r.status == "ok" and r.passed == [False]


def test_nothing_runs_in_process(box, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    program = ("import os, sys\n"
               "open('written.txt', 'w').write('x')\n"
               "sys.modules['__main__'].SANDBOX_WAS_HERE = True\n"
               "os.environ['SANDBOX_WAS_HERE'] = '1'\n"
               "CWD = os.getcwd()\n"
               "PID = os.getpid()\n")
    r = box.run(program, [f"assert PID != {os.getpid()}", f"assert CWD != {str(tmp_path)!r}",
                          "assert open('written.txt').read() == 'x'", "import sys\nassert 'torch' not in sys.modules"])
    assert r.status == "ok" and r.passed == [True, True, True, True]
    assert not (tmp_path / "written.txt").exists()
    assert not hasattr(sys.modules["__main__"], "SANDBOX_WAS_HERE") and "SANDBOX_WAS_HERE" not in os.environ


def test_isolated_interpreter_and_temporary_directory(box, monkeypatch):
    monkeypatch.setenv("PYTHONPATH", "/nonexistent-sandbox-path")
    r = box.run("import os, sys\nP = sys.path\nE = dict(os.environ)\nD = os.getcwd()\n",
                ["assert '/nonexistent-sandbox-path' not in P", "assert 'PYTHONPATH' not in E",
                 "assert os.path.basename(D).startswith('hfde-sandbox-')", "assert sys.flags.isolated == 1"])
    assert r.passed == [True, True, True, True]


def test_no_tests_and_validation():
    box = Sandbox(timeout=5.0)
    assert box.run(ADD, []).fraction == 1.0
    assert SandboxResult(passed=[], status="crash").fraction == 0.0
    with pytest.raises(ValueError, match="tests must be a sequence of strings"):
        box.run(ADD, "assert True")
    with pytest.raises(ValueError, match="program must be a string"):
        box.run(None, ["assert True"])
    for kwargs, match in [({"timeout": 0}, "timeout"), ({"per_test_timeout": -1}, "per_test_timeout"),
                          ({"memory_mb": 8}, "memory_mb"), ({"max_output_mb": 0}, "max_output_mb"),
                          ({"drop_privileges": "yes"}, "drop_privileges")]:
        with pytest.raises(ValueError, match=match):
            Sandbox(**kwargs)


def test_nproc_limit_is_reported():
    box = Sandbox(timeout=5.0)
    assert isinstance(box.nproc_enforced, bool)
    if os.geteuid() != 0:
        assert box.nproc_enforced
