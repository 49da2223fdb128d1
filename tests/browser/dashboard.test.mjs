// The dashboard in Debian's headless Chromium, driven by playwright-core (no browser download).
//
//   node tests/browser/dashboard.test.mjs --url http://127.0.0.1:PORT --out DIR --profile DIR \
//        --slow TASK_ID --xss TASK_ID
//
// tests/browser.rs starts a worker with the two tasks (one printing "out N" / "err N" to stdout
// and stderr slowly, one printing <script>alert(1)</script>) and runs this; screenshots go to
// --out. Any JavaScript dialog (alert, confirm, prompt) or page error fails the run.

import { test, before, after } from "node:test";
import assert from "node:assert/strict";
import fs from "node:fs";
import path from "node:path";
import { parseArgs } from "node:util";
import { chromium } from "playwright-core";

const { values: opt } = parseArgs({
  options: {
    url: { type: "string" },
    out: { type: "string" },
    profile: { type: "string" },
    slow: { type: "string" },
    xss: { type: "string" },
    finished: { type: "string", default: "0" },
    chromium: { type: "string", default: "/usr/bin/chromium" },
  },
});
for (const k of ["url", "out", "profile", "slow", "xss"]) if (!opt[k]) throw new Error("missing --" + k);
fs.mkdirSync(opt.out, { recursive: true });

const taskPath = (id) => id.split("/").map(encodeURIComponent).join("/");
const dialogs = [];
const pageErrors = [];
let context;
let page;

before(async () => {
  // Debian's Chromium, as root, with no network beyond loopback: the flags of the machine notes.
  context = await chromium.launchPersistentContext(opt.profile, {
    executablePath: opt.chromium,
    headless: true,
    viewport: { width: 1280, height: 860 },
    args: [
      "--headless",
      "--no-sandbox",
      "--disable-gpu",
      "--disable-quic",
      "--no-first-run",
      "--disable-background-networking",
      "--disable-component-update",
      "--disable-sync",
    ],
  });
  page = context.pages()[0] || (await context.newPage());
  page.on("dialog", async (d) => {
    dialogs.push(d.type() + ": " + d.message());
    await d.dismiss();
  });
  page.on("pageerror", (e) => pageErrors.push(e.message));
  page.setDefaultTimeout(15000);
});

after(async () => {
  if (context) await context.close();
});

async function shot(name) {
  const file = path.join(opt.out, name);
  await page.screenshot({ path: file, fullPage: false });
  console.log("screenshot: " + file);
}

const row = (id) => page.locator(`#rows tr[data-id="${id.replaceAll("\\", "\\\\").replaceAll('"', '\\"')}"]`);

test("the list shows the running task with its memory, and links to it", async () => {
  const total = Number(opt.finished) + 2;
  const t0 = Date.now();
  await page.goto(opt.url + "/");
  const r = row(opt.slow);
  await r.locator(".state-RUNNING").waitFor();
  await page.waitForFunction((n) => document.querySelectorAll("#rows tr").length === n, total);
  console.log("list of " + total + " tasks shown in " + (Date.now() - t0) + " ms");
  // Usable with that many rows: filtering and searching answer at once.
  let t = Date.now();
  await page.fill("#search", "load/task-99");
  await page.waitForFunction(() => document.querySelectorAll("#rows tr").length === 11);
  await page.fill("#search", "");
  await page.waitForFunction((n) => document.querySelectorAll("#rows tr").length === n, total);
  const searchMs = Date.now() - t;
  console.log("search and clear over " + total + " rows: " + searchMs + " ms");
  assert.ok(searchMs < 2000, "searching took " + searchMs + " ms");
  t = Date.now();
  // Memory is read from the task's cgroup: wait for a non-zero figure.
  await page.waitForFunction((id) => {
    const tr = [...document.querySelectorAll("#rows tr")].find((t) => t.dataset.id === id);
    const mem = tr && tr.children[2].textContent;
    return mem && mem !== "–" && !/^0 B$/.test(mem);
  }, opt.slow);
  const mem = await r.locator("td").nth(2).textContent();
  assert.match(mem, /^[0-9.]+ (B|KiB|MiB|GiB)$/);
  assert.equal(await page.locator("#f-running").textContent(), "2");
  // The XSS task's id is shown as text.
  assert.equal(await row(opt.xss).locator("a").textContent(), opt.xss);
  assert.equal(await page.locator("#rows img").count(), 0);
  // The cache panel: a row per cache kind, one per filesystem, no pressure here.
  await page.waitForFunction(() => document.querySelectorAll("#cache-kinds tr").length === 5);
  assert.equal(await page.locator("#cache-kinds tr").first().locator("td").first().textContent(), "bundles");
  assert.ok((await page.locator("#cache-disks tr").count()) >= 1);
  assert.ok(await page.locator("#cache-pressure").isHidden());
  // Filters: failed tasks (none), succeeded ones, running ones.
  await page.click('#state-filter button[data-filter="FAILED"]');
  await page.locator("#empty").waitFor({ state: "visible" });
  await page.click('#state-filter button[data-filter="SUCCEEDED"]');
  await page.waitForFunction((n) => document.querySelectorAll("#rows tr").length === n, Number(opt.finished));
  await page.click('#state-filter button[data-filter="RUNNING"]');
  await r.waitFor();
  assert.equal(await page.locator("#rows tr").count(), 2);
  const filterMs = Date.now() - t;
  console.log("state filters over " + total + " rows: " + filterMs + " ms");
  assert.ok(filterMs < 2000, "filtering took " + filterMs + " ms");
  await page.click('#state-filter button[data-filter="active"]');
  await page.waitForFunction(() => document.querySelectorAll("#rows tr").length === 2);
  await page.waitForTimeout(1200); // one more live update, for the picture
  await shot("list.png");
  await r.locator("a").click();
  await page.waitForURL(opt.url + "/task/" + taskPath(opt.slow));
  await page.locator("#state.state-RUNNING").waitFor();
  assert.equal(await page.locator("#task-id").textContent(), opt.slow);
});

