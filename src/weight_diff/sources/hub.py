"""Hub repositories as inputs: resolve a repo id to its files, download them into huggingface_hub's cache and
check each against the SHA-256 the hub publishes (a diff read while it downloads: ``hub_diff.py``).

The client (``huggingface_hub``) only compares sizes, resumes only within one call and leaves a partial file after
a kill. So the bytes are fetched here, with huggingface_hub's session, token, endpoint, error types and cache
layout (``blobs/<sha>``, ``snapshots/<commit>/<path>``, ``refs/<revision>``): each file is hashed as it streams
into ``blobs/<sha>.weight-diff-partial``, a dropped connection continues with a Range request, a later run
continues the partial file, and only a file whose hash matches is renamed into place.

>>> directory = input_dir("huggyllama/llama-13b")          # downloaded and checked, or a local path as is
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import importlib
import json
import os
import queue
import re
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from ..checkpoint import (
    BIN_INDEX,
    SAFETENSORS_INDEX,
    WEIGHT_SUFFIXES,
    find_weight_files,
)
from ..container import SUFFIX
from ..errors import CheckpointError, IntegrityError, Interrupted, WeightDiffError, first_line
from ..files import read_json_object
from ..manifest import Manifest, file_digest
from .repo_spec import RepoSpec, hub_spec_for

PARTIAL_SUFFIX = ".weight-diff-partial"
OWN_DIR = "weight-diff"  # inside the repo's cache folder: file listings per commit, stamps of checked blobs
CHUNK = 4 * 2**20
RETRIES_WITHOUT_PROGRESS = 5
MAX_RETRIES = 50
COMMIT = re.compile(r"^[0-9a-f]{40}$")
SMALL_FILE = 100 * 10**6  # larger files that are not weights (XOR payloads, GGUF) are fetched only when needed


class HubError(WeightDiffError):
    """The hub refused or lacks what was asked for (repository, revision, file), or cannot be reached."""


class Transfer(Protocol):
    """Where download progress goes: ``expect`` once per file about to be fetched, ``downloaded`` per chunk."""

    def expect(self, nbytes: int) -> None: ...

    def downloaded(self, nbytes: int) -> None: ...


class NoTransfer:
    def expect(self, nbytes: int) -> None:
        pass

    def downloaded(self, nbytes: int) -> None:
        pass


@dataclass(frozen=True)
class HubSettings:
    """huggingface_hub's settings, read from the environment when a run starts (not when the module loaded)."""

    endpoint: str
    cache: Path
    offline: bool
    token: str | None

    @classmethod
    def from_env(cls) -> HubSettings:
        from huggingface_hub import constants, get_token

        home = os.environ.get("HF_HOME")
        cache = os.environ.get("HF_HUB_CACHE") or (str(Path(home) / "hub") if home else constants.HF_HUB_CACHE)
        offline = os.environ.get("HF_HUB_OFFLINE", "").upper() in {"1", "ON", "YES", "TRUE"}
        return cls(
            endpoint=(os.environ.get("HF_ENDPOINT") or constants.ENDPOINT).rstrip("/"),
            cache=Path(cache).expanduser(),
            offline=offline or constants.HF_HUB_OFFLINE,
            token=get_token(),
        )


@dataclass(frozen=True)
class RemoteFile:
    """One file of a repository at a commit, with the checksum the hub publishes for it."""

    path: str
    size: int
    sha256: str | None  # LFS files: the SHA-256 of the content
    git_sha1: str  # every file: the git blob id (sha1 of "blob <size>\0" + content)

    @property
    def blob_name(self) -> str:
        """The name huggingface_hub gives the file in ``blobs/``: its ETag, the sha256 for LFS files."""
        return self.sha256 or self.git_sha1

    def new_hash(self) -> hashlib._Hash:
        if self.sha256:
            return hashlib.sha256()
        hasher = hashlib.sha1()
        hasher.update(b"blob %d\0" % self.size)
        return hasher

    @property
    def expected(self) -> str:
        return self.blob_name


