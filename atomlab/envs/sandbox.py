"""Run untrusted Python (a model's answer) against hidden tests, in a child process with layered limits.

`run_tests(code, function, tests)` writes nothing but a fresh temporary folder, starts
`python -I -S -B` there (isolated mode: no site-packages, no user or PYTHON* environment, no
bytecode written), runs the code, calls `function(*args)` for each hidden test, and compares the
results here, in the parent: the child only ever sees the arguments, never the expected values, so
code that tampers with the harness inside the child can at worst report wrong results for itself.
Results must be plain data (None, bool, int, finite float, str, lists/tuples and str-keyed dicts
of those) and are compared by type as well as value (`True` is not `1`, `2.0` is not `2`), so an
object whose `__eq__` always says yes earns nothing.

What is enforced, from the strongest layer down (`isolation()` says which apply on this machine):

- Kernel, where bubblewrap (`bwrap`, Debian's `bubblewrap`) can make namespaces (as root, or as any
  user where unprivileged user namespaces are allowed): the child runs in new mount, network, PID,
  IPC and UTS namespaces whose root is a read-only minimal tree: /usr (and its /bin, /lib links),
  the interpreter's own install folder when it lies elsewhere, a private /dev and /proc, and a
  private, empty /tmp holding only the temporary folder. No home directory, no /etc, no /work,
  nothing else of the machine exists there, so nothing else can be read, and nothing outside the
  folder can be written (/ and /tmp are read-only), whatever gets past the layers below.
- Kernel, where bubblewrap is missing but `unshare` and `setpriv` (util-linux) and user namespaces
  exist: the same namespaces and tree, mounted by MOUNT_ROOT inside `unshare --user --map-root-user`,
  then chroot, then `setpriv` empties the capability bounding set, so the code (uid 0 of its own
  namespace, nobody outside it) cannot remount, unmount or chroot. `ATOMLAB_SANDBOX=namespaces`
  (or `=bwrap`, `=unshare`) refuses to run without one of these, in one line.
- Kernel, always: `setrlimit` before the interpreter starts: CPU seconds (SIGXCPU, then SIGKILL a
  second later), address space (512 MiB by default: a memory hog gets MemoryError), largest file
  written, open files, no core dumps; a new session, and the whole process group is SIGKILLed on
  every exit path, so nothing is left running. A wall-clock deadline kills it too (sleeping code
  uses no CPU). Output past a cap kills the run instead of filling the parent's memory.
- Kernel, where permitted: no processes or threads at all (RLIMIT_NPROC = 0; a fork bomb's first
  fork fails with EAGAIN). Linux exempts root from this limit, so as root the child drops to
  `nobody`, which also means ordinary file permissions forbid writing outside world-writable
  folders such as /tmp. The interpreter must then be readable by `nobody`: if `sys.executable`
  is not (a Python under /root, say), /usr/bin/python3 is used when it is.
- Kernel, where permitted: a new, empty network namespace (root, or an unprivileged user
  namespace), so no address at all is reachable, loopback included.
- Python, always: an audit hook (`sys.addaudithook`) installed before the code runs refuses
  sockets, process creation (fork, exec, spawn, subprocess, os.system), signals to other
  processes, ctypes and subinterpreters, opening files for writing or changing the file system
  outside the temporary folder (by path; relative to a directory descriptor is refused), creating
  links, chdir, raising limits, tracing and the gc's object walks (which would reach the hook).
  Refusals raise PermissionError("sandbox: ..."), which is what the code (and the error summary)
  sees. CPython documents that audit hooks are not a security boundary: code that corrupts the
  interpreter's memory (crafted bytecode via marshal, say) can get past this layer; the kernel
  layers above are what still hold then.

Not enforced: reading files without the mount namespace (the standard library must be importable;
anything `nobody`, or the current user, may read can be read), total disk use under world-writable
folders by code that got past the audit hook (each file is capped in size), and CPU share (the code
runs at the caller's priority).
"""

from __future__ import annotations

import json
import os
import resource
import selectors
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from atomlab.errors import AtomlabError

NOBODY = 65534  # uid and gid of `nobody` on Linux distributions
FALLBACK_PYTHON = "/usr/bin/python3"
CLONE_NEWNET = 0x40000000
CLONE_NEWUSER = 0x10000000
RESULT_BYTES = 4 * 2**20  # the results channel; each result is also capped in the child


