// Influence query: POST /influence, follow the job, then the top helpful and harmful
// training points side by side (GET /influence/{job}/ranking), paging, export, and the
// per-query ground-truth check POST /influence/{job}/verify.

import { api, apiBlob } from "./api.js";
import { scatterChart } from "./charts.js";
import { rankingColumn } from "./ranking.js";
import {
  catalogueOptions,
  compact,
  datasetInfo,
  errorText,
  fillSelect,
  fmt,
  guarded,
  h,
  labelText,
  numberField,
  reportList,
  runJob,
  shortId,
  showMessage,
  thumbnail,
} from "./ui.js";

let section;
let form;

function selected(name) {
  return form.querySelector(`input[name="${name}"]:checked`).value;
}

function toggleGroups() {
  const source = selected("test_source");
  const solver = selected("solver");
  for (const el of form.querySelectorAll("[data-source]")) el.hidden = el.dataset.source !== source;
  for (const el of form.querySelectorAll("[data-solver]")) el.hidden = el.dataset.solver !== solver;
}

function parseIndices(text) {
  return text
    .split(",")
    .map((part) => part.trim())
    .filter(Boolean)
    .map((part) => (/^\d+$/.test(part) ? Number(part) : part));
}

function parseJson(field, text) {
  try {
    return JSON.parse(text);
  } catch {
    throw new Error(`${field}: not valid JSON`);
  }
}

function solverSettings() {
  const name = selected("solver");
  if (name === "lissa") {
    return compact({
      name,
      depth: numberField(form, "depth"),
      repeats: numberField(form, "repeats"),
      batch_size: numberField(form, "lissa_batch_size"),
      scale: numberField(form, "scale"),
      seed: numberField(form, "seed"),
      tol: numberField(form, "lissa_tol"),
    });
  }
  if (name === "cg") {
    return compact({
      name,
      tol: numberField(form, "tol"),
      max_iter: numberField(form, "max_iter"),
      preconditioner: form.elements.preconditioner.value,
    });
  }
  return { name };
}

function requestBody() {
  const f = form.elements;
  const test =
    selected("test_source") === "dataset"
      ? { dataset: f.test_dataset.value, indices: parseIndices(f.indices.value) }
      : { inputs: parseJson("inputs", f.inputs.value), targets: parseJson("targets", f.targets.value) };
  return compact({
    model: f.model.value,
    train: f.train.value,
    loss: f.loss.value,
    hessian: f.hessian.value,
    damping: numberField(form, "damping"),
    test,
    solver: solverSettings(),
  });
}

async function submit(event) {
  event.preventDefault();
  const message = form.querySelector(".form-message");
  const progressBox = section.querySelector("#query-progress");
  const resultBox = section.querySelector("#query-result");
  await guarded(message, form.querySelector("button[type=submit]"), async () => {
    const body = requestBody();
    resultBox.replaceChildren();
    const { id, job } = await runJob("/influence", body, progressBox, "Influence job progress");
    await renderResult(resultBox, id, body, job);
  });
}

/** The test example as a card: thumbnail and label from its dataset, or the entered values. */
async function testCard(body, t) {
  const card = h("div", { class: "card test-example" }, h("h3", {}, "Test example"));
  if (body.test.dataset) {
    const datasetId = body.test.dataset;
    const index = body.test.indices[t];
    const [record, item] = await Promise.all([
      datasetInfo(datasetId),
      api(`/datasets/${encodeURIComponent(datasetId)}/items/${index}`),
    ]);
    card.append(
      thumbnail(datasetId, index, record, `test example ${index}`),
      h("p", {}, `index ${index} · label ${item?.label ?? labelText(record, item?.target)}`),
    );
  } else {
    const target = Array.isArray(body.test.targets) ? body.test.targets[t] : body.test.targets;
    const inputs = Array.isArray(body.test.inputs) ? body.test.inputs[t] : body.test.inputs;
    const shown = JSON.stringify(inputs);
    card.append(
      h("p", {}, `target ${JSON.stringify(target)}`),
      h("p", { class: "muted mono" }, shown.length > 120 ? `${shown.slice(0, 120)}…` : shown),
    );
  }
  return card;
}

function exportLink(id, message) {
  const href = `/influence/${encodeURIComponent(id)}/scores`;
  const link = h("a", { href, download: `scores-${shortId(id)}.safetensors`, class: "button secondary" }, "Export scores (safetensors)");
  link.addEventListener("click", async (event) => {
    // Always fetched here, never left to the browser: a plain link cannot send the API key,
    // and a refused export (409 not ready, 410 gone) would only show as a failed download.
    event.preventDefault();
    showMessage(message, "");
    try {
      const url = URL.createObjectURL(await apiBlob(href));
      const save = h("a", { href: url, download: link.getAttribute("download") });
      save.click();
      setTimeout(() => URL.revokeObjectURL(url), 10_000);
    } catch (error) {
      showMessage(message, `Export failed: ${errorText(error)}`);
    }
  });
  return link;
}

