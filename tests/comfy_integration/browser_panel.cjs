// Drives the real ComfyUI frontend with playwright-core + a system chromium (run by test_browser_panel.py).
// Opens the UI, opens the E-GRPO sidebar tab, queues a training prompt (POST /api/prompt), watches the
// panel show the job's progress (pushed over the websocket) until its before/after grid is there,
// overlays another job's curves (compareWith), measures where the essentials are (bounding boxes), takes a
// screenshot, clicks Cancel and waits until the panel shows the job cancelled. Prints one line
// "RESULT {json}" for the test to check.
// argv: a JSON file {url, chromium, timeoutMs, prompt?, jobName?, screenshot?, minIteration?, workflow?,
// compareWith?, screenshotAfter?, checkWorkflows?} (checkWorkflows: load each workflow and report the
// widgets it got).
// playwright-core is found through $PLAYWRIGHT_CORE (its folder) or the normal require paths.
"use strict";
const fs = require("fs");
const { chromium } = require(process.env.PLAYWRIGHT_CORE || "playwright-core");

const cfg = JSON.parse(fs.readFileSync(process.argv[2], "utf8"));
const log = (...a) => console.log(`[browser ${new Date().toISOString().slice(11, 19)}]`, ...a);

(async () => {
  const result = { console_errors: [], panel_log: [], toasts: [] };
  const browser = await chromium.launch({
    executablePath: cfg.chromium,
    args: ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-dev-shm-usage"],
  });
  try {
    const page = await browser.newPage({ viewport: { width: 1400, height: 860 } });
    page.on("console", (m) => {
      const t = m.text();
      if (m.type() === "error") result.console_errors.push(t.slice(0, 300));
      if (t.includes("E-GRPO")) result.panel_log.push(t.slice(0, 300));
    });
    page.on("pageerror", (e) => result.console_errors.push(`pageerror: ${String(e).slice(0, 300)}`));
    page.setDefaultTimeout(cfg.timeoutMs);

    await page.goto(cfg.url, { waitUntil: "domcontentloaded" });
    const tabButton = page.locator(".egrpo-tab-button");
    await tabButton.first().waitFor({ state: "visible" });
    result.tab_button = true;
    log("E-GRPO sidebar tab present");
    // a first start opens the template browser over the canvas: close it like a user would (Escape)
    const overlay = page.locator('[data-testid="dialog-overlay"], .p-dialog-mask');
    await page.waitForTimeout(2000);
    for (let i = 0; i < 10 && (await overlay.count()); i++) {
      await page.keyboard.press("Escape");
      await page.waitForTimeout(500);
    }
    if (await overlay.count()) throw new Error("a dialog stays open over the UI");
    if (cfg.workflow) {  // show the pack's CPU training workflow on the canvas (the screenshot's background)
      result.workflow_nodes = await page.evaluate(async (wf) => {
        await window.app.loadGraphData(wf);
        return window.app.graph.nodes.map((n) => n.type);
      }, cfg.workflow);
      log("workflow loaded:", result.workflow_nodes.join(", "));
      await page.evaluate(() => {  // place the graph in the canvas right of the sidebar panel
        const c = window.app.canvas, nodes = window.app.graph.nodes;
        const x0 = Math.min(...nodes.map((n) => n.pos[0])), y0 = Math.min(...nodes.map((n) => n.pos[1]));
        c.ds.scale = 0.62; c.ds.offset[0] = 400 / 0.62 - x0; c.ds.offset[1] = 110 / 0.62 - y0;
        c.setDirty(true, true);
      });
      await page.waitForTimeout(500);
      for (let i = 0; i < 5 && (await overlay.count()); i++) { await page.keyboard.press("Escape"); await page.waitForTimeout(300); }
    }
    if (cfg.checkWorkflows) {  // load each workflow and read back the widgets the frontend built from it
      result.workflows = {};
      for (const [name, wf] of Object.entries(cfg.checkWorkflows)) {
        result.workflows[name] = await page.evaluate(async (wf) => {
          await window.app.loadGraphData(wf);
          return window.app.graph.nodes.map((n) => ({ id: n.id, type: n.type, has_class: !!window.LiteGraph?.registered_node_types?.[n.type],
            widgets: (n.widgets || []).map((w) => ({ name: w.name, value: w.value })) }));
        }, wf);
        for (let i = 0; i < 5 && (await overlay.count()); i++) { await page.keyboard.press("Escape"); await page.waitForTimeout(300); }
      }
      log("checked workflows:", Object.keys(result.workflows).join(", "));
      if (!cfg.prompt) return;
    }
    await tabButton.first().click();
    const panel = page.locator(".egrpo-panel");
    await panel.waitFor({ state: "visible" });
    await page.getByText("E-GRPO jobs").first().waitFor();
    result.first_text = (await panel.innerText()).slice(0, 300);
    log("panel open:", JSON.stringify(result.first_text));

    const res = await page.evaluate(async (prompt) => {
      const r = await fetch("/api/prompt", { method: "POST", headers: { "Content-Type": "application/json" },
                                             body: JSON.stringify({ prompt, client_id: "egrpo-browser-test" }) });
      return { status: r.status, body: await r.json() };
    }, cfg.prompt);
    if (res.status !== 200) throw new Error(`POST /api/prompt: ${JSON.stringify(res)}`);
    result.prompt_id = res.body.prompt_id;
    log("queued prompt", result.prompt_id);

    // the panel learns of the job from websocket events (no polling): a row appears, then runs
    const row = page.locator(`.egrpo-job[data-job^="${cfg.jobName}-"]`).first();
    await row.waitFor({ state: "visible" });
    result.job = await row.getAttribute("data-job");
    log("job row:", result.job);
    await row.click();  // its page (the running job is also chosen by default)
    const seen = new Set();
    const t0 = Date.now();
    let progress = 0, iteration = 0;
    while (Date.now() - t0 < cfg.timeoutMs) {
      const status = await row.getAttribute("data-status");
      const text = (await row.innerText()).replace(/\s+/g, " ");
      const width = await row.locator(".egrpo-progress").evaluate((e) => parseFloat(e.style.width) || 0);
      const m = text.match(/(\d+)\/(\d+) it/);
      iteration = m ? +m[1] : 0;
      const grid = await page.locator(".egrpo-page .egrpo-grid-img").count();
      const key = `${status} ${width}% grid=${grid} ${text.slice(0, 100)}`;
      if (!seen.has(key)) { seen.add(key); result.panel_log.push(key); log(key); }
      progress = width;
      if (status === "running" && iteration >= cfg.minIteration && width > 0 && grid) break;
      if (["finished", "failed", "cancelled"].includes(status)) throw new Error(`job ended before cancel: ${text}`);
      await page.waitForTimeout(250);
    }
    result.progress_before_cancel = progress;
    result.iteration_before_cancel = iteration;
    if (!(progress > 0)) throw new Error("no progress shown in the panel");
    result.rows = await page.locator(".egrpo-job").evaluateAll((rows) => rows.map((r) => ({
      job: r.dataset.job, status: r.dataset.status, title: r.title, text: r.innerText.replace(/\s+/g, " ") })));
    if (cfg.compareWith) {  // overlay the finished job's curves
      const other = result.rows.find((r) => r.job.startsWith(cfg.compareWith + "-"));
      if (other) await page.locator(".egrpo-page .egrpo-compare").selectOption(other.job);
      result.compare = other ? other.job : null;
    }
    const img = page.locator(".egrpo-page .egrpo-grid-img");
    await img.evaluate((i) => i.complete || new Promise((r) => (i.onload = i.onerror = r)));
    result.grid_natural = await img.evaluate((i) => [i.naturalWidth, i.naturalHeight]);
    await page.waitForTimeout(800);
    // the essentials must be on screen without scrolling: their boxes inside the 1400 x 860 viewport
    // measured in one go (the panel re-renders on every job event: never half-way through one)
    await page.locator(".egrpo-page .egrpo-plan").first().waitFor();
    result.boxes = await page.evaluate((sels) => Object.fromEntries(Object.entries(sels).map(([name, sel]) => {
      const e = document.querySelector(sel), r = e && e.getBoundingClientRect();
      return [name, r ? { x: r.x, y: r.y, width: r.width, height: r.height } : null];
    })), { curve: ".egrpo-page .egrpo-curve", grid: ".egrpo-page .egrpo-grid-img", phases: ".egrpo-page .egrpo-phases",
      diagnostics: ".egrpo-page .egrpo-diagnostics", plan: ".egrpo-page .egrpo-plan", list: ".egrpo-job-list" });
    result.viewport = page.viewportSize();
    result.page_text = (await page.locator(".egrpo-page").innerText()).replace(/\s+/g, " ").slice(0, 800);
    log("boxes", JSON.stringify(result.boxes));
    await page.screenshot({ path: cfg.screenshot });
    result.screenshot = cfg.screenshot;
    log("screenshot", cfg.screenshot);

    await page.locator(".egrpo-page .egrpo-cancel").click();
    log("clicked Cancel");
    const done = page.locator(`.egrpo-job[data-job="${result.job}"][data-status="cancelled"]`);
    await done.waitFor({ state: "visible" });
    result.final_text = (await done.innerText()).replace(/\s+/g, " ");
    result.final_status = "cancelled";
    log("panel shows:", result.final_text);
    await page.waitForTimeout(1000);
    result.toasts = await page.locator(".p-toast-message").allInnerTexts();
    result.resume_button = (await page.locator(".egrpo-page .egrpo-resume").count()) > 0;
    if (cfg.screenshotAfter) await page.screenshot({ path: cfg.screenshotAfter });
  } catch (e) {
    result.error = String(e && e.stack || e).slice(0, 2000);
  } finally {
    await browser.close();
    console.log("RESULT " + JSON.stringify(result));
  }
})();