@dataclass(frozen=True)
class Limits:
    cpu_seconds: int = 5
    wall_seconds: float = 10.0
    memory_bytes: int = 512 * 2**20  # address space, not resident memory: the interpreter alone maps ~30 MB
    file_bytes: int = 16 * 2**20  # the largest file the code may write
    output_bytes: int = 64 * 2**10  # stdout and stderr, each; more kills the run
    open_files: int = 256


@dataclass(frozen=True)
class SandboxResult:
    passed: int
    total: int
    timed_out: bool  # killed by the wall-clock deadline or the CPU limit
    error: str  # "" when every test passed, else a one-line summary of the first problem
    stdout: str = ""
    stderr: str = ""
    seconds: float = 0.0
    pid: int = 0  # the child's process id, which is also its process group and session

    @property
    def all_passed(self) -> bool:
        return self.total > 0 and self.passed == self.total


@dataclass(frozen=True)
class Isolation:
    """How the child is isolated on this machine; found once per process by trying the strongest first."""

    python: str
    uid: int | None  # the uid the child drops to (from root), or None to keep the current one
    network: str  # "bwrap", "unshare", "root" or "user": how the network namespace is made; "" when none could be
    # "bwrap" or "unshare" (util-linux, where bubblewrap is missing): a mount namespace with a read-only minimal
    # root; "" when none
    filesystem: str = ""

    @property
    def process_limit(self) -> bool:
        """Whether RLIMIT_NPROC binds: the kernel exempts root."""
        return self.uid is not None or os.geteuid() != 0

    def layers(self) -> dict[str, bool]:
        """Which layers hold here: a mount namespace with a read-only minimal root (no home directories,
        a private /tmp), a network namespace, the kernel's process limit, an unprivileged uid; the audit
        hook always does."""
        return {
            "mount_namespace": bool(self.filesystem),
            "network_namespace": bool(self.network),
            "process_limit": self.process_limit,
            "unprivileged_uid": self.uid is not None or os.geteuid() != 0,
            "audit_hook": True,
        }

    def describe(self) -> str:
        user = f"uid {self.uid}" if self.uid is not None else f"the current uid ({os.geteuid()})"
        tool = {"bwrap": "bubblewrap", "unshare": "unshare and setpriv"}.get(self.filesystem)
        files = f"read-only minimal root, private /tmp ({tool})" if tool else "no (file permissions only)"
        return (
            f"python {self.python} as {user}; mount namespace: {files}; "
            f"network namespace: {'yes' if self.network else 'no (audit hook only)'}; "
            f"process limit: {'kernel' if self.process_limit else 'audit hook only (root)'}"
        )


