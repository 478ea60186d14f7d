"""The E-GRPO sidebar panel (and the shared workflows) in the REAL ComfyUI frontend, in headless chromium.

Runs when COMFYUI_PATH is set (conftest.py) AND node, a chromium and playwright-core are available;
skipped with the reason printed otherwise. Setup (outside the repository):
    apt-get install -y chromium                        # /usr/bin/chromium, or set $CHROMIUM
    mkdir -p /tmp/browser && cd /tmp/browser && npm install playwright-core
    # found at /tmp/browser/node_modules/playwright-core, or set $PLAYWRIGHT_CORE to its folder
A first job trains to its end; then browser_panel.cjs opens the UI at 1400 x 860, finds the E-GRPO sidebar
tab, queues a second CPU training through POST /api/prompt, watches its progress appear in the panel
(websocket events) until its before/after grid is there, overlays the finished job's curves, checks that
the reward curve, the grid, the phase timings, the update diagnostics and the entropy plan are inside the
viewport without scrolling (bounding boxes), takes a screenshot ($EGRPO_PANEL_PNG, e.g. docs/panel.png; a
temporary file otherwise; the canvas behind the panel shows workflows/egrpo_train_default_cpu.json, or
$EGRPO_PANEL_WORKFLOW), clicks Cancel and waits for the panel to show the job cancelled; the REST API
must agree.
A second test loads every workflow in workflows/ into the real frontend and checks that each widget
value lands on a widget of the right type (the frontend adds a `control_after_generate` widget after
every INT input named `seed` or `noise_seed`, which shifts the values of a workflow that omits it).
"""

import json
import os
import shutil
import subprocess
import sys
import uuid
from pathlib import Path

import pytest

from comfy_itest import training_prompt, wait_history, wait_job

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]


def _find_browser_tools():
    node = shutil.which("node")
    candidates = [os.environ["CHROMIUM"]] if os.environ.get("CHROMIUM") else [
        "/usr/bin/chromium", shutil.which("chromium"), shutil.which("chromium-browser")]
    chromium = next((p for p in candidates if p and os.path.exists(p)), None)
    pw = os.environ.get("PLAYWRIGHT_CORE") or "/tmp/browser/node_modules/playwright-core"
    if node and not os.path.isdir(pw):
        found = subprocess.run([node, "-e", "console.log(require('path').dirname(require.resolve('playwright-core/package.json')))"],
                               capture_output=True, text=True)
        pw = found.stdout.strip() if found.returncode == 0 else None
    missing = [n for n, v in (("node", node), ("chromium", chromium), ("playwright-core", pw and os.path.isdir(pw))) if not v]
    return node, chromium, pw, missing


NODE, CHROMIUM, PLAYWRIGHT_CORE, MISSING = _find_browser_tools()
if MISSING and os.environ.get("COMFYUI_PATH"):
    print(f"tests/comfy_integration/test_browser_panel.py: skipped, missing {', '.join(MISSING)} "
          "(apt-get install chromium; npm install playwright-core in /tmp/browser)", file=sys.stderr)
pytestmark = pytest.mark.skipif(bool(MISSING), reason=f"browser test needs {', '.join(MISSING)}")


def _run_browser(cfg: dict, tmp_path: Path) -> dict:
    (tmp_path / "cfg.json").write_text(json.dumps(cfg))
    run = subprocess.run([NODE, str(HERE / "browser_panel.cjs"), str(tmp_path / "cfg.json")], capture_output=True,
                         text=True, timeout=600, env={**os.environ, "PLAYWRIGHT_CORE": PLAYWRIGHT_CORE})
    print("\n".join(l for l in run.stdout.splitlines() if not l.startswith("RESULT "))[-4000:], run.stderr[-2000:])
    line = next((l for l in run.stdout.splitlines() if l.startswith("RESULT ")), None)
    assert line, (run.returncode, run.stdout[-3000:], run.stderr[-3000:])
    return json.loads(line[len("RESULT "):])


def _inside(box, viewport) -> bool:
    return bool(box) and box["width"] > 20 and box["height"] > 8 and box["x"] >= 0 and box["y"] >= 0 and \
        box["x"] + box["width"] <= viewport["width"] + 0.5 and box["y"] + box["height"] <= viewport["height"] + 0.5


