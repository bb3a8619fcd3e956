"""``weight-diff verify``: re-check a recovered model against its ``SHA256SUMS`` (and a diff's manifest), or a
diff's tensors against its own manifest. Streams: one block of one tensor in memory at a time.

>>> report = verify("self-instruct-13b", diff="self-instruct-13b-diff")
>>> report.ok
True
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .checkpoint import Checkpoint, TensorInfo
from .container import compact_files
from .errors import IntegrityError, UsageError
from .manifest import MANIFEST_NAME, SUMS_NAME, Manifest, dtype_name, file_sha256, read_sums, tensor_bytes
from .output import refuse_unfinished
from .untrusted import confined_name, given_path, resolves_inside

BLOCK_BYTES = 64 * 2**20


@dataclass(frozen=True)
class Check:
    """One thing checked: a file or a tensor, whether it matched, and what was found when it did not."""

    subject: str
    ok: bool
    detail: str = ""


@dataclass
class VerifyReport:
    """Every check made on a directory; ``ok`` only when all matched and at least one thing was checked."""

    directory: Path
    kind: str  # "model" or "diff"
    checks: list[Check] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return bool(self.checks) and all(check.ok for check in self.checks)

    @property
    def failures(self) -> list[Check]:
        return [check for check in self.checks if not check.ok]


def verify(path: str | Path, *, diff: str | Path | None = None) -> VerifyReport:
    """Return the checks of a model directory (or of a diff directory, when it holds a manifest)."""
    directory = given_path(path, "verify")
    diff_dir = given_path(diff, "--diff") if diff is not None else None
    if not directory.exists():
        raise UsageError(f"{directory}: no such directory")
    if not directory.is_dir():
        raise UsageError(f"{directory}: not a directory; give the model's or the diff's directory")
    refuse_unfinished(directory, then="verify")
    is_diff = (directory / MANIFEST_NAME).is_file() or bool(compact_files(directory))
    if diff_dir is not None:
        _check_diff_dir(directory, diff_dir, is_diff)
    elif is_diff:
        return _verify_diff(directory)
    report = VerifyReport(directory, "model")
    if not (directory / SUMS_NAME).is_file():
        raise UsageError(f"{directory}: no {SUMS_NAME} to check against; it was not written by weight-diff recover")
    report.checks, report.notes = check_sums(directory)
    if diff_dir is not None:
        _check_against_manifest(directory, diff_dir, report)
    return report


def check_sums(directory: Path) -> tuple[list[Check], list[str]]:
    """Return a check per file listed in ``SHA256SUMS``, and notes on files present but not listed."""
    sums_path = directory / SUMS_NAME
    listed = read_sums(sums_path)
    checks = []
    for name, expected in listed.items():
        path = directory / name
        if not confined_name(name):
            checks.append(Check(name, False, f"not a file inside {directory}; not read"))
        elif not path.exists():
            checks.append(Check(name, False, "missing"))
        elif not path.is_file():
            checks.append(Check(name, False, "not a regular file; not read"))
        elif not resolves_inside(directory, path):
            checks.append(Check(name, False, f"a link to {path.resolve()}, outside {directory}; not read"))
        else:
            same = file_sha256(path) == expected
            checks.append(Check(name, same, "" if same else "content changed"))
    notes = [
        f"{path.name}: not listed in {SUMS_NAME} (added after the recovery)"
        for path in sorted(directory.iterdir())
        if path.is_file() and not path.name.startswith(".") and path.name not in listed.keys() | {SUMS_NAME}
    ]
    return checks, notes


def expected_file_sums(directory: Path, manifest: Manifest | None) -> dict[str, str]:
    """Return the SHA-256 a diff promises for its files: its ``SHA256SUMS`` and its manifest's ``files``.

    When both name a file they must agree; otherwise one of them was edited after make-diff.
    """
    expected = read_sums(directory / SUMS_NAME) if (directory / SUMS_NAME).is_file() else {}
    for name, digest in (manifest.files if manifest is not None else {}).items():
        if expected.setdefault(name, digest) != digest:
            raise IntegrityError(
                f"{directory}: {SUMS_NAME} and {MANIFEST_NAME} disagree about {name}; one was edited after "
                "make-diff: download the diff again"
            )
    return expected


def _verify_diff(directory: Path) -> VerifyReport:
    manifest = Manifest.load(directory)
    report = VerifyReport(directory, "diff")
    if (directory / SUMS_NAME).is_file():
        report.checks, report.notes = check_sums(directory)
    listed = {check.subject for check in report.checks}
    for name, digest in expected_file_sums(directory, manifest).items():
        if name in listed or not confined_name(name):
            continue
        path = directory / name
        if not path.is_file():
            report.checks.append(Check(name, False, "in the manifest but missing"))
        else:
            same = file_sha256(path) == digest
            report.checks.append(Check(name, same, "" if same else "differs from the manifest"))
    if compact_files(directory):
        _verify_compact_diff(directory, manifest, report)
        return report
    with Checkpoint.open(directory) as checkpoint:
        for name, record in manifest.tensors.items():
            info = checkpoint.tensors.get(name)
            if info is None:
                report.checks.append(Check(name, False, "in the manifest but not in the diff"))
                continue
            report.checks.append(_check_tensor(checkpoint, info, record.diff.sha256, record.diff.dtype))
        for name in sorted(checkpoint.tensors.keys() - manifest.tensors.keys()):
            report.checks.append(Check(name, False, "in the diff but not in its manifest"))
    return report


def _verify_compact_diff(directory: Path, manifest: Manifest, report: VerifyReport) -> None:
    """Check every block of a compact diff against its checksum, and its tensors against the manifest's list."""
    from .compact import check_blocks  # the codec imports zstandard: only for compact diffs

    seen: dict[str, str] = {}
    for path in compact_files(directory):
        for name, problem in check_blocks(path):
            if name in seen:  # recover refuses such a folder: a second copy of a file, or two diffs' files
                problem = problem or f"also in {seen[name]}: keep only the files the diff's {SUMS_NAME} lists"
            seen.setdefault(name, path.name)
            if name not in manifest.tensors:
                problem = problem or "in the diff but not in its manifest"
            report.checks.append(Check(f"{name} ({path.name})", not problem, problem))
    for name in sorted(manifest.tensors.keys() - seen):
        report.checks.append(Check(name, False, "in the manifest but not in the diff"))