async function lines(cls) {
  return page.locator("#log-lines .line" + (cls || "")).evaluateAll((ls) => ls.map((l) => [l.className, l.querySelector(".d").textContent]));
}

test("the log tabs show stdout and stderr lines in the right tabs", async () => {
  await page.locator("#log-lines .line.src-stdout").first().waitFor();
  await page.locator("#log-lines .line.src-stderr").first().waitFor();
  const all = await lines();
  assert.ok(all.some(([c, d]) => c.includes("src-stdout") && /^out \d+$/.test(d)), JSON.stringify(all.slice(-5)));
  assert.ok(all.some(([c, d]) => c.includes("src-stderr") && /^err \d+$/.test(d)), JSON.stringify(all.slice(-5)));

  await page.click('#log-tabs button[data-source="stdout"]');
  await page.waitForFunction(() => document.querySelectorAll("#log-lines .line.src-stderr").length === 0 && document.querySelectorAll("#log-lines .line.src-stdout").length > 0);
  let shown = await lines();
  assert.ok(shown.every(([c, d]) => c.includes("src-stdout") && d.startsWith("out ")), JSON.stringify(shown));

  await page.click('#log-tabs button[data-source="stderr"]');
  await page.waitForFunction(() => document.querySelectorAll("#log-lines .line.src-stdout").length === 0 && document.querySelectorAll("#log-lines .line.src-stderr").length > 0);
  shown = await lines();
  assert.ok(shown.every(([c, d]) => c.includes("src-stderr") && d.startsWith("err ")), JSON.stringify(shown));

  // The BUILD tab: this task printed nothing while it was built.
  await page.click('#log-tabs button[data-source="build"]');
  await page.waitForFunction(() => document.querySelectorAll("#log-lines .line").length === 0);

  // The regex search box, on all sources.
  await page.click('#log-tabs button[data-source=""]');
  await page.fill("#log-search", "^err [0-9]*5$");
  await page.waitForFunction(() => {
    const ds = [...document.querySelectorAll("#log-lines .line .d")].map((d) => d.textContent);
    return ds.length > 0 && ds.every((d) => /^err \d*5$/.test(d));
  });
  await page.fill("#log-search", "");
  await page.locator("#log-lines .line.src-stdout").first().waitFor();
});

test("a new line appears live within 2 s of being written", async () => {
  const last = async () =>
    page.locator("#log-lines .line").last().evaluate((l) => ({ n: Number(l.dataset.n), ts: Date.parse(l.querySelector(".t").title) }));
  const start = await last();
  // Wait for the next line, then compare when it was written (stamped by the supervisor as it
  // read the line) with when it showed up here.
  const handle = await page.waitForFunction(
    (n) => {
      const l = document.querySelector("#log-lines .line:last-child");
      return l && Number(l.dataset.n) > n ? Date.now() : false;
    },
    start.n,
    { polling: 50, timeout: 5000 },
  );
  const seenAt = await handle.jsonValue();
  const lines = await page.locator("#log-lines .line").evaluateAll((ls, n) => ls.filter((l) => Number(l.dataset.n) > n).map((l) => Date.parse(l.querySelector(".t").title)), start.n);
  const delay = seenAt - Math.min(...lines);
  console.log("live line delay: " + delay + " ms");
  assert.ok(delay <= 2000, "a new line took " + delay + " ms to appear");
  // The chart has samples by now.
  await page.locator("#chart polyline.mem-line").waitFor();
  await page.waitForTimeout(500);
  await shot("task.png");
});

test("the Kill button asks first, then the task becomes KILLED", async () => {
  await page.click("#kill");
  const dialog = page.locator("#kill-dialog");
  await dialog.waitFor({ state: "visible" });
  assert.equal(await page.locator("#kill-id").textContent(), opt.slow);
  // Cancel first: nothing happens.
  await page.click("#kill-cancel");
  await dialog.waitFor({ state: "hidden" });
  await page.waitForTimeout(300);
  assert.equal(await page.locator("#state").textContent(), "RUNNING");
  await page.click("#kill");
  await dialog.waitFor({ state: "visible" });
  await page.click("#kill-confirm");
  await page.locator("#state.state-KILLED").waitFor({ timeout: 20000 });
  await page.locator("#kill").waitFor({ state: "hidden" });
  assert.match(await page.locator("#s-error").textContent(), /killed/);
  await shot("task-killed.png");
});

test("task text is shown as text and never runs", async () => {
  await page.goto(opt.url + "/task/" + taskPath(opt.xss));
  const line = page.locator("#log-lines .line .d", { hasText: "<script>alert(1)</script>" });
  await line.waitFor();
  assert.equal(await line.first().textContent(), "<script>alert(1)</script>");
  assert.equal(await page.locator("#log-lines script, #log-lines img, main img").count(), 0);
  assert.equal(await page.locator("#task-id").textContent(), opt.xss);
  assert.equal(await page.title(), opt.xss + " · iris-worker " + (await page.locator(".worker-id").textContent()));
  await page.waitForTimeout(1500);
  await shot("xss.png");
  assert.deepEqual(dialogs, [], "a dialog opened: a script from a task ran");
  assert.deepEqual(pageErrors, [], "the pages threw errors");
});
