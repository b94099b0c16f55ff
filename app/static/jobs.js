// Jobs: every job of this key with status, live progress, attempts and errors; queued and
// running jobs can be canceled (DELETE /jobs/{id}). Rows are updated in place every 2 s so
// keyboard focus stays where it is; a 401/403 stops the timer (Refresh starts it again).

import { ApiError, TERMINAL, api, items } from "./api.js";
import { errorText, guarded, h, progressBar, shortId, showMessage } from "./ui.js";

const REFRESH_MS = 2000;
let table;
let body;
let message;
let timer = null;
let visible = false;
let keyRefused = false; // the message shown is the one about the refused key
const rows = new Map();

function stopTimer() {
  clearInterval(timer);
  timer = null;
}

function when(value) {
  if (!value) return "–";
  const date = typeof value === "number" ? new Date(value * (value < 1e12 ? 1000 : 1)) : new Date(value);
  return Number.isNaN(date.getTime()) ? String(value) : date.toLocaleTimeString();
}

async function cancel(job, button) {
  await guarded(message, button, async () => {
    await api(`/jobs/${encodeURIComponent(job.id)}`, { method: "DELETE" });
    showMessage(message, `Cancel requested for job ${shortId(job.id)}.`, "ok");
    await refresh();
  });
}

function makeRow(job) {
  const bar = progressBar(`Progress of job ${shortId(job.id)}`);
  const cells = {
    kind: h("td"),
    status: h("td", { class: "status" }),
    progress: h("td", {}, bar.element),
    attempts: h("td", { class: "num" }),
    error: h("td", { class: "error-cell" }),
    created: h("td"),
    actions: h("td"),
  };
  const cancelButton = h(
    "button",
    { type: "button", class: "danger", "aria-label": `Cancel job ${shortId(job.id)}` },
    "Cancel",
  );
  cancelButton.addEventListener("click", () => cancel(job, cancelButton));
  const open = h("a", { href: `#decompositions/${encodeURIComponent(job.id)}`, class: "button secondary" }, "Open");
  const row = h(
    "tr",
    { "data-job": job.id },
    h("th", { scope: "row", class: "mono", title: job.id }, shortId(job.id)),
    ...Object.values(cells),
  );
  return { row, bar, cells, cancelButton, open };
}

function update(entry, job) {
  const { bar, cells, cancelButton, open, row } = entry;
  cells.kind.textContent = job.kind ?? "–";
  cells.status.textContent = job.cancel_requested && !TERMINAL.has(job.status) ? "canceling" : job.status ?? "–";
  row.dataset.status = job.status ?? "";
  bar.set(job);
  cells.attempts.textContent = job.attempts ?? "–";
  cells.error.textContent = job.error ?? "";
  cells.created.textContent = when(job.created);
  const actions = [];
  if (!TERMINAL.has(job.status) && !job.cancel_requested) actions.push(cancelButton);
  if (job.status === "succeeded" && String(job.kind).startsWith("decomp")) actions.push(open);
  if (actions.length !== cells.actions.childElementCount || actions.some((a) => a.parentNode !== cells.actions)) {
    cells.actions.replaceChildren(...actions);
  }
}

async function refresh() {
  try {
    const jobs = items(await api("/jobs"));
    const seen = new Set();
    jobs.forEach((job, position) => {
      seen.add(job.id);
      if (!rows.has(job.id)) rows.set(job.id, makeRow(job));
      const entry = rows.get(job.id);
      update(entry, job);
      if (body.children[position] !== entry.row) body.insertBefore(entry.row, body.children[position] ?? null);
    });
    for (const [id, entry] of rows) {
      if (!seen.has(id)) {
        entry.row.remove();
        rows.delete(id);
      }
    }
    table.hidden = jobs.length === 0;
    if (!jobs.length) showMessage(message, "No jobs yet.", "info");
    else if (message.querySelector(".info") || keyRefused) showMessage(message, "");
    keyRefused = false;
  } catch (error) {
    if (error instanceof ApiError && (error.status === 401 || error.status === 403)) {
      // No valid key: stop refreshing, or every tick would reopen the key dialog.
      stopTimer();
      keyRefused = true;
      showMessage(message, `${errorText(error)} — automatic refresh stopped; press Refresh once a key is set.`);
      return;
    }
    showMessage(message, errorText(error));
  }
  if (visible && timer === null) timer = setInterval(refresh, REFRESH_MS);
}

export const jobsView = {
  init(root) {
    message = root.querySelector("#jobs-message");
    body = h("tbody");
    const headings = ["Job", "Kind", "Status", "Progress", "Attempts", "Error", "Created", "Actions"];
    table = h(
      "table",
      { class: "jobs" },
      h("caption", { class: "visually-hidden" }, "Jobs of this API key, newest first"),
      h("thead", {}, h("tr", {}, headings.map((name) => h("th", { scope: "col" }, name)))),
      body,
    );
    root.querySelector("#jobs-table").replaceChildren(table);
    root.querySelector("#jobs-refresh").addEventListener("click", refresh);
  },
  async show() {
    visible = true;
    stopTimer();
    await refresh(); // starts the 2 s timer unless the key was refused
  },
  hide() {
    visible = false;
    stopTimer();
  },
};
