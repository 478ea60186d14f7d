// E-GRPO sidebar tab (docs/comfyui.md, "The panel"): a compact job list, and the selected job's page with
// its essentials on one screen: smoothed reward curve (train and held-out, optionally overlaid with a
// second job), reward components, update diagnostics, per-phase seconds and peak memory, the entropy
// plan, and the fixed-seed before/after grid of the held-out prompts. Toasts when a job ends.
// Plain ES module for comfyui-frontend-package 1.x (no build step, no dependency: the charts are small
// hand-drawn canvases). Data: REST /api/egrpo/* and the websocket event "egrpo.event" ({job, type, ...})
// that the pack's job manager sends. Colours come from ComfyUI's CSS variables (its theme).
import { app } from "../../scripts/app.js";
import { api } from "../../scripts/api.js";

const state = { jobs: [], selected: null, compare: null, metrics: {}, root: null, encoding: {} };  // encoding: job -> its latest "encode" event
const EMA_ALPHA = 0.3; // weight of the newest point in the smoothed reward curve
const COLORS = { train: "#4e9af1", eval: "#f1a94e", compare: "#b07ff0", compareEval: "#e07fb0",
  parts: ["#6fd08c", "#e8d45b", "#e0726c", "#58c4d6", "#c38be6"], phases: { rollout: "#4e9af1", decode: "#8c8cf0",
    reward: "#6fd08c", update: "#f1a94e" } };

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

function el(tag, attrs = {}, ...children) {
  const node = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs)) {
    if (v == null) continue;
    if (k === "style") Object.assign(node.style, v);
    else if (k.startsWith("on")) node.addEventListener(k.slice(2), v);
    else node.setAttribute(k, v);
  }
  for (const c of children) if (c != null && c !== false) node.append(c);
  return node;
}

const css = (name, fallback) => getComputedStyle(document.documentElement).getPropertyValue(name).trim() || fallback;
const enc = encodeURIComponent;
const fileUrl = (job, name, stamp) => api.apiURL(`/egrpo/jobs/${enc(job)}/files/${name}`) + `?t=${stamp ?? Date.now()}`;

// --- formatting --------------------------------------------------------------------------------
function fmtSeconds(s) {
  if (s == null || !isFinite(s)) return "?";
  if (s < 90) return `${Math.max(1, Math.round(s))} s`;
  if (s < 5400) return `${Math.round(s / 60)} min`;
  return `${(s / 3600).toFixed(1)} h`;
}

// A range while the iteration times still vary (job_view.eta), one number once they are steady.
function fmtEta(job) {
  if (job.eta_seconds == null) return job.status === "running" ? "ETA after the first iteration" : "";
  if (job.eta_stable || job.eta_low == null) return `~${fmtSeconds(job.eta_seconds)} left`;
  const lo = fmtSeconds(job.eta_low), hi = fmtSeconds(job.eta_high);
  return lo === hi ? `~${hi} left` : `${lo} – ${hi} left`;
}

function fmtTime(t) {
  if (!t) return "not started";
  const d = new Date(t * 1000), now = new Date();
  const hm = d.toLocaleTimeString([], { hour: "2-digit", minute: "2-digit" });
  return d.toDateString() === now.toDateString() ? hm : `${d.toLocaleDateString([], { month: "short", day: "numeric" })} ${hm}`;
}

function fmtNum(v) {
  if (v == null || !isFinite(v)) return "–";
  const a = Math.abs(v);
  return a !== 0 && (a < 1e-3 || a >= 1e4) ? v.toExponential(1) : v.toPrecision(3).replace(/\.?0+$/, "");
}

// "failed" with a message starting "process ended" = its process is gone (killed, crashed, full disk).
function statusText(job) {
  if (job.status === "failed" && (job.message || "").startsWith("process ended")) return "failed: process ended";
  return job.status;
}

