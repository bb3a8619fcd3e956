"""Say what a directory is: a model or a weight diff, its size and dtypes, the base a diff expects, and whether
a model's files still match the ``SHA256SUMS`` written beside them.

Only headers, ``config.json``, the manifest and one small norm tensor are read, plus every file once to hash it
when ``check_sums`` is on.

>>> found = inspect_path("self-instruct-13b-diff")
>>> found.kind, found.manifest
('diff', True)
>>> print("\\n".join(found.lines()))
"""

from __future__ import annotations

import math
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path

from .checkpoint import Checkpoint, TensorInfo
from .container import CompactTensor, compact_files, compact_tensor_table
from .errors import IntegrityError, UsageError
from .families import FAMILIES, detect, evidence_of
from .files import CHAT_TEMPLATE_FILE, CONFIG_NAME
from .files import read_json_object as _read_json
from .manifest import RECOVERY_NAME, SUMS_NAME, Digest, Manifest, dtype_name, read_sums
from .output import refuse_unfinished
from .plan import LLAMA_SIZES, VOCAB_SUFFIXES, describe_size
from .role import classify
from .sizes import format_size
from .sources import meta
from .tokenizer import describe as describe_tokenizer
from .untrusted import given_path
from .verify import check_sums
from .xor import detect_files


@dataclass(frozen=True)
class Sums:
    """The state of a directory's ``SHA256SUMS``: "verified", "mismatch", "none" or "not checked"."""

    status: str
    files: int = 0  # files listed
    problems: list[str] = field(default_factory=list)  # "<file> (differs|missing|not listed)"
    name: str = SUMS_NAME  # or Meta's checklist.chk (md5)

    def describe(self, kind: str) -> str:
        if self.status == "verified":
            verdict = "verified copy: " if kind == "model" and self.name == SUMS_NAME else ""
            return f"{verdict}all {self.files} files match {self.name}"
        if self.status == "mismatch":
            return f"{self.name} mismatch: {', '.join(self.problems)}"
        if self.status == "none" and self.name == SUMS_NAME:
            return f"no {SUMS_NAME} (not written by weight-diff, or copied without it)"
        if self.status == "none":
            return f"no {self.name}"
        return f"{self.name} present, not checked"


@dataclass(frozen=True)
class Inspection:
    """What ``inspect_path`` found in a directory. ``kind`` is "model", "diff" or "unknown"."""

    path: str
    kind: str
    evidence: str  # why we think so
    manifest: bool
    architecture: str | None
    model_type: str | None
    size: str
    parameters: int
    tensors: int
    dtypes: dict[str, int]  # dtype name -> parameters stored in it, largest first
    vocab_size: int | None
    layout: str
    shards: int
    total_bytes: int  # of the weight files on disk
    chat_template: bool
    base: str | None  # from the manifest: the raw model a diff was made against
    made_by: dict | None  # the manifest's tool versions
    sums: Sums
    recovery: dict | None = None  # weight-diff-recovery.json of a model that recover wrote
    tokenizer: str = "none"  # which tokenizer files, whether they agree
    family: str | None = None  # a diff's family and why ("vicuna-v1.1: float16 delta, ..."), or why none

    def lines(self) -> list[str]:
        """Return the inspection as text for a person, one fact a line."""
        what = {"model": "a model", "diff": "a weight diff", "unknown": "weights of unknown role"}[self.kind]
        rows = [
            ("kind", f"{self.kind} ({self.evidence})"),
            ("architecture", _architecture(self.architecture, self.model_type)),
            ("size", self.size),
            ("parameters", f"{self.parameters:,} in {self.tensors} tensors"),
            ("dtype", ", ".join(self.dtypes)),
            ("vocab size", str(self.vocab_size) if self.vocab_size is not None else "unknown"),
            (
                "weights",
                f"{self.layout}, {self.shards} shard{'s' if self.shards != 1 else ''}, {format_size(self.total_bytes)}",
            ),
            ("chat template", "yes" if self.chat_template else "none"),
            ("tokenizer", self.tokenizer),
        ]
        if self.kind == "diff":
            rows.append(("family", self.family or "unknown"))
            rows.append(("expects base", self.base or "not recorded (no manifest)"))
            if self.made_by:
                rows.append(("made by", ", ".join(f"{k} {v}" for k, v in self.made_by.items())))
        if self.recovery:
            rows.append(("recovered", _describe_recovery(self.recovery)))
        rows.append(("checksums", self.sums.describe(self.kind)))
        return [f"{self.path}: {what}"] + [f"  {label + ':':<14} {value}" for label, value in rows]

    def to_dict(self) -> dict:
        return asdict(self)


