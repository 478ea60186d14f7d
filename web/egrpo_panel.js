// E-GRPO sidebar tab: training jobs with status, progress and ETA, a live reward curve, the entropy
// plan, recent samples, and Cancel / Resume / Open-LoRA buttons; toasts when a job ends.
// Plain ES module for comfyui-frontend-package 1.5x (no build step). Data: REST /api/egrpo/* and the
// websocket event "egrpo.event" ({job, type, ...}) sent by the pack's job manager.
import { app } from "../../scripts/app.js";
import { api } from "../../scripts/api.js";

const state = { jobs: [], selected: null, metrics: {}, root: null, encoding: {} };  // encoding: job -> its latest "encode" event

async function getJSON(path, options) {
  const res = await api.fetchApi(path, options);
  const body = await res.json().catch(() => ({}));
  if (!res.ok) throw new Error(body.error || `${res.status} ${res.statusText}`);
  return body;
}

function toast(severity, summary, detail) {
  const t = app.extensionManager?.toast;
  if (t) t.add({ severity, summary, detail, life: severity === "error" ? 10000 : 5000 });
  else console.log(`[E-GRPO] ${summary}: ${detail}`);
}

function fmtEta(s) {
  if (s == null || !isFinite(s)) return "";
  if (s < 90) return `${Math.round(s)} s left`;
  if (s < 5400) return `${Math.round(s / 60)} min left`;
  return `${(s / 3600).toFixed(1)} h left`;
}

function el(tag, attrs = {}, ...children) {
  const node = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs)) {
    if (k === "style") Object.assign(node.style, v);
    else if (k.startsWith("on")) node.addEventListener(k.slice(2), v);
    else node.setAttribute(k, v);
  }
  for (const c of children) if (c != null) node.append(c);
  return node;
}

function fileUrl(job, name) {
  return api.apiURL(`/egrpo/jobs/${encodeURIComponent(job)}/files/${name}`) + `?t=${Date.now()}`;
}

async function refresh() {
  try {
    state.jobs = (await getJSON("/egrpo/jobs")).jobs;
    if (state.selected && !state.jobs.find((j) => j.id === state.selected)) state.selected = null;
    if (!state.selected && state.jobs.length) state.selected = state.jobs[0].id;
    if (state.selected) state.metrics[state.selected] = await getJSON(`/egrpo/jobs/${encodeURIComponent(state.selected)}/metrics`);
  } catch (e) {
    console.warn("[E-GRPO] refresh failed", e);
  }
  render();
}

async function action(job, verb) {
  try {
    if (verb === "delete") await getJSON(`/egrpo/jobs/${encodeURIComponent(job)}`, { method: "DELETE" });
    else await getJSON(`/egrpo/jobs/${encodeURIComponent(job)}/${verb}`, { method: "POST" });
    toast("info", `E-GRPO ${verb}`, job);
  } catch (e) {
    toast("error", `E-GRPO ${verb} failed`, e.message);
  }
  refresh();
}