const statusColor = (s) => ({ running: COLORS.train, queued: "#888", finished: "#5fbf77", cancelled: "#c9a13b",
  stopped: "#c9a13b", failed: css("--error-text", "#f66"), damaged: css("--error-text", "#f66") }[s] || "#888");

// --- data ---------------------------------------------------------------------------------------
async function refresh() {
  try {
    state.jobs = (await getJSON("/egrpo/jobs")).jobs;
    const ids = new Set(state.jobs.map((j) => j.id));
    if (state.selected && !ids.has(state.selected)) state.selected = null;
    if (state.compare && (!ids.has(state.compare) || state.compare === state.selected)) state.compare = null;
    if (!state.selected && state.jobs.length) state.selected = (state.jobs.find((j) => j.status === "running") || state.jobs[0]).id;
    for (const id of [state.selected, state.compare].filter(Boolean))
      state.metrics[id] = await getJSON(`/egrpo/jobs/${enc(id)}/metrics`);
  } catch (e) {
    console.warn("[E-GRPO] refresh failed", e);
  }
  render();
}

async function action(job, verb, query = "") {
  try {
    if (verb === "delete") await getJSON(`/egrpo/jobs/${enc(job)}`, { method: "DELETE" });
    else await getJSON(`/egrpo/jobs/${enc(job)}/${verb}${query}`, { method: "POST" });
    toast("info", `E-GRPO ${verb}`, job);
  } catch (e) {
    toast("error", `E-GRPO ${verb} failed`, e.message);
  }
  refresh();
}

function ema(points) {
  let s = null;
  return points.map(([x, y]) => [x, (s = s == null ? y : EMA_ALPHA * y + (1 - EMA_ALPHA) * s)]);
}

// --- charts -------------------------------------------------------------------------------------
// A canvas sized to its box in CSS pixels (sharp on high-DPI screens); draw(ctx, width, height).
function chart(cls, height, draw, title) {
  const canvas = el("canvas", { class: cls, title, style: { width: "100%", height: `${height}px`, display: "block" } });
  requestAnimationFrame(() => {
    const w = canvas.clientWidth || 300, dpr = window.devicePixelRatio || 1;
    canvas.width = w * dpr; canvas.height = height * dpr;
    const ctx = canvas.getContext("2d");
    ctx.scale(dpr, dpr);
    ctx.font = "10px sans-serif";
    draw(ctx, w, height);
  });
  return canvas;
}

function niceTicks(lo, hi, n = 4) {
  const span = hi - lo || Math.abs(hi) || 1, step0 = span / n, mag = 10 ** Math.floor(Math.log10(step0));
  const step = [1, 2, 5, 10].map((m) => m * mag).find((s) => s >= step0) || step0;
  const ticks = [];
  for (let v = Math.ceil(lo / step) * step; v <= hi + 1e-12; v += step) ticks.push(+v.toPrecision(6));
  return ticks;
}

