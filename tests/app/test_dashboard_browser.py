"""The dashboard in a real browser (Debian's Chromium driven by Playwright) against a real
server: uvicorn on a loopback port, real Redis, a real worker running the engine on the
built-in digits demo. Screenshots of each page go to test-artifacts/dashboard/.
"""

from __future__ import annotations

import re
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

import models
from app.cli import bootstrap_demo
from tests.app.conftest import LiveServer, WorkerThreads, delete_keys, make_settings

playwright_api = pytest.importorskip("playwright.sync_api")

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
ARTIFACTS = Path(__file__).resolve().parents[2] / "test-artifacts" / "dashboard"
JOB_TIMEOUT_MS = 240_000  # generous: the CI machine may be shared

pytestmark = [
    pytest.mark.browser,
    pytest.mark.skipif(not CHROMIUM.exists(), reason=f"{CHROMIUM} is not installed"),
]


@pytest.fixture(scope="module")
def server(redis_url: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveServer]:
    """The API with the demo registered (as `serve` does on first start) and one worker."""
    settings = make_settings(
        redis_url,
        tmp_path_factory.mktemp("dashboard") / "data",
        key_prefix=f"test-dashboard:{uuid.uuid4().hex[:12]}:",
    )
    bootstrap_demo(settings)
    live = LiveServer(settings).start()
    pool = WorkerThreads()
    pool.start(settings)
    yield live
    live.stop()
    pool.close()
    delete_keys(redis_url, settings.key_prefix)


@pytest.fixture(scope="module")
def browser() -> Iterator[object]:
    with playwright_api.sync_playwright() as driver:
        chromium = driver.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        yield chromium
        chromium.close()


@dataclass
class Session:
    """A page plus everything it logged and requested."""

    page: object
    base: str
    console_errors: list[str] = field(default_factory=list)
    requests: list[str] = field(default_factory=list)
    server_errors: list[str] = field(default_factory=list)

    def shot(self, name: str) -> Path:
        ARTIFACTS.mkdir(parents=True, exist_ok=True)
        path = ARTIFACTS / f"{name}.png"
        self.page.screenshot(path=str(path), full_page=True)
        return path

    def assert_clean(self, expected_statuses: tuple[int, ...] = ()) -> None:
        """No console or page errors except the browser's own note of a response we
        provoked on purpose (e.g. the 422 of a bad field); every request stayed local."""
        allowed = re.compile(
            r"Failed to load resource: the server responded with a status of "
            rf"({'|'.join(map(str, expected_statuses)) or 'none'}) "
        )
        unexpected = [e for e in self.console_errors if not allowed.match(e)]
        assert unexpected == []
        assert self.server_errors == []
        local = (f"{self.base}/", f"blob:{self.base}/")  # blobs: thumbnails fetched from here
        foreign = [url for url in self.requests if not url.startswith(local)]
        assert self.requests and foreign == []


@pytest.fixture
def session(browser: object, server: LiveServer) -> Iterator[Session]:
    context = browser.new_context(viewport={"width": 1366, "height": 900})
    page = context.new_page()
    page.set_default_timeout(30_000)
    state = Session(page=page, base=server.url)
    page.on("console", lambda m: state.console_errors.append(m.text) if m.type == "error" else None)
    page.on("pageerror", lambda e: state.console_errors.append(f"pageerror: {e}"))
    page.on("request", lambda r: state.requests.append(r.url))
    page.on(
        "response",
        lambda r: state.server_errors.append(f"{r.status} {r.url}") if r.status >= 500 else None,
    )
    yield state
    context.close()


def wait_for_job(page: object, box: str, form: str) -> None:
    """Wait until the progress bar in ``box`` reports a finished job (or ``form`` shows an
    error); the job must have succeeded."""
    finished = ", ".join(
        f"{box} .progress[data-status={status}]" for status in ("succeeded", "failed", "canceled")
    )
    page.wait_for_selector(f"{finished}, {form} .message.error", timeout=JOB_TIMEOUT_MS)
    bar = page.locator(f"{box} .progress")
    assert bar.get_attribute("data-status") == "succeeded", page.inner_text("main")
    assert bar.locator("progress").evaluate("p => p.value") == 1


