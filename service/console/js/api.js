// The console's only way to the server: the public HTTP API, with the key from sessionStorage.

const KEY = "rankone.key";

export const session = {
  has: () => sessionStorage.getItem(KEY) !== null,
  key: () => sessionStorage.getItem(KEY) || "",
  set: (key) => sessionStorage.setItem(KEY, key),
  clear: () => sessionStorage.removeItem(KEY),
};

export class ApiError extends Error {
  constructor(status, code, message) {
    super(message);
    this.status = status;
    this.code = code;
  }
}

function headers(extra = {}) {
  const key = session.key();
  return key ? { ...extra, Authorization: `Bearer ${key}` } : extra;
}

async function failure(response) {
  const text = await response.text();
  let error = null;
  try {
    error = JSON.parse(text).error;
  } catch {
    // not JSON: a proxy's page, say
  }
  return new ApiError(
    response.status,
    (error && error.code) || `http_${response.status}`,
    (error && error.message) || text || response.statusText,
  );
}

// JSON in (json) or a FormData (form), JSON out; ApiError with the server's message on a 4xx/5xx.
export async function api(path, { method = "GET", json, form, signal } = {}) {
  const init = { method, signal, headers: headers(json === undefined ? {} : { "content-type": "application/json" }) };
  if (json !== undefined) init.body = JSON.stringify(json);
  if (form !== undefined) init.body = form;
  const response = await fetch(path, init);
  if (!response.ok) throw await failure(response);
  const text = await response.text();
  return text ? JSON.parse(text) : null;
}

// GET /v1/models split into the base model's names (the backbone's id and its alias "base", on
// servers that serve it) and the tasks (a task's card names the base model as its parent).
export async function listModels() {
  const cards = (await api("/v1/models")).data;
  const parented = cards.some((m) => m.parent);
  const isTask = (m) => (parented ? Boolean(m.parent) : m.id !== "base");
  return {
    all: cards.map((m) => m.id),
    tasks: cards.filter(isTask).map((m) => m.id),
    bases: cards.filter((m) => !isTask(m)).map((m) => m.id),
  };
}

export async function metricsText(signal) {
  const response = await fetch("/metrics", { signal });
  if (!response.ok) throw await failure(response);
  return response.text();
}

// POST /v1/chat/completions with "stream": true; yields each chunk (server-sent events).
export async function* streamChat(body, signal) {
  const response = await fetch("/v1/chat/completions", {
    method: "POST",
    signal,
    headers: headers({ "content-type": "application/json", accept: "text/event-stream" }),
    body: JSON.stringify({ ...body, stream: true, stream_options: { include_usage: true } }),
  });
  if (!response.ok) throw await failure(response);
  const reader = response.body.pipeThrough(new TextDecoderStream()).getReader();
  let buffer = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) return;
    buffer += value;
    // events end with a blank line; sse-starlette writes \r\n line ends
    const held = buffer.endsWith("\r") ? "\r" : "";
    const text = (held ? buffer.slice(0, -1) : buffer).replace(/\r\n?/g, "\n");
    const events = text.split("\n\n");
    buffer = events.pop() + held;
    for (const event of events) {
      const data = event
        .split("\n")
        .filter((line) => line.startsWith("data:"))
        .map((line) => line.slice(5).replace(/^ /, ""))
        .join("\n");
      if (!data) continue; // a keep-alive comment
      if (data === "[DONE]") return;
      const chunk = JSON.parse(data);
      if (chunk.error) throw new ApiError(0, chunk.error.code, chunk.error.message);
      yield chunk;
    }
  }
}

// Prometheus text → [{name, labels, value}] (the console reads only counters and gauges).
export function parseMetrics(text) {
  const samples = [];
  for (const line of text.split("\n")) {
    if (!line || line.startsWith("#")) continue;
    const match = line.match(/^([a-zA-Z_:][\w:]*)(?:\{(.*)\})?\s+(\S+)/);
    if (!match) continue;
    const labels = {};
    for (const m of (match[2] || "").matchAll(/(\w+)="((?:[^"\\]|\\.)*)"/g)) {
      labels[m[1]] = m[2].replace(/\\(.)/g, (_, c) => (c === "n" ? "\n" : c));
    }
    samples.push({ name: match[1], labels, value: Number(match[3]) });
  }
  return samples;
}
