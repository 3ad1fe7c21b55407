// Fine-tuning: upload a file, create a job, watch its events and loss chart, cancel it, and open
// its task in the playground. Routes: /v1/files, /v1/shared-prompts, /v1/fine_tuning/jobs.

import { api } from "./api.js";
import { lossChart } from "./chart.js";
import { announce, errorBox, facts, h, messageOf, scrollBox, when } from "./dom.js";

const TERMINAL = new Set(["succeeded", "failed", "cancelled"]);
const POLL_MS = 1000;
const SHOWN_EVENTS = 200; // the newest in the log; the chart draws them all

export async function render(root, ctx) {
  if (ctx.role !== "admin") {
    root.append(h("h1", {}, "Fine-tuning"), h("p", {}, "Fine-tuning jobs need an admin key."));
    return null;
  }
  return ctx.rest.length ? renderJob(root, ctx.rest[0]) : renderHome(root);
}

// "invalid fine-tuning file: line 2: ...; line 5: ..." → one entry per problem
export function problems(message) {
  const body = message.replace(/^invalid fine-tuning file:\s*/, "");
  return body.split(/;\s+(?=line \d+:|\.\.\. and \d+ more)/);
}

function uploadForm(onUploaded) {
  const file = h("input", { id: "upload-file", name: "file", type: "file", accept: ".jsonl,application/jsonl,text/plain", required: true });
  const result = h("div", { id: "upload-result", "aria-live": "polite" });
  const form = h("form", { class: "card", "aria-labelledby": "h-upload" },
    h("h2", { id: "h-upload" }, "1. Upload a training file"),
    h("p", { class: "hint" }, "JSONL, one example a line: {\"input\": …, \"target\": …} or {\"messages\": […]}."),
    h("div", { class: "field" }, h("label", { for: "upload-file" }, "File"), file),
    h("button", { type: "submit" }, "Upload"), result);
  form.addEventListener("submit", async (e) => {
    e.preventDefault();
    if (!file.files.length) return;
    const body = new FormData();
    body.append("purpose", "fine-tune");
    body.append("file", file.files[0]);
    result.replaceChildren(h("p", {}, "Uploading…"));
    try {
      const meta = await api("/v1/files", { method: "POST", form: body });
      result.replaceChildren(h("p", { class: "ok" },
        `Uploaded ${meta.filename}: ${meta.rankone.examples} examples (${meta.rankone.format}), id ${meta.id}.`));
      onUploaded(meta);
    } catch (err) {
      const lines = err.status === 422 ? problems(err.message) : [messageOf(err)];
      result.replaceChildren(h("div", { role: "alert", class: "error" },
        h("p", {}, `The server refused ${file.files[0].name}:`),
        h("ul", { class: "problems" }, lines.map((l) => h("li", {}, l)))));
    }
  });
  return form;
}

function fileOptions(files, withNone) {
  if (!files.length && !withNone) return h("option", { value: "" }, "upload a file first");
  return [withNone ? h("option", { value: "" }, "none (no validation loss)") : null,
    files.map((f) => h("option", { value: f.id }, `${f.filename} (${f.id})`))];
}