// series: [{pts: [[x, y]], color, raw?: true (faint dots), dash?, width?, band?: [[x, lo, hi]]}]
function lineChart(ctx, W, H, series, { xLabel = "iteration", yLabel = "", legend = [] } = {}) {
  const fg = css("--descrip-text", "#999"), grid = css("--border-color", "#444");
  const all = series.flatMap((s) => s.pts.concat((s.band || []).flatMap(([x, lo, hi]) => [[x, lo], [x, hi]])));
  // the legend wraps onto as many lines as it needs above the plot
  const placed = [];
  let lx = 38, line = 0;
  for (const item of legend) {
    const w = 22 + ctx.measureText(item.name).width;
    if (lx + w > W && lx > 38) { line += 1; lx = 38; }
    placed.push({ ...item, x: lx, y: 6 + 12 * line });
    lx += w;
  }
  const L = 38, R = 6, T = legend.length ? 14 + 12 * line : 6, B = 24;
  ctx.fillStyle = fg;
  if (!all.length) { ctx.fillText("no data yet", L, H / 2); return; }
  const xs = all.map((p) => p[0]), ys = all.map((p) => p[1]).filter(isFinite);
  let x0 = Math.min(...xs), x1 = Math.max(...xs), y0 = Math.min(...ys), y1 = Math.max(...ys);
  if (x1 === x0) x1 = x0 + 1;
  if (y1 === y0) { y0 -= 0.5 * (Math.abs(y0) || 1); y1 += 0.5 * (Math.abs(y1) || 1); }
  const padY = (y1 - y0) * 0.08; y0 -= padY; y1 += padY;
  const X = (x) => L + ((x - x0) / (x1 - x0)) * (W - L - R), Y = (y) => T + ((y1 - y) / (y1 - y0)) * (H - T - B);
  ctx.strokeStyle = grid; ctx.lineWidth = 1; ctx.textAlign = "right"; ctx.textBaseline = "middle";
  for (const t of niceTicks(y0, y1)) {
    ctx.globalAlpha = 0.5; ctx.beginPath(); ctx.moveTo(L, Y(t)); ctx.lineTo(W - R, Y(t)); ctx.stroke(); ctx.globalAlpha = 1;
    ctx.fillText(fmtNum(t), L - 3, Y(t));
  }
  ctx.textAlign = "center"; ctx.textBaseline = "top";
  for (const t of niceTicks(x0, x1, 5).filter((t) => Number.isInteger(t))) ctx.fillText(String(t), X(t), H - B + 3);
  ctx.fillText(xLabel, (L + W - R) / 2, H - 11);
  ctx.save(); ctx.translate(9, (T + H - B) / 2); ctx.rotate(-Math.PI / 2); ctx.fillText(yLabel, 0, -6); ctx.restore();
  ctx.strokeStyle = grid; ctx.strokeRect(L, T, W - L - R, H - T - B);
  for (const s of series) {
    if (s.band?.length) {
      ctx.strokeStyle = s.color; ctx.globalAlpha = 0.45; ctx.lineWidth = 1;
      for (const [x, lo, hi] of s.band) { ctx.beginPath(); ctx.moveTo(X(x), Y(lo)); ctx.lineTo(X(x), Y(hi)); ctx.stroke(); }
      ctx.globalAlpha = 1;
    }
    if (s.raw) {
      ctx.fillStyle = s.color; ctx.globalAlpha = 0.28;
      for (const [x, y] of s.pts) { ctx.beginPath(); ctx.arc(X(x), Y(y), 1.6, 0, 7); ctx.fill(); }
      ctx.globalAlpha = 1;
      continue;
    }
    ctx.strokeStyle = s.color; ctx.lineWidth = s.width || 1.6; ctx.setLineDash(s.dash || []);
    ctx.beginPath();
    s.pts.forEach(([x, y], i) => (i ? ctx.lineTo(X(x), Y(y)) : ctx.moveTo(X(x), Y(y))));
    ctx.stroke(); ctx.setLineDash([]);
    if (s.markers) { ctx.fillStyle = s.color; for (const [x, y] of s.pts) { ctx.beginPath(); ctx.arc(X(x), Y(y), 2.5, 0, 7); ctx.fill(); } }
  }
  ctx.textAlign = "left"; ctx.textBaseline = "middle";
  for (const { name, color, dash, x, y } of placed) {
    ctx.strokeStyle = color; ctx.lineWidth = 2; ctx.setLineDash(dash || []);
    ctx.beginPath(); ctx.moveTo(x, y); ctx.lineTo(x + 12, y); ctx.stroke(); ctx.setLineDash([]);
    ctx.fillStyle = fg; ctx.fillText(name, x + 15, y);
  }
}

