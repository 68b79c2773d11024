// #/ : every deployment with its status, replicas and live traffic; refreshed every 2 s.

import { api } from "../api.js";
import { age, badge, clear, h, ms, num, poll } from "../ui.js";

const COLUMNS = ["Name", "Model", "Status", "Replicas", "Requests/s", "TTFT p95", "Tokens/s", "Age"];

export function render(main, _params, ctx) {
  ctx.title("Deployments");
  const status = h("p", { class: "muted small", "aria-live": "polite" });
  const body = h("div", { class: "list-body" });
  main.append(
    h("div", { class: "page-head" },
      h("h1", {}, "Deployments"),
      h("a", { class: "btn btn-primary", href: "#/new" }, "New deployment")),
    body, status);

  let failures = 0;
  const controller = new AbortController();
  const poller = poll(async () => {
    try {
      const deployments = await api.list({ signal: controller.signal });
      const metrics = await Promise.all(deployments.map((d) =>
        d.status === "deleting" ? null : api.metrics(d.name, { signal: controller.signal }).catch(() => null)));
      draw(body, deployments, metrics);
      failures = 0;
      status.textContent = `Updated ${new Date().toLocaleTimeString()} · refreshes every 2 s`;
    } catch (err) {
      if (err.name === "AbortError" || ctx.fail(err)) return;
      failures += 1;
      status.textContent = `Could not refresh (${err.message}); retrying…`;
      if (failures === 1 && !body.firstChild) body.append(h("p", { class: "alert alert-error" }, err.message));
    }
  }, 2000);
  return () => {
    poller.stop();
    controller.abort();
  };
}

function draw(body, deployments, metrics) {
  if (!deployments.length) {
    if (body.querySelector(".empty")) return;
    clear(body).append(h("div", { class: "card empty" },
      h("h2", {}, "No deployments yet"),
      h("p", {}, "Deploy the embedded default model (SmolLM2-135M-Instruct, runs on a CPU) or any Hugging Face model."),
      h("a", { class: "btn btn-primary", href: "#/new" }, "Deploy a model")));
    return;
  }
  const table = h("table", { class: "table deployments" },
    h("caption", { class: "visually-hidden" }, "Deployments, refreshed every 2 seconds"),
    h("thead", {}, h("tr", {}, COLUMNS.map((c) => h("th", { scope: "col" }, c)))),
    h("tbody", {}, deployments.map((d, i) => row(d, metrics[i] && metrics[i].current))));
  // keep keyboard focus on the same link across refreshes
  const focused = document.activeElement && document.activeElement.closest(".deployments")
    ? document.activeElement.getAttribute("href") : null;
  clear(body).append(table);
  if (focused) {
    const again = body.querySelector(`a[href="${CSS.escape(focused)}"]`);
    if (again) again.focus();
  }
}

function row(d, m) {
  const href = `#/d/${encodeURIComponent(d.name)}`;
  const cell = (label, ...content) => h("td", { dataset: { label } }, ...content);
  return h("tr", { dataset: { name: d.name } },
    cell("Name", h("a", { href, class: "strong" }, d.name)),
    cell("Model", h("span", { class: "mono" }, d.spec.model)),
    cell("Status", badge(d.status)),
    cell("Replicas", `${d.ready_replicas}/${d.desired_replicas}`),
    cell("Requests/s", m ? num(m.requests_per_s, 2) : "—"),
    cell("TTFT p95", m ? ms(m.ttft_p95_ms) : "—"),
    cell("Tokens/s", m ? num(m.tokens_per_s, 1) : "—"),
    cell("Age", h("time", { datetime: new Date(d.created_at * 1000).toISOString() }, age(d.created_at))));
}
