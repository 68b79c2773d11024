// DOM helpers, formatting, dialogs, copy buttons and toasts. Everything that shows data uses
// textContent (never innerHTML), so nothing from the API or a model can inject markup.

export function h(tag, attrs = {}, ...children) {
  const node = document.createElement(tag);
  for (const [key, value] of Object.entries(attrs || {})) {
    if (value === null || value === undefined || value === false) continue;
    if (key === "class") node.className = value;
    else if (key === "text") node.textContent = value;
    else if (key === "dataset") Object.assign(node.dataset, value);
    else if (key.startsWith("on") && typeof value === "function") node.addEventListener(key.slice(2), value);
    else if (value === true) node.setAttribute(key, "");
    else node.setAttribute(key, String(value));
  }
  append(node, children);
  return node;
}

export function append(node, children) {
  for (const child of children.flat(Infinity)) {
    if (child === null || child === undefined || child === false) continue;
    node.append(child instanceof Node ? child : document.createTextNode(String(child)));
  }
  return node;
}

export function clear(node) {
  while (node.firstChild) node.removeChild(node.firstChild);
  return node;
}

let uid = 0;
export const nextId = (prefix) => `${prefix}-${++uid}`;

// ---- formatting ----------------------------------------------------------------------------------

export function age(ts) {
  if (!ts) return "—";
  const s = Math.max(0, Math.floor(Date.now() / 1000 - ts));
  if (s < 120) return `${s}s`;
  if (s < 7200) return `${Math.floor(s / 60)}m`;
  if (s < 172800) return `${Math.floor(s / 3600)}h`;
  return `${Math.floor(s / 86400)}d`;
}

export function clock(ts) {
  return new Date(ts * 1000).toLocaleTimeString([], { hour: "2-digit", minute: "2-digit", second: "2-digit" });
}

export function num(value, digits = 1) {
  if (value === null || value === undefined || Number.isNaN(value)) return "—";
  return Number(value).toLocaleString(undefined, { maximumFractionDigits: digits, minimumFractionDigits: 0 });
}

export function ms(value) {
  return value === null || value === undefined ? "—" : `${num(value, value < 10 ? 1 : 0)} ms`;
}

const STATUS_LABELS = { scaled_to_zero: "scaled to zero" };
export const statusLabel = (status) => STATUS_LABELS[status] || status;

export function badge(status) {
  return h("span", { class: `badge badge-${status}`, dataset: { status } }, statusLabel(status));
}

// ---- feedback ------------------------------------------------------------------------------------

export function toast(message, kind = "info") {
  const box = document.getElementById("toasts");
  const item = h("div", { class: `toast toast-${kind}` }, message);
  box.append(item);
  setTimeout(() => item.remove(), 4000);
}

async function writeClipboard(text) {
  if (navigator.clipboard && window.isSecureContext) {
    try {
      await navigator.clipboard.writeText(text);
      return true;
    } catch {
      // fall through to the selection-based copy (e.g. permission denied)
    }
  }
  const area = h("textarea", { class: "visually-hidden", "aria-hidden": "true", tabindex: "-1" });
  area.value = text;
  document.body.append(area);
  area.select();
  let ok = false;
  try {
    ok = document.execCommand("copy");
  } catch {
    ok = false;
  }
  area.remove();
  return ok;
}

export function copyButton(getText, label = "Copy") {
  const button = h("button", { type: "button", class: "btn btn-small btn-copy" }, label);
  button.addEventListener("click", async () => {
    const ok = await writeClipboard(typeof getText === "function" ? getText() : getText);
    button.textContent = ok ? "Copied" : "Copy failed";
    setTimeout(() => (button.textContent = label), 1500);
  });
  return button;
}

// ---- dialogs -------------------------------------------------------------------------------------