def inspect_path(
    path: str | os.PathLike,
    *,
    check_sums: bool = True,
    listed: dict[str, int] | None = None,
    compact: list[tuple[Path, dict[str, CompactTensor]]] | None = None,
) -> Inspection:
    """Return what the directory holds; ``check_sums=False`` skips hashing the files against ``SHA256SUMS`` (or
    Meta's ``checklist.chk``). ``listed``: every file (name -> size) of a hub repository, of which only some
    were downloaded (an XOR payload's files are not, nor, given their indexes in ``compact``, a compact diff's)."""
    directory = given_path(path, "inspect")
    refuse_unfinished(directory, then="inspect")
    found = detect_files(directory, listed) if directory.is_dir() else None
    if found:
        return _xor_payload(directory, *found, listed)
    manifest = Manifest.load(directory)
    if compact is not None or compact_files(directory):
        config = _read_json(directory / CONFIG_NAME)
        kind, evidence, layout = "diff", "compact weight diff (.wdc files)", "weight-diff compact"
        family = "weight-diff compact (bit-exact: tuned bits XOR raw cast to the tuned dtype)"
        tensors, weight_files = compact_tensor_table(directory, compact)
        size = describe_size(tensors)
        sums = _check_sums(directory, weight_files, hash_files=check_sums)
    else:
        with Checkpoint.open(directory, verify_md5=check_sums) as checkpoint:
            config = _read_json(directory / CONFIG_NAME) or checkpoint.config or {}
            kind, evidence = classify(checkpoint)
            tensors, weight_files, layout = checkpoint.tensors, checkpoint.files, checkpoint.layout
            size = meta.describe(checkpoint) or describe_size(tensors)
            if checkpoint.layout == "meta":
                sums = _meta_sums(checkpoint, checked=check_sums)
            else:
                sums = _check_sums(directory, checkpoint.files, hash_files=check_sums)
            family = _family(checkpoint) if kind != "model" else None
    by_dtype: dict[str, int] = {}
    for info in tensors.values():
        by_dtype[dtype_name(info.dtype)] = by_dtype.get(dtype_name(info.dtype), 0) + info.numel
    embed = _embedding(tensors)
    architectures = config.get("architectures") or [None]
    return Inspection(
        path=str(directory),
        kind=kind,
        evidence=evidence,
        manifest=manifest is not None,
        architecture=architectures[0],
        model_type=config.get("model_type"),
        size=size,
        parameters=sum(info.numel for info in tensors.values()),
        tensors=len(tensors),
        dtypes=dict(sorted(by_dtype.items(), key=lambda item: -item[1])),
        vocab_size=embed.shape[0] if embed is not None else config.get("vocab_size"),
        layout=layout,
        shards=len(weight_files),
        total_bytes=sum(listed[file.name] if compact is not None else file.stat().st_size for file in weight_files),
        chat_template=_has_chat_template(directory),
        base=_expected_base(manifest) if manifest is not None else None,
        made_by=manifest.tool if manifest is not None else None,
        recovery=_read_json(directory / RECOVERY_NAME) or None,
        tokenizer=describe_tokenizer(directory),
        sums=sums,
        family=family,
    )


def _xor_payload(directory: Path, codec: str, reason: str, listed: dict[str, int] | None) -> Inspection:
    """Return what can be said of an XOR payload, whose files cannot be read before they are decoded."""
    sizes = listed if listed is not None else {p.name: p.stat().st_size for p in directory.iterdir() if p.is_file()}
    return Inspection(
        path=str(directory),
        kind="diff",
        evidence=f"an XOR payload: {reason}",
        manifest=False,
        architecture=None,
        model_type=None,
        size="unknown until decoded",
        parameters=0,
        tensors=0,
        dtypes={},
        vocab_size=None,
        layout="xor-files",
        shards=len(sizes),
        total_bytes=sum(sizes.values()),
        chat_template=False,
        base="raw files byte-identical to the publisher's (BELLE: Meta's consolidated.00.pth)",
        made_by=None,
        sums=Sums("none"),
        family=next(f"{f.name} ({f.title})" for f in FAMILIES if f.xor_codec == codec),
    )


