"""The two jobs, end to end: ``recover`` (raw + diff -> tuned) and ``make_diff`` (tuned - raw -> diff).

Each opens its inputs, plans, checks everything it can before writing, streams the shards through the pipeline,
then writes the small files, ``SHA256SUMS`` and finally ``config.json``.

>>> report = recover("llama-13b-hf", "self-instruct-13b-diff", "self-instruct-13b")
>>> report.verified
True
"""

from __future__ import annotations

import contextlib
import hashlib
import platform
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import safetensors
import torch

from . import __version__, compact, families, files, output, tokenizer, xor
from .checkpoint import Checkpoint
from .checks import ALL_CHECKS, RAW_CHECKS, Finding, Plausibility
from .errors import DiskFullError, IntegrityError, ResultRefused, UsageError
from .manifest import (
    MANIFEST_NAME,
    RECOVERY_NAME,
    SUMS_NAME,
    Manifest,
    TensorRecord,
    dtype_name,
    file_sha256,
    format_sums,
)
from .pipeline import Hashing, Pipeline, TensorDigests
from .plan import Plan, TensorJob, plan_pairs
from .role import classify
from .sources import compact_files, hub, hub_diff, meta
from .untrusted import SMALL_FILE_LIMIT, given_path, read_small
from .verify import expected_file_sums

SAFETENSORS_INDEX = "model.safetensors.index.json"
DIFF_FORMATS = ("float32", "compact")


@dataclass(frozen=True)
class RunReport:
    """What a run did, for the user: counts, sizes, time, and whether the result was checked."""

    out_dir: Path
    tensors: int
    shards: int
    bytes_written: int
    seconds: float
    resumed_shards: int
    manifest: bool  # recover: the diff had a manifest; make-diff: one was written
    verified: bool  # recover: every tensor matched the manifest
    notes: tuple[str, ...] = ()  # what was done to the tokenizer files, or found wrong with them
    family: str | None = None  # recover: the diff family whose rule was applied
    unit: str = "tensors"  # what ``tensors`` counts: "files" for XOR families
    family_reason: str | None = None  # why that family
    checks: tuple[str, ...] = ()  # the family's own checks, as passed
    findings: tuple[Finding, ...] = ()  # the plausibility checks on everything read (checks.py)
    downloads_checked: bool = False  # an input came from the hub, and every file of it matched the hub's checksums
    nonfinite: tuple[str, ...] = ()  # tensors written with NaN or Inf values (this run's shards)
    all_zero: bool = False  # every value written was 0: tuned equals raw (make-diff)
    left_behind: tuple[str, ...] = ()  # input files not copied: not part of a Hugging Face model directory
    ignored: tuple[str, ...] = ()  # .wdc files in the diff's hub repository that its manifest does not name


