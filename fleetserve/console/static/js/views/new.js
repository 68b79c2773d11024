// #/new : the deployment form. The API is the validator: its 422 `detail[].loc` puts each message
// next to its field, a 409 (name taken) is shown at the name and on top of the form.
// Only the spec fields the API accepts today are here (DESIGN.md: reject what cannot be honoured).

import { api, ApiError, cleanMsg, fieldPath } from "../api.js";
import { clear, h, nextId } from "../ui.js";

const ENGINE_ARGS = [
  ["max_batch_tokens", "Max batch tokens", "Tokens computed per engine step (long prompts are chunked). Default 2048."],
  ["max_running_seqs", "Max running sequences", "Sequences decoded together. Default 64."],
  ["kv_cache_tokens", "KV cache tokens", "KV pool size in tokens. Default: sized from memory."],
  ["block_size", "KV block size", "Tokens per KV cache block."],
  ["max_queue_len", "Max queue length", "Waiting requests before HTTP 429. Default 256."],
  ["tp_size", "Tensor parallel size", "Processes (GPUs on CUDA) per replica, each with a shard of the weights. Default 1."],
];
// native-engine options chosen from a list ("" = the engine's default, not sent)
const ENGINE_CHOICES = [
  ["quantization", "Weight quantization", [["", "none"], ["fp8", "fp8 (per-channel scales)"]],
    "FP8 weights: fast on Hopper GPUs; emulated (slow) on CPU."],
  ["kv_cache_dtype", "KV cache dtype", [["", "model's"], ["fp8_e4m3", "fp8_e4m3"], ["fp8_e5m2", "fp8_e5m2"]],
    "One byte per K/V value: twice the tokens of bf16 in the same memory."],
  ["speculative", "Speculative decoding", [["", "none"], ["ngram", "ngram (prompt lookup)"]],
    "Greedy requests draft tokens from their own context; output is unchanged."],
];

