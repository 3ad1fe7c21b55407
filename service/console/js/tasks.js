// Tasks: the registry with search and paging, and one task's page (prompt, factors, traffic).

import { api, listModels } from "./api.js";
import { errorBox, facts, h, scrollBox } from "./dom.js";
import { OTHER, trafficByTask } from "./traffic.js";

const PAGE = 20;

export async function render(root, ctx) {
  return ctx.rest.length ? renderTask(root, ctx, ctx.rest[0]) : renderList(root, ctx);
}

async function pageOf(ctx, q, offset) {
  if (ctx.role === "admin") {
    const query = new URLSearchParams({ offset, limit: PAGE });
    if (q) query.set("q", q);
    return api(`/v1/tasks?${query}`);
  }
  // a client key may not read the registry; /v1/models lists the tasks it may use
  const matching = (await listModels()).tasks.filter((id) => id.includes(q));
  const tasks = matching.slice(offset, offset + PAGE).map((name) => ({ name }));
  const next = offset + PAGE < matching.length ? offset + PAGE : null;
  return { tasks, total: matching.length, offset, next_offset: next };
}

function number(n) {
  return n === undefined ? "—" : Number(n).toLocaleString("en");
}

async function renderList(root, ctx) {
  const q = ctx.params.get("q") || "";
  const offset = Math.max(0, Number(ctx.params.get("offset")) || 0);
  const search = h("input", { id: "task-search", type: "search", name: "q", value: q, autocomplete: "off" });
  const form = h(
    "form",
    { class: "toolbar", role: "search", onsubmit: (e) => { e.preventDefault(); go(search.value.trim(), 0); } },
    h("label", { for: "task-search" }, "Search task names"),
    search,
    h("button", { type: "submit" }, "Search"),
  );
  root.append(h("h1", {}, "Tasks"), form);
  if (ctx.role !== "admin") {
    root.append(h("p", { class: "hint" }, "A client key lists the tasks it may use; their details need an admin key."));
  }
  const [page, traffic] = await Promise.all([pageOf(ctx, q, offset), trafficByTask().catch(() => null)]);
  const first = page.total ? offset + 1 : 0;
  const last = offset + page.tasks.length;
  const caption = `Tasks ${first}–${last} of ${page.total}${q ? ` matching “${q}”` : ""}`;
  const none = traffic && traffic.labelled ? { requests: 0, errors: 0 } : {};
  const counts = (name) => (traffic && traffic.byTask.get(name)) || none;
  const admin = ctx.role === "admin";
  const table = h(
    "table",
    { class: "tasks" },
    h("caption", {}, caption),
    h(
      "thead",
      {},
      h("tr", {}, h("th", { scope: "col" }, "Task"),
        admin && [h("th", { scope: "col", class: "wide" }, "Shared prompt"), h("th", { scope: "col", class: "num" }, "Rank"),
          h("th", { scope: "col", class: "num" }, "L"), h("th", { scope: "col", class: "num wide" }, "Version")],
        h("th", { scope: "col", class: "num" }, "Requests"), h("th", { scope: "col", class: "num" }, "Errors")),
    ),
    h(
      "tbody",
      {},
      page.tasks.map((t) =>
        h("tr", {},
          h("th", { scope: "row" }, h("a", { href: `#/tasks/${encodeURIComponent(t.name)}` }, t.name),
            t.description ? h("span", { class: "desc" }, t.description) : null),
          admin && [h("td", { class: "wide" }, t.shared), h("td", { class: "num" }, t.rank), h("td", { class: "num" }, t.length),
            h("td", { class: "num wide" }, t.version)],
          h("td", { class: "num" }, number(counts(t.name).requests)),
          h("td", { class: "num" }, number(counts(t.name).errors)),
        ),
      ),
    ),
  );
  const pager = h(
    "nav",
    { class: "pager", "aria-label": "Task pages" },
    h("button", { type: "button", disabled: offset === 0, onclick: () => go(q, Math.max(0, offset - PAGE)) }, "Previous"),
    h("span", {}, caption),
    h("button", { type: "button", disabled: page.next_offset == null, onclick: () => go(q, page.next_offset) }, "Next"),
  );
  root.append(scrollBox(table), pager);
  if (!page.tasks.length) root.append(h("p", {}, q ? "No task matches." : "No tasks yet."));
  if (traffic && !traffic.labelled) {
    root.append(h("p", { class: "hint" }, "Per-task traffic is off on this server (RANKONE_METRICS_TASK_LABELS=0)."));
  }
}