def _family(checkpoint: Checkpoint) -> str:
    """Return the diff family this diff looks like and why (the raw side taken as LLaMA's), or why none."""
    try:
        family, reason = detect(evidence_of(checkpoint))
    except UsageError as error:
        return f"not determined: {error}"
    return f"{family.name} ({family.title}: {reason})"


def _describe_recovery(record: dict) -> str:
    tool = record.get("tool", {}).get("weight_diff", "?")
    if record.get("files") is not None:  # an XOR recovery: the publisher's files, checked against its list
        checked = record.get("files_checked")
        count = len(checked) if isinstance(checked, list) else "?"
        verdict = f"{count} of {record['files']} files match the publisher's checksum list"
    elif record.get("verified"):
        verdict = f"verified against the publisher's manifest ({record.get('tensors')} tensors)"
    else:
        verdict = "not verified (the diff had no manifest)"
    family = f" ({record['family']} rule)" if record.get("family") else ""
    return f"by weight-diff {tool} from {record.get('diff')}{family}; {verdict}"


def _embedding(tensors: dict[str, TensorInfo]) -> TensorInfo | None:
    return next((t for n, t in tensors.items() if n.endswith(VOCAB_SUFFIXES[0]) and len(t.shape) == 2), None)


def _architecture(architecture: str | None, model_type: str | None) -> str:
    if architecture and model_type:
        return f"{architecture} ({model_type})"
    return architecture or model_type or "unknown (no config.json)"


def _expected_base(manifest: Manifest) -> str:
    """Return the raw model a diff was made against, as its manifest records it (shape, dtype, parameters)."""
    raws: dict[str, Digest] = {n: r.raw for n, r in manifest.tensors.items() if r.raw is not None}
    embed = next((d for n, d in raws.items() if n.endswith(VOCAB_SUFFIXES[0]) and len(d.shape) == 2), None)
    if embed is not None:
        vocab, hidden = embed.shape
        name = f"LLaMA-{LLAMA_SIZES[hidden]}" if hidden in LLAMA_SIZES else "a model"
        shape = f"{name} (hidden {hidden}, vocab {vocab})"
    else:
        shape = "a model"
    dtypes = sorted({d.dtype for d in raws.values()})
    parameters = sum(math.prod(d.shape) for d in raws.values())
    return f"{shape}, {'/'.join(dtypes)}, {parameters:,} parameters"


def _has_chat_template(directory: Path) -> bool:
    if (directory / CHAT_TEMPLATE_FILE).is_file():
        return True
    return bool(_read_json(directory / "tokenizer_config.json").get("chat_template"))


def _meta_sums(checkpoint: Checkpoint, *, checked: bool) -> Sums:
    """Meta's checklist.chk was checked when the checkpoint opened: a mismatch would have stopped there."""
    path = checkpoint.directory / meta.CHECKLIST_NAME
    if not path.is_file():
        return Sums("none", name=meta.CHECKLIST_NAME)
    listed = len(meta.read_checklist(path))
    return Sums("verified" if checked else "not checked", files=listed, name=f"{meta.CHECKLIST_NAME} (md5)")


def _check_sums(directory: Path, weight_files: list[Path], *, hash_files: bool) -> Sums:
    if not (directory / SUMS_NAME).is_file():
        return Sums("none")
    try:
        if not hash_files:
            return Sums("not checked", files=len(read_sums(directory / SUMS_NAME)))
        checks, notes = check_sums(directory)
    except IntegrityError as error:
        return Sums("mismatch", problems=[str(error)])
    problems = [f"{check.subject} ({check.detail})" for check in checks if not check.ok]
    listed = {check.subject for check in checks}
    problems += [f"{path.name} (not listed)" for path in weight_files if path.name not in listed]
    return Sums("mismatch" if problems else "verified", files=len(checks), problems=problems)