function rewardSeries(metrics, colors, dash, label) {
  const train = (metrics?.train || []).filter((m) => m.reward_mean != null).map((m) => [m.iteration, m.reward_mean]);
  const evals = (metrics?.eval || []).filter((m) => m.reward_mean != null);
  const series = [
    { pts: train, color: colors[0], raw: true },
    { pts: ema(train), color: colors[0], dash },
    { pts: evals.map((m) => [m.iteration, m.reward_mean]), color: colors[1], dash, markers: true,
      band: evals.filter((m) => m.reward_ci).map((m) => [m.iteration, ...m.reward_ci]) },
  ];
  const legend = [{ name: `${label}train (EMA)`, color: colors[0], dash }];
  if (evals.length) legend.push({ name: `${label}held-out`, color: colors[1], dash });
  return { series, legend };
}

// Update diagnostics as small multiples: each its own scale, its latest value in the label.
function diagnostics(metrics) {
  const train = metrics?.train || [];
  const keys = [["clip_frac", "clip fraction"], ["kl", "KL"], ["grad_norm", "grad norm"], ["lr", "learning rate"],
    ["nft_loss", "NFT loss"]].filter(([k]) => train.some((m) => m[k] != null)).slice(0, 4);
  if (!keys.length) return null;
  return el("div", { class: "egrpo-diagnostics", style: { display: "grid", gridTemplateColumns: "1fr 1fr", gap: "2px 8px" } },
    ...keys.map(([k, name]) => {
      const pts = train.filter((m) => m[k] != null).map((m) => [m.iteration, m[k]]);
      const ys = pts.map((p) => p[1]), lo = Math.min(...ys), hi = Math.max(...ys);
      return chart("egrpo-spark", 30, (ctx, W, H) => {
        const fg = css("--descrip-text", "#999");
        const x0 = pts[0][0], x1 = Math.max(pts.at(-1)[0], x0 + 1);
        ctx.fillStyle = fg; ctx.textBaseline = "top";
        ctx.fillText(`${name} ${fmtNum(ys.at(-1))}`, 0, 0);
        ctx.strokeStyle = COLORS.train; ctx.lineWidth = 1.2; ctx.beginPath();
        pts.forEach(([x, y], i) => {
          const px = ((x - x0) / (x1 - x0)) * (W - 2) + 1, py = H - 2 - (hi > lo ? ((y - lo) / (hi - lo)) * (H - 16) : (H - 16) / 2);
          i ? ctx.lineTo(px, py) : ctx.moveTo(px, py);
        });
        ctx.stroke();
      }, `${name} per iteration (own scale: ${fmtNum(lo)} to ${fmtNum(hi)})`);
    }));
}

// The latest iteration's seconds per phase as one stacked bar, with peak memory per phase.
function phaseBar(metrics) {
  const last = (metrics?.train || []).filter((m) => m.phases).at(-1);
  if (!last) return el("div", { class: "egrpo-phases", style: { fontSize: "11px", opacity: 0.7 } }, "phase timings after the first iteration");
  const phases = Object.entries(last.phases);
  const total = phases.reduce((a, [, p]) => a + (p.seconds || 0), 0) || 1;
  const peaks = phases.filter(([, p]) => p.peak_mem_gb != null);
  const peak = peaks.length ? peaks.reduce((a, b) => (b[1].peak_mem_gb > a[1].peak_mem_gb ? b : a)) : null;
  return el("div", { class: "egrpo-phases", title: phases.map(([n, p]) => `${n}: ${p.seconds.toFixed(2)} s` +
      (p.peak_mem_gb != null ? `, peak ${p.peak_mem_gb.toFixed(2)} GB` : "")).join("\n") },
    el("div", { style: { display: "flex", height: "10px", borderRadius: "3px", overflow: "hidden" } },
      ...phases.map(([n, p]) => el("div", { style: { width: `${(100 * p.seconds) / total}%`, background: COLORS.phases[n] || "#888" } }))),
    el("div", { style: { display: "flex", flexWrap: "wrap", gap: "2px 10px", fontSize: "11px", marginTop: "2px" } },
      ...phases.map(([n, p]) => el("span", {}, el("span", { style: { color: COLORS.phases[n] || "#888" } }, "■ "),
        `${n} ${p.seconds < 10 ? p.seconds.toFixed(2) : p.seconds.toFixed(0)} s`)),
      el("span", { style: { opacity: 0.8 } }, `= ${total.toFixed(total < 10 ? 2 : 0)} s/it (it ${last.iteration})`),
      el("span", { style: { opacity: 0.8 } }, peak ? `peak memory ${peak[1].peak_mem_gb.toFixed(2)} GB (${peak[0]})`
        : "peak memory: CPU run, not measured")));
}

