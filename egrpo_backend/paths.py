"""User-given names never escape their folder: names are checked, joins are verified."""

from __future__ import annotations

import re
from pathlib import Path

_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}\Z", re.ASCII)  # \Z: '$' would let a final newline through


def check_name(name: str, what: str = "name") -> str:
    """A bare file or job name: letters, digits, '.', '_', '-'; no folders, no '..', at most 128 chars."""
    if not isinstance(name, str) or not _NAME.match(name) or ".." in name:
        raise ValueError(
            f"{what} {name[:200]!r} is not allowed: use letters, digits, '.', '_' and '-' only "
            "(no folders, no '..', not starting with '.' or '-', at most 128 characters)"
        )
    return name


def safe_join(root, *names: str) -> Path:
    """root / names, refusing anything that would resolve outside root."""
    root = Path(root).resolve()
    path = root.joinpath(*names).resolve()
    if path != root and root not in path.parents:
        raise ValueError(f"path {'/'.join(names)!r} escapes its folder {root}")
    return path