def test_panel_at_1400x860_shows_the_essentials_of_a_running_job_beside_a_finished_one(comfy_server, tmp_path):
    """A finished job and a running one: the running job's page shows its reward curve (overlaid with the
    finished job's), before/after grid and phase timings inside the 1400 x 860 viewport without scrolling;
    paths only on hover; Cancel from its page ends it "cancelled" with a LoRA."""
    tag = uuid.uuid4().hex[:6]
    finished, running = f"done_{tag}", f"live_{tag}"
    fast = {"train": {"eval_every": 1, "sample_every": 1}}
    post = comfy_server.http("/api/prompt", {"prompt": training_prompt(finished, iterations=3, reward="digit_probability",
                                                                       overrides=fast)})
    wait_history(comfy_server.url, post["prompt_id"], timeout=120)
    done = next(j for j in comfy_server.http("/api/egrpo/jobs")["jobs"] if j["name"] == finished)
    done = wait_job(comfy_server.url, done["id"], timeout=300)
    assert done["status"] == "finished", done
    # long enough to watch and cancel; held-out evaluations (the grid) every 2 iterations
    prompt = training_prompt(running, iterations=40, reward="digit_probability",
                             overrides={"train": {"eval_every": 2, "sample_every": 1},
                                        "eval_prompts": ["a handwritten digit one", "a handwritten digit four",
                                                         "a handwritten digit seven", "a handwritten digit eight"]})
    shot = Path(os.environ.get("EGRPO_PANEL_PNG") or tmp_path / "panel.png").resolve()
    workflow = Path(os.environ.get("EGRPO_PANEL_WORKFLOW") or REPO / "workflows" / "egrpo_train_default_cpu.json")
    r = _run_browser({"url": comfy_server.url, "prompt": prompt, "jobName": running, "screenshot": str(shot),
                      "chromium": CHROMIUM, "minIteration": 4, "timeoutMs": 300_000, "compareWith": finished,
                      "workflow": json.loads(workflow.read_text()),
                      "screenshotAfter": str(tmp_path / "panel_cancelled.png")}, tmp_path)
    assert "error" not in r, r
    assert r["tab_button"]
    assert "EGRPOTrainLora" in r["workflow_nodes"], r["workflow_nodes"]
    assert r["job"].startswith(running)
    rows = {row["job"]: row for row in r["rows"]}
    assert rows[done["id"]]["status"] == "finished" and rows[r["job"]]["status"] == "running", rows
    for row in rows.values():  # name, short id, family, preset on the row; the folder only on hover
        assert row["job"].split("-")[-1][:8] in row["text"] and "digits" in row["text"] and "egrpo" in row["text"], row
        folder = row["title"].split("folder: ", 1)[1].split("\n")[0]
        assert folder.startswith("/") and folder not in row["text"] and "jobs/" not in row["text"], row
    print("boxes:", r["boxes"], "viewport:", r["viewport"])
    for name in ("curve", "grid", "phases", "diagnostics", "plan"):
        assert _inside(r["boxes"][name], r["viewport"]), (name, r["boxes"][name])
    assert r["grid_natural"][0] > 0, r["grid_natural"]  # the before/after image loaded
    assert r["compare"] == done["id"]
    assert "s/it" in r["page_text"] and "left" in r["page_text"], r["page_text"]
    assert r["progress_before_cancel"] > 0 and r["iteration_before_cancel"] >= 4
    assert r["final_status"] == "cancelled"
    assert shot.stat().st_size > 10_000
    ours = [e for e in r["console_errors"] if "egrpo" in e.lower()]
    assert not ours, ours
    job = wait_job(comfy_server.url, r["job"], timeout=60)
    print("job after cancel:", {k: job.get(k) for k in ("status", "iteration", "total", "lora_name", "resumable")})
    assert job["status"] == "cancelled", job
    assert 4 <= job["iteration"] < 40
    assert job.get("lora"), job  # cancel leaves a usable LoRA
    Path(job["lora"]).unlink(missing_ok=True)


CONTROL_VALUES = {"fixed", "increment", "decrement", "randomize"}


def _widget_problem(node_type, value, spec):
    """What is wrong with `value` for the input spec [type, options] of object_info (None if fine)."""
    kind, opts = spec[0], (spec[1] if len(spec) > 1 and isinstance(spec[1], dict) else {})
    if isinstance(kind, list) or kind == "COMBO":
        options = kind if isinstance(kind, list) else opts.get("options", [])
        if not isinstance(value, str):
            return f"combo value {value!r} is not a string"
        if node_type.startswith("EGRPO") and value not in options:  # core loaders list files this server lacks
            return f"{value!r} is not one of {options}"
    elif kind in ("INT", "FLOAT"):
        if isinstance(value, bool) or not isinstance(value, (int, float)) or value != value:
            return f"{value!r} is not a number"
        if ("min" in opts and value < opts["min"]) or ("max" in opts and value > opts["max"]):
            return f"{value} is outside [{opts.get('min')}, {opts.get('max')}]"
        if kind == "INT" and value != int(value):
            return f"{value} is not an integer"
    elif kind == "STRING" and not isinstance(value, str):
        return f"{value!r} is not a string"
    elif kind == "BOOLEAN" and not isinstance(value, bool):
        return f"{value!r} is not a boolean"
    return None