def recover(
    path_raw: str | Path,
    path_diff: str | Path,
    path_tuned: str | Path,
    *,
    dtype: str = "auto",
    max_shard_size: str | int = "5GB",
    overwrite: bool = False,
    resume: bool = False,
    chat_template: str | None = None,
    verify_md5: bool = True,
    progress: Callable[[int], None] | None = None,
    on_plan: Callable[[Plan], None] | None = None,
    family: str | None = None,
    ignore_checks: bool = False,
    on_finding: Callable[[Finding], None] | None = None,
    keep_download: bool = True,
    transfer: hub.Transfer | None = None,
) -> RunReport:
    """Return the report of writing raw + diff to ``path_tuned`` in Hugging Face format, checked when possible.

    ``family`` names the diff family whose publisher's rule to apply (see ``families``); by default it is
    detected from the diff, and an ambiguous diff is refused with the candidates.

    ``path_raw`` may be Meta's original download (``verify_md5``: check its checklist.chk first, a full read).
    Either input may be a hub repository (``org/name[@revision]``): raw is downloaded first, the diff shard by
    shard while it is recovered; ``keep_download=False`` deletes each diff shard once its tensors are read.
    """
    out = given_path(path_tuned, "--path_tuned")
    for given, flag in ((path_raw, "--path_raw"), (path_diff, "--path_diff")):
        given_path(given, flag)  # an empty one is never taken as the current directory
    if hub.snapshot_dir(path_raw).resolve() == hub.snapshot_dir(path_diff).resolve():
        raise UsageError(
            f"{path_diff}: --path_raw and --path_diff are the same directory; give the diff as --path_diff"
        )
    with output.claim(
        out, [hub.snapshot_dir(path_raw), hub.snapshot_dir(path_diff)], overwrite=overwrite, resume=resume
    ):
        from_hub = hub.hub_spec_for(path_raw) is not None or hub.hub_spec_for(path_diff) is not None
        rule = families.family_named(family) if family is not None else None
        diff_dir = hub.input_dir(path_diff, transfer, weights=False)  # a hub diff: its small files, to tell its kind
        listed = hub.top_level_files(path_diff)  # a hub payload's .enc files are listed before they are fetched
        found = xor.detect_files(diff_dir, listed) if diff_dir.is_dir() else None
        if rule is not None and (found[0] if found else None) != rule.xor_codec:  # forced on another kind of diff
            raise UsageError(
                f"{path_diff}: an XOR payload ({found[1]}), which --family {rule.name} does not read; omit --family"
                if found
                else f"{path_diff}: not an XOR payload (its config.json is JSON, or its weights open as they are), "
                f"which --family {rule.name} needs; omit --family"
            )
        if found:
            chosen = rule or next(f for f in families.FAMILIES if f.xor_codec == found[0])
            reason = found[1]
            raw_dir = hub.input_dir(path_raw, transfer, every_file=True)
            diff_dir = hub.input_dir(path_diff, transfer, every_file=True)
            report = _recover_xor(
                raw_dir, diff_dir, out, chosen, reason, dtype, chat_template, overwrite, resume, progress
            )
            return replace(report, downloads_checked=from_hub)
        if compact.is_compact(diff_dir) or _manifest_says_compact(diff_dir) or hub.compact_on_hub(path_diff):
            if rule is not None and rule.name != "weight-diff":
                raise UsageError(f"{diff_dir}: a compact weight-diff diff, not a {rule.name} diff; omit --family")
            raw_dir = hub.input_dir(path_raw, transfer)
            manifest = Manifest.load(diff_dir)
            promised = expected_file_sums(diff_dir, manifest)
            _check_promised(diff_dir, promised)
            with compact_files.open_compact_files(
                path_diff, diff_dir, promised, keep_download=keep_download, transfer=transfer
            ) as wdc:
                report = _recover_compact(
                    raw_dir, diff_dir, out, manifest, promised, wdc, dtype=dtype, max_shard_size=max_shard_size,
                    overwrite=overwrite, resume=resume, chat_template=chat_template, progress=progress,
                    on_plan=on_plan, verify_md5=verify_md5, ignore_checks=ignore_checks, on_finding=on_finding,
                )  # fmt: skip
            return replace(report, downloads_checked=from_hub, ignored=wdc.ignored)
        raw_dir = hub.input_dir(path_raw, transfer)
        with (
            Checkpoint.open(raw_dir, hidden_size=meta.size_hint(diff_dir), verify_md5=verify_md5) as raw,
            hub_diff.open_diff(
                path_diff, like=raw.tensors, keep_download=keep_download, transfer=transfer, resume=resume
            ) as diff,
        ):
            manifest = Manifest.load(diff_dir)
            _check_promised(diff_dir, expected_file_sums(diff_dir, manifest))
            _check_roles(raw, diff, manifest)
            meta.check_base(raw, diff_dir, "diff")
            if rule is not None:
                reason = "chosen with --family"
            else:
                rule, reason = families.detect(families.evidence_of(diff, raw))
            if manifest is None or rule.name != "weight-diff":
                manifest = None
            plan = plan_pairs(
                raw.tensors,
                diff.tensors,
                other_role="diff",
                out_dtype=dtype,
                max_shard_size=max_shard_size,
                family=rule,
            )
            if manifest is not None:
                check_manifest_covers(manifest, plan)
            tokens = tokenizer.prepare(diff_dir)  # built and checked before the first write
            diff_config = files.read_config(diff_dir)
            plausibility = _check_before_writing(
                plan, raw, diff, diff_config, "diff", has_manifest=manifest is not None, ignore=ignore_checks,
                on_finding=on_finding,
            )  # fmt: skip
            config = tokens.config_with_pad(files.config_with_dtype(diff_config, plan.dtype))
            expected = families.expected_sum(rule, diff_dir)
            sums: dict[str, float] = {}
            checks: list[str] = []

            def on_tensor(job: TensorJob, digests: TensorDigests) -> None:
                if manifest is not None:
                    check_tensor(manifest.tensors[job.name], job, digests)
                if digests.sum is not None:
                    sums[job.name] = digests.sum

            def recovery_record(written: dict[str, bytes]) -> bytes:
                if expected is not None:
                    checks.append(_check_family_sum(rule, expected, sums, plan, raw, config))
                origin = diff.origin if isinstance(diff, hub_diff.HubCheckpoint) else None
                return _recovery_record(diff_dir, manifest, plan, rule, checks, origin)

            report = _run(
                "recover",
                plan,
                raw,
                diff,
                out,
                hashing=Hashing(raw=manifest is not None, result=manifest is not None, sums=expected is not None),
                on_tensor=on_tensor,
                config=config,
                companions=files.companion_files(diff_dir),
                tokens=tokens,
                extra_files={RECOVERY_NAME: recovery_record},
                chat_template=chat_template,
                overwrite=overwrite,
                resume=resume,
                progress=progress,
                on_plan=on_plan,
                has_manifest=manifest is not None,
                plausibility=plausibility,
                on_shard_written=diff.shard_written if isinstance(diff, hub_diff.HubCheckpoint) else None,
                before_finish=diff.wait_checked if isinstance(diff, hub_diff.HubCheckpoint) else None,
                checked_by=_manifest_sha256(diff_dir) if manifest is not None else None,
            )
            return replace(
                report, family=rule.name, family_reason=reason, checks=tuple(checks), downloads_checked=from_hub
            )


