"""What an input gives us is untrusted: paths the user typed, file names an index or ``SHA256SUMS`` lists, JSON.

Each check here turns hostile or careless input into one clear refusal instead of a wrong read, a hang or a
traceback: an empty path is never taken as the current directory, a listed name never climbs out of its directory
or reaches a device, and JSON with absurd nesting or numbers is refused before anything uses it.

>>> shard = member(Path("diff"), "model-00001-of-00002.safetensors", where="diff/model.safetensors.index.json")
>>> body = load_json(Path("diff/config.json").read_bytes(), where="diff/config.json")
"""

from __future__ import annotations

import json
import math
import os
import stat
from pathlib import Path, PurePosixPath

from .errors import CheckpointError, UsageError, WeightDiffError

SMALL_FILE_LIMIT = 128 * 2**20  # config, tokenizer, template, manifest, licence: a tokenizer.json is tens of MB at most


def given_path(value: str | os.PathLike, what: str) -> Path:
    """Return the path the user gave, refusing an empty one (``Path("")`` would silently mean ``.``)."""
    if os.fspath(value) == "":
        raise UsageError(f"{what}: an empty path was given; name a directory")
    return Path(value)


def member(directory: Path, name: object, *, where: str, error: type[WeightDiffError] = CheckpointError) -> Path:
    """Return ``directory / name`` once ``name`` is proved a plain file name inside ``directory``.

    Refused: a name that is not text, absolute, climbs with ``..``, or names a folder; a symlink that leads out
    of the directory (``resolves_inside``). The file itself must be regular (a FIFO or a device would hang the read).
    """
    path = _confined(directory, name, where=where, error=error)
    if not resolves_inside(directory, path):
        raise error(f"{path}: named in {where}, but a link to {path.resolve()}, outside {directory}; refused (copy "
                    "the file into the directory instead)")  # fmt: skip
    try:
        mode = path.stat().st_mode
    except FileNotFoundError:
        raise error(f"{path}: named in {where} but missing; download it again") from None
    except OSError as exc:
        raise error(f"{path}: named in {where} but unreadable ({exc.strerror})") from None
    if not stat.S_ISREG(mode):
        raise error(f"{path}: named in {where} but not a regular file; refused")
    return path


def resolves_inside(directory: Path, path: Path) -> bool:
    """Return whether ``path``, symlinks followed, lies inside ``directory`` (or, for a Hugging Face cache
    snapshot ``.../snapshots/REV``, in the repository's ``blobs`` folder, where the cache's links lead)."""
    root = directory.resolve()
    roots = [root]
    if root.parent.name == "snapshots":
        roots.append(root.parent.parent / "blobs")
    target = path.resolve()
    return any(target.is_relative_to(allowed) for allowed in roots)


def confined_name(name: object) -> bool:
    """Return whether ``name`` is a relative path that stays inside its directory (no ``..``, not absolute)."""
    if not isinstance(name, str) or not name or "\0" in name:
        return False
    parts = PurePosixPath(name).parts
    return not PurePosixPath(name).is_absolute() and ".." not in parts and bool(parts) and name not in (".", "./")


def _confined(directory: Path, name: object, *, where: str, error: type[WeightDiffError]) -> Path:
    if not confined_name(name):
        raise error(f"{where}: names {name!r}, which is not a file inside {directory}; refused (nothing read)")
    return directory / str(name)


def load_json(data: bytes | str, *, where: str, error: type[WeightDiffError] = CheckpointError) -> object:
    """Return parsed JSON, refusing what Python's parser lets through: absurd nesting, ``NaN``, ``1e999``."""
    try:
        return json.loads(data, parse_constant=_no_constant, parse_float=_finite_float)
    except RecursionError:
        raise error(f"{where}: not valid JSON (nested too deeply); download it again") from None
    except UnicodeDecodeError:
        raise error(f"{where}: not valid JSON (not UTF-8 text); download it again") from None
    except ValueError as exc:
        raise error(f"{where}: not valid JSON ({str(exc).splitlines()[0][:120]}); download it again") from None


def _no_constant(name: str) -> float:
    raise ValueError(f"{name} is not a JSON number")


def _finite_float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise ValueError(f"{text[:20]} is out of range")
    return value


def read_small(path: Path, *, limit: int, what: str, error: type[WeightDiffError] = CheckpointError) -> bytes:
    """Return a small file's bytes: at most its stated size, refused above ``limit`` (never read to an endless end)."""
    try:
        with path.open("rb") as file:
            size = os.fstat(file.fileno()).st_size
            if size > limit:
                raise error(f"{path}: {size} bytes, more than a {what} can be ({limit} bytes); refused")
            return file.read(size)
    except OSError as exc:
        raise error(f"{path}: unreadable ({exc.strerror})") from None
