// The playground: wires the page to the server's public routes. Everything the page knows about the server it
// reads at load time: the request schemas (ranges, defaults) from /openapi.json, the input limits from
// /limits, the model and the demo flag from /health; /v1/models tells whether an API key is needed.

import { apiKey, buildBody, getJSON, HttpError, streamReply } from "./api.js";
import { showCode } from "./code_panel.js";
import { Controls, jsonField } from "./controls.js";
import { Conversation } from "./conversation.js";
import { Attachments, describeLimits } from "./images.js";
import { ACCOUNT, describeRoute } from "./routes.js";
import { drawChart, ReplyTimer } from "./stats.js";

const $ = (id) => document.getElementById(id);
const TOOLS_EXAMPLE = [{ name: "get_weather", description: "Current weather in a city",
  parameters: { type: "object", properties: { city: { type: "string", enum: ["Paris", "London", "Tokyo"] } },
                required: ["city"] } }];

const state = {
  routes: {}, route: null, model: null, history: [], busy: null, keyNeeded: false, lastRequest: null,
  pending: null, // what to run again once a key is entered
};

function notify(text) {
  const n = $("notice");
  n.textContent = text;
  n.hidden = !text;
}

function askKey(why) {
  state.keyNeeded = true;
  $("key-form").hidden = false;
  if (why) notify(why);
  $("key-input").focus();
}

// ---- the request --------------------------------------------------------------------------------------------
function requestFor(history, rawPrompt) {
  const route = state.route;
  const body = buildBody({
    route, model: state.model, system: $("system").value, history: history.filter((m) => !m.raw),
    raw: rawPrompt !== null, prompt: rawPrompt, params: controls.params(),
    schema: route.schema ? jsonField("schema", (v) => (v && typeof v === "object" && !Array.isArray(v) ? null
      : "The JSON schema must be an object")) : null,
    tools: route.tools ? jsonField("tools", (v) => (Array.isArray(v) ? null : "Tools must be a JSON array")) : null,
    toolChoice: $("tool-choice").value,
  });
  return { route: route.key, url: route.url(state.model), body, model: state.model, account: ACCOUNT,
           origin: location.origin, keyed: state.keyNeeded || Boolean(apiKey.get()) };
}

// ---- generating -----------------------------------------------------------------------------------------------
async function generate(rawPrompt = null) {
  let req;
  try {
    req = requestFor(state.history, rawPrompt);
  } catch (e) {
    notify(`Not sent: ${e.message}.`);
    return;
  }
  notify("");
  state.lastRequest = req;
  refreshCode();
  const reply = { role: "assistant", text: "", toolCalls: [], stats: null, state: "streaming", error: null,
                  raw: rawPrompt !== null };
  state.history.push(reply);
  const i = state.history.length - 1;
  conversation.update(i);
  const controller = new AbortController();
  const timer = new ReplyTimer();
  state.busy = controller;
  setBusy(true);
  let usage = null;
  let finish = req.route === "workers" ? "– (not in Workers AI streams)" : "–";
  try {
    await streamReply(req, controller.signal, reply.toolCalls, (u) => {
      if (u.progress) {
        timer.event();
        drawChart($("chart"), timer.points);
      }
      reply.text += u.text;
      usage = u.usage || usage;
      finish = u.finish || finish;
      reply.stats = timer.summary(usage, finish);
      conversation.update(i);
    });
    reply.state = "done";
  } catch (e) {
    if (e instanceof HttpError && e.status === 401) {
      state.history.pop();
      conversation.render();
      state.pending = () => generate(rawPrompt);
      askKey("The server asks for an API key: enter it to send.");
      return;
    }
    if (e.name === "AbortError") {
      reply.state = "stopped";
      finish = "stopped (you)";
    } else {
      reply.state = "error";
      reply.error = e.message;
    }
  } finally {
    state.busy = null;
    setBusy(false);
  }
  reply.stats = timer.summary(usage, finish);
  conversation.update(i);
  $("live-status").textContent = reply.state === "done" ? "" : reply.state;
}

function setBusy(busy) {
  $("send").disabled = busy;
  $("stop").disabled = !busy;
  $("live-status").textContent = busy ? "streaming…" : "";
  $("messages").setAttribute("aria-busy", String(busy));
  document.body.classList.toggle("busy", busy);
}

function send() {
  if (state.busy) return;
  const text = $("input").value;
  const raw = state.route.raw && $("raw").checked;
  if (!text.trim() && !attachments.items.length) return;
  if (raw && attachments.items.length) {
    notify("raw prompts are text only: remove the images or turn raw off.");
    return;
  }
  const message = { role: "user", text, images: raw ? [] : [...attachments.items], raw };
  try {
    requestFor([...state.history, message], raw ? text : null);     // nothing is taken from the composer
  } catch (e) {                                                       // unless it can be sent
    notify(`Not sent: ${e.message}.`);
    return;
  }
  if (!raw) attachments.take();
  state.history.push(message);
  $("input").value = "";
  conversation.update(state.history.length - 1);
  generate(raw ? text : null);
}

/** Whether the settings make a valid request, said to the user when not (before the conversation changes). */
function sendable() {
  try {
    requestFor([], null);
    return true;
  } catch (e) {
    notify(`Not sent: ${e.message}.`);
    return false;
  }
}

