"""E-GRPO Prompt List: training prompts typed in, plus optionally a .txt file from ComfyUI's input folder.

The file is a choice among the .txt files in ComfyUI's input folder (as core loaders offer files),
never a free path: the node cannot be made to read other files on the server. A file the node would
refuse (a link in input/ that leads outside it) is not offered.

Saved graphs keep loading (docs/comfyui.md, "Old graphs"): the first release took `file` as free text
(a name in input/ or an absolute path, "" for none). Those values still validate and mean today's
choice: "" is no file, a name or an absolute path inside input/ is that file; a path outside input/ is
refused with a message saying to copy the file into input/.
"""

from __future__ import annotations

import os
from pathlib import Path

from comfy_api.latest import io

from . import types

NO_FILE = "(none)"
STREAM_ABOVE_BYTES = 4 * 2**20  # a larger file is passed on as {"file": path} and streamed by the job, never read whole here


def parse_prompts(text: str) -> list[str]:
    """One prompt per line; blank lines and lines starting with '#' are skipped."""
    lines = [ln.strip() for ln in text.splitlines()]
    return [ln for ln in lines if ln and not ln.startswith("#")]


def _input_dir() -> Path | None:
    try:
        import folder_paths

        return Path(folder_paths.get_input_directory())
    except ImportError:
        return None


def prompt_files() -> list[str]:
    """The .txt files under ComfyUI's input folder that the node would read, as 'name.txt' or
    'sub/name.txt' ([] outside ComfyUI): a link that leads outside the folder is left out."""
    root = _input_dir()
    if root is None or not root.is_dir():
        return []
    names = []
    for p in root.rglob("*.txt"):
        name = p.relative_to(root).as_posix()
        try:
            prompt_file_path(name)
        except ValueError:
            continue
        names.append(name)
    return sorted(names)


def current_choice(file) -> str:
    """Today's combo value for a `file` value any released version accepted: "" (or blank, or None) is
    NO_FILE; an absolute path inside the input folder is its name there; anything else is kept (and
    checked by prompt_file_path). Raises ValueError for a path outside the input folder."""
    if file is None or not str(file).strip() or file == NO_FILE:
        return NO_FILE
    text = str(file).strip().replace("\\", "/")
    if Path(text).is_absolute():
        root = _input_dir()
        resolved = Path(text).resolve()
        if root is None or (root.resolve() not in resolved.parents):
            raise ValueError(f"prompt file {text!r} is outside ComfyUI's input folder"
                             f"{f' ({root})' if root else ''}; earlier versions read any path, this one reads only "
                             "input/: copy the file there and choose it in the list")
        return resolved.relative_to(root.resolve()).as_posix()
    return text


def prompt_file_path(name: str) -> Path:
    """The input-folder file a combo value names; refuses anything else, saying what is allowed."""
    from egrpo_backend.paths import check_name, safe_join

    root = _input_dir()
    if root is None:
        raise ValueError("prompt files are read from ComfyUI's input folder, which is not available here")
    parts = name.split("/")
    for part in parts:
        check_name(part, "prompt file name")
    path = safe_join(root, *parts)
    if path.suffix.lower() != ".txt" or not path.is_file():
        raise ValueError(f"prompt file {name!r} is not a .txt file in ComfyUI's input folder ({root}); put it "
                         "there and press R to refresh the list")
    return path


class PromptListNode(io.ComfyNode):
    """Prompts for training: typed here, and/or read from a .txt file in ComfyUI's input folder."""

    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="EGRPOPromptList", display_name="E-GRPO Prompt List", category=types.CATEGORY,
            description="Training prompts for E-GRPO Train LoRA: one per line, typed here and/or from a .txt file "
                        "in ComfyUI's input folder.",
            inputs=[io.String.Input("prompts", multiline=True, default="a handwritten digit three\na handwritten digit seven",
                                    tooltip="One prompt per line; '#' starts a comment line."),
                    io.Combo.Input("file", options=[NO_FILE, *prompt_files()], default=NO_FILE,
                                   tooltip="Optional .txt file (one prompt per line) from ComfyUI's input folder; "
                                           "its prompts are added after the typed ones. Put files in input/ and "
                                           "press R to refresh the list.")],
            outputs=[types.Prompts.Output(display_name="prompts", tooltip="The prompts, in order (typed, then the "
                                                                          "file's)."),
                     io.Int.Output(display_name="count", tooltip="How many prompts.")],
        )

    @classmethod
    def validate_inputs(cls, file=NO_FILE):
        """Replaces ComfyUI's list check for `file` (so a saved graph's "" or old path loads): True for any
        value that names a readable file today, else the reason."""
        try:
            choice = current_choice(file)
            if choice != NO_FILE:
                prompt_file_path(choice)
        except ValueError as e:
            return str(e)
        return True

    @classmethod
    def fingerprint_inputs(cls, prompts, file=NO_FILE):
        """Re-run when the chosen file changes on disk, not only when another file is chosen."""
        try:
            choice = current_choice(file)
            if choice == NO_FILE:
                return prompts
            st = os.stat(prompt_file_path(choice))
            return (prompts, choice, st.st_mtime_ns, st.st_size)
        except (OSError, ValueError):
            return (prompts, file)

    @classmethod
    def execute(cls, prompts, file=NO_FILE) -> io.NodeOutput:
        out = parse_prompts(prompts)
        choice = current_choice(file)
        if choice != NO_FILE:
            path = prompt_file_path(choice)
            if path.stat().st_size > STREAM_ABOVE_BYTES:  # a large set: the job streams it (docs/prompts.md)
                if out:
                    raise ValueError(f"prompt file {choice!r} is large ({path.stat().st_size / 2**20:.1f} MB), so the job "
                                     "reads it as a stream and it cannot be joined to the typed prompts: clear the "
                                     "typed prompts, or add them to the file")
                from egrpo_backend.prompt_sets import open_prompts

                reference = {"file": str(path)}
                return io.NodeOutput(reference, len(open_prompts(reference, "prompts")))  # indexed, not held
            out += parse_prompts(path.read_text(encoding="utf-8"))
        if not out:
            raise ValueError("the prompt list is empty: type at least one prompt (one per line) or choose a .txt file")
        return io.NodeOutput(out, len(out))


NODES = [PromptListNode]
