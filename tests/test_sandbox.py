"""The code sandbox and the `code` environment: hostile code is stopped, quickly, leaving nothing behind."""

from __future__ import annotations

import errno
import json
import os
import random
import select
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from atomlab.envs import load_environment
from atomlab.envs.code import TEMPLATES, CodeTests, _fill, _reference, render, strip_fence
from atomlab.envs.sandbox import Limits, isolation, run_tests, same
from atomlab.errors import AtomlabError

FAST = Limits(cpu_seconds=2, wall_seconds=5)
ONE = [((), 1)]


def session_members(session: int) -> list[int]:
    """Processes still alive in a session (field 6 of /proc/PID/stat): a sandbox run's leftovers."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[3]) == session:
            found.append(int(entry.name))
    return found


def test_correct_code_passes_and_wrong_code_fails():
    tests = [([1, 2], 3), ([-4, 4], 0), ([10, 5], 15)]
    good = run_tests("def add(a, b):\n    return a + b\n", "add", tests, FAST)
    assert good.all_passed and good.passed == 3 and good.error == "" and not good.timed_out
    wrong = run_tests("def add(a, b):\n    return a - b if a < 0 else a + b\n", "add", tests, FAST)
    assert (wrong.passed, wrong.total) == (2, 3) and not wrong.all_passed
    assert "test 2/3: returned -8, expected 0" in wrong.error
    missing = run_tests("def plus(a, b):\n    return a + b\n", "add", tests, FAST)
    assert missing.passed == 0 and "no function named add" in missing.error
    broken = run_tests("def add(a, b:\n", "add", tests, FAST)
    assert broken.passed == 0 and "SyntaxError" in broken.error


def test_results_are_compared_by_type_in_the_parent():
    """An object equal to everything, or True for 1, earns nothing: the child reports plain data."""
    always = "class Yes:\n    def __eq__(self, other):\n        return True\n\ndef f():\n    return Yes()\n"
    assert run_tests(always, "f", ONE, FAST).passed == 0
    assert run_tests("def f():\n    return True\n", "f", ONE, FAST).passed == 0
    assert run_tests("def f():\n    return 1.0\n", "f", ONE, FAST).passed == 0
    assert run_tests("def f():\n    return (1, [2])\n", "f", [((), [1, [2]])], FAST).all_passed


def test_network_is_blocked():
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen()
        port = server.getsockname()[1]
        code = f"import socket\ndef f():\n    socket.create_connection(('127.0.0.1', {port}), timeout=2)\n"
        result = run_tests(code, "f", ONE, FAST)
        assert result.passed == 0 and "network access is not allowed" in result.error
        if isolation().network:  # the kernel layer alone: the child's namespace has no loopback (or,
            # under bubblewrap, a loopback of its own where nothing listens)
            bare = run_tests(code, "f", ONE, FAST, audit_hook=False)
            assert bare.passed == 0 and ("OSError" in bare.error or "ConnectionRefusedError" in bare.error)
        readable, _, _ = select.select([server], [], [], 0)
        assert not readable, "a connection reached the test server"


def test_writes_outside_the_folder_are_blocked(tmp_path):
    target = tmp_path / "escaped.txt"
    code = f"def f():\n    with open({str(target)!r}, 'w') as out:\n        out.write('x')\n    return 1\n"
    result = run_tests(code, "f", ONE, FAST)
    assert result.passed == 0 and "writing outside the sandbox folder" in result.error
    remove = run_tests(f"import os\ndef f():\n    os.remove({str(tmp_path)!r} + '/x')\n", "f", ONE, FAST)
    assert "os.remove outside the sandbox folder" in remove.error
    directory = run_tests("import os\ndef f():\n    return os.open('/', os.O_RDONLY)\n", "f", ONE, FAST)
    assert "opening directories" in directory.error  # a descriptor for paths the hook could not check
    if isolation().uid is not None:  # as nobody, file permissions stop it without the hook
        assert run_tests(code, "f", ONE, FAST, audit_hook=False).passed == 0
    assert not target.exists()


def test_the_folder_is_writable_and_removed_afterwards():
    code = (
        "import os, tempfile\nprint(os.getcwd())\n\ndef f():\n    with open('notes.txt', 'w') as out:\n"
        "        out.write('kept')\n    tempfile.mkstemp()\n    return open('notes.txt').read()\n"
    )
    result = run_tests(code, "f", [((), "kept")], FAST)
    assert result.all_passed, result.error
    folder = result.stdout.strip()
    assert "atomlab-sandbox-" in folder and not os.path.exists(folder)


def test_fork_bomb_stops_at_once_and_leaves_no_process():
    bomb = "import os\ndef f():\n    while True:\n        os.fork()\n"
    started = time.monotonic()
    result = run_tests(bomb, "f", ONE, FAST)
    assert result.passed == 0 and "os.fork is not allowed" in result.error
    assert time.monotonic() - started < 5
    assert session_members(result.pid) == []
    spawn = run_tests("import subprocess\ndef f():\n    return 1\n", "f", ONE, FAST)
    assert "not allowed" in spawn.error and spawn.passed == 0
    system = run_tests("import os\ndef f():\n    return os.system('true')\n", "f", [((), 0)], FAST)
    assert "os.system is not allowed" in system.error


def test_fork_bomb_without_the_audit_hook_is_stopped_by_the_kernel():
    if not isolation().process_limit:
        pytest.skip("RLIMIT_NPROC does not bind root, and no unprivileged user could run Python here")
    bomb = "import os\ndef f():\n    while True:\n        os.fork()\n"
    started = time.monotonic()
    result = run_tests(bomb, "f", ONE, FAST, audit_hook=False)
    assert result.passed == 0 and "BlockingIOError" in result.error  # EAGAIN at the first fork
    assert time.monotonic() - started < 5
    assert session_members(result.pid) == []


def test_infinite_loop_is_killed_by_the_cpu_limit():
    started = time.monotonic()
    result = run_tests("def f():\n    while True:\n        pass\n", "f", ONE, Limits(cpu_seconds=1, wall_seconds=10))
    assert result.timed_out and result.passed == 0 and "CPU time" in result.error
    assert time.monotonic() - started < 8  # 1 CPU second, on a machine that may be busy
    assert session_members(result.pid) == []


def test_sleeping_code_is_killed_by_the_wall_clock():
    started = time.monotonic()
    result = run_tests("import time\ndef f():\n    time.sleep(60)\n", "f", ONE, Limits(wall_seconds=1.5))
    assert result.timed_out and "timed out after 1.5s" in result.error
    assert time.monotonic() - started < 5
    assert session_members(result.pid) == []


def test_memory_hogs_fail_with_memory_error():
    at_once = run_tests("def f():\n    return len(bytearray(2**31))\n", "f", ONE, FAST)
    assert at_once.passed == 0 and "MemoryError" in at_once.error
    growing = "def f():\n    hog = []\n    while True:\n        hog.append(bytearray(2**20))\n"
    started = time.monotonic()
    result = run_tests(growing, "f", ONE, FAST)
    assert result.passed == 0 and "MemoryError" in result.error
    assert time.monotonic() - started < 5


def test_output_is_capped():
    result = run_tests("def f():\n    while True:\n        print('x' * 1000)\n", "f", ONE, FAST)
    assert result.passed == 0 and "wrote more than 65536 bytes to stdout" in result.error
    assert len(result.stdout) <= 65536


def test_ctypes_and_introspection_of_the_hook_are_refused():
    assert "importing ctypes is not allowed" in run_tests("import ctypes\ndef f():\n    return 1\n", "f", ONE).error
    gc_walk = "import gc\ndef f():\n    return len(gc.get_objects())\n"
    assert "gc.get_objects is not allowed" in run_tests(gc_walk, "f", ONE).error


# The mount namespace (bubblewrap): the same attacks, with the audit hook off, as root and as an ordinary user

ROOT = Path(__file__).resolve().parent.parent
NO_BWRAP = "bubblewrap is not installed (Debian: apt-get install bubblewrap; scripts/test.sh installs it as root)"
# what the code tries, with the audit hook off: what it can see and read, where it can write, whom it can reach
ATTACKS = """
import os, socket