# The child: read the job, arm the audit hook, run the code, call the function on each test's
# arguments, and write one JSON line per test to the results descriptor. Python 3.8+ (audit hooks),
# standard library only. Everything the hook uses is bound as a default argument when it is
# defined, so code that rebinds module attributes or builtins afterwards cannot change its decisions.
RUNNER = r"""
import json, os, sys

BLOCKED_IMPORTS = frozenset({"ctypes", "_ctypes", "_posixsubprocess", "_xxsubinterpreters", "_xxinterpchannels",
                             "_interpreters", "_interpchannels", "_interpqueues"})
BLOCKED = frozenset({"os.system", "os.fork", "os.forkpty", "os.exec", "os.posix_spawn", "os.spawn", "os.startfile",
                     "os.kill", "os.killpg", "subprocess.Popen", "pty.spawn", "resource.setrlimit", "resource.prlimit",
                     "sys.settrace", "sys.setprofile", "gc.get_objects", "gc.get_referrers", "gc.get_referents",
                     "code.__new__", "os.chdir", "os.link", "os.symlink", "os.chroot"})
# Events whose listed arguments are paths that must lie inside the folder, then the positions of
# directory descriptors, which must be unset (-1): a path relative to one cannot be checked.
PATH_EVENTS = {"os.remove": ((0,), (1,)), "os.rmdir": ((0,), (1,)), "os.rename": ((0, 1), (2, 3)),
               "os.mkdir": ((0,), (2,)), "os.chmod": ((0,), (2,)), "os.chown": ((0,), (3,)), "os.utime": ((0,), (3,)),
               "os.truncate": ((0,), ()), "os.setxattr": ((0,), ()), "os.removexattr": ((0,), ()),
               "os.chflags": ((0,), ()), "os.lchown": ((0,), ()), "shutil.rmtree": ((0,), (1,)),
               "shutil.move": ((0, 1), ()), "shutil.copyfile": ((1,), ()), "shutil.copytree": ((1,), ())}
WRITE_FLAGS = os.O_WRONLY | os.O_RDWR | os.O_APPEND | os.O_CREAT | os.O_TRUNC


def arm(folder):
    def inside(path, _folder=folder + "/", _str=str, _bytes=bytes, _type=type):
        kind = _type(path)
        if kind is _bytes:
            path = path.decode("utf-8", "surrogateescape")
        elif kind is not _str:  # descriptors and path-like objects (whose __fspath__ could lie)
            return False
        if not path.startswith("/"):
            path = _folder + path  # chdir is refused, so the working folder stays the temporary one
        parts = []
        for part in path.split("/"):
            if part == "..":
                if parts:
                    parts.pop()
            elif part and part != ".":
                parts.append(part)
        return ("/" + "/".join(parts) + "/").startswith(_folder)

    def hook(event, args, _inside=inside, _blocked=BLOCKED, _imports=BLOCKED_IMPORTS, _paths=PATH_EVENTS,
             _write=WRITE_FLAGS, _stat=os.stat, _dir=0o040000, _error=PermissionError, _type=type, _int=int,
             _len=len):
        if event == "open":
            path, mode, flags = args
            if flags & _write:
                if not _inside(path):
                    raise _error("sandbox: writing outside the sandbox folder is not allowed")
            elif mode is None and _type(path) is not _int:  # os.open: no descriptors of directories
                try:
                    is_dir = (_stat(path).st_mode & 0o170000) == _dir
                except OSError:
                    is_dir = False
                if is_dir:
                    raise _error("sandbox: opening directories with os.open is not allowed")
        elif event == "import":
            if args[0].partition(".")[0] in _imports:
                raise _error("sandbox: importing " + args[0] + " is not allowed")
        elif event in _blocked:
            raise _error("sandbox: " + event + " is not allowed")
        elif event.startswith("socket."):
            raise _error("sandbox: network access is not allowed")
        elif event.startswith("ctypes."):
            raise _error("sandbox: ctypes is not allowed")
        elif event == "object.__setattr__":
            if args[1] in ("__code__", "__defaults__", "__kwdefaults__"):
                raise _error("sandbox: replacing " + args[1] + " is not allowed")
        elif event in _paths:
            positions, descriptors = _paths[event]
            for position in descriptors:
                if _len(args) > position and args[position] is not None and args[position] != -1:
                    raise _error("sandbox: paths relative to a directory descriptor are not allowed")
            for position in positions:
                if not _inside(args[position]):
                    raise _error("sandbox: " + event + " outside the sandbox folder is not allowed")

    sys.addaudithook(hook)


def plain(value, depth=0):
    kind = type(value)
    if value is None or kind is bool or kind is int or kind is str:
        return value
    if kind is float:
        if value != value or value in (float("inf"), float("-inf")):
            raise ValueError("returned a float that is not finite")
        return value
    if depth > 50:
        raise ValueError("returned a value nested too deeply")
    if kind is list or kind is tuple:
        return [plain(item, depth + 1) for item in value]
    if kind is dict:
        if any(type(key) is not str for key in value):
            raise TypeError("returned a dict with keys that are not str")
        return {key: plain(item, depth + 1) for key, item in value.items()}
    raise TypeError("returned a " + kind.__name__ + ", not plain data (None, bool, int, float, str, list, dict)")


def describe(exc):
    try:
        text = type(exc).__name__ + ": " + str(exc)
    except BaseException:
        text = "an exception that cannot be printed"
    return text[:300]


def main():
    job_path, fd = sys.argv[1], int(sys.argv[2])
    with open(job_path, "rb") as handle:
        job = json.loads(handle.read().decode("utf-8"))
    os.remove(job_path)  # the arguments stay hidden from the file system, at least
    if job.get("no_processes"):  # under bubblewrap, which forks after the parent set the other limits
        import resource
        resource.setrlimit(resource.RLIMIT_NPROC, (0, 0))

    def send(message, _dumps=json.dumps, _write=os.write, _fd=fd):
        data = (_dumps(message) + "\n").encode("utf-8", "replace")
        while data:
            data = data[_write(_fd, data):]

    if job["audit"]:
        arm(os.path.realpath(job["folder"]))
    namespace = {"__name__": "solution", "__builtins__": __builtins__}
    try:
        exec(compile(job["code"], "<solution>", "exec"), namespace)
        function = namespace.get(job["function"])
        if not callable(function):
            send({"error": "the code defines no function named " + job["function"]})
            return
    except BaseException as exc:
        send({"error": describe(exc)})
        return
    for index, args in enumerate(job["args"]):
        try:
            text = json.dumps(plain(function(*args)))
            if len(text) > 100000:
                raise ValueError("returned more than 100000 characters of data")
            send({"i": index, "value": text})
        except BaseException as exc:
            send({"i": index, "error": describe(exc)})
    send({"done": len(job["args"])})


try:
    main()
finally:
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except BaseException:
            pass
    os._exit(0)
"""


