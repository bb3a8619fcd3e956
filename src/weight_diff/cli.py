"""The ``weight-diff`` command line: parse, call the library, turn its errors into one line and an exit status."""

from __future__ import annotations

import functools
import os
import re
import signal
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

import click

from . import __version__, heap
from .errors import Interrupted, WeightDiffError, first_line
from .sizes import format_size

EXAMPLES = """
\b
Examples:
  weight-diff recover --path_raw llama-13b-hf --path_diff self-instruct-13b-diff --path_tuned self-instruct-13b
  weight-diff make-diff --path_raw llama-13b-hf --path_tuned my-finetune --path_diff my-finetune-diff
  weight-diff demo
"""


DTYPES = click.Choice(["auto", "float32", "bfloat16", "float16"])


class _Stop(click.ClickException):
    """A library error shown as one line, with the library's exit status."""

    def __init__(self, message: str, exit_code: int) -> None:
        super().__init__(message)
        self.exit_code = exit_code

    def show(self, file=None) -> None:
        click.echo(f"error: {one_line(self.format_message())}", err=True)


def one_line(message: str) -> str:
    """Return a message with control characters escaped: a tensor or file name holding a newline or a terminal
    escape sequence must not split the error line or drive the terminal."""
    return "".join(char if char.isprintable() else repr(char)[1:-1] for char in message)


STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)


def _interrupt_once(signum, frame) -> None:
    """Stop the run at the first Ctrl-C or SIGTERM, and ignore those that follow: from then on the run only cleans
    up and exits, which a second signal could cut short (files half removed) or turn into a traceback from
    the interpreter's shutdown (two Ctrl-C 3 ms apart did)."""
    for signum in STOP_SIGNALS:
        signal.signal(signum, signal.SIG_IGN)
    raise KeyboardInterrupt


# An option named in a message's advice ("--dtype bfloat16"), not a path that holds "--" (a hub cache's).
ADVISES_OPTION = re.compile(r"(^|[\s(`])--[a-z]")
# The parameter naming each writing command's output: an interrupted run of these can be resumed there.
OUTPUTS = {"recover": "path_tuned", "make-diff": "path_diff"}


def reports_errors(command: Callable) -> Callable:
    """Run a command so that every failure is one clear line on stderr and a non-zero status, not a traceback."""

    @functools.wraps(command)
    def wrapper(*args, **kwargs):
        context = click.get_current_context()
        debug = context.find_root().params.get("debug", False)
        held: list[int] = []  # signals that came while the libraries loaded
        previous = {signum: signal.signal(signum, functools.partial(_hold, held)) for signum in STOP_SIGNALS}
        try:
            try:
                _load_libraries()
            finally:
                for signum in STOP_SIGNALS:
                    signal.signal(signum, _interrupt_once)
            if held:  # now, where an interruption is safe
                _interrupt_once(held[0], None)
            return command(*args, **kwargs)
        except KeyboardInterrupt:
            if debug:
                raise
            error = Interrupted(_interrupted(context.info_name, kwargs))
            raise _Stop(str(error), error.exit_code) from None
        except WeightDiffError as error:
            if debug:
                raise
            message = str(error)
            # A run stopped by what it found while writing, whose own advice names no option: how to go on.
            if not ADVISES_OPTION.search(message) and "Nothing was written" not in message:
                message += _kept(context.info_name, kwargs)
            raise _Stop(message, error.exit_code) from None
        except OSError as error:
            if debug:
                raise
            where = f"{error.filename}: " if error.filename else ""
            raise _Stop(f"{where}{error.strerror or error}{_kept(context.info_name, kwargs)}", 1) from None
        except (click.ClickException, click.Abort, click.exceptions.Exit, SystemExit):
            raise
        except Exception as error:  # a bug or a case nobody foresaw: still one line, and how to learn more
            if debug:
                raise
            raise _Stop(
                f"unexpected {type(error).__name__}: {first_line(error)}; run again with --debug for details and "
                "report it",
                1,
            ) from None
        finally:
            for signum, handler in previous.items():
                if signal.getsignal(signum) is _interrupt_once:  # after a stop, later signals stay ignored
                    signal.signal(signum, handler)

    return wrapper


def _hold(held: list[int], signum: int, frame) -> None:
    """While the libraries load: note the first stop and say it is coming; a second stops at once (nothing has
    been written yet), for a load that hangs."""
    if held:
        sys.stderr.write("error: interrupted before anything was written; run the same command again\n")
        os._exit(130)
    held.append(signum)
    sys.stderr.write("stopping once the libraries have loaded (press Ctrl-C again to stop now)\n")


