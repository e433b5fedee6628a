// The conversation on screen: user turns (plain text and images, editable), assistant replies (Markdown,
// their source on demand, tool calls as cards to answer, stats, regenerate), tool results. Every piece of text
// is set with textContent; replies go through the Markdown renderer, which does the same.

import { renderMarkdown } from "./markdown.js";
import { statsList } from "./stats.js";

function el(tag, props = {}, ...children) {
  const e = Object.assign(document.createElement(tag), props);
  e.append(...children);
  return e;
}

function button(text, label, onClick) {
  const b = el("button", { type: "button", textContent: text });
  if (label) b.setAttribute("aria-label", label);
  b.addEventListener("click", onClick);
  return b;
}

function prettyArguments(text) {
  try {
    return JSON.stringify(JSON.parse(text), null, 2);
  } catch {
    return text;
  }
}

export class Conversation {
  /** handlers: {edit(i, text), regenerate(i), answer(i, results), busy()} */
  constructor(container, history, handlers) {
    this.container = container;
    this.history = history;
    this.handlers = handlers;
    this.nodes = [];
  }

  render() {
    this.nodes = this.history.map((m, i) => this.build(m, i));
    this.container.replaceChildren(...this.nodes);
  }

  /** Redraw message i (a streaming reply, after each event). */
  update(i) {
    const c = this.container;
    const following = c.scrollHeight - c.scrollTop - c.clientHeight < 80;    // the reader is at the end
    const node = this.build(this.history[i], i);
    if (this.nodes[i]) this.nodes[i].replaceWith(node);
    else c.append(node);
    this.nodes[i] = node;
    if (following) c.scrollTop = c.scrollHeight;
  }

  build(m, i) {
    const node = el("article", { className: `msg msg-${m.role}${m.raw ? " msg-raw" : ""}` });
    node.dataset.index = String(i);
    const who = { user: "You", assistant: "Assistant", tool: "Tool result" }[m.role] + (m.raw ? " (raw)" : "");
    const actions = el("div", { className: "actions" });
    node.append(el("header", {}, el("span", { className: "role", textContent: who }), actions));
    if (m.role === "user") this.user(m, i, node, actions);
    else if (m.role === "assistant") this.assistant(m, i, node, actions);
    else node.append(el("pre", { className: "body tool-body", textContent: m.text }));
    return node;
  }

  user(m, i, node, actions) {
    const body = el("div", { className: "body plain", textContent: m.text });
    node.append(body);
    if (m.images.length) {
      node.append(el("div", { className: "images" },
        ...m.images.map((img) => el("img", { src: img.url, alt: img.name, title: `${img.width}×${img.height}` }))));
    }
    if (m.raw) return;
    actions.append(button("Edit", `Edit message ${i + 1}`, () => {
      if (this.handlers.busy()) return;
      const box = el("textarea", { className: "edit-box", value: m.text,
                                   rows: Math.min(10, m.text.split("\n").length + 1) });
      box.setAttribute("aria-label", "Edit message");
      const bar = el("div", { className: "edit-actions" },
        button("Cancel", null, () => this.update(i)),
        button("Save & send", null, () => this.handlers.edit(i, box.value)));
      body.replaceWith(box, bar);
      actions.replaceChildren();
      box.focus();
    }));
  }

  assistant(m, i, node, actions) {
    const body = el("div", { className: "body markdown" });
    body.append(renderMarkdown(m.text));
    node.append(body);
    if (m.state === "streaming") node.classList.add("streaming");
    const source = el("pre", { className: "source", textContent: m.text, hidden: true });
    node.append(source);
    if (m.toolCalls.length) node.append(this.calls(m, i));
    if (m.error) node.append(el("p", { className: "error", role: "alert", textContent: m.error }));
    if (m.stats) node.append(statsList(m.stats));
    if (m.state === "streaming") return;
    const toggle = button("Source", `Show the source of reply ${i + 1}`, () => {
      source.hidden = !source.hidden;
      body.hidden = !source.hidden;
      toggle.setAttribute("aria-pressed", String(!source.hidden));
    });
    toggle.setAttribute("aria-pressed", "false");
    actions.append(toggle, button("Regenerate", `Regenerate reply ${i + 1}`, () => {
      if (!this.handlers.busy()) this.handlers.regenerate(i);
    }));
  }

  calls(m, i) {
    const open = m.state === "done" && i === this.history.length - 1;    // not answered yet
    const wrap = el("div", { className: "calls" });
    const boxes = m.toolCalls.map((c, k) => {
      const card = el("section", { className: "call-card" });
      card.setAttribute("aria-label", `Tool call ${c.name}`);
      card.append(el("h4", {}, el("span", { className: "call-name", textContent: c.name }),
                     el("span", { className: "call-id", textContent: c.id ? ` ${c.id}` : "" })),
                  el("pre", { className: "call-args", textContent: prettyArguments(c.arguments) }));
      let box = null;
      if (open) {
        box = el("textarea", { className: "call-result", rows: 2,
                               placeholder: "The function's result (text or JSON)" });
        box.setAttribute("aria-label", `Result of ${c.name} (call ${k + 1})`);
        card.append(box);
      }
      wrap.append(card);
      return box;
    });
    if (open) {
      wrap.append(button(m.toolCalls.length > 1 ? "Send results" : "Send result", null, () => {
        if (!this.handlers.busy()) this.handlers.answer(i, boxes.map((b) => b.value));
      }));
    }
    return wrap;
  }
}
