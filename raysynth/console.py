"""What a person sees: stage lines, progress bars, one-line errors; Ray's own output goes to a log file.

:class:`Console` is opened by the command line around one command. While it is open

* our log records (``raysynth.*``) at INFO and above go to the console's stdout, and every record
  (DEBUG included) to ``OUT/logs/ray.log``;
* everything else this process writes to its stdout and stderr, at the file-descriptor level, goes
  to that log file too: Ray's forwarded worker output (``(TrainController pid=...) ...``,
  ``[repeated 2x across cluster]``, tracebacks of trials shut down with SIGTERM), the driver's own
  C++ log lines (``core_worker.cc``), Ray's Python loggers (the token-authentication banner) and
  anything a library prints. Redirecting the descriptors catches the C++ lines, which no Python
  setting reaches, and keeps ``log_to_driver=True``, so on a cluster the worker output of every node
  still arrives, in this file;
* :class:`Progress` draws a tqdm bar (rate and ETA) when the console's stdout is a terminal, and
  otherwise logs a plain line at most every :data:`LINE_SECONDS` seconds while it advances (every
  :data:`STALL_SECONDS` while it waits), plus a final one;
* ``verbose`` leaves the descriptors alone: Ray's output reaches the console as Ray prints it, and
  bars become plain lines, which interleave with it cleanly.

Without an open console (a library caller, a Ray worker) :class:`Progress` logs its plain lines
through ``logging`` and nothing is redirected. :class:`ProgressBoard` is the small Ray actor that
Ray Train workers post their step to, so the driver can draw one bar over every fold.
"""

from __future__ import annotations

import contextlib
import io
import logging
import os
import sys
import threading
import time
import traceback
from pathlib import Path
from typing import Any, Callable, Iterator, Optional, TextIO

LOG_NAME = "ray.log"
"""The log file of a command, under ``OUT/logs/``."""

LINE_SECONDS = float(os.environ.get("RAYSYNTH_PROGRESS_SECONDS", "20"))
"""Without a terminal, the least time between two progress lines of one bar while it advances (the
final line is always written)."""
STALL_SECONDS = 300.0
"""Without a terminal, a bar that has not advanced still writes a line this often, to show it is alive."""

_RAY_QUIET_ENV = {
    "RAY_COLOR_PREFIX": "0",  # no colour codes in the log file (read when Ray prints a forwarded line)
    "RAY_DEDUP_LOGS": "0",  # the file keeps every line (read when ray is first imported)
}

progress_log = logging.getLogger("raysynth.progress")


class _State:
    stream: Optional[TextIO] = None  # the console's stdout while a Console is open
    bars = False  # draw tqdm bars on it (a terminal, not quiet, not verbose)


_STATE = _State()


# ---- progress -----------------------------------------------------------------------------------------

def format_seconds(seconds: float) -> str:
    """``45s``, ``2m05s``, ``1h02m``."""
    s = max(0, int(round(seconds)))
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    return f"{s // 3600}h{s % 3600 // 60:02d}m"