def f(secret, planted_dir, repository, home_entries, port):
    seen = {"root": [n for n in sorted(os.listdir("/")) if n not in ("usr", "bin", "sbin", "lib", "lib32", "lib64",
                                                                      "libx32", "dev", "proc", "tmp")]}
    seen["secret_readable"] = os.path.exists(secret) or os.path.exists(planted_dir)
    seen["repository_visible"] = os.path.exists(repository)
    seen["home_entries_visible"] = [e for e in home_entries if os.path.exists(e)]
    seen["tmp"] = len(os.listdir("/tmp"))  # only the sandbox's own folder
    written = []
    for target in ("/usr/escaped", "/escaped", "/tmp/../escaped", planted_dir + "/escaped"):
        try:
            with open(target, "w") as out:
                out.write("x")
            written.append(target)
        except OSError:
            pass
    seen["written"] = written
    try:
        socket.create_connection(("127.0.0.1", port), timeout=1).close()
        seen["connected"] = True
    except OSError:
        seen["connected"] = False
    try:
        pid = os.fork()
        if pid == 0:
            os._exit(0)
        seen["forked"] = True
    except OSError:
        seen["forked"] = False
    return seen
"""
HELD = {"root": [], "secret_readable": False, "repository_visible": False, "home_entries_visible": [], "tmp": 1,
        "written": [], "connected": False, "forked": False}


def attack_arguments(planted: Path, port: int, python: str) -> list:
    """A world-readable secret in a folder of the machine's /tmp, this repository, the home folder's entries
    (those not on the way to the interpreter, which the sandbox binds), and a listening port."""
    home = Path(os.path.expanduser("~"))
    interpreter = os.path.realpath(python)
    entries = [str(e) for e in home.iterdir() if not interpreter.startswith(str(e) + "/")] if home.is_dir() else []
    return [str(planted / "secret.txt"), str(planted), str(ROOT / "pyproject.toml"), entries[:20], port]


@pytest.fixture
def planted():
    folder = Path(tempfile.mkdtemp(prefix="atomlab-secret-"))
    folder.chmod(0o777)  # world-writable and readable: only the mount namespace keeps the code out
    (folder / "secret.txt").write_text("the key")
    (folder / "secret.txt").chmod(0o644)
    yield folder
    shutil.rmtree(folder)


def test_isolation_reports_which_layers_hold():
    layers = isolation().layers()
    assert set(layers) == {"mount_namespace", "network_namespace", "process_limit", "unprivileged_uid", "audit_hook"}
    assert layers["mount_namespace"] == bool(isolation().filesystem)
    assert ("mount namespace: read-only minimal root" in isolation().describe()) == layers["mount_namespace"]
    if not shutil.which("bwrap"):
        pytest.skip(NO_BWRAP)
    assert all(layers.values()), isolation().describe()


TOOLS = {"bwrap": ("bwrap",), "unshare": ("unshare", "setpriv")}  # each way to a mount namespace, its programs


@pytest.fixture(params=list(TOOLS))
def mount_tool(request, monkeypatch):
    """The sandbox made with one tool (ATOMLAB_SANDBOX=bwrap or =unshare), found afresh for the test."""
    from atomlab.envs import sandbox

    missing = [program for program in TOOLS[request.param] if not shutil.which(program)]
    if missing:
        pytest.skip(NO_BWRAP if request.param == "bwrap" else f"{', '.join(missing)} (util-linux) missing")
    monkeypatch.setenv("ATOMLAB_SANDBOX", request.param)
    monkeypatch.setattr(sandbox, "_isolation", None)
    try:
        found = isolation()
    except AtomlabError as exc:
        pytest.skip(f"{request.param} cannot make namespaces here: {exc}")
    assert found.filesystem == request.param and all(found.layers().values()), found.describe()
    return request.param


def test_mount_namespace_holds_without_the_audit_hook(planted, mount_tool):
    """With either tool, and the audit hook off: nothing of the machine visible, no write outside the run's folder
    (a world-writable folder included), no connection to a port listening on this machine, no fork."""
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen()
        arguments = attack_arguments(planted, server.getsockname()[1], isolation().python)
        result = run_tests(ATTACKS, "f", [(arguments, HELD)], FAST, audit_hook=False)
    assert result.all_passed, result.error
    assert sorted(p.name for p in planted.iterdir()) == ["secret.txt"]
    # the run's own folder stays writable; nothing else is, /tmp included
    probe = "def f():\n    open('here.txt', 'w').write('x')\n    return open('here.txt').read()\n"
    assert run_tests(probe, "f", [((), "x")], FAST, audit_hook=False).all_passed
    escape = "def f():\n    open('/tmp/elsewhere.txt', 'w')\n"
    assert "Read-only file system" in run_tests(escape, "f", ONE, FAST, audit_hook=False).error
    # no capability left to undo it: chroot, remounting / writable and unmounting /usr are all refused
    assert run_tests(UNDO, "f", [((), [errno.EPERM] * 3)], FAST, audit_hook=False).all_passed


UNDO = """
import ctypes, os