def _recover_xor(
    raw_dir: Path,
    diff_dir: Path,
    out: Path,
    rule: families.Family,
    reason: str,
    dtype: str,
    chat_template: str | None,
    overwrite: bool,
    resume: bool,
    progress: Callable[[int], None] | None,
) -> RunReport:
    """Return the report of XORing the payload's files with raw's: the publisher's files, byte for byte.

    A journal, as recover's other paths keep, lists each file once it is in place and checked: --resume keeps
    those (when they still hash as they did) and --overwrite knows them as ours.
    """
    if dtype != "auto" or chat_template is not None:
        raise UsageError(
            f"{rule.title}: the result is the publisher's files byte for byte; --dtype and --chat-template do not "
            "apply (run again without them)"
        )
    started = time.monotonic()
    plan = xor.plan_for(rule.xor_codec, diff_dir, raw_dir)
    produces = [[item.name, item.size] for item in plan.files]
    fingerprint = output.inputs_fingerprint(f"xor {rule.xor_codec}", produces, [diff_dir, raw_dir])
    journal = (
        output.Journal.load(out, fingerprint) if resume else output.Journal(out / output.JOURNAL_NAME, fingerprint)
    )
    kept = journal.finished_shards(frozenset(item.name for item in plan.files)) if resume else frozenset()
    output.check_free_space(out, sum(item.size for item in plan.files if item.name not in kept))

    # Files are written in the payload's order, small clear-text ones among them, and any file can show the raw
    # is not the publisher's: an earlier output set aside by --overwrite is dropped only once every file is in.
    with _undone_unless_a_shard_finished(out, journal, overwrite=overwrite and not resume, whole_run=True):
        journal.save()
        done = xor.apply_xor(
            plan,
            out,
            progress or (lambda nbytes: None),
            done={name: journal.shards[name] for name in kept},
            on_file=journal.record,
        )
        output.drop_aside(out)
    # A record of the run, as recover's other paths leave: inspect says how the model was made, and --overwrite
    # knows the directory as ours.
    record = _xor_record(diff_dir, rule, done)
    files.write_atomic(out / RECOVERY_NAME, record)
    sums = {**done.sums, RECOVERY_NAME: _sha256(record)}
    files.write_atomic(out / SUMS_NAME, format_sums(dict(sorted(sums.items()))).encode())
    journal.remove()
    checks = []
    if done.checked:
        checks.append(f"{len(done.checked)} files match the publisher's MD5/SHA-256 list ({', '.join(done.checked)})")
    if done.unlisted:
        checks.append(
            f"{len(done.unlisted)} files are in no checksum list the payload carries, so they could not be checked "
            f"({', '.join(done.unlisted)}); compare them with the model card's list"
        )
    return RunReport(
        out_dir=out,
        tensors=done.files,
        shards=done.files,
        bytes_written=done.bytes_written,
        seconds=time.monotonic() - started,
        resumed_shards=len(kept),
        manifest=bool(plan.listed),
        verified=bool(done.checked) and not done.unlisted,
        family=rule.name,
        family_reason=reason,
        checks=tuple(checks),
        unit="files",
    )


def _check_family_sum(
    rule: families.Family, expected: float, sums: dict[str, float], plan: Plan, raw: Checkpoint, config: dict
) -> str:
    """Return what passed of the family's integrity sum, computed as its script did; raise when it fails.

    The 2023 scripts summed the state dict of transformers < 4.32, which held each layer's rotary ``inv_freq``
    buffer: those are added from the config, in the raw model's dtype as the 2023 conversions stored them.
    """
    what = "Alpaca's hard-coded sum" if rule.sum_check.source == "alpaca" else f"{families.MODEL_SUM_FILE}"
    missing = [job.name for job in plan.jobs if job.name not in sums]
    if missing:
        return f"{what} not checked: {len(missing)} tensors were kept from an interrupted run (--resume)"
    raw_dtype = next(iter(raw.tensors.values())).dtype
    inv_freq = families.inv_freq_sums(config, raw_dtype)
    got = families.publisher_sum(sums, inv_freq)
    tolerance = rule.sum_check.atol + rule.sum_check.rtol * abs(expected)
    inv_note = f"{len(inv_freq)} rotary inv_freq buffers included, as transformers < 4.32 summed them"
    if not families.sum_passes(rule.sum_check, expected, got):
        hint = " If this diff is WizardLM's (Alpaca's script), use --family wizardlm." if rule.name == "alpaca" else ""
        raise ResultRefused(
            f"{rule.title}'s integrity check failed: {what} is {expected:.4f} (within {tolerance:.2g}), the result "
            f"sums to {got:.4f} ({inv_note}). The raw model is not the publisher's base, or the diff is damaged; "
            f"no model was written.{hint}"
        )
    return f"{what} passed: {got:.4f} against {expected:.4f} (within {tolerance:.2g}; {inv_note})"


