// The dashboard's only way to the server: JSON calls, job streams and authorised images.
// Every request is an ordinary public API call; the API key (if the server wants one)
// lives in sessionStorage and goes in the Authorization header.

const KEY_STORAGE = "influence-service.api-key";
export const TERMINAL = new Set(["succeeded", "failed", "canceled"]);

let askForKey = async () => false;

/** Install the function that prompts for a key after a 401; it resolves true when one was set. */
export function onUnauthorized(prompt) {
  askForKey = prompt;
}

export function apiKey() {
  return sessionStorage.getItem(KEY_STORAGE) || "";
}

export function setApiKey(key) {
  if (key) sessionStorage.setItem(KEY_STORAGE, key);
  else sessionStorage.removeItem(KEY_STORAGE);
  imageCache.clear();
}

export class ApiError extends Error {
  constructor(status, message, retryAfter = null) {
    super(message);
    this.name = "ApiError";
    this.status = status;
    this.retryAfter = retryAfter; // the Retry-After header, if the server sent one
  }
}

function fieldName(loc) {
  return (loc || []).filter((part) => part !== "body" && part !== "query").join(".");
}

/** Turn an error body (FastAPI's {"detail": ...} or anything else) into one readable line. */
function describeError(status, body) {
  const detail = body && typeof body === "object" ? body.detail : body;
  if (Array.isArray(detail)) {
    return detail
      .map((item) => {
        const field = fieldName(item.loc);
        return field ? `${field}: ${item.msg}` : item.msg || JSON.stringify(item);
      })
      .join("; ");
  }
  if (typeof detail === "string" && detail.trim() && !detail.includes("<")) return detail.slice(0, 300);
  if (detail && typeof detail === "object") return JSON.stringify(detail);
  return `the server answered ${status}`;
}

function headers(extra = {}) {
  const all = { Accept: "application/json", ...extra };
  const key = apiKey();
  if (key) all.Authorization = `Bearer ${key}`;
  return all;
}

async function send(path, init) {
  let response = await fetch(path, { ...init, headers: headers(init.headers) });
  if (response.status === 401 && (await askForKey())) {
    response = await fetch(path, { ...init, headers: headers(init.headers) });
  }
  if (!response.ok) {
    const text = await response.text();
    let body = text;
    try {
      body = JSON.parse(text);
    } catch {
      // not JSON: keep the text
    }
    const retry = response.headers.get("Retry-After");
    const suffix = response.status === 429 && retry ? ` (retry after ${retry} s)` : "";
    throw new ApiError(response.status, describeError(response.status, body) + suffix, retry);
  }
  return response;
}

/** Call the API and return its JSON (null for an empty answer). `json` or `form` is the body. */
export async function api(path, { method = "GET", json, form } = {}) {
  const init = { method, headers: {} };
  if (json !== undefined) {
    init.body = JSON.stringify(json);
    init.headers["Content-Type"] = "application/json";
  } else if (form !== undefined) {
    init.body = form;
  }
  const response = await send(path, init);
  const text = await response.text();
  return text ? JSON.parse(text) : null;
}

/** Fetch a binary resource (with the key) and return it as a Blob. */
export async function apiBlob(path) {
  const response = await send(path, { method: "GET", headers: { Accept: "*/*" } });
  return response.blob();
}

/** Lists come bare (models, datasets) or wrapped as {"items": [...]} (jobs). */
export function items(answer) {
  return Array.isArray(answer) ? answer : answer?.items ?? [];
}

/** The id of a job from a 202 answer ({"job"}) or a job record ({"id"}, a cached 200). */
export function jobId(answer) {
  return answer.job ?? answer.id;
}

const imageCache = new Map();

/** An object URL for an image the API serves (fetched with the key, cached per page). */
export function imageUrl(path) {
  if (!imageCache.has(path)) {
    const url = apiBlob(path).then((blob) => URL.createObjectURL(blob));
    imageCache.set(path, url);
    // a failed fetch is not kept: the next thumbnail of this item tries again
    url.catch(() => {
      if (imageCache.get(path) === url) imageCache.delete(path);
    });
  }
  return imageCache.get(path);
}

function parseEvents(buffer, onEvent) {
  const blocks = buffer.split(/\r?\n\r?\n/);
  const rest = blocks.pop();
  for (const block of blocks) {
    const data = block
      .split(/\r?\n/)
      .filter((line) => line.startsWith("data:"))
      .map((line) => line.slice(5).trimStart())
      .join("\n");
    if (!data) continue;
    try {
      onEvent(JSON.parse(data));
    } catch {
      // a non-JSON keep-alive or comment
    }
  }
  return rest;
}

async function streamJob(id, onUpdate) {
  const response = await send(`/jobs/${encodeURIComponent(id)}/events`, {
    method: "GET",
    headers: { Accept: "text/event-stream" },
  });
  const reader = response.body.pipeThrough(new TextDecoderStream()).getReader();
  let buffer = "";
  let last = null;
  for (;;) {
    const { value, done } = await reader.read();
    if (done) break;
    buffer = parseEvents(buffer + value, (event) => {
      last = { ...last, ...event };
      onUpdate(last);
    });
    if (last && TERMINAL.has(last.status)) {
      await reader.cancel();
      break;
    }
  }
}

const sleep = (ms) => new Promise((resolve) => setTimeout(resolve, ms));

/** Whether waiting can go on after `error`: a 429, a 5xx or a network failure (not a 401,
 * 403, 404 or 410: no key, not this key's job, no such job, its result is gone). */
function transient(error) {
  if (!(error instanceof ApiError)) return true; // fetch's network errors, a dropped body
  return error.status === 429 || error.status >= 500;
}

/** Milliseconds to wait after the `failures`-th transient error in a row. */
function retryDelay(error, failures) {
  const header = error instanceof ApiError ? error.retryAfter : null;
  if (header) {
    const seconds = /^\d+$/.test(header.trim()) ? Number(header) : (Date.parse(header) - Date.now()) / 1000;
    if (Number.isFinite(seconds)) return Math.min(Math.max(seconds, 0.5), 300) * 1000;
  }
  return Math.min(500 * 2 ** Math.max(0, failures - 1), 30_000);
}

/**
 * Follow a job until it ends: progress from its Server-Sent Events stream (read with fetch so
 * the API key can travel in a header), then the final record from GET /jobs/{id}. If the
 * stream is unavailable the job is polled instead. A 429, 5xx or network error waits
 * (Retry-After, else a growing back-off) and polls again; only 401, 403, 404 and 410 (and
 * other 4xx answers, which a retry cannot change) end the wait with an error. Resolves with
 * the final job record.
 */
export async function followJob(id, onUpdate) {
  let failures = 0;
  try {
    await streamJob(id, onUpdate);
  } catch (error) {
    // A refused stream (bad key, unknown job) is final; a dropped or throttled one falls
    // back to polling (after the Retry-After wait of a 429).
    if (!transient(error)) throw error;
    if (error instanceof ApiError && error.status === 429) {
      failures += 1;
      await sleep(retryDelay(error, failures));
    }
  }
  for (;;) {
    let job;
    try {
      job = await api(`/jobs/${encodeURIComponent(id)}`);
    } catch (error) {
      if (!transient(error)) throw error;
      failures += 1;
      await sleep(retryDelay(error, failures));
      continue;
    }
    failures = 0;
    onUpdate(job);
    if (TERMINAL.has(job.status)) return job;
    await sleep(700);
  }
}