def _load_libraries() -> None:
    """Import torch and the other compiled libraries every command uses, with Ctrl-C held until they are loaded.

    A KeyboardInterrupt raised while a compiled module initialises crashed the interpreter (a segmentation fault,
    an abort, "cannot load module more than once"), or was swallowed there and the run went on regardless.
    """
    import numpy  # noqa: F401
    import safetensors.torch  # noqa: F401
    import torch  # noqa: F401
    import zstandard  # noqa: F401


def _resume_with(command: str | None, options: dict) -> str | None:
    """Return how to go on ("--resume", or "--resume in place of --overwrite") where a writing command left the
    journal of its finished shards in its output, None where it left nothing to resume."""
    out = options.get(OUTPUTS.get(command or "", ""))
    if not out:
        return None
    try:
        from .output import JOURNAL_NAME
    except Exception:  # stopped while torch was still being imported (it cannot be imported again): nothing written
        return None
    if not (Path(out) / JOURNAL_NAME).is_file():
        return None
    return "--resume in place of --overwrite" if options.get("overwrite") else "--resume"


def _interrupted(command: str | None, options: dict) -> str:
    """Say what an interruption left: a run to resume only where a writing command left its journal."""
    if command not in OUTPUTS:
        return "interrupted"
    how = _resume_with(command, options)
    if how:
        return f"interrupted; finished shards were kept. Run the same command with {how} to continue"
    return "interrupted before anything was written; run the same command again"


def _kept(command: str | None, options: dict) -> str:
    """After an error that stopped a run (a damaged input, a failing disk): how to go on from its finished shards."""
    how = _resume_with(command, options)
    return f"; the shards finished before were kept: once that is fixed, run the same command with {how}" if how else ""


def _path_option(name: str, help_text: str) -> Callable:
    """An option spelled both ``--path_raw`` (the model card's spelling) and ``--path-raw``; ``~`` is the home
    folder, as the shell makes it in ``--path_raw ~/x`` but not in ``--path_raw=~/x``."""
    return click.option(
        f"--{name}",
        f"--{name.replace('_', '-')}",
        name,
        required=True,
        type=click.Path(),
        callback=_home,
        help=help_text,
    )


def _home(context: click.Context, parameter: click.Parameter, value: str | None) -> str | None:
    """Expand a leading ``~``, which the shell leaves alone after ``=`` (``--path_tuned=~/x``)."""
    return os.path.expanduser(value) if value and value.startswith("~") else value


_common_output_options = [
    click.option(
        "--max-shard-size",
        "--max_shard_size",
        default="5GB",
        show_default=True,
        help="Largest output shard, e.g. 5GB, 500MB, 2GiB.",
    ),
    click.option(
        "--overwrite", is_flag=True, help="Replace a non-empty output directory (never one holding an input)."
    ),
    click.option("--resume", is_flag=True, help="Finish an interrupted run in the same output directory."),
    click.option(
        "--chat-template",
        "--chat_template",
        default=None,
        metavar="NAME|FILE",
        help="Write a chat template into tokenizer_config.json (built-in: open-instruct).",
    ),
    click.option("--quiet", "-q", is_flag=True, help="No progress bar."),
]


_no_md5_option = click.option(
    "--no-md5",
    "--no_md5",
    "no_md5",
    is_flag=True,
    help="Skip the md5 check of Meta's checklist.chk (a full read of the raw model) when the raw is Meta's download.",
)


_ignore_checks_option = click.option(
    "--ignore-checks",
    "--ignore_checks",
    is_flag=True,
    help="Go on although a plausibility check found that raw is not the base (config, precision).",
)


class _Findings:
    """Prints the plausibility checks' warnings as they come (before the first write) and the rest at the end."""

    def __init__(self) -> None:
        self.warned: set[str] = set()

    def early(self, finding) -> None:
        if finding.severity != "pass":
            click.echo(f"warning: {finding.message}", err=True)
            self.warned.add(finding.check)

    def late(self, findings) -> None:
        for finding in findings:
            if finding.severity != "pass" and finding.check not in self.warned:
                self.early(finding)


def _output_options(command: Callable) -> Callable:
    for option in reversed(_common_output_options):
        command = option(command)
    return command


