// #/d/NAME : status, timeline, endpoint + client snippets, metrics charts, replicas, live logs,
// and the scale / delete actions.

import { api, ApiError, auth, cleanMsg, endpointFor, fieldPath } from "../api.js";
import { CHARTS, chart } from "../charts.js";
import { logPanel } from "../logs.js";
import * as snippets from "../snippets.js";
import {
  age, append, badge, clear, clock, codeBlock, confirmDialog, copyButton, h, openDialog, poll, tabs, toast,
} from "../ui.js";

const REASON_KIND = {
  Created: "info", ReplicaStarting: "info", ReplicaReady: "ok", ReplicaStopped: "muted", ReplicaDraining: "muted",
  ReplicaFailed: "error", ReplicaExited: "error", Deleting: "warn", Updated: "info",
};

export function render(main, { name }, ctx) {
  ctx.title(name);
  const enc = encodeURIComponent(name);
  const controller = new AbortController();
  const heading = h("h1", {}, name);
  const statusBadge = h("span", { class: "head-badge" });
  const message = h("p", { class: "status-message" });
  const scaleBtn = h("button", { type: "button", class: "btn" }, "Scale…");
  const deleteBtn = h("button", { type: "button", class: "btn btn-danger-outline" }, "Delete…");
  const overview = h("dl", { class: "kv" });
  const endpointBox = h("div", { class: "endpoint" });
  const snippetBox = h("div", {});
  const timeline = h("ol", { class: "timeline" });
  const replicas = h("div", { class: "table-wrap" });
  const charts = CHARTS.map((def) => chart(def));
  const logs = logPanel(name, ctx);
  const live = h("p", { class: "muted small", "aria-live": "polite" });

  main.append(
    h("nav", { class: "crumbs", "aria-label": "Breadcrumb" }, h("a", { href: "#/" }, "Deployments"), " / ", name),
    h("div", { class: "page-head" },
      h("div", { class: "title-row" }, heading, statusBadge),
      h("div", { class: "actions" },
        h("a", { class: "btn btn-primary", href: `#/d/${enc}/playground` }, "Open playground"),
        scaleBtn, deleteBtn)),
    message,
    h("div", { class: "grid-2 top-cards" },
      h("section", { class: "card", "aria-labelledby": "ov-title" }, h("h2", { id: "ov-title" }, "Overview"), overview),
      h("section", { class: "card", "aria-labelledby": "use-title" },
        h("h2", { id: "use-title" }, "Endpoint"), endpointBox, snippetBox)),
    h("section", { "aria-labelledby": "metrics-title" },
      h("div", { class: "section-head" }, h("h2", { id: "metrics-title" }, "Metrics"), live),
      h("div", { class: "charts" }, charts.map((c) => c.element))),
    h("div", { class: "grid-2" },
      h("section", { class: "card", "aria-labelledby": "tl-title" }, h("h2", { id: "tl-title" }, "Timeline"),
        h("div", { class: "timeline-wrap", tabindex: "0", role: "region", "aria-label": "Status timeline" }, timeline)),
      h("section", { class: "card", "aria-labelledby": "rep-title" }, h("h2", { id: "rep-title" }, "Replicas"), replicas)),
    logs.element);

  let current = null;
  let snippetKey = "";
  let gone = false;

  const drawSnippets = (d) => {
    const base = endpointFor(d);
    const key = `${base}|${auth.required}`;
    if (key === snippetKey) return;
    snippetKey = key;
    const body = snippets.defaultBody(d.name);
    const opts = { auth: auth.required };
    clear(endpointBox).append(
      h("label", { for: "endpoint-url", class: "small muted" }, "OpenAI-compatible base URL (model: ",
        h("code", {}, d.name), ")"),
      h("div", { class: "copy-row" },
        h("input", { id: "endpoint-url", type: "text", readonly: true, value: base, class: "mono" }),
        copyButton(() => base, "Copy URL")));
    clear(snippetBox).append(tabs([
      { id: "curl", label: "curl", render: (p) => p.append(codeBlock(snippets.curl(base, body, opts), { label: "curl" })) },
      { id: "python", label: "Python", render: (p) => p.append(codeBlock(snippets.python(base, body, opts), { label: "Python" })) },
      { id: "js", label: "JavaScript", render: (p) => p.append(codeBlock(snippets.javascript(base, body, opts), { label: "JavaScript" })) },
    ], { label: "Client code" }).element);
  };

  const drawOverview = (d) => {
    const s = d.spec;
    const rows = [
      ["Model", h("span", { class: "mono" }, s.model + (s.revision ? `@${s.revision}` : ""))],
      ["Replicas", `${d.ready_replicas} ready / ${d.desired_replicas} desired (min ${s.replicas.min}, max ${s.replicas.max})`],
      ["Backend", `${s.backend} on ${s.provider}`],
      ["Device / precision", `${s.device} / ${s.precision}`],
      ["Max model length", s.max_model_len ? String(s.max_model_len) : "model's own"],
      ["Engine args", Object.keys(s.engine_args || {}).length
        ? Object.entries(s.engine_args).map(([k, v]) => `${k}=${v}`).join(", ") : "defaults"],
      ["HF token", s.hf_token_set ? "set (hidden)" : "not set"],
      ["Created", `${age(d.created_at)} ago`],
    ];
    clear(overview);
    for (const [k, v] of rows) append(overview, [h("dt", {}, k), h("dd", {}, v)]);
  };

  const drawReplicas = (d) => {
    clear(replicas);
    if (!d.replicas.length) {
      replicas.append(h("p", { class: "muted" }, "No replicas."));
      return;
    }
    replicas.append(h("table", { class: "table compact" },
      h("thead", {}, h("tr", {}, ["Replica", "Status", "Address", "PID", "Age"].map((c) => h("th", { scope: "col" }, c)))),
      h("tbody", {}, d.replicas.map((r) => h("tr", {},
        h("td", { class: "mono", dataset: { label: "Replica" } }, r.id),
        h("td", { dataset: { label: "Status" } }, h("span", { class: `badge badge-replica-${r.status}` }, r.status)),
        h("td", { class: "mono", dataset: { label: "Address" } }, r.url || "—"),
        h("td", { dataset: { label: "PID" } }, r.pid ?? "—"),
        h("td", { dataset: { label: "Age" } }, r.started_at ? age(r.started_at) : "—"))))));
  };

  const drawTimeline = (events) => {
    const atBottom = timeline.parentElement.scrollTop + timeline.parentElement.clientHeight
      >= timeline.parentElement.scrollHeight - 16;
    clear(timeline);
    for (const e of events) {
      const kind = e.reason === "Status"
        ? (/^failed/.test(e.message) ? "error" : /^running/.test(e.message) ? "ok" : "info")
        : REASON_KIND[e.reason] || "info";
      timeline.append(h("li", { class: `tl-${kind}` },
        h("time", { datetime: new Date(e.ts * 1000).toISOString(), title: new Date(e.ts * 1000).toLocaleString() },
          clock(e.ts)),
        h("span", { class: "tl-reason" }, e.reason),
        h("span", { class: "tl-msg" }, e.message)));
    }
    if (!events.length) timeline.append(h("li", { class: "muted" }, "No events yet."));
    if (atBottom) timeline.parentElement.scrollTop = timeline.parentElement.scrollHeight;
  };

  const notFound = () => {
    gone = true;
    stop();
    clear(main).append(h("h1", { tabindex: "-1" }, `No deployment “${name}”`),
      h("p", {}, "It does not exist (any more). ", h("a", { href: "#/" }, "Back to deployments")));
    main.querySelector("h1").focus();
  };

  const refresh = async () => {
    const signal = controller.signal;
    let d;
    try {
      d = await api.get(name, { signal });
    } catch (err) {
      if (err instanceof ApiError && err.status === 404) return notFound();
      throw err;
    }
    current = d;
    clear(statusBadge).append(badge(d.status));
    message.textContent = d.message;
    message.className = `status-message status-${d.status}`;
    deleteBtn.disabled = d.status === "deleting";
    scaleBtn.disabled = d.status === "deleting";
    drawOverview(d);
    drawSnippets(d);
    drawReplicas(d);
    const [ev, m] = await Promise.all([api.events(name, 200, { signal }), api.metrics(name, { signal })]);
    drawTimeline(ev.events || []);
    for (const c of charts) c.update(m.series || []);
    live.textContent = `${(m.series || []).length} points · refreshes every 2 s`;
  };

  const poller = poll(async () => {
    try {
      await refresh();
    } catch (err) {
      if (err.name === "AbortError" || ctx.fail(err)) return;
      live.textContent = `Could not refresh: ${err.message}`;
    }
  }, 2000);

  scaleBtn.addEventListener("click", () => current && scaleDialog(current, () => poller.now(), ctx));
  deleteBtn.addEventListener("click", async () => {
    const yes = await confirmDialog({
      title: `Delete ${name}?`,
      message: `Its ${current ? current.replicas.length : ""} replica(s) drain in-flight requests and stop; `
        + "clients get 404 for this model afterwards. This cannot be undone.",
      confirmLabel: "Delete deployment", danger: true,
    });
    if (!yes) return;
    try {
      await api.remove(name);
      toast(`Deleting ${name}: its replicas drain, then stop.`);
      ctx.navigate("#/");
    } catch (err) {
      if (ctx.fail(err)) return;
      toast(`Could not delete: ${err.message}`, "error");
    }
  });

  function stop() {
    poller.stop();
    controller.abort();
    logs.destroy();
    charts.forEach((c) => c.destroy());
  }
  return () => {
    if (!gone) stop();
  };
}

