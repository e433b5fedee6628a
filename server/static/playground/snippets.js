// "View code": the exact request of the page as code, for the clients of its route. Workers AI: curl, Python
// requests, the cloudflare SDK, a Worker's env.AI.run; OpenAI: curl, Python requests, the openai SDK. The API
// key is never written out: snippets read MISTRAL_SMALL_API_KEY from the environment.

const KEY_ENV = "MISTRAL_SMALL_API_KEY";
// Keyword arguments the SDKs' methods take; other fields travel in extra_body.
const OPENAI_KWARGS = new Set(["model", "messages", "max_tokens", "max_completion_tokens", "temperature", "top_p",
  "seed", "frequency_penalty", "presence_penalty", "stop", "stream", "stream_options", "tools", "tool_choice",
  "response_format", "parallel_tool_calls", "logprobs", "top_logprobs", "n"]);
const CLOUDFLARE_KWARGS = new Set(["prompt", "messages", "raw", "stream", "max_tokens", "temperature", "top_p",
  "top_k", "seed", "repetition_penalty", "frequency_penalty", "presence_penalty", "tools", "response_format",
  "ignore_eos"]);

/** A JSON value as a Python literal (JSON string escapes are valid Python string escapes). */
export function py(v, indent = "") {
  if (v === null) return "None";
  if (v === true) return "True";
  if (v === false) return "False";
  if (typeof v !== "object") return JSON.stringify(v);
  const inner = `${indent}    `;
  if (Array.isArray(v)) {
    if (!v.length) return "[]";
    return `[\n${v.map((x) => inner + py(x, inner)).join(",\n")},\n${indent}]`;
  }
  const keys = Object.keys(v);
  if (!keys.length) return "{}";
  return `{\n${keys.map((k) => `${inner}${JSON.stringify(k)}: ${py(v[k], inner)}`).join(",\n")},\n${indent}}`;
}

function kwargs(body, allowed, indent) {
  const lines = [];
  const extra = {};
  for (const [k, v] of Object.entries(body)) {
    if (allowed.has(k)) lines.push(`${indent}${k}=${py(v, indent)},`);
    else extra[k] = v;
  }
  if (Object.keys(extra).length) lines.push(`${indent}extra_body=${py(extra, indent)},`);
  return lines.join("\n");
}

function curl(req) {
  const auth = req.keyed ? `  -H "Authorization: Bearer $${KEY_ENV}" \\\n` : "";
  // a quoted heredoc: the body goes verbatim, whatever its size or quotes
  return `curl -sN ${req.origin}${req.url} \\\n${auth}  -H "Content-Type: application/json" \\\n`
    + `  --data-binary @- <<'JSON'\n${JSON.stringify(req.body, null, 2)}\nJSON\n`;
}

function requestsPy(req) {
  const workers = req.route === "workers";
  const text = workers ? 'event.get("response", "")'
    : '(event["choices"][0]["delta"].get("content") or "") if event["choices"] else ""';
  const handle = req.body.stream
    ? `    for line in r.iter_lines(decode_unicode=True):
        if not line.startswith("data: ") or line == "data: [DONE]":
            continue
        event = json.loads(line[6:])
        if ${workers ? '"errors" in event' : '"error" in event'}:
            raise SystemExit(event)
        print(${text}, end="", flush=True)
print()`
    : "    print(r.json())";
  return `import json
import os

import requests

url = ${JSON.stringify(req.origin + req.url)}
headers = ${req.keyed ? `{"Authorization": "Bearer " + os.environ[${JSON.stringify(KEY_ENV)}]}` : "{}"}
body = ${py(req.body)}
with requests.post(url, json=body, headers=headers, stream=${req.body.stream ? "True" : "False"}) as r:
    r.raise_for_status()
${handle}
`;
}

function openaiPy(req) {
  const loop = req.body.stream
    ? `for chunk in response:
    if chunk.choices and chunk.choices[0].delta.content:
        print(chunk.choices[0].delta.content, end="", flush=True)
    if chunk.choices and chunk.choices[0].delta.tool_calls:
        print(chunk.choices[0].delta.tool_calls)
print()`
    : "print(response.choices[0].message)";
  return `import os

from openai import OpenAI

client = OpenAI(
    base_url=${JSON.stringify(`${req.origin}/v1`)},
    api_key=os.environ.get(${JSON.stringify(KEY_ENV)}, "unused"),
)
response = client.chat.completions.create(
${kwargs(req.body, OPENAI_KWARGS, "    ")}
)
${loop}
`;
}

function cloudflarePy(req) {
  const call = `cf.ai${req.body.stream ? ".with_streaming_response" : ""}.run(
    ${JSON.stringify(req.model)},
    account_id=${JSON.stringify(req.account)},
${kwargs(req.body, CLOUDFLARE_KWARGS, "    ")}
)`;
  // ai.run(stream=True) cannot parse a stream in the SDK: its streaming-response wrapper reads the events
  const use = req.body.stream ? `with ${call} as r:
    for line in r.iter_lines():
        print(line)` : `print(${call})`;
  return `import os

from cloudflare import Cloudflare

cf = Cloudflare(
    api_token=os.environ.get(${JSON.stringify(KEY_ENV)}, "unused"),
    base_url=${JSON.stringify(`${req.origin}/client/v4`)},
)
${use}
`;
}

function worker(req) {
  const body = JSON.stringify(req.body, null, 2).replaceAll("\n", "\n    ");
  const reply = req.body.stream
    ? 'return new Response(answer, { headers: { "content-type": "text/event-stream" } });'
    : "return Response.json(answer);";
  return `// A Worker with the Workers AI binding (wrangler.toml: [ai] binding = "AI")
export default {
  async fetch(request, env) {
    const answer = await env.AI.run(${JSON.stringify(req.model)}, ${body});
    ${reply}
  },
};
`;
}

export const SNIPPETS = {
  workers: [["curl", curl, "bash"], ["Python requests", requestsPy, "python"],
            ["cloudflare SDK", cloudflarePy, "python"], ["Worker", worker, "javascript"]],
  openai: [["curl", curl, "bash"], ["Python requests", requestsPy, "python"], ["openai SDK", openaiPy, "python"]],
};

/** [{name, lang, code}] for a request {route, origin, url, body, model, account, keyed}. */
export function snippets(req) {
  return SNIPPETS[req.route].map(([name, make, lang]) => ({ name, lang, code: make(req) }));
}