function drawCurve(canvas, metrics) {
  const ctx = canvas.getContext("2d");
  const W = canvas.width, H = canvas.height, pad = 28;
  ctx.clearRect(0, 0, W, H);
  const series = [
    { pts: (metrics?.train || []).map((m) => [m.iteration, m.reward_mean]), color: "#4e9af1", name: "train" },
    { pts: (metrics?.eval || []).map((m) => [m.iteration, m.reward_mean]), color: "#f1a94e", name: "held-out" },
  ].filter((s) => s.pts.length);
  ctx.fillStyle = "#888"; ctx.font = "10px sans-serif";
  if (!series.length) { ctx.fillText("no metrics yet", pad, H / 2); return; }
  const all = series.flatMap((s) => s.pts);
  const xs = all.map((p) => p[0]), ys = all.map((p) => p[1]);
  const x0 = Math.min(...xs), x1 = Math.max(...xs, x0 + 1), y0 = Math.min(...ys), y1 = Math.max(...ys, y0 + 1e-6);
  const X = (x) => pad + ((x - x0) / (x1 - x0)) * (W - 2 * pad), Y = (y) => H - pad + ((y0 - y) / (y1 - y0)) * (H - 2 * pad);
  ctx.strokeStyle = "#555"; ctx.strokeRect(pad, pad / 2, W - 2 * pad, H - 1.5 * pad);
  ctx.fillText(y1.toFixed(3), 2, pad / 2 + 8); ctx.fillText(y0.toFixed(3), 2, H - pad);
  ctx.fillText(`it ${x0}`, pad, H - 8); ctx.fillText(`it ${x1}`, W - pad - 24, H - 8);
  series.forEach((s, k) => {
    ctx.strokeStyle = s.color; ctx.lineWidth = 1.5; ctx.beginPath();
    s.pts.forEach(([x, y], i) => (i ? ctx.lineTo(X(x), Y(y)) : ctx.moveTo(X(x), Y(y))));
    ctx.stroke(); ctx.fillStyle = s.color; ctx.fillText(s.name, W - pad - 60, pad / 2 + 12 + 12 * k);
  });
}

// "failed" with a message starting "process ended" = its process is gone (killed, crashed, full disk):
// shown as "failed: process ended"; "damaged" = the folder cannot be read (the message says why).
function statusText(job) {
  if (job.status === "failed" && (job.message || "").startsWith("process ended")) return "failed: process ended";
  return job.status;
}

function jobRow(job) {
  const pct = Math.round((job.progress || 0) * 100);
  const active = job.status === "running" || job.status === "queued";
  const buttons = el("div", { style: { display: "flex", gap: "4px", marginTop: "4px" } },
    active ? el("button", { class: "egrpo-cancel", onclick: (e) => { e.stopPropagation(); action(job.id, "cancel"); } }, "Cancel") : null,
    job.resumable ? el("button", { class: "egrpo-resume", onclick: (e) => { e.stopPropagation(); action(job.id, "resume"); } }, "Resume") : null,
    job.lora_name ? el("button", { class: "egrpo-open-lora", onclick: (e) => {
      e.stopPropagation();
      navigator.clipboard?.writeText(job.lora_name);
      toast("success", "LoRA ready", `${job.lora_name} (copied): pick it in a LoraLoader node\n${job.lora}`);
    } }, "Open LoRA") : null,
    !active ? el("button", { class: "egrpo-delete", onclick: (e) => { e.stopPropagation(); if (confirm(`Delete job ${job.id}?`)) action(job.id, "delete"); } }, "Delete") : null);
  return el("div", {
    class: "egrpo-job", "data-job": job.id, "data-status": job.status,
    style: { padding: "6px", margin: "4px 0", borderRadius: "4px", cursor: "pointer",
             border: `1px solid ${job.id === state.selected ? "#4e9af1" : "#444"}` },
    onclick: () => { state.selected = job.id; refresh(); },
  },
  el("div", { style: { display: "flex", justifyContent: "space-between" } },
    el("b", {}, job.name), el("span", { class: "egrpo-status" }, statusText(job))),
  el("div", { style: { height: "6px", background: "#333", borderRadius: "3px", margin: "4px 0" } },
    el("div", { class: "egrpo-progress", style: { width: `${pct}%`, height: "100%", background: "#4e9af1", borderRadius: "3px" } })),
  el("div", { style: { fontSize: "11px", opacity: 0.8 } },
    // world_size: the job's data-parallel ranks (status.json; the Train node's gpus while it waits)
    (job.world_size > 1 ? el("span", { class: "egrpo-world", title: "data-parallel: one process per GPU (torchrun)",
      style: { background: "#355", borderRadius: "3px", padding: "0 4px", marginRight: "4px" } }, `${job.world_size} ranks`) : null),
    `${job.iteration}/${job.total} it` + (job.reward_mean != null ? ` · reward ${job.reward_mean.toFixed(3)}` : "") +
    (job.eta_seconds != null ? ` · ${fmtEta(job.eta_seconds)}` : "")),
  active && state.encoding[job.id] ? el("div", { class: "egrpo-encoding", style: { fontSize: "11px", opacity: 0.8 } },
    `encoding prompts ${state.encoding[job.id].done}/${state.encoding[job.id].total} (of ${state.encoding[job.id].set_size})`) : null,
  job.message ? el("div", { class: "egrpo-message", style: { fontSize: "11px", color: job.status === "failed" || job.status === "damaged" ? "#f66" : "#aaa" } }, job.message) : null,
  // The embedded digits model's LoRA is not offered to LoraLoader (no ComfyUI model can load it).
  job.lora && !job.lora_name ? el("div", { class: "egrpo-lora-path", style: { fontSize: "11px", opacity: 0.7 } },
    `LoRA for the embedded digits model (kept in the job folder): ${job.lora}`) : null,
  buttons);
}

