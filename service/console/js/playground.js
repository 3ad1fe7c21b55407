// Playground: one conversation sent to two models side by side, streamed from
// POST /v1/chat/completions, with the generation parameters that route takes.

import { listModels, streamChat } from "./api.js";
import { announce, h, messageOf } from "./dom.js";

const BASE = "base"; // the plain backbone, listed by /v1/models where the server serves it

function field(id, label, attrs) {
  return h("div", { class: "field" }, h("label", { for: id }, label), h("input", { id, name: id, ...attrs }));
}

function parameters(form) {
  const value = (id) => form.querySelector(`#${id}`).value.trim();
  const body = {};
  if (value("p-max")) body.max_tokens = Number(value("p-max"));
  if (value("p-temperature")) body.temperature = Number(value("p-temperature"));
  if (value("p-top-p")) body.top_p = Number(value("p-top-p"));
  if (value("p-seed")) body.seed = Number(value("p-seed"));
  if (value("p-stop")) body.stop = value("p-stop");
  return body;
}

class Pane {
  constructor(side, models, chosen) {
    this.messages = [];
    const id = `model-${side}`;
    const option = (m, text) => h("option", { value: m, selected: m === chosen }, text || m);
    this.select = h("select", { id, name: id },
      models.bases.length ? h("optgroup", { label: "Base model (no task prompt)" }, models.bases.map((m) => option(m))) : null,
      h("optgroup", { label: "Tasks" }, models.tasks.map((m) => option(m))));
    this.log = h("ol", { class: "transcript", role: "log", "aria-live": "polite", "aria-label": `${side} conversation` });
    this.usage = h("p", { class: "hint usage" });
    this.el = h("section", { class: "pane", "aria-label": `${side} model` },
      h("div", { class: "field" }, h("label", { for: id }, side === "left" ? "Model (left)" : "Model (right)"), this.select),
      this.log, this.usage);
    this.select.addEventListener("change", () => this.reset());
  }

  reset() {
    this.messages = [];
    this.log.replaceChildren();
    this.usage.textContent = "";
  }

  async send(text, system, params, signal) {
    this.messages.push({ role: "user", content: text });
    this.log.append(h("li", { class: "user" }, h("span", { class: "who" }, "You"), h("p", {}, text)));
    const answer = h("p", { class: "streaming" });
    const item = h("li", { class: "assistant", "aria-busy": "true" }, h("span", { class: "who" }, this.select.value), answer);
    this.log.append(item);
    const messages = system ? [{ role: "system", content: system }, ...this.messages] : this.messages;
    let reply = "";
    try {
      for await (const chunk of streamChat({ model: this.select.value, messages, ...params }, signal)) {
        for (const choice of chunk.choices) {
          if (choice.delta && choice.delta.content) {
            reply += choice.delta.content;
            answer.textContent = reply;
          }
          if (choice.finish_reason) item.dataset.finish = choice.finish_reason;
        }
        if (chunk.usage) {
          const u = chunk.usage;
          this.usage.textContent = `${u.prompt_tokens} prompt + ${u.completion_tokens} generated tokens · finish: ${item.dataset.finish || "?"}`;
        }
      }
      this.messages.push({ role: "assistant", content: reply });
      if (!reply) answer.textContent = "(empty answer)";
    } catch (e) {
      this.messages.pop();
      answer.textContent = "";
      if (e.name === "AbortError") answer.append(h("span", { class: "hint" }, reply ? `${reply} (stopped)` : "(stopped)"));
      else answer.append(h("span", { class: "error", role: "alert" }, messageOf(e)));
    } finally {
      answer.classList.remove("streaming");
      item.removeAttribute("aria-busy");
    }
  }
}

export async function render(root, ctx) {
  const models = await listModels();
  const all = models.all;
  root.append(h("h1", {}, "Playground"));
  if (!all.length) {
    root.append(h("p", {}, "This key may use no task yet."));
    return null;
  }
  const leftWanted = ctx.params.get("left");
  const left = all.includes(leftWanted) ? leftWanted : models.tasks[0] || all[0];
  const rightWanted = ctx.params.get("right");
  const right = all.includes(rightWanted) ? rightWanted
    : all.includes(BASE) ? BASE : models.bases[0] || all.find((m) => m !== left) || left;
  const panes = [new Pane("left", models, left), new Pane("right", models, right)];
  const input = h("textarea", { id: "prompt", name: "prompt", rows: 3, required: true });
  const system = h("input", { id: "system", name: "system", autocomplete: "off" });
  const send = h("button", { type: "submit" }, "Send to both");
  let controller = null;
  const stop = h("button", { type: "button", class: "secondary", disabled: true, onclick: () => controller && controller.abort() }, "Stop");
  const clearButton = h("button", { type: "button", class: "secondary", onclick: () => panes.forEach((p) => p.reset()) }, "Clear");
  const form = h("form", { class: "chat-form" },
    h("div", { class: "field" }, h("label", { for: "prompt" }, "Message"), input,
      h("p", { class: "hint" }, "Enter sends; Shift+Enter starts a new line.")),
    h("details", { class: "params" }, h("summary", {}, "System message and parameters"),
      h("div", { class: "field" }, h("label", { for: "system" }, "System message (optional)"), system),
      h("div", { class: "grid" },
        field("p-max", "max_tokens", { type: "number", min: 1, value: 64, inputmode: "numeric" }),
        field("p-temperature", "temperature", { type: "number", min: 0, max: 2, step: 0.05, value: 0 }),
        field("p-top-p", "top_p", { type: "number", min: 0.01, max: 1, step: 0.01, placeholder: "1" }),
        field("p-seed", "seed", { type: "number", min: 0, inputmode: "numeric", placeholder: "none" }),
        field("p-stop", "stop", { type: "text", placeholder: "none", autocomplete: "off" }))),
    h("div", { class: "actions" }, send, stop, clearButton));
  input.addEventListener("keydown", (e) => {
    if (e.key === "Enter" && !e.shiftKey && !e.isComposing) {
      e.preventDefault();
      form.requestSubmit();
    }
  });
  form.addEventListener("submit", async (e) => {
    e.preventDefault();
    const text = input.value.trim();
    if (!text || controller) return;
    controller = new AbortController();
    send.disabled = true;
    stop.disabled = false;
    input.value = "";
    const params = parameters(form);
    await Promise.all(panes.map((p) => p.send(text, system.value.trim(), params, controller.signal)));
    controller = null;
    send.disabled = false;
    stop.disabled = true;
    announce("Both answers are complete.");
    input.focus();
  });
  root.append(h("div", { class: "panes" }, panes.map((p) => p.el)), form);
  return () => controller && controller.abort();
}
