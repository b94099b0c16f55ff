// Small DOM helpers shared by the views: element builder, messages, progress bars,
// number formatting, thumbnails and the catalogue of models and datasets.

import { ApiError, api, followJob, imageUrl, items, jobId } from "./api.js";

/** Build an element: h("td", {class: "num"}, "1.0", child, ...). */
export function h(tag, attrs = {}, ...children) {
  const node = document.createElement(tag);
  for (const [name, value] of Object.entries(attrs)) {
    if (value === undefined || value === null || value === false) continue;
    if (name.startsWith("on")) node.addEventListener(name.slice(2), value);
    else if (name === "class") node.className = value;
    else node.setAttribute(name, value === true ? "" : String(value));
  }
  for (const child of children.flat()) {
    if (child === undefined || child === null || child === false) continue;
    node.append(child instanceof Node ? child : document.createTextNode(String(child)));
  }
  return node;
}

/** Show a readable message (kind: "error" | "info" | "ok") inside `box`. */
export function showMessage(box, text, kind = "error") {
  box.replaceChildren(text ? h("p", { class: `message ${kind}` }, text) : "");
}

/** The sentence a user sees for any failure. */
export function errorText(error) {
  if (error instanceof ApiError) return `Error ${error.status}: ${error.message}`;
  return `Error: ${error?.message || error}`;
}

/** Run `action`, reporting failures in `box`; the submit button is disabled meanwhile. */
export async function guarded(box, button, action) {
  showMessage(box, "");
  if (button) button.disabled = true;
  try {
    return await action();
  } catch (error) {
    showMessage(box, errorText(error));
    return undefined;
  } finally {
    if (button) button.disabled = false;
  }
}

export function fmt(value, digits = 4) {
  if (value === null || value === undefined || value === "") return "–";
  const number = Number(value);
  if (!Number.isFinite(number)) return String(value);
  if (number !== 0 && (Math.abs(number) < 1e-2 || Math.abs(number) >= 1e5)) {
    return number.toExponential(digits - 1).replace(/\.?0+e/, "e");
  }
  return number.toPrecision(digits).replace(/\.?0+$/, "");
}

export function shortId(id) {
  return id ? String(id).slice(0, 10) : "–";
}

/** A labelled progress bar: {element, set(job)}. */
export function progressBar(label) {
  const bar = h("progress", { max: "1", value: "0", "aria-label": label });
  const text = h("span", { class: "progress-text", "aria-live": "polite" }, "queued");
  const element = h("div", { class: "progress" }, bar, text);
  return {
    element,
    set(job) {
      const fraction = Math.max(0, Math.min(1, Number(job.progress ?? 0)));
      bar.value = job.status === "succeeded" ? 1 : fraction;
      const phase = job.phase ? ` · ${job.phase}` : "";
      text.textContent = `${job.status ?? "queued"} · ${Math.round(bar.value * 100)}%${phase}`;
      element.dataset.status = job.status ?? "queued";
    },
  };
}

/** A definition list of a solver report (iterations, residual, converged, ...). */
export function reportList(report) {
  if (!report) return h("p", { class: "muted" }, "No solver report.");
  const rows = [
    ["method", report.method],
    ["iterations", report.iterations],
    ["relative residual", fmt(report.relative_residual)],
    ["converged", report.converged === undefined ? undefined : report.converged ? "yes" : "no"],
    ["seconds", fmt(report.seconds, 3)],
  ].filter(([, value]) => value !== undefined && value !== null);
  return h(
    "dl",
    { class: "report" },
    rows.flatMap(([name, value]) => [h("dt", {}, name), h("dd", {}, String(value))]),
  );
}

// ---- catalogue of models and datasets ------------------------------------------------

const datasetDetails = new Map();

export async function listModels() {
  return items(await api("/models"));
}

export async function listDatasets() {
  return items(await api("/datasets"));
}

/** Full record of a dataset (metadata with class names and input shape), cached. */
export function datasetInfo(id) {
  if (!datasetDetails.has(id)) {
    datasetDetails.set(
      id,
      api(`/datasets/${encodeURIComponent(id)}`).catch((error) => {
        datasetDetails.delete(id);
        throw error;
      }),
    );
  }
  return datasetDetails.get(id);
}