class _Progress:
    """One tqdm bar in bytes on stderr for downloading and writing together, with the rate of each.

    Its total grows as work becomes known: each file about to be downloaded, then the plan's bytes to write.
    """

    def __init__(self, quiet: bool, label: str) -> None:
        self.quiet, self.label, self.bar = quiet, label, None
        self.started = {"download": 0.0, "write": 0.0}
        self.done = {"download": 0, "write": 0}
        self.shown = 0.0
        self.lock = threading.Lock()

    def _add_total(self, nbytes: int) -> None:
        if self.quiet:
            return
        if self.bar is None:
            from tqdm import tqdm

            self.bar = tqdm(
                total=0,
                unit="B",
                unit_scale=True,
                unit_divisor=1000,
                desc=self.label,
                file=sys.stderr,
                dynamic_ncols=True,
            )
        self.bar.total += nbytes
        self.bar.refresh()

    def on_plan(self, plan) -> None:
        with self.lock:
            self._add_total(plan.total_size)

    def expect(self, nbytes: int) -> None:
        with self.lock:
            self._add_total(nbytes)

    def downloaded(self, nbytes: int) -> None:
        self._advance("download", nbytes)

    def update(self, nbytes: int) -> None:
        self._advance("write", nbytes)

    def _advance(self, kind: str, nbytes: int) -> None:
        with self.lock:
            now = time.monotonic()
            if not self.started[kind]:
                self.started[kind] = now
            self.done[kind] += nbytes
            if self.bar is None:
                return
            if self.done["download"] and now - self.shown >= 0.5:  # rates every half second, not every chunk
                self.shown = now
                rates = [
                    f"{name} {self.done[name] / 1e6 / max(now - self.started[name], 1e-3):.0f} MB/s"
                    for name in ("download", "write")
                    if self.started[name]
                ]
                self.bar.set_postfix_str(", ".join(rates), refresh=False)
            self.bar.update(nbytes)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def _run_job(job: Callable, label: str, quiet: bool, chat_template: str | None, *paths: Path, **options):
    """Return a job's report, run with a progress bar in bytes (unless quiet) and the chosen chat template."""
    if not quiet and options.get("verify_md5"):
        from .sources.meta import CHECKLIST_NAME, md5_bytes

        nbytes = md5_bytes(paths[0], paths[1])
        if nbytes:
            click.echo(
                f"checking the md5 sums of Meta's {CHECKLIST_NAME} ({format_size(nbytes)} to read; --no-md5 skips)",
                err=True,
            )
    progress = _Progress(quiet, label)
    try:
        return job(
            *paths,
            chat_template=_load_template(chat_template),
            progress=progress.update,
            on_plan=progress.on_plan,
            transfer=progress,
            **options,
        )
    finally:
        progress.close()


def _input_dir(path: Path, *, quiet: bool, weights: bool = True) -> Path:
    """Return a local directory for PATH: itself, or the hub repository it names, downloaded and checked."""
    from .sources.hub import input_dir
    from .untrusted import given_path

    given_path(path, "input")  # an empty path is refused, never resolved as the current directory
    progress = _Progress(quiet, "download")
    try:
        return input_dir(path, progress, weights=weights)
    finally:
        progress.close()


def _load_template(value: str | None) -> str | None:
    if value is None:
        return None
    from .chat_template import resolve_template

    return resolve_template(value)


@click.group(epilog=EXAMPLES, context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 110})
@click.version_option(__version__, prog_name="weight-diff")
@click.option("--debug", is_flag=True, help="Show a full traceback on errors.")
def main(debug: bool) -> None:
    """Publish a fine-tuned model as a weight diff (tuned - raw) and recover it (raw + diff).

    Streams tensor by tensor in flat memory, writes Hugging Face safetensors, and checks every tensor against the
    publisher's checksums when the diff has a manifest.
    """
    heap.keep_freed_memory()


