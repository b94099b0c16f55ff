// Models & data: list, upload and delete checkpoints and datasets (GET/POST/DELETE
// /models and /datasets). The built-in demo is listed like any upload.

import { api } from "./api.js";
import {
  datasetName,
  fmt,
  forgetDataset,
  guarded,
  h,
  listDatasets,
  listModels,
  shortId,
  showMessage,
} from "./ui.js";

let section;

function table(caption, headings, rows) {
  if (!rows.length) return h("p", { class: "muted" }, `No ${caption.toLowerCase()} yet.`);
  return h(
    "table",
    {},
    h("caption", { class: "visually-hidden" }, caption),
    h("thead", {}, h("tr", {}, headings.map((name) => h("th", { scope: "col" }, name)))),
    h("tbody", {}, rows),
  );
}

function deleteButton(kind, record, label) {
  const button = h("button", { type: "button", class: "danger", "aria-label": `Delete ${label}` }, "Delete");
  button.addEventListener("click", async () => {
    if (!window.confirm(`Delete ${label}?`)) return;
    const box = section.querySelector(kind === "models" ? "#model-upload .form-message" : "#dataset-upload .form-message");
    await guarded(box, button, async () => {
      await api(`/${kind}/${encodeURIComponent(record.id)}`, { method: "DELETE" });
      if (kind === "datasets") forgetDataset(record.id);
      await refresh();
      showMessage(box, `Deleted ${label}.`, "ok");
    });
  });
  return button;
}

async function refresh() {
  const [models, datasets] = await Promise.all([listModels(), listDatasets()]);
  section.querySelector("#models-table").replaceChildren(
    table(
      "Models",
      ["Name", "Id", "Architecture", "Parameters", ""],
      models.map((m) =>
        h(
          "tr",
          {},
          h("th", { scope: "row" }, m.name ?? "–"),
          h("td", { class: "mono", title: m.id }, shortId(m.id)),
          h("td", {}, m.architecture ?? "–"),
          h("td", { class: "num" }, m.parameters ?? "–"),
          h("td", {}, deleteButton("models", m, `model ${m.name ?? shortId(m.id)}`)),
        ),
      ),
    ),
  );
  section.querySelector("#datasets-table").replaceChildren(
    table(
      "Datasets",
      ["Name", "Id", "Size", "Task", ""],
      datasets.map((d) =>
        h(
          "tr",
          {},
          h("th", { scope: "row" }, datasetName(d)),
          h("td", { class: "mono", title: d.id }, shortId(d.id)),
          h("td", { class: "num" }, fmt(d.size, 6)),
          h("td", {}, d.metadata?.task ?? "–"),
          h("td", {}, deleteButton("datasets", d, `dataset ${datasetName(d)}`)),
        ),
      ),
    ),
  );
}

function onSubmit(form, build, done) {
  form.addEventListener("submit", async (event) => {
    event.preventDefault();
    const box = form.querySelector(".form-message");
    await guarded(box, form.querySelector("button[type=submit]"), async () => {
      const answer = await build();
      form.reset();
      await refresh();
      showMessage(box, done(answer), "ok");
    });
  });
}

function requireFile(form, name) {
  const file = form.elements[name].files[0];
  if (!file) throw new Error(`${name}: choose a file`);
  return file;
}

function appendName(data, form) {
  const name = form.elements.name.value.trim();
  if (name) data.append("name", name);
}

export const modelsView = {
  init(root) {
    section = root;
    const modelForm = root.querySelector("#model-upload");
    onSubmit(
      modelForm,
      async () => {
        const data = new FormData();
        data.append("weights", requireFile(modelForm, "weights"));
        const config = modelForm.elements.config.files[0];
        if (config) data.append("config", await config.text());
        appendName(data, modelForm);
        return api("/models", { method: "POST", form: data });
      },
      (m) => `Stored model ${shortId(m.id)} (${m.architecture}, ${m.parameters} parameters).`,
    );
    const datasetForm = root.querySelector("#dataset-upload");
    onSubmit(
      datasetForm,
      () => {
        const data = new FormData();
        data.append("file", requireFile(datasetForm, "file"));
        appendName(data, datasetForm);
        return api("/datasets", { method: "POST", form: data });
      },
      (d) => `Stored dataset ${shortId(d.id)} (${d.size} items).`,
    );
    const builtinForm = root.querySelector("#dataset-builtin");
    onSubmit(
      builtinForm,
      () =>
        api("/datasets", {
          method: "POST",
          json: { builtin: builtinForm.elements.builtin.value, split: builtinForm.elements.split.value },
        }),
      (d) => `Stored dataset ${shortId(d.id)} (${d.size} items).`,
    );
  },
  show: refresh,
};
