// A task's traffic from the server's own /metrics: the per-task counters (service/metrics.py).

import { metricsText, parseMetrics } from "./api.js";

export const OTHER = "_other"; // tasks past the server's label limit are counted together

export async function trafficByTask(signal) {
  const samples = parseMetrics(await metricsText(signal));
  const byTask = new Map();
  const entry = (task) => {
    if (!byTask.has(task)) byTask.set(task, { requests: 0, errors: 0, promptTokens: 0, generatedTokens: 0 });
    return byTask.get(task);
  };
  for (const { name, labels, value } of samples) {
    if (!labels.task) continue;
    if (name === "rankone_task_requests_total") {
      entry(labels.task).requests += value;
      if (labels.outcome !== "ok") entry(labels.task).errors += value;
    } else if (name === "rankone_task_prompt_tokens_total") entry(labels.task).promptTokens += value;
    else if (name === "rankone_task_generated_tokens_total") entry(labels.task).generatedTokens += value;
  }
  const labelled = samples.some((s) => s.name === "rankone_task_labels_limit" && s.value > 0);
  return { byTask, labelled };
}
