// Decompositions: POST /decompositions (the paper's gap decomposition on a stored checkpoint
// and its training recipe), then the gap table, a Figure 4 style bar chart, Tables 6–8
// style scatter plots of influence-predicted against actual test-loss change and, when
// asked, the Figure 6 mislabel-detection curves. Finished runs
// are listed from GET /jobs and open at #decompositions/<job>.

import { TERMINAL, api, items } from "./api.js";
import { barChart, lineChart, PALETTE, scatterChart } from "./charts.js";
import {
  catalogueOptions,
  compact,
  errorText,
  fillSelect,
  fmt,
  guarded,
  h,
  numberField,
  reportList,
  runJob,
  shortId,
  showMessage,
} from "./ui.js";

// [key in the result, name in the table, name under a bar]
const GAPS = [
  ["warm_start", "warm-start", "warm-start"],
  ["proximity", "proximity", "proximity"],
  ["non_convergence", "non-convergence", "non-conv."],
  ["linearization", "linearization", "lineariz."],
  ["solver", "solver", "solver"],
];

let section;
let form;

function requestBody() {
  const f = form.elements;
  const seed = numberField(form, "seed");
  const numPoints = numberField(form, "num_points");
  const numTest = numberField(form, "num_test");
  const correlate = f.correlate.checked;
  const methods = [...form.querySelectorAll("input[name=methods]:checked")].map((box) => box.value);
  return compact({
    model: f.model.value,
    train: f.train.value,
    damping: numberField(form, "damping"),
    recipe: {
      optimizer: f.optimizer.value,
      lr: numberField(form, "lr"),
      epochs: numberField(form, "epochs"),
      batch_size: numberField(form, "batch_size") ?? null,
      weight_decay: numberField(form, "weight_decay"),
      seed: numberField(form, "recipe_seed"),
    },
    arguments: compact({ num_points: numPoints, seed }),
    response: f.response.value === "lbfgs" ? { optimizer: "lbfgs", lbfgs_steps: 25 } : undefined,
    test: correlate
      ? { dataset: f.test_dataset.value, indices: Number.isInteger(numTest) ? [...Array(numTest).keys()] : numTest }
      : undefined,
    correlation: correlate ? compact({ num_points: numPoints, num_test: numTest, seed, methods }) : undefined,
    mislabel: f.mislabel.checked ? { fraction: 0.1, seed: seed ?? 0, solver: "exact" } : undefined,
  });
}

/** Rows {label, short, mean, std, rms} of the gaps the run measured, in the paper's order. */
function gapRows(result) {
  const summary = result.summary ?? {};
  return GAPS.filter(([key]) => summary[key]).map(([key, label, short]) => ({
    label,
    short,
    mean: summary[key].mean,
    std: summary[key].std,
    rms: summary[key].rms_mean,
  }));
}

function gapTable(rows) {
  return h(
    "table",
    { class: "gaps" },
    h("caption", {}, "Gaps between consecutive response functions: L2 distance of the network outputs on the training set"),
    h(
      "thead",
      {},
      h("tr", {}, ["gap", "mean", "± std", "per-example RMS"].map((name) => h("th", { scope: "col" }, name))),
    ),
    h(
      "tbody",
      {},
      rows.map((r) =>
        h(
          "tr",
          {},
          h("th", { scope: "row" }, r.label),
          h("td", { class: "num" }, fmt(r.mean)),
          h("td", { class: "num" }, fmt(r.std)),
          h("td", { class: "num" }, fmt(r.rms)),
        ),
      ),
    ),
  );
}

/** Tables 6–8: influence-predicted vs actual test-loss change, one scatter per method. */
function correlationCharts(correlation) {
  const predicted = (correlation.predicted ?? []).flat();
  return Object.entries(correlation.actual ?? {}).map(([method, matrix], i) => {
    const actual = matrix.flat();
    const stats = correlation.statistics?.[method] ?? {};
    return scatterChart({
      title: `${method}: Pearson ${fmt(stats.pearson, 3)} · Spearman ${fmt(stats.spearman, 3)}`,
      points: predicted.map((x, j) => ({ x, y: actual[j], color: PALETTE[i % PALETTE.length] })),
      xLabel: "influence-predicted Δ test loss",
      yLabel: `actual Δ (${method})`,
    });
  });
}

// rankings of the mislabel result, drawn in this order (others, e.g. PBRF, after them)
const RANKINGS = ["self-influence", "training loss", "random"];