export function render(main, _params, ctx) {
  ctx.title("New deployment");
  const fields = {}; // api path ("name", "replicas.max", "engine_args.block_size") -> {input, error}
  const summary = h("div", { class: "form-summary", role: "alert", tabindex: "-1" });

  const field = (path, label, input, help) => {
    const id = input.id || nextId("f");
    input.id = id;
    input.name = input.name || path;
    const errId = `${id}-error`;
    const helpId = help ? `${id}-help` : null;
    input.setAttribute("aria-describedby", [helpId, errId].filter(Boolean).join(" "));
    const error = h("p", { class: "field-error", id: errId, dataset: { errorFor: path } });
    fields[path] = { input, error };
    return h("div", { class: "field", dataset: { field: path } },
      h("label", { for: id }, label), input, help ? h("p", { class: "help", id: helpId }, help) : null, error);
  };
  const text = (id, attrs = {}) => h("input", { id, type: "text", autocomplete: "off", spellcheck: "false", ...attrs });
  const number = (id, attrs = {}) => h("input", { id, type: "number", inputmode: "numeric", step: "1", ...attrs });
  const select = (id, options, value) => {
    const s = h("select", { id }, options.map(([v, label]) => h("option", { value: v }, label)));
    s.value = value;
    return s;
  };

  const model = text("f-model", { list: "model-suggestions", value: "default", required: true });
  const name = text("f-name", { required: true, placeholder: "e.g. chat", maxlength: "63", autocapitalize: "none" });
  let nameTouched = false;
  name.addEventListener("input", () => { nameTouched = true; });
  model.addEventListener("input", () => {
    if (!nameTouched) name.value = suggestName(model.value);
  });
  name.value = suggestName(model.value);

  const replicaMin = number("f-replicas-min", { min: "0", max: "64", value: "1" });
  const replicaMax = number("f-replicas-max", { min: "1", max: "64", value: "1" });
  const engine = ENGINE_ARGS.map(([key, label, help]) =>
    [key, field(`engine_args.${key}`, label, number(`f-ea-${key}`, { min: "1", placeholder: "default" }), help)]);
  for (const [key, label, options, help] of ENGINE_CHOICES) {
    engine.push([key, field(`engine_args.${key}`, label, select(`f-ea-${key}`, options, ""), help)]);
  }
  const engineError = h("p", { class: "field-error", id: "f-engine-args-error", dataset: { errorFor: "engine_args" } });
  fields.engine_args = { input: null, error: engineError };
  const replicasError = h("p", { class: "field-error", id: "f-replicas-error", dataset: { errorFor: "replicas" } });
  fields.replicas = { input: null, error: replicasError };

  const submit = h("button", { type: "submit", class: "btn btn-primary" }, "Deploy");
  const form = h("form", { class: "deploy-form", novalidate: true, "aria-labelledby": "new-title" },
    h("datalist", { id: "model-suggestions" },
      h("option", { value: "default" }, "Embedded SmolLM2-135M-Instruct (no download)"),
      h("option", { value: "HuggingFaceTB/SmolLM2-135M-Instruct" }, "Hugging Face Hub"),
      h("option", { value: "Qwen/Qwen2.5-0.5B-Instruct" }, "Hugging Face Hub")),
    summary,
    h("fieldset", { class: "card" },
      h("legend", {}, "Model"),
      h("div", { class: "grid-2" },
        field("model", "Model", model,
          "“default” (the embedded SmolLM2-135M, no download), a Hugging Face id (org/name) or a local path."),
        field("name", "Deployment name", name,
          "Lowercase letters, digits and “-”. Clients send it as the OpenAI “model”."),
        field("revision", "Revision (optional)", text("f-revision", { placeholder: "main" }),
          "Hub branch, tag or commit."),
        field("hf_token", "Hugging Face token (optional)",
          h("input", { id: "f-hf-token", type: "password", autocomplete: "new-password", spellcheck: "false" }),
          "For gated models. Stored encrypted and never shown again."))),
    h("fieldset", { class: "card" },
      h("legend", {}, "Runtime"),
      h("div", { class: "grid-3" },
        field("backend", "Backend", select("f-backend", [["native", "native (fleetserve engine)"],
          ["sglang", "sglang (NVIDIA GPUs)"], ["vllm", "vllm (NVIDIA GPUs)"]], "native"),
          "sglang / vllm: planned on this machine's GPUs, one replica, a Hugging Face model."),
        field("provider", "Provider", select("f-provider", [["local", "local (this machine)"]], "local")),
        field("device", "Device", select("f-device",
          [["auto", "auto"], ["cpu", "cpu"], ["cuda", "cuda"], ["mps", "mps"]], "auto"),
        "auto: CUDA, then MPS, then CPU."),
        field("precision", "Precision", select("f-precision",
          [["auto", "auto"], ["fp32", "fp32"], ["bf16", "bf16"], ["fp16", "fp16"]], "auto"),
        "auto: fp32 on CPU, bf16 on CUDA."),
        field("max_model_len", "Max model length", number("f-max-model-len", { min: "16", placeholder: "model's" }),
          "Context window per request, in tokens (at least 16)."))),
    h("fieldset", { class: "card" },
      h("legend", {}, "Replicas"),
      h("div", { class: "grid-3" },
        field("replicas.min", "Min replicas", replicaMin, "0 to 64."),
        field("replicas.max", "Max replicas", replicaMax, "1 to 64, at least min.")),
      replicasError),
    h("fieldset", { class: "card" },
      h("legend", {}, "Engine arguments (optional)"),
      h("div", { class: "grid-3" }, engine.map(([, node]) => node)),
      engineError),
    h("div", { class: "actions" }, submit, h("a", { class: "btn", href: "#/" }, "Cancel")));

  main.append(h("div", { class: "page-head" }, h("h1", { id: "new-title" }, "New deployment")), form);
  // ask for the admin key now (if the platform has one), not after the form is filled in
  api.list().catch((err) => ctx.fail(err));

  form.addEventListener("submit", async (event) => {
    event.preventDefault();
    resetErrors(fields, summary);
    const spec = collect(form, fields);
    submit.disabled = true;
    submit.textContent = "Deploying…";
    try {
      const created = await api.create(spec);
      fields.hf_token.input.value = "";
      ctx.navigate(`#/d/${encodeURIComponent(created.name)}`);
    } catch (err) {
      if (ctx.fail(err)) return;
      showErrors(err, fields, summary, spec);
      submit.disabled = false;
      submit.textContent = "Deploy";
    }
  });
}