def ranked_points(page: object, direction: str) -> list[tuple[float, str]]:
    """(score, label text) of each ranked point shown in a column, once its thumbnail loaded."""
    column = f".ranking[data-direction={direction}]"
    page.wait_for_function(
        f"""() => {{
            const imgs = [...document.querySelectorAll('{column} li img.thumb')];
            return imgs.length >= 5 && imgs.every((i) => i.complete && i.naturalWidth > 0);
        }}""",
        timeout=JOB_TIMEOUT_MS,
    )
    rows = page.locator(f"{column} li")
    return [
        (float(rows.nth(i).locator(".score").inner_text()), rows.nth(i).inner_text())
        for i in range(rows.count())
    ]


def test_influence_query_shows_helpful_and_harmful_points(session: Session) -> None:
    page = session.page
    page.goto(f"{session.base}/")
    page.wait_for_selector("#query-form select[name=model] option", state="attached")
    assert "demo-digits-mlp" in page.inner_text("#query-form select[name=model]")
    session.shot("01-query-form")

    page.get_by_role("button", name="Find influential training points").click()
    wait_for_job(page, "#query-progress", "#query-form")
    helpful = ranked_points(page, "helpful")
    harmful = ranked_points(page, "harmful")
    assert len(helpful) >= 5 and len(harmful) >= 5
    assert all(score > 0 for score, _ in helpful[:5])
    assert all(score < 0 for score, _ in harmful[:5])
    assert [s for s, _ in helpful] == sorted((s for s, _ in helpful), reverse=True)
    assert all("label" in text for _, text in helpful + harmful)
    page.wait_for_function(
        "() => document.querySelector('.test-example img.thumb')?.naturalWidth > 0"
    )
    report = page.inner_text(".report-card")
    assert "iterations" in report and "relative residual" in report and "converged" in report
    export = page.get_by_role("link", name="Export scores (safetensors)")
    assert re.fullmatch(r"/influence/[0-9a-f-]+/scores", export.get_attribute("href"))
    session.shot("02-query-result")
    # without a key too, the export is fetched by the page: a refusal shows as a message
    gone = {"detail": "the scores artifact is gone; run the query again"}
    page.route(re.compile(r".*/scores$"), lambda route: route.fulfill(status=410, json=gone))
    export.click()
    refused = page.locator(".export-message .message.error")
    refused.wait_for()
    assert "410" in refused.inner_text() and "gone" in refused.inner_text()
    page.unroute(re.compile(r".*/scores$"))
    with page.expect_download() as download:
        export.click()
    assert download.value.suggested_filename.startswith("scores-")
    assert page.locator(".export-message .message").count() == 0

    first = page.locator(".ranking[data-direction=helpful] li").first.inner_text()
    page.get_by_role("button", name="Top helpful: next page").click()
    page.wait_for_function(
        "() => document.querySelector('.ranking[data-direction=helpful] .pager span')"
        ".textContent.startsWith('11–20')"
    )
    assert page.locator(".ranking[data-direction=helpful] li").first.inner_text() != first

    page.fill("#query-form input[name=damping]", "-1")
    page.get_by_role("button", name="Find influential training points").click()
    message = page.locator("#query-form .message.error")
    message.wait_for()
    assert "422" in message.inner_text() and "damping" in message.inner_text()
    session.shot("03-validation-error")
    session.assert_clean(expected_statuses=(410, 422))


def test_a_test_example_can_be_entered_by_value(session: Session) -> None:
    page = session.page
    page.goto(f"{session.base}/")
    page.get_by_label("enter values").check()
    digit = [0.0] * 64
    for i in (4, 11, 12, 19, 20, 27, 28, 35, 36, 43, 44, 51, 52, 59):
        digit[i] = 16.0  # a vertical stroke: a "1"
    page.get_by_label("Inputs (JSON, one row per example)").fill(f"[{digit}]")
    page.get_by_label("Targets (JSON)").fill("[1]")
    page.get_by_role("button", name="Find influential training points").click()
    wait_for_job(page, "#query-progress", "#query-form")
    assert len(ranked_points(page, "helpful")) >= 5
    assert "target 1" in page.inner_text(".test-example")
    session.assert_clean()


