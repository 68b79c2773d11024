// The platform API from the browser: /api/v1 (control) and /v1 (gateway), same origin.
// The admin key (when the platform has one) lives in sessionStorage only and goes out as a bearer token.

const KEY_STORAGE = "fleetserve.apiKey";

export class ApiError extends Error {
  constructor(status, detail, body) {
    super(ApiError.describe(status, detail));
    this.name = "ApiError";
    this.status = status;
    this.detail = detail; // FastAPI's `detail` (a string or a list of {loc, msg, type}) or OpenAI's error
    this.body = body;
  }

  static describe(status, detail) {
    if (typeof detail === "string") return detail;
    if (Array.isArray(detail)) {
      return detail.map((e) => `${fieldPath(e.loc)}: ${cleanMsg(e.msg)}`).join("; ");
    }
    if (detail && detail.message) return detail.message;
    return `request failed with HTTP ${status}`;
  }
}

export class AuthRequired extends Error {
  constructor() {
    super("this platform needs its admin key");
    this.name = "AuthRequired";
  }
}

// ["body", "replicas", "max"] -> "replicas.max"
export function fieldPath(loc) {
  const parts = (loc || []).filter((p, i) => !(i === 0 && ["body", "query", "path"].includes(p)));
  return parts.join(".");
}

// pydantic prefixes its ValueErrors; the rest of the message says what is allowed
export const cleanMsg = (msg) => String(msg || "").replace(/^Value error, /, "");

export const auth = {
  get key() {
    try {
      return sessionStorage.getItem(KEY_STORAGE);
    } catch {
      return null;
    }
  },
  set key(value) {
    try {
      if (value) sessionStorage.setItem(KEY_STORAGE, value);
      else sessionStorage.removeItem(KEY_STORAGE);
    } catch {
      // storage disabled: the key lasts as long as this page
    }
    window.dispatchEvent(new CustomEvent("fleetserve:auth"));
  },
  // set once any call needed a key (the code snippets then show the Authorization header)
  required: false,
};

export function authHeaders() {
  const key = auth.key;
  return key ? { Authorization: `Bearer ${key}` } : {};
}

// fetch + JSON + errors. 401 -> AuthRequired (the app shows the key form); other >= 400 -> ApiError.
export async function request(method, path, { body, signal, headers } = {}) {
  const init = { method, headers: { Accept: "application/json", ...authHeaders(), ...(headers || {}) }, signal };
  if (body !== undefined) {
    init.headers["Content-Type"] = "application/json";
    init.body = JSON.stringify(body);
  }
  const resp = await fetch(path, init);
  if (resp.status === 401) {
    auth.required = true;
    throw new AuthRequired();
  }
  let data = null;
  const text = await resp.text();
  if (text) {
    try {
      data = JSON.parse(text);
    } catch {
      data = text;
    }
  }
  if (!resp.ok) {
    const detail = data && typeof data === "object" ? (data.detail ?? data.error ?? data) : data;
    throw new ApiError(resp.status, detail, data);
  }
  if (auth.key) auth.required = true;
  return data;
}

const enc = encodeURIComponent;

export const api = {
  list: (opts) => request("GET", "/api/v1/deployments", opts),
  get: (name, opts) => request("GET", `/api/v1/deployments/${enc(name)}`, opts),
  create: (spec) => request("POST", "/api/v1/deployments", { body: spec }),
  patch: (name, body) => request("PATCH", `/api/v1/deployments/${enc(name)}`, { body }),
  remove: (name) => request("DELETE", `/api/v1/deployments/${enc(name)}`),
  events: (name, limit = 100, opts) => request("GET", `/api/v1/deployments/${enc(name)}/events?limit=${limit}`, opts),
  metrics: (name, opts) => request("GET", `/api/v1/deployments/${enc(name)}/metrics`, opts),
  logs: (name, tail = 200, opts) => request("GET", `/api/v1/deployments/${enc(name)}/logs?tail=${tail}`, opts),
  loglikelihood: (name, body, opts) =>
    request("POST", `/deployments/${enc(name)}/loglikelihood`, { body, ...(opts || {}) }),
};

// The deployment's OpenAI base URL as a client should use it. The API reports the platform's own
// address; when that is a loopback address but this page was opened under another host name (a
// phone on the LAN, a proxy), the page's origin is what the reader can actually reach.
export function endpointFor(deployment) {
  const fallback = `${location.origin}/v1`;
  if (!deployment || !deployment.endpoint) return fallback;
  try {
    const url = new URL(deployment.endpoint);
    const loopback = (host) => ["127.0.0.1", "localhost", "[::1]", "::1"].includes(host);
    if (loopback(url.hostname) && !loopback(location.hostname)) return `${location.origin}${url.pathname}`;
    return deployment.endpoint.replace(/\/$/, "");
  } catch {
    return fallback;
  }
}