/** Figure 6: fraction of corrupted labels found vs fraction of the data inspected. */
function mislabelChart(mislabel) {
  const curves = mislabel.curves ?? {};
  const inspected = curves.inspected ?? [];
  const names = [...RANKINGS.filter((name) => curves[name]), ...Object.keys(curves).filter((name) => name !== "inspected" && !RANKINGS.includes(name))];
  const chart = lineChart({
    title: `Mislabel detection (${mislabel.corrupted?.length ?? "?"} of ${mislabel.num_train ?? "?"} labels corrupted)`,
    lines: names.map((name) => ({
      label: name,
      points: inspected.map((x, k) => ({ x, y: curves[name][k] })),
      dash: name === "random" ? "5 4" : undefined,
    })),
    xLabel: "fraction of training data inspected",
    yLabel: "fraction of corrupted labels found",
    xDomain: [0, 1],
    yDomain: [0, 1],
    tickText: (t) => fmt(t, 2),
  });
  chart.classList.add("mislabel-chart");
  return chart;
}

function renderResult(box, id, result) {
  const rows = gapRows(result);
  const charts = [
    barChart({
      title: "Gaps (Figure 4 style, log scale)",
      bars: rows.map((r) => ({ label: r.short, value: r.mean, error: r.std })),
      yLabel: "L2 output distance",
    }),
    ...(result.correlation ? correlationCharts(result.correlation) : []),
    ...(result.mislabel ? [mislabelChart(result.mislabel)] : []),
  ];
  const removed = result.removed?.length;
  box.replaceChildren(
    h(
      "section",
      { class: "card decomposition", "aria-label": `Decomposition ${shortId(id)}` },
      h("h3", {}, `Decomposition ${shortId(id)}`),
      h("p", { class: "muted" }, `${removed ?? "?"} removed sets · N = ${result.num_train ?? "?"}`),
      gapTable(rows),
      h("details", {}, h("summary", {}, "Solver report"), reportList(result.solver_report)),
      h("div", { class: "charts" }, charts.map((chart) => h("div", { class: "chart-box" }, chart))),
    ),
  );
}

async function openResult(id) {
  const box = section.querySelector("#decomp-result");
  await guarded(form.querySelector(".form-message"), null, async () => {
    const job = await api(`/jobs/${encodeURIComponent(id)}`);
    if (job.status !== "succeeded" || !job.result) {
      throw new Error(`decomposition ${shortId(id)} is ${job.status}${job.error ? `: ${job.error}` : ""}`);
    }
    renderResult(box, id, job.result);
    box.scrollIntoView({ block: "start" });
  });
}

async function listRuns() {
  const list = section.querySelector("#decomp-list");
  try {
    const jobs = items(await api("/jobs")).filter((job) => String(job.kind).startsWith("decomp"));
    if (!jobs.length) {
      list.replaceChildren();
      return;
    }
    list.replaceChildren(
      h("h3", {}, "Runs"),
      h(
        "ul",
        { class: "runs" },
        jobs.map((job) =>
          h(
            "li",
            {},
            job.status === "succeeded"
              ? h("a", { href: `#decompositions/${encodeURIComponent(job.id)}` }, `Open ${shortId(job.id)}`)
              : h("span", { class: "mono" }, shortId(job.id)),
            ` · ${job.status}${TERMINAL.has(job.status) ? "" : ` ${Math.round(100 * (job.progress ?? 0))}%`}`,
          ),
        ),
      ),
    );
  } catch (error) {
    list.replaceChildren(h("p", { class: "message error" }, errorText(error)));
  }
}

async function submit(event) {
  event.preventDefault();
  const message = form.querySelector(".form-message");
  await guarded(message, form.querySelector("button[type=submit]"), async () => {
    const progressBox = section.querySelector("#decomp-progress");
    const { id } = await runJob("/decompositions", requestBody(), progressBox, "Decomposition job progress");
    showMessage(message, `Decomposition ${shortId(id)} finished.`, "ok");
    await listRuns();
    // Open it only if the user is still on this view with no other run open: a long job
    // must not pull them back from wherever they went meanwhile (Runs lists it).
    const [view, open] = location.hash.replace(/^#/, "").split("/");
    if (view === "decompositions" && (!open || decodeURIComponent(open) === id)) {
      location.hash = `#decompositions/${encodeURIComponent(id)}`;
    }
  });
}

export const decompositionsView = {
  init(root) {
    section = root;
    form = root.querySelector("#decomp-form");
    form.addEventListener("submit", submit);
  },
  async show(jobId) {
    const options = await catalogueOptions();
    fillSelect(form.elements.model, options.models);
    fillSelect(form.elements.train, options.datasets, options.train);
    fillSelect(form.elements.test_dataset, options.datasets, options.test);
    await listRuns();
    if (jobId) await openResult(jobId);
  },
};
