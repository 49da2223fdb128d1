// The list page's cache panel: /api/cache every 5 s (the janitor looks every 2 s): each
// cache's entries, bytes, limit, entries in use, hits, misses and evictions; each filesystem's
// free space and inodes and where it stands; and why new tasks are refused, while they are.
"use strict";

(() => {
  const kinds = document.getElementById("cache-kinds");
  const disks = document.getElementById("cache-disks");
  const pressure = document.getElementById("cache-pressure");
  const STATE = { ok: "ok", soft: "evicting", hard: "no new tasks" };
  const BADGE = { ok: "SUCCEEDED", soft: "BUILDING", hard: "FAILED" };

  function row(cells) {
    return iris.el("tr", null, cells.map(([text, cls]) => iris.el("td", { text: String(text), cls })));
  }

  function show(s) {
    kinds.replaceChildren(...(s.kinds || []).map((k) => row([
      [k.kind],
      [k.entries, "num"],
      [iris.bytes(k.bytes), "num"],
      [k.limitBytes === null || k.limitBytes === undefined ? "–" : iris.bytes(k.limitBytes), "num"],
      [k.inUse, "num"],
      [k.hits, "num"],
      [k.misses, "num"],
      [k.evictions, "num"],
    ])));
    const entries = (s.kinds || []).reduce((n, k) => n + k.entries, 0);
    iris.setText("cache-entries", String(entries));
    iris.setText("cache-bytes", iris.bytes(s.totalBytes || 0));
    iris.setText("cache-limit", iris.bytes(s.limitBytes || 0));
    iris.setText("cache-scan", s.scannedAtMs ? "scanned in " + (s.scanMicros / 1000).toFixed(1) + " ms" : "not scanned yet");
    disks.replaceChildren(...(s.filesystems || []).map((f) => {
      const tr = row([
        [f.name],
        [iris.bytes(f.freeBytes), "num"],
        [iris.bytes(f.sizeBytes), "num"],
        [f.inodes ? Number(f.freeInodes).toLocaleString("en-US") : "–", "num"],
        [""],
      ]);
      tr.lastChild.appendChild(iris.el("span", { cls: "state state-" + BADGE[f.level], text: STATE[f.level] }));
      return tr;
    }));
    pressure.hidden = !s.pressure;
    iris.setText(pressure, s.pressure || "");
  }

  async function refresh() {
    try {
      const r = await fetch("/api/cache", { cache: "no-store" });
      if (r.ok) show(await r.json());
    } catch (_) {
      // The connection badge tells; the next refresh tries again.
    }
  }

  refresh();
  setInterval(refresh, 5000);
})();
