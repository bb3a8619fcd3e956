"""Tell a hub repository id (``org/name``, ``org/name@revision``, ``hf://org/name``) from a local path. Pure.

>>> parse_repo_spec("hf://allenai/open-instruct-self-instruct-13b@main")
RepoSpec(repo_id='allenai/open-instruct-self-instruct-13b', revision='main')
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path

# click's Path turns "hf://org/name" into "hf:/org/name": accept any number of slashes after the scheme.
_SPEC = re.compile(
    r"^(?P<scheme>hf:/+)?(?P<repo>[A-Za-z0-9][A-Za-z0-9_.-]*/[A-Za-z0-9][A-Za-z0-9_.-]*)"
    r"(?:@(?P<revision>[A-Za-z0-9][A-Za-z0-9_./-]*))?/?$"
)


@dataclass(frozen=True)
class RepoSpec:
    """A model repository on the hub and the revision (branch, tag or commit) to read."""

    repo_id: str
    revision: str = "main"

    def __str__(self) -> str:
        return self.repo_id if self.revision == "main" else f"{self.repo_id}@{self.revision}"


def parse_repo_spec(text: str | os.PathLike) -> RepoSpec | None:
    """Return the repository a text names, or None when it cannot be a repository id."""
    match = _SPEC.match(str(text))
    if match is None or ".." in match.group("repo"):
        return None
    return RepoSpec(match.group("repo"), match.group("revision") or "main")


def hub_spec_for(path: str | os.PathLike) -> RepoSpec | None:
    """Return the repository to use for an input argument: only where no local file or directory has that name
    (``hf://`` always means the hub)."""
    spec = parse_repo_spec(path)
    if spec is None:
        return None
    if str(path).startswith("hf:/") or not Path(path).exists():
        return spec
    return None