@dataclass(frozen=True)
class Snapshot:
    """A repository resolved to one commit: its files and where the cache keeps them."""

    spec: RepoSpec
    commit: str
    files: dict[str, RemoteFile]
    repo_dir: Path  # <cache>/models--org--name
    settings: HubSettings

    @property
    def directory(self) -> Path:
        return self.repo_dir / "snapshots" / self.commit

    @property
    def origin(self) -> str:
        return f"hf://{self.spec.repo_id}@{self.commit}"

    def local(self, file: RemoteFile) -> Path:
        return self.directory / file.path


def repo_cache_dir(settings: HubSettings, repo_id: str) -> Path:
    return settings.cache / ("models--" + repo_id.replace("/", "--"))


def resolve(spec: RepoSpec, settings: HubSettings | None = None) -> Snapshot:
    """Return the repository at its revision: online from ``model_info(files_metadata=True)``, offline from what an
    earlier run left in the cache."""
    settings = settings or HubSettings.from_env()
    repo_dir = repo_cache_dir(settings, spec.repo_id)
    if settings.offline:
        return _resolve_offline(spec, settings, repo_dir)
    known = _resolved.get((spec, settings))
    if known is not None and time.monotonic() - known[0] < RESOLVED_FOR:
        return known[1]
    info = _model_info(spec, settings)
    files = {}
    for sibling in info.siblings or []:
        if sibling.size is None or sibling.blob_id is None:
            raise HubError(f"{spec}: the hub published no size or checksum for {sibling.rfilename}; cannot check it")
        files[sibling.rfilename] = RemoteFile(
            path=sibling.rfilename,
            size=sibling.size,
            sha256=sibling.lfs.sha256 if sibling.lfs else None,
            git_sha1=sibling.blob_id,
        )
    snapshot = Snapshot(spec, info.sha, files, repo_dir, settings)
    listing = {"repo_id": spec.repo_id, "commit": info.sha, "files": [vars(f) for f in files.values()]}
    _write_atomic(repo_dir / OWN_DIR / f"{info.sha}.json", json.dumps(listing).encode())
    if spec.revision != info.sha:
        _write_atomic(repo_dir / "refs" / spec.revision, info.sha.encode())
    snapshot.directory.mkdir(parents=True, exist_ok=True)
    _resolved[(spec, settings)] = (time.monotonic(), snapshot)
    return snapshot


# One run asks for a repository more than once (where its files go, then its files): ask the hub once.
RESOLVED_FOR = 60.0
_resolved: dict[tuple[RepoSpec, HubSettings], tuple[float, Snapshot]] = {}


def _http_errors(kind: str) -> tuple[type[BaseException], ...]:
    """Return the HTTP client's exception class ``kind`` (huggingface_hub 2.x uses httpx2, 1.x httpx)."""
    found = []
    for module in ("httpx2", "httpx"):
        with contextlib.suppress(ImportError):
            found.append(getattr(importlib.import_module(module), kind))
    return tuple(found)


