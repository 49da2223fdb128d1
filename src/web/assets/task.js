// One task: status, resources, build, chart, attempts, and a paged log viewer that follows the
// log live. The page holds at most MAX_ROWS lines of the log: it loads pages of PAGE lines from
// /api/logs (the tail first, older pages when scrolled to the top, newer ones at the bottom)
// and takes new lines from /api/events/task while it shows the end of the log.
"use strict";

(() => {
  const taskId = document.body.dataset.taskId;
  const path = iris.taskPath(taskId);
  const PAGE = 500;
  const MAX_ROWS = 5000;
  const WHOLE_LOG = "-1000000000000000"; // a start_line before any line: tails count from the end

  const $ = (id) => document.getElementById(id);
  let status = null;
  let terminal = false;

  function banner(text) {
    const b = $("banner");
    b.textContent = text;
    b.hidden = !text;
  }

  // ---------------------------------------------------------------- status

  function renderStatus(s) {
    status = s;
    iris.setServerNow(s.nowMs);
    terminal = iris.TERMINAL.has(s.state);
    iris.stateBadge(s.state, $("state"));
    iris.setText("message", s.message || "");
    iris.setText("s-job", s.jobId + " · index " + s.taskIndex);
    iris.setText("s-attempt", String(s.attempt) + (s.attempts.length > 1 ? " (" + s.attempts.length + " attempts)" : ""));
    iris.setText("s-exit", terminal ? String(s.exitCode) : "–");
    iris.setText("s-error", s.error || "–");
    iris.setText("s-started", iris.time(s.startedMs));
    iris.setText("s-finished", iris.time(s.finishedMs));
    const ports = Object.entries(s.ports || {}).map(([k, v]) => k + " → " + v);
    iris.setText("s-ports", ports.length ? ports.join(", ") : "none");
    const u = s.usage;
    const live = s.state === "RUNNING";
    iris.setText("r-mem", u && live ? iris.bytes(u.memoryBytes) : "–");
    iris.setText("r-peak", u ? iris.bytes(u.memoryPeakBytes) : "–");
    const shortLife = !live && !(s.startedMs && s.finishedMs - s.startedMs >= 1000);
    iris.setText("r-cpu", u && !shortLife ? iris.percent(u.cpuPercent) + (live ? "" : " (average)") : "–");
    iris.setText("r-cputime", u ? iris.duration(u.cpuSeconds * 1000) : "–");
    iris.setText("r-procs", u && live ? String(u.processes) : "–");
    iris.setText("r-disk", u ? iris.bytes(u.diskBytes) : "–");
    iris.setText("r-throttled", u ? String(u.cpuThrottledPeriods) : "–");
    iris.setText("b-started", iris.time(s.buildStartedMs));
    iris.setText("b-finished", iris.time(s.buildFinishedMs));
    iris.setText("b-env", s.environment || "the worker's root filesystem");
    iris.setText("b-cache", s.fromCache === null || s.fromCache === undefined ? "–" : s.fromCache ? "yes" : "no (built for this task)");
    tickDurations();
    const tbody = $("attempts");
    tbody.replaceChildren(
      ...s.attempts
        .slice()
        .reverse()
        .map((a) =>
          iris.el("tr", null, [
            iris.el("td", { text: String(a.attempt) }),
            iris.el("td", null, [iris.stateBadge(a.state)]),
            iris.el("td", { text: iris.TERMINAL.has(a.state) ? String(a.exitCode) : "–" }),
            iris.el("td", { text: iris.time(a.startedMs) }),
            iris.el("td", { text: iris.time(a.finishedMs) }),
            iris.el("td", { cls: "error-text", text: a.error + (a.workerFailure ? " (worker failure)" : "") }),
          ]),
        ),
    );
    $("kill").hidden = terminal;
    logTotal = s.logLines;
    logInfo();
    if (s.sample) addSample(s.sample);
  }

  function tickDurations() {
    const s = status;
    if (!s) return;
    iris.setText("s-duration", s.startedMs ? iris.duration((s.finishedMs || iris.now()) - s.startedMs) : "–");
    iris.setText(
      "b-duration",
      s.buildStartedMs ? iris.duration((s.buildFinishedMs || iris.now()) - s.buildStartedMs) : "–",
    );
  }
  setInterval(() => {
    if (!terminal) tickDurations();
  }, 1000);

  // ---------------------------------------------------------------- chart

  let history = null; // {intervalMs, lifeStride, life: [[t, mem, cpu, procs]], recent: [...]}
  let range = "life";
  const SVG = "http://www.w3.org/2000/svg";

  async function loadHistory() {
    const r = await fetch("/api/stats/" + path);
    if (r.status === 404) {
      banner("This worker does not know the task " + taskId + ".");
      return false;
    }
    if (!r.ok) return true;
    const j = await r.json();
    history = j.history;
    drawChart();
    return true;
  }

  function addSample(p) {
    if (!history) return;
    for (const series of [history.recent, history.life]) {
      const last = series[series.length - 1];
      if (!last || p[0] > last[0]) series.push(p);
    }
    if (history.recent.length > 300) history.recent.shift();
    drawChart();
  }

  function svg(tag, attrs, text) {
    const e = document.createElementNS(SVG, tag);
    for (const k in attrs) e.setAttribute(k, attrs[k]);
    if (text !== undefined) e.textContent = text;
    return e;
  }

  function drawChart() {
    const box = $("chart");
    const pts = history ? (range === "life" ? history.life : history.recent) : [];
    const W = Math.max(200, box.clientWidth || 600), H = 200;
    const top = 8, memH = 110, gap = 22, cpuH = 50;
    box.setAttribute("viewBox", "0 0 " + W + " " + H);
    const nodes = [];
    const left = 64, right = W - 8;
    nodes.push(svg("rect", { x: left, y: top, width: right - left, height: memH, class: "pane" }));
    nodes.push(svg("rect", { x: left, y: top + memH + gap, width: right - left, height: cpuH, class: "pane" }));
    if (pts.length === 0) {
      nodes.push(svg("text", { x: W / 2, y: top + memH / 2, class: "axis", "text-anchor": "middle" }, "no samples yet: they are taken each second while the task runs"));
      box.replaceChildren(...nodes);
      chartPoints = [];
      return;
    }
    const t0 = pts[0][0], t1 = Math.max(pts[pts.length - 1][0], t0 + 1000);
    const maxMem = Math.max(1, ...pts.map((p) => p[1])) * 1.1;
    const maxCpu = Math.max(100, ...pts.map((p) => p[2]));
    const x = (t) => left + ((t - t0) / (t1 - t0)) * (right - left);
    const ym = (m) => top + memH - (m / maxMem) * memH;
    const yc = (c) => top + memH + gap + cpuH - (c / maxCpu) * cpuH;
    const memLine = pts.map((p) => x(p[0]).toFixed(1) + "," + ym(p[1]).toFixed(1)).join(" ");
    const area = "M" + x(t0).toFixed(1) + "," + (top + memH) + " L" + memLine.replaceAll(" ", " L") + " L" + x(pts[pts.length - 1][0]).toFixed(1) + "," + (top + memH) + " Z";
    nodes.push(svg("path", { d: area, class: "mem-area" }));
    nodes.push(svg("polyline", { points: memLine, class: "mem-line" }));
    nodes.push(svg("polyline", { points: pts.map((p) => x(p[0]).toFixed(1) + "," + yc(p[2]).toFixed(1)).join(" "), class: "cpu-line" }));
    nodes.push(svg("text", { x: left - 6, y: top + 10, class: "axis", "text-anchor": "end" }, iris.bytes(maxMem / 1.1)));
    nodes.push(svg("text", { x: left - 6, y: top + memH, class: "axis", "text-anchor": "end" }, "0"));
    nodes.push(svg("text", { x: left - 6, y: top + memH + gap + 10, class: "axis", "text-anchor": "end" }, maxCpu.toFixed(0) + "%"));
    nodes.push(svg("text", { x: left - 6, y: top + memH + gap + cpuH, class: "axis", "text-anchor": "end" }, "0%"));
    nodes.push(svg("text", { x: left, y: top + memH + 15, class: "axis" }, iris.time(t0)));
    nodes.push(svg("text", { x: right, y: top + memH + 15, class: "axis", "text-anchor": "end" }, iris.time(t1)));
    cursor = svg("line", { x1: -10, x2: -10, y1: top, y2: top + memH + gap + cpuH, class: "cursor" });
    nodes.push(cursor);
    box.replaceChildren(...nodes);
    chartPoints = pts.map((p) => [x(p[0]), p]);
    const every = history.intervalMs * (range === "life" ? history.lifeStride : 1);
    iris.setText("chart-note", pts.length + " points, one per " + iris.duration(every) + (range === "life" && history.lifeStride > 1 ? " (peak memory, mean CPU)" : ""));
  }

  let chartPoints = [];
  let cursor = null;
  $("chart").addEventListener("mousemove", (e) => {
    if (!chartPoints.length) return;
    const box = $("chart");
    const rect = box.getBoundingClientRect();
    const vb = box.viewBox.baseVal;
    const px = ((e.clientX - rect.left) / rect.width) * vb.width;
    let best = chartPoints[0];
    for (const c of chartPoints) if (Math.abs(c[0] - px) < Math.abs(best[0] - px)) best = c;
    const p = best[1];
    cursor.setAttribute("x1", best[0]);
    cursor.setAttribute("x2", best[0]);
    const tip = $("chart-tip");
    tip.textContent = iris.time(p[0]) + " · " + iris.bytes(p[1]) + " · " + iris.percent(p[2]) + " CPU · " + p[3] + " processes";
    tip.hidden = false;
  });
  $("chart").addEventListener("mouseleave", () => {
    $("chart-tip").hidden = true;
    if (cursor) cursor.setAttribute("x1", -10), cursor.setAttribute("x2", -10);
  });
  for (const b of document.querySelectorAll("#chart-range button")) {
    b.addEventListener("click", () => {
      range = b.dataset.range;
      for (const o of document.querySelectorAll("#chart-range button")) o.classList.toggle("on", o === b);
      drawChart();
    });
  }
  window.addEventListener("resize", () => drawChart());

  // ---------------------------------------------------------------- logs

  const logBox = $("log");
  const linesEl = $("log-lines");
  let source = "";
  let regex = "";
  let lo = 0; // the first shown line's number
  let hi = 0; // every line below this was looked at (the follow cursor)
  let atStart = false; // nothing older passes the filters
  let atEnd = false; // the shown lines reach the end of the log
  let following = true;
  let newLines = 0; // lines that arrived while not following
  let logTotal = 0;
  let gen = 0; // bumped on every reload: older answers are dropped
  let busy = false;
  let events = null;

  function logInfo() {
    const n = linesEl.childElementCount;
    let t = n ? "lines " + (lo + 1).toLocaleString() + "–" + hi.toLocaleString() : "no lines";
    if (source || regex) t += " (filtered)";
    t += " of " + Math.max(logTotal, source || regex ? 0 : hi).toLocaleString();
    iris.setText("log-info", t);
    const f = $("log-follow");
    f.classList.toggle("on", following && atEnd);
    iris.setText(f, !following && newLines ? "follow ⇥ (" + newLines.toLocaleString() + " new)" : "follow ⇥");
    $("log-older").disabled = atStart;
  }

  function showError(text) {
    const e = $("log-error");
    e.textContent = text || "";
    e.hidden = !text;
  }

  async function fetchLines(params) {
    const q = new URLSearchParams(params);
    if (source) q.set("source", source);
    if (regex) q.set("regex", regex);
    const r = await fetch("/api/logs/" + path + "?" + q);
    if (!r.ok) {
      let message = r.status + " " + r.statusText;
      try {
        message = (await r.json()).message || message;
      } catch (_) {
        // not JSON
      }
      throw new Error(message);
    }
    const total = Number(r.headers.get("x-iris-log-lines") || 0);
    const j = await r.json();
    const lines = (j.logs || []).map((e) => [Number(e.lineNumber || 0), Number(e.timestampMs || 0), e.source || "stdout", e.data || ""]);
    return { lines, total };
  }

  function lineEl(l) {
    return iris.el("div", { cls: "line src-" + l[2], data: { n: l[0] } }, [
      iris.el("span", { cls: "n", text: String(l[0] + 1) }),
      iris.el("span", { cls: "t", text: iris.clock(l[1]), title: new Date(l[1]).toISOString() }),
      iris.el("span", { cls: "s", text: l[2] }),
      iris.el("span", { cls: "d", text: l[3] }),
    ]);
  }

  function marker(text) {
    return iris.el("div", { cls: "line marker", text });
  }

  function firstLine() {
    for (const c of linesEl.children) if (c.dataset.n !== undefined) return Number(c.dataset.n);
    return null;
  }

  function lastLine() {
    for (let c = linesEl.lastElementChild; c; c = c.previousElementSibling) if (c.dataset.n !== undefined) return Number(c.dataset.n);
    return null;
  }

  function trimTop() {
    while (linesEl.childElementCount > MAX_ROWS) linesEl.firstElementChild.remove();
    const f = firstLine();
    if (f !== null && f > lo) {
      lo = f;
      atStart = false;
    }
  }

  function trimBottom() {
    let trimmed = false;
    while (linesEl.childElementCount > MAX_ROWS) {
      linesEl.lastElementChild.remove();
      trimmed = true;
    }
    if (trimmed) {
      const l = lastLine();
      hi = l === null ? lo : l + 1;
      atEnd = false;
      following = false;
    }
  }

  function scrollToEnd() {
    logBox.scrollTop = logBox.scrollHeight;
  }

  function connect() {
    if (events) events.close();
    events = null;
    const q = new URLSearchParams({ after: String(hi) });
    if (source) q.set("source", source);
    if (regex) q.set("regex", regex);
    const es = new EventSource("/api/events/task/" + path + "?" + q);
    events = es;
    iris.watchConnection(es, "live");
    es.addEventListener("status", (e) => renderStatus(JSON.parse(e.data)));
    es.addEventListener("logs", (e) => onLines(JSON.parse(e.data)));
    es.addEventListener("end", () => {
      es.close();
      iris.setText("conn", "ended");
      $("conn").className = "conn";
    });
    es.addEventListener("reset", () => {
      es.close();
      banner("A newer attempt of this task started: reload the page to see it.");
    });
    es.addEventListener("gone", () => {
      es.close();
      banner("The worker no longer knows this task.");
    });
  }

  function onLines(ev) {
    if (atEnd && !following) {
      // The reader scrolled up: leave the page still; the lines load when they scroll down.
      atEnd = false;
    }
    if (!atEnd) {
      newLines += ev.lines.length + ev.skipped;
      logInfo();
      return;
    }
    if (ev.skipped) linesEl.appendChild(marker("… " + ev.skipped.toLocaleString() + " lines skipped (the viewer fell behind) …"));
    const frag = document.createDocumentFragment();
    for (const l of ev.lines) if (l[0] >= hi) frag.appendChild(lineEl(l));
    linesEl.appendChild(frag);
    hi = Math.max(hi, ev.next);
    trimTop();
    scrollToEnd();
    logInfo();
  }

  // The newest lines, then live.
  async function loadTail() {
    const g = ++gen;
    busy = true;
    try {
      const { lines, total } = await fetchLines({ start_line: WHOLE_LOG, max_lines: PAGE });
      if (g !== gen) return;
      showError("");
      linesEl.replaceChildren(...lines.map(lineEl));
      lo = lines.length ? lines[0][0] : total;
      hi = Math.max(total, lines.length ? lines[lines.length - 1][0] + 1 : 0);
      logTotal = Math.max(logTotal, total);
      atStart = lines.length < PAGE;
      atEnd = true;
      following = true;
      newLines = 0;
      scrollToEnd();
      connect();
    } catch (e) {
      if (g === gen) showError(e.message);
    } finally {
      if (g === gen) busy = false;
      logInfo();
    }
  }

  // The first lines.
  async function loadStart() {
    const g = ++gen;
    busy = true;
    try {
      const { lines, total } = await fetchLines({ start_line: "0", max_lines: PAGE });
      if (g !== gen) return;
      showError("");
      linesEl.replaceChildren(...lines.map(lineEl));
      lo = 0;
      atStart = true;
      atEnd = lines.length < PAGE;
      hi = lines.length ? lines[lines.length - 1][0] + 1 : 0;
      if (atEnd) hi = Math.max(hi, total);
      following = false;
      logBox.scrollTop = 0;
      connect();
    } catch (e) {
      if (g === gen) showError(e.message);
    } finally {
      if (g === gen) busy = false;
      logInfo();
    }
  }

  async function loadOlder() {
    if (atStart || busy) return;
    if (lo <= 0) {
      atStart = true;
      logInfo();
      return;
    }
    const g = gen;
    busy = true;
    try {
      const { lines } = await fetchLines({ start_line: WHOLE_LOG, end_line: String(lo), max_lines: PAGE });
      if (g !== gen) return;
      if (lines.length < PAGE) atStart = true;
      if (lines.length) {
        const before = logBox.scrollHeight;
        const frag = document.createDocumentFragment();
        for (const l of lines) frag.appendChild(lineEl(l));
        linesEl.insertBefore(frag, linesEl.firstChild);
        logBox.scrollTop += logBox.scrollHeight - before;
        lo = lines[0][0];
        trimBottom();
      }
    } catch (e) {
      if (g === gen) showError(e.message);
    } finally {
      if (g === gen) busy = false;
      logInfo();
    }
  }

  async function loadNewer() {
    if (atEnd || busy) return;
    const g = gen;
    busy = true;
    try {
      const { lines, total } = await fetchLines({ start_line: String(hi), max_lines: PAGE });
      if (g !== gen) return;
      const frag = document.createDocumentFragment();
      for (const l of lines) if (l[0] >= hi) frag.appendChild(lineEl(l));
      linesEl.appendChild(frag);
      if (lines.length) hi = lines[lines.length - 1][0] + 1;
      if (lines.length < PAGE) {
        atEnd = true;
        hi = Math.max(hi, total);
        newLines = 0;
        connect();
      }
      trimTop();
    } catch (e) {
      if (g === gen) showError(e.message);
    } finally {
      if (g === gen) busy = false;
      logInfo();
    }
  }

  logBox.addEventListener("scroll", () => {
    const fromBottom = logBox.scrollHeight - logBox.scrollTop - logBox.clientHeight;
    const wasFollowing = following;
    following = atEnd && fromBottom < 24;
    if (following && !wasFollowing) newLines = 0;
    if (logBox.scrollTop < 40) loadOlder();
    if (fromBottom < 40) loadNewer();
    logInfo();
  });

  for (const b of document.querySelectorAll("#log-tabs button")) {
    b.addEventListener("click", () => {
      source = b.dataset.source;
      for (const o of document.querySelectorAll("#log-tabs button")) {
        o.classList.toggle("on", o === b);
        o.setAttribute("aria-selected", String(o === b));
      }
      loadTail();
    });
  }
  let searchTimer = null;
  $("log-search").addEventListener("input", (e) => {
    clearTimeout(searchTimer);
    searchTimer = setTimeout(() => {
      regex = e.target.value;
      loadTail();
    }, 300);
  });
  $("log-start").addEventListener("click", loadStart);
  $("log-older").addEventListener("click", loadOlder);
  $("log-follow").addEventListener("click", () => {
    if (atEnd) {
      following = true;
      newLines = 0;
      scrollToEnd();
      logInfo();
    } else loadTail();
  });

  // ---------------------------------------------------------------- kill

  const dialog = $("kill-dialog");
  $("kill").addEventListener("click", () => {
    iris.setText("kill-id", taskId);
    dialog.returnValue = "";
    dialog.showModal();
  });
  dialog.addEventListener("close", async () => {
    if (dialog.returnValue !== "kill") return;
    const button = $("kill");
    button.disabled = true;
    iris.setText(button, "killing…");
    try {
      const r = await fetch("/iris.cluster.WorkerService/KillTask", {
        method: "POST",
        headers: { "Content-Type": "application/json", "Connect-Protocol-Version": "1" },
        body: JSON.stringify({ taskId }),
      });
      if (!r.ok) throw new Error((await r.json().catch(() => ({}))).message || r.statusText);
      iris.setText("message", "kill requested");
    } catch (e) {
      banner("Killing the task failed: " + e.message);
      button.disabled = false;
      iris.setText(button, "Kill…");
    }
  });

  // ---------------------------------------------------------------- start

  (async () => {
    if (!(await loadHistory())) {
      iris.setText("conn", "unknown task");
      return;
    }
    await loadTail();
    // The chart's past is re-read now and then (its points merge as the task ages).
    setInterval(() => {
      if (!terminal) loadHistory();
    }, 15000);
  })();
})();