function render() {
  const root = state.root;
  if (!root) return;
  root.replaceChildren();
  root.append(el("div", { style: { display: "flex", justifyContent: "space-between", alignItems: "center" } },
    el("h3", { style: { margin: "4px 0" } }, "E-GRPO jobs"), el("button", { onclick: refresh }, "Refresh")));
  if (!state.jobs.length) {
    root.append(el("p", { style: { opacity: 0.7 } }, "No jobs yet. Queue a workflow with an “E-GRPO Train LoRA” node."));
    return;
  }
  for (const job of state.jobs) root.append(jobRow(job));
  const job = state.jobs.find((j) => j.id === state.selected);
  if (!job) return;
  const canvas = el("canvas", { class: "egrpo-curve", width: 300, height: 150, style: { width: "100%", background: "#1b1b1b" } });
  root.append(el("h4", { style: { margin: "8px 0 2px" } }, `Reward: ${job.name}`), canvas);
  drawCurve(canvas, state.metrics[job.id]);
  if (job.files.includes("plan.png"))
    root.append(el("h4", { style: { margin: "8px 0 2px" } }, "Entropy plan"),
      el("img", { class: "egrpo-plan", src: fileUrl(job.id, "plan.png"), style: { width: "100%" } }));
  if (job.samples.length)
    root.append(el("h4", { style: { margin: "8px 0 2px" } }, "Recent samples"),
      ...job.samples.slice(-2).reverse().map((s) =>
        el("img", { class: "egrpo-sample", src: fileUrl(job.id, `samples/${s}`), title: s, style: { width: "100%", imageRendering: "pixelated" } })));
}

let pending = null;
function scheduleRefresh() {
  if (pending) return;
  pending = setTimeout(() => { pending = null; refresh(); }, 300);
}

app.registerExtension({
  name: "egrpo.panel",
  async setup() {
    api.addEventListener("egrpo.event", ({ detail }) => {
      if (detail.type === "encode") {  // prompts encoded ahead of training (docs/prompts.md); gone when the chunk ends
        if (detail.done < detail.total) state.encoding[detail.job] = detail; else delete state.encoding[detail.job];
      } else if (detail.type === "done") {
        toast(detail.status === "finished" ? "success" : "info", `E-GRPO job ${detail.status}`,
              `${detail.job}${detail.lora ? `\nLoRA: ${detail.lora}` : ""}`);
      } else if (detail.type === "error") {
        toast("error", "E-GRPO job failed", `${detail.job}: ${detail.message}`);
      }
      scheduleRefresh();
    });
    const tab = {
      id: "egrpo", icon: "pi pi-chart-line", title: "E-GRPO", tooltip: "E-GRPO training jobs", type: "custom",
      render: (container) => {
        state.root = el("div", { class: "egrpo-panel", style: { padding: "8px", overflowY: "auto", height: "100%" } });
        container.replaceChildren(state.root);
        refresh();
      },
    };
    if (app.extensionManager?.registerSidebarTab) app.extensionManager.registerSidebarTab(tab);
    else console.warn("[E-GRPO] this ComfyUI frontend has no sidebar tabs; use the /egrpo/jobs routes");
  },
});
