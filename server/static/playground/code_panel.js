// The "view code" panel: one tab per client of the request's route (snippets.js), the chosen one's code below.

import { snippets } from "./snippets.js";

let tab = 0;          // kept across redraws: the reader stays on the client they chose

/** Draw the panel for `req` ({route, origin, url, body, model, account, keyed}); `what` says which request. */
export function showCode(req, what) {
  const $ = (id) => document.getElementById(id);
  const list = snippets(req);
  tab = Math.min(tab, list.length - 1);
  $("code-what").textContent = `${what}. The API key is read from MISTRAL_SMALL_API_KEY, never written here.`;
  $("code-tabs").replaceChildren(...list.map((s, k) => {
    const b = document.createElement("button");
    b.type = "button";
    b.role = "tab";
    b.textContent = s.name;
    b.setAttribute("aria-selected", String(k === tab));
    b.addEventListener("click", () => {
      tab = k;
      showCode(req, what);
    });
    return b;
  }));
  $("code-text").textContent = list[tab].code;
  $("code-text").dataset.lang = list[tab].lang;
}