function planChart(plan) {
  if (!plan?.steps?.length) return null;
  return chart("egrpo-plan", 36, (ctx, W, H) => {
    const fg = css("--descrip-text", "#999"), steps = plan.steps, n = steps.length;
    const hi = Math.max(plan.tau, ...steps.map((s) => s.entropy)), lo = Math.min(0, ...steps.map((s) => s.entropy));
    const bw = (W - 2) / n, Y = (v) => H - 2 - ((v - lo) / (hi - lo || 1)) * (H - 14);
    steps.forEach((s, i) => {
      ctx.fillStyle = s.kind === "sde" ? COLORS.eval : css("--border-color", "#555");
      ctx.fillRect(1 + i * bw + 1, Math.min(Y(s.entropy), Y(0)), Math.max(1, bw - 2), Math.abs(Y(0) - Y(s.entropy)) || 1);
    });
    ctx.strokeStyle = fg; ctx.setLineDash([3, 3]); ctx.beginPath(); ctx.moveTo(0, Y(plan.tau)); ctx.lineTo(W, Y(plan.tau)); ctx.stroke();
    ctx.setLineDash([]); ctx.fillStyle = fg; ctx.textBaseline = "top";
    const sde = steps.filter((s) => s.kind === "sde").length;
    ctx.fillText(`${n} steps, ${sde} SDE (orange) · dashed: tau ${plan.tau} · eta ${plan.eta}`, 0, 0);
  }, "The entropy plan: which sampling steps explore (SDE, trained) and which are deterministic (ODE). Click for the full chart.");
}

// --- the page -------------------------------------------------------------------------------------
const section = (title, ...body) => el("div", { class: "egrpo-section", style: { marginTop: "4px" } },
  el("div", { style: { fontSize: "11px", fontWeight: "600", opacity: 0.85, margin: "0 0 2px" } }, title), ...body);

function jobRow(job) {
  const pct = Math.round((job.progress || 0) * 100);
  const selected = job.id === state.selected;
  const hover = [`job ${job.id}`, job.folder && `folder: ${job.folder}`, job.lora && `LoRA: ${job.lora}`,
    job.message && `message: ${job.message}`].filter(Boolean).join("\n");
  return el("div", {
    class: "egrpo-job", "data-job": job.id, "data-status": job.status, title: hover,
    style: { padding: "3px 6px", margin: "2px 0", borderRadius: "4px", cursor: "pointer",
      background: selected ? css("--comfy-input-bg", "#222") : "transparent",
      border: `1px solid ${selected ? COLORS.train : css("--border-color", "#444")}` },
    onclick: () => { state.selected = job.id; if (state.compare === job.id) state.compare = null; refresh(); },
  },
  el("div", { style: { display: "flex", gap: "6px", alignItems: "baseline", whiteSpace: "nowrap" } },
    el("b", { style: { overflow: "hidden", textOverflow: "ellipsis" } }, job.name),
    el("span", { class: "egrpo-short-id", style: { fontFamily: "monospace", fontSize: "10px", opacity: 0.6 } }, job.short_id),
    el("span", { class: "egrpo-status", style: { marginLeft: "auto", fontSize: "11px", color: statusColor(job.status) } }, statusText(job))),
  el("div", { class: "egrpo-meta", style: { display: "flex", gap: "6px", fontSize: "10.5px", opacity: 0.75, whiteSpace: "nowrap", overflow: "hidden" } },
    el("span", {}, job.family || "?"), el("span", {}, "·"), el("span", {}, job.preset || "?"), el("span", {}, "·"),
    el("span", { title: job.started ? new Date(job.started * 1000).toString() : "" }, fmtTime(job.started)),
    job.world_size > 1 ? el("span", { class: "egrpo-world", title: "data-parallel: one process per GPU (torchrun)" }, `· ${job.world_size} ranks`) : null),
  el("div", { style: { display: "flex", alignItems: "center", gap: "6px", fontSize: "10.5px" } },
    el("div", { style: { flex: "1", height: "4px", background: css("--border-color", "#333"), borderRadius: "2px" } },
      el("div", { class: "egrpo-progress", style: { width: `${pct}%`, height: "100%", background: statusColor(job.status), borderRadius: "2px" } })),
    el("span", { class: "egrpo-iter", style: { opacity: 0.8 } }, `${job.iteration}/${job.total} it`),
    job.status === "running" ? el("span", { class: "egrpo-eta", style: { opacity: 0.8 } }, fmtEta(job)) : null));
}