function scaleDialog(d, done, ctx) {
  openDialog({
    title: `Scale ${d.name}`,
    build: (body, close) => {
      const min = h("input", { id: "scale-min", type: "number", min: "0", max: "64", step: "1", value: d.spec.replicas.min,
        "aria-describedby": "scale-min-error" });
      const max = h("input", { id: "scale-max", type: "number", min: "1", max: "64", step: "1", value: d.spec.replicas.max,
        "aria-describedby": "scale-max-error" });
      const errors = { "replicas.min": h("p", { class: "field-error", id: "scale-min-error" }),
        "replicas.max": h("p", { class: "field-error", id: "scale-max-error" }) };
      const general = h("p", { class: "field-error", role: "alert" });
      const save = h("button", { type: "submit", class: "btn btn-primary" }, "Save");
      const form = h("form", { novalidate: true },
        h("p", {}, "The platform starts or drains replicas to match. Replicas are started at the minimum."),
        h("div", { class: "grid-2" },
          h("div", { class: "field" }, h("label", { for: "scale-min" }, "Min replicas"), min, errors["replicas.min"]),
          h("div", { class: "field" }, h("label", { for: "scale-max" }, "Max replicas"), max, errors["replicas.max"])),
        general,
        h("div", { class: "dialog-actions" }, h("button", { type: "button", class: "btn", onclick: close }, "Cancel"), save));
      form.addEventListener("submit", async (event) => {
        event.preventDefault();
        Object.values(errors).forEach((e) => { e.textContent = ""; });
        general.textContent = "";
        const change = { replicas: {} };
        if (min.value !== "") change.replicas.min = Number(min.value);
        if (max.value !== "") change.replicas.max = Number(max.value);
        save.disabled = true;
        try {
          await api.patch(d.name, change);
          toast(`Scaling ${d.name} to ${change.replicas.min ?? d.spec.replicas.min}..${change.replicas.max ?? d.spec.replicas.max}`);
          close();
          done();
        } catch (err) {
          save.disabled = false;
          if (ctx.fail(err)) return;
          if (err instanceof ApiError && Array.isArray(err.detail)) {
            for (const e of err.detail) {
              const target = errors[fieldPath(e.loc)];
              if (target) target.textContent = cleanMsg(e.msg);
              else general.textContent = `${fieldPath(e.loc)}: ${cleanMsg(e.msg)}`;
            }
          } else {
            general.textContent = err.message;
          }
        }
      });
      body.append(form);
    },
  });
}
