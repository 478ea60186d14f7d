"""Prompt sets as data (docs/prompts.md): read as a stream through a byte-offset index, never held whole.

A set is a file or a folder of files:
  .txt    a prompt a line (blank lines and lines starting with '#' are skipped)
  .jsonl  an object a line with a prompt column ("prompt" unless `column` says otherwise), or a JSON string
  .csv    a header line naming the prompt column, then a row a line (no newlines inside quoted fields)
  .json   a list of strings, read whole: the job folder's stored inline lists (prompts-<sha256>.json)
A folder is its files of those kinds in name order; `split` picks its `train` or `test` entry (a file
or a folder), the HPDv2 layout, so a held-out set never mixes with the training set.

The index is one pass over the bytes that also hashes them: uint64 offsets of each prompt, in a
file named by that hash in the index cache (EGRPO_PROMPT_INDEX, default ~/.cache/egrpo/prompt_index),
memory-mapped, so memory does not grow with the set. A small stat memo (path, size, mtime) finds the
hash of a file seen before without reading it again. A job records each set's sha256 and count, and
refuses a file that changed since.
"""

from __future__ import annotations

import bisect
import csv
import hashlib
import json
import os
import tempfile
from pathlib import Path

import numpy as np

from .spec_limits import MAX_PROMPT_CHARS, MAX_PROMPTS, SpecError

SUFFIXES = (".txt", ".jsonl", ".csv")
SPLITS = ("train", "test")
SET_KEYS = ("file", "column", "split", "sha256", "count")  # what a prompts object may hold
READ_BYTES = 4 << 20  # bytes per read while indexing: the transient memory of a pass
_HASH_MARK = ord("#")


class _NoHash:
    def update(self, data) -> None:
        pass


def index_dir() -> Path:
    return Path(os.environ.get("EGRPO_PROMPT_INDEX") or Path.home() / ".cache" / "egrpo" / "prompt_index")


class PromptList(list):
    """An inline list (or a stored .json list): the same interface as PromptSet."""

    def digest(self) -> dict:
        from .provenance import prompt_digest

        return prompt_digest(list(self))


class PromptFile:
    """One indexed file: len(), [i] (a str), in index order."""

    def __init__(self, path: Path, kind: str, column: str, sha256: str, offsets: np.ndarray, key: str):
        self.path, self.kind, self.column, self.sha256, self.offsets, self.key = path, kind, column, sha256, offsets, key
        self._handle = None
        self._csv_at = None  # csv: the column's position in the header

    def __len__(self) -> int:
        return int(self.offsets.shape[0])

    def _file(self):
        if self._handle is None:
            self._handle = open(self.path, "rb")
        return self._handle

    def __getitem__(self, i: int) -> str:
        f = self._file()
        f.seek(int(self.offsets[i]))
        line = f.readline().decode("utf-8")
        if self.kind == "txt":
            return line.strip()
        if self.kind == "jsonl":
            return _jsonl_prompt(line, self.column, self.key, self.path).strip()
        if self._csv_at is None:
            f.seek(0)
            self._csv_at = _csv_header(f.readline().decode("utf-8"), self.column, self.key, self.path)
        return _csv_prompt(line, self._csv_at, self.key, self.path).strip()

    def __iter__(self):
        """The prompts in order, read sequentially without the index (a pass over a .txt set runs at
        disk speed and touches none of the index's pages); the same lines the index keeps."""
        if self.kind != "txt":
            yield from (self[i] for i in range(len(self)))
            return
        for chunk, _, _, _, _ in _lines(self.path, _NoHash()):
            for line in chunk.decode("utf-8").split("\n"):
                text = line.strip()
                if text and not text.startswith("#"):
                    yield text

    def close(self) -> None:
        if self._handle is not None:
            self._handle.close()
            self._handle = None


class PromptSet:
    """A prompt file or folder as a sequence: len(), [i], iteration (a stream), digest()."""

    def __init__(self, files: list[PromptFile], sha256: str, source: Path):
        self.files, self.sha256, self.source = files, sha256, source
        self._ends = list(np.cumsum([len(f) for f in files]).tolist())

    def __len__(self) -> int:
        return self._ends[-1] if self._ends else 0

    def __getitem__(self, i) -> str:
        i = int(i)
        if not 0 <= i < len(self):
            raise IndexError(f"prompt {i} of a set of {len(self)}")
        k = bisect.bisect_right(self._ends, i)
        return self.files[k][i - (self._ends[k - 1] if k else 0)]

    def __iter__(self):
        for f in self.files:
            yield from f

    def where(self, i: int) -> str:
        """'file.txt prompt 17' for messages."""
        k = bisect.bisect_right(self._ends, i)
        return f"{self.files[k].path.name} prompt {i - (self._ends[k - 1] if k else 0) + 1}"

    def digest(self) -> dict:
        return {"count": len(self), "sha256": self.sha256}


