"""Which reward models' files are on disk: what `python -m egrpo_backend rewards` prints."""

from __future__ import annotations

from .catalog import optional_files, requirements
from .files import describe_dirs, reward_dirs, search


def reward_status(reward_dir=None) -> list[dict]:
    """One entry per reward model, named as in the registry: {name, found, files, searched, hint}.

    found: every file the reward needs with its default options is there. files: the paths found
    (plus optional ones, e.g. the HPS v2.0 checkpoint) when found; otherwise the names still missing,
    relative to a reward folder, alternatives joined by ' | '. hint: where to get the missing files.
    """
    dirs = reward_dirs(reward_dir)
    rows = []
    optional = optional_files()
    for name, parts in requirements().items():
        found, missing, hints = [], [], []
        for part in parts.values():
            path = search(part, dirs)
            if path is None:
                missing.append(" | ".join(part.candidates))
                hints.append(part.hint)
            else:
                found.append(str(path))
        for role, part in optional.get(name, {}).items():
            path = search(part, dirs)
            if path is not None:
                found.append(f"{path} ({role})")
        rows.append({
            "name": name,
            "found": not missing,
            "files": found if not missing else missing,
            "searched": describe_dirs(dirs),
            "hint": " ".join(dict.fromkeys(hints)),
        })
    return rows
