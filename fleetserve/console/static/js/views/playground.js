// #/d/NAME/playground : chat with a deployment through the gateway (/v1/chat/completions, streamed),
// with TTFT and tokens/s per reply and "view code"; and a "Score" tab for /loglikelihood
// (reached through the gateway at /deployments/NAME/loglikelihood).

import { api, ApiError, auth, AuthRequired, endpointFor } from "../api.js";
import * as snippets from "../snippets.js";
import { StreamError, postSSE } from "../sse.js";
import { badge, clear, codeBlock, h, nextId, num, openDialog, poll, statusLabel, tabs } from "../ui.js";

export function render(main, { name }, ctx) {
  ctx.title(`Playground · ${name}`);
  const enc = encodeURIComponent(name);
  const statusBadge = h("span", { class: "head-badge" });
  const notice = h("p", { class: "notice", hidden: true });
  let deployment = null;
  const chat = chatPanel(name, () => deployment, ctx);
  const score = scorePanel(name, ctx);

  main.append(
    h("nav", { class: "crumbs", "aria-label": "Breadcrumb" },
      h("a", { href: "#/" }, "Deployments"), " / ", h("a", { href: `#/d/${enc}` }, name), " / Playground"),
    h("div", { class: "page-head" },
      h("div", { class: "title-row" }, h("h1", {}, `Playground: ${name}`), statusBadge),
      h("div", { class: "actions" }, h("a", { class: "btn", href: `#/d/${enc}` }, "Deployment details"))),
    notice,
    tabs([
      { id: "chat", label: "Chat", render: (p) => p.append(chat.element) },
      { id: "score", label: "Score (log-likelihood)", render: (p) => p.append(score.element) },
    ], { label: "Playground mode" }).element);

  const controller = new AbortController();
  const poller = poll(async () => {
    try {
      deployment = await api.get(name, { signal: controller.signal });
      clear(statusBadge).append(badge(deployment.status));
      const ready = deployment.ready_replicas > 0;
      notice.hidden = ready;
      notice.textContent = ready ? "" : `No replica of this deployment is ready yet (${statusLabel(deployment.status)}: `
        + `${deployment.message}). Messages get an answer once one is.`;
    } catch (err) {
      if (err.name === "AbortError" || ctx.fail(err)) return;
      notice.hidden = false;
      notice.textContent = err instanceof ApiError && err.status === 404
        ? `There is no deployment named “${name}”.` : `Could not load the deployment: ${err.message}`;
      if (err instanceof ApiError && err.status === 404) poller.stop();
    }
  }, 5000);

  return () => {
    poller.stop();
    controller.abort();
    chat.destroy();
    score.destroy();
  };
}

// ---- chat ------------------------------------------------------------------------------------------

function slider(id, label, { min, max, step, value, help }) {
  const range = h("input", { id, type: "range", min, max, step, value, "aria-describedby": help ? `${id}-help` : null });
  const box = h("input", { type: "number", min, max, step, value, class: "slider-value", "aria-label": `${label} value` });
  range.addEventListener("input", () => { box.value = range.value; });
  box.addEventListener("input", () => { if (box.value !== "") range.value = box.value; });
  const field = h("div", { class: "field" },
    h("label", { for: id }, label), h("div", { class: "slider" }, range, box),
    help ? h("p", { class: "help", id: `${id}-help` }, help) : null);
  return { field, get value() { return Number(box.value === "" ? range.value : box.value); } };
}