# --- parsing one record ----------------------------------------------------------------------------------
def _jsonl_prompt(line: str, column: str, key: str, path: Path) -> str:
    try:
        value = json.loads(line)
    except json.JSONDecodeError as e:
        raise SpecError(f"{key}.file {path.name}: a line is not valid JSON ({e}); a .jsonl prompt file holds an "
                        f"object a line with a {column!r} field") from None
    if isinstance(value, dict):
        value = value.get(column)
    if not isinstance(value, str):
        raise SpecError(f"{key}.file {path.name}: a line has no string {column!r} field: {line.strip()[:80]!r}; "
                        f"name the prompt field with {key}.column")
    return value


def _csv_header(line: str, column: str, key: str, path: Path) -> int:
    names = [n.strip() for n in next(csv.reader([line]), [])]
    if column not in names:
        raise SpecError(f"{key}.file {path.name}: the CSV header has no {column!r} column (it has {names[:10]}); "
                        f"name the prompt column with {key}.column")
    return names.index(column)


def _csv_prompt(line: str, at: int, key: str, path: Path) -> str:
    try:
        row = next(csv.reader([line], strict=True), [])
    except csv.Error as e:
        raise SpecError(f"{key}.file {path.name}: a CSV row cannot be read ({e}); prompt files take one row a line "
                        "(no line breaks inside quoted fields)") from None
    if at >= len(row):
        raise SpecError(f"{key}.file {path.name}: a CSV row has {len(row)} fields, fewer than the header: {line.strip()[:80]!r}")
    return row[at]


def _check_prompt(prompt: str, key: str, path: Path, line_no: int) -> None:
    if not prompt:
        raise SpecError(f"{key}.file {path.name} line {line_no}: an empty prompt; remove the line")
    if len(prompt) > MAX_PROMPT_CHARS:
        raise SpecError(f"{key}.file {path.name} line {line_no}: a prompt longer than {MAX_PROMPT_CHARS} characters")


# --- indexing ----------------------------------------------------------------------------------------
def _lines(path: Path, hasher):
    """(chunk bytes, array of line starts, array of line ends without the newline, first line number), per read."""
    carry, base, line_no = b"", 0, 1
    with open(path, "rb") as f:
        while True:
            data = f.read(READ_BYTES)
            hasher.update(data)
            buf = carry + data
            if not data:
                if buf:  # a last line without a newline
                    yield buf, base, np.array([0]), np.array([len(buf)]), line_no
                return
            arr = np.frombuffer(buf, np.uint8)
            nl = np.flatnonzero(arr == 10)
            if nl.size:
                starts = np.concatenate(([0], nl[:-1] + 1))
                yield buf[: nl[-1] + 1], base, starts, nl.copy(), line_no
                line_no += int(nl.size)
                carry, base = buf[nl[-1] + 1:], base + int(nl[-1]) + 1
            else:
                carry = buf


def _decode(chunk: bytes, key: str, path: Path, line_no: int) -> None:
    try:
        chunk.decode("utf-8")
    except UnicodeDecodeError as e:
        bad = line_no + chunk[: e.start].count(b"\n")
        raise SpecError(f"{key}.file {path.name} line {bad} is not UTF-8 text; save the file as UTF-8") from None


def _index_txt(path: Path, key: str, out, hasher) -> int:
    count = 0
    for chunk, base, starts, ends, line_no in _lines(path, hasher):
        _decode(chunk, key, path, line_no)
        arr = np.frombuffer(chunk, np.uint8)
        ends = ends - ((ends > starts) & (arr[np.maximum(ends - 1, 0)] == 13))  # \r\n
        length = ends - starts
        first = arr[np.minimum(starts, len(arr) - 1)]
        last = arr[np.maximum(ends - 1, 0)]
        # Plain lines begin and end with printable ASCII, so strip() leaves them as they are; the others
        # (blank, comment, surrounded by spaces, non-ASCII at an end, too long) are judged one by one.
        printable = (first > 32) & (first < 127) & (first != _HASH_MARK) & (last > 32) & (last < 127)
        plain = (length > 0) & printable & (length <= MAX_PROMPT_CHARS)
        keep = plain.copy()
        for j in np.flatnonzero(~plain).tolist():  # comments, blanks, padded or long lines: one by one
            text = chunk[starts[j]:ends[j]].decode("utf-8").strip()
            if text and not text.startswith("#"):
                _check_prompt(text, key, path, line_no + j)
                keep[j] = True
        offsets = (starts[keep] + base).astype("<u8")
        out.write(offsets.tobytes())
        count += int(offsets.size)
    return count