def test_switching_test_examples_quickly_shows_the_last_one_chosen(session: Session) -> None:
    page = session.page
    page.goto(f"{session.base}/")
    page.fill("#query-form input[name=indices]", "3, 4, 5")
    page.get_by_role("button", name="Find influential training points").click()
    wait_for_job(page, "#query-progress", "#query-form")
    page.wait_for_selector(".test-example >> text=index 3")
    held = []  # test example 4's item request, answered only after 5 was drawn
    page.route(re.compile(r".*/items/4$"), lambda route: held.append(route))
    picker = page.get_by_label("Test example shown")
    picker.select_option(label="test index 4")
    for _ in range(200):  # until the page has sent it
        if held:
            break
        page.wait_for_timeout(50)
    assert len(held) == 1
    picker.select_option(label="test index 5")
    page.wait_for_selector(".test-example >> text=index 5")
    held[0].continue_()
    page.wait_for_load_state("networkidle")
    assert "index 5" in page.inner_text(".test-example")
    assert page.locator(".test-example").count() == 1
    session.assert_clean()


def test_a_job_is_followed_through_throttling_and_errors(session: Session) -> None:
    page = session.page
    throttled = {"status": 429, "headers": {"Retry-After": "1"}, "json": {"detail": "slow down"}}
    page.route(re.compile(r".*/jobs/[^/?]+/events$"), lambda route: route.fulfill(**throttled))
    polls: list[str] = []

    def poll(route: object) -> None:
        polls.append(route.request.url)
        if len(polls) == 1:
            route.fulfill(**throttled)
        elif len(polls) == 2:
            route.abort("failed")  # a network error
        elif len(polls) == 3:
            route.fulfill(status=503, json={"detail": "Redis is unavailable"})
        else:
            route.continue_()

    page.route(re.compile(r".*/jobs/[^/?]+$"), poll)
    page.goto(f"{session.base}/")
    page.wait_for_selector("#query-form select[name=model] option", state="attached")
    page.fill("#query-form input[name=damping]", "0.00123")  # a new query: not a cached answer
    page.get_by_role("button", name="Find influential training points").click()
    wait_for_job(page, "#query-progress", "#query-form")
    assert len(ranked_points(page, "helpful")) >= 5
    assert len(polls) >= 4
    failed = re.compile(r"Failed to load resource: (net::ERR_FAILED|.* status of (429|503) )")
    assert [e for e in session.console_errors if not failed.match(e)] == []


def test_verify_with_pbrf_plots_predicted_against_actual(session: Session) -> None:
    page = session.page
    page.goto(f"{session.base}/")
    page.get_by_role("button", name="Find influential training points").click()
    wait_for_job(page, "#query-progress", "#query-form")
    page.fill(".verify input[name=top]", "3")
    page.get_by_role("button", name="Verify with PBRF").click()
    wait_for_job(page, ".verify", ".verify")
    chart = page.locator(".verify svg.chart")
    assert "Pearson" in chart.get_attribute("aria-label")
    assert chart.locator("circle.dot").count() >= 3
    report = page.inner_text(".verify .verify-report")
    assert "Solver report" in report and "method" in report and "No solver report" not in report
    session.shot("04-verify")
    session.assert_clean()


def test_mislabel_finder_ranks_by_self_influence(session: Session) -> None:
    page = session.page
    page.goto(f"{session.base}/#mislabel")
    page.wait_for_selector("#mislabel-form select[name=model] option", state="attached")
    page.get_by_role("button", name="Rank by self-influence").click()
    wait_for_job(page, "#mislabel-progress", "#mislabel-form")
    points = ranked_points(page, "helpful")
    assert len(points) >= 5 and all(score > 0 for score, _ in points)
    assert [s for s, _ in points] == sorted((s for s, _ in points), reverse=True)
    session.shot("05-mislabel")
    session.assert_clean()