function go(q, offset) {
  const query = new URLSearchParams();
  if (q) query.set("q", q);
  if (offset) query.set("offset", offset);
  location.hash = `#/tasks${query.size ? `?${query}` : ""}`;
}

async function renderTask(root, ctx, name) {
  root.append(
    h("p", { class: "crumbs" }, h("a", { href: "#/tasks" }, "Tasks"), " / ", name),
    h("h1", {}, name),
    h("p", {}, h("a", { class: "button", href: `#/playground?left=${encodeURIComponent(name)}` }, "Open in the playground")),
  );
  const traffic = trafficByTask().catch((e) => e);
  if (ctx.role === "admin") {
    const task = await api(`/v1/tasks/${encodeURIComponent(name)}`);
    const shared = await api(`/v1/shared-prompts/${encodeURIComponent(task.shared)}`).catch((e) => e);
    if (task.description) root.append(h("p", { class: "lead" }, task.description));
    root.append(
      h("section", { "aria-labelledby": "h-prompt" }, h("h2", { id: "h-prompt" }, "Prompt"),
        facts([
          ["Shared prompt", shared instanceof Error ? task.shared
            : `${task.shared} (version ${shared.version}, [L, d] = [${shared.length}, ${shared.dim}])`],
          ...(shared instanceof Error || !shared.description ? [] : [["About the shared prompt", shared.description]]),
          ["Rank r", task.rank],
          ["Prompt length L", task.length],
          ["Width d", task.dim],
          ["Numbers in the task", `${number((task.length + task.dim) * task.rank)} (u [L, r] and v [r, d])`],
        ]),
        shared instanceof Error ? errorBox(shared) : null),
      h("section", { "aria-labelledby": "h-versions" }, h("h2", { id: "h-versions" }, "Versions"),
        await versions(task)),
      h("section", { "aria-labelledby": "h-params" }, h("h2", { id: "h-params" }, "Default parameters"),
        json(task.parameters, "None: the server's defaults apply.")),
      h("section", { "aria-labelledby": "h-meta" }, h("h2", { id: "h-meta" }, "Metadata"),
        json(task.metadata, "None.")),
    );
  } else {
    root.append(h("p", { class: "hint" }, "The task's prompt, versions and metadata need an admin key."));
  }
  const counts = await traffic;
  const section = h("section", { "aria-labelledby": "h-traffic" }, h("h2", { id: "h-traffic" }, "Traffic"));
  if (counts instanceof Error) section.append(errorBox(counts));
  else {
    const c = counts.byTask.get(name);
    const other = counts.byTask.get(OTHER);
    section.append(
      facts([
        ["Requests", number(c ? c.requests : 0)],
        ["Errors", number(c ? c.errors : 0)],
        ["Prompt tokens", number(c ? c.promptTokens : 0)],
        ["Generated tokens", number(c ? c.generatedTokens : 0)],
      ]),
      h("p", { class: "hint" },
        "Since this server process started (its /metrics).",
        !counts.labelled ? " Per-task traffic is off on this server." : "",
        !c && other ? " Tasks past the server's label limit are counted together as “_other”." : ""),
    );
  }
  root.append(section);
}

async function versions(task) {
  let history;
  try {
    history = (await api(`/v1/tasks/${encodeURIComponent(task.name)}/versions`)).versions;
  } catch (e) {
    return errorBox(e);
  }
  const table = h("table", {},
    h("caption", { class: "sr-only" }, "Versions of the task, newest first"),
    h("thead", {}, h("tr", {}, h("th", { scope: "col" }, "Version"), h("th", { scope: "col" }, "Written"),
      h("th", { scope: "col", class: "wide" }, "Shared prompt"), h("th", { scope: "col", class: "wide" }, "Rank"),
      h("th", { scope: "col" }, "Description / job"))),
    h("tbody", {}, history.map((v) => h("tr", {},
      h("td", {}, v.version, v.version === task.version ? " (current)" : ""),
      h("td", {}, stamp(v.written)), h("td", { class: "wide" }, v.shared || "—"), h("td", { class: "wide" }, v.rank ?? "—"),
      h("td", {}, v.fine_tuning_job ? `job ${v.fine_tuning_job}` : v.description || "—")))));
  return [scrollBox(table), h("p", { class: "hint" }, `Created ${stamp(task.created)}.`)];
}

function stamp(iso) {
  return iso ? iso.replace("T", " ") : "—";
}

function json(value, empty) {
  if (!value || !Object.keys(value).length) return h("p", {}, empty);
  return h("pre", { class: "json", tabindex: 0 }, JSON.stringify(value, null, 2));
}
