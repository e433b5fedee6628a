// The sampling controls of the selected route, made from its request schema (routes.js): a labelled slider
// and number field for a bounded range, a number field otherwise, a checkbox for a flag, one stop string
// per line. A control is sent only once it is switched on (moving or typing switches it on); off, the server's
// default applies and the field shows it.

import { fmt, rangeText } from "./routes.js";

function el(tag, props = {}, ...children) {
  const e = Object.assign(document.createElement(tag), props);
  e.append(...children);
  return e;
}

export class Controls {
  constructor(container, notify) {
    this.container = container;
    this.notify = notify;         // (message) => shown to the user
    this.rows = new Map();        // name -> {c, on, input, slider}
    this.values = new Map();      // name -> value the user set, kept across route switches
  }

  /** Build the controls of `route`; a value set on the other route is kept when this route's range has it. */
  show(route) {
    for (const [name, row] of this.rows) {
      if (row.on.checked) this.values.set(name, this.read(row));
      else this.values.delete(name);
    }
    this.rows.clear();
    this.container.replaceChildren();
    const dropped = [];
    for (const c of route.controls) {
      const row = this.row(c);
      this.rows.set(c.name, row);
      this.container.append(row.node);
      if (this.values.has(c.name)) {
        const v = this.values.get(c.name);
        if (this.fits(c, v)) this.set(row, v);
        else dropped.push(`${c.name} ${Array.isArray(v) ? v.join(",") : v}`);
      }
    }
    const lost = [...this.values.keys()].filter((n) => !this.rows.has(n));
    if (dropped.length || lost.length) {
      this.notify(`The ${route.label} route ${[
        dropped.length ? `has other ranges: ${dropped.join(", ")} reset to the default` : "",
        lost.length ? `has no ${lost.join(", ")}` : ""].filter(Boolean).join("; ")}.`);
    }
  }

  fits(c, v) {
    if (c.kind !== "number") return true;
    return (c.lo === null || v >= c.lo) && (c.hi === null || v <= c.hi);
  }

  row(c) {
    const id = `ctl-${c.name}`;
    const on = el("input", { type: "checkbox", id: `${id}-on`, title: `Send ${c.name}` });
    on.setAttribute("aria-label", `Send ${c.name}`);
    const label = el("label", { htmlFor: c.kind === "flag" ? `${id}-on` : id, textContent: c.name,
                                title: c.description });
    const hint = el("span", { className: "hint", id: `${id}-hint` });
    const head = el("div", { className: "control-head" }, on, label, hint);
    const node = el("div", { className: `control control-${c.kind}` }, head);
    node.dataset.name = c.name;
    const row = { c, on, node, input: null, slider: null };
    if (c.kind === "number") {
      hint.textContent = rangeText(c);
      const input = el("input", { type: "number", id, step: c.integer ? "1" : "any" });
      if (c.lo !== null) input.min = String(c.lo);
      if (c.hi !== null) input.max = String(c.hi);
      input.setAttribute("aria-describedby", hint.id);
      row.input = input;
      const body = el("div", { className: "control-body" });
      if (c.slider) {
        const slider = el("input", { type: "range", id: `${id}-slider`, min: String(c.lo), max: String(c.hi),
                                     step: String(c.step) });
        slider.setAttribute("aria-label", `${c.name} slider`);
        slider.addEventListener("input", () => {
          input.value = slider.value;
          on.checked = true;
          this.mark(row);
        });
        row.slider = slider;
        body.append(slider);
      }
      body.append(input);
      node.append(body);
      input.addEventListener("input", () => {
        on.checked = input.value !== "";
        if (row.slider && input.value !== "") row.slider.value = input.value;
        this.mark(row);
      });
      this.reset(row);
    } else if (c.kind === "flag") {
      hint.textContent = c.description;
    } else {
      hint.textContent = c.maxItems ? `one per line, up to ${c.maxItems}` : "one per line";
      const input = el("textarea", { id, rows: 2 });
      input.setAttribute("aria-describedby", hint.id);
      input.addEventListener("input", () => {
        on.checked = input.value.trim() !== "";
        this.mark(row);
      });
      row.input = input;
      node.append(input);
    }
    on.addEventListener("change", () => {
      if (!on.checked && c.kind === "number") this.reset(row);
      this.mark(row);
    });
    this.mark(row);
    return row;
  }

  reset(row) {
    const d = row.c.default;
    row.input.value = d === null || d === undefined ? "" : fmt(d);
    row.input.placeholder = "default";
    if (row.slider) row.slider.value = String(d ?? (row.c.lo + row.c.hi) / 2);
  }

  set(row, v) {
    row.on.checked = true;
    if (row.c.kind === "number") {
      row.input.value = fmt(v);
      if (row.slider) row.slider.value = String(v);
    } else if (row.c.kind === "lines") {
      row.input.value = v.join("\n");
    }
    this.mark(row);
  }

  mark(row) {
    row.node.classList.toggle("is-on", row.on.checked);
  }

  read(row) {
    if (row.c.kind === "flag") return true;
    if (row.c.kind === "lines") return row.input.value.split("\n").filter((s) => s !== "");
    return Number(row.input.value);
  }

  /** The controls switched on, as body fields; throws with a readable message when a value is not valid. */
  params() {
    const out = {};
    for (const [name, row] of this.rows) {
      if (!row.on.checked) continue;
      const v = this.read(row);
      const c = row.c;
      if (c.kind === "number") {
        if (row.input.value.trim() === "" || !Number.isFinite(v) || (c.integer && !Number.isInteger(v))
            || !this.fits(c, v)) {
          throw new Error(`${name} must be ${c.integer ? "an integer" : "a number"} in ${rangeText(c)}`);
        }
      }
      if (c.kind === "lines" && c.maxItems && v.length > c.maxItems) {
        throw new Error(`${name}: at most ${c.maxItems} strings`);
      }
      if (c.kind === "lines" && v.length === 0) continue;
      out[name] = v;
    }
    return out;
  }
}

/** The JSON in a settings box (`id`), null when empty; a parse error or `check(value)`'s complaint is shown
 * under the box (`id`-error) and thrown. */
export function jsonField(id, check) {
  const text = document.getElementById(id).value.trim();
  const err = document.getElementById(`${id}-error`);
  err.hidden = true;
  if (!text) return null;
  let v;
  try {
    v = JSON.parse(text);
  } catch (e) {
    err.textContent = `Not valid JSON: ${e.message}`;
    err.hidden = false;
    throw new Error(`the ${id} box is not valid JSON`);
  }
  const problem = check(v);
  if (problem) {
    err.textContent = problem;
    err.hidden = false;
    throw new Error(problem);
  }
  return v;
}