def test_decomposition_result_opens_with_its_charts(session: Session) -> None:
    page = session.page
    page.goto(f"{session.base}/#decompositions")
    page.wait_for_selector("#decomp-form select[name=model] option", state="attached")
    page.fill("#decomp-form input[name=num_points]", "2")
    page.fill("#decomp-form input[name=num_test]", "2")
    page.fill("#decomp-form input[name=epochs]", "4")  # cheap retraining: K/2 = 2 epochs
    page.check("#decomp-form input[name=mislabel]")  # + one 4-epoch run on corrupted labels
    page.get_by_role("button", name="Run decomposition").click()
    page.get_by_role("link", name="Jobs").click()  # move on while it runs
    page.wait_for_selector("#decomp-form .message.ok", state="attached", timeout=JOB_TIMEOUT_MS)
    page.wait_for_selector("#decomp-list a", state="attached")  # its run list is refreshed
    page.wait_for_timeout(300)
    assert page.evaluate("() => location.hash") == "#jobs"  # not pulled back to the result
    assert page.locator("#view-jobs").is_visible()
    page.get_by_role("link", name="Decompositions").click()
    wait_for_job(page, "#decomp-progress", "#decomp-form")
    page.get_by_role("link", name=re.compile(r"^Open ")).first.click()
    result = page.locator(".decomposition")
    result.wait_for()
    gaps = result.locator("table.gaps tbody tr")
    assert gaps.count() == 4  # a checkpoint has no recorded θ⁰: no warm-start gap
    assert "non-convergence" in result.locator("table.gaps").inner_text()
    assert result.locator("svg.chart rect.bar").count() == 4
    scatters = result.locator("svg.chart", has=page.locator("circle.dot"))
    assert scatters.count() == 2  # warm-start and PBRF against influence
    assert all("Pearson" in scatters.nth(i).get_attribute("aria-label") for i in range(2))
    mislabel = result.locator("svg.chart.mislabel-chart")
    assert mislabel.count() == 1 and mislabel.get_attribute("role") == "img"
    assert "Mislabel detection" in mislabel.get_attribute("aria-label")
    assert mislabel.locator("polyline.line").count() == 3
    labels = mislabel.locator(".legend-label").all_text_contents()
    assert labels == ["self-influence", "training loss", "random"]
    assert "fraction of corrupted labels found" in mislabel.inner_html()
    mislabel.scroll_into_view_if_needed()
    session.shot("06-decomposition")
    session.assert_clean()


def test_jobs_page_cancels_a_running_job(session: Session) -> None:
    page = session.page
    page.goto(f"{session.base}/#decompositions")
    page.wait_for_selector("#decomp-form select[name=model] option", state="attached")
    page.fill("#decomp-form input[name=num_points]", "50")  # minutes of retraining
    page.get_by_role("button", name="Run decomposition").click()
    page.wait_for_selector(
        "#decomp-progress .progress[data-status=running]", timeout=JOB_TIMEOUT_MS
    )
    page.get_by_role("link", name="Jobs").click()
    running = page.locator("tr[data-status=running]")
    running.first.wait_for()
    session.shot("07-jobs-running")
    running.first.get_by_role("button", name=re.compile("^Cancel job")).click()
    page.wait_for_selector("tr[data-status=canceled]", timeout=JOB_TIMEOUT_MS)
    assert page.locator("tr[data-status=running]").count() == 0
    session.shot("08-jobs-canceled")
    page.get_by_role("link", name="Decompositions").click()
    assert "canceled" in page.inner_text("#decomp-form .message.error")
    session.assert_clean()