def f():
    libc, refused = ctypes.CDLL(None, use_errno=True), []
    try:
        os.chroot("/usr")
    except OSError as exc:
        refused.append(exc.errno)
    for call in (lambda: libc.mount(None, b"/", None, 32 | 4096, None), lambda: libc.umount2(b"/usr", 2)):
        refused.append(ctypes.get_errno() if call() != 0 else 0)
    return refused
"""


def test_a_required_mount_namespace_that_cannot_be_made_is_one_error(monkeypatch, tmp_path):
    from atomlab.envs import sandbox

    monkeypatch.setenv("PATH", str(tmp_path))  # neither bwrap nor unshare to be found
    monkeypatch.setattr(sandbox, "_isolation", None)
    monkeypatch.setenv("ATOMLAB_SANDBOX", "namespaces")
    with pytest.raises(AtomlabError, match="cannot make a mount namespace here.*install bubblewrap") as error:
        run_tests("def f():\n    return 1\n", "f", ONE, FAST)
    assert "\n" not in str(error.value)
    monkeypatch.setenv("ATOMLAB_SANDBOX", "jail")
    with pytest.raises(AtomlabError, match="ATOMLAB_SANDBOX='jail': expected one of auto, namespaces"):
        run_tests("def f():\n    return 1\n", "f", ONE, FAST)


ORDINARY_USER = """
import json, sys
sys.path.insert(0, sys.argv[1])
from atomlab.envs.sandbox import Limits, isolation, run_tests
arguments, held, attacks = json.loads(sys.stdin.read())
result = run_tests(attacks, "f", [(arguments, held)], Limits(cpu_seconds=2, wall_seconds=5), audit_hook=False)
print(json.dumps({"layers": isolation().layers(), "describe": isolation().describe(), "error": result.error,
                  "passed": result.all_passed}))