def _pending_inputs(wf: dict, info: dict) -> list[str]:
    """Inputs a workflow names (widgets_values_named) that this server's nodes do not have yet, e.g. the
    Train node's `length` before the comfy video policy lands (its last widget: the values before it
    still line up, and the frontend ignores the extra value)."""
    missing = []
    for n in wf["nodes"]:
        spec = info.get(n["type"], {}).get("input", {})
        known = {**spec.get("required", {}), **spec.get("optional", {})}
        missing += [f"{n['type']}.{k}" for k in n.get("widgets_values_named", {}) if k not in known
                    and k != "control_after_generate"]
    return missing


def test_workflows_load_in_the_frontend_with_values_on_the_right_widgets(comfy_server, tmp_path):
    folder = Path(os.environ.get("EGRPO_WORKFLOWS_DIR") or REPO / "workflows")  # override: check candidate files
    info = comfy_server.http("/api/object_info")
    workflows = {p.name: json.loads(p.read_text()) for p in sorted(folder.glob("*.json"))}
    assert workflows, folder
    pending = {name: _pending_inputs(wf, info) for name, wf in workflows.items()}
    for name, missing in pending.items():
        if missing:
            print(f"{name}: not checked by name, this server's nodes lack {', '.join(missing)}", file=sys.stderr)
    r = _run_browser({"url": comfy_server.url, "chromium": CHROMIUM, "timeoutMs": 120_000,
                      "checkWorkflows": workflows}, tmp_path)
    assert "error" not in r, r
    problems = []
    for wf_name, nodes in r["workflows"].items():
        named = {n["id"]: n.get("widgets_values_named", {}) for n in workflows[wf_name]["nodes"]}
        for node in nodes:
            where = f"{wf_name}: node {node['id']} {node['type']}"
            got = {w["name"]: w["value"] for w in node["widgets"]}
            for key, value in named.get(node["id"], {}).items():  # by name: e.g. length on the length widget
                if f"{node['type']}.{key}" in pending[wf_name]:
                    continue
                if got.get(key) != value:
                    problems.append(f"{where}: widget {key} = {got.get(key)!r}, the workflow says {value!r}")
            if not node["has_class"] or node["type"] not in info:
                problems.append(f"{where}: unknown node type")
                continue
            spec = info[node["type"]]["input"]
            inputs = {**spec.get("required", {}), **spec.get("optional", {})}
            for w in node["widgets"]:
                if w["name"].endswith("control_after_generate"):
                    bad = None if w["value"] in CONTROL_VALUES else f"{w['value']!r} is not one of {sorted(CONTROL_VALUES)}"
                elif w["name"] in inputs:
                    bad = _widget_problem(node["type"], w["value"], inputs[w["name"]])
                else:
                    continue  # frontend-only widgets (previews)
                if bad:
                    problems.append(f"{where}: widget {w['name']}: {bad}")
    print("\n".join(problems) or "all widget values fit their widgets")
    assert not problems, "\n".join(problems)


VIDEO_WORKFLOWS = ("egrpo_train_wan21_lora.json", "egrpo_train_wan22_5b_lora.json", "egrpo_train_hunyuan_video_lora.json")


def test_video_workflows_load_in_the_frontend(comfy_server, tmp_path):
    """Wan 2.x and HunyuanVideo: every node type exists in this ComfyUI and the Train node's width,
    height and length land on those widgets (skipped, with the reason, until the Train node has length)."""
    info = comfy_server.http("/api/object_info")
    workflows = {n: json.loads((REPO / "workflows" / n).read_text()) for n in VIDEO_WORKFLOWS}
    missing = sorted({m for wf in workflows.values() for m in _pending_inputs(wf, info)})
    if missing:
        pytest.skip(f"this server's nodes lack {', '.join(missing)} (the Train node's length comes with the comfy "
                    "video policy); the video workflows load once it is there")
    r = _run_browser({"url": comfy_server.url, "chromium": CHROMIUM, "timeoutMs": 120_000,
                      "checkWorkflows": workflows}, tmp_path)
    assert "error" not in r, r
    for name, nodes in r["workflows"].items():
        assert all(n["has_class"] for n in nodes), (name, [n["type"] for n in nodes if not n["has_class"]])
        train = next(n for n in nodes if n["type"] == "EGRPOTrainLora")
        got = {w["name"]: w["value"] for w in train["widgets"]}
        want = next(n for n in workflows[name]["nodes"] if n["type"] == "EGRPOTrainLora")["widgets_values_named"]
        assert {k: got.get(k) for k in ("width", "height", "length", "device")} == \
            {k: want[k] for k in ("width", "height", "length", "device")}, name
