// The console's shell: sign in, find out what the key may do, and route #/page/... to a page.

import { api, ApiError, session } from "./api.js";
import { announce, errorBox, h } from "./dom.js";
import * as fineTuning from "./fine_tuning.js";
import * as playground from "./playground.js";
import * as tasks from "./tasks.js";

const PAGES = { tasks, playground, "fine-tuning": fineTuning };
const $ = (id) => document.getElementById(id);
let cleanup = null;
let routed = 0; // which route() call is the latest: an older one that finishes late is dropped

// What the key may do: every admin route answers 403 to a client key.
async function whoAmI() {
  const info = await api("/v1/info");
  let role = "admin";
  try {
    await api("/v1/tasks?limit=1");
  } catch (e) {
    if (!(e instanceof ApiError && e.status === 403)) throw e;
    role = "client";
  }
  return { info, role };
}

let context = null;

async function signIn(key) {
  session.set(key);
  try {
    context = await whoAmI();
  } catch (e) {
    session.clear();
    throw e;
  }
}

function showLogin(message) {
  context = null;
  $("login").hidden = false;
  $("page").hidden = true;
  $("nav").hidden = true;
  $("who").hidden = true;
  $("login-error").textContent = message || "";
  $("key").focus();
}

function parseHash() {
  const [path, query] = location.hash.replace(/^#\/?/, "").split("?");
  const parts = path.split("/").filter(Boolean).map(decodeURIComponent);
  return { page: parts[0] || "tasks", rest: parts.slice(1), params: new URLSearchParams(query || "") };
}

async function route() {
  if (!context) return;
  if (cleanup) cleanup();
  cleanup = null;
  const { page, rest, params } = parseHash();
  const module = PAGES[page] || tasks;
  for (const a of document.querySelectorAll("#nav a")) {
    if (a.dataset.page === page) a.setAttribute("aria-current", "page");
    else a.removeAttribute("aria-current");
  }
  const mine = ++routed;
  const root = h("div"); // a page of its own: a late render of an older route lands nowhere
  $("page").replaceChildren(root);
  $("login").hidden = true;
  $("page").hidden = false;
  $("nav").hidden = false;
  $("who").hidden = false;
  $("role").textContent = context.role === "admin" ? "admin key" : "client key";
  try {
    const stop = (await module.render(root, { rest, params, ...context })) || null;
    if (mine !== routed) {
      if (stop) stop();
      return;
    }
    cleanup = stop;
  } catch (e) {
    if (mine !== routed) return;
    if (e instanceof ApiError && e.status === 401) return showLogin("The key was refused: sign in again.");
    root.append(errorBox(e));
  }
  const title = root.querySelector("h1");
  document.title = `${title ? title.textContent : "rankone"} · rankone console`;
  if (title) announce(title.textContent);
}

$("login-form").addEventListener("submit", async (event) => {
  event.preventDefault();
  const button = event.submitter || event.target.querySelector("button");
  button.disabled = true;
  $("login-error").textContent = "";
  try {
    await signIn($("key").value);
    $("key").value = "";
    await route();
    $("main").focus();
  } catch (e) {
    showLogin(e instanceof ApiError && e.status === 401 ? `${e.message}` : String(e.message || e));
  } finally {
    button.disabled = false;
  }
});

$("logout").addEventListener("click", () => {
  if (cleanup) cleanup();
  cleanup = null;
  routed += 1;
  session.clear();
  $("page").replaceChildren();
  showLogin("Signed out.");
});

window.addEventListener("hashchange", () => route().then(() => $("main").focus()));

(async () => {
  if (!session.has()) return showLogin();
  try {
    await signIn(session.key());
    await route();
  } catch (e) {
    showLogin(String(e.message || e));
  }
})();