_libc_unshare: Callable[[int], int] | None = None


def _unshare(flags: int) -> None:
    """unshare(2), resolved in the parent (ctypes is not imported between fork and exec)."""
    if _libc_unshare is None or _libc_unshare(flags) != 0:
        raise OSError("unshare failed")  # no errno: fetching it would import in the forked child


def _resolve_unshare() -> None:
    global _libc_unshare
    if _libc_unshare is None and sys.platform.startswith("linux"):
        try:
            import ctypes

            function = ctypes.CDLL(None, use_errno=True).unshare
            function.argtypes, function.restype = [ctypes.c_int], ctypes.c_int
            _libc_unshare = function
        except (OSError, AttributeError):
            pass


def _child_setup(isolation: Isolation, limits: Limits) -> Callable[[], None]:
    """What runs in the child between fork and exec: namespaces, identity, then limits.
    Only system calls, no locks, so a fork from a threaded parent cannot deadlock here."""

    def setup() -> None:
        if isolation.network == "root":  # (under bubblewrap, bwrap makes the namespaces)
            _unshare(CLONE_NEWNET)
        if isolation.uid is not None:
            os.setgroups([])
            os.setgid(isolation.uid)
            os.setuid(isolation.uid)
        if isolation.network == "user":
            _unshare(CLONE_NEWUSER | CLONE_NEWNET)
        resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
        resource.setrlimit(resource.RLIMIT_CPU, (limits.cpu_seconds, limits.cpu_seconds + 1))
        resource.setrlimit(resource.RLIMIT_AS, (limits.memory_bytes, limits.memory_bytes))
        resource.setrlimit(resource.RLIMIT_FSIZE, (limits.file_bytes, limits.file_bytes))
        resource.setrlimit(resource.RLIMIT_NOFILE, (limits.open_files, limits.open_files))
        # No new processes or threads. Set after setuid: the kernel checks the count when changing
        # user, and an exceeded limit then would make the exec fail. bwrap must fork, and unshare must write
        # its uid map: in a mount namespace the child sets it (RUNNER's no_processes).
        if not isolation.filesystem:
            resource.setrlimit(resource.RLIMIT_NPROC, (0, 0))

    return setup


@dataclass
class _Run:
    stdout: bytes
    stderr: bytes
    results: bytes
    timed_out: bool
    overflow: str  # which stream went past its cap, or ""
    returncode: int | None
    seconds: float
    pid: int
    exited_by_itself: bool = False  # rather than killed here (deadline, overflow, or alive after closing its pipes)


def _remove_tree(folder: str) -> None:
    shutil.rmtree(folder, ignore_errors=True)
    if os.path.exists(folder):  # the code may have left folders without write permission
        for root, dirs, _ in os.walk(folder):
            for name in dirs:
                try:
                    os.chmod(os.path.join(root, name), 0o700)
                except OSError:
                    pass
        shutil.rmtree(folder, ignore_errors=True)


def _exited(pid: int, grace: float) -> bool:
    """Whether the child has exited, waiting up to `grace` seconds: its pipes close an instant
    before it does. Peeks without reaping (WNOWAIT), so the group kill that follows cannot hit a
    reused process id."""
    end = time.monotonic() + grace
    while os.waitid(os.P_PID, pid, os.WEXITED | os.WNOHANG | os.WNOWAIT) is None:
        if time.monotonic() >= end:
            return False
        time.sleep(0.005)
    return True


