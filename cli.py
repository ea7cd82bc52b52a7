"""What every command line here shares: one-line errors, signals, progress, and reading and writing
the user's files with bounds.

    raise UserError("what is wrong; how to fix it")   # run_cli prints "error: ..." and exits 2
    config = read_json(path, "model config")            # a regular file, size-capped, bounded nesting
    write_output(path, text, "--html")                   # beside the target, then renamed: never half a file

Of the project it imports only checks (the core's error and checks, re-exported here): every other
module may import it.
"""
import errno
import hashlib
import json
import os
import signal
import stat
import sys
import tempfile
import threading
import time

from checks import UserError, finite_number, printable  # noqa: F401 (UserError and finite_number: the command lines import them from here)

# torch's CPU threads (GNU OpenMP) spin 300,000 times at every wait before they sleep. On a machine
# that other work shares, the spinning threads of two programs hold each other's cores: beside another
# torch program the quick protocol took 5x its time alone; with 1,000 spins 1.7x, for about 10% more
# time alone (docs/speed.md). OpenMP reads this once, when torch loads, so every command line imports
# this module before torch; a user's own setting wins.
if "torch" not in sys.modules and "OMP_WAIT_POLICY" not in os.environ:
    os.environ.setdefault("GOMP_SPINCOUNT", "1000")

# The largest file of each kind we read, in bytes. A file is read whole, so the cap is also what a
# wrong path (a log, a disk image, /dev/zero behind a link) can cost in memory.
MAX_BYTES = {"model config": 1 << 20, "probe": 256 << 20, "word list": 16 << 20, "prompt file": 64 << 20,
             "vocabulary": 64 << 20, "merges": 64 << 20, "data file": 512 << 20,
             "feature chunk": 4 << 30}
MAX_NAME = 255 - len(".12345678.part")  # an output's name, with what write_output adds to it for the temporary
HERE = os.path.dirname(os.path.abspath(__file__))
OUTPUT_FULL = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG, errno.EIO)  # errors of a stream that cannot take more


def run_cli(main, argv=None):
    """Run a script's main(argv) as a command line tool: a UserError becomes one line on stderr and
    exit code 2; Ctrl-C and SIGTERM end it between two output lines with 130 and 143, a closed pipe
    (`| head -1`) quietly with 141, and an output that cannot be written (a full disk) with one
    line and 2: never a traceback."""
    def terminate(signum, frame):
        raise KeyboardInterrupt(143)
    previous = signal.signal(signal.SIGTERM, terminate) if threading.current_thread() is threading.main_thread() else None
    if sys.stderr is None:  # nowhere to say anything: at least the exit code says it
        return 2
    if sys.stdout is None:  # started with its standard output closed (`>&-`): every line would be lost
        print("error: standard output is closed, so nothing could be shown; redirect it to a file or /dev/null",
              file=sys.stderr)
        return 2
    for stream in (sys.stdout, sys.stderr):  # an ASCII-only terminal (PYTHONIOENCODING=ascii) gets escapes, not a crash
        if hasattr(stream, "reconfigure"):
            stream.reconfigure(errors="backslashreplace")
    try:
        main(argv)
        sys.stdout.flush()  # a full device shows here, while we can still say so
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as e:
        code = e.args[0] if e.args else 130
        print(f"\nstopped ({'SIGTERM' if code == 143 else 'interrupted'})", file=sys.stderr)
        return code
    except BrokenPipeError:
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # so the exit flush cannot fail again
        return 141
    except OSError as e:
        if e.errno not in OUTPUT_FULL or e.filename is not None:  # not our output stream: a bug, show it whole
            raise
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        print(f"error: cannot write the output ({e.strerror or e}); free some space or write elsewhere", file=sys.stderr)
        return 2
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)
    return 0


THREADS_HELP = ("torch CPU threads, at most this machine's cores (default: torch's choice, one per core; OpenMP's "
                "spin is kept short so that other work on the machine does not stall the run: docs/speed.md)")


def set_threads(n):
    """--threads of every script: torch's CPU threads (1 to this machine's cores), or torch's own
    choice when n is None."""
    if n is None:
        return
    cores = os.cpu_count() or 1
    if n < 1:
        raise UserError(f"--threads must be >= 1, not {n}")
    if n > cores:
        raise UserError(f"--threads {n} is more than this machine's {cores} cores; use at most {cores}")
    import torch
    torch.set_num_threads(n)


def provenance():
    """When and from what code a measurement ran: the date, and the git commit of this checkout (with
    "+changes" when the tree differs from it), for the header of a result table."""
    import subprocess
    here = os.path.dirname(os.path.abspath(__file__))
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=here, capture_output=True, text=True,
                                timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=here, capture_output=True,
                               text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        commit, dirty = "", ""
    return f"{time.strftime('%Y-%m-%d')}, commit {commit or 'unknown'}{'+changes' if dirty else ''}"


