// One paged column of ranked training points (thumbnail, score, label) read from
// GET /influence/{job}/ranking; used by the influence query and the mislabel finder.

import { api } from "./api.js";
import { fmt, guarded, h, labelText, thumbnail } from "./ui.js";

const PAGE = 10;

/**
 * A column for `direction` ("helpful" = highest score first, "harmful" = lowest first) of
 * test point `test` of job `id`. Returns {column, load}; `onReport` receives the solver report.
 */
export function rankingColumn({ id, test = 0, direction, title, note, trainId, trainRecord, onReport }) {
  const list = h("ol", { class: "ranking-list" });
  const status = h("span", { class: "muted", "aria-live": "polite" });
  const prev = h("button", { type: "button", class: "secondary", "aria-label": `${title}: previous page` }, "‹ Prev");
  const next = h("button", { type: "button", class: "secondary", "aria-label": `${title}: next page` }, "Next ›");
  const message = h("div", { class: "form-message" });
  const column = h(
    "section",
    { class: `card ranking ${direction}`, "data-direction": direction, "aria-label": title },
    h("h3", {}, title),
    note ? h("p", { class: "muted" }, note) : null,
    list,
    h("div", { class: "pager" }, prev, status, next),
    message,
  );
  let offset = 0;
  let total = 0;
  let latest = 0; // number of the newest request: older answers arriving late are dropped

  async function load() {
    const request = (latest += 1);
    const shown = offset;
    await guarded(message, null, async () => {
      const query = new URLSearchParams({ test, direction, limit: PAGE, offset: shown });
      let page;
      try {
        page = await api(`/influence/${encodeURIComponent(id)}/ranking?${query}`);
      } catch (error) {
        if (request === latest) throw error;
        return;
      }
      if (request !== latest) return;
      total = Number(page.total ?? 0);
      onReport?.(page.report);
      list.start = shown + 1;
      list.replaceChildren(
        ...(page.items ?? []).map((item) =>
          h(
            "li",
            { class: "ranked" },
            thumbnail(trainId, item.index, trainRecord, `training point ${item.index}`),
            h(
              "div",
              { class: "ranked-text" },
              h("span", { class: `score ${Number(item.score) >= 0 ? "pos" : "neg"}` }, fmt(item.score)),
              h("span", {}, `label ${item.label ?? labelText(trainRecord, item.target)}`),
              h("span", { class: "muted" }, `#${item.index}`),
            ),
          ),
        ),
      );
      const last = Math.min(shown + PAGE, total);
      status.textContent = total ? `${shown + 1}–${last} of ${total}` : "no points";
      prev.disabled = shown === 0;
      next.disabled = last >= total;
    });
  }
  prev.addEventListener("click", () => {
    offset = Math.max(0, offset - PAGE);
    load();
  });
  next.addEventListener("click", () => {
    if (total && offset + PAGE >= total) return; // clicked again before the button updated
    offset += PAGE;
    load();
  });
  return { column, load };
}