def make_diff(
    path_raw: str | Path,
    path_tuned: str | Path,
    path_diff: str | Path,
    *,
    max_shard_size: str | int = "5GB",
    overwrite: bool = False,
    resume: bool = False,
    chat_template: str | None = None,
    verify_md5: bool = True,
    progress: Callable[[int], None] | None = None,
    on_plan: Callable[[Plan], None] | None = None,
    family: str | None = None,
    ignore_checks: bool = False,
    on_finding: Callable[[Finding], None] | None = None,
    diff_format: str = "float32",
    transfer: hub.Transfer | None = None,
) -> RunReport:
    """Return the report of writing the diff tuned - raw, with its manifest, to ``path_diff``.

    ``diff_format`` "float32" writes the 2023-compatible float32 diff; "compact" the bit-exact compact diff.
    ``family`` makes the diff the way that family's publisher did instead (e.g. ``vicuna-v1.1``: a float16
    delta, subtracted in float16); such a diff carries no manifest, as the publisher's did not. Either input may
    be a hub repository, downloaded and checked first.
    """
    if diff_format not in DIFF_FORMATS:
        raise UsageError(f"--format {diff_format}: choose {' or '.join(DIFF_FORMATS)}")
    if diff_format == "compact" and family is not None:
        raise UsageError(f"--format compact and --family {family}: a compact diff is weight-diff's own; choose one")
    out = given_path(path_diff, "--path_diff")
    for given, flag in ((path_raw, "--path_raw"), (path_tuned, "--path_tuned")):
        given_path(given, flag)
    if hub.snapshot_dir(path_raw).resolve() == hub.snapshot_dir(path_tuned).resolve():
        raise UsageError(
            f"{path_tuned}: --path_raw and --path_tuned are the same directory, so the diff would be all zeros; give "
            "the fine-tuned model as --path_tuned"
        )
    rule = families.family_named(family) if family is not None else None
    if rule is not None and not rule.makes_diff:
        makers = ", ".join(f.name for f in families.FAMILIES if f.makes_diff)
        raise UsageError(f"make-diff --family {rule.name}: not supported; choose one of {makers}")
    if rule is not None and rule.name == "weight-diff":
        rule = None
    with output.claim(
        out, [hub.snapshot_dir(path_raw), hub.snapshot_dir(path_tuned)], overwrite=overwrite, resume=resume
    ):
        raw_dir, tuned_dir = hub.input_dir(path_raw, transfer), hub.input_dir(path_tuned, transfer)
        with (
            Checkpoint.open(raw_dir, hidden_size=meta.size_hint(tuned_dir), verify_md5=verify_md5) as raw,
            Checkpoint.open(tuned_dir) as tuned,
        ):
            for checkpoint, role in ((raw, "raw model"), (tuned, "tuned model")):
                if classify(checkpoint)[0] == "diff":
                    raise UsageError(f"{checkpoint.directory}: looks like a weight diff, not a {role}")
            meta.check_base(raw, tuned_dir, "tuned model")
            if diff_format == "compact":
                return _make_compact(
                    raw, tuned, out, max_shard_size=max_shard_size, overwrite=overwrite, resume=resume,
                    chat_template=chat_template, progress=progress, on_plan=on_plan, ignore_checks=ignore_checks,
                    on_finding=on_finding,
                )  # fmt: skip
            plan = plan_pairs(
                raw.tensors,
                tuned.tensors,
                other_role="tuned model",
                out_dtype="auto" if rule else "float32",
                max_shard_size=max_shard_size,
                family=rule,
            )
            tuned_config = files.read_config(tuned_dir)
            plausibility = _check_before_writing(
                plan, raw, tuned, tuned_config, "tuned model", has_manifest=False, ignore=ignore_checks,
                on_finding=on_finding,
            )  # fmt: skip
            records: dict[str, TensorRecord] = {}

            def on_tensor(job: TensorJob, digests: TensorDigests) -> None:
                if rule is None:
                    records[job.name] = TensorRecord(raw=digests.raw, diff=digests.diff, result=digests.result)

            def manifest_bytes(written: dict[str, bytes]) -> bytes:
                manifest = Manifest(
                    rules=_rules(plan),
                    tool=_tool_versions(),
                    tensors={job.name: records[job.name] for job in plan.jobs},
                    files={name: _sha256(data) for name, data in written.items()},
                )
                return manifest.to_json().encode()

            tokens = tokenizer.prepare(tuned_dir)
            config = tokens.config_with_pad(files.config_with_dtype(tuned_config, plan.dtype))
            report = _run(
                "make-diff",
                plan,
                raw,
                tuned,
                out,
                hashing=Hashing(raw=True, diff=True, result=True) if rule is None else Hashing(),
                on_tensor=on_tensor,
                config=config,
                companions=files.companion_files(tuned_dir),
                tokens=tokens,
                extra_files={MANIFEST_NAME: manifest_bytes} if rule is None else {},
                chat_template=chat_template,
                overwrite=overwrite,
                resume=resume,
                progress=progress,
                on_plan=on_plan,
                has_manifest=rule is None,
                records=records if rule is None else None,
                plausibility=plausibility,
            )
            return replace(
                report, family=rule.name if rule else "weight-diff", downloads_checked=raw_dir != Path(path_raw)
            )


