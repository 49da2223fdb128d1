// The task list: rows kept by task id and updated in place from /api/events/tasks (only the
// rows that changed arrive after the first event), filtered and sorted here.
"use strict";

(() => {
  const tbody = document.getElementById("rows");
  const rows = new Map(); // id -> {d: row data, tr, cells}
  let filter = "";
  let search = "";
  let sortKey = "seq";
  let sortDesc = true;
  let lastOrder = "";
  const ACTIVE = new Set(["PENDING", "BUILDING", "RUNNING"]);

  function durationOf(d) {
    if (!d.started) return -1;
    return (d.finished || iris.now()) - d.started;
  }

  function makeRow(id) {
    const tr = document.createElement("tr");
    const link = iris.el("a", { href: "/task/" + iris.taskPath(id), text: id, cls: "task-link" });
    const cells = {
      id: iris.el("td", { cls: "id" }, [link]),
      state: iris.el("td"),
      mem: iris.el("td", { cls: "num" }),
      peak: iris.el("td", { cls: "num" }),
      cpu: iris.el("td", { cls: "num" }),
      procs: iris.el("td", { cls: "num" }),
      disk: iris.el("td", { cls: "num" }),
      started: iris.el("td"),
      duration: iris.el("td", { cls: "num" }),
      error: iris.el("td", { cls: "error-text" }),
    };
    cells.badge = iris.stateBadge("PENDING");
    cells.state.appendChild(cells.badge);
    for (const k of ["id", "state", "mem", "peak", "cpu", "procs", "disk", "started", "duration", "error"]) tr.appendChild(cells[k]);
    tr.dataset.id = id;
    return { tr, cells, d: null };
  }

  function fill(r) {
    const d = r.d, c = r.cells;
    if (c.badge.textContent !== d.state) iris.stateBadge(d.state, c.badge);
    c.badge.title = d.message || "";
    const live = d.state === "RUNNING";
    iris.setText(c.mem, live ? iris.bytes(d.mem) : "–");
    iris.setText(c.peak, d.peak ? iris.bytes(d.peak) : "–");
    // A finished task's CPU is its life's average: meaningless for a life under a second.
    const cpuKnown = live || (d.cpu && d.started && d.finished - d.started >= 1000);
    iris.setText(c.cpu, cpuKnown ? iris.percent(d.cpu) : "–");
    iris.setText(c.procs, live ? String(d.procs) : "–");
    iris.setText(c.disk, d.disk ? iris.bytes(d.disk) : "–");
    iris.setText(c.started, iris.time(d.started));
    iris.setText(c.duration, iris.duration(durationOf(d)));
    iris.setText(c.error, d.error || "");
    c.error.title = d.error || "";
  }

  function visible(d) {
    if (filter === "active" && !ACTIVE.has(d.state)) return false;
    if (filter && filter !== "active" && d.state !== filter) return false;
    if (search && !d.id.toLowerCase().includes(search)) return false;
    return true;
  }

  function sortValue(d) {
    switch (sortKey) {
      case "duration": return durationOf(d);
      case "id": return d.id;
      case "state": return d.state;
      default: return d[sortKey] || 0;
    }
  }

  // Shows the rows that pass the filters in order, touching the DOM only when that changed.
  function layout() {
    const shown = [];
    for (const r of rows.values()) if (visible(r.d)) shown.push(r);
    shown.sort((a, b) => {
      const x = sortValue(a.d), y = sortValue(b.d);
      const c = x < y ? -1 : x > y ? 1 : a.d.seq - b.d.seq;
      return sortDesc ? -c : c;
    });
    const order = shown.map((r) => r.d.id).join("\n");
    if (order !== lastOrder) {
      lastOrder = order;
      const frag = document.createDocumentFragment();
      for (const r of shown) frag.appendChild(r.tr);
      tbody.replaceChildren(frag);
    }
    document.getElementById("empty").hidden = shown.length > 0;
    iris.setText("shown", shown.length === rows.size ? rows.size + " tasks" : shown.length + " of " + rows.size + " tasks");
  }

  function counts() {
    const by = {};
    let active = 0;
    for (const r of rows.values()) {
      by[r.d.state] = (by[r.d.state] || 0) + 1;
      if (ACTIVE.has(r.d.state)) active++;
    }
    for (const b of document.querySelectorAll("#state-filter button")) {
      const f = b.dataset.filter;
      const n = f === "" ? rows.size : f === "active" ? active : by[f] || 0;
      iris.setText(b.querySelector(".count"), String(n));
    }
  }

  function figures(w) {
    if (!w) return;
    iris.setServerNow(w.nowMs);
    const t = w.tasks || {};
    iris.setText("f-running", String(t.RUNNING || 0));
    iris.setText("f-pending", String(t.PENDING || 0));
    iris.setText("f-building", String(t.BUILDING || 0));
    iris.setText("f-finished", String((t.SUCCEEDED || 0) + (t.FAILED || 0) + (t.KILLED || 0) + (t.WORKER_FAILED || 0)));
    iris.setText("f-uptime", iris.duration(w.uptimeMs));
    const h = w.host || {};
    iris.setText("f-cpu", iris.percent(h.cpuPercent || 0));
    iris.setText("f-cpus", (h.cpus || "?") + " CPUs, load " + (h.load1 || 0).toFixed(2));
    const used = (h.memoryTotalBytes || 0) - (h.memoryAvailableBytes || 0);
    iris.setText("f-mem", iris.bytes(used));
    iris.setText("f-mem-total", "of " + iris.bytes(h.memoryTotalBytes || 0));
    // Shown only when tasks can reach this worker's API (the connect hook is off or failed).
    const iso = document.getElementById("isolation");
    const exposed = w.taskIsolation && !w.taskIsolation.startsWith("on");
    iso.hidden = !exposed;
    if (exposed) iris.setText(iso, "Task isolation " + w.taskIsolation);
  }

  function apply(ev) {
    if (ev.full) {
      rows.clear();
      lastOrder = "";
    }
    for (const d of ev.upsert) {
      let r = rows.get(d.id);
      if (!r) {
        r = makeRow(d.id);
        rows.set(d.id, r);
      }
      r.d = d;
      fill(r);
    }
    for (const id of ev.remove) rows.delete(id);
    figures(ev.worker);
    counts();
    layout();
  }

  const source = new EventSource("/api/events/tasks");
  iris.watchConnection(source);
  source.addEventListener("tasks", (e) => apply(JSON.parse(e.data)));

  // Durations of running tasks move on between events.
  setInterval(() => {
    for (const r of rows.values()) if (r.d && r.d.started && !r.d.finished) iris.setText(r.cells.duration, iris.duration(durationOf(r.d)));
  }, 1000);

  for (const b of document.querySelectorAll("#state-filter button")) {
    b.addEventListener("click", () => {
      filter = b.dataset.filter;
      for (const o of document.querySelectorAll("#state-filter button")) o.classList.toggle("on", o === b);
      layout();
    });
  }
  document.getElementById("search").addEventListener("input", (e) => {
    search = e.target.value.trim().toLowerCase();
    layout();
  });
  for (const th of document.querySelectorAll("th[data-sort]")) {
    th.addEventListener("click", () => {
      const k = th.dataset.sort;
      if (sortKey === k) sortDesc = !sortDesc;
      else {
        sortKey = k;
        sortDesc = !(k === "id" || k === "state");
      }
      for (const o of document.querySelectorAll("th[data-sort]")) o.classList.remove("asc", "desc");
      th.classList.add(sortDesc ? "desc" : "asc");
      lastOrder = "";
      layout();
    });
  }
})();
