// Shared by both pages. Everything that comes from a task goes into the page as textContent.
"use strict";

const iris = (() => {
  // The worker's clock minus ours, from the figures it sends (durations use the worker's time).
  let clockOffset = 0;

  function setServerNow(ms) {
    if (ms) clockOffset = ms - Date.now();
  }

  function now() {
    return Date.now() + clockOffset;
  }

  // A task id in a URL path: each `/`-separated part percent-encoded.
  function taskPath(id) {
    return id.split("/").map(encodeURIComponent).join("/");
  }

  function bytes(n) {
    if (n === null || n === undefined) return "–";
    n = Number(n);
    if (n < 1024) return n + " B";
    const units = ["KiB", "MiB", "GiB", "TiB"];
    let i = -1;
    do {
      n /= 1024;
      i++;
    } while (n >= 1024 && i < units.length - 1);
    return (n >= 100 ? n.toFixed(0) : n >= 10 ? n.toFixed(1) : n.toFixed(2)) + " " + units[i];
  }

  function duration(ms) {
    if (ms === null || ms === undefined || ms < 0 || !isFinite(ms)) return "–";
    const s = Math.floor(ms / 1000);
    if (s < 60) return (ms < 10000 ? (ms / 1000).toFixed(1) : s) + " s";
    const d = Math.floor(s / 86400), h = Math.floor((s % 86400) / 3600), m = Math.floor((s % 3600) / 60);
    if (d > 0) return d + "d " + h + "h";
    if (h > 0) return h + "h " + m + "m";
    return m + "m " + (s % 60) + "s";
  }

  function pad(n, w) {
    return String(n).padStart(w || 2, "0");
  }

  // Local time; the date too when it is not today.
  function time(ms) {
    if (!ms || ms <= 0) return "–";
    const d = new Date(Number(ms));
    const t = pad(d.getHours()) + ":" + pad(d.getMinutes()) + ":" + pad(d.getSeconds());
    const today = new Date();
    if (d.toDateString() === today.toDateString()) return t;
    return d.getFullYear() + "-" + pad(d.getMonth() + 1) + "-" + pad(d.getDate()) + " " + t;
  }

  function clock(ms) {
    const d = new Date(Number(ms));
    return pad(d.getHours()) + ":" + pad(d.getMinutes()) + ":" + pad(d.getSeconds()) + "." + pad(d.getMilliseconds(), 3);
  }

  function percent(p) {
    if (p === null || p === undefined) return "–";
    return (p >= 10 ? p.toFixed(0) : p.toFixed(1)) + "%";
  }

  // An element with text (never HTML) and attributes.
  function el(tag, opts, children) {
    const e = document.createElement(tag);
    if (opts) {
      if (opts.cls) e.className = opts.cls;
      if (opts.text !== undefined) e.textContent = opts.text;
      if (opts.title !== undefined) e.title = opts.title;
      if (opts.href !== undefined) e.href = opts.href;
      if (opts.data) for (const k in opts.data) e.dataset[k] = opts.data[k];
    }
    if (children) for (const c of children) e.appendChild(c);
    return e;
  }

  function setText(id, text) {
    const e = typeof id === "string" ? document.getElementById(id) : id;
    if (e && e.textContent !== text) e.textContent = text;
  }

  const TERMINAL = new Set(["SUCCEEDED", "FAILED", "KILLED", "WORKER_FAILED"]);

  function stateBadge(state, e) {
    e = e || document.createElement("span");
    e.className = "state state-" + state;
    e.textContent = state;
    return e;
  }

  // The connection indicator of an EventSource.
  function watchConnection(source, label) {
    const c = document.getElementById("conn");
    source.addEventListener("open", () => {
      c.textContent = label || "live";
      c.className = "conn live";
    });
    source.addEventListener("error", () => {
      c.textContent = "reconnecting…";
      c.className = "conn down";
    });
  }

  return { setServerNow, now, taskPath, bytes, duration, time, clock, percent, el, setText, TERMINAL, stateBadge, watchConnection };
})();