class Progress:
    """One unit of long work counted to ``total``: a tqdm bar on a terminal, else plain log lines.

    ``set(n)`` (absolute) and ``update(k)`` (relative) may be called from any thread; ``note`` sets
    the text after the counts (e.g. each fold's step and loss). Use as a context manager: the final
    line says ``done`` or, when the block raised, ``stopped``."""

    def __init__(self, desc: str, total: int, unit: str, *, line_seconds: Optional[float] = None) -> None:
        self.desc, self.total, self.unit = desc, max(0, int(total)), unit
        self.n, self.text = 0, ""
        self.line_seconds = LINE_SECONDS if line_seconds is None else line_seconds
        self.start = self._last_line = time.monotonic()
        self._n_line = 0  # the count at the last line
        self._moved: Optional[tuple[float, int]] = None  # (time, count) of the first advance: the rate starts there
        self._lock = threading.Lock()
        self._closed = False
        self._bar = None
        if _STATE.bars and _STATE.stream is not None:
            from tqdm import tqdm

            self._bar = tqdm(total=self.total, desc=desc, unit=f" {unit}", file=_STATE.stream, dynamic_ncols=True,
                             mininterval=0.5, smoothing=0.1, leave=True)

    def update(self, k: int = 1) -> None:
        with self._lock:
            self._set(self.n + k)

    def set(self, n: int) -> None:
        with self._lock:
            self._set(n)

    def note(self, text: str) -> None:
        with self._lock:
            self.text = text
            if self._bar is not None:
                self._bar.set_postfix_str(text, refresh=False)

    def _set(self, n: int) -> None:
        if self._closed:
            return
        n = max(0, min(int(n), self.total))
        now = time.monotonic()
        if self._bar is not None and n != self.n:
            self._bar.update(n - self.n)
        if self._moved is None and n > self.n:
            self._moved = (now, n)
        self.n = n
        since = now - self._last_line
        if n < self.total and (since >= max(self.line_seconds, STALL_SECONDS) or
                               (n != self._n_line and since >= self.line_seconds)):
            self._last_line, self._n_line = now, n
            self._line()

    def line(self, state: str = "") -> str:
        """The plain text of the bar: counts, percentage, rate, ETA or elapsed time, and the note."""
        now = time.monotonic()
        elapsed = now - self.start
        pct = f" ({100 * self.n / self.total:.0f}%)" if self.total else ""
        # Counted from the first advance, so a slow start (workers starting, a resumed count) does not skew it.
        t_moved, n_moved = self._moved or (self.start, 0)
        if self.n > n_moved and now > t_moved:
            rate = (self.n - n_moved) / (now - t_moved)
        else:
            rate = self.n / elapsed if state and elapsed > 0 else 0.0
        if state:
            when = f"{state} in {format_seconds(elapsed)}"
        elif rate > 0:
            when = f"ETA {format_seconds((self.total - self.n) / rate)}"
        else:
            when = f"{format_seconds(elapsed)} elapsed"
        speed = f"{rate:.2f} {self.unit}/s" if rate < 10 else f"{rate:.0f} {self.unit}/s"
        text = f"; {self.text}" if self.text else ""
        return f"{self.desc}: {self.n}/{self.total} {self.unit}{pct}, {speed}, {when}{text}"

    def _line(self, state: str = "") -> None:
        progress_log.info(self.line(state), extra={"progress_bar": self._bar is not None})

    def close(self, ok: bool = True) -> None:
        with self._lock:
            if self._closed:
                return
            self._closed = True
            if self._bar is not None:
                self._bar.close()
            self._line("done" if ok else "stopped")

    def __enter__(self) -> "Progress":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        self.close(ok=exc_type is None)


class ProgressBoard:
    """The body of a small Ray actor (zero CPUs): workers post ``(key, done, info)``; the driver
    polls :meth:`snapshot`. See :func:`start_board`, :func:`post` and :func:`follow_board`."""

    def __init__(self) -> None:
        self.state: dict[str, dict] = {}

    def post(self, key: str, done: int, info: Optional[dict] = None) -> None:
        self.state[key] = {"done": int(done), **(info or {})}

    def snapshot(self) -> dict[str, dict]:
        return self.state


def start_board():
    """A :class:`ProgressBoard` actor; needs Ray initialised."""
    import ray

    return ray.remote(num_cpus=0, max_restarts=0)(ProgressBoard).remote()


def post(board: Any, key: str, done: int, **info: Any) -> None:
    """From a worker: post progress to ``board`` (may be None), fire and forget. Never raises:
    progress must not fail training."""
    if board is None:
        return
    try:
        board.post.remote(key, done, info)
    except Exception:  # noqa: BLE001  (the board is gone: progress stops, training goes on)
        pass