@main.command(
    epilog="""
\b
Example (the Open-Instruct Self-Instruct 13B diff):
  weight-diff recover --path_raw llama-13b-hf --path_diff self-instruct-13b-diff \\
      --path_tuned self-instruct-13b --chat-template open-instruct
"""
)
@_path_option(
    "path_raw",
    "The raw base model: Hugging Face format, or Meta's download (LLaMA/13B or LLaMA), e.g. LLaMA-13B; a directory "
    "or a hub repo id.",
)
@_path_option("path_diff", "The published weight diff: a directory or a hub repo id (org/name[@revision]).")
@_path_option("path_tuned", "Where to write the recovered model (a new directory).")
@click.option(
    "--dtype",
    type=DTYPES,
    default="auto",
    show_default=True,
    help="Output dtype; auto keeps the diff's (float32 for 2023 diffs).",
)
@click.option(
    "--family",
    default=None,
    metavar="NAME",
    help="Apply this diff family's rule instead of detecting it: weight-diff, open-instruct, alpaca, wizardlm, "
    "alpaca-farm, vicuna-v0, vicuna-v1.1, llava-v0, ziya.",
)
@click.option(
    "--no-keep-download",
    "--no_keep_download",
    "no_keep_download",
    is_flag=True,
    help="For a diff from the hub: delete each downloaded diff shard once its tensors are read.",
)
@_output_options
@_no_md5_option
@_ignore_checks_option
@click.option(
    "--check-quality",
    "--check_quality",
    is_flag=True,
    help="After recovery, compare the perplexity of the recovered and the raw model on a short English text "
    "(one weight tensor at a time, flat memory; about 3.5 minutes at 13B on 2 cores).",
)
@reports_errors
def recover(
    path_raw, path_diff, path_tuned, dtype, family, no_keep_download, max_shard_size, overwrite, resume, chat_template,
    quiet, no_md5, ignore_checks, check_quality,
):  # fmt: skip
    """Recover the tuned model: raw + diff, written to PATH_TUNED and checked."""
    from .checks import QUALITY, final_line
    from .jobs import recover as run_recover

    shown = _Findings()
    report = _run_job(
        run_recover, "recover", quiet, chat_template, path_raw, path_diff, path_tuned,
        dtype=dtype, max_shard_size=max_shard_size, overwrite=overwrite, resume=resume, family=family,
        verify_md5=not no_md5, ignore_checks=ignore_checks, on_finding=shown.early,
        keep_download=not no_keep_download,
    )  # fmt: skip
    findings = list(report.findings)
    if check_quality:
        from .quality import check_quality as run_quality

        findings.append(run_quality(path_raw, report.out_dir).finding)
    shown.late(findings)
    click.echo(f"family: {report.family} ({report.family_reason})")
    click.echo(_summary("recovered", report))
    _warnings(report, source="the diff or the raw model")
    for check in report.checks:
        click.echo(f"check: {check}")
    if report.downloads_checked:
        click.echo("downloaded files match the hub's checksums")
    if report.verified:
        against = "manifest" if report.unit == "tensors" else "checksum list"
        nan = ", NaN/Inf values included" if report.nonfinite else ""
        click.echo(f"verified: {report.tensors} {report.unit} match the publisher's {against}{nan}")
    else:
        for finding in findings:
            if finding.severity == "pass":
                click.echo(finding.message)
        click.echo(f"{report.out_dir / 'SHA256SUMS'} lets you check this copy later")
        click.echo(final_line(verified=False, findings=findings, tensors=report.tensors))
    if any(f.check == QUALITY and f.severity != "pass" for f in findings):
        raise SystemExit(1)  # the check asked for failed: status 1, the warning above is the last line


@main.command(
    "make-diff",
    epilog="""
\b
Example:
  weight-diff make-diff --path_raw llama-13b-hf --path_tuned my-finetune --path_diff my-finetune-diff
  weight-diff make-diff --format compact --path_raw llama-13b-hf --path_tuned my-finetune --path_diff my-diff
""",
)
@_path_option("path_raw", "The raw base model the fine-tune started from.")
@_path_option("path_tuned", "The fine-tuned model.")
@_path_option("path_diff", "Where to write the diff (a new directory).")
@click.option(
    "--family",
    default=None,
    metavar="NAME",
    help="Make the diff the way this family's publisher did (vicuna-v1.1, vicuna-v0, alpaca, wizardlm); "
    "without a manifest, as theirs had none. Default: ours (float32, with a manifest).",
)
@click.option(
    "--format",
    "diff_format",
    type=click.Choice(["float32", "compact"]),
    default="float32",
    show_default=True,
    help="float32: the 2023-compatible diff; compact: bit-exact, about a quarter of the bytes (weight-diff only).",
)
@_output_options
@_no_md5_option
@_ignore_checks_option
@reports_errors
def make_diff(
    path_raw, path_tuned, path_diff, family, diff_format, max_shard_size, overwrite, resume, chat_template, quiet,
    no_md5, ignore_checks,
):  # fmt: skip
    """Make a diff (tuned - raw) with a checksum manifest, ready to publish."""
    from .jobs import make_diff as run_make_diff

    shown = _Findings()
    report = _run_job(
        run_make_diff, "make-diff", quiet, chat_template, path_raw, path_tuned, path_diff,
        max_shard_size=max_shard_size, overwrite=overwrite, resume=resume, family=family, diff_format=diff_format,
        verify_md5=not no_md5, ignore_checks=ignore_checks, on_finding=shown.early,
    )  # fmt: skip
    shown.late(report.findings)
    click.echo(_summary("made diff of", report))
    _warnings(report, source="the tuned or the raw model")
    if report.all_zero:
        click.echo("warning: every value of the diff is 0: the tuned model has the same weights as the raw one")
    if report.downloads_checked:
        click.echo("downloaded files match the hub's checksums")
    if report.manifest:
        click.echo(f"manifest: weight-diff-manifest.json covers {report.tensors} tensors; publish the whole directory")
    else:
        click.echo(
            f"family: {report.family} (made as its publisher did, without a manifest: recover can check nothing "
            "but the files' SHA256SUMS)"
        )