function suggestName(modelId) {
  const base = (modelId || "").split("/").pop().toLowerCase().replace(/\.gguf$/, "")
    .replace(/[^a-z0-9-]+/g, "-").replace(/^-+|-+$/g, "").slice(0, 63).replace(/-+$/, "");
  return base || "";
}

function collect(form, fields) {
  const value = (path) => fields[path].input.value.trim();
  const int = (path) => {
    const v = fields[path].input.value;
    return v === "" ? undefined : Number(v);
  };
  const spec = {
    name: value("name"),
    model: value("model"),
    backend: value("backend"),
    provider: value("provider"),
    device: value("device"),
    precision: value("precision"),
    replicas: { min: int("replicas.min") ?? 1, max: int("replicas.max") ?? 1 },
  };
  if (value("revision")) spec.revision = value("revision");
  const token = fields.hf_token.input.value; // never trimmed into view, never echoed
  if (token) spec.hf_token = token;
  const maxLen = int("max_model_len");
  if (maxLen !== undefined) spec.max_model_len = maxLen;
  const engineArgs = {};
  for (const [key] of ENGINE_ARGS) {
    const v = int(`engine_args.${key}`);
    if (v !== undefined) engineArgs[key] = v;
  }
  for (const [key] of ENGINE_CHOICES) {
    const v = value(`engine_args.${key}`);
    if (v) engineArgs[key] = v;
  }
  if (Object.keys(engineArgs).length) spec.engine_args = engineArgs;
  return spec;
}

function resetErrors(fields, summary) {
  for (const { input, error } of Object.values(fields)) {
    error.textContent = "";
    if (input) input.removeAttribute("aria-invalid");
  }
  clear(summary);
  summary.className = "form-summary";
}

function showErrors(err, fields, summary, spec) {
  summary.className = "form-summary alert alert-error";
  if (err instanceof ApiError && err.status === 409) {
    const msg = typeof err.detail === "string" ? err.detail : err.message;
    place(fields, "name", msg);
    summary.append(h("strong", {}, "Name already taken. "), msg, ". ",
      h("a", { href: `#/d/${encodeURIComponent(spec.name)}` }, `Open “${spec.name}”`),
      " or choose another name.");
  } else if (err instanceof ApiError && err.status === 422 && Array.isArray(err.detail)) {
    summary.append(h("strong", {}, "The platform rejected this spec. "), "Fix the marked fields:");
    const list = h("ul", {});
    for (const e of err.detail) {
      const path = fieldPath(e.loc);
      const msg = cleanMsg(e.msg);
      const where = place(fields, path, msg);
      list.append(h("li", {}, where ? h("a", { href: `#${where}`, dataset: { focus: where } }, path) : path || "spec",
        `: ${msg}`));
    }
    list.addEventListener("click", (event) => {
      const link = event.target.closest("a[data-focus]");
      if (link) {
        event.preventDefault(); // keep the hash route
        const target = document.getElementById(link.dataset.focus);
        if (target) target.focus();
      }
    });
    summary.append(list);
  } else {
    summary.append(h("strong", {}, err instanceof ApiError ? `Error ${err.status}: ` : "Error: "), err.message);
  }
  const firstInvalid = document.querySelector("[aria-invalid=true]");
  (firstInvalid || summary).focus();
}

// Put `msg` next to the field for `path` (or its closest parent: "engine_args.x" -> "engine_args").
// Returns the id of the input it marked, if any.
function place(fields, path, msg) {
  let p = path;
  while (p && !fields[p]) p = p.includes(".") ? p.slice(0, p.lastIndexOf(".")) : "";
  if (!p) return null;
  const { input, error } = fields[p];
  error.textContent = error.textContent ? `${error.textContent} ${msg}` : msg;
  if (input) {
    input.setAttribute("aria-invalid", "true");
    return input.id;
  }
  return null;
}