def test_models_page_lists_uploads_and_deletes(session: Session, server: LiveServer) -> None:
    """Runs last on the shared server: deleting the re-uploaded demo checkpoint removes it."""
    page = session.page
    page.on("dialog", lambda dialog: dialog.accept())  # the "Delete …?" confirmation
    page.goto(f"{session.base}/")
    page.get_by_role("link", name="Models & data").focus()
    page.keyboard.press("Enter")  # the navigation works from the keyboard
    # the page switch is asynchronous: wait for it (retries up to 5 s) instead of racing it
    playwright_api.expect(page.get_by_role("link", name="Models & data")).to_have_attribute(
        "aria-current", "page"
    )
    models_table = page.locator("#models-table")
    models_table.locator("th", has_text="demo-digits-mlp").wait_for()
    assert "digits-train" in page.inner_text("#datasets-table")

    datasets = page.locator("#datasets-table tbody tr")
    before = datasets.count()
    page.select_option("#dataset-builtin select[name=builtin]", "breast_cancer")
    page.get_by_role("button", name="Add dataset").click()
    page.locator("#dataset-builtin .message.ok").wait_for()
    assert datasets.count() == before + 1

    checkpoint, _, _ = models.demo_checkpoint(server.settings.data_dir / "demo")
    page.set_input_files("#model-upload input[name=weights]", str(checkpoint))
    page.fill("#model-upload input[name=name]", "uploaded-mlp")
    page.get_by_role("button", name="Upload model").click()
    page.locator("#model-upload .message.ok").wait_for()
    assert "3466 parameters" in page.inner_text("#model-upload .message.ok")
    models_table.locator("th", has_text="uploaded-mlp").wait_for()
    session.shot("09-models")

    page.get_by_role("button", name="Delete model uploaded-mlp").click()
    page.get_by_text("Deleted model uploaded-mlp.").wait_for()
    assert "uploaded-mlp" not in models_table.inner_text()

    page.set_viewport_size({"width": 420, "height": 900})
    assert page.evaluate("() => document.documentElement.scrollWidth") <= 420
    session.shot("10-models-narrow")
    session.assert_clean()


def test_api_key_is_asked_for_after_a_401_and_kept_for_the_session(
    browser: object, redis_url: str, tmp_path: Path
) -> None:
    settings = make_settings(redis_url, tmp_path / "data", api_keys={"key-carol": "carol"})
    live = LiveServer(settings).start()
    context = browser.new_context()
    try:
        page = context.new_page()
        state = Session(page=page, base=live.url)
        page.on(
            "console", lambda m: state.console_errors.append(m.text) if m.type == "error" else None
        )
        page.on("pageerror", lambda e: state.console_errors.append(f"pageerror: {e}"))
        page.on("request", lambda r: state.requests.append(r.url))
        page.goto(f"{live.url}/#models")
        dialog = page.get_by_role("dialog", name="API key")
        dialog.wait_for()
        dialog.get_by_label("Key").fill("key-carol")
        dialog.get_by_role("button", name="Save").click()
        page.get_by_text("No models yet.").wait_for()
        assert page.evaluate("() => Object.values(sessionStorage)") == ["key-carol"]
        page.get_by_role("button", name="API key (set; change or forget it)").click()
        dialog.wait_for()
        dialog.get_by_label("Key").fill("key-typed-then-dismissed")
        # closed without a button (close() keeps returnValue, as Escape does in some
        # browsers): the last dialog's "save" must not count, nothing is saved
        page.evaluate("() => document.getElementById('key-dialog').close()")
        dialog.wait_for(state="hidden")
        page.wait_for_timeout(300)  # the "close" event is dispatched in a later task
        assert page.evaluate("() => Object.values(sessionStorage)") == ["key-carol"]
        page.reload()
        page.get_by_text("No models yet.").wait_for()
        assert not page.get_by_role("dialog").is_visible()
        state.shot("11-api-key")

        # no key on the Jobs page: one prompt, Cancel, and the 2 s refresh stops asking
        page.evaluate("() => sessionStorage.clear()")
        page.goto("about:blank")
        state.requests.clear()
        page.goto(f"{live.url}/#jobs")
        dialog.wait_for()
        dialog.get_by_role("button", name="Cancel").click()
        page.get_by_text("automatic refresh stopped").wait_for()
        page.wait_for_timeout(4500)  # two refresh periods
        assert not dialog.is_visible()
        assert len([u for u in state.requests if u.endswith("/jobs")]) == 1
        state.assert_clean(expected_statuses=(401,))
    finally:
        context.close()
        live.stop()
        delete_keys(redis_url, settings.key_prefix)