# The 2023 scripts spelled it make_diff; the model card's users type that.
main.add_command(
    click.Command("make_diff", params=make_diff.params, callback=make_diff.callback, help=make_diff.help, hidden=True)
)


@main.command(epilog="\b\nExample:\n  weight-diff demo")
@click.option("--keep", type=click.Path(path_type=Path), default=None, help="Keep the demo's files in this directory.")
@reports_errors
def demo(keep):
    """Build a tiny random LLaMA and a fine-tune of it, make the diff, recover it, and check the result."""
    from .demo import run_demo

    for line in run_demo(keep=keep):
        click.echo(line)


@main.command(
    epilog="""
\b
Examples:
  weight-diff verify self-instruct-13b                                   # files against SHA256SUMS
  weight-diff verify self-instruct-13b --diff self-instruct-13b-diff     # and tensors against the manifest
  weight-diff verify self-instruct-13b-diff                              # a diff against its own manifest
"""
)
@click.argument("path", type=click.Path())
@click.option(
    "--diff",
    "diff_dir",
    type=click.Path(),
    default=None,
    callback=_home,
    help="Also check the model's tensors against this diff's manifest.",
)
@reports_errors
def verify(path, diff_dir):
    """Re-check a recovered model (or a diff) and say what matches; exit status 0 only when all does."""
    from .verify import verify as run_verify

    if diff_dir is not None:
        diff_dir = _input_dir(diff_dir, quiet=False, weights=False)
    report = run_verify(path, diff=diff_dir)
    for check in report.failures:
        click.echo(f"MISMATCH {check.subject}: {check.detail}")
    for note in report.notes:
        click.echo(f"note: {note}")
    matched = len(report.checks) - len(report.failures)
    if report.kind == "model":
        what = "files and tensors" if diff_dir is not None else "files"  # tensors are checked against a diff only
        remedy = "recover it again into a new directory, or copy it again from a copy that verifies"
    else:
        what, remedy = "diff files and tensors", "download the diff again"
    if not report.ok:
        raise _Stop(f"{path}: {len(report.failures)} of {len(report.checks)} {what} do not match; {remedy}", 1)
    click.echo(f"verified: {matched} {what} in {path} match")


def _warnings(report, *, source: str) -> None:
    if report.nonfinite:
        click.echo(
            f"warning: {len(report.nonfinite)} tensors hold NaN or Inf values (first: {report.nonfinite[0]}); "
            f"{source} has them. Check the model before using it"
        )
    if report.left_behind:
        shown = ", ".join(report.left_behind[:5]) + (", ..." if len(report.left_behind) > 5 else "")
        click.echo(f"note: not copied (not part of a Hugging Face model directory): {shown}")
    if report.ignored:
        click.echo(
            f"note: not downloaded (in the repository, but no part of the diff: its manifest does not name them): "
            f"{', '.join(report.ignored)}"
        )


def _summary(verb: str, report) -> str:
    resumed = f", {report.resumed_shards} kept from the interrupted run" if report.resumed_shards else ""
    notes = "".join(f"\ntokenizer: {note}" for note in report.notes)
    shards = "" if report.unit == "files" else f" in {report.shards} shard{'s' if report.shards != 1 else ''}"
    return (
        f"{verb} {report.tensors} {report.unit} ({format_size(report.bytes_written)}{shards}{resumed}) into "
        f"{report.out_dir} in {report.seconds:.1f} s{notes}"
    )