function jobForm(shared, files) {
  const sel = (id, label, options) => h("div", { class: "field" }, h("label", { for: id }, label), h("select", { id, name: id }, options));
  const num = (id, label, attrs) => h("div", { class: "field" }, h("label", { for: id }, label), h("input", { id, name: id, type: "number", ...attrs }));
  const result = h("div", { "aria-live": "polite" });
  const form = h("form", { class: "card", "aria-labelledby": "h-create" },
    h("h2", { id: "h-create" }, "2. Create a job"),
    sel("job-model", "Shared prompt to adapt from", shared.map((s) => h("option", { value: s.id }, `${s.id} (L ${s.length})`))),
    sel("job-training", "Training file", fileOptions(files, false)),
    sel("job-validation", "Validation file", fileOptions(files, true)),
    h("div", { class: "field" }, h("label", { for: "job-suffix" }, "New task name"),
      h("input", { id: "job-suffix", name: "suffix", required: true, pattern: "[a-z0-9][a-z0-9._\\-]{0,63}", autocomplete: "off", "aria-describedby": "suffix-help" }),
      h("p", { id: "suffix-help", class: "hint" }, "Lowercase letters, digits, . _ - (up to 64).")),
    h("div", { class: "grid" },
      num("job-epochs", "Epochs", { min: 1, max: 100, placeholder: "auto" }),
      num("job-steps", "Steps (overrides epochs)", { min: 1, placeholder: "auto" }),
      num("job-batch", "Batch size", { min: 1, max: 256, placeholder: "auto" }),
      num("job-lr", "Learning-rate multiplier", { min: 0.01, max: 10, step: 0.01, placeholder: "auto" }),
      num("job-eval", "Validate every N steps", { min: 0, value: 0, "aria-describedby": "eval-help" }),
      num("job-seed", "Seed", { min: 0, placeholder: "none" })),
    h("p", { id: "eval-help", class: "hint" }, "0 validates once, at the end; more points draw the validation curve."),
    h("div", { class: "field check" }, h("input", { id: "job-replace", name: "replace", type: "checkbox" }),
      h("label", { for: "job-replace" }, "Replace the task if it exists (a new version)")),
    h("button", { type: "submit" }, "Create job"), result);
  form.addEventListener("submit", async (e) => {
    e.preventDefault();
    const v = (id) => form.querySelector(`#${id}`).value.trim();
    const hyper = {};
    if (v("job-epochs")) hyper.n_epochs = Number(v("job-epochs"));
    if (v("job-steps")) hyper.steps = Number(v("job-steps"));
    if (v("job-batch")) hyper.batch_size = Number(v("job-batch"));
    if (v("job-lr")) hyper.learning_rate_multiplier = Number(v("job-lr"));
    const body = { model: v("job-model"), training_file: v("job-training"), suffix: v("job-suffix"), hyperparameters: hyper,
      rankone: { eval_every: Number(v("job-eval") || 0), replace: form.querySelector("#job-replace").checked } };
    if (v("job-validation")) body.validation_file = v("job-validation");
    if (v("job-seed")) body.seed = Number(v("job-seed"));
    try {
      const job = await api("/v1/fine_tuning/jobs", { method: "POST", json: body });
      location.hash = `#/fine-tuning/${encodeURIComponent(job.id)}`;
    } catch (err) {
      result.replaceChildren(errorBox(err));
    }
  });
  return form;
}

function jobsTable(jobs) {
  if (!jobs.length) return h("p", {}, "No jobs yet.");
  return scrollBox(h("table", {},
    h("caption", { class: "sr-only" }, "Fine-tuning jobs, newest first"),
    h("thead", {}, h("tr", {}, ["Job", "Task", "Status", "Created"].map((t) => h("th", { scope: "col" }, t)))),
    h("tbody", {}, jobs.map((j) => h("tr", {},
      h("th", { scope: "row" }, h("a", { href: `#/fine-tuning/${encodeURIComponent(j.id)}` }, j.id)),
      h("td", {}, j.fine_tuned_model || (j.rankone && j.rankone.task) || "—"),
      h("td", {}, h("span", { class: `status ${j.status}` }, j.status)),
      h("td", {}, when(j.created_at)))))));
}

async function renderHome(root) {
  root.append(h("h1", {}, "Fine-tuning"));
  const [shared, files, jobs] = await Promise.all([
    api("/v1/shared-prompts"), api("/v1/files?purpose=fine-tune"), api("/v1/fine_tuning/jobs?limit=20"),
  ]);
  const holder = h("div");
  const files_ = files.data;
  const drawJobForm = () => holder.replaceChildren(jobForm(shared.shared_prompts, files_));
  drawJobForm();
  root.append(
    h("div", { class: "columns" },
      uploadForm((meta) => { files_.unshift(meta); drawJobForm(); holder.querySelector("#job-training").value = meta.id; }),
      holder),
    h("section", { "aria-labelledby": "h-jobs" }, h("h2", { id: "h-jobs" }, "Jobs"), jobsTable(jobs.data)));
  return null;
}

function lossSeries(events) {
  const train = [];
  const valid = [];
  for (const e of [...events].reverse()) { // the API lists the newest first
    const d = e.data || {};
    if (typeof d.step !== "number") continue;
    if (typeof d.train_loss === "number") train.push([d.step, d.train_loss]);
    if (typeof d.valid_loss === "number") valid.push([d.step, d.valid_loss]);
  }
  return [
    { name: "train loss", points: train },
    { name: "validation loss", points: valid, dashed: true, dots: true },
  ];
}

function describe(series) {
  const parts = series.filter((s) => s.points.length).map((s) => {
    const first = s.points[0];
    const last = s.points[s.points.length - 1];
    return `${s.name} ${first[1].toFixed(3)} at step ${first[0]} to ${last[1].toFixed(3)} at step ${last[0]}`;
  });
  return parts.length ? `Loss chart: ${parts.join("; ")}` : "Loss chart: no loss reported yet";
}