const conversation = new Conversation($("messages"), state.history, {
  busy: () => state.busy !== null,
  edit(i, text) {
    if (!sendable()) return;
    state.history.splice(i, state.history.length - i, { ...state.history[i], text });
    conversation.render();
    generate();
  },
  regenerate(i) {
    if (!sendable()) return;
    const prev = state.history[i - 1];
    state.history.splice(i);
    conversation.render();
    generate(prev && prev.raw ? prev.text : null);
  },
  answer(i, results) {
    if (!sendable()) return;
    state.history[i].toolCalls.forEach((c, k) => {
      state.history.push({ role: "tool", text: results[k], toolCallId: c.id || null, name: c.name });
    });
    conversation.render();
    generate();
  },
});

// ---- view code ------------------------------------------------------------------------------------------------
/** The last request sent on this route, or the one Send would make now. */
function refreshCode() {
  if ($("code-panel").hidden) return;
  const route = `${state.route.label} route`;
  if (state.lastRequest && state.lastRequest.route === state.route.key) {
    showCode(state.lastRequest, `The last request this page sent (${route})`);
    return;
  }
  const draft = $("input").value || "Hello!";
  const raw = state.route.raw && $("raw").checked;
  try {
    showCode(requestFor(raw ? [] : [...state.history, { role: "user", text: draft, images: attachments.items }],
                        raw ? draft : null), `The request Send would make now (${route})`);
  } catch (e) {
    $("code-what").textContent = `Cannot show the request: ${e.message}.`;
  }
}

// ---- set-up -------------------------------------------------------------------------------------------------
const controls = new Controls($("controls"), notify);
let attachments;

function selectRoute(key) {
  state.route = state.routes[key];
  controls.show(state.route);
  $("raw-row").hidden = !state.route.raw;
  $("tools-section").hidden = !state.route.tools;
  $("schema-section").hidden = !state.route.schema;
  document.body.dataset.route = key;
  refreshCode();
}

function wire() {
  $("composer").addEventListener("submit", (e) => {
    e.preventDefault();
    send();
  });
  $("input").addEventListener("keydown", (e) => {
    if (e.key === "Enter" && !e.shiftKey && !e.ctrlKey && !e.altKey && !e.metaKey && !e.isComposing) {
      e.preventDefault();
      send();
    }
  });
  $("input").addEventListener("input", refreshCode);
  $("stop").addEventListener("click", () => state.busy && state.busy.abort());
  $("new-chat").addEventListener("click", () => {
    if (state.busy) state.busy.abort();
    state.history.splice(0);
    conversation.render();
    drawChart($("chart"), []);
  });
  attachments.listen($("file"), $("input"), $("composer"));
  for (const radio of document.querySelectorAll("input[name=route]")) {
    radio.addEventListener("change", () => selectRoute(radio.value));
  }
  $("settings").addEventListener("input", refreshCode);
  $("key-button").addEventListener("click", () => askKey(""));
  $("key-form").addEventListener("submit", (e) => {
    e.preventDefault();
    apiKey.set($("key-input").value);
    $("key-input").value = "";
    $("key-form").hidden = true;
    notify("");
    const again = state.pending;
    state.pending = null;
    if (again) again();
    else probe();
  });
  $("key-forget").addEventListener("click", () => {
    apiKey.set(null);
    $("key-form").hidden = true;
  });
  $("code-button").addEventListener("click", () => {
    const panel = $("code-panel");
    panel.hidden = !panel.hidden;
    $("code-button").setAttribute("aria-expanded", String(!panel.hidden));
    refreshCode();
  });
  $("code-copy").addEventListener("click", () => {
    if (navigator.clipboard) {          // only in secure contexts (loopback or https)
      navigator.clipboard.writeText($("code-text").textContent);
    } else {
      getSelection().selectAllChildren($("code-text"));
      notify("Selected: copy with Ctrl+C (this page is not on a secure origin, so it cannot write the clipboard).");
    }
  });
  $("settings-button").addEventListener("click", () => {
    const open = document.body.classList.toggle("settings-open");
    $("settings-button").setAttribute("aria-expanded", String(open));
  });
  $("tools-example").addEventListener("click", () => {
    $("tools").value = JSON.stringify(TOOLS_EXAMPLE, null, 2);
    refreshCode();
  });
}

/** The one keyed call at load (and after a key is entered): is a key needed, and what is the context window? */
async function probe() {
  try {
    const models = await getJSON("/v1/models");
    state.model = state.model || models.data[0].id;
    const ctx = models.data[0].max_model_len;
    if (ctx) $("context").textContent = `Context window: ${ctx.toLocaleString("en")} tokens (prompt + max_tokens).`;
  } catch (e) {
    if (e instanceof HttpError && e.status === 401) askKey("");
    else notify(`GET /v1/models: ${e.message}`);
  }
}

async function main() {
  const [spec, limits, health] = await Promise.all([getJSON("/openapi.json"), getJSON("/limits"),
                                                    getJSON("/health").catch((e) => ({ status: e.message }))]);
  state.routes = { workers: describeRoute(spec, "workers"), openai: describeRoute(spec, "openai") };
  state.model = health.model;
  if (health.status !== "ok") notify(`The server is not ready (${health.status}); reload when it is.`);
  if (health.demo) {
    $("banner").textContent = "Demo checkpoint: this server runs random weights, so its answers are meaningless. "
      + "Start it with --model to use Mistral Small 3.1.";
    $("banner").hidden = false;
  }
  attachments = new Attachments($("attachments"), limits, notify,
                                () => state.history.flatMap((m) => m.images || []));
  $("limits").textContent = describeLimits(limits);
  wire();
  selectRoute(document.querySelector("input[name=route]:checked").value);
  drawChart($("chart"), []);
  await probe();
  document.body.dataset.ready = "true";
}

main().catch((e) => notify(`The playground could not start: ${e.message}`));