def _index_records(path: Path, kind: str, column: str, key: str, out, hasher) -> int:
    """jsonl / csv: each line parsed (these formats are for sets up to a few million prompts)."""
    count, at = 0, None
    for chunk, base, starts, ends, line_no in _lines(path, hasher):
        _decode(chunk, key, path, line_no)
        keep = []
        for j, (s, e) in enumerate(zip(starts.tolist(), ends.tolist())):
            line = chunk[s:e].decode("utf-8")
            if not line.strip():
                continue
            if kind == "csv" and at is None:
                at = _csv_header(line, column, key, path)
                continue
            prompt = _jsonl_prompt(line, column, key, path) if kind == "jsonl" else _csv_prompt(line, at, key, path)
            _check_prompt(prompt.strip(), key, path, line_no + j)
            keep.append(base + s)
        out.write(np.asarray(keep, dtype="<u8").tobytes())
        count += len(keep)
    return count


def _stat_key(path: Path, kind: str, column: str) -> str:
    st = path.stat()
    raw = f"{path.resolve()}|{st.st_size}|{st.st_mtime_ns}|{st.st_ino}|{kind}|{column}"
    return hashlib.sha256(raw.encode()).hexdigest()[:32]


def _open_file(path: Path, column: str, key: str) -> PromptFile:
    kind = path.suffix[1:].lower()
    folder = index_dir()
    try:
        folder.mkdir(parents=True, exist_ok=True)
        cacheable = os.access(folder, os.W_OK)
    except OSError:
        cacheable = False
    memo = folder / f"stat-{_stat_key(path, kind, column)}.json" if cacheable else None
    if memo is not None and memo.is_file():
        try:
            seen = json.loads(memo.read_text())
            idx = folder / seen["index"]
            if idx.is_file() and idx.stat().st_size == 8 * seen["count"]:
                return PromptFile(path, kind, column, seen["sha256"], _map(idx, seen["count"]), key)
        except (OSError, ValueError, KeyError, TypeError):
            pass  # a damaged memo: index again
    hasher = hashlib.sha256()
    fd, tmp = tempfile.mkstemp(dir=folder if cacheable else None, suffix=".idx.tmp")
    try:
        with os.fdopen(fd, "wb") as out:
            count = (_index_txt(path, key, out, hasher) if kind == "txt"
                     else _index_records(path, kind, column, key, out, hasher))
        sha = hasher.hexdigest()
        if not cacheable:  # no cache folder: the index lives as long as this process needs it
            offsets = np.fromfile(tmp, dtype="<u8") if count else np.zeros(0, dtype="<u8")
            return PromptFile(path, kind, column, sha, offsets, key)
        name = f"{sha}-{kind}-{hashlib.sha256(column.encode()).hexdigest()[:8]}.idx"
        os.replace(tmp, folder / name)
        from .atomic import atomic_write_json

        atomic_write_json(memo, {"sha256": sha, "count": count, "index": name})
        return PromptFile(path, kind, column, sha, _map(folder / name, count), key)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def _map(idx: Path, count: int) -> np.ndarray:
    return np.memmap(idx, dtype="<u8", mode="r", shape=(count,)) if count else np.zeros(0, dtype="<u8")


# --- a spec's prompts value ----------------------------------------------------------------------------
def _resolve(value: dict, key: str, base_dir: str) -> Path:
    path = Path(value["file"])
    if not path.is_absolute() and base_dir:
        path = Path(base_dir) / path
    if not path.exists():
        raise SpecError(f"{key}.file: prompt file not found: {path} (give a .txt file with one prompt per line, "
                        "a .jsonl / .csv file, or a folder of those; docs/prompts.md)")
    split = value.get("split", "")
    if split:
        if split not in SPLITS:
            raise SpecError(f"{key}.split = {split!r} is not allowed; valid values: 'train', 'test'")
        if not path.is_dir():
            raise SpecError(f"{key}.split needs {key}.file to be a folder holding {split!r} (a file or a folder)")
        found = [p for p in sorted(path.iterdir()) if p.stem == split and (p.is_dir() or p.suffix in SUFFIXES + (".json",))]
        if len(found) != 1:
            raise SpecError(f"{key}: the folder {path.name} holds {len(found)} entries named {split!r}; give exactly one "
                            f"({split}.txt, {split}.jsonl, {split}.csv or a folder {split}/)")
        return found[0]
    if path.is_dir() and all((path / s).exists() or any(path.glob(f"{s}.*")) for s in SPLITS):
        raise SpecError(f"{key}.file {path.name} holds train and test sets; say which with {key}.split "
                        "('train' for prompts, 'test' for eval_prompts)")
    return path


