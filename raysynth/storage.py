"""Output roots on object storage: ``--out s3://bucket/run1`` (or ``gs://``, ``file://``, any URI
that ``pyarrow.fs.FileSystem.from_uri`` accepts).

Every stage reads and writes local files (Ray Train checkpoints, Ray Data shards, JSON, Parquet),
so a URI output runs in a local *staging folder* that mirrors the URI:

- **pull before each stage**: what the URI holds and the staging folder lacks (or holds in an
  older version) is copied down, so a rerun on a fresh machine resumes from the bucket;
- **push after each stage**, also after a stage that failed (stages resume from partial output,
  e.g. finished folds): new and changed files are copied up, files the stage deleted are deleted.

Both directions are incremental. ``<staging>.sync.json`` beside the staging folder records, per
file, the local (size, mtime) and the remote (size, mtime) at its last transfer. A pull copies a
file that is missing here, unrecorded, or changed in the URI since; a push copies one that is
missing there, unrecorded, or changed here since. Recorded mtimes are compared for equality, never
across machines, so clock skew between this host and the bucket is harmless; a file is re-copied
only when it changed (or its record was lost).

The staging folder is ``$RAYSYNTH_STAGING/<name>-<hash of the URI>`` (default
``~/.cache/raysynth/staging``). On a multi-node cluster it must be on storage every node sees
(cluster.yaml and k8s/rayjob.yaml put it on a shared mount): workers write checkpoints and shards
into it, and only the driver talks to the bucket. One run per URI at a time.

``logs/`` is not synchronised: it is the log of the machine that ran the command (each machine
appends to its own while the stages it runs push their artifacts), not an artifact. The console
names its path in the staging folder.
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import os
import re
import threading
import time
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional, TypeVar

from raysynth.errors import RaysynthError

log = logging.getLogger(__name__)

_URI = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*://")
# A file's signature: (size in bytes, mtime in ns; None where the filesystem reports none).
Signature = tuple[int, Optional[int]]
F = TypeVar("F", bound=Callable[..., Any])
# Filesystems without real folders: writing a key needs no parent, and create_dir would only add
# empty marker objects to the bucket.
_OBJECT_STORES = frozenset({"s3", "gcs", "abfs"})
# Top-level folders of the output that stay on the machine that wrote them (see the module docstring).
LOCAL_ONLY = ("logs/",)


def _synced(rel: str) -> bool:
    return not rel.startswith(LOCAL_ONLY)


class StorageError(RaysynthError, OSError):
    """The output URI cannot be reached, or a transfer to or from it failed."""


def is_uri(out: str | os.PathLike) -> bool:
    """True for ``scheme://...`` (s3, gs, file, hdfs, ...); plain paths, ``~`` and ``C:\\`` are not URIs."""
    return bool(_URI.match(str(out)))


def staging_dir(uri: str) -> Path:
    """The local folder that mirrors ``uri``: stable for a URI, distinct between URIs."""
    base = os.environ.get("RAYSYNTH_STAGING") or Path.home() / ".cache" / "raysynth" / "staging"
    name = re.sub(r"[^A-Za-z0-9_.-]+", "_", uri.split("?")[0].rstrip("/").rsplit("/", 1)[-1])[:40] or "root"
    digest = hashlib.sha256(uri.rstrip("/").encode()).hexdigest()[:12]
    return Path(base).expanduser().resolve() / f"{name}-{digest}"


@dataclass
class SyncStats:
    """What one push or pull did."""

    copied: int = 0
    bytes: int = 0
    unchanged: int = 0
    deleted: int = 0


