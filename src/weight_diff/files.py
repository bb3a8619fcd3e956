"""The non-weight files of a model directory: config, generation config, tokenizer, licences, model card.

They are small, so they are read whole, adjusted (the config's dtype, a chat template) and written atomically.
"""

from __future__ import annotations

import errno
import json
import os
from pathlib import Path

import torch

from .checkpoint import BIN_INDEX, SAFETENSORS_INDEX, WEIGHT_SUFFIXES
from .container import SUFFIX as COMPACT_SUFFIX
from .errors import CheckpointError, DiskFullError
from .manifest import MANIFEST_NAME, RECOVERY_NAME, SUMS_NAME, dtype_name
from .untrusted import SMALL_FILE_LIMIT, load_json, member, read_small, resolves_inside
from .writer import FILE_MODE, PARTIAL_SUFFIX, fsync_directory

CONFIG_NAME = "config.json"
CHAT_TEMPLATE_FILE = "chat_template.jinja"  # where transformers 5 saves a template, preferred to tokenizer_config
# Files that describe weights this tool rewrites, or its own bookkeeping: never copied from an input.
NOT_COPIED = {SAFETENSORS_INDEX, BIN_INDEX, MANIFEST_NAME, RECOVERY_NAME, SUMS_NAME, CONFIG_NAME}


# What a Hugging Face model directory needs beside its weights: config, tokenizer, chat template, processor.
COMPANION_NAMES = {
    "generation_config.json",
    "tokenizer.json",
    "tokenizer.model",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    CHAT_TEMPLATE_FILE,
    "chat_template.json",
    "vocab.json",
    "vocab.txt",
    "merges.txt",
    "spiece.model",
    "sentencepiece.bpe.model",
    "preprocessor_config.json",
    "processor_config.json",
}
# Documents carried too (licences, the model card), by suffix: never weights of another framework or format.
DOCUMENT_SUFFIXES = {"", ".md", ".txt", ".rst"}


def companion_files(directory: Path) -> list[Path]:
    """Return the files to carry from an input to the output: config, tokenizer, licences and model card."""
    companions = sorted(path for path in directory.iterdir() if is_companion(path.name) and path.is_file())
    for path in companions:
        if not resolves_inside(directory, path):  # a cloned repo's link to ~/.ssh would be copied and published
            raise CheckpointError(
                f"{path}: a link to {path.resolve()}, outside {directory}; refused (copy the file in instead)"
            )
    return companions


def is_companion(name: str) -> bool:
    """Return whether a file of this name is carried from an input to the output beside the weights."""
    if name.startswith(".") or name.endswith(PARTIAL_SUFFIX) or name in NOT_COPIED:
        return False
    return name in COMPANION_NAMES or Path(name).suffix.lower() in DOCUMENT_SUFFIXES


def left_behind(directory: Path) -> list[str]:
    """Return the input's top-level files that are neither weights we read, our records, nor carried companions
    (a ``tf_model.h5``, a ``model.gguf``, ...), so that the user is told what was not copied."""
    return sorted(
        path.name
        for path in directory.iterdir()
        if path.is_file()
        and not path.name.startswith(".")
        and not is_companion(path.name)
        and path.name not in NOT_COPIED
        and path.suffix not in (*WEIGHT_SUFFIXES, COMPACT_SUFFIX)
    )


def read_config(directory: Path) -> dict:
    path = directory / CONFIG_NAME
    if not path.is_file():
        raise CheckpointError(f"{directory}: no {CONFIG_NAME}; a Hugging Face model directory needs one")
    path = member(directory, CONFIG_NAME, where=str(directory))
    config = load_json(read_small(path, limit=SMALL_FILE_LIMIT, what=CONFIG_NAME), where=str(path))
    if not isinstance(config, dict):
        raise CheckpointError(f"{path}: not a JSON object")
    return config


def read_json_object(path: Path) -> dict:
    """Return a small JSON file's object, or {} when it is absent or unreadable (for what only informs)."""
    try:
        body = load_json(read_small(path, limit=SMALL_FILE_LIMIT, what="JSON file"), where=str(path))
    except (OSError, CheckpointError):
        return {}
    return body if isinstance(body, dict) else {}


def config_with_dtype(config: dict, dtype: torch.dtype) -> dict:
    """Return the config stating ``dtype``; transformers 5 reads ``dtype``, 4.x ``torch_dtype``: write both."""
    updated = dict(config)
    updated["torch_dtype"] = dtype_name(dtype)
    updated["dtype"] = dtype_name(dtype)
    return updated


def write_atomic(path: Path, data: bytes) -> None:
    """Write a small file under a temporary name, flush it to disk, then rename it into place (mode 0644)."""
    partial = path.with_name(path.name + PARTIAL_SUFFIX)
    fd = os.open(partial, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, FILE_MODE)
    try:
        os.fchmod(fd, FILE_MODE)
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view) :]
        os.fdatasync(fd)
    except BaseException as exc:
        os.close(fd)
        partial.unlink(missing_ok=True)
        if isinstance(exc, OSError) and exc.errno == errno.ENOSPC:
            raise DiskFullError(
                f"{path.parent}: disk full while writing {path.name}; free space and run again with --resume"
            ) from None
        raise
    os.close(fd)
    os.replace(partial, path)
    fsync_directory(path.parent)


def json_bytes(body: dict) -> bytes:
    return (json.dumps(body, indent=2, sort_keys=False) + "\n").encode()


def with_chat_template(tokenizer_config: bytes, template: str, *, where: str = "tokenizer_config.json") -> bytes:
    """Return ``tokenizer_config.json`` bytes with ``chat_template`` set (other keys kept as they were)."""
    body = load_json(tokenizer_config, where=where) if tokenizer_config else {}
    if not isinstance(body, dict):
        raise CheckpointError(f"{where}: not a JSON object, so no chat template can be set in it")
    body["chat_template"] = template
    return json_bytes(body)