// A modal <dialog>: Escape closes it (the browser's `cancel`), focus returns to the opener.
// `build(dialog, close)` fills the body; returns {dialog, close}.
export function openDialog({ title, build, onClose, wide = false }) {
  const opener = document.activeElement;
  const titleId = nextId("dlg-title");
  const dialog = h("dialog", { class: `dialog${wide ? " dialog-wide" : ""}`, "aria-labelledby": titleId });
  const close = () => {
    if (dialog.open) dialog.close();
  };
  dialog.addEventListener("close", () => {
    dialog.remove();
    if (onClose) onClose();
    if (opener && opener.isConnected && typeof opener.focus === "function") opener.focus();
  });
  dialog.addEventListener("click", (event) => {
    if (event.target === dialog) close(); // a click on the backdrop
  });
  const header = h("div", { class: "dialog-header" },
    h("h2", { id: titleId }, title),
    h("button", { type: "button", class: "btn btn-small btn-ghost", "aria-label": "Close dialog", onclick: close },
      "Close"));
  const body = h("div", { class: "dialog-body" });
  dialog.append(header, body);
  document.body.append(dialog);
  build(body, close);
  dialog.showModal();
  const first = body.querySelector("[autofocus], input, select, textarea, button");
  if (first) first.focus();
  return { dialog, close };
}

// "Are you sure?" -> resolves true / false.
export function confirmDialog({ title, message, confirmLabel, danger = false }) {
  return new Promise((resolve) => {
    let answer = false;
    openDialog({
      title,
      onClose: () => resolve(answer),
      build: (body, close) => {
        const cancel = h("button", { type: "button", class: "btn", onclick: close }, "Cancel");
        const ok = h("button", {
          type: "button", class: `btn ${danger ? "btn-danger" : "btn-primary"}`, "data-confirm": "true",
          onclick: () => { answer = true; close(); },
        }, confirmLabel);
        append(body, [h("p", {}, message), h("div", { class: "dialog-actions" }, cancel, ok)]);
        setTimeout(() => cancel.focus(), 0); // the safe choice has focus
      },
    });
  });
}

// Tabs (WAI-ARIA tablist; arrow keys move between tabs). items: [{id, label, render(panel)}]
export function tabs(items, { label, onChange } = {}) {
  const list = h("div", { class: "tabs", role: "tablist", "aria-label": label || "Tabs" });
  const panels = h("div", { class: "tab-panels" });
  const buttons = [];
  const select = (index, focus = false) => {
    buttons.forEach((b, i) => {
      const on = i === index;
      b.setAttribute("aria-selected", String(on));
      b.tabIndex = on ? 0 : -1;
      panels.children[i].hidden = !on;
    });
    if (focus) buttons[index].focus();
    if (onChange) onChange(items[index].id);
  };
  items.forEach((item, i) => {
    const tabId = nextId("tab");
    const panelId = nextId("panel");
    const button = h("button", {
      type: "button", role: "tab", id: tabId, "aria-controls": panelId, class: "tab", dataset: { tab: item.id },
    }, item.label);
    button.addEventListener("click", () => select(i));
    button.addEventListener("keydown", (event) => {
      const delta = { ArrowRight: 1, ArrowLeft: -1 }[event.key];
      if (delta) {
        event.preventDefault();
        select((i + delta + items.length) % items.length, true);
      }
    });
    buttons.push(button);
    list.append(button);
    const panel = h("div", { role: "tabpanel", id: panelId, "aria-labelledby": tabId, class: "tab-panel" });
    item.render(panel);
    panels.append(panel);
  });
  select(0);
  return { element: h("div", { class: "tabset" }, list, panels), select };
}

// A code block with a copy button.
export function codeBlock(text, { label } = {}) {
  const code = h("code", {}, text);
  const pre = h("pre", { class: "code", tabindex: "0", "aria-label": label || "Code" }, code);
  const block = h("div", { class: "code-block" }, pre, copyButton(() => code.textContent));
  block.setText = (t) => { code.textContent = t; };
  return block;
}

// Calls fn now and every `intervalMs` (not while the tab is hidden) until stop(); never overlaps itself.
export function poll(fn, intervalMs) {
  let timer = null;
  let stopped = false;
  const tick = async () => {
    if (stopped) return;
    if (!document.hidden) {
      try {
        await fn();
      } catch (err) {
        if (err && err.name !== "AbortError") console.warn("poll failed:", err);
      }
    }
    if (!stopped) timer = setTimeout(tick, intervalMs);
  };
  tick();
  return {
    stop() {
      stopped = true;
      clearTimeout(timer);
    },
    now() {
      clearTimeout(timer);
      tick();
    },
  };
}