function chatPanel(name, getDeployment, ctx) {
  const messages = []; // {role, content} — the conversation sent with every request
  let inflight = null;

  const system = h("textarea", { id: "pg-system", rows: "3", placeholder: "You are a helpful assistant." });
  const temperature = slider("pg-temperature", "Temperature", { min: "0", max: "2", step: "0.05", value: "0.7",
    help: "0 = greedy (deterministic)." });
  const topP = slider("pg-top-p", "Top-p", { min: "0.05", max: "1", step: "0.05", value: "1" });
  const maxTokens = h("input", { id: "pg-max-tokens", type: "number", min: "1", max: "8192", step: "1", value: "256" });
  const viewCode = h("button", { type: "button", class: "btn" }, "View code");
  const clearBtn = h("button", { type: "button", class: "btn btn-ghost" }, "Clear chat");

  const transcript = h("div", { class: "transcript", tabindex: "0", role: "region", "aria-label": "Conversation" });
  const announce = h("p", { class: "visually-hidden", role: "status", "aria-live": "polite" });
  const input = h("textarea", { id: "pg-input", rows: "3", placeholder: "Ask something… (Enter to send, Shift+Enter for a new line)" });
  const send = h("button", { type: "submit", class: "btn btn-primary" }, "Send");
  const stopBtn = h("button", { type: "button", class: "btn", hidden: true }, "Stop");
  const composer = h("form", { class: "composer", novalidate: true },
    h("label", { for: "pg-input" }, "Message"), input, h("div", { class: "actions" }, send, stopBtn));

  const element = h("div", { class: "playground" },
    h("section", { class: "card chat", "aria-label": "Chat" }, transcript, announce, composer),
    h("aside", { class: "card settings", "aria-labelledby": "pg-settings-title" },
      h("h2", { id: "pg-settings-title" }, "Settings"),
      h("div", { class: "field" }, h("label", { for: "pg-system" }, "System prompt"), system),
      temperature.field, topP.field,
      h("div", { class: "field" }, h("label", { for: "pg-max-tokens" }, "Max tokens"), maxTokens),
      h("div", { class: "actions" }, viewCode, clearBtn)));

  const emptyNote = () => h("p", { class: "muted transcript-empty" },
    "Send a message to chat with ", h("code", {}, name), ". Replies stream token by token.");
  transcript.append(emptyNote());

  const requestBody = (conversation) => {
    const sys = system.value.trim();
    const body = {
      model: name,
      messages: [...(sys ? [{ role: "system", content: sys }] : []), ...conversation],
      temperature: temperature.value,
      top_p: topP.value,
      max_tokens: Number(maxTokens.value) || 256,
      stream: true,
      stream_options: { include_usage: true },
    };
    return body;
  };

  const bubble = (role, text) => {
    const content = h("div", { class: "msg-content" }, text);
    const stats = h("div", { class: "msg-stats" });
    const node = h("div", { class: `msg msg-${role}`, dataset: { role } },
      h("div", { class: "msg-role" }, role === "user" ? "You" : name), content, stats);
    if (transcript.querySelector(".transcript-empty")) clear(transcript);
    transcript.append(node);
    transcript.scrollTop = transcript.scrollHeight;
    return { node, content, stats };
  };

  const setBusy = (busy) => {
    send.disabled = busy;
    stopBtn.hidden = !busy;
    input.disabled = false;
  };

  composer.addEventListener("submit", async (event) => {
    event.preventDefault();
    const text = input.value.trim();
    if (!text || inflight) return;
    input.value = "";
    messages.push({ role: "user", content: text });
    bubble("user", text);
    const reply = bubble("assistant", "");
    reply.node.classList.add("streaming");
    const body = requestBody(messages);
    const controller = new AbortController();
    inflight = controller;
    setBusy(true);
    const t0 = performance.now();
    let tFirst = null;
    let chunks = 0;
    let usage = null;
    let answer = "";
    let failed = null;
    try {
      for await (const data of postSSE("/v1/chat/completions", body, { signal: controller.signal })) {
        if (data === "[DONE]") break;
        let obj;
        try {
          obj = JSON.parse(data);
        } catch {
          continue;
        }
        if (obj.error) {
          failed = obj.error.message || "the stream failed";
          break;
        }
        if (obj.usage) usage = obj.usage;
        const delta = obj.choices && obj.choices[0] && obj.choices[0].delta;
        if (delta && delta.content) {
          if (tFirst === null) tFirst = performance.now();
          chunks += 1;
          answer += delta.content;
          reply.content.textContent = answer;
          transcript.scrollTop = transcript.scrollHeight;
        }
      }
    } catch (err) {
      if (err instanceof AuthRequired) {
        messages.pop();
        inflight = null;
        ctx.fail(err);
        return;
      }
      if (err.name === "AbortError") failed = "stopped";
      else failed = err instanceof StreamError ? `${err.message} (HTTP ${err.status})` : err.message;
    }
    const tEnd = performance.now();
    inflight = null;
    setBusy(false);
    reply.node.classList.remove("streaming");
    if (answer) messages.push({ role: "assistant", content: answer });
    else messages.pop(); // nothing came back: let the user retry the same question
    const tokens = usage ? usage.completion_tokens : chunks;
    const parts = [];
    if (tFirst !== null) {
      const ttft = tFirst - t0;
      const decodeS = (tEnd - tFirst) / 1000;
      const tps = tokens > 1 && decodeS > 0 ? (tokens - 1) / decodeS : tokens / ((tEnd - t0) / 1000);
      parts.push(h("span", { dataset: { stat: "ttft" } }, `TTFT ${num(ttft, 0)} ms`),
        h("span", { dataset: { stat: "tps" } }, `${num(tps, 1)} tok/s`),
        h("span", { dataset: { stat: "tokens" } }, `${tokens} tokens`));
    }
    if (failed) {
      reply.node.classList.add(failed === "stopped" ? "msg-stopped" : "msg-error");
      parts.push(h("span", { class: failed === "stopped" ? "" : "error-text" }, failed === "stopped" ? "stopped" : `Error: ${failed}`));
      if (!answer) reply.content.textContent = failed === "stopped" ? "(stopped)" : "(no reply)";
    }
    clear(reply.stats).append(...parts);
    announce.textContent = failed && failed !== "stopped" ? `Reply failed: ${failed}` : `Reply received, ${tokens} tokens.`;
    input.focus();
  });

  input.addEventListener("keydown", (event) => {
    if (event.key === "Enter" && !event.shiftKey && !event.isComposing) {
      event.preventDefault();
      composer.requestSubmit();
    }
  });
  stopBtn.addEventListener("click", () => inflight && inflight.abort());
  clearBtn.addEventListener("click", () => {
    if (inflight) inflight.abort();
    messages.length = 0;
    clear(transcript).append(emptyNote());
    input.focus();
  });
  viewCode.addEventListener("click", () => {
    const pending = input.value.trim();
    const conversation = [...messages, ...(pending ? [{ role: "user", content: pending }] : [])];
    const body = requestBody(conversation.length ? conversation : snippets.defaultBody(name).messages);
    delete body.stream_options;
    const base = endpointFor(getDeployment());
    const opts = { auth: auth.required };
    openDialog({
      title: "This request as code",
      wide: true,
      build: (dialogBody) => dialogBody.append(
        h("p", { class: "muted" }, "The conversation and settings above, sent to ", h("code", {}, `${base}/chat/completions`), "."),
        tabs([
          { id: "curl", label: "curl", render: (p) => p.append(codeBlock(snippets.curl(base, body, opts), { label: "curl" })) },
          { id: "python", label: "Python", render: (p) => p.append(codeBlock(snippets.python(base, body, opts), { label: "Python" })) },
        ], { label: "Language" }).element),
    });
  });

  return {
    element,
    destroy() {
      if (inflight) inflight.abort();
    },
  };
}