function buttons(job) {
  const active = job.status === "running" || job.status === "queued";
  const b = (cls, label, title, fn) => el("button", { class: `egrpo-btn ${cls}`, title, onclick: (e) => { e.stopPropagation(); fn(); },
    style: { fontSize: "11px", padding: "1px 6px" } }, label);
  return el("div", { class: "egrpo-actions", style: { display: "flex", gap: "4px", flexWrap: "wrap" } },
    active ? b("egrpo-cancel", "Cancel", "Stop at the next safe point between phases; keeps the last finished iteration's checkpoint and LoRA",
      () => action(job.id, "cancel")) : null,
    active ? b("egrpo-force", "Kill", "Stop at once; the LoRA is the last checkpoint's", () => {
      if (confirm(`Kill job ${job.id} now? Iterations since its last checkpoint are lost.`)) action(job.id, "cancel", "?force=1");
    }) : null,
    job.resumable ? b("egrpo-resume", "Resume", "Continue from the last checkpoint", () => action(job.id, "resume")) : null,
    job.lora_name ? b("egrpo-open-lora", "Copy LoRA name", job.lora, () => {
      navigator.clipboard?.writeText(job.lora_name);
      toast("success", "LoRA ready", `${job.lora_name} (copied): pick it in a LoraLoader node`);
    }) : null,
    !active ? b("egrpo-delete", "Delete", "Delete the job folder", () => { if (confirm(`Delete job ${job.id}?`)) action(job.id, "delete"); }) : null);
}

function comparePicker(job) {
  const others = state.jobs.filter((j) => j.id !== job.id && j.status !== "damaged");
  if (!others.length) return null;
  const select = el("select", { class: "egrpo-compare", title: "Overlay another job's reward curves",
    style: { fontSize: "11px", maxWidth: "100%", background: css("--comfy-input-bg", "#222"), color: "inherit",
      border: `1px solid ${css("--border-color", "#444")}` },
    onchange: (e) => { state.compare = e.target.value || null; refresh(); } },
  el("option", { value: "" }, "compare with another job…"),
  ...others.map((j) => el("option", { value: j.id, ...(j.id === state.compare ? { selected: "" } : {}) },
    `compare with ${j.name} ${j.short_id}`)));
  return select;
}