async function renderJob(root, id) {
  root.append(h("p", { class: "crumbs" }, h("a", { href: "#/fine-tuning" }, "Fine-tuning"), " / ", id),
    h("h1", {}, "Job ", h("code", { class: "id" }, id)));
  const summary = h("div");
  const actions = h("div", { class: "actions" });
  const chartBox = h("figure", { class: "chart-box" });
  const log = h("ol", { class: "events", "aria-label": "Job events, newest first" });
  root.append(summary, actions,
    h("section", { "aria-labelledby": "h-loss" }, h("h2", { id: "h-loss" }, "Loss"), chartBox),
    h("section", { "aria-labelledby": "h-events" }, h("h2", { id: "h-events" }, "Events"), log));
  let timer = null;
  let stopped = false;
  let lastStatus = null;
  let series = lossSeries([]);
  // the chart is drawn at its box's width, so its text stays readable on a phone
  const draw = () => {
    const label = describe(series);
    const width = Math.max(300, Math.min(760, chartBox.clientWidth || 640));
    chartBox.replaceChildren(lossChart(series, label, width), h("figcaption", { class: "hint" }, label));
  };
  window.addEventListener("resize", draw);
  const cancel = h("button", { type: "button", class: "danger", onclick: async () => {
    cancel.disabled = true;
    try {
      await api(`/v1/fine_tuning/jobs/${encodeURIComponent(id)}/cancel`, { method: "POST" });
    } catch (err) {
      actions.append(errorBox(err));
    }
    refresh();
  } }, "Cancel job");

  // every event, newest first; each poll reads only the pages newer than the last one seen
  const events = [];
  const seen = new Set();
  async function newEvents() {
    const fresh = [];
    let after = null;
    for (;;) {
      const query = new URLSearchParams({ limit: 1000 });
      if (after) query.set("after", after);
      const page = await api(`/v1/fine_tuning/jobs/${encodeURIComponent(id)}/events?${query}`);
      const unseen = page.data.filter((e) => !seen.has(e.id));
      fresh.push(...unseen);
      if (unseen.length < page.data.length || !page.has_more || !page.data.length) break;
      after = page.data[page.data.length - 1].id;
    }
    fresh.forEach((e) => seen.add(e.id));
    events.unshift(...fresh);
  }

  async function refresh() {
    clearTimeout(timer);
    if (stopped) return;
    let job;
    try {
      [job] = await Promise.all([api(`/v1/fine_tuning/jobs/${encodeURIComponent(id)}`), newEvents()]);
    } catch (err) {
      summary.replaceChildren(errorBox(err));
      timer = setTimeout(refresh, POLL_MS * 3);
      return;
    }
    if (stopped) return;
    const extra = job.rankone || {};
    summary.replaceChildren(facts([
      ["Status", h("span", { class: `status ${job.status}`, id: "job-status" }, job.status)],
      ["Shared prompt", job.model],
      ["Task", job.fine_tuned_model || extra.task || "—"],
      ["Training file", job.training_file],
      ["Validation file", job.validation_file || "none"],
      ["Created", when(job.created_at)],
      ["Finished", when(job.finished_at) || "—"],
      ["Attempts", extra.attempts ?? "—"],
    ]));
    if (job.error && job.error.message) summary.append(h("p", { class: "error", role: "alert" }, job.error.message));
    const links = [];
    if (!TERMINAL.has(job.status)) links.push(cancel);
    if (job.status === "succeeded" && job.fine_tuned_model) {
      const task = encodeURIComponent(job.fine_tuned_model);
      links.push(h("a", { class: "button", href: `#/playground?left=${task}` }, `Open ${job.fine_tuned_model} in the playground`),
        h("a", { class: "button secondary", href: `#/tasks/${task}` }, "See the task"));
    }
    actions.replaceChildren(...links);
    series = lossSeries(events);
    draw();
    log.replaceChildren(...events.slice(0, SHOWN_EVENTS).map((e) => h("li", { class: e.level },
      h("time", {}, when(e.created_at)), " ", e.message)));
    if (job.status !== lastStatus && lastStatus !== null) announce(`Job ${job.status}`);
    lastStatus = job.status;
    if (!TERMINAL.has(job.status)) timer = setTimeout(refresh, POLL_MS);
  }
  await refresh();
  return () => {
    stopped = true;
    clearTimeout(timer);
    window.removeEventListener("resize", draw);
  };
}
