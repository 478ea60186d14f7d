"""E-GRPO Prompt List: training prompts typed in, plus optionally a .txt file from ComfyUI's input folder.

The file is a choice among the .txt files in ComfyUI's input folder (as core loaders offer files),
never a free path: the node cannot be made to read other files on the server.
"""

from __future__ import annotations

import os
from pathlib import Path

from comfy_api.latest import io

from . import types

NO_FILE = "(none)"


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
    """The .txt files under ComfyUI's input folder, as 'name.txt' or 'sub/name.txt' ([] outside ComfyUI)."""
    root = _input_dir()
    if root is None or not root.is_dir():
        return []
    return sorted(p.relative_to(root).as_posix() for p in root.rglob("*.txt") if p.is_file())


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
    def fingerprint_inputs(cls, prompts, file=NO_FILE):
        """Re-run when the chosen file changes on disk, not only when another file is chosen."""
        if not file or file == NO_FILE:
            return prompts
        try:
            st = os.stat(prompt_file_path(file))
            return (prompts, file, st.st_mtime_ns, st.st_size)
        except (OSError, ValueError):
            return (prompts, file)

    @classmethod
    def execute(cls, prompts, file=NO_FILE) -> io.NodeOutput:
        out = parse_prompts(prompts)
        if file and file != NO_FILE:
            out += parse_prompts(prompt_file_path(file).read_text(encoding="utf-8"))
        if not out:
            raise ValueError("the prompt list is empty: type at least one prompt (one per line) or choose a .txt file")
        return io.NodeOutput(out, len(out))


NODES = [PromptListNode]