@main.command(
    epilog="""
\b
Example:
  weight-diff generate self-instruct-13b --prompt "Give three tips for staying healthy." --max-new-tokens 200
"""
)
@click.argument("model", type=click.Path())
@click.option("--prompt", required=True, help="The user's message; formatted with the model's chat template.")
@click.option(
    "--max-new-tokens",
    "--max_new_tokens",
    type=click.IntRange(min=1),
    default=128,
    show_default=True,
    help="Most tokens to generate.",
)
@click.option(
    "--dtype",
    type=DTYPES,
    default="auto",
    show_default=True,
    help="Load the weights in this dtype; auto keeps the stored one.",
)
@reports_errors
def generate(model, prompt, max_new_tokens, dtype):
    """Answer PROMPT greedily with the model in MODEL and print only the completion.

    Uses the model's chat template, or the open-instruct format (<|user|> ... <|assistant|>) when it has none.
    """
    from .generate import generate as run_generate

    click.echo(run_generate(model, prompt, max_new_tokens=max_new_tokens, dtype=dtype))


@main.command(
    epilog="""
\b
Examples:
  weight-diff inspect self-instruct-13b-diff
  weight-diff inspect self-instruct-13b --json
"""
)
@click.argument("path", type=click.Path())
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object, for scripts.")
@click.option(
    "--no-hash",
    "--no_hash",
    "no_hash",
    is_flag=True,
    help="Do not hash the files against SHA256SUMS or Meta's checklist.chk (fast on large models).",
)
@reports_errors
def inspect(path, as_json, no_hash):
    """Say what PATH is: a model or a weight diff, its size, dtypes and shards, and whether its checksums match."""
    import json

    from .inspect_dir import inspect_path
    from .sources.compact_files import remote_indexes
    from .sources.hub import compact_on_hub, top_level_files
    from .xor import detect_files

    directory = _input_dir(path, quiet=as_json, weights=False)  # a hub repository: its small files first
    listed = top_level_files(path)
    compact = None
    if listed is not None and detect_files(directory, listed) is None:
        on_hub_compact = compact_on_hub(path)
        if not (no_hash and on_hub_compact):  # nothing to hash: a compact diff's .wdc files stay there
            directory = _input_dir(path, quiet=as_json)  # then its weights, unless it is an XOR payload
        if on_hub_compact:  # the files its manifest names: indexes from the cache, or by ranged requests
            compact = remote_indexes(path)
    found = inspect_path(directory, check_sums=not no_hash, listed=listed, compact=compact)
    if as_json:
        click.echo(json.dumps(found.to_dict(), indent=2))
    else:
        for line in found.lines():
            click.echo(line)


@main.command(
    epilog="""
\b
Examples:
  weight-diff compare self-instruct-13b reference/self-instruct-13b
  weight-diff compare self-instruct-13b-bf16 reference/self-instruct-13b --tol 1e-2

\b
Exit status: 0 when every tensor agrees within --tol, 1 when they differ, 2 when they could not be compared.
"""
)
@click.argument("a", type=click.Path())
@click.argument("b", type=click.Path())
@click.option(
    "--tol",
    type=float,
    default=0.0,
    show_default=True,
    help="Largest |A-B| allowed per value; 0 asks for bit-identical tensors.",
)
@click.option(
    "--worst",
    type=click.IntRange(min=0),
    default=10,
    show_default=True,
    help="How many of the most different tensors to list.",
)
@click.option("--quiet", "-q", is_flag=True, help="No progress bar.")
@_no_md5_option
@reports_errors
def compare(a, b, tol, worst, quiet, no_md5):
    """Compare models A and B tensor by tensor: missing tensors, shapes, largest differences, identical values."""
    from .compare import compare_models

    bar = None

    def on_total(total: int) -> None:
        nonlocal bar
        if not quiet:
            from tqdm import tqdm

            bar = tqdm(
                total=total,
                unit="B",
                unit_scale=True,
                unit_divisor=1000,
                desc="compare",
                file=sys.stderr,
                dynamic_ncols=True,
            )

    def progress(nbytes: int) -> None:
        if bar is not None:
            bar.update(nbytes)

    try:
        a, b = _input_dir(a, quiet=quiet), _input_dir(b, quiet=quiet)
        report = compare_models(a, b, tol=tol, on_total=on_total, progress=progress, verify_md5=not no_md5)
    except WeightDiffError as error:
        error.exit_code = 2  # as with cmp and diff: 1 says "they differ", 2 "could not compare"
        raise
    finally:
        if bar is not None:
            bar.close()
    for line in report.lines(worst=worst):
        click.echo(line)
    if not report.agrees:
        click.get_current_context().exit(1)


if __name__ == "__main__":
    main()