@contextlib.contextmanager
def follow_board(board: Any, bar: Progress, describe: Callable[[dict[str, dict]], str],
                 every: float = 1.0) -> Iterator[None]:
    """Poll ``board`` in a thread every ``every`` seconds while the block runs: the bar's count is the
    sum of the posted ``done``, its note ``describe(snapshot)``. Kills the actor at the end."""
    import ray

    stop = threading.Event()

    def poll() -> None:
        try:
            snap = ray.get(board.snapshot.remote(), timeout=30)
        except Exception:  # noqa: BLE001  (a slow or dead board only delays the bar)
            return
        bar.set(sum(int(v.get("done", 0)) for v in snap.values()))
        bar.note(describe(snap))

    def loop() -> None:
        while not stop.wait(every):
            poll()

    thread = threading.Thread(target=loop, name="raysynth-progress", daemon=True)
    thread.start()
    try:
        yield
        poll()  # the last posts, before the final line
    finally:
        stop.set()
        thread.join(timeout=5)
        with contextlib.suppress(Exception):
            ray.kill(board)


# ---- errors ----------------------------------------------------------------------------------------

def one_line(exc: BaseException) -> str:
    """A one-line message for an exception: Ray's wrappers (a task's error, a Train worker's failure)
    are unwrapped to the error that caused them; the first non-empty line of its message."""
    seen = set()
    while id(exc) not in seen:
        seen.add(id(exc))
        inner = getattr(exc, "cause", None)  # ray.exceptions.RayTaskError
        failures = getattr(exc, "worker_failures", None)  # ray.train.WorkerGroupError
        inner = inner or getattr(exc, "controller_failure", None)  # ray.train.ControllerError
        if isinstance(failures, dict) and failures:
            inner = next(iter(failures.values()))
        if not isinstance(inner, BaseException):
            break
        exc = inner
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    text = lines[0] if lines else ""
    name = type(exc).__name__.split("(")[0]
    from raysynth.errors import RaysynthError  # user errors carry their own wording

    return text if isinstance(exc, RaysynthError) and text else f"{name}: {text}" if text else name


# ---- the console ----------------------------------------------------------------------------------

class _ConsoleHandler(logging.Handler):
    """Our records on the console's stdout; around tqdm bars through ``tqdm.write``. Progress lines
    are left out while a bar draws them."""

    def __init__(self, stream: TextIO, level: int) -> None:
        super().__init__(level)
        self.stream = stream
        self.setFormatter(logging.Formatter("%(asctime)s %(message)s", datefmt="%H:%M:%S"))

    def emit(self, record: logging.LogRecord) -> None:
        if getattr(record, "progress_bar", False):
            return
        try:
            msg = self.format(record)
            if _STATE.bars:
                from tqdm import tqdm

                tqdm.write(msg, file=self.stream)
            else:
                self.stream.write(msg + "\n")
                self.stream.flush()
        except Exception:  # noqa: BLE001
            self.handleError(record)


def _own_stream(stream: TextIO, fd: int) -> tuple[TextIO, bool]:
    """A stream onto what ``stream`` shows now: when it writes to descriptor ``fd`` (a real
    terminal, pipe or file), a new stream on a duplicate of it, so it survives redirecting ``fd``;
    otherwise (a test's capture, a notebook) the stream itself. Returns (stream, owned)."""
    try:
        if stream.fileno() == fd:
            return io.open(os.dup(fd), "w", buffering=1, encoding=getattr(stream, "encoding", None) or "utf-8",
                           errors="backslashreplace"), True
    except (AttributeError, OSError, ValueError, io.UnsupportedOperation):
        pass
    return stream, False


