// Entry point: hash routing between the views, the API-key dialog and the health badge.

import { api, apiKey, onUnauthorized, setApiKey } from "./api.js";
import { decompositionsView } from "./decompositions.js";
import { jobsView } from "./jobs.js";
import { mislabelView } from "./mislabel.js";
import { modelsView } from "./models.js";
import { queryView } from "./query.js";
import { errorText, showMessage } from "./ui.js";

const views = {
  query: queryView,
  mislabel: mislabelView,
  decompositions: decompositionsView,
  jobs: jobsView,
  models: modelsView,
};
const initialised = new Set();
let current = null;

const dialog = document.getElementById("key-dialog");
const keyForm = document.getElementById("key-form");
let pendingKey = null;

/** Ask for the API key; resolves true when the user saved one. */
function askForKey() {
  if (pendingKey) return pendingKey;
  pendingKey = new Promise((resolve) => {
    keyForm.elements.key.value = apiKey();
    dialog.addEventListener(
      "close",
      () => {
        pendingKey = null;
        if (dialog.returnValue === "save" && keyForm.elements.key.value.trim()) {
          setApiKey(keyForm.elements.key.value.trim());
          resolve(true);
        } else {
          if (dialog.returnValue === "clear") setApiKey("");
          resolve(false);
        }
        updateKeyButton();
      },
      { once: true },
    );
    dialog.returnValue = ""; // Escape closes without a button: not the previous "save"
    dialog.showModal();
  });
  return pendingKey;
}

function updateKeyButton() {
  const button = document.getElementById("key-button");
  button.textContent = apiKey() ? "API key ✓" : "API key";
  button.setAttribute("aria-label", apiKey() ? "API key (set; change or forget it)" : "Enter API key");
}

async function checkHealth() {
  const badge = document.getElementById("health");
  try {
    const health = await api("/healthz");
    const ok = health.status === "ok";
    const workers = Number.isInteger(health.workers) ? ` · workers: ${health.workers}` : "";
    badge.textContent = `${ok ? "service ok" : "service degraded"}${workers}`;
    badge.dataset.state = ok ? "ok" : "warn";
  } catch (error) {
    badge.textContent = "service unreachable";
    badge.dataset.state = "error";
    badge.title = errorText(error);
  }
}

async function route() {
  const [name, arg] = location.hash.replace(/^#/, "").split("/");
  const view = views[name] ? name : "query";
  if (current && current !== view) views[current].hide?.();
  current = view;
  for (const section of document.querySelectorAll(".view")) section.hidden = section.id !== `view-${view}`;
  for (const link of document.querySelectorAll("nav a")) {
    if (link.dataset.view === view) link.setAttribute("aria-current", "page");
    else link.removeAttribute("aria-current");
  }
  const message = document.getElementById("global-message");
  showMessage(message, "");
  try {
    if (!initialised.has(view)) {
      initialised.add(view);
      views[view].init(document.getElementById(`view-${view}`));
    }
    await views[view].show(arg ? decodeURIComponent(arg) : undefined);
  } catch (error) {
    showMessage(message, errorText(error));
  }
}

onUnauthorized(askForKey);
document.getElementById("key-button").addEventListener("click", () => askForKey());
window.addEventListener("hashchange", route);
window.addEventListener("unhandledrejection", (event) => {
  showMessage(document.getElementById("global-message"), errorText(event.reason));
  event.preventDefault();
});
updateKeyButton();
checkHealth();
route();