def _stop_contained(pid: int) -> None:
    """Kill bwrap's child (the code) first and give bwrap a moment to reap it and exit: killed together, the
    orphaned child would be left to the machine's init to reap, which in some containers never happens."""
    try:
        with open(f"/proc/{pid}/task/{pid}/children", encoding="ascii") as handle:
            children = [int(child) for child in handle.read().split()]
    except OSError:
        return
    for child in children:
        try:
            os.kill(child, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
    _exited(pid, 2.0)


def _kill_group(pid: int) -> None:
    try:
        os.killpg(pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


def _minimal_root(folder: str, python: str) -> list[list[str]]:
    """The child's whole file system, as bubblewrap options without their dashes: a read-only /usr (with the /bin,
    /lib links of a merged-/usr system), the interpreter's install folder, a private /dev and /tmp, and `folder`
    (no /proc); all of it is then made read-only but `folder`. The unshare fallback builds the same tree itself
    (MOUNT_ROOT)."""
    entries = [["ro-bind", "/usr", "/usr"]]
    for name in ("bin", "sbin", "lib", "lib32", "lib64", "libx32"):
        path = "/" + name
        if os.path.islink(path):
            entries.append(["symlink", os.readlink(path), path])
        elif os.path.isdir(path):
            entries.append(["ro-bind", path, path])
    prefix = os.path.dirname(os.path.dirname(os.path.realpath(python)))  # .../bin/python3 -> its install folder
    if prefix != "/usr" and not prefix.startswith("/usr/"):
        entries.append(["ro-bind", prefix, prefix])
        if os.path.dirname(python) != os.path.join(prefix, "bin"):  # a venv's link to that interpreter
            entries.append(["ro-bind", os.path.dirname(python), os.path.dirname(python)])
    return [*entries, ["dev", "/dev"], ["tmpfs", "/tmp"], ["bind", folder, folder]]


def _bwrap_command(folder: str, python: str) -> list[str]:
    """bubblewrap's arguments for a child that sees only the minimal root."""
    # All of --unshare-all but the PID namespace: its init would exit after reporting the code's status and
    # could outlive bwrap as a zombie nobody reaps (the code then as init would ignore RLIMIT_CPU's signals)
    command = [shutil.which("bwrap") or "bwrap", "--unshare-user-try", "--unshare-ipc", "--unshare-net"]
    command += ["--unshare-uts", "--unshare-cgroup-try", "--die-with-parent"]
    for kind, *paths in _minimal_root(folder, python):
        command += [f"--{kind}", *paths]
    return [*command, "--remount-ro", "/tmp", "--remount-ro", "/", "--chdir", folder, "--"]  # writable: folder only


# The unshare fallback, where bubblewrap is missing: `unshare` (util-linux) makes new user (the caller mapped to
# root in it), mount, network, IPC and UTS namespaces, then this program, in them and before any of the code is
# read, mounts the minimal root on an empty folder, read-only but for the run's folder, and chroots into it;
# `setpriv` then empties the capability bounding set, so the interpreter it starts (uid 0 of the namespace) holds
# no capability at all: it cannot mount, unmount, remount or chroot its way out. Standard library only.
MOUNT_ROOT = r"""
import ctypes, json, os, sys

MS_RDONLY, MS_NOSUID, MS_NODEV, MS_NOEXEC, MS_REMOUNT = 1, 2, 4, 8, 32
MS_BIND, MS_REC, MS_PRIVATE = 4096, 16384, 1 << 18
DEVICES = ("null", "zero", "full", "random", "urandom")
root, folder, entries = sys.argv[1], sys.argv[2], json.loads(sys.argv[3])
libc = ctypes.CDLL(None, use_errno=True)
libc.mount.argtypes = [ctypes.c_char_p, ctypes.c_char_p, ctypes.c_char_p, ctypes.c_ulong, ctypes.c_char_p]


def mount(source, target, kind, flags, data=None):
    encode = lambda text: None if text is None else text.encode()
    if libc.mount(encode(source), encode(target), encode(kind), flags, encode(data)) != 0:
        error = ctypes.get_errno()
        raise OSError(error, "sandbox: mount " + str(source) + " on " + target + ": " + os.strerror(error))


def bind(source, target, read_only):
    mount(source, target, None, MS_BIND | MS_REC)
    if read_only:  # a remount must keep the flags the kernel locked on the source (nosuid, nodev, noexec)
        locked = os.statvfs(source).f_flag & (MS_NOSUID | MS_NODEV | MS_NOEXEC)
        mount(None, target, None, MS_REMOUNT | MS_BIND | MS_RDONLY | locked)


def place(path, directory=True):
    target = root + path
    os.makedirs(target if directory else os.path.dirname(target), exist_ok=True)
    if not directory:
        open(target, "a").close()
    return target


mount(None, "/", None, MS_REC | MS_PRIVATE)  # nothing mounted here shows outside
mount("tmpfs", root, "tmpfs", MS_NOSUID | MS_NODEV, "size=1m,mode=0755")
for kind, *paths in entries:
    if kind == "ro-bind":
        bind(paths[0], place(paths[1]), True)
    elif kind == "symlink":
        os.symlink(paths[0], root + paths[1])
    elif kind == "dev":
        place(paths[0])
        for name in DEVICES:
            bind("/dev/" + name, place(paths[0] + "/" + name, directory=False), False)
    elif kind == "tmpfs":
        mount("tmpfs", place(paths[0]), "tmpfs", MS_NOSUID | MS_NODEV, "size=1m,mode=0755")
    elif kind == "bind":
        bind(paths[0], place(paths[1]), False)
mount(None, root + "/tmp", None, MS_REMOUNT | MS_RDONLY | MS_NOSUID | MS_NODEV)  # /tmp holds the folder alone
mount(None, root, None, MS_REMOUNT | MS_RDONLY | MS_NOSUID | MS_NODEV)
os.chroot(root)
os.chdir(folder)
os.execv(sys.argv[4], sys.argv[4:])
"""


def _unshare_command(folder: str, root: str, python: str) -> list[str]:
    """The fallback's command: namespaces (unshare), the minimal root mounted on `root` (MOUNT_ROOT), then no
    capabilities (setpriv), then what follows."""
    unshare, setpriv = shutil.which("unshare") or "unshare", shutil.which("setpriv") or "setpriv"
    namespaces = [unshare, "--user", "--map-root-user", "--mount", "--net", "--ipc", "--uts", "--"]
    mounting = [python, "-I", "-S", "-B", "-c", MOUNT_ROOT, root, folder, json.dumps(_minimal_root(folder, python))]
    return [*namespaces, *mounting, setpriv, "--bounding-set=-all", "--inh-caps=-all", "--no-new-privs", "--"]


def _execute(job: dict[str, Any], isolation: Isolation, limits: Limits) -> _Run:
    folder = os.path.realpath(tempfile.mkdtemp(prefix="atomlab-sandbox-"))
    # the unshare fallback mounts the child's root on an empty folder of its own (seen empty from here)
    root = ""
    if isolation.filesystem == "unshare":
        root = os.path.realpath(tempfile.mkdtemp(prefix="atomlab-sandbox-root-"))
    read_end = write_end = -1
    try:
        if isolation.uid is not None:
            for path in filter(None, (folder, root)):
                os.chown(path, isolation.uid, isolation.uid)
        job_path = os.path.join(folder, ".job.json")
        with open(job_path, "w", encoding="utf-8") as handle:
            json.dump({**job, "folder": folder, "no_processes": bool(isolation.filesystem)}, handle)
        read_end, write_end = os.pipe()
        environment = {"PATH": "/usr/bin:/bin", "HOME": folder, "TMPDIR": folder, "LANG": "C.UTF-8"}
        command = [isolation.python, "-I", "-S", "-B", "-c", RUNNER, job_path, str(write_end)]
        if isolation.filesystem == "bwrap":
            command = [*_bwrap_command(folder, isolation.python), *command]
        elif isolation.filesystem == "unshare":
            command = [*_unshare_command(folder, root, isolation.python), *command]
        started = time.monotonic()
        process = subprocess.Popen(
            command,
            cwd=folder,
            env=environment,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            pass_fds=(write_end,),
            start_new_session=True,
            preexec_fn=_child_setup(isolation, limits),
        )
        os.close(write_end)
        write_end = -1
        try:
            run = _collect(process, read_end, limits, started)
            run.exited_by_itself = _exited(process.pid, 0.0 if run.timed_out or run.overflow else 0.5)
        finally:
            # Kill the group before reaping the leader: until it is reaped its id cannot be reused,
            # so the group is certainly ours. Anything the code left behind dies with it.
            if isolation.filesystem == "bwrap":
                _stop_contained(process.pid)
            _kill_group(process.pid)
            try:
                process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                pass
            for stream in (process.stdout, process.stderr):
                if stream is not None:
                    stream.close()
        run.returncode = process.returncode
        if isolation.filesystem == "bwrap" and run.returncode is not None and run.returncode > 128:
            run.returncode = 128 - run.returncode  # bwrap exits 128 + the signal that killed the code
        return run
    finally:
        for fd in (read_end, write_end):
            if fd >= 0:
                os.close(fd)
        _remove_tree(folder)
        if root:
            _remove_tree(root)


def _collect(process: subprocess.Popen, results_fd: int, limits: Limits, started: float) -> _Run:
    """Read stdout, stderr and the results until all three close, the deadline passes or one
    overflows; never more than the caps are kept in memory."""
    assert process.stdout is not None and process.stderr is not None
    caps = {process.stdout.fileno(): limits.output_bytes, process.stderr.fileno(): limits.output_bytes}
    caps[results_fd] = RESULT_BYTES
    names = {process.stdout.fileno(): "stdout", process.stderr.fileno(): "stderr", results_fd: "results"}
    buffers: dict[int, bytearray] = {fd: bytearray() for fd in caps}
    deadline = started + limits.wall_seconds
    timed_out, overflow = False, ""
    with selectors.DefaultSelector() as selector:
        for fd in caps:
            os.set_blocking(fd, False)
            selector.register(fd, selectors.EVENT_READ)
        while selector.get_map():
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                timed_out = True
                break
            for key, _ in selector.select(remaining):
                fd = key.fd
                try:
                    chunk = os.read(fd, 65536)
                except BlockingIOError:
                    continue
                if not chunk:
                    selector.unregister(fd)
                    continue
                buffers[fd] += chunk
                if len(buffers[fd]) > caps[fd]:
                    overflow = names[fd]
                    del buffers[fd][caps[fd] :]
                    break
            if overflow:
                break
    return _Run(
        stdout=bytes(buffers[process.stdout.fileno()]),
        stderr=bytes(buffers[process.stderr.fileno()]),
        results=bytes(buffers[results_fd]),
        timed_out=timed_out,
        overflow=overflow,
        returncode=None,
        seconds=time.monotonic() - started,
        pid=process.pid,
    )


def _plain(value: Any) -> Any:
    """Expected values as the child reports results: through JSON (tuples become lists)."""
    return json.loads(json.dumps(value))


def same(a: Any, b: Any) -> bool:
    """Equal in value and in type at every level: JSON values, where True == 1 would otherwise pass."""
    if type(a) is not type(b):
        return False
    if isinstance(a, list):
        return len(a) == len(b) and all(same(x, y) for x, y in zip(a, b, strict=True))
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(same(a[key], b[key]) for key in a)
    return a == b


def _short(value: Any, limit: int = 80) -> str:
    text = json.dumps(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _signal_name(returncode: int | None) -> str:
    if returncode is None or returncode >= 0:
        return f"exit code {returncode}"
    try:
        return signal.Signals(-returncode).name
    except ValueError:
        return f"signal {-returncode}"


def _judge(run: _Run, tests: Sequence[tuple[Sequence[Any], Any]], limits: Limits) -> SandboxResult:
    messages = []
    for line in run.results.decode("utf-8", "replace").splitlines():
        try:
            message = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(message, dict):
            messages.append(message)
    outcome: dict[int, dict] = {}
    top_error, finished = "", False
    for message in messages:
        if "error" in message and "i" not in message and not top_error:
            top_error = str(message["error"])
        elif isinstance(message.get("i"), int) and message["i"] not in outcome:
            outcome[message["i"]] = message  # the first report of a test counts
        elif "done" in message:
            finished = True
    passed, first_failure = 0, ""
    for index, (_, expected) in enumerate(tests):
        message = outcome.get(index)
        if message is None:
            first_failure = first_failure or f"test {index + 1}/{len(tests)}: no result"
            continue
        if "error" in message:
            first_failure = first_failure or f"test {index + 1}/{len(tests)}: raised {message['error']}"
            continue
        try:
            value, got = json.loads(message.get("value", "")), ""
        except (json.JSONDecodeError, TypeError):
            value, got = None, "malformed data"
        if not got and same(value, _plain(expected)):
            passed += 1
        else:
            got = got or _short(value)
            first_failure = (
                first_failure or f"test {index + 1}/{len(tests)}: returned {got}, expected {_short(expected)}"
            )
    # SIGXCPU at the soft CPU limit, SIGKILL at the hard one (for code that ignores SIGXCPU)
    cpu_killed = run.exited_by_itself and run.returncode in (-signal.SIGXCPU, -signal.SIGKILL)
    timed_out = run.timed_out or cpu_killed
    if run.timed_out:
        error = f"timed out after {limits.wall_seconds:g}s"
    elif run.overflow:
        cap = RESULT_BYTES if run.overflow == "results" else limits.output_bytes
        error = f"wrote more than {cap} bytes to {run.overflow}"
    elif cpu_killed:
        error = f"used more than {limits.cpu_seconds}s of CPU time"
    elif top_error:
        error = top_error
    elif not finished and not messages:
        tail = run.stderr.decode("utf-8", "replace").strip().splitlines()
        error = f"the interpreter stopped ({_signal_name(run.returncode)})" + (f": {tail[-1][:200]}" if tail else "")
    else:
        error = "" if passed == len(tests) else first_failure
    if not finished and not error:
        error = f"the code stopped the tests early ({_signal_name(run.returncode)})"
    return SandboxResult(
        passed=passed,
        total=len(tests),
        timed_out=timed_out,
        error=error,
        stdout=run.stdout.decode("utf-8", "replace"),
        stderr=run.stderr.decode("utf-8", "replace"),
        seconds=run.seconds,
        pid=run.pid,
    )


_isolation: Isolation | None = None
_isolation_lock = threading.Lock()


SANDBOX_SETTING = "ATOMLAB_SANDBOX"
# what ATOMLAB_SANDBOX may ask for: the strongest that works (default), a mount namespace by either tool, one tool
MODES = {"auto": None, "namespaces": ("bwrap", "unshare"), "bwrap": ("bwrap",), "unshare": ("unshare",)}


def sandbox_mode() -> str:
    mode = os.environ.get(SANDBOX_SETTING, "") or "auto"
    if mode not in MODES:
        raise AtomlabError(f"{SANDBOX_SETTING}={mode!r}: expected one of {', '.join(MODES)}")
    return mode


def _candidates(mode: str = "auto") -> list[Isolation]:
    """Strongest first: bubblewrap's namespaces (as nobody, from root), then unshare's, then an unprivileged uid
    (as root), then a network namespace, then the interpreter alone; `mode` keeps only the mount namespaces."""
    pythons = [sys.executable]
    if os.path.realpath(FALLBACK_PYTHON) != os.path.realpath(sys.executable) and os.access(FALLBACK_PYTHON, os.X_OK):
        pythons.append(FALLBACK_PYTHON)
    uid = NOBODY if os.geteuid() == 0 else None
    tools = {"bwrap": ("bwrap",), "unshare": ("unshare", "setpriv")}
    contained = [
        Isolation(p, uid, tool, tool)
        for tool in MODES[mode] or tools
        if all(shutil.which(program) for program in tools[tool])
        for p in pythons
    ]
    if MODES[mode] is not None:
        return contained
    if os.geteuid() == 0:
        found = [Isolation(p, NOBODY, net) for net in ("root", "user", "") for p in pythons]
        return contained + found + [Isolation(sys.executable, None, net) for net in ("root", "")]
    return contained + [Isolation(sys.executable, None, net) for net in ("user", "")]


def _works(isolation: Isolation) -> bool:
    job = {"code": "def f():\n    return 1\n", "function": "f", "args": [[]], "audit": True}
    try:
        run = _execute(job, isolation, Limits(wall_seconds=30))
    except (OSError, subprocess.SubprocessError):
        return False
    return _judge(run, [((), 1)], Limits()).all_passed


def isolation() -> Isolation:
    """The strongest isolation that works here, found once per process with a trivial run of each
    (`python -c "from atomlab.envs.sandbox import isolation; print(isolation().describe())"`)."""
    global _isolation
    with _isolation_lock:
        if _isolation is None:
            _resolve_unshare()
            mode = sandbox_mode()
            candidates = _candidates(mode)
            for candidate in candidates:
                if _works(candidate):
                    _isolation = candidate
                    break
            else:
                if mode != "auto":
                    raise AtomlabError(
                        f"{SANDBOX_SETTING}={mode}: the code sandbox cannot make a mount namespace here ("
                        + (f"tried {len(candidates)} ways" if candidates else "neither bwrap nor unshare+setpriv found")
                        + "); install bubblewrap (apt-get install bubblewrap) or allow unprivileged user namespaces "
                        "(sysctl user.max_user_namespaces), or unset it for the weaker layers"
                    )
                raise AtomlabError(f"the code sandbox cannot start {sys.executable} (tried {len(candidates)} ways)")
        return _isolation


def run_tests(
    code: str,
    function: str,
    tests: Sequence[tuple[Sequence[Any], Any]],
    limits: Limits | None = None,
    audit_hook: bool = True,
) -> SandboxResult:
    """Run `code`, then `function(*args)` for each (args, expected) in `tests`, in the sandbox.
    Args and expected values are plain JSON data. Never raises for anything the code does.
    `audit_hook=False` leaves only the kernel layers: for testing them, not for real use."""
    limits = limits or Limits()
    job = {"code": code, "function": function, "args": [list(args) for args, _ in tests], "audit": audit_hook}
    return _judge(_execute(job, isolation(), limits), tests, limits)