class Console:
    """Open around one command (``with Console(path, ...) as console``): see the module's docstring.

    ``console.stdout`` / ``console.stderr`` are where the command prints for a person;
    ``log_path`` is the file that holds Ray's output and the details."""

    def __init__(self, log_path: str | os.PathLike, *, verbose: bool = False, quiet: bool = False,
                 title: str = "") -> None:
        self.log_path = Path(log_path)
        self.verbose, self.quiet, self.title = verbose, quiet, title
        self.stdout: TextIO = sys.stdout
        self.stderr: TextIO = sys.stderr
        self._undo: list[Callable[[], None]] = []
        self.opened = False

    def __enter__(self) -> "Console":
        try:
            self._open()
        except BaseException:
            self._close()
            raise
        self.opened = True
        return self

    def _open(self) -> None:
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        log_file = open(self.log_path, "a", buffering=1, encoding="utf-8", errors="backslashreplace")
        self._undo.append(log_file.close)
        log_file.write(f"\n==== {time.strftime('%Y-%m-%d %H:%M:%S')} raysynth {self.title} (pid {os.getpid()})\n")
        self._log_file = log_file

        # 1. Where a person looks: the streams as they are now, kept on duplicate descriptors.
        for stream in (sys.stdout, sys.stderr):
            with contextlib.suppress(Exception):
                stream.flush()
        self.stdout, own_out = _own_stream(sys.stdout, 1)
        self.stderr, own_err = _own_stream(sys.stderr, 2)
        for owned, stream in ((own_out, self.stdout), (own_err, self.stderr)):
            if owned:
                self._undo.append(stream.close)
        old_state = (_STATE.stream, _STATE.bars)
        _STATE.stream = self.stdout
        _STATE.bars = bool(not self.quiet and not self.verbose and _isatty(self.stdout))
        self._undo.append(lambda: _set_state(*old_state))

        # 2. Our records: INFO (WARNING when quiet; DEBUG when verbose) on the console, all in the file.
        ours = logging.getLogger("raysynth")
        old_level = ours.level
        ours.setLevel(logging.DEBUG)
        console = _ConsoleHandler(self.stdout, logging.DEBUG if self.verbose else logging.WARNING if self.quiet
                                  else logging.INFO)
        to_file = logging.StreamHandler(log_file)
        to_file.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
        ours.addHandler(console)
        root = logging.getLogger()
        root.addHandler(to_file)  # ours propagate to it; other libraries' warnings too

        def undo_logging() -> None:
            ours.removeHandler(console)
            root.removeHandler(to_file)
            ours.setLevel(old_level)

        self._undo.append(undo_logging)
        if self.verbose:
            return

        # 3. Everything else written to this process's stdout and stderr: into the log file.
        for key, value in _RAY_QUIET_ENV.items():
            if key not in os.environ:
                os.environ[key] = value
                self._undo.append(lambda key=key: os.environ.pop(key, None))
        fd = os.open(self.log_path, os.O_WRONLY | os.O_APPEND | os.O_CREAT)
        try:
            for target in (1, 2):
                saved = os.dup(target)
                os.dup2(fd, target)
                self._undo.append(lambda target=target, saved=saved: (os.dup2(saved, target), os.close(saved)))
        finally:
            os.close(fd)
        old_out, old_err = sys.stdout, sys.stderr
        sys.stdout = sys.stderr = log_file

        def undo_streams() -> None:
            sys.stdout, sys.stderr = old_out, old_err

        self._undo.append(undo_streams)

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc is not None and not isinstance(exc, (KeyboardInterrupt, SystemExit)):
            self.record(exc)
        self._close()

    def record(self, exc: BaseException) -> None:
        """Write ``exc`` to the log: its line, and unless it is a user error (:class:`RaysynthError`,
        whose line says it all) its traceback, with the remote one a Ray error carries."""
        from raysynth.errors import RaysynthError

        with contextlib.suppress(Exception):
            trace = "" if isinstance(exc, RaysynthError) and not hasattr(exc, "cause") else \
                "".join(traceback.format_exception(type(exc), exc, exc.__traceback__))
            self._log_file.write("raysynth: error: " + one_line(exc) + "\n" + trace)
            self._log_file.flush()

    def _close(self) -> None:
        for stream in (sys.stdout, sys.stderr):
            with contextlib.suppress(Exception):
                stream.flush()
        while self._undo:
            with contextlib.suppress(Exception):
                self._undo.pop()()

    @property
    def details(self) -> str:
        """`` (details: OUT/logs/ray.log)``, for an error line; empty if the console never opened."""
        return f" (details: {self.log_path})" if self.opened else ""


def _set_state(stream: Optional[TextIO], bars: bool) -> None:
    _STATE.stream, _STATE.bars = stream, bars


def _isatty(stream: TextIO) -> bool:
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError):
        return False


__all__ = ["Console", "Progress", "ProgressBoard", "start_board", "post", "follow_board", "one_line",
           "format_seconds", "LOG_NAME", "LINE_SECONDS"]