"""


def test_an_ordinary_user_gets_the_same_sandbox(planted, mount_tool):
    """The attacks again, the whole sandbox (isolation() included) run by an unprivileged user: `nobody`,
    entered with setpriv when the tests run as root; as an ordinary user the tests above already are that."""
    if os.geteuid() != 0:
        pytest.skip("the tests already run as an ordinary user: the tests above are this test")
    if not shutil.which("setpriv"):
        pytest.skip("setpriv (util-linux) is missing: cannot become an unprivileged user")
    user_python = next(
        (p for p in (sys.executable, "/usr/bin/python3") if subprocess.run(
            ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", p, "-c", "pass"],
            capture_output=True).returncode == 0),
        None,
    )
    if user_python is None:
        pytest.skip("no Python here that the unprivileged user nobody can run")
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen()
        job = json.dumps([attack_arguments(planted, server.getsockname()[1], user_python), HELD, ATTACKS])
        done = subprocess.run(
            ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", user_python, "-I", "-c", ORDINARY_USER,
             str(ROOT)],
            input=job, capture_output=True, text=True, timeout=120, cwd="/",
        )
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout)
    assert report["passed"], report
    assert all(report["layers"].values()) and "as the current uid (65534)" in report["describe"], report
    assert {"bwrap": "(bubblewrap)", "unshare": "(unshare and setpriv)"}[mount_tool] in report["describe"]


# The `code` environment


def test_gold_replies_score_one_on_every_template():
    env = CodeTests()
    for level in (1, 2, 3):
        seen = set()
        for index in range(40):
            task = env.task(3, index, level)
            if task.data["template"] in seen:
                continue
            seen.add(task.data["template"])
            verdict = env.verify(task, task.solution)
            assert verdict.reward == 1.0, (task.data["template"], verdict.reason)
        assert seen == {t.name for t in TEMPLATES if t.level == level}


@pytest.mark.parametrize("template", TEMPLATES, ids=lambda t: t.name)
def test_hidden_tests_catch_each_near_miss(template):
    """In-process (our own code): the plausible bug fails some hidden test for every seed tried."""
    for seed in range(25):
        rng = random.Random(seed)
        params = template.params(rng)
        _, tests = render(template, params, rng)
        near = _reference(_fill(template.near_miss, params), template.name)
        results = [near(*[list(a) if isinstance(a, list) else a for a in args]) for args, _ in tests]
        assert not all(same(got, expected) for got, (_, expected) in zip(results, tests, strict=True)), params


def test_near_misses_score_zero_through_the_sandbox():
    env = CodeTests()
    templates = {t.name: t for t in TEMPLATES}
    for level in (1, 2, 3):
        task = env.task(11, 0, level)
        template = templates[task.data["template"]]
        near = _fill(template.near_miss, task.data["params"])
        verdict = env.verify(task, f"<answer>\n{near}</answer>")
        assert verdict.reward == 0.0 and "hidden tests" in verdict.reason, verdict


def test_answer_formats():
    env = load_environment("code")
    task = env.task(0, 5, 1)
    fenced = f"<think>easy</think><answer>\n```python\n{task.answer}```\n</answer>"
    assert env.verify(task, fenced).reward == 1.0
    assert env.verify(task, f"Here you go:\n<answer>{task.answer}</answer>").reward == 0.0
    assert env.verify(task, "<answer>def broken(:</answer>").reason.startswith("does not compile")
    assert env.verify(task, "<answer></answer>").reward == 0.0
    assert strip_fence("```\nx = 1\n```") == "x = 1\n" and strip_fence("x = 1") == "x = 1\n"
    assert env.task(0, 5, 1) == task  # seeded: the same task every time


def test_hostile_answers_score_zero():
    env = CodeTests()
    task = env.task(0, 0, 1)
    function = task.data["function"]
    hostile = [
        f"import os\ndef {function}(*args):\n    os.fork()\n",
        f"def {function}(*args):\n    while True:\n        pass\n",
        f"import socket\ndef {function}(*args):\n    return socket.gethostbyname('example.com')\n",
    ]
    for code in hostile:
        assert env.verify(task, f"<answer>{code}</answer>").reward == 0.0