def _files_of(path: Path, key: str) -> list[Path]:
    if path.is_file():
        if path.suffix not in SUFFIXES:
            raise SpecError(f"{key}.file {path.name}: unsupported prompt file type {path.suffix!r}; use .txt, .jsonl or .csv")
        return [path]
    files = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix in SUFFIXES)
    if not files:
        raise SpecError(f"{key}.file: the folder {path.name} holds no .txt, .jsonl or .csv prompt files")
    return files


def open_prompts(value, key: str, base_dir: str = ""):
    """A spec's prompts value -> PromptList (inline, or a stored .json list) or PromptSet (a file or folder).

    Refuses, naming the key: a malformed value, a missing file, a set whose sha256 / count differ
    from the ones a job recorded, an inline list above MAX_PROMPTS, an empty or too long prompt."""
    if isinstance(value, dict):
        unknown = sorted(set(value) - set(SET_KEYS))
        if unknown or "file" not in value:
            raise SpecError(f"{key} as an object takes the keys {', '.join(SET_KEYS)} ('file' required), got {sorted(value)}")
        if not isinstance(value["file"], str) or not value["file"]:
            raise SpecError(f"{key}.file must be the path of a prompt file or folder (a string), got {value['file']!r}")
        column = value.get("column", "prompt")
        if not isinstance(column, str) or not column:
            raise SpecError(f"{key}.column must be a column name (a string), got {column!r}")
        path = _resolve(value, key, base_dir)
        if path.is_file() and path.suffix == ".json":
            prompts = _read_json_list(path, key)
        else:
            files = [_open_file(p, column, key) for p in _files_of(path, key)]
            sha = files[0].sha256 if len(files) == 1 and path.is_file() else hashlib.sha256(
                "\n".join(f"{p.path.relative_to(path)}:{p.sha256}" for p in files).encode()).hexdigest()
            prompts = PromptSet(files, sha, path)
        for name in ("sha256", "count"):  # what the job recorded when it was created
            if name in value and value[name] != prompts.digest()[name]:
                raise SpecError(f"{key}.file {path.name} changed since the job was created ({name} was {value[name]}, "
                                f"is {prompts.digest()[name]}); restore the file or create a new job")
        return prompts
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, list) or not all(isinstance(p, str) for p in value):
        raise SpecError(f"{key} must be a list of strings or {{'file': 'prompts.txt'}}")
    return _checked_list(value, key)


def _read_json_list(path: Path, key: str) -> PromptList:
    if path.stat().st_size > MAX_PROMPTS * MAX_PROMPT_CHARS // 100:
        raise SpecError(f"{key}.file {path.name}: a .json prompt list is read whole; for a set this large give a "
                        ".txt or .jsonl file (streamed, docs/prompts.md)")
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise SpecError(f"{key}.file {path} is not valid JSON ({e}); a .json prompt file holds a list of strings") from None
    if not isinstance(value, list) or not all(isinstance(p, str) for p in value):
        raise SpecError(f"{key}.file {path.name} must hold a list of strings")
    return _checked_list(value, key)


def _checked_list(value: list, key: str) -> PromptList:
    value = [p.strip() for p in value]
    if len(value) > MAX_PROMPTS:
        raise SpecError(f"{key} has {len(value)} prompts in a list; a list holds at most {MAX_PROMPTS}: give a prompt "
                        f"file instead ({{'file': 'prompts.txt'}}, streamed, no limit; docs/prompts.md)")
    if any(len(p) > MAX_PROMPT_CHARS for p in value):
        raise SpecError(f"{key} has a prompt longer than {MAX_PROMPT_CHARS} characters")
    if any(not p for p in value):
        raise SpecError(f"{key} contains an empty prompt; remove empty entries")
    return PromptList(value)


def recorded(value, prompts, base_dir: str = ""):
    """What job.json keeps for a file set: its absolute path, its options, its sha256 and count."""
    path = Path(value["file"])
    if not path.is_absolute() and base_dir:
        path = Path(base_dir) / path
    return {**{k: v for k, v in value.items() if k in ("column", "split")}, "file": str(path.resolve()),
            **prompts.digest()}