def _model_info(spec: RepoSpec, settings: HubSettings):
    from huggingface_hub import HfApi
    from huggingface_hub.errors import (
        GatedRepoError,
        HfHubHTTPError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    api = HfApi(endpoint=settings.endpoint, token=settings.token)
    try:
        return api.model_info(spec.repo_id, revision=spec.revision, files_metadata=True)
    except GatedRepoError:
        raise HubError(
            f"{spec}: a gated repository; accept its conditions at {settings.endpoint}/{spec.repo_id} and set "
            "HF_TOKEN (or run `hf auth login`)"
        ) from None
    except RevisionNotFoundError:
        raise HubError(
            f"{spec}: the hub has no revision {spec.revision!r} of {spec.repo_id}; check the branch, tag or commit"
        ) from None
    except RepositoryNotFoundError:
        raise HubError(
            f"{spec}: no such local directory, and no repository {spec.repo_id} on {settings.endpoint} (if it is "
            "private, set HF_TOKEN)"
        ) from None
    except HfHubHTTPError as exc:
        raise HubError(f"{spec}: the hub refused ({first_line(exc)})") from None
    except (*_http_errors("HTTPError"), OSError) as exc:
        raise HubError(
            f"{spec}: no such local directory, and cannot reach {settings.endpoint} to look for that repository "
            f"({first_line(exc)}); check the path or the network, or set HF_HUB_OFFLINE=1 to use the cache"
        ) from None


def _resolve_offline(spec: RepoSpec, settings: HubSettings, repo_dir: Path) -> Snapshot:
    commit = spec.revision
    if not COMMIT.match(commit):
        with contextlib.suppress(OSError):
            commit = (repo_dir / "refs" / spec.revision).read_text().strip()
    listing = read_json_object(repo_dir / OWN_DIR / f"{commit}.json")  # {} when absent or damaged
    if "files" not in listing:
        raise HubError(
            f"{spec}: no such local directory, and that repository is not in the cache ({settings.cache}) with "
            "HF_HUB_OFFLINE set; check the path, or run once online first"
        )
    files = {entry["path"]: RemoteFile(**entry) for entry in listing["files"]}
    return Snapshot(spec, commit, files, repo_dir, settings)


# ---------------------------------------------------------------------------------------------------------------
# Downloading one file


def fetch(
    snapshot: Snapshot,
    file: RemoteFile,
    transfer: Transfer | None = None,
    stop: threading.Event | None = None,
    *,
    durable: bool = True,
    arrived: Callable[[int], None] | None = None,
) -> Path:
    """Return the file's path in the snapshot once its bytes match the hub's checksum, downloading what is missing.

    A blob this tool already checked is used as is; one left by another client is hashed first. A mismatch deletes
    the bad copy and raises, naming the file. ``durable=False`` skips the fsync of a file that will be deleted once
    read (--no-keep-download): its pages may then never reach the disk at all. ``arrived(n)`` hears, from another
    thread, that the first n bytes are in ``partial_path`` (not yet checked: what is made from them must be held
    back until this returns).
    """
    transfer = transfer or NoTransfer()
    blobs = snapshot.repo_dir / "blobs"
    blob = blobs / file.blob_name
    link = snapshot.local(file)
    if blob.is_file():
        if not _stamped(snapshot, file, blob):
            _check_digest(snapshot, file, blob, file_digest(blob, file.new_hash()))
            _stamp(snapshot, file, blob)
        _link(blob, link)
        return link
    _refuse_offline(snapshot, file)
    blobs.mkdir(parents=True, exist_ok=True)
    partial = partial_path(snapshot, file)
    with open(partial, "ab+") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            raise HubError(
                f"{partial}: another process is downloading this file; wait for it, or stop it first"
            ) from None
        if blob.is_file():  # the other process finished while we waited
            return fetch(snapshot, file, transfer, stop, durable=durable, arrived=arrived)
        sink = _Sink(file, handle, arrived)
        try:
            transfer.expect(file.size)
            transfer.downloaded(sink.size)
            _download_into(snapshot, file, sink, transfer, stop)
            digest = sink.finish()
        finally:
            sink.close()
        if durable:
            os.fsync(handle.fileno())
        _check_digest(snapshot, file, partial, digest)
        os.chmod(partial, 0o644)
        os.replace(partial, blob)
    _stamp(snapshot, file, blob)
    _link(blob, link)
    return link


class DownloadThread:
    """The thread that downloads a reader's files ahead of it, and what both sides share: the lock they wait on, the
    stop flag, each file's ``ready`` event, a download's ``failure``, and the files on disk the reader has not
    finished with (``held``; without keep, two at most)."""

    def __init__(self, loop: Callable[[], None], names) -> None:
        self.lock = threading.Condition()
        self.stop = threading.Event()
        self.held: set = set()
        self.ready = {name: threading.Event() for name in names}
        self.failure: BaseException | None = None
        self._thread = threading.Thread(target=loop, name="weight-diff-download", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def wait_ready(self, name, doing: str = "waiting for a download") -> None:
        """Return once the file is ready, or a download failed (``failure``); raise Interrupted once stopped."""
        while not self.ready[name].wait(0.2):
            if self.stop.is_set():
                raise Interrupted(f"interrupted while {doing}")

    def failed(self, exc: BaseException) -> None:
        """Hand a download's failure to every reader waiting: each raises it where its file is not here."""
        self.failure = exc
        for event in self.ready.values():
            event.set()

    def release(self, name) -> None:
        """The reader is done with a file: the next one may download."""
        with self.lock:
            self.held.discard(name)
            self.lock.notify_all()

    def interrupt(self) -> None:
        """Stop downloading (a partial file is kept for the next run) and wake any reader waiting for one."""
        self.stop.set()
        with self.lock:
            self.lock.notify_all()

    def close(self) -> None:
        self.interrupt()
        if self._thread.is_alive():  # it stops at its next chunk; a stalled connection is left to its timeout
            self._thread.join(timeout=5)


def _refuse_offline(snapshot: Snapshot, file: RemoteFile, why: str = "") -> None:
    """Say so, before any request, when a file not in the cache would have to come from the hub while offline."""
    if snapshot.settings.offline:
        raise HubError(
            f"{snapshot.spec}: {file.path} is not in the cache ({snapshot.repo_dir}){why} and HF_HUB_OFFLINE is "
            "set; run once online first"
        )


def partial_path(snapshot: Snapshot, file: RemoteFile) -> Path:
    """Where a file's bytes arrive before they are checked and renamed into ``blobs/``."""
    return snapshot.repo_dir / "blobs" / (file.blob_name + PARTIAL_SUFFIX)


class _Sink:
    """A partial file and its running hash, fed on a thread of their own: the receiving thread only parses HTTP,
    while writing and hashing (both release the GIL) run beside it on another core."""

    def __init__(self, file: RemoteFile, handle, arrived: Callable[[int], None] | None = None) -> None:
        self.file, self.handle, self._arrived = file, handle, arrived
        self.hasher, self.size = _continue_partial(file, handle)  # size: bytes received so far
        self._written = self.size  # bytes in the file (the drain thread's count)
        self._queue: queue.Queue = queue.Queue(maxsize=64)
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._drain, name="weight-diff-sink", daemon=True)
        self._thread.start()

    def _drain(self) -> None:
        while (item := self._queue.get()) is not None:
            if isinstance(item, threading.Event):
                item.set()
            elif self._error is None:
                try:
                    self.handle.write(item)
                    self.hasher.update(item)
                    self._written += len(item)
                    if self._arrived is not None:
                        self.handle.flush()  # to the kernel: readable by pread from here on
                        self._arrived(self._written)
                except BaseException as exc:  # disk full: raised on the receiving thread's next put
                    self._error = exc

    def put(self, chunk: bytes) -> None:
        if self._error is not None:
            raise self._error
        self._queue.put(chunk)
        self.size += len(chunk)

    def _flush(self) -> None:
        done = threading.Event()
        self._queue.put(done)
        done.wait()
        if self._error is not None:
            raise self._error
        self.handle.flush()

    def restart(self) -> None:
        """Start the file over (a server that ignored Range sent it whole)."""
        self._flush()
        self.handle.truncate(0)
        self.handle.seek(0)
        self.hasher, self.size, self._written = self.file.new_hash(), 0, 0

    def finish(self) -> str:
        """Return the hash of every byte, once all are written."""
        self._flush()
        return self.hasher.hexdigest()

    def close(self) -> None:
        """Write what was received (a later run continues from there) and stop the thread."""
        self._queue.put(None)
        self._thread.join()
        with contextlib.suppress(OSError):
            self.handle.flush()


def _continue_partial(file: RemoteFile, handle) -> tuple[hashlib._Hash, int]:
    """Return the hash of what an interrupted download left, and its length (0 when it cannot be continued)."""
    hasher = file.new_hash()
    size = os.fstat(handle.fileno()).st_size
    if size > file.size:
        handle.truncate(0)
        size = 0
    handle.seek(0)
    left = size
    while left:
        chunk = handle.read(min(CHUNK, left))
        if not chunk:
            break
        hasher.update(chunk)
        left -= len(chunk)
    handle.seek(size)
    return hasher, size


def _download_into(snapshot: Snapshot, file: RemoteFile, sink: _Sink, transfer: Transfer, stop) -> None:
    """Append the file's missing bytes; a dropped connection is retried from where it stopped, with Range."""
    from huggingface_hub import get_session, hf_hub_url
    from huggingface_hub.utils import build_hf_headers

    url = hf_hub_url(snapshot.spec.repo_id, file.path, revision=snapshot.commit, endpoint=snapshot.settings.endpoint)
    base_headers = build_hf_headers(token=snapshot.settings.token)
    base_headers["Accept-Encoding"] = "identity"
    failures, attempts = 0, 0
    while sink.size < file.size:
        if stop is not None and stop.is_set():
            raise Interrupted("interrupted; the partial download was kept. Run the same command with --resume")
        headers = dict(base_headers)
        if sink.size:
            headers["Range"] = f"bytes={sink.size}-"
        before = sink.size
        try:
            with get_session().stream("GET", url, headers=headers, follow_redirects=True, timeout=30) as response:
                _raise_for_status(snapshot, file, response)
                if sink.size and response.status_code == 200:  # the server ignored Range: start over
                    sink.restart()
                for chunk in response.iter_bytes():  # as received: a drop loses nothing already here
                    if stop is not None and stop.is_set():
                        raise Interrupted(
                            "interrupted; the partial download was kept. Run the same command with --resume"
                        )
                    if sink.size + len(chunk) > file.size:
                        raise IntegrityError(
                            f"{snapshot.spec}: {file.path}: the hub sent more than its {file.size} bytes; run again"
                        )
                    sink.put(chunk)
                    transfer.downloaded(len(chunk))
        except _http_errors("TransportError") as exc:
            attempts += 1
            failures = 0 if sink.size > before else failures + 1
            if failures > RETRIES_WITHOUT_PROGRESS or attempts > MAX_RETRIES:
                raise HubError(
                    f"{snapshot.spec}: downloading {file.path} failed {attempts} times ({first_line(exc)}); "
                    f"{sink.size} of {file.size} bytes were kept: the same command continues the download (add "
                    "--resume if output shards were written)"
                ) from None
            time.sleep(min(0.2 * 2**failures, 5.0))
            continue
        if sink.size < file.size and sink.size == before:
            raise HubError(f"{snapshot.spec}: {file.path}: the hub sent no data; run the same command again")


def _raise_for_status(snapshot: Snapshot, file: RemoteFile, response) -> None:
    if response.status_code < 400:
        return
    from huggingface_hub.errors import EntryNotFoundError, GatedRepoError, HfHubHTTPError, RepositoryNotFoundError
    from huggingface_hub.utils import hf_raise_for_status

    response.read()
    try:
        hf_raise_for_status(response)
    except GatedRepoError:
        raise HubError(
            f"{snapshot.spec}: a gated repository; accept its conditions at {snapshot.settings.endpoint}/"
            f"{snapshot.spec.repo_id} and set HF_TOKEN (or run `hf auth login`)"
        ) from None
    except EntryNotFoundError:
        raise HubError(f"{snapshot.spec}: the hub has no file {file.path} at {snapshot.commit[:12]}") from None
    except RepositoryNotFoundError:
        raise HubError(f"{snapshot.spec}: the repository is gone from the hub or not visible with your token") from None
    except HfHubHTTPError as exc:
        raise HubError(f"{snapshot.spec}: downloading {file.path}: {first_line(exc)}") from None


def _check_digest(snapshot: Snapshot, file: RemoteFile, path: Path, actual: str) -> None:
    if actual == file.expected:
        return
    path.unlink(missing_ok=True)
    snapshot.local(file).unlink(missing_ok=True)
    kind = "SHA-256" if file.sha256 else "git blob id"
    raise IntegrityError(
        f"{snapshot.spec}: {file.path} does not match the hub's {kind} (got {actual[:16]}..., the hub publishes "
        f"{file.expected[:16]}...); the bad copy was deleted: run the same command again"
    )


def _stamp_path(snapshot: Snapshot, file: RemoteFile) -> Path:
    return snapshot.repo_dir / OWN_DIR / "checked" / file.blob_name


def _stamped(snapshot: Snapshot, file: RemoteFile, blob: Path) -> bool:
    """True when this tool checked the blob and it has not changed since (size and mtime)."""
    try:
        recorded = _stamp_path(snapshot, file).read_text().split()
        stat = blob.stat()
    except OSError:
        return False
    return recorded == [str(stat.st_size), str(stat.st_mtime_ns)] and stat.st_size == file.size


def _stamp(snapshot: Snapshot, file: RemoteFile, blob: Path) -> None:
    stat = blob.stat()
    _write_atomic(_stamp_path(snapshot, file), f"{stat.st_size} {stat.st_mtime_ns}".encode())


def _link(blob: Path, link: Path) -> None:
    link.parent.mkdir(parents=True, exist_ok=True)
    target = os.path.relpath(blob, link.parent)
    if link.is_symlink() and os.readlink(link) == target:
        return
    temporary = link.with_name(link.name + PARTIAL_SUFFIX)
    temporary.unlink(missing_ok=True)
    os.symlink(target, temporary)
    os.replace(temporary, link)


def _write_atomic(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(f"{path.name}.{os.getpid()}.{threading.get_ident()}.tmp")
    temporary.write_bytes(data)
    os.replace(temporary, path)


def cached_and_checked(snapshot: Snapshot, file: RemoteFile) -> bool:
    """True when an earlier run downloaded and checked the file (it is then linked into the snapshot)."""
    blob = snapshot.repo_dir / "blobs" / file.blob_name
    if blob.is_file() and _stamped(snapshot, file, blob):
        _link(blob, snapshot.local(file))
        return True
    return False


def forget(snapshot: Snapshot, file: RemoteFile) -> None:
    """Delete a downloaded file from the cache (``--no-keep-download``): blob, link and stamp."""
    (snapshot.repo_dir / "blobs" / file.blob_name).unlink(missing_ok=True)
    snapshot.local(file).unlink(missing_ok=True)
    _stamp_path(snapshot, file).unlink(missing_ok=True)


def fetch_range(snapshot: Snapshot, file: RemoteFile, start: int, stop: int) -> bytes:
    """Return bytes ``start:stop`` of a remote file (a safetensors header), with one ranged GET."""
    from huggingface_hub import get_session, hf_hub_url
    from huggingface_hub.utils import build_hf_headers

    _refuse_offline(snapshot, file, " (`inspect --no-hash` reads its index from the hub, keeping nothing; `inspect` "
                    "without it, or `recover`, downloads it)")  # fmt: skip
    url = hf_hub_url(snapshot.spec.repo_id, file.path, revision=snapshot.commit, endpoint=snapshot.settings.endpoint)
    headers = build_hf_headers(token=snapshot.settings.token)
    headers.update({"Range": f"bytes={start}-{stop - 1}", "Accept-Encoding": "identity"})
    for attempt in range(RETRIES_WITHOUT_PROGRESS + 1):
        try:
            response = get_session().get(url, headers=headers, follow_redirects=True, timeout=30)
            _raise_for_status(snapshot, file, response)
            if response.status_code == 206 and len(response.content) == stop - start:
                return response.content
            if response.status_code == 200 and len(response.content) >= stop:  # Range ignored
                return response.content[start:stop]
            raise HubError(f"{snapshot.spec}: {file.path}: the hub answered a ranged read with the wrong bytes")
        except _http_errors("TransportError") as exc:
            if attempt == RETRIES_WITHOUT_PROGRESS:
                raise HubError(
                    f"{snapshot.spec}: reading {file.path}'s header failed ({first_line(exc)}); check the network, "
                    "then run the same command again"
                ) from None
            time.sleep(0.2 * 2**attempt)
    raise AssertionError("unreachable")


# ---------------------------------------------------------------------------------------------------------------
# Inputs: a whole repository as a directory, or a diff read while it downloads


def input_dir(
    path: str | os.PathLike, transfer: Transfer | None = None, *, weights: bool = True, every_file: bool = False
) -> Path:
    """Return a local directory for an input argument: the path itself, or the hub repository it names downloaded
    into the cache and checked: its top-level small files and the weights of the one layout that is read
    (safetensors before ``.bin``, as for a local directory); no weights when ``weights`` is False; every
    top-level file with ``every_file`` (an XOR payload and the raw files it is decoded with)."""
    spec = hub_spec_for(path)
    if spec is None:
        return Path(path)
    snapshot = resolve(spec)
    if every_file:
        for file in snapshot.files.values():
            if "/" not in file.path:
                fetch(snapshot, file, transfer)
        return snapshot.directory
    fetch_small_files(snapshot, transfer)
    if weights:
        for name in weight_files(snapshot)[1]:
            fetch(snapshot, snapshot.files[name], transfer)
    return snapshot.directory


def fetch_small_files(snapshot: Snapshot, transfer: Transfer | None) -> None:
    """Download the top-level files that are not weights: config, tokenizer, index, manifest, licences."""
    for file in snapshot.files.values():
        if "/" not in file.path and not file.path.endswith((*WEIGHT_SUFFIXES, SUFFIX)) and file.size <= SMALL_FILE:
            fetch(snapshot, file, transfer)


def top_level_files(path: str | os.PathLike) -> dict[str, int] | None:
    """Return the top-level files (name -> size) of the hub repository an input argument names, as its listing
    gives them (a payload's large files are known before they are downloaded); None for a local path."""
    spec = hub_spec_for(path)
    return None if spec is None else {name: f.size for name, f in resolve(spec).files.items() if "/" not in name}


def compact_files_of(snapshot: Snapshot) -> tuple[list[str], tuple[str, ...]]:
    """Return the ``.wdc`` files at a repository's top that are its compact diff's, and those its manifest does not
    name: no part of it (a leftover of an earlier upload, a copy), left on the hub, neither read nor downloaded.
    The manifest, a small file, must be here already."""
    remote = sorted(name for name in snapshot.files if "/" not in name and name.endswith(SUFFIX))
    manifest = Manifest.load(snapshot.directory)
    named = manifest.compact_files if manifest is not None else None
    ignored = tuple(name for name in remote if named is not None and name not in named)
    return [name for name in remote if name not in ignored], ignored


def compact_on_hub(path: str | os.PathLike) -> bool:
    """Whether an input argument names a hub repository whose weights are a compact diff's ``.wdc`` files (a stray
    ``.wdc`` beside safetensors or ``.bin`` weights does not make one); its small files must be here already."""
    spec = hub_spec_for(path)
    if spec is None:
        return False
    snapshot = resolve(spec)
    if not any("/" not in name and name.endswith(SUFFIX) for name in snapshot.files):
        return False
    try:
        return weight_files(snapshot)[0] == "compact"
    except CheckpointError:
        return False  # not a layout we read: the reader that follows says why


def snapshot_dir(path: str | os.PathLike) -> Path:
    """Return where an input argument's files are or will be (for refusing an output inside an input), without
    downloading anything."""
    spec = hub_spec_for(path)
    return Path(path) if spec is None else resolve(spec).directory


def weight_files(snapshot: Snapshot) -> tuple[str, list[str]]:
    """Return the layout and the weight files in download order: by name, which is shard order (``-00001-of-``);
    an index lists tensors alphabetically, so its order of first mention would start with the last shard."""
    top = {name for name in snapshot.files if "/" not in name}
    for index, layout in ((SAFETENSORS_INDEX, "safetensors-sharded"), (BIN_INDEX, "bin-sharded")):
        if index in top:
            weight_map = read_json_object(snapshot.directory / index).get("weight_map") or {}
            order = sorted(set(weight_map.values()))
            missing = [name for name in order if name not in snapshot.files]
            if missing:
                raise CheckpointError(
                    f"{snapshot.spec}: {index} names {missing[0]}, which the repository does not have"
                )
            return layout, order
    for single, layout in (("model.safetensors", "safetensors"), ("pytorch_model.bin", "bin")):
        if single in top:
            return layout, [single]
    consolidated = sorted(name for name in top if re.fullmatch(r"consolidated\.\d+\.pth", name))
    if consolidated and "params.json" in top:  # Meta's original layout (sources/meta.py reads it)
        return "meta", consolidated
    compact, ignored = compact_files_of(snapshot)
    if compact or ignored:  # a compact diff (recover reads it while it downloads: sources/compact_files.py)
        return "compact", compact
    # Not a layout we read: let the usual message say so from the (small) files that are here.
    find_weight_files(snapshot.directory)
    raise CheckpointError(f"{snapshot.spec}: no weights in a known layout")
