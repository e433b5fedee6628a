// Talking to the server like any client: the API key (kept in this tab only), request bodies per route,
// and server-sent events turned into one shape of update whatever the route.

const KEY_ITEM = "mistral-small-playground-api-key";

export const apiKey = {
  get: () => sessionStorage.getItem(KEY_ITEM),          // this tab only: gone when it closes
  set: (v) => (v ? sessionStorage.setItem(KEY_ITEM, v) : sessionStorage.removeItem(KEY_ITEM)),
};

export class HttpError extends Error {
  constructor(status, message) {
    super(message);
    this.status = status;
  }
}

export function authHeaders(json = false) {
  const h = {};
  if (json) h["Content-Type"] = "application/json";
  const key = apiKey.get();
  if (key) h.Authorization = `Bearer ${key}`;
  return h;
}

/** The message of an error body in either envelope (Cloudflare's or OpenAI's). */
export function errorText(body, fallback) {
  if (body && typeof body === "object") {
    if (body.error && body.error.message) return body.error.message;
    if (Array.isArray(body.errors) && body.errors.length) return body.errors.map((e) => e.message).join("; ");
  }
  return fallback;
}

export async function getJSON(path) {
  const r = await fetch(path, { headers: authHeaders() });
  const text = await r.text();
  let body = null;
  try {
    body = JSON.parse(text);
  } catch {
    // not JSON: the status says what happened
  }
  if (!r.ok) throw new HttpError(r.status, errorText(body, `${r.status} ${r.statusText}`));
  return body;
}

function userContent(m) {
  if (!m.images.length) return m.text;
  const parts = m.text ? [{ type: "text", text: m.text }] : [];
  for (const img of m.images) parts.push({ type: "image_url", image_url: { url: img.url } });
  return parts;
}

function parseArguments(text) {
  try {
    return JSON.parse(text);
  } catch {
    return text;
  }
}

/** The conversation as the route's messages. Workers AI's tool calls are {name, arguments: object} without
 * ids (results answer them in order); OpenAI's carry ids and arguments as a JSON string. */
export function toMessages(routeKey, system, history) {
  const out = system ? [{ role: "system", content: system }] : [];
  for (const m of history) {
    if (m.role === "user") {
      out.push({ role: "user", content: userContent(m) });
    } else if (m.role === "assistant") {
      const msg = { role: "assistant", content: m.text };
      if (m.toolCalls.length) {
        msg.tool_calls = m.toolCalls.map((c) => (routeKey === "workers"
          ? { name: c.name, arguments: parseArguments(c.arguments) }
          : { ...(c.id ? { id: c.id } : {}), type: "function", function: { name: c.name, arguments: c.arguments } }));
      }
      out.push(msg);
    } else if (m.role === "tool") {
      out.push({ role: "tool", content: m.text, ...(m.toolCallId ? { tool_call_id: m.toolCallId } : {}) });
    }
  }
  return out;
}

/** The request body for one route. `input`: {route, model, system, history, raw, prompt, params, schema,
 * tools, toolChoice}; params are only the controls the user set (the server applies its defaults). */
export function buildBody(input) {
  const { route } = input;
  const body = {};
  if (route.model) body.model = input.model;
  if (input.raw) {
    body.prompt = input.prompt;
    body.raw = true;
  } else {
    body.messages = toMessages(route.key, input.system, input.history);
  }
  Object.assign(body, input.params);
  if (input.schema !== null) {
    const wrapped = route.key === "openai" && !("schema" in input.schema);
    body.response_format = { type: "json_schema", json_schema: wrapped ? { name: "answer", schema: input.schema }
                                                                       : input.schema };
  }
  if (input.tools !== null && !input.raw) {
    body.tools = input.tools;
    if (input.toolChoice !== "auto") body.tool_choice = input.toolChoice;
  }
  body.stream = true;
  if (route.streamOptions) body.stream_options = { include_usage: true };
  return body;
}

/** Server-sent events of a response: each `data:` payload parsed, "[DONE]" as null. */
export async function* sse(response) {
  const reader = response.body.pipeThrough(new TextDecoderStream()).getReader();
  let buf = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) break;
    buf += value;
    let cut;
    while ((cut = buf.indexOf("\n\n")) >= 0) {
      const block = buf.slice(0, cut);
      buf = buf.slice(cut + 2);
      const data = block.split("\n").filter((l) => l.startsWith("data:"))
        .map((l) => l.slice(5).replace(/^ /, "").replace(/\r$/, "")).join("\n");
      if (data) yield data === "[DONE]" ? null : JSON.parse(data);
    }
  }
}

/** POST `req` ({url, body, route}) and follow its stream, calling onEvent(update) per event. Throws HttpError
 * for an error status, Error for an in-band error or a stream cut before [DONE], an AbortError when stopped. */
export async function streamReply(req, signal, calls, onEvent) {
  const r = await fetch(req.url, { method: "POST", headers: authHeaders(true), body: JSON.stringify(req.body),
                                   signal });
  if (!r.ok) {
    let body = null;
    try {
      body = await r.json();
    } catch {
      // not JSON: the status line says enough
    }
    throw new HttpError(r.status, errorText(body, `${r.status} ${r.statusText}`));
  }
  for await (const ev of sse(r)) {
    if (ev === null) return;
    const u = readEvent(req.route, ev, calls);
    if (u.error) throw new Error(u.error);
    onEvent(u);
  }
  throw new Error("the stream ended before its last event ([DONE])");
}

/** One event of either route as {text, usage, finish, error, progress}; OpenAI's call fragments are merged
 * into `calls` (by index) as they come, Workers AI sends each call whole. `progress`: the event carried output
 * (text or a call), the stream's rate counts it. */
export function readEvent(routeKey, ev, calls) {
  const u = { text: "", usage: null, finish: null, error: null, progress: false };
  if (ev.error || ev.success === false) {
    u.error = errorText(ev, "the server ended the stream with an error");
    return u;
  }
  if (routeKey === "workers") {
    u.text = ev.response || "";
    for (const c of ev.tool_calls || []) calls.push({ id: "", name: c.name, arguments: JSON.stringify(c.arguments) });
    u.usage = ev.usage || null;
    u.progress = Boolean(u.text || (ev.tool_calls && ev.tool_calls.length));
    return u;
  }
  const choice = ev.choices && ev.choices[0];
  if (choice) {
    u.text = (choice.delta && choice.delta.content) || "";
    for (const tc of (choice.delta && choice.delta.tool_calls) || []) {
      const c = (calls[tc.index] ||= { id: "", name: "", arguments: "" });
      if (tc.id) c.id = tc.id;
      if (tc.function && tc.function.name) c.name += tc.function.name;
      if (tc.function && tc.function.arguments) c.arguments += tc.function.arguments;
    }
    u.finish = choice.finish_reason || null;
    u.progress = Boolean(u.text || (choice.delta && choice.delta.tool_calls));
  }
  u.usage = ev.usage || null;
  return u;
}