def _run(
    mode: str,
    plan: Plan,
    raw: Checkpoint,
    other: Checkpoint,
    out: Path,
    *,
    hashing: Hashing,
    on_tensor: Callable[[TensorJob, TensorDigests], None] | None = None,
    config: dict,
    companions: list[Path],
    tokens: tokenizer.OutputTokenizer,
    extra_files: dict[str, Callable[[dict[str, bytes]], bytes]],
    chat_template: str | None,
    overwrite: bool,
    resume: bool,
    progress: Callable[[int], None] | None,
    on_plan: Callable[[Plan], None] | None,
    has_manifest: bool,
    records: dict[str, TensorRecord] | None = None,
    plausibility: Plausibility | None = None,
    stream: Callable[[frozenset[str], Callable[[str, str], None]], None] | None = None,
    on_shard_written: Callable[[list[str]], None] | None = None,
    before_finish: Callable[[list[str]], None] | None = None,
    other_identity: Path | str | None = None,
    checked_by: str | None = None,
) -> RunReport:
    """Run a planned job into ``out``; ``records`` collects make-diff's tensor hashes, across --resume too.

    ``stream(skip, on_shard)`` writes the shards instead of the float32 pipeline (compact diffs, which check
    their tensors and collect NaN/Inf themselves: ``on_tensor`` serves the pipeline only);
    ``on_shard_written`` hears the tensors of each shard once it is on disk (and of those kept by --resume);
    ``before_finish`` is waited for before a shard is renamed into place (a diff read while it downloads);
    ``other_identity`` names the second input for --resume where ``other`` does not (a compact diff's folder or
    hub commit: its stream reads the diff, ``other`` is raw again); ``checked_by``: the SHA-256 of the manifest
    every written tensor is checked against, which then names the inputs for --resume instead of their files'
    sizes and times (a diff file downloaded again after damage, or touched, does not block --resume; a tensor from
    other inputs is refused by its hash).
    """
    started = time.monotonic()
    nonfinite: list[str] = []
    zero_tensors: list[str] = []

    def look(job: TensorJob, digests: TensorDigests) -> None:
        if digests.nonfinite:
            nonfinite.append(job.name)
        elif digests.all_zero:
            zero_tensors.append(job.name)
        if on_tensor is not None:
            on_tensor(job, digests)

    identities = [_input_identity(raw), other_identity if other_identity is not None else _input_identity(other)]
    if checked_by is not None:
        identities = [f"checked against manifest {checked_by}"]
    fingerprint = output.plan_fingerprint(mode, plan, identities)
    # Everything that can refuse the run does so before the first write.
    journal = (
        output.Journal.load(out, fingerprint) if resume else output.Journal(out / output.JOURNAL_NAME, fingerprint)
    )
    # The small files are read, and a chat template set, before the first write: a broken tokenizer_config.json
    # must refuse the run, not fail it after every shard was written.
    small: dict[str, bytes] = {}
    for path in companions:
        small[path.name] = read_small(path, limit=SMALL_FILE_LIMIT, what="model's companion file")
    small.update(tokens.files)
    if chat_template is not None:
        small["tokenizer_config.json"] = files.with_chat_template(
            small.get("tokenizer_config.json", b""), chat_template, where=str(other.directory / "tokenizer_config.json")
        )
        if files.CHAT_TEMPLATE_FILE in small:  # transformers 5 prefers this file: it must say the same
            small[files.CHAT_TEMPLATE_FILE] = chat_template.encode()
    done = journal.finished_shards()
    output.check_free_space(out, sum(s.nbytes for s in plan.shards if s.file_name not in done))
    output.make_output_dir(out)
    output.remove_partials(out)
    if records is not None:
        records.update({name: TensorRecord.from_dict(body) for name, body in journal.tensors.items()})
    shard_jobs = {shard.file_name: shard.jobs for shard in plan.shards}
    written = on_shard_written or (lambda names: None)
    for name in done:
        written([job.name for job in shard_jobs[name]])

    def on_shard(name: str, digest: str) -> None:
        kept = {job.name: asdict(records[job.name]) for job in shard_jobs[name]} if records is not None else None
        journal.record(name, digest, kept)
        output.drop_aside(out)  # an earlier output --overwrite set aside: this run has a shard of its own now
        written([job.name for job in shard_jobs[name]])

    if on_plan is not None:
        on_plan(plan)
    with _undone_unless_a_shard_finished(out, journal, overwrite=overwrite and not resume):
        journal.save()
        if stream is not None:
            stream(done, on_shard)
        else:
            pipeline = Pipeline(
                plan,
                raw,
                other,
                out,
                mode=mode,
                hashing=hashing,
                on_tensor=look,
                on_shard=on_shard,
                progress=progress or (lambda nbytes: None),
                observe=plausibility.observe if plausibility is not None else None,
                before_finish=before_finish,
            )
            pipeline.run(skip=done)

        if len(plan.shards) > 1 and plan.shards[0].file_name.endswith(".safetensors"):  # .wdc files list themselves
            index = {"metadata": {"total_size": plan.total_size}, "weight_map": plan.weight_map}
            small[SAFETENSORS_INDEX] = files.json_bytes(index)
        config_bytes = files.json_bytes(config)
        for name, make in extra_files.items():
            small[name] = make({**small, files.CONFIG_NAME: config_bytes})
        sums = dict(journal.shards)
        for name, data in small.items():
            files.write_atomic(out / name, data)
            sums[name] = _sha256(data)
        sums[files.CONFIG_NAME] = _sha256(config_bytes)
        files.write_atomic(out / SUMS_NAME, format_sums(sums).encode())
        output.drop_aside(out)
        files.write_atomic(out / files.CONFIG_NAME, config_bytes)  # last: from now on the directory loads as a model
    journal.remove()
    return RunReport(
        out_dir=out,
        tensors=len(plan.jobs),
        shards=len(plan.shards),
        bytes_written=plan.total_size,
        seconds=time.monotonic() - started,
        resumed_shards=len(done),
        manifest=has_manifest,
        verified=has_manifest and mode == "recover",
        notes=tokens.notes,
        findings=tuple(plausibility.at_end()) if plausibility is not None else (),
        nonfinite=tuple(nonfinite),
        all_zero=bool(plan.jobs) and not done and len(zero_tensors) == len(plan.jobs),
        left_behind=tuple(files.left_behind(other.directory)),
    )


@contextlib.contextmanager
def _undone_unless_a_shard_finished(
    out: Path, journal: output.Journal, *, overwrite: bool, whole_run: bool = False
) -> Iterator[None]:
    """Run a job's writes so that a run stopped before its first shard leaves the output as it found it.

    ``overwrite``: an earlier output in ``out`` is first moved into a hidden folder (``output.set_aside``).
    On any failure or interruption, what is half-written goes. When no shard finished (none journaled, none under
    its name: a shard renamed a moment before its journal entry keeps the journal, which marks the directory as
    ours), the journal goes too and the earlier output comes back: the same command simply runs again. A full
    disk keeps the journal, for --resume. ``whole_run`` (XOR recoveries, whose every file can still refuse the
    raw): a refusal at any point removes this run's files and brings the earlier output back; so does, in any run,
    a result refused as a whole (``ResultRefused``).
    """
    moved = False
    try:
        if overwrite and any(out.iterdir()):
            output.set_aside(out)
        moved = True
        yield
    except BaseException as exc:
        # The writers remove their own partial files, but a Ctrl-C can land between a file's creation and the
        # code that would clean it up; the lanes have stopped by now, so whatever is still partial goes.
        output.remove_partials(out)
        if isinstance(exc, DiskFullError):
            raise
        if (whole_run and not isinstance(exc, KeyboardInterrupt)) or isinstance(exc, ResultRefused):
            for name in journal.shards:
                (out / name).unlink(missing_ok=True)
            journal.shards.clear()
        new = {path.name for path in out.iterdir()} - {output.JOURNAL_NAME, output.ASIDE_NAME} if moved else set()
        if not journal.shards and not new:
            journal.remove()
            output.put_back(out)
        raise


