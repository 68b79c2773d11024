// Ready-to-paste client code for a deployment. Keys never appear: when the platform needs one the
// snippets read it from the FLEETSERVE_API_KEY environment variable.

const DEFAULT_MESSAGES = [{ role: "user", content: "What is the capital of France?" }];

function pyRepr(value, indent = 0) {
  const pad = " ".repeat(indent);
  if (value === null || value === undefined) return "None";
  if (value === true) return "True";
  if (value === false) return "False";
  if (typeof value === "number") return String(value);
  if (typeof value === "string") return JSON.stringify(value);
  if (Array.isArray(value)) {
    if (!value.length) return "[]";
    return `[\n${value.map((v) => `${pad}    ${pyRepr(v, indent + 4)}`).join(",\n")},\n${pad}]`;
  }
  const entries = Object.entries(value);
  return `{${entries.map(([k, v]) => `${JSON.stringify(k)}: ${pyRepr(v, indent)}`).join(", ")}}`;
}

const shellQuote = (s) => `'${s.replace(/'/g, "'\\''")}'`;

// body: the JSON body of POST /v1/chat/completions
export function curl(baseUrl, body, { auth } = {}) {
  const lines = [`curl ${baseUrl}/chat/completions`];
  if (body.stream) lines.push("  -N");
  lines.push("  -H 'Content-Type: application/json'");
  if (auth) lines.push("  -H \"Authorization: Bearer $FLEETSERVE_API_KEY\"");
  lines.push(`  -d ${shellQuote(JSON.stringify(body, null, 2).replace(/\n/g, "\n  "))}`);
  return lines.join(" \\\n");
}

export function python(baseUrl, body, { auth } = {}) {
  const key = auth ? "os.environ[\"FLEETSERVE_API_KEY\"]" : "\"unused\"  # this platform has no API key";
  const args = Object.entries(body).filter(([k]) => k !== "stream_options")
    .map(([k, v]) => `    ${k}=${pyRepr(v, 4)},`);
  const out = [
    ...(auth ? ["import os", ""] : []),
    "from openai import OpenAI",
    "",
    `client = OpenAI(base_url=${JSON.stringify(baseUrl)}, api_key=${key})`,
  ];
  if (body.stream) {
    out.push("stream = client.chat.completions.create(", ...args, ")", "for chunk in stream:",
      "    if chunk.choices and chunk.choices[0].delta.content:",
      "        print(chunk.choices[0].delta.content, end=\"\", flush=True)", "print()");
  } else {
    out.push("reply = client.chat.completions.create(", ...args, ")", "print(reply.choices[0].message.content)");
  }
  return out.join("\n");
}

export function javascript(baseUrl, body, { auth } = {}) {
  const headers = auth
    ? "{\n    \"Content-Type\": \"application/json\",\n    Authorization: `Bearer ${process.env.FLEETSERVE_API_KEY}`,\n  }"
    : "{ \"Content-Type\": \"application/json\" }";
  return [
    `const resp = await fetch(${JSON.stringify(`${baseUrl}/chat/completions`)}, {`,
    "  method: \"POST\",",
    `  headers: ${headers},`,
    `  body: JSON.stringify(${JSON.stringify(body, null, 2).replace(/\n/g, "\n  ")}),`,
    "});",
    "const data = await resp.json();",
    "console.log(data.choices[0].message.content);",
  ].join("\n");
}

export function defaultBody(model) {
  return { model, messages: DEFAULT_MESSAGES, max_tokens: 64 };
}
