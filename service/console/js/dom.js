// Tiny DOM helpers: every text goes in through textContent, never as HTML.

export function h(tag, attrs = {}, ...children) {
  const el = document.createElement(tag);
  setAttrs(el, attrs);
  append(el, children);
  return el;
}

export function svg(tag, attrs = {}, ...children) {
  const el = document.createElementNS("http://www.w3.org/2000/svg", tag);
  setAttrs(el, attrs);
  append(el, children);
  return el;
}

function setAttrs(el, attrs) {
  for (const [k, v] of Object.entries(attrs || {})) {
    if (v === undefined || v === null || v === false) continue;
    if (k.startsWith("on") && typeof v === "function") el.addEventListener(k.slice(2), v);
    else if (k === "class") el.setAttribute("class", v);
    else el.setAttribute(k, v === true ? "" : String(v));
  }
}

function append(el, children) {
  for (const c of children.flat(Infinity)) {
    if (c === null || c === undefined || c === false) continue;
    el.append(c instanceof Node ? c : String(c));
  }
}

// A table that may be wider than a phone: it scrolls in its box, which the keyboard can reach.
export function scrollBox(table) {
  const caption = table.querySelector("caption");
  return h("div", { class: "scroll", tabindex: 0, role: "region", "aria-label": caption ? caption.textContent : "table" }, table);
}

// A <dl> of [term, value] pairs; values may be nodes.
export function facts(pairs) {
  return h("dl", { class: "facts" }, pairs.map(([k, v]) => [h("dt", {}, k), h("dd", {}, v)]));
}

export function announce(text) {
  const status = document.getElementById("status");
  status.textContent = "";
  requestAnimationFrame(() => (status.textContent = text));
}

export function errorBox(error) {
  return h("p", { class: "error", role: "alert" }, messageOf(error));
}

export function messageOf(error) {
  if (error && error.status) return `${error.status} ${error.code}: ${error.message}`;
  return String(error && error.message ? error.message : error);
}

export function when(seconds) {
  if (!seconds) return "";
  return new Date(seconds * 1000).toISOString().replace("T", " ").replace(/\.\d+Z$/, "Z");
}