def _check_before_writing(
    plan: Plan,
    raw: Checkpoint,
    other: Checkpoint | None,
    other_config: dict,
    other_role: str,
    *,
    has_manifest: bool,
    ignore: bool,
    on_finding: Callable[[Finding], None] | None,
    checks: tuple[str, ...] = ALL_CHECKS,
) -> Plausibility:
    """Run the plausibility checks on configs and a sample of rows (``other`` None: raw's only, for ``checks``
    that need no other values); refuse on certain evidence, report the rest."""
    raw_config = files.read_config(raw.directory) if (raw.directory / files.CONFIG_NAME).is_file() else {}
    plausibility = Plausibility(raw_config, other_config, other_role=other_role, has_manifest=has_manifest,
                                ignore=ignore, checks=checks)  # fmt: skip
    # A diff still downloading is sampled only where its shard is here: waiting for every shard would undo the
    # pipelining; the rest is checked as it streams, and reported at the end.
    from_hub = isinstance(other, hub_diff.HubCheckpoint)
    sampled = [job for job in plan.jobs if not from_hub or other.is_here(job.other)]
    with other.sampling() if from_hub else contextlib.nullcontext():
        for finding in plausibility.before_writing(sampled, raw, other):
            if on_finding is not None:
                on_finding(finding)
    return plausibility


def _input_identity(checkpoint: Checkpoint) -> Path | str:
    """A hub diff is named by its repository and commit: its local files appear and go while it is read."""
    return checkpoint.origin if isinstance(checkpoint, hub_diff.HubCheckpoint) else checkpoint.directory


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _manifest_sha256(diff_dir: Path) -> str:
    """The SHA-256 of a diff's manifest file (read and checked already): what a run checked against it is made of."""
    return file_sha256(diff_dir / MANIFEST_NAME)


def _check_promised(directory: Path, promised: dict[str, str]) -> None:
    """Refuse, before anything reads or writes them, a config or companion file that differs from what the diff's
    checksums promise, or that they list but the diff lacks: it was edited or damaged after make-diff."""
    for name, digest in sorted(promised.items()):
        if not (files.is_companion(name) or name in (files.CONFIG_NAME, MANIFEST_NAME)):
            continue  # weights are checked tensor by tensor against the manifest
        path = directory / name
        if not path.is_file():
            raise IntegrityError(
                f"{path}: listed in the diff's checksums but missing; download it again. Nothing was written"
            )
        if file_sha256(path) != digest:
            raise IntegrityError(
                f"{path}: differs from the diff's checksums (edited or damaged after make-diff); download it again. "
                "Nothing was written"
            )


def _check_roles(raw: Checkpoint, diff: Checkpoint, manifest: Manifest | None) -> None:
    """Refuse a diff given as the raw model, or a model given as the diff, where the weights tell."""
    if classify(raw)[0] == "diff":
        raise UsageError(
            f"{raw.directory}: looks like a weight diff, not a raw model (its norm weights are near 0); "
            "--path_raw takes the base LLaMA model. Were --path_raw and --path_diff swapped?"
        )
    # A diff from the hub is checked when the file with its final norm arrives (sources/hub.py), not waited for.
    if manifest is None and not isinstance(diff, hub_diff.HubCheckpoint) and classify(diff)[0] == "model":
        raise UsageError(
            f"{diff.directory}: looks like a model, not a weight diff (its norm weights are near 1); "
            "--path_diff takes the published diff. Is it already recovered?"
        )


def _check_manifest_names(manifest: Manifest, plan: Plan) -> None:
    """Refuse when the diff holds tensors its manifest does not list, or lacks some it does: a mixed download."""
    names = {job.name for job in plan.jobs}
    missing, extra = sorted(set(manifest.tensors) - names), sorted(names - set(manifest.tensors))
    if missing or extra:
        raise IntegrityError(
            f"the diff's tensors differ from its manifest ({len(missing)} missing, {len(extra)} unexpected; first: "
            f"{(missing or extra)[0]}); the download is incomplete or mixed: download the diff again"
        )


def check_manifest_covers(manifest: Manifest, plan: Plan) -> None:
    """Refuse before any write when the diff's tensors, or the raw's dtypes, differ from what the manifest says."""
    _check_manifest_names(manifest, plan)
    for job in plan.jobs:
        expected = manifest.tensors[job.name].raw
        if expected.dtype != dtype_name(job.raw.dtype) or expected.shape != list(job.raw.shape):
            raise IntegrityError(
                f"raw tensor {job.name} is {dtype_name(job.raw.dtype)} {list(job.raw.shape)}; the diff was made "
                f"against {expected.dtype} {expected.shape}. Your raw model was converted differently (precision "
                "or size) from the publisher's base"
            )
        stored = manifest.tensors[job.name].diff
        if stored.dtype != dtype_name(job.other.dtype) or stored.shape != list(job.other.shape):
            raise IntegrityError(
                f"diff tensor {job.name} in {job.other.file.name} is {dtype_name(job.other.dtype)} "
                f"{list(job.other.shape)}; its manifest says {stored.dtype} {stored.shape}: download the diff again"
            )


