// Server-sent events over fetch: POST with a JSON body, read the body stream, yield each event's data.

import { auth, AuthRequired, authHeaders } from "./api.js";

export class StreamError extends Error {
  constructor(status, message) {
    super(message);
    this.name = "StreamError";
    this.status = status;
  }
}

// Yields the `data` of every event, as a string ("[DONE]" included), until the stream ends.
export async function* postSSE(url, body, { signal } = {}) {
  const resp = await fetch(url, {
    method: "POST",
    headers: { "Content-Type": "application/json", Accept: "text/event-stream", ...authHeaders() },
    body: JSON.stringify(body),
    signal,
  });
  if (resp.status === 401) {
    auth.required = true;
    throw new AuthRequired();
  }
  if (!resp.ok) {
    let message = `HTTP ${resp.status}`;
    try {
      const data = await resp.json();
      message = (data.error && data.error.message) || (typeof data.detail === "string" ? data.detail : JSON.stringify(data));
    } catch {
      // not JSON: keep the status line
    }
    throw new StreamError(resp.status, message);
  }
  const reader = resp.body.getReader();
  const decoder = new TextDecoder();
  let buffer = "";
  let finished = false;
  try {
    for (;;) {
      const { value, done } = await reader.read();
      if (done) {
        finished = true;
        break;
      }
      buffer = (buffer + decoder.decode(value, { stream: true })).replace(/\r\n?/g, "\n");
      let end;
      while ((end = buffer.indexOf("\n\n")) >= 0) {
        const event = buffer.slice(0, end);
        buffer = buffer.slice(end + 2);
        const data = event.split("\n").filter((l) => l.startsWith("data:"))
          .map((l) => l.slice(5).replace(/^ /, "")).join("\n");
        if (data) yield data;
      }
    }
    const tail = buffer.trim();
    if (tail.startsWith("data:")) yield tail.slice(5).trim();
  } finally {
    if (!finished) reader.cancel().catch(() => {}); // the consumer stopped early: drop the connection
  }
}