class RemoteOutput:
    """A staging folder and the URI it mirrors; ``pull()`` and ``push()`` synchronise them."""

    def __init__(self, uri: str, staging: Path, *, timeout: float | None = None) -> None:
        import pyarrow
        import pyarrow.fs as pafs

        self.uri, self.staging = uri, Path(staging)
        self.state_path = self.staging.with_name(self.staging.name + ".sync.json")
        timeout = float(os.environ.get("RAYSYNTH_STORAGE_TIMEOUT", 120)) if timeout is None else timeout
        try:
            self.fs, path = pafs.FileSystem.from_uri(uri)
            self.base = path.rstrip("/")
            info = _within(timeout, lambda: self.fs.get_file_info(self.base), uri)
        except (OSError, ValueError, pyarrow.ArrowException) as exc:
            if isinstance(exc, StorageError):
                raise
            raise StorageError(f"output {uri}: cannot reach its filesystem: {_one_line(exc)} "
                               "(check the URI, the network and the credentials, e.g. AWS_* or an instance role "
                               "for s3://, GOOGLE_APPLICATION_CREDENTIALS for gs://)") from None
        if info.type == pafs.FileType.File:
            raise StorageError(f"output {uri}: is a file, not a folder")
        self.local = pafs.LocalFileSystem()

    def __repr__(self) -> str:
        return f"RemoteOutput({self.uri!r}, staging={str(self.staging)!r})"

    # listing
    def _remote_files(self) -> dict[str, Signature]:
        import pyarrow.fs as pafs

        try:
            infos = self.fs.get_file_info(pafs.FileSelector(self.base, recursive=True, allow_not_found=True))
        except OSError as exc:
            raise StorageError(f"output {self.uri}: cannot list it: {_one_line(exc)}") from None
        out: dict[str, Signature] = {}
        for info in infos:
            if info.type == pafs.FileType.File:
                rel = info.path[len(self.base):].lstrip("/")
                if _synced(rel):
                    out[rel] = (int(info.size), info.mtime_ns)
        return out

    def _local_files(self) -> dict[str, Signature]:
        out: dict[str, Signature] = {}
        if not self.staging.is_dir():
            return out
        for dirpath, _, names in os.walk(self.staging):
            for name in names:
                if name.startswith(".") and name.endswith(".pull"):  # an interrupted pull's leftover
                    continue
                path = Path(dirpath) / name
                try:
                    st = path.stat()
                except FileNotFoundError:  # a dangling link
                    continue
                rel = path.relative_to(self.staging).as_posix()
                if _synced(rel):
                    out[rel] = (st.st_size, st.st_mtime_ns)
        return out

    def _load_state(self) -> dict[str, dict[str, list]]:
        try:
            return json.loads(self.state_path.read_text())["files"]
        except (OSError, ValueError, KeyError):
            return {}

    def _save_state(self, state: dict[str, dict[str, list]]) -> None:
        """Atomically (temporary file, then rename); one line per file, since runs hold thousands."""
        lines = ",\n".join(f"  {json.dumps(rel)}: {json.dumps(rec)}" for rel, rec in sorted(state.items()))
        tmp = self.state_path.with_name(f".{self.state_path.name}.tmp")
        tmp.write_text(f'{{"uri": {json.dumps(self.uri)}, "files": {{\n{lines}\n}}}}\n')
        tmp.replace(self.state_path)

    # transfers
    def pull(self) -> SyncStats:
        """Copy down what is new or changed in the URI since the last sync (the URI wins over a
        local change); delete local files the URI no longer has, unless they changed locally."""
        t0 = time.time()
        remote, local, state = self._remote_files(), self._local_files(), self._load_state()
        todo = [rel for rel, sig in remote.items() if _needs_pull(state.get(rel), local.get(rel), sig)]
        stats = SyncStats(unchanged=len(remote) - len(todo))
        self.staging.mkdir(parents=True, exist_ok=True)
        for rel in [rel for rel in state if rel not in remote]:
            if rel in local and _sig(state[rel]["local"]) == local[rel]:
                (self.staging / rel).unlink()
                stats.deleted += 1
            elif rel in local:
                log.warning("storage: %s was deleted from %s but changed here since; keeping it", rel, self.uri)
            del state[rel]
        self._transfer("pull", todo, remote, stats=stats, state=state)
        self._save_state(state)
        log.info("storage: pulled %s from %s into %s (%d unchanged, %d deleted) in %.1fs",
                 _count(stats), self.uri, self.staging, stats.unchanged, stats.deleted, time.time() - t0)
        return stats

    def push(self) -> SyncStats:
        """Copy up what is new or changed in the staging folder since the last sync; delete from
        the URI the files deleted here (only files this folder had synced, and only if the URI
        still holds the version it synced)."""
        t0 = time.time()
        local, remote, state = self._local_files(), self._remote_files(), self._load_state()
        todo = [rel for rel, sig in local.items() if _needs_push(state.get(rel), sig, remote.get(rel))]
        stats = SyncStats(unchanged=len(local) - len(todo))
        for rel in [rel for rel in state if rel not in local]:
            if rel in remote and _sig(state[rel]["remote"]) == remote[rel]:
                try:
                    self.fs.delete_file(f"{self.base}/{rel}")
                except OSError as exc:
                    raise StorageError(f"output {self.uri}: cannot delete {rel}: {_one_line(exc)}") from None
                stats.deleted += 1
            del state[rel]
        self._transfer("push", todo, local, stats=stats, state=state)
        self._save_state(state)
        log.info("storage: pushed %s from %s to %s (%d unchanged, %d deleted) in %.1fs",
                 _count(stats), self.staging, self.uri, stats.unchanged, stats.deleted, time.time() - t0)
        return stats

    def _transfer(self, verb: str, rels: list[str], sigs: dict[str, Signature], *, stats: SyncStats,
                  state: dict[str, dict[str, list]]) -> None:
        """``verb`` "pull" or "push": copy ``rels`` (in threads; progress every 10 s), then record
        both sides' signatures."""
        if not rels:
            return
        download = verb == "pull"
        total = sum(sigs[rel][0] for rel in rels)
        log.info("storage: %sing %d files (%s) %s %s", verb, len(rels), _size(total),
                 "from" if download else "to", self.uri)
        if not download and self.fs.type_name not in _OBJECT_STORES:  # folders exist only on real filesystems
            for parent in sorted({rel.rpartition("/")[0] for rel in rels} - {""}):
                try:
                    self.fs.create_dir(f"{self.base}/{parent}", recursive=True)
                except OSError as exc:
                    raise StorageError(f"output {self.uri}: cannot create {parent}: {_one_line(exc)}") from None
        last = time.time()
        with ThreadPoolExecutor(max_workers=min(8, len(rels))) as pool:
            futures = {pool.submit(self._copy_one, rel, download): rel for rel in rels}
            for future in as_completed(futures):
                try:
                    future.result()
                except OSError as exc:
                    for f in futures:
                        f.cancel()
                    raise StorageError(f"output {self.uri}: {verb} of {futures[future]} failed: "
                                       f"{_one_line(exc)}") from None
                stats.copied += 1
                stats.bytes += sigs[futures[future]][0]
                if time.time() - last > 10:
                    last = time.time()
                    log.info("storage: %sed %d/%d files (%s of %s)", verb, stats.copied, len(rels),
                             _size(stats.bytes), _size(total))
        remote = sigs if download else self._remote_files()  # an upload's remote mtime is known only now
        for rel in rels:
            st = (self.staging / rel).stat()
            if rel in remote:
                state[rel] = {"local": [st.st_size, st.st_mtime_ns], "remote": list(remote[rel])}

    def _copy_one(self, rel: str, download: bool) -> None:
        import pyarrow.fs as pafs

        local, remote = self.staging / rel, f"{self.base}/{rel}"
        if download:  # to a temporary name first: an interrupted pull never leaves half a file
            local.parent.mkdir(parents=True, exist_ok=True)
            tmp = local.with_name(f".{local.name}.pull")
            pafs.copy_files(remote, str(tmp), source_filesystem=self.fs, destination_filesystem=self.local,
                            use_threads=False)
            tmp.replace(local)
        else:
            pafs.copy_files(str(local), remote, source_filesystem=self.local, destination_filesystem=self.fs,
                            use_threads=False)