def _check_diff_dir(directory: Path, diff_dir: Path, model_is_a_diff: bool) -> None:
    """Refuse a --diff that cannot vouch for the model's tensors, and a model that is itself a diff."""
    if model_is_a_diff:
        raise UsageError(
            f"{directory}: a weight diff, not a recovered model; give the recovered model's directory with "
            f"--diff, or check the diff against its own manifest: weight-diff verify {directory}"
        )
    if not diff_dir.is_dir():
        what = "not a directory" if diff_dir.exists() else "no such directory"
        raise UsageError(f"--diff {diff_dir}: {what}; give the directory of the diff the model was recovered from")
    if not (diff_dir / MANIFEST_NAME).is_file():
        raise UsageError(
            f"--diff {diff_dir}: has no {MANIFEST_NAME}, so nothing vouches for the model's tensors (a diff in "
            f"the 2023 format carries none); run verify without --diff to check its {SUMS_NAME}"
        )


def _check_against_manifest(directory: Path, diff_dir: Path, report: VerifyReport) -> None:
    manifest = Manifest.load(diff_dir)
    with Checkpoint.open(directory) as model:
        for name, record in manifest.tensors.items():
            info = model.tensors.get(name)
            if info is None:
                report.checks.append(Check(name, False, "in the diff's manifest but not in the model"))
            elif dtype_name(info.dtype) != record.result.dtype:
                report.notes.append(
                    f"{name}: stored as {dtype_name(info.dtype)}; the manifest hashes {record.result.dtype} results, "
                    f"so only {SUMS_NAME} vouches for it"
                )
            else:
                report.checks.append(_check_tensor(model, info, record.result.sha256, record.result.dtype))


def _check_tensor(checkpoint: Checkpoint, info: TensorInfo, expected: str, expected_dtype: str) -> Check:
    subject = f"{info.name} ({info.file.name})"
    if dtype_name(info.dtype) != expected_dtype:
        return Check(subject, False, f"stored as {dtype_name(info.dtype)}, manifest says {expected_dtype}")
    actual = tensor_sha256(checkpoint, info)
    return Check(subject, actual == expected, "" if actual == expected else "bytes differ from the manifest")


def tensor_sha256(checkpoint: Checkpoint, info: TensorInfo) -> str:
    """Return the SHA-256 of a stored tensor's bytes, read block by block."""
    hasher = hashlib.sha256()
    row_bytes = max(1, info.row_numel * info.dtype.itemsize)
    step = max(1, BLOCK_BYTES // row_bytes)
    buffer = torch.empty(max(BLOCK_BYTES, row_bytes), dtype=torch.uint8)
    for start in range(0, info.rows, step):
        rows = checkpoint.read_rows(info, start, min(start + step, info.rows), out=buffer)
        hasher.update(tensor_bytes(rows.contiguous()))
    return hasher.hexdigest()
