"""A compact diff's ``.wdc`` files, from a directory or from the hub while they download.

On the hub, each file's index is read first with ranged requests (three small reads), so the recovery is planned
before any file is here; the files then download in the order the recovery reads them, one ahead of the reader,
and each is read only once whole and checked (the hub's SHA-256, and the diff's own ``SHA256SUMS``). With
``keep_download=False`` a file is deleted from the cache once its last block is read, and at most two are on disk.

>>> with open_compact_files("org/diff", promised, keep_download=False, transfer=bar) as files:
...     plan = compact.plan_recover(raw.tensors, files.indexes, ...)
...     files.read_in([path for path, _ in files.indexes])  # the files the run needs, in the order it reads them
...     reader = files.open(path)  # on the read lane: waits until the file is here and checked
...     files.done_with(path)  # once its last block is read
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from pathlib import Path

from ..container import CompactTensor, ContainerReader, compact_files, read_index
from ..errors import IntegrityError
from ..manifest import file_sha256
from . import hub
from .hub import RemoteFile, Snapshot, Transfer
from .repo_spec import hub_spec_for

Indexes = list[tuple[Path, dict[str, CompactTensor]]]


class LocalFiles:
    """The ``.wdc`` files of a diff directory: all here already (a file its manifest does not name is refused when
    it holds a tensor another file holds: the user can remove it)."""

    origin: str | None = None
    ignored: tuple[str, ...] = ()

    def __init__(self, directory: Path) -> None:
        self.indexes: Indexes = []
        for path in compact_files(directory):
            with ContainerReader(path) as reader:
                self.indexes.append((path, reader.tensors))
        self.names = {path.name for path, _ in self.indexes}

    def read_in(self, order: list[Path]) -> None:
        """Nothing to fetch."""

    def open(self, path: Path) -> ContainerReader:
        """Open a file to read its blocks."""
        return ContainerReader(path)

    def done_with(self, path: Path) -> None:
        """A local diff is never deleted."""

    def interrupt(self) -> None:
        """Nothing downloads."""

    def close(self) -> None:
        """Nothing to stop."""


class HubFiles:
    """The ``.wdc`` files of a compact diff on the hub, downloaded on a thread of their own as the recovery needs
    them; a download's failure is raised to the reader waiting for that file."""

    def __init__(
        self,
        snapshot: Snapshot,
        promised: dict[str, str],
        *,
        keep_download: bool,
        transfer: Transfer | None,
    ) -> None:
        self.snapshot, self._promised, self._keep = snapshot, promised, keep_download
        self._transfer = transfer or hub.NoTransfer()
        self.origin = snapshot.origin
        # Files the diff's manifest does not name: its user cannot remove them from the repository, so they stay.
        remote, self.ignored = hub.compact_files_of(snapshot)
        self.names = set(remote)
        self._files: dict[Path, RemoteFile] = {snapshot.local(snapshot.files[n]): snapshot.files[n] for n in remote}
        for file in self._files.values():  # before anything downloads: the hub lists LFS files' SHA-256
            if file.sha256 is not None:
                self._check_promised(file, file.sha256, " Nothing was written")
        self.indexes: Indexes = [(path, self._index(path, file)) for path, file in self._files.items()]
        self._planned = dict(self.indexes)
        self._order: list[Path] = []
        self._downloads = hub.DownloadThread(self._download_loop, self._files)

    def _check_promised(self, file: RemoteFile, sha256: str, written: str = "") -> None:
        """Refuse a file whose SHA-256 on the hub is not the one the diff's ``SHA256SUMS`` promises."""
        promised = self._promised.get(file.path)
        if promised is not None and sha256 != promised:
            raise IntegrityError(
                f"{self.snapshot.spec}: {file.path} on the hub differs from the diff's SHA256SUMS (the repository "
                f"holds a file of another diff); ask its publisher.{written}"
            )

    def _index(self, path: Path, file: RemoteFile) -> dict[str, CompactTensor]:
        if hub.cached_and_checked(self.snapshot, file):
            with ContainerReader(path) as reader:
                return reader.tensors
        _, tensors = read_index(
            path,
            file.size,
            lambda offset, length: hub.fetch_range(self.snapshot, file, offset, offset + length),
            where=f"{self.snapshot.spec}: {file.path}",
            remedy="the repository holds it so: ask its publisher",
        )
        return tensors

    # The reader's side -------------------------------------------------------------------------------------------

    def read_in(self, order: list[Path]) -> None:
        """Start downloading the files the run needs, in the order it reads them (a resumed run needs fewer)."""
        self._order = list(order)
        self._downloads.start()

    def open(self, path: Path) -> ContainerReader:
        """Open a file once it is here and checked; raise its download's failure, or Interrupted.

        Open, it stays readable even if another run with ``--no-keep-download`` deletes it from the cache; one
        deleted before it was opened is downloaded again.
        """
        self._downloads.wait_ready(path)
        if self._downloads.failure is not None and path not in self._downloads.held:
            raise self._downloads.failure
        try:
            reader = ContainerReader(path)
        except FileNotFoundError:
            hub.fetch(self.snapshot, self._files[path], self._transfer, self._downloads.stop, durable=self._keep)
            reader = ContainerReader(path)
        if reader.tensors != self._planned[path]:
            reader.close()
            raise IntegrityError(
                f"{self.snapshot.spec}: {path.name} changed between planning and download; run the same command again"
            )
        return reader

    def done_with(self, path: Path) -> None:
        """The file's last block is read: delete it without ``keep_download``, and let the next one download."""
        if not self._keep:
            hub.forget(self.snapshot, self._files[path])
        self._downloads.release(path)

    def interrupt(self) -> None:
        """Stop downloading (a partial file is kept for the next run) and wake a reader waiting for one."""
        self._downloads.interrupt()

    def close(self) -> None:
        self._downloads.close()

    # The downloader's side ---------------------------------------------------------------------------------------

    def _download_loop(self) -> None:
        try:
            for path in self._order:
                with self._downloads.lock:
                    while not self._keep and len(self._downloads.held) >= 2 and not self._downloads.stop.is_set():
                        self._downloads.lock.wait()  # without keep: two files on disk at most
                    if self._downloads.stop.is_set():
                        return
                file = self._files[path]
                hub.fetch(self.snapshot, file, self._transfer, self._downloads.stop, durable=self._keep)
                if file.sha256 is None and file.path in self._promised:  # a small file: its git id was checked
                    try:
                        self._check_promised(file, file_sha256(path))
                    except IntegrityError:
                        hub.forget(self.snapshot, file)
                        raise
                with self._downloads.lock:
                    self._downloads.held.add(path)
                self._downloads.ready[path].set()
        except BaseException as exc:  # handed to the reader, which raises it on the read lane
            self._downloads.failed(exc)


def remote_indexes(diff: str | os.PathLike) -> Indexes:
    """Return the index of each ``.wdc`` file of a compact diff on the hub (those its manifest names, where it
    names them), read by ranged requests (from the cache where a file is there already): what it holds, without
    downloading it."""
    files = HubFiles(hub.resolve(hub_spec_for(diff)), {}, keep_download=True, transfer=None)
    files.close()
    return files.indexes


@contextlib.contextmanager
def open_compact_files(
    diff: str | os.PathLike,
    directory: Path,
    promised: dict[str, str],
    *,
    keep_download: bool = True,
    transfer: Transfer | None = None,
) -> Iterator[LocalFiles | HubFiles]:
    """Yield the compact files of ``diff``: a local directory's, or a hub repository's (``directory`` holds its
    small files, fetched already)."""
    spec = hub_spec_for(diff)
    files = LocalFiles(directory) if spec is None else HubFiles(
        hub.resolve(spec), promised, keep_download=keep_download, transfer=transfer
    )  # fmt: skip
    try:
        yield files
    finally:
        files.close()
