"""The output directory's life: refuse unsafe locations, check free disk, journal finished shards for --resume.

Until a run has finished and checked, its output holds no ``config.json`` and so never loads as a model.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import json
import os
import re
import shutil
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from .errors import IntegrityError, UsageError, WeightDiffError
from .files import CONFIG_NAME, is_companion, write_atomic
from .manifest import MANIFEST_NAME, RECOVERY_NAME, SUMS_NAME, file_sha256, read_sums
from .plan import Plan, TensorJob
from .sizes import format_size
from .untrusted import load_json
from .writer import PARTIAL_SUFFIX, fsync_directory

if TYPE_CHECKING:
    from .compact import CompactJob

JOURNAL_NAME = ".weight-diff-progress.json"
ASIDE_NAME = ".weight-diff-replaced"  # --overwrite: the earlier output, until the new run finishes a shard
SPACE_MARGIN = 64 * 2**20  # headers, config, tokenizer files
# --overwrite hashes the files of ours up to this size (a model card, a config someone edited) and keeps a changed
# one; weight shards are larger and are not read (hashing a 52 GB model to replace it would take minutes).
EDITED_CHECK_BYTES = 128 * 2**20
# What a run of ours may leave in its output besides the files its SHA256SUMS lists: --overwrite removes only these.
OUR_NAMES = {JOURNAL_NAME, SUMS_NAME, CONFIG_NAME, RECOVERY_NAME, MANIFEST_NAME, "model.safetensors.index.json"}
OUR_SHARD = re.compile(r"^(model(-\d{5}-of-\d{5})?\.safetensors|diff(-\d{5}-of-\d{5})?\.wdc)$")  # .wdc: compact
# Any one of these marks a weight-diff output (finished: recovery record or manifest; unfinished: the journal).
OUR_MARKERS = (JOURNAL_NAME, RECOVERY_NAME, MANIFEST_NAME)


@contextlib.contextmanager
def claim(out: Path, inputs: list[Path], *, overwrite: bool, resume: bool) -> Iterator[None]:
    """Hold ``out`` for one run: refuse unsafe locations, then lock it so that a second run is refused.

    The lock is an advisory ``flock`` on the directory itself, held until the run ends (a crash releases it), so it
    leaves no file behind. Inputs get a shared lock: a directory another run is still writing is not read.
    Directories created here and still empty when the run fails are removed again.
    """
    check_location(out, inputs, overwrite=overwrite, resume=resume)
    created = []  # the directories this run makes, innermost first: removed again if the run fails while empty
    probe = out
    while not probe.exists() and probe != probe.parent:
        created.append(probe)
        probe = probe.parent
    make_output_dir(out)
    with contextlib.ExitStack() as locks:
        try:
            for given in inputs:
                if given.is_dir():
                    _lock(locks, given, fcntl.LOCK_SH, "a weight-diff run is still writing there; wait for it to end")
            _lock(locks, out, fcntl.LOCK_EX, "another weight-diff run is writing there; wait for it to end, or "
                  "choose another directory")  # fmt: skip
            check_location(out, inputs, overwrite=overwrite, resume=resume)  # again, now that no other run writes
            yield
        except BaseException:
            with contextlib.suppress(OSError):
                for directory in created:
                    directory.rmdir()  # only if nothing was written there
            raise


def _lock(locks: contextlib.ExitStack, directory: Path, kind: int, busy: str) -> None:
    """Take an advisory lock on a directory until ``locks`` closes, or refuse at once with ``busy``."""
    try:
        fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    except OSError as exc:
        raise WeightDiffError(f"{directory}: cannot open the directory ({exc.strerror})") from None
    locks.callback(os.close, fd)  # closing releases the lock
    try:
        fcntl.flock(fd, kind | fcntl.LOCK_NB)
    except OSError as exc:
        if exc.errno not in (errno.EWOULDBLOCK, errno.EAGAIN):
            raise
        raise UsageError(f"{directory}: {busy}") from None


def check_location(out: Path, inputs: list[Path], *, overwrite: bool, resume: bool) -> None:
    """Refuse an output that is, lies in, or holds an input, or that would replace files without being asked."""
    if resume and overwrite:
        raise UsageError(
            f"{out}: --resume and --overwrite ask for opposite things (finish the interrupted run there, or start "
            "again); give one"
        )
    target = out.resolve()
    for given in inputs:
        source = given.resolve()
        if target == source or source in target.parents:
            raise UsageError(f"{out}: the output is, or lies inside, the input {given}; choose a directory outside it")
        if target in source.parents:
            raise UsageError(f"{out}: the output holds the input {given}; choose a directory that does not")
    if out.exists() and not out.is_dir():
        raise UsageError(f"{out}: exists and is not a directory; choose a new directory")
    has_files = out.is_dir() and any(out.iterdir())
    if resume:
        if not (out / JOURNAL_NAME).is_file():
            raise UsageError(f"{out}: nothing to resume (no unfinished run there); run without --resume")
    elif has_files and not overwrite and (out / JOURNAL_NAME).is_file():
        raise UsageError(
            f"{out}: holds an interrupted run; add --resume to finish it, or --overwrite to start again there"
        )
    elif has_files and not overwrite:
        finished = any((out / marker).is_file() for marker in OUR_MARKERS)  # a run of ours, finished
        raise UsageError(
            f"{out}: holds a finished output of weight-diff (`weight-diff verify {out}` checks it); choose a new "
            "directory, or add --overwrite to replace it"
            if finished
            else f"{out}: exists and is not empty, and is no output of weight-diff; choose a new directory"
        )
    elif has_files:
        ours_to_remove(out)


def ours_to_remove(out: Path) -> list[Path]:
    """Return what --overwrite removes from ``out``: only files a run of ours wrote there, or refuse.

    A directory is ours when it holds our journal, recovery record or manifest; then every entry must be a file
    its ``SHA256SUMS`` lists or one of the names we write. Anything else (a folder, a stray file) refuses the run:
    --overwrite never removes what weight-diff did not write, nor a file of ours someone changed since. An
    earlier output set aside (``set_aside``, perhaps half-moved by a killed run) is read as part of ``out``: its
    files follow the same rules; it is not returned.
    """
    aside = out / ASIDE_NAME
    places = [out] + ([aside] if aside.is_dir() and not aside.is_symlink() else [])
    if not any((place / marker).is_file() for place in places for marker in OUR_MARKERS):
        raise UsageError(
            f"{out}: not an output of weight-diff (no {RECOVERY_NAME}, {MANIFEST_NAME} or unfinished run there), so "
            "--overwrite will not empty it; choose a new directory or empty it yourself"
        )
    sums: dict[str, str] = {}
    listed: set[str] = set()
    for place in places:
        if (place / SUMS_NAME).is_file():
            with contextlib.suppress(IntegrityError):
                sums.update(read_sums(place / SUMS_NAME))
        with contextlib.suppress(UsageError):  # an interrupted run's finished files (an XOR recovery's: any names)
            listed |= {name for name in Journal.read(place).shards if "/" not in name}
    listed |= set(sums)
    ours = []
    for place in places:
        for path in sorted(place.iterdir()):
            if place == out and path == aside and len(places) == 2:
                continue
            _check_ours(place, path, listed, sums)
            if place == out:
                ours.append(path)
    return ours


def _check_ours(place: Path, path: Path, listed: set[str], sums: dict[str, str]) -> None:
    """Refuse a file weight-diff did not write, or one of ours changed since it was written."""
    name = path.name
    known = name in listed or name in OUR_NAMES or OUR_SHARD.match(name.removesuffix(PARTIAL_SUFFIX))
    if not known and name.endswith(PARTIAL_SUFFIX):
        known = name.removesuffix(PARTIAL_SUFFIX) in listed | OUR_NAMES
    if not known or path.is_symlink() or not path.is_file():
        raise UsageError(
            f"{place}: holds {name}, which weight-diff did not write, so --overwrite will not remove it; move it "
            "away or choose a new directory"
        )
    if name in sums and path.stat().st_size <= EDITED_CHECK_BYTES and file_sha256(path) != sums[name]:
        raise UsageError(
            f"{place}: {name} was changed after weight-diff wrote it (it no longer matches {SUMS_NAME}), so "
            "--overwrite will not remove it; move it away or choose a new directory"
        )


def check_free_space(out: Path, needed: int) -> None:
    """Refuse before any write when the disk that will hold ``out`` lacks room for ``needed`` bytes."""
    probe = out
    while not probe.exists():
        probe = probe.parent
    free = shutil.disk_usage(probe).free
    if free < needed + SPACE_MARGIN:
        raise WeightDiffError(
            f"{out}: not enough free disk: the output needs {format_size(needed + SPACE_MARGIN)}, {probe} has "
            f"{format_size(free)} free; free space or choose another disk"
        )


def set_aside(out: Path) -> None:
    """Move an earlier output of ours (--overwrite) into a hidden folder of ``out``, by renames: no copy, no disk.

    It is dropped once the new run finishes its first shard (``drop_aside``), and put back when the run stops
    before that (``put_back``): a run refused at its first tensor (the wrong raw model, a damaged diff) leaves the
    earlier model as it was. An aside already there was left by an --overwrite run killed (kill -9, a power cut)
    before its first shard: with that run's journal beside it, it holds the last output that was whole and stays
    while what that run wrote goes; without one, the run was killed while moving it, and the rest joins it.
    """
    ours = ours_to_remove(out)
    aside = out / ASIDE_NAME
    if aside.is_dir() and not any(aside.iterdir()):
        aside.rmdir()  # killed before the first rename: nothing was moved
    if aside.is_dir():
        killed_after_the_move = (out / JOURNAL_NAME).is_file()
        for path in ours:
            if killed_after_the_move:
                path.unlink(missing_ok=True)
            else:
                os.replace(path, aside / path.name)
        fsync_directory(out)
        return
    aside.mkdir()
    # An earlier run's journal first (a journal beside an aside is then always the new run's), then config.json, so
    # that the directory stops loading as a model at once.
    first = [out / JOURNAL_NAME, out / CONFIG_NAME]
    for path in [p for p in first if p in ours] + [p for p in ours if p not in first]:
        os.rename(path, aside / path.name)
    fsync_directory(out)


def put_back(out: Path) -> None:
    """Restore the output ``set_aside`` moved away (config.json last: the model loads only once it is whole)."""
    aside = out / ASIDE_NAME
    if not aside.is_dir():
        return
    for path in sorted(aside.iterdir(), key=lambda p: p.name == CONFIG_NAME):
        os.replace(path, out / path.name)
    aside.rmdir()
    fsync_directory(out)


def drop_aside(out: Path) -> None:
    """Delete the earlier output ``set_aside`` kept: the new run has a shard of its own on disk."""
    if (out / ASIDE_NAME).is_dir():
        shutil.rmtree(out / ASIDE_NAME)


def remove_partials(out: Path) -> None:
    """Remove what an interrupted run of ours left half-written (never another ``*.partial`` of the user's)."""
    for path in out.glob("*" + PARTIAL_SUFFIX):
        name = path.name.removesuffix(PARTIAL_SUFFIX)
        if OUR_SHARD.match(name) or name in OUR_NAMES or is_companion(name):
            path.unlink()


def plan_fingerprint(mode: str, plan: Plan, inputs: list[Path | str]) -> str:
    """Return a hash of what a run will produce from which input files, so --resume never mixes two runs."""
    shards = [[s.file_name, [_recipe(job) for job in s.jobs]] for s in plan.shards]
    return inputs_fingerprint(mode, shards, inputs)


def _recipe(job: TensorJob | CompactJob) -> list:
    """What decides a tensor's bytes besides the input files: its name, dtype and shape and, for raw + diff, the
    family's rule (the arithmetic's dtype, how added rows are filled, a diff that holds the result itself): a run
    resumed with another --family must not add to shards written by the first rule."""
    recipe = [job.name, str(job.out_dtype), list(job.out_shape)]
    if isinstance(job, TensorJob):
        recipe += [str(job.arithmetic), job.fill, job.absolute, job.added_rows]
    return recipe


def inputs_fingerprint(mode: str, produces: list, inputs: list[Path | str]) -> str:
    """Return a hash of ``produces`` (what the run writes, as JSON) and of the input files: path, size and
    modification time of each file in each input directory (or of an input that is a file).

    An input given as text (a hub repository at a commit) stands for itself: its files come and go while it runs.
    """
    files: list = []
    for given in inputs:
        if isinstance(given, str):
            files.append(given)
            continue
        for path in [given] if given.is_file() else sorted(given.iterdir()):
            if path.is_file():
                stat = path.stat()
                files.append([str(path.resolve()), stat.st_size, stat.st_mtime_ns])
    body = {"mode": mode, "inputs": files, "shards": produces}
    return hashlib.sha256(json.dumps(body).encode()).hexdigest()


@dataclass
class Journal:
    """What an unfinished run has completed: shards with their SHA-256 and, for make-diff, the tensor hashes its
    manifest will need. Kept hidden in the output until the run ends; ``--resume`` reads it."""

    path: Path
    fingerprint: str
    shards: dict[str, str] = field(default_factory=dict)
    tensors: dict[str, dict] = field(default_factory=dict)

    @classmethod
    def load(cls, out: Path, fingerprint: str) -> Journal:
        """Return the interrupted run's journal, refusing one made from other inputs or options."""
        journal = cls.read(out)
        if journal.fingerprint != fingerprint:
            raise UsageError(
                f"{out}: the interrupted run there used other inputs or options; repeat its exact command "
                "with --resume, or use --overwrite to start again"
            )
        return journal

    @classmethod
    def read(cls, out: Path) -> Journal:
        """Return the journal in ``out`` as it is, whatever run made it; UsageError when it is missing or unreadable."""
        path = out / JOURNAL_NAME
        unreadable = f"{path}: unreadable; start again with --overwrite instead of --resume"
        try:
            body = load_json(path.read_bytes(), where=str(path), error=UsageError)
            previous, shards, tensors = body["fingerprint"], dict(body["shards"]), dict(body["tensors"])
        except (OSError, ValueError, KeyError, TypeError, UsageError):
            raise UsageError(unreadable) from None
        if not all(isinstance(v, str) for v in shards.values()) or not all(
            isinstance(v, dict) for v in tensors.values()
        ):
            raise UsageError(unreadable)
        return cls(path, previous, shards, tensors)

    def finished_shards(self, names: frozenset[str] | None = None) -> frozenset[str]:
        """Return the journal's shards whose files are still there and still hash as recorded; forget the rest.

        ``names``: the files the run writes (an XOR recovery's are the publisher's); by default, our shard names.
        """
        out = self.path.parent
        kept = {
            name
            for name, digest in self.shards.items()
            if (OUR_SHARD.match(name) if names is None else name in names)
            and (out / name).is_file()
            and file_sha256(out / name) == digest
        }
        self.shards = {name: self.shards[name] for name in kept}
        return frozenset(kept)

    def record(self, shard_name: str, digest: str, tensors: dict[str, dict] | None = None) -> None:
        self.shards[shard_name] = digest
        self.tensors.update(tensors or {})
        self.save()

    def save(self) -> None:
        body = {"fingerprint": self.fingerprint, "shards": self.shards, "tensors": self.tensors}
        write_atomic(self.path, json.dumps(body).encode())

    def remove(self) -> None:
        self.path.unlink(missing_ok=True)
        fsync_directory(self.path.parent)


def refuse_unfinished(directory: Path, then: str) -> None:
    """Refuse to describe or check a directory an interrupted run of ours left: what is there is not whole."""
    if (directory / JOURNAL_NAME).is_file() or (directory / ASIDE_NAME).is_dir():
        raise UsageError(
            f"{directory}: an unfinished weight-diff run (interrupted); finish it with the same command and "
            f"--resume (or, after --overwrite, the same command again), then {then}"
        )


def make_output_dir(out: Path) -> None:
    if out.is_symlink() and not out.exists():
        raise WeightDiffError(f"{out}: a link to {os.readlink(out)}, which does not exist; give a directory")
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise WeightDiffError(f"{out}: cannot create the output directory ({exc.strerror})") from None
    if not os.access(out, os.W_OK):
        raise WeightDiffError(f"{out}: not writable; choose a directory you can write to")