def check_tensor(record: TensorRecord, job: TensorJob, digests: TensorDigests) -> None:
    """Stop the run at the first tensor whose raw input or recovered result is not the publisher's."""
    if digests.raw is not None and digests.raw.sha256 != record.raw.sha256:
        raise IntegrityError(
            f"raw tensor {job.name} (in {job.raw.file}) differs from the one the diff was made against: your raw "
            "model is not the publisher's base (another conversion, precision or size). No model was written"
        )
    if digests.result is not None and digests.result.sha256 != record.result.sha256:
        raise IntegrityError(
            f"diff tensor {job.name} (in {job.other.file}) is damaged: the raw model matched, but raw + diff does "
            f"not give the publisher's result. Download {job.other.file.name} again. No model was written"
        )


def _rules(plan: Plan) -> dict:
    vocab = [job for job in plan.jobs if job.added_rows]
    return {
        "arithmetic_dtype": "float32",
        "recover": "result = float32(raw) + diff",
        "added_rows": "mean of the raw rows, accumulated in float64, rounded to float32 (open-instruct/Alpaca rule)",
        "raw_vocab_size": vocab[0].raw.rows if vocab else None,
        "tuned_vocab_size": vocab[0].other.rows if vocab else None,
    }


def _recovery_record(
    diff_dir: Path,
    manifest: Manifest | None,
    plan: Plan,
    family: families.Family,
    checks: list[str],
    origin: str | None = None,
) -> bytes:
    """Return ``weight-diff-recovery.json``: how this model was made, so ``inspect`` can say it later.

    It is written only when the run finished, so ``verified`` means every tensor matched the manifest. ``origin``
    names a diff from the hub (``hf://org/name@commit``).
    """
    manifest_path = diff_dir / MANIFEST_NAME
    body = {
        "format": "weight-diff-recovery",
        "version": 1,
        "diff": origin or str(diff_dir.resolve()),
        "diff_manifest_sha256": _sha256(manifest_path.read_bytes()) if manifest is not None else None,
        "verified": manifest is not None,
        "family": family.name,
        "family_checks": checks,
        "tensors": len(plan.jobs),
        "dtype": dtype_name(plan.dtype),
        "tool": _tool_versions(),
    }
    return files.json_bytes(body)


def _xor_record(diff_dir: Path, family: families.Family, done: xor.XorReport) -> bytes:
    """Return ``weight-diff-recovery.json`` for an XOR recovery: the publisher's files, and how many were checked."""
    body = {
        "format": "weight-diff-recovery",
        "version": 1,
        "diff": str(diff_dir.resolve()),
        "verified": bool(done.checked) and not done.unlisted,
        "family": family.name,
        "files": done.files,
        "files_checked": list(done.checked),
        "tool": _tool_versions(),
    }
    return files.json_bytes(body)


def _tool_versions() -> dict:
    return {
        "weight_diff": __version__,
        "torch": torch.__version__.split("+")[0],
        "safetensors": safetensors.__version__,
        "python": platform.python_version(),
    }


def _make_compact(
    raw: Checkpoint, tuned: Checkpoint, out: Path, *, max_shard_size, overwrite, resume, chat_template, progress,
    on_plan, ignore_checks, on_finding,
) -> RunReport:  # fmt: skip
    """Write the compact diff of ``tuned`` against ``raw``; its manifest pins every tuned tensor in its own dtype."""
    plan = compact.plan_make(raw.tensors, tuned.tensors, max_shard_size=max_shard_size)
    records: dict[str, TensorRecord] = {}
    nonfinite: list[str] = []

    def on_tensor(job: compact.CompactJob, record: TensorRecord, odd: bool) -> None:
        records[job.name] = record
        if odd:
            nonfinite.append(job.name)

    def manifest_bytes(written: dict[str, bytes]) -> bytes:
        added = [job for job in plan.jobs if job.raw is not None and job.raw_rows != job.rows]
        rules = {
            "diff_format": "compact",
            "recover": "tuned bits = decoded block XOR bits of raw cast to the tuned dtype; rows with no raw "
            "counterpart are stored as they are (see the .wdc index)",
            "files": [shard.file_name for shard in plan.shards],
            "raw_vocab_size": added[0].raw_rows if added else None,
            "tuned_vocab_size": added[0].rows if added else None,
        }
        tensors = {job.name: records[job.name] for job in plan.jobs}
        sums = {name: _sha256(data) for name, data in written.items()}
        return Manifest(rules=rules, tool=_tool_versions(), tensors=tensors, files=sums).to_json().encode()

    def stream(skip: frozenset[str], on_shard: Callable[[str, str], None]) -> None:
        runner = compact.CompactStream(plan, raw, out, progress=progress or (lambda nbytes: None))
        runner.encode(tuned, skip=skip, on_tensor=on_tensor, on_shard=on_shard)

    tokens = tokenizer.prepare(tuned.directory)  # the same tokenizer.json as recover writes, as for a float32 diff
    tuned_config = files.read_config(tuned.directory)
    plausibility = _check_before_writing(
        plan, raw, tuned, tuned_config, "tuned model", has_manifest=False, ignore=ignore_checks, on_finding=on_finding
    )
    report = _run(
        "make-diff", plan, raw, tuned, out, hashing=Hashing(), plausibility=plausibility,
        config=tokens.config_with_pad(files.config_with_dtype(tuned_config, plan.dtype)),
        companions=files.companion_files(tuned.directory), tokens=tokens, extra_files={MANIFEST_NAME: manifest_bytes},
        chat_template=chat_template, overwrite=overwrite, resume=resume, progress=progress, on_plan=on_plan,
        has_manifest=True, records=records, stream=stream,
    )  # fmt: skip
    written = sum((out / shard.file_name).stat().st_size for shard in plan.shards)
    return replace(report, bytes_written=written, nonfinite=tuple(nonfinite))


