// A small Markdown renderer for model output. It builds DOM nodes and sets text with textContent only:
// model text never becomes HTML, so tags, event attributes and scripts in it stay visible text. Links are
// made only for absolute http(s) and mailto URLs; anything else (javascript:, data:, relative) stays text.
// Partial input is fine: an unclosed code fence renders as a code block so far (streaming).

const MAX_DEPTH = 6;          // nesting of quotes and emphasis; deeper input renders as text
const SAFE_PROTOCOLS = new Set(["http:", "https:", "mailto:"]);

function el(tag, cls) {
  const e = document.createElement(tag);
  if (cls) e.className = cls;
  return e;
}

export function safeHref(url) {
  let parsed;
  try {
    parsed = new URL(url);          // absolute URLs only: a relative one throws
  } catch {
    return null;
  }
  return SAFE_PROTOCOLS.has(parsed.protocol) ? parsed.href : null;
}

function link(href, text) {
  const a = el("a");
  a.href = href;
  a.rel = "noopener noreferrer nofollow";
  a.target = "_blank";
  a.textContent = text;
  return a;
}

// code spans, **bold**, __bold__, *em*, _em_, ~~strike~~, [text](url), bare http(s) URLs
const INLINE = new RegExp([
  /(`+)([^`]|[^`][\s\S]*?[^`])\1(?!`)/.source,
  /\*\*(?=\S)([\s\S]*?\S)\*\*/.source,
  /(?<!\w)__(?=\S)([\s\S]*?\S)__(?!\w)/.source,
  /\*(?=[^\s*])([^*]*?[^\s*])\*/.source,
  /(?<!\w)_(?=[^\s_])([^_]*?[^\s_])_(?!\w)/.source,
  /~~(?=\S)([\s\S]*?\S)~~/.source,
  /\[([^\]\n]*)\]\(\s*([^)\s]*)\s*\)/.source,
  /(https?:\/\/[^\s<>()]*[^\s<>().,;:!?'"*_~])/.source,
].join("|"), "g");

function inline(text, parent, depth) {
  if (depth > MAX_DEPTH) {
    parent.append(text);
    return;
  }
  let last = 0;
  for (const m of text.matchAll(INLINE)) {
    parent.append(text.slice(last, m.index));
    last = m.index + m[0].length;
    const [, ticks, code, strong1, strong2, em1, em2, del, label, url, bare] = m;
    if (ticks) {
      const c = el("code");
      c.textContent = code.length > 2 && code.startsWith(" ") && code.endsWith(" ") ? code.slice(1, -1) : code;
      parent.append(c);
    } else if (strong1 !== undefined || strong2 !== undefined) {
      const s = el("strong");
      inline(strong1 ?? strong2, s, depth + 1);
      parent.append(s);
    } else if (em1 !== undefined || em2 !== undefined) {
      const e = el("em");
      inline(em1 ?? em2, e, depth + 1);
      parent.append(e);
    } else if (del !== undefined) {
      const d = el("del");
      inline(del, d, depth + 1);
      parent.append(d);
    } else if (label !== undefined) {
      const href = safeHref(url);
      parent.append(href ? link(href, label || url) : m[0]);
    } else {
      const href = safeHref(bare);
      parent.append(href ? link(href, bare) : bare);
    }
  }
  parent.append(text.slice(last));
}

function paragraph(lines, depth) {
  const p = el("p");
  lines.forEach((line, i) => {
    if (i) p.append(el("br"));
    inline(line, p, depth);
  });
  return p;
}

const FENCE = /^ {0,3}(`{3,}|~{3,})\s*([\w+#.-]*)/;
const HEADING = /^ {0,3}(#{1,6})\s+(.*?)\s*#*\s*$/;
const RULE = /^ {0,3}([-*_])(\s*\1){2,}\s*$/;
const QUOTE = /^ {0,3}> ?(.*)$/;
const ITEM = /^\s*(?:([-*+])|(\d{1,9})[.)])\s+(.*)$/;

function blocks(lines, depth) {
  const out = document.createDocumentFragment();
  let i = 0;
  while (i < lines.length) {
    const line = lines[i];
    let m;
    if ((m = line.match(FENCE))) {
      const fence = m[1];
      const body = [];
      i++;
      while (i < lines.length && !(lines[i].trimStart().startsWith(fence[0].repeat(fence.length))
                                   && lines[i].trim().replaceAll(fence[0], "") === "")) {
        body.push(lines[i++]);
      }
      i++;      // the closing fence (or the end of a stream still running)
      const pre = el("pre");
      if (m[2]) {
        const tag = el("span", "lang");
        tag.textContent = m[2];
        pre.append(tag);
      }
      const code = el("code");
      code.textContent = body.join("\n");
      pre.append(code);
      out.append(pre);
    } else if ((m = line.match(HEADING))) {
      const h = el(`h${Math.min(m[1].length + 2, 6)}`);
      inline(m[2], h, depth);
      out.append(h);
      i++;
    } else if (RULE.test(line)) {
      out.append(el("hr"));
      i++;
    } else if (QUOTE.test(line) && depth < MAX_DEPTH) {
      const inner = [];
      while (i < lines.length && (m = lines[i].match(QUOTE))) {
        inner.push(m[1]);
        i++;
      }
      const q = el("blockquote");
      q.append(blocks(inner, depth + 1));
      out.append(q);
    } else if ((m = line.match(ITEM))) {
      const ordered = m[2] !== undefined;
      const list = el(ordered ? "ol" : "ul");
      if (ordered && m[2] !== "1") list.start = Number(m[2]);
      while (i < lines.length && (m = lines[i].match(ITEM)) && (m[2] !== undefined) === ordered) {
        const li = el("li");
        inline(m[3], li, depth);
        list.append(li);
        i++;
      }
      out.append(list);
    } else if (line.trim() === "") {
      i++;
    } else {
      const para = [];
      while (i < lines.length && lines[i].trim() !== "" && !FENCE.test(lines[i]) && !HEADING.test(lines[i])
             && !QUOTE.test(lines[i]) && !ITEM.test(lines[i]) && !RULE.test(lines[i])) {
        para.push(lines[i++]);
      }
      if (para.length === 0) para.push(lines[i++]);    // a line only a deeper quote level would take
      out.append(paragraph(para, depth));
    }
  }
  return out;
}

/** Markdown text -> a DocumentFragment of inert nodes. */
export function renderMarkdown(text) {
  return blocks(text.replace(/\r\n?/g, "\n").split("\n"), 0);
}
