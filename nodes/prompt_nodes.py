"""E-GRPO Prompt List: training prompts from a multiline text or a .txt file (one per line)."""

from __future__ import annotations

from pathlib import Path

from comfy_api.latest import io

from . import types


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


class PromptListNode(io.ComfyNode):
    """Prompts for training: typed here, or read from a .txt file in ComfyUI's input folder."""

    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="EGRPOPromptList", display_name="E-GRPO Prompt List", category=types.CATEGORY,
            inputs=[io.String.Input("prompts", multiline=True, default="a handwritten digit three\na handwritten digit seven",
                                    tooltip="One prompt per line; '#' starts a comment line."),
                    io.String.Input("file", default="", tooltip="Optional .txt file (one prompt per line) in ComfyUI's "
                                                                "input folder or an absolute path; its prompts are "
                                                                "added after the typed ones.")],
            outputs=[types.Prompts.Output(display_name="prompts"), io.Int.Output(display_name="count")],
        )

    @classmethod
    def execute(cls, prompts, file="") -> io.NodeOutput:
        out = parse_prompts(prompts)
        if file.strip():
            path = Path(file.strip())
            if not path.is_absolute() and _input_dir() is not None:
                path = _input_dir() / path
            if path.suffix.lower() != ".txt" or not path.is_file():
                raise ValueError(f"prompt file {file!r} not found as a .txt file (looked at {path})")
            out += parse_prompts(path.read_text(encoding="utf-8"))
        if not out:
            raise ValueError("the prompt list is empty: type at least one prompt (one per line) or give a .txt file")
        return io.NodeOutput(out, len(out))


NODES = [PromptListNode]