def memory_available():
    """The bytes this process may use at most: the machine's memory, or less where a container's limit
    (cgroup memory.max) or an address-space limit (ulimit -v) says so; None when nothing says."""
    limits = []
    if hasattr(os, "sysconf"):
        limits.append(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"))
    try:
        with open("/sys/fs/cgroup/memory.max") as f:
            value = f.read().strip()
        if value.isdigit():
            limits.append(int(value))
    except OSError:
        pass
    try:
        import resource
        soft = resource.getrlimit(resource.RLIMIT_AS)[0]
        if soft != resource.RLIM_INFINITY:
            limits.append(soft)
    except (ImportError, OSError, ValueError):
        pass
    return min(limits) if limits else None


def cache_root():
    """Where fitted probes are kept: $BACKTRACK_CACHE, else ~/.cache/backtrack."""
    root = os.environ.get("BACKTRACK_CACHE")
    if root is None:
        return os.path.join(os.path.expanduser("~"), ".cache", "backtrack")
    if not root.strip():
        raise UserError("BACKTRACK_CACHE is set but empty; set it to a directory, or unset it")
    root = os.path.expanduser(root)  # '~/x' in quotes reaches us unexpanded: the home folder, not a folder named ~
    if os.path.exists(root) and not os.path.isdir(root):
        raise UserError(f"BACKTRACK_CACHE={root} is not a directory; point it at a directory, or unset it")
    return root


def shared_path(*parts):
    """A path inside the local assets folder: $BACKTRACK_SHARED, else ../shared beside this file."""
    root = os.environ.get("BACKTRACK_SHARED", os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "shared"))
    return os.path.join(root, *parts)


class Progress:
    """A progress bar on stderr: redrawn in place on a terminal; in a log, a line at each tenth. `done`:
    what a resumed run had already done (shown, but not counted in the rate that estimates the rest)."""

    def __init__(self, total, desc, done=0):
        self.total, self.desc, self.done, self.resumed = total, desc, 0, done
        self.started, self.tty = time.time(), sys.stderr.isatty()
        if done:
            self.advance(done)

    def advance(self, n=1):
        before, self.done = self.done, self.done + n
        tenth = 10 * self.done // max(self.total, 1) > 10 * before // max(self.total, 1)
        if not (self.tty or tenth or self.done == self.total):
            return
        elapsed, new = time.time() - self.started, self.done - self.resumed
        left = f"{elapsed * (self.total - self.done) / new:4.0f}s left" if new > 0 else "      "
        bar = "#" * (30 * self.done // max(self.total, 1))
        line = f"  {self.desc} {self.done}/{self.total} [{bar:<30}] {left} "
        end = "\n" if self.done >= self.total or not self.tty else ""
        print(("\r" if self.tty else "") + line, end=end, file=sys.stderr, flush=True)


# ----------------------------------------------------------------------------------------------
# Reading: a regular file, at most MAX_BYTES[what]


def read_bytes(path, what, limit=None):
    """The bytes of a regular file (a link to one is fine) of at most `limit` bytes. Device nodes,
    pipes and directories are refused before they are opened: /dev/zero never ends."""
    limit = MAX_BYTES[what] if limit is None else limit
    try:
        info = os.stat(path)
        if not stat.S_ISREG(info.st_mode):
            raise UserError(f"{path}: the {what} is not a regular file; give the path of a file")
        if info.st_size > limit:
            raise UserError(f"{path}: the {what} has {info.st_size:,} bytes, more than the {limit:,} a {what} may "
                            "have; is this the right file?")
        with open(path, "rb") as f:
            data = f.read(limit + 1)
    except OSError as e:
        raise UserError(f"cannot read the {what} {path} ({e.strerror}); check the path")
    if len(data) > limit:  # it grew while we read it
        raise UserError(f"{path}: the {what} is larger than the {limit:,} bytes a {what} may have")
    return data


def read_text(path, what, limit=None):
    """A UTF-8 text file (a byte-order mark is dropped), read with read_bytes' bounds."""
    data = read_bytes(path, what, limit)
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        raise UserError(f"{path} is not UTF-8 text (byte {e.start}); save it as UTF-8")


def file_digest(path, follow=True):
    """The sha256 of a regular file, read in chunks; "" when it is not one (or, with follow=False, is a link)."""
    try:
        fd = os.open(path, os.O_RDONLY | (0 if follow else os.O_NOFOLLOW))
    except OSError:
        return ""
    with os.fdopen(fd, "rb") as f:
        if not stat.S_ISREG(os.fstat(f.fileno()).st_mode):
            return ""
        digest = hashlib.sha256()
        while chunk := f.read(1 << 20):
            digest.update(chunk)
        return digest.hexdigest()


def parse_json(text, where, what="JSON"):
    """json.loads with one-line errors; nesting deeper than Python's stack is refused, not a crash."""
    try:
        return json.loads(text)
    except RecursionError:
        raise UserError(f"{where}: cannot read the {what}: its JSON is nested too deeply to be a real one")
    except ValueError as e:
        raise UserError(f"{where}: cannot read the {what} (not valid JSON: {e}); fix or replace it")


def read_json(path, what, limit=None):
    return parse_json(read_text(path, what, limit), path, what)





def read_prompts(path):
    """{line number: prompt} of a prompt file: one prompt per line, or JSONL (by its extension, in any
    case) with a "prompt" (a string, or an object with a string "text"). Blank lines are skipped."""
    jsonl = os.path.splitext(path)[1].lower() == ".jsonl"
    prompts = {}
    text = read_text(path, "prompt file").replace("\r\n", "\n").replace("\r", "\n")  # Windows and old Mac files too
    for n, line in enumerate(text.split("\n"), 1):
        if not line.strip():
            continue
        if jsonl:
            prompt = parse_json(line, f"{path}:{n}")
            prompt = prompt.get("prompt") if isinstance(prompt, dict) else None
            prompt = prompt.get("text") if isinstance(prompt, dict) else prompt
            if not isinstance(prompt, str):
                raise UserError(f"{path}:{n}: expected a JSON object with a \"prompt\" (a string, or an object "
                                "with a string \"text\")")
            line = prompt
        if not printable(line):
            raise UserError(f"{path}:{n}: the prompt holds a lone surrogate (such as \\ud800): not valid Unicode text")
        prompts[n] = line
    if not prompts:
        raise UserError(f"{path} holds no prompts")
    return prompts


# ----------------------------------------------------------------------------------------------
# Writing: beside the target, then renamed, and only over a regular file


def open_lock(path):
    """A lock file of our own at `path`, to flock: a link planted there is replaced, never followed
    (OSError when the folder cannot be written)."""
    if os.path.islink(path):
        os.remove(path)
    return os.fdopen(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_NOFOLLOW, 0o644), "w")