@functools.lru_cache(maxsize=None)
def remote_output(uri: str, staging: str) -> RemoteOutput:
    """One ``RemoteOutput`` per (URI, staging folder) and process: the filesystem is resolved
    and checked once, not before every stage."""
    return RemoteOutput(uri, Path(staging))


def syncs_output(run: F) -> F:
    """Decorate the stage runner ``run(name, cfg, layout, ...)``: when ``layout.remote`` is a URI,
    pull before the stage and push after it (also after a failure, so that its finished part is
    kept). Local outputs pass straight through."""

    @functools.wraps(run)
    def wrapper(name: str, cfg: Any, layout: Any, *args: Any, **kwargs: Any) -> Any:
        uri = getattr(layout, "remote", None)
        if not uri:
            return run(name, cfg, layout, *args, **kwargs)
        remote = remote_output(uri, str(layout.root))
        remote.pull()
        try:
            result = run(name, cfg, layout, *args, **kwargs)
        except Exception:
            log.warning("storage: stage %s failed; pushing its partial output to %s so that a rerun resumes", name, uri)
            try:
                remote.push()
            except StorageError as exc:
                log.error("storage: %s", exc)
            raise
        remote.push()
        return result

    return wrapper  # type: ignore[return-value]


def _needs_pull(record: Optional[dict[str, list]], local: Optional[Signature], remote: Signature) -> bool:
    """No local copy, no record of the last transfer, or the remote file changed since it."""
    return local is None or record is None or _sig(record["remote"]) != remote


def _needs_push(record: Optional[dict[str, list]], local: Signature, remote: Optional[Signature]) -> bool:
    """No remote copy, no record of the last transfer, or the local file changed since it."""
    return remote is None or record is None or _sig(record["local"]) != local


def _sig(value: list) -> Signature:
    return (int(value[0]), None if value[1] is None else int(value[1]))


def _within(seconds: float, fn: Callable[[], Any], uri: str) -> Any:
    """Run ``fn`` in a daemon thread and give up after ``seconds``: some filesystems retry for
    many minutes before they report missing credentials."""
    box: dict[str, Any] = {}

    def target() -> None:
        try:
            box["value"] = fn()
        except BaseException as exc:  # noqa: BLE001 - re-raised in the caller's thread
            box["error"] = exc

    thread = threading.Thread(target=target, daemon=True, name="raysynth-storage-probe")
    thread.start()
    thread.join(seconds)
    if thread.is_alive():
        raise StorageError(f"output {uri}: no answer from its filesystem within {seconds:.0f}s (check the network "
                           "and the credentials; RAYSYNTH_STORAGE_TIMEOUT sets the wait)")
    if "error" in box:
        raise box["error"]
    return box["value"]


def _one_line(exc: BaseException) -> str:
    return " ".join(str(exc).split())[:300] or type(exc).__name__


def _size(n: int) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1024 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n} B"  # pragma: no cover


def _count(stats: SyncStats) -> str:
    return f"{stats.copied} file{'s' if stats.copied != 1 else ''} ({_size(stats.bytes)})"