function jobPage(job) {
  const m = state.metrics[job.id];
  const other = state.compare && state.jobs.find((j) => j.id === state.compare);
  const mine = rewardSeries(m, [COLORS.train, COLORS.eval], null, "");
  const theirs = other ? rewardSeries(state.metrics[other.id], [COLORS.compare, COLORS.compareEval], [4, 3], `${other.short_id} `) : null;
  const curve = chart("egrpo-curve", 150, (ctx, W, H) => lineChart(ctx, W, H,
    [...(theirs ? theirs.series.filter((s) => !s.raw) : []), ...mine.series],
    { yLabel: "reward (mean)", legend: [...mine.legend, ...(theirs ? theirs.legend : [])] }),
  "Mean reward per iteration: dots are raw rollout means, the line their EMA; held-out evaluations with their 95% CI");
  const parts = (m?.components || []);
  const comps = parts.length > 1 ? chart("egrpo-components", 64, (ctx, W, H) => lineChart(ctx, W, H,
    parts.map((p, i) => ({ pts: ema((m.train || []).filter((t) => t[`reward/${p}`] != null).map((t) => [t.iteration, t[`reward/${p}`]])),
      color: COLORS.parts[i % COLORS.parts.length] })),
    { yLabel: "unweighted", legend: parts.map((p, i) => ({ name: p, color: COLORS.parts[i % COLORS.parts.length] })) }),
  "Each reward component (unweighted, EMA)") : null;
  const grid = m?.before_after;
  const rowLabel = (text) => el("div", { style: { flex: "1", display: "flex", alignItems: "center", justifyContent: "center",
    writingMode: "vertical-rl", transform: "rotate(180deg)", fontSize: "10px", opacity: 0.8 } }, text);
  const gridBox = grid ? el("figure", { class: "egrpo-grid", style: { margin: 0 } },
    el("div", { style: { display: "flex", gap: "3px" } },
      el("div", { style: { display: "flex", flexDirection: "column", width: "14px" } }, rowLabel("base"), rowLabel(`it ${grid.iteration}`)),
      el("img", { class: "egrpo-grid-img", src: fileUrl(job.id, grid.path, grid.time), alt: "before/after grid",
        title: grid.prompts.map((p, i) => `${i + 1}. ${p} (seed ${grid.seeds[i]})`).join("\n"),
        style: { flex: "1", minWidth: "0", maxHeight: "150px", objectFit: "contain", objectPosition: "left",
          imageRendering: "pixelated", display: "block", borderRadius: "3px" } })),
    el("figcaption", { style: { fontSize: "10.5px", opacity: 0.75 } },
      `base model vs LoRA at iteration ${grid.iteration}, same seed per column; hover for the prompts`))
    : el("div", { class: "egrpo-grid egrpo-grid-empty", style: { fontSize: "11px", opacity: 0.7 } },
      "appears at the first held-out evaluation (train.evaluate and eval_every)");
  const plan = planChart(m?.plan);
  if (plan) plan.addEventListener("click", () => window.open(fileUrl(job.id, "plan.png"), "_blank"));
  const noLora = ["cancelled", "failed", "stopped"].includes(job.status) && !job.lora;
  const picker = comparePicker(job);
  return el("div", { class: "egrpo-page", "data-job": job.id },
    el("div", { style: { display: "flex", alignItems: "center", gap: "6px", marginTop: "8px",
      borderTop: `1px solid ${css("--border-color", "#444")}`, paddingTop: "6px" } },
      el("b", { style: { overflow: "hidden", textOverflow: "ellipsis", whiteSpace: "nowrap" }, title: job.folder }, job.name),
      el("span", { style: { fontFamily: "monospace", fontSize: "10px", opacity: 0.6 } }, job.short_id),
      el("span", { style: { marginLeft: "auto" } }), buttons(job)),
    el("div", { style: { display: "flex", gap: "8px", alignItems: "center", fontSize: "11px", margin: "2px 0", whiteSpace: "nowrap" } },
      el("span", { style: { color: statusColor(job.status) } }, statusText(job)),
      el("span", {}, `${job.iteration}/${job.total} it`),
      job.reward_mean != null ? el("span", {}, `reward ${fmtNum(job.reward_mean)}`) : null,
      job.status === "running" ? el("span", { class: "egrpo-page-eta" }, fmtEta(job)) : null),
    job.status === "running" && state.encoding[job.id] ? el("div", { class: "egrpo-encoding", style: { fontSize: "11px", opacity: 0.8 } },
      `encoding prompts ${state.encoding[job.id].done}/${state.encoding[job.id].total} (of ${state.encoding[job.id].set_size})`) : null,
    picker ? el("div", { style: { display: "flex", justifyContent: "flex-end", margin: "2px 0" } }, picker) : null,
    job.message ? el("div", { class: "egrpo-message", style: { fontSize: "11px", color: ["failed", "damaged"].includes(job.status)
      ? css("--error-text", "#f66") : css("--descrip-text", "#aaa") } }, job.message) : null,
    noLora ? el("div", { class: "egrpo-no-lora", style: { fontSize: "11px", opacity: 0.75 } }, "no LoRA (no finished iteration was saved)") : null,
    job.lora && !job.lora_name ? el("div", { class: "egrpo-lora-path", title: job.lora, style: { fontSize: "11px", opacity: 0.7 } },
      "LoRA of the embedded digits model: in the job folder (hover)") : null,
    curve, comps,
    section("Update: clip fraction, KL, grad norm, learning rate", diagnostics(m) || el("div", { style: { fontSize: "11px", opacity: 0.7 } }, "after the first iteration")),
    section("Seconds per phase and peak memory (latest iteration)", phaseBar(m)),
    section("Before / after (fixed seeds, held-out prompts)", gridBox),
    plan ? section("Entropy plan (click for the full chart)", plan) : null,
    job.samples?.length ? section("Latest rollout samples (a row per group)",
      el("img", { class: "egrpo-sample", src: fileUrl(job.id, `samples/${job.samples.at(-1)}`, job.updated), title: job.samples.at(-1),
        style: { width: "100%", imageRendering: "pixelated", display: "block" } })) : null);
}