def _recover_compact(
    raw_dir: Path, diff_dir: Path, out: Path, manifest: Manifest | None, promised: dict[str, str],
    wdc: compact_files.LocalFiles | compact_files.HubFiles, *, dtype,
    max_shard_size, overwrite, resume, chat_template, progress, on_plan, verify_md5, ignore_checks, on_finding,
) -> RunReport:  # fmt: skip
    """Recover the tuned model bit for bit from a compact diff, each tensor checked against its manifest
    (``promised``: the SHA-256 the diff's checksums give its files, to name a file of another diff; ``wdc``: its
    ``.wdc`` files, here or downloading)."""
    with Checkpoint.open(raw_dir, hidden_size=meta.size_hint(diff_dir), verify_md5=verify_md5) as raw:
        if classify(raw)[0] == "diff":
            raise UsageError(f"{raw_dir}: looks like a weight diff, not a raw model; --path_raw takes the base model")
        if manifest is not None:
            missing = [name for name in manifest.compact_files or [] if name not in wdc.names]
            if missing and wdc.origin is not None:
                raise IntegrityError(f"{wdc.origin}: {missing[0]}, a compact file the diff's manifest names, is not in "
                                     "the repository; ask its publisher. Nothing was written")  # fmt: skip
            if missing:
                raise IntegrityError(f"{diff_dir / missing[0]}: compact file named in the manifest is missing; "
                                     "download it again")  # fmt: skip
        plan = compact.plan_recover(
            raw.tensors, wdc.indexes, dtype=dtype, max_shard_size=max_shard_size, manifest=manifest
        )
        if manifest is not None:
            _check_compact_covers(manifest, plan)

        nonfinite: list[str] = []

        def on_tensor(job: compact.CompactJob, record: TensorRecord, odd: bool) -> None:
            if odd:
                nonfinite.append(job.name)
            if manifest is None:
                return
            expected = manifest.tensors[job.name]
            if record.result.sha256 == expected.result.sha256:
                return
            where = job.other.file
            # Hashed only on a mismatch; a file from the hub was checked against them as it arrived.
            if where.name in promised and where.is_file() and file_sha256(where) != promised[where.name]:
                raise IntegrityError(
                    f"tensor {job.name} does not match the diff's manifest, and {where} differs from the diff's "
                    "checksums: a file of another diff, or changed after make-diff; download it again. No model "
                    "was written"
                )
            if job.raw is not None:  # every block passed its checksum: the diff is intact, the raw is not the base
                raise IntegrityError(
                    f"raw tensor {job.name} (in {job.raw.file}) differs from the one the diff was made against (the "
                    "diff's blocks are intact, the result is not the publisher's): your raw model is not the "
                    "publisher's base (another conversion, precision or size). No model was written"
                )
            raise IntegrityError(
                f"tensor {job.name} (in {job.other.file}) does not match the diff's manifest: the manifest and the "
                "compact files come from different diffs; download the diff again. No model was written"
            )

        def stream(skip: frozenset[str], on_shard: Callable[[str, str], None]) -> None:
            runner = compact.CompactStream(plan, raw, out, progress=progress or (lambda nbytes: None))
            runner.decode(wdc, skip=skip, on_tensor=on_tensor, on_shard=on_shard)

        tokens = tokenizer.prepare(diff_dir)  # built and checked before the first write
        diff_config = files.read_config(diff_dir)
        plausibility = _check_before_writing(  # the blocks are XORed bits, not differences: raw's checks only
            plan, raw, None, diff_config, "diff", has_manifest=manifest is not None, ignore=ignore_checks,
            on_finding=on_finding, checks=RAW_CHECKS,
        )  # fmt: skip
        ours = families.family_named("weight-diff")

        def record(written) -> bytes:
            return _recovery_record(diff_dir, manifest, plan, ours, [], wdc.origin)

        report = _run(
            "recover", plan, raw, raw, out, hashing=Hashing(), plausibility=plausibility,
            config=tokens.config_with_pad(files.config_with_dtype(diff_config, plan.dtype)),
            companions=files.companion_files(diff_dir), tokens=tokens,
            extra_files={RECOVERY_NAME: record},
            chat_template=chat_template, overwrite=overwrite, resume=resume, progress=progress, on_plan=on_plan,
            has_manifest=manifest is not None, stream=stream, other_identity=wdc.origin or diff_dir,
            checked_by=_manifest_sha256(diff_dir) if manifest is not None else None,
        )  # fmt: skip
        return replace(
            report, family="weight-diff compact", family_reason="its weights are .wdc files", nonfinite=tuple(nonfinite)
        )


def _manifest_says_compact(diff_dir: Path) -> bool:
    """Whether the diff's manifest describes a compact diff (its .wdc files may all be missing: say so)."""
    if not diff_dir.is_dir() or not (diff_dir / MANIFEST_NAME).is_file():
        return False
    try:
        manifest = Manifest.load(diff_dir)
    except IntegrityError:
        return False  # refused with its own message where the manifest is read
    return manifest is not None and manifest.rules.get("diff_format") == "compact"


def _check_compact_covers(manifest: Manifest, plan: Plan) -> None:
    """Refuse before any write when the compact files' tensors differ from the manifest's (each file's dtypes and
    shapes were held against it while planning: ``compact.plan_recover``)."""
    _check_manifest_names(manifest, plan)