export function forgetDataset(id) {
  datasetDetails.delete(id);
}

function metadataOf(record) {
  return record?.metadata ?? {};
}

export function datasetName(record) {
  return record.name ?? shortId(record.id);
}

/** True when the API draws items as images: input_shape [H, W], [1, H, W] or [3, H, W]. */
function isImageData(record) {
  const shape = metadataOf(record).input_shape;
  if (!Array.isArray(shape)) return false;
  return shape.length === 2 || (shape.length === 3 && (shape[0] === 1 || shape[0] === 3));
}

/** A target as a person reads it: the class name for classification, else the number. */
export function labelText(record, target) {
  const meta = metadataOf(record);
  const value = Array.isArray(target) && target.length === 1 ? target[0] : target;
  const names = meta.class_names;
  if (Array.isArray(names) && Number.isInteger(Number(value)) && names[Number(value)] !== undefined) {
    return String(names[Number(value)]);
  }
  return Array.isArray(value) ? value.map((v) => fmt(v, 3)).join(", ") : fmt(value, 4);
}

/** An <img> of one dataset item from the PNG endpoint (a placeholder if not image data). */
export function thumbnail(datasetId, index, record, alt) {
  if (!isImageData(record)) return h("span", { class: "thumb placeholder", "aria-hidden": "true" }, "#");
  const img = h("img", { class: "thumb", alt, width: "48", height: "48" });
  imageUrl(`/datasets/${encodeURIComponent(datasetId)}/items/${index}.png`)
    .then((url) => {
      img.src = url;
    })
    .catch(() => {
      img.replaceWith(h("span", { class: "thumb placeholder", title: "no image" }, "?"));
    });
  return img;
}

/** Fill a <select> with options [{value, label}], keeping the current choice if possible. */
export function fillSelect(select, options, preferred) {
  const previous = select.value;
  select.replaceChildren(...options.map((o) => h("option", { value: o.value }, o.label)));
  const values = options.map((o) => o.value);
  if (values.includes(previous)) select.value = previous;
  else if (preferred !== undefined && values.includes(preferred)) select.value = preferred;
}

/** Options for model and dataset pickers, with a sensible default for train and test sets. */
export async function catalogueOptions() {
  const [models, datasets] = await Promise.all([listModels(), listDatasets()]);
  const modelOptions = models.map((m) => ({
    value: m.id,
    label: `${m.name ?? m.architecture ?? "model"} · ${shortId(m.id)}`,
  }));
  const datasetOptions = datasets.map((d) => ({
    value: d.id,
    label: `${datasetName(d)} · ${d.size ?? "?"} items`,
  }));
  const find = (word) => datasets.find((d) => datasetName(d).toLowerCase().includes(word))?.id;
  return {
    models: modelOptions,
    datasets: datasetOptions,
    train: find("train") ?? datasets[0]?.id,
    test: find("test") ?? datasets[datasets.length - 1]?.id,
  };
}

/** Read a number input; empty gives undefined so the server default applies. */
export function numberField(form, name) {
  const raw = form.elements[name]?.value?.trim();
  if (raw === undefined || raw === "") return undefined;
  const value = Number(raw);
  return Number.isFinite(value) ? value : raw;
}

/** Drop undefined entries so the server's defaults apply. */
export function compact(object) {
  return Object.fromEntries(Object.entries(object).filter(([, v]) => v !== undefined));
}

/**
 * POST a job, show its live progress bar in `progressBox`, and resolve with {id, job} once it
 * succeeded (a cached answer with status "succeeded" needs no job). Failure or cancellation
 * throws an Error whose message is the job's error.
 */
export async function runJob(path, body, progressBox, label) {
  const answer = await api(path, { method: "POST", json: body });
  const id = jobId(answer);
  const bar = progressBar(label);
  progressBox.replaceChildren(h("p", { class: "muted" }, `Job ${shortId(id)}`), bar.element);
  bar.set(answer.status ? answer : { status: "queued" });
  const job = answer.status === "succeeded" ? answer : await followJob(id, bar.set);
  bar.set(job);
  if (job.status !== "succeeded") {
    throw new Error(`the job ${job.status}${job.error ? `: ${job.error}` : ""}`);
  }
  return { id, job };
}