function render() {
  const root = state.root;
  if (!root) return;
  root.replaceChildren();
  root.append(el("div", { style: { display: "flex", justifyContent: "space-between", alignItems: "center" } },
    el("h3", { style: { margin: "2px 0" } }, "E-GRPO jobs"), el("button", { onclick: refresh, style: { fontSize: "11px" } }, "Refresh")));
  if (!state.jobs.length) {
    root.append(el("p", { style: { opacity: 0.7 } }, "No jobs yet. Queue a workflow with an “E-GRPO Train LoRA” node."));
    return;
  }
  root.append(el("div", { class: "egrpo-job-list", style: { maxHeight: "126px", overflowY: "auto" } }, ...state.jobs.map(jobRow)));
  const job = state.jobs.find((j) => j.id === state.selected);
  if (job) root.append(jobPage(job));
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
          `${detail.job}${detail.lora ? "" : " (no LoRA)"}`);
      } else if (detail.type === "error") {
        toast("error", "E-GRPO job failed", `${detail.job}: ${detail.message}`);
      } else if (detail.type === "notice") {  // e.g. the Train node encodes every prompt itself (docs/prompts.md)
        toast("warn", "E-GRPO", `${detail.job}: ${detail.message}`);
      }
      scheduleRefresh();
    });
    const tab = {
      id: "egrpo", icon: "pi pi-chart-line", title: "E-GRPO", tooltip: "E-GRPO training jobs", type: "custom",
      render: (container) => {
        state.root = el("div", { class: "egrpo-panel", style: { padding: "6px 8px", overflowY: "auto", height: "100%",
          boxSizing: "border-box", color: css("--fg-color", "#ddd"), fontSize: "12px" } });
        container.replaceChildren(state.root);
        refresh();
      },
    };
    if (app.extensionManager?.registerSidebarTab) app.extensionManager.registerSidebarTab(tab);
    else console.warn("[E-GRPO] this ComfyUI frontend has no sidebar tabs; use the /egrpo/jobs routes");
  },
});
