// The two routes the page can talk to, and their controls as the server's own /openapi.json describes them:
// ranges, defaults and descriptions are read from the request schemas at load time, never restated here.

export const ACCOUNT = "local";

// The controls the page offers, in display order; a route shows those its request schema has.
const NUMERIC = ["max_tokens", "temperature", "top_p", "top_k", "seed", "repetition_penalty", "frequency_penalty",
                 "presence_penalty", "min_tokens"];
const FLAGS = ["ignore_eos"];
const SLIDER_SPAN = 100;      // a bounded range this wide or narrower is a slider; wider ones are number fields

export const ROUTES = {
  workers: {
    label: "Workers AI",
    specPath: "/client/v4/accounts/{account_id}/ai/run/{model}",
    url: (model) => `/client/v4/accounts/${ACCOUNT}/ai/run/${model}`,
  },
  openai: {
    label: "OpenAI",
    specPath: "/v1/chat/completions",
    url: () => "/v1/chat/completions",
  },
};

function resolve(spec, node) {
  while (node && node.$ref) node = spec.components.schemas[node.$ref.split("/").pop()];
  return node;
}

/** The non-null branch of an optional property, with the property's own default and description. */
function field(spec, prop) {
  const branches = prop.anyOf ? prop.anyOf.map((b) => resolve(spec, b)) : [resolve(spec, prop)];
  const typed = branches.find((b) => b && b.type && b.type !== "null") || {};
  return { ...typed, default: prop.default ?? null, description: prop.description || typed.description || "" };
}

function control(name, f) {
  const integer = f.type === "integer";
  // JSON numbers past 2^53 lose digits in JavaScript: integer fields stop at what the page sends exactly
  const safe = Number.MAX_SAFE_INTEGER;
  const exact = (v) => (integer && v !== null ? Math.max(-safe, Math.min(safe, v)) : v);
  const lo = exact(f.minimum ?? null);
  const hi = exact(f.maximum ?? null);
  const slider = lo !== null && hi !== null && hi - lo <= SLIDER_SPAN;
  return { name, kind: "number", integer, lo, hi, default: f.default, slider, step: integer ? 1 : 0.01,
           description: f.description };
}

/** What a route's request schema offers the page: its numeric and boolean controls, and its other features. */
export function describeRoute(spec, key) {
  const op = spec.paths[ROUTES[key].specPath].post;
  const body = resolve(spec, op.requestBody.content["application/json"].schema);
  const props = body.properties;
  const controls = [];
  for (const name of NUMERIC) {
    if (props[name]) controls.push(control(name, field(spec, props[name])));
  }
  for (const name of FLAGS) {
    if (props[name]) {
      const f = field(spec, props[name]);
      controls.push({ name, kind: "flag", default: f.default ?? false, description: f.description });
    }
  }
  if (props.stop) {
    controls.push({ name: "stop", kind: "lines", maxItems: field(spec, props.stop).maxItems ?? null,
                    description: props.stop.description || "" });
  }
  return { key, ...ROUTES[key], controls, raw: "raw" in props, tools: "tools" in props,
           toolChoice: "tool_choice" in props, schema: "response_format" in props,
           streamOptions: "stream_options" in props, model: "model" in props };
}

/** Shortest text for a number: 0.15, 5, 9999999999. */
export function fmt(v) {
  return Number.isInteger(v) ? String(v) : String(Number(v.toFixed(6)));
}

export function rangeText(c) {
  const span = c.lo !== null && c.hi !== null ? `${fmt(c.lo)}–${fmt(c.hi)}`
    : c.lo !== null ? `≥ ${fmt(c.lo)}` : c.hi !== null ? `≤ ${fmt(c.hi)}` : "any";
  return c.default !== null && c.default !== undefined ? `${span}, default ${fmt(c.default)}` : span;
}