// ---- score (log-likelihood) -------------------------------------------------------------------------

function scorePanel(name, ctx) {
  const ids = { context: nextId("sc-context"), conts: nextId("sc-conts"), space: nextId("sc-space") };
  const context = h("textarea", { id: ids.context, rows: "3" }, "The capital of France is");
  const conts = h("textarea", { id: ids.conts, rows: "4", "aria-describedby": `${ids.conts}-help` }, "Paris\nLondon\nBerlin");
  const space = h("input", { id: ids.space, type: "checkbox", checked: true });
  const run = h("button", { type: "submit", class: "btn btn-primary" }, "Score");
  const error = h("p", { class: "field-error", role: "alert" });
  const results = h("div", { class: "score-results", "aria-live": "polite" });
  const form = h("form", { class: "card score", novalidate: true },
    h("p", { class: "muted" }, "Ranks candidate continuations by the model's log-likelihood given a context (",
      h("code", {}, "POST /loglikelihood"), ", as used by evaluation harnesses)."),
    h("div", { class: "field" }, h("label", { for: ids.context }, "Context"), context),
    h("div", { class: "field" }, h("label", { for: ids.conts }, "Continuations, one per line"), conts,
      h("p", { class: "help", id: `${ids.conts}-help` }, "Each line is scored separately against the context.")),
    h("div", { class: "field check" }, space, h("label", { for: ids.space }, "Put a space between context and continuation")),
    h("div", { class: "actions" }, run), error, results);
  const controller = new AbortController();

  form.addEventListener("submit", async (event) => {
    event.preventDefault();
    error.textContent = "";
    const ctxText = context.value;
    const lines = conts.value.split("\n").map((l) => (space.checked ? l.trim() : l)).filter((l) => l.trim());
    if (!lines.length) {
      error.textContent = "Enter at least one continuation.";
      conts.focus();
      return;
    }
    const sep = space.checked && ctxText && !/\s$/.test(ctxText) ? " " : "";
    const body = { prompts: lines.map(() => ctxText), continuations: lines.map((l) => sep + l) };
    run.disabled = true;
    run.textContent = "Scoring…";
    try {
      const res = await api.loglikelihood(name, body, { signal: controller.signal });
      const best = Math.max(...res.ll);
      const weights = res.ll.map((ll) => Math.exp(ll - best));
      const total = weights.reduce((a, b) => a + b, 0);
      const rows = lines.map((l, i) => ({ text: l, ll: res.ll[i], greedy: res.is_greedy[i], p: weights[i] / total }))
        .sort((a, b) => b.ll - a.ll);
      clear(results).append(h("table", { class: "table compact" },
        h("caption", {}, "Continuations, most likely first"),
        h("thead", {}, h("tr", {}, ["Continuation", "Log-likelihood", "Share", "Greedy"].map((c) => h("th", { scope: "col" }, c)))),
        h("tbody", {}, rows.map((r, i) => h("tr", { class: i === 0 ? "best" : "" },
          h("td", { dataset: { label: "Continuation" } }, r.text),
          h("td", { class: "num", dataset: { label: "Log-likelihood" } }, num(r.ll, 3)),
          h("td", { class: "num", dataset: { label: "Share" } }, `${num(r.p * 100, 1)}%`),
          h("td", { dataset: { label: "Greedy" } }, r.greedy ? "yes" : "no"))))));
    } catch (err) {
      if (err.name === "AbortError" || ctx.fail(err)) return;
      error.textContent = `Could not score: ${err.message}`;
    } finally {
      run.disabled = false;
      run.textContent = "Score";
    }
  });
  return { element: form, destroy: () => controller.abort() };
}