def output_path(path, option, inputs=()):
    """Check an output path before any slow work, and return the file to write: a link is followed
    (the file it points to is written, the link stays); a device node, pipe (`/dev/stdout`) or
    directory is refused, and so is a name too long to write beside, and anything the run reads: one
    of `inputs` (files), a file inside one of them (folders: the model's, the shipped data's, the
    cache's), or the project's own files (its modules, every module loaded, probe_data/)."""
    name = os.path.basename(os.path.abspath(path))
    if len(os.fsencode(name)) > MAX_NAME:
        raise UserError(f"{option} {path}: the file name is {len(os.fsencode(name))} bytes, more than the {MAX_NAME} "
                        "this writes beside it; choose a shorter name")
    try:
        kind = os.stat(path).st_mode  # through links: /dev/stdout is the pipe or terminal it stands for
    except FileNotFoundError:
        kind = None
    except OSError as e:
        raise UserError(f"cannot write {option} {path} ({e.strerror}); choose another path")
    if kind is not None and not stat.S_ISREG(kind):
        raise UserError(f"{option} {path} is not a regular file; write to a file")
    target = os.path.realpath(path)
    for source in [*inputs, os.path.join(HERE, "probe_data")]:
        if not source or not os.path.exists(source):
            continue
        inside = os.path.isdir(source) and os.path.commonpath([os.path.realpath(source), target]) == os.path.realpath(source)
        if inside or (os.path.exists(target) and os.path.samefile(source, target)):
            where = f"inside {source}, which this run reads" if inside else "a file this run reads"
            raise UserError(f"{option} {path} is {where}; write to another file")
    if os.path.exists(target) and target in project_files():  # a module to replace exists; a new file is none
        raise UserError(f"{option} {path} is part of this program (a module it runs); write to another file")
    directory = os.path.dirname(target)
    try:
        os.makedirs(directory, exist_ok=True)
    except OSError as e:
        raise UserError(f"cannot write {option} {path} ({e.strerror}); choose another path")
    if not os.access(directory, os.W_OK) or (os.path.exists(target) and not os.access(target, os.W_OK)):
        raise UserError(f"cannot write {option} {path}; choose another path")
    return target


def project_files():
    """The files of the program that is running: this project's modules and every module loaded."""
    names = [os.path.join(HERE, n) for n in os.listdir(HERE) if n.endswith(".py")]
    names += [m.__file__ for m in list(sys.modules.values()) if isinstance(getattr(m, "__file__", None), str)]
    return {os.path.realpath(n) for n in names}


def write_output(path, text, option="output", inputs=()):
    """Write text (or bytes) to a temporary file beside the target, then rename it over the target:
    readers see the old file or the new one, never half of one, and a failed write (a full disk) keeps
    the old."""
    target = output_path(path, option, inputs)
    fd, part = tempfile.mkstemp(dir=os.path.dirname(target), prefix=os.path.basename(target) + ".", suffix=".part")
    try:
        with (os.fdopen(fd, "wb") if isinstance(text, bytes) else os.fdopen(fd, "w", encoding="utf-8")) as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        if os.path.exists(target):
            os.chmod(part, stat.S_IMODE(os.stat(target).st_mode))
        else:
            umask = os.umask(0)
            os.umask(umask)
            os.chmod(part, 0o666 & ~umask)  # what open() would have made
        os.replace(part, target)
    except OSError as e:
        raise UserError(f"cannot write {option} {path} ({e.strerror}); the old file, if any, is unchanged")
    finally:
        if os.path.exists(part):
            os.remove(part)
