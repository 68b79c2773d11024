// The console's entry point: hash routing (#/, #/new, #/d/NAME, #/d/NAME/playground), the admin-key
// form, and the frame every view renders into. A view is `render(main, params, ctx)` returning an
// optional cleanup function (stops its polling) called when the route changes.

import { auth, AuthRequired, api } from "./api.js";
import { h, clear } from "./ui.js";
import * as listView from "./views/list.js";
import * as newView from "./views/new.js";
import * as deploymentView from "./views/deployment.js";
import * as playgroundView from "./views/playground.js";

const main = document.getElementById("main");
let cleanup = null;
let showingKeyForm = false;

function parse(hash) {
  const path = (hash || "").replace(/^#/, "") || "/";
  const parts = path.split("/").filter(Boolean).map(decodeURIComponent);
  if (parts.length === 0) return { view: listView, nav: "list", params: {} };
  if (parts.length === 1 && parts[0] === "new") return { view: newView, nav: "new", params: {} };
  if (parts[0] === "d" && parts.length === 2) return { view: deploymentView, nav: "list", params: { name: parts[1] } };
  if (parts[0] === "d" && parts.length === 3 && parts[2] === "playground") {
    return { view: playgroundView, nav: "list", params: { name: parts[1] } };
  }
  return { view: null, nav: null, params: {} };
}

function stopCurrent() {
  if (cleanup) {
    try {
      cleanup();
    } catch (err) {
      console.warn("cleanup failed", err);
    }
  }
  cleanup = null;
}

const ctx = {
  // a view hands every error it cannot show itself to this
  fail(err) {
    if (err instanceof AuthRequired) {
      showKeyForm();
      return true;
    }
    return false;
  },
  title(text) {
    document.title = text ? `${text} · fleetserve` : "fleetserve console";
  },
  navigate(hash) {
    if (location.hash === hash) route();
    else location.hash = hash;
  },
};

function route({ focus = true } = {}) {
  stopCurrent();
  showingKeyForm = false;
  const { view, nav, params } = parse(location.hash);
  document.querySelectorAll("[data-nav]").forEach((a) => {
    if (a.dataset.nav === nav) a.setAttribute("aria-current", "page");
    else a.removeAttribute("aria-current");
  });
  clear(main);
  if (!view) {
    ctx.title("Not found");
    main.append(h("h1", { tabindex: "-1" }, "Page not found"),
      h("p", {}, "No such page in the console. ", h("a", { href: "#/" }, "Back to deployments")));
  } else {
    cleanup = view.render(main, params, ctx) || null;
  }
  if (focus) {
    const heading = main.querySelector("h1");
    if (heading) {
      heading.setAttribute("tabindex", "-1");
      heading.focus({ preventScroll: true });
    }
  }
}

// The platform answered 401: ask for the admin key, keep it for this tab (sessionStorage), retry.
function showKeyForm() {
  if (showingKeyForm) return;
  stopCurrent();
  showingKeyForm = true;
  const hadKey = Boolean(auth.key);
  auth.key = null;
  ctx.title("Admin key");
  clear(main);
  const input = h("input", {
    id: "api-key", name: "api-key", type: "password", autocomplete: "off", spellcheck: "false", required: true,
    "aria-describedby": "api-key-help api-key-error",
  });
  const error = h("p", { class: "field-error", id: "api-key-error", role: "alert" },
    hadKey ? "That key was not accepted. Check it and try again." : "");
  const button = h("button", { type: "submit", class: "btn btn-primary" }, "Unlock console");
  const form = h("form", { class: "card narrow key-form", novalidate: true },
    h("h1", { tabindex: "-1" }, "Admin key required"),
    h("p", {}, "This platform was started with an API key. Enter its admin key (",
      h("code", {}, "--api-key"), " / ", h("code", {}, "FLEETSERVE_API_KEY"),
      ") to use the console. It stays in this browser tab only (session storage) and is never shown."),
    h("div", { class: "field" },
      h("label", { for: "api-key" }, "Admin API key"),
      input,
      h("p", { class: "help", id: "api-key-help" }, "Sent as “Authorization: Bearer …” to this platform only."),
      error),
    h("div", { class: "actions" }, button));
  form.addEventListener("submit", async (event) => {
    event.preventDefault();
    const key = input.value.trim();
    if (!key) {
      error.textContent = "Enter the key.";
      input.focus();
      return;
    }
    button.disabled = true;
    error.textContent = "";
    auth.key = key;
    input.value = "";
    try {
      await api.list();
      showingKeyForm = false;
      route();
    } catch (err) {
      auth.key = null;
      error.textContent = err instanceof AuthRequired
        ? "That key was not accepted. Check it and try again."
        : `Could not reach the platform: ${err.message}`;
      button.disabled = false;
      input.focus();
    }
  });
  main.append(form);
  input.focus();
}

function syncKeyButton() {
  document.getElementById("forget-key").hidden = !auth.key;
}

document.getElementById("forget-key").addEventListener("click", () => {
  auth.key = null;
  showKeyForm();
});
window.addEventListener("fleetserve:auth", syncKeyButton);
window.addEventListener("hashchange", () => route());
window.addEventListener("unhandledrejection", (event) => {
  if (event.reason instanceof AuthRequired) {
    event.preventDefault();
    showKeyForm();
  }
});
syncKeyButton();
route({ focus: false });
