// Live replica logs: tail + follow by polling /logs?tail=N, filtered by replica, level and text.
// Worker lines are JSON ({ts, level, logger, msg, ...}) when it logs JSON, plain text otherwise.

import { api } from "./api.js";
import { clear, h, nextId, poll } from "./ui.js";

const LEVELS = ["debug", "info", "warning", "error", "critical"];
const RANK = Object.fromEntries(LEVELS.map((l, i) => [l, i]));
const SKIP_KEYS = new Set(["ts", "level", "logger", "msg"]);

export function parseLine(raw) {
  const text = raw.line ?? "";
  if (text.startsWith("{")) {
    try {
      const obj = JSON.parse(text);
      if (obj && typeof obj === "object") {
        let level = String(obj.level || "").toLowerCase();
        if (level === "warn") level = "warning";
        const extras = Object.entries(obj).filter(([k]) => !SKIP_KEYS.has(k))
          .map(([k, v]) => `${k}=${typeof v === "string" ? v : JSON.stringify(v)}`).join(" ");
        const ts = obj.ts ? Date.parse(obj.ts) : NaN;
        return { replica: raw.replica, level: RANK[level] !== undefined ? level : null, ts: Number.isNaN(ts) ? null : ts,
          logger: obj.logger || "", msg: String(obj.msg ?? ""), extras, json: true };
      }
    } catch {
      // not JSON after all: a plain line
    }
  }
  const m = text.match(/\b(DEBUG|INFO|WARNING|WARN|ERROR|CRITICAL)\b/i);
  let level = m ? m[1].toLowerCase() : null;
  if (level === "warn") level = "warning";
  return { replica: raw.replica, level, ts: null, logger: "", msg: text, extras: "", json: false };
}

function fmtTime(ms) {
  if (ms === null) return "";
  const d = new Date(ms);
  return `${d.toLocaleTimeString([], { hour12: false })}.${String(d.getMilliseconds()).padStart(3, "0")}`;
}

export function logPanel(name, ctx) {
  const ids = { replica: nextId("log-replica"), level: nextId("log-level"), tail: nextId("log-tail"),
    search: nextId("log-search"), follow: nextId("log-follow") };
  const replica = h("select", { id: ids.replica }, h("option", { value: "" }, "All replicas"));
  const level = h("select", { id: ids.level },
    h("option", { value: "" }, "All levels"),
    LEVELS.slice(0, 4).map((l) => h("option", { value: l }, l === "error" ? "error" : `${l} and above`)));
  const tail = h("select", { id: ids.tail }, [100, 500, 2000].map((n) => h("option", { value: String(n) }, String(n))));
  tail.value = "500";
  const search = h("input", { id: ids.search, type: "search", placeholder: "text in line", autocomplete: "off" });
  const follow = h("input", { id: ids.follow, type: "checkbox", checked: true });
  const state = h("span", { class: "muted small", "aria-live": "polite" });
  const box = h("div", { class: "log", role: "log", tabindex: "0", "aria-label": "Replica log lines" });
  const element = h("section", { class: "card logs", "aria-labelledby": "logs-title" },
    h("div", { class: "section-head" }, h("h2", { id: "logs-title" }, "Logs"), state),
    h("div", { class: "log-controls" },
      h("div", { class: "field inline" }, h("label", { for: ids.replica }, "Replica"), replica),
      h("div", { class: "field inline" }, h("label", { for: ids.level }, "Level"), level),
      h("div", { class: "field inline" }, h("label", { for: ids.tail }, "Lines per replica"), tail),
      h("div", { class: "field inline grow" }, h("label", { for: ids.search }, "Filter"), search),
      h("div", { class: "field inline check" }, follow, h("label", { for: ids.follow }, "Follow"))),
    box);

  let lines = [];
  let signature = "";
  const controller = new AbortController();

  const draw = () => {
    const rep = replica.value;
    const min = level.value ? RANK[level.value] : null;
    const needle = search.value.trim().toLowerCase();
    const shown = lines.filter((l) => (!rep || l.replica === rep)
      && (min === null || (l.level !== null && RANK[l.level] >= min))
      && (!needle || `${l.logger} ${l.msg} ${l.extras}`.toLowerCase().includes(needle)));
    const atBottom = box.scrollTop + box.clientHeight >= box.scrollHeight - 24;
    clear(box);
    if (!shown.length) {
      box.append(h("p", { class: "muted log-empty" }, lines.length ? "No line matches the filters." : "No log lines yet."));
    }
    const frag = document.createDocumentFragment();
    for (const l of shown) {
      frag.append(h("div", { class: `log-line${l.level ? ` level-${l.level}` : ""}`, dataset: { level: l.level || "" } },
        h("span", { class: "log-replica" }, l.replica),
        l.ts !== null ? h("span", { class: "log-time" }, fmtTime(l.ts)) : null,
        l.level ? h("span", { class: "log-level" }, l.level.toUpperCase()) : null,
        l.logger ? h("span", { class: "log-logger" }, l.logger) : null,
        h("span", { class: "log-msg" }, l.msg),
        l.extras ? h("span", { class: "log-extras" }, l.extras) : null));
    }
    box.append(frag);
    if (atBottom || !box.dataset.scrolled) {
      box.scrollTop = box.scrollHeight;
      box.dataset.scrolled = "1";
    }
  };

  const refresh = async () => {
    const data = await api.logs(name, Number(tail.value), { signal: controller.signal });
    const raw = data.lines || [];
    const lastOf = {};
    for (const r of raw) lastOf[r.replica] = r.line;
    const sig = `${raw.length}|${JSON.stringify(lastOf)}`;
    if (sig === signature) return;
    signature = sig;
    // merge the replicas' streams by time; a plain line keeps the time of the line before it
    const lastTs = {};
    lines = raw.map((r, i) => {
      const l = parseLine(r);
      l.order = l.ts ?? lastTs[r.replica] ?? 0;
      lastTs[r.replica] = l.order;
      l.i = i;
      return l;
    }).sort((a, b) => a.order - b.order || a.i - b.i);
    const reps = [...new Set(raw.map((r) => r.replica))].sort();
    const known = [...replica.options].slice(1).map((o) => o.value);
    if (reps.join() !== known.join()) {
      const keep = replica.value;
      while (replica.options.length > 1) replica.remove(1);
      reps.forEach((r) => replica.append(h("option", { value: r }, r)));
      replica.value = reps.includes(keep) ? keep : "";
    }
    draw();
  };

  const run = async () => {
    try {
      await refresh();
      state.textContent = follow.checked ? "following" : "paused";
    } catch (err) {
      if (err.name === "AbortError" || ctx.fail(err)) return;
      state.textContent = `could not load logs: ${err.message}`;
    }
  };
  let poller = poll(run, 2000);
  for (const control of [replica, level]) control.addEventListener("change", draw);
  search.addEventListener("input", draw);
  tail.addEventListener("change", () => { signature = ""; run(); });
  follow.addEventListener("change", () => {
    poller.stop();
    if (follow.checked) poller = poll(run, 2000);
    else state.textContent = "paused";
  });

  return {
    element,
    destroy() {
      poller.stop();
      controller.abort();
    },
  };
}
