// Mislabel finder: POST /self-influence, then the training points ranked by self-influence
// (highest first) with thumbnails and labels, paged through GET /influence/{job}/ranking.

import { rankingColumn } from "./ranking.js";
import {
  catalogueOptions,
  compact,
  datasetInfo,
  fillSelect,
  guarded,
  h,
  numberField,
  reportList,
  runJob,
} from "./ui.js";

let section;
let form;

async function submit(event) {
  event.preventDefault();
  const resultBox = section.querySelector("#mislabel-result");
  await guarded(form.querySelector(".form-message"), form.querySelector("button[type=submit]"), async () => {
    const f = form.elements;
    const body = compact({
      model: f.model.value,
      train: f.train.value,
      loss: f.loss.value,
      damping: numberField(form, "damping"),
      solver: { name: f.solver.value },
    });
    resultBox.replaceChildren();
    const progressBox = section.querySelector("#mislabel-progress");
    const { id, job } = await runJob("/self-influence", body, progressBox, "Self-influence job progress");
    const trainRecord = await datasetInfo(body.train);
    const reportBox = h("div", { class: "card report-card", hidden: !job.report });
    const showReport = (report) => {
      if (!report) return;
      reportBox.replaceChildren(h("h3", {}, "Solver report"), reportList(report));
      reportBox.hidden = false;
    };
    showReport(job.report);
    const ranking = rankingColumn({
      id,
      direction: "helpful",
      title: "Most self-influential first",
      note: "inspect these for wrong labels first",
      trainId: body.train,
      trainRecord,
      onReport: showReport,
    });
    resultBox.replaceChildren(h("div", { class: "result-grid mislabel" }, ranking.column, reportBox));
    await ranking.load();
  });
}

export const mislabelView = {
  init(root) {
    section = root;
    form = root.querySelector("#mislabel-form");
    form.addEventListener("submit", submit);
  },
  async show() {
    const options = await catalogueOptions();
    fillSelect(form.elements.model, options.models);
    fillSelect(form.elements.train, options.datasets, options.train);
  },
};