function verifyPanel(id, getTest) {
  const box = h("div", { class: "verify-result" });
  const message = h("div", { class: "form-message" });
  const progressBox = h("div");
  const verifyForm = h(
    "form",
    { class: "inline-form", novalidate: true, "aria-label": "Verify with retraining" },
    h("label", {}, "Top k ", h("input", { name: "top", type: "text", inputmode: "numeric", value: "5", size: "4" })),
    h(
      "label",
      {},
      "Method ",
      h(
        "select",
        { name: "method" },
        h("option", { value: "pbrf" }, "PBRF"),
        h("option", { value: "linearized" }, "linearized PBRF"),
        h("option", { value: "warm" }, "warm-start retraining"),
      ),
    ),
    h("button", { type: "submit" }, "Verify with PBRF"),
  );
  const method = verifyForm.elements.method;
  method.addEventListener("change", () => {
    verifyForm.querySelector("button").textContent = `Verify with ${method.selectedOptions[0].textContent}`;
  });
  verifyForm.addEventListener("submit", async (event) => {
    event.preventDefault();
    await guarded(message, verifyForm.querySelector("button"), async () => {
      const body = { top: numberField(verifyForm, "top"), method: method.value, test: getTest() };
      const path = `/influence/${encodeURIComponent(id)}/verify`;
      const { job } = await runJob(path, body, progressBox, "Verification job progress");
      const report = job.report ?? job.result?.solver_report;
      box.replaceChildren(verifyChart(job.result, method.selectedOptions[0].textContent, report));
    });
  });
  return h(
    "section",
    { class: "card verify", "aria-label": "Verify with retraining" },
    h("h3", {}, "Check against retraining"),
    h(
      "p",
      { class: "muted" },
      "Solves the response function for the top helpful and harmful points and compares the predicted with the actual test-loss change.",
    ),
    verifyForm,
    message,
    progressBox,
    box,
  );
}

/** Predicted vs actual test-loss change ([P, 1] for the shown test point) as a scatter,
 * with the values and the solver report of the influence side. */
function verifyChart(result, methodName, report) {
  const predicted = (result.predicted ?? []).flat();
  const actual = (result.actual ?? []).flat();
  const indices = result.train_indices ?? predicted.map((_, i) => i);
  const points = predicted.map((x, i) => ({ x, y: actual[i], label: `#${indices[i]}` }));
  const { pearson, spearman } = result.correlation ?? result;
  const title = `Pearson ${fmt(pearson, 3)} · Spearman ${fmt(spearman, 3)}`;
  const rows = points.map((p) => h("tr", {}, h("td", {}, p.label), h("td", { class: "num" }, fmt(p.x)), h("td", { class: "num" }, fmt(p.y))));
  return h(
    "div",
    { class: "chart-box" },
    scatterChart({ title, points, xLabel: "predicted Δ test loss (influence)", yLabel: `actual Δ (${methodName})` }),
    h(
      "details",
      {},
      h("summary", {}, "Values"),
      h(
        "table",
        {},
        h("thead", {}, h("tr", {}, h("th", { scope: "col" }, "point"), h("th", { scope: "col" }, "predicted"), h("th", { scope: "col" }, "actual"))),
        h("tbody", {}, rows),
      ),
    ),
    h("div", { class: "verify-report" }, h("h4", {}, "Solver report"), reportList(report)),
  );
}

async function renderResult(box, id, body, job) {
  const trainRecord = await datasetInfo(body.train);
  const count = body.test.indices?.length ?? (Array.isArray(body.test.targets) ? body.test.targets.length : 1);
  let t = 0;
  const reportBox = h("div", { class: "card report-card" }, h("h3", {}, "Solver report"), reportList(job.report));
  const showReport = (report) => {
    if (report) reportBox.replaceChildren(h("h3", {}, "Solver report"), reportList(report));
  };
  const board = h("div", { class: "result-grid" });
  const picker = h("select", { "aria-label": "Test example shown" });
  for (let i = 0; i < count; i += 1) {
    const label = body.test.indices ? `test index ${body.test.indices[i]}` : `entered example ${i + 1}`;
    picker.append(h("option", { value: String(i) }, label));
  }
  let drawing = 0; // a later draw (the picker changed meanwhile) supersedes this one
  async function draw() {
    const mine = ++drawing;
    const shown = t;
    const card = await testCard(body, shown);
    if (mine !== drawing) return;
    const common = { id, test: shown, trainId: body.train, trainRecord, onReport: showReport };
    const helpful = rankingColumn({
      ...common,
      direction: "helpful",
      title: "Top helpful",
      note: "removing these would raise the test loss most",
    });
    const harmful = rankingColumn({
      ...common,
      direction: "harmful",
      title: "Top harmful",
      note: "removing these would lower the test loss most",
    });
    const side = h("div", { class: "side" }, card, reportBox);
    board.replaceChildren(side, helpful.column, harmful.column);
    await Promise.all([helpful.load(), harmful.load()]);
  }
  const exportMessage = h("div", { class: "form-message export-message" });
  picker.addEventListener("change", () => {
    t = Number(picker.value);
    showMessage(exportMessage, "");
    draw().catch((error) => showMessage(exportMessage, `Could not show test example: ${errorText(error)}`));
  });
  box.replaceChildren(
    h(
      "div",
      { class: "toolbar" },
      count > 1 ? h("label", {}, "Showing ", picker) : null,
      exportLink(id, exportMessage),
      h("span", { class: "muted" }, `job ${shortId(id)}`),
    ),
    exportMessage,
    board,
    verifyPanel(id, () => t),
  );
  await draw();
}

export const queryView = {
  init(root) {
    section = root;
    form = root.querySelector("#query-form");
    form.addEventListener("change", toggleGroups);
    form.addEventListener("submit", submit);
    toggleGroups();
  },
  async show() {
    const options = await catalogueOptions();
    fillSelect(form.elements.model, options.models);
    fillSelect(form.elements.train, options.datasets, options.train);
    fillSelect(form.elements.test_dataset, options.datasets, options.test);
    if (!options.models.length) {
      showMessage(form.querySelector(".form-message"), "No model yet: upload one under Models & data.", "info");
    }
  },
};
