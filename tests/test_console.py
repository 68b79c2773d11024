"""The web console in a real headless Chromium (Debian's `chromium`, driven by Playwright).

Fast: the deploy form shows the API's 422 next to its fields and a 409 clearly; a platform with an admin
key gets the key form, keeps the key in sessionStorage and never renders it; static files and headers.
Slow: the whole flow with real processes — deploy the embedded model from the form, watch it run, chat in
the playground (TTFT, tokens/s, view code), score, logs and charts, scale dialog, delete with confirmation.
Every page is checked for console errors and uncaught exceptions; screenshots go to docs/screenshots/.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
from tests.net import free_port

playwright_api = pytest.importorskip("playwright.sync_api", reason="pip install playwright (the `test` extra)")
expect = playwright_api.expect

CHROMIUM = os.environ.get("FLEETSERVE_CHROMIUM", "/usr/bin/chromium")
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]
SCREENSHOTS = Path(__file__).resolve().parent.parent / "docs" / "screenshots"
DESKTOP = {"width": 1280, "height": 860}
PHONE = {"width": 390, "height": 844}

if not Path(CHROMIUM).exists():
    pytest.skip(f"no Chromium at {CHROMIUM}: `make install` installs it (apt-get install chromium)",
                allow_module_level=True)


# ---- the platform as a real process ----------------------------------------------------------------


class PlatformProcess:
    def __init__(self, home: Path, log: Path, api_key: str | None = None):
        self.port = free_port()
        self.base = f"http://127.0.0.1:{self.port}"
        self.api_key = api_key
        self.log = log
        env = {**os.environ, "FLEETSERVE_HOME": str(home)}
        env.pop("FLEETSERVE_API_KEY", None)
        argv = [sys.executable, "-m", "fleetserve", "up", "--port", str(self.port), "--no-default-deployment"]
        if api_key:
            argv += ["--api-key", api_key]
        self.proc = subprocess.Popen(argv, env=env, stdout=open(log, "ab"), stderr=subprocess.STDOUT,
                                     start_new_session=True)
        deadline = time.time() + 90
        while time.time() < deadline:
            assert self.proc.poll() is None, f"`fleetserve up` exited:\n{log.read_text()[-3000:]}"
            try:
                if httpx.get(f"{self.base}/healthz", timeout=2).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.3)
        raise AssertionError(f"the platform did not start:\n{log.read_text()[-3000:]}")

    def client(self) -> httpx.Client:
        headers = {"Authorization": f"Bearer {self.api_key}"} if self.api_key else {}
        return httpx.Client(base_url=self.base, headers=headers, timeout=10)

    def stop(self) -> None:
        pids = []
        try:
            with self.client() as c:
                pids = [r["pid"] for d in c.get("/api/v1/deployments").json() for r in d["replicas"] if r["pid"]]
        except (httpx.HTTPError, ValueError, KeyError, TypeError):
            pass
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)  # the platform drains and stops its replicas
            try:
                self.proc.wait(timeout=40)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
        for pid in pids:  # belt and braces: no replica outlives the test
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass


@pytest.fixture(scope="module")
def platform_home(tmp_path_factory, default_gguf) -> Path:
    home = tmp_path_factory.mktemp("console") / "home"
    (home / "models" / "default").mkdir(parents=True)
    shutil.copy(default_gguf, home / "models" / "default" / default_gguf.name)  # no download in tests
    return home


@pytest.fixture(scope="module")
def platform(platform_home, tmp_path_factory):
    p = PlatformProcess(platform_home, tmp_path_factory.mktemp("logs") / "up.log")
    yield p
    p.stop()


# ---- the browser --------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def browser():
    with playwright_api.sync_playwright() as pw:
        b = pw.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        yield b
        b.close()


class ConsoleWatch:
    """Collects console errors and uncaught exceptions of a page. `allow_status` lists the HTTP statuses a
    test provokes on purpose (Chromium logs every 4xx answer to fetch as a console error)."""

    def __init__(self, page, allow_status: tuple[int, ...] = ()):
        self.errors: list[str] = []
        self.allowed = [re.compile(rf"status of {s}\b") for s in allow_status]
        page.on("console", self._console)
        page.on("pageerror", lambda exc: self.errors.append(f"pageerror: {exc}"))

    def _console(self, msg) -> None:
        if msg.type == "error" and not any(a.search(msg.text) for a in self.allowed):
            self.errors.append(f"console.error: {msg.text} at {msg.location}")

    def check(self) -> None:
        assert not self.errors, "errors in the browser console:\n" + "\n".join(self.errors)


@pytest.fixture
def open_page(browser):
    contexts = []

    def open_(allow_status: tuple[int, ...] = (), viewport: dict | None = None):
        context = browser.new_context(viewport=viewport or DESKTOP)
        contexts.append(context)
        page = context.new_page()
        page.set_default_timeout(15_000)
        return page, ConsoleWatch(page, allow_status)

    yield open_
    for c in contexts:
        c.close()


def _no_horizontal_scroll(page) -> None:
    page.wait_for_timeout(300)  # let resize observers (the charts) settle after a viewport change
    overflow = page.evaluate("document.scrollingElement.scrollWidth - window.innerWidth")
    assert overflow <= 1, f"the page scrolls sideways by {overflow}px at {page.viewport_size}"


def _shot(page, name: str, full_page: bool = False) -> None:
    SCREENSHOTS.mkdir(parents=True, exist_ok=True)
    page.evaluate("document.activeElement && document.activeElement.blur()")  # no focus ring in the picture
    page.screenshot(path=str(SCREENSHOTS / f"{name}.png"), full_page=full_page)


# ---- fast tests ---------------------------------------------------------------------------------------

def test_static_files_are_served_without_auth(tmp_path):
    p = PlatformProcess(tmp_path / "home", tmp_path / "up.log", api_key="sk-admin-" + "s" * 20)
    try:
        index = httpx.get(f"{p.base}/")
        assert index.status_code == 200 and index.headers["content-type"].startswith("text/html")
        assert "Content-Security-Policy" in index.headers and index.headers["x-content-type-options"] == "nosniff"
        for path, ctype in [("/static/js/app.js", "text/javascript"), ("/static/console.css", "text/css"),
                            ("/static/vendor/uPlot.iife.min.js", "text/javascript"),
                            ("/static/vendor/uPlot.min.css", "text/css"), ("/favicon.ico", "image/svg+xml")]:
            r = httpx.get(f"{p.base}{path}")
            assert r.status_code == 200 and r.headers["content-type"].startswith(ctype), (path, r.headers)
        assert httpx.get(f"{p.base}/static/nope.js").status_code == 404
        assert httpx.get(f"{p.base}/static/../routes.py").status_code == 404
        assert httpx.get(f"{p.base}/api/v1/deployments").status_code == 401  # the data still needs the key
    finally:
        p.stop()


def test_form_shows_api_validation_and_conflicts(platform, open_page):
    page, watch = open_page(allow_status=(409, 422))
    page.goto(f"{platform.base}/#/new")
    expect(page.get_by_role("heading", name="New deployment")).to_be_visible()
    # every input, select and textarea has a visible label
    for control in page.locator("main input, main select, main textarea").all():
        cid = control.get_attribute("id")
        assert cid and page.locator(f"label[for='{cid}']").is_visible(), f"no visible label for #{cid}"
    assert page.get_by_label("Model", exact=True).input_value() == "default"
    assert page.get_by_label("Hugging Face token (optional)").get_attribute("type") == "password"
    # fields the API does not accept yet are not offered
    text = page.inner_text("main").lower()
    assert "scale to zero" not in text and "gpu type" not in text
    # the native engine's speed options are offered as the API takes them (engine_args)
    assert page.get_by_label("Speculative decoding").input_value() == ""
    assert "ngram" in page.get_by_label("Speculative decoding").inner_text()
    assert page.get_by_label("Tensor parallel size").get_attribute("type") == "number"

    page.get_by_label("Deployment name").fill("Bad_Name")
    page.get_by_label("Min replicas").fill("3")
    page.get_by_label("Max replicas").fill("1")
    page.get_by_role("button", name="Deploy").click()
    name_error = page.locator("[data-error-for='name']")
    expect(name_error).to_contain_text("DNS label")
    expect(page.get_by_label("Deployment name")).to_have_attribute("aria-invalid", "true")
    expect(page.locator("[data-error-for='replicas']")).to_contain_text("replicas.max (1) must be >= replicas.min (3)")
    expect(page.locator(".form-summary")).to_contain_text("rejected")
    assert page.evaluate("location.hash") == "#/new"  # still on the form

    # a name that is taken: 409, shown at the name and on top, with a link to the existing deployment
    with platform.client() as c:
        r = c.post("/api/v1/deployments", json={"name": "taken", "model": "default", "replicas": {"min": 0, "max": 1}})
        assert r.status_code == 201, r.text
    try:
        page.get_by_label("Deployment name").fill("taken")
        page.get_by_label("Min replicas").fill("0")
        page.get_by_role("button", name="Deploy").click()
        expect(name_error).to_contain_text("already exists")
        expect(page.locator(".form-summary")).to_contain_text("Name already taken")
        expect(page.locator(".form-summary a[href='#/d/taken']")).to_be_visible()
        _no_horizontal_scroll(page)

        # the list shows it, scaled to zero; on a phone too
        page.goto(f"{platform.base}/#/")
        row = page.locator("tr[data-name='taken']")
        expect(row.locator(".badge")).to_have_text("scaled to zero")
        expect(row).to_contain_text("0/0")
        page.set_viewport_size(PHONE)
        expect(row).to_be_visible()
        _no_horizontal_scroll(page)
        page.set_viewport_size(DESKTOP)

        # keyboard: on a fresh load the first Tab reaches the skip link, and focus is visible
        page.reload()
        expect(row).to_be_visible()
        page.keyboard.press("Tab")
        focused = page.evaluate("[document.activeElement.className, getComputedStyle(document.activeElement).outlineStyle]")
        assert focused[0] == "skip-link" and focused[1] != "none", focused
    finally:
        with platform.client() as c:
            c.delete("/api/v1/deployments/taken")
    watch.check()


def test_admin_key_form(tmp_path, open_page):
    key = "sk-admin-" + "k" * 24
    p = PlatformProcess(tmp_path / "home", tmp_path / "up.log", api_key=key)  # its own home: no deployments
    try:
        page, watch = open_page(allow_status=(401,))
        page.goto(f"{p.base}/")
        expect(page.get_by_role("heading", name="Admin key required")).to_be_visible()
        key_input = page.get_by_label("Admin API key")
        assert key_input.get_attribute("type") == "password"

        key_input.fill("wrong-key")
        page.get_by_role("button", name="Unlock console").click()
        expect(page.locator("#api-key-error")).to_contain_text("not accepted")
        assert page.evaluate("sessionStorage.getItem('fleetserve.apiKey')") is None

        page.get_by_label("Admin API key").fill(key)
        page.get_by_role("button", name="Unlock console").click()
        expect(page.get_by_role("heading", name="Deployments", exact=True)).to_be_visible()
        expect(page.get_by_text("No deployments yet")).to_be_visible()
        assert page.evaluate("sessionStorage.getItem('fleetserve.apiKey')") == key
        assert key not in page.content(), "the key must never be rendered"

        page.reload()  # the key lasts for the tab's session
        expect(page.get_by_text("No deployments yet")).to_be_visible()
        page.goto(f"{p.base}/#/new")
        expect(page.get_by_role("heading", name="New deployment")).to_be_visible()
        assert key not in page.content()

        page.get_by_role("button", name="Forget key").click()
        expect(page.get_by_role("heading", name="Admin key required")).to_be_visible()
        assert page.evaluate("sessionStorage.getItem('fleetserve.apiKey')") is None
        watch.check()
    finally:
        p.stop()


# ---- the whole flow with a real replica -----------------------------------------------------------------

@pytest.mark.slow
def test_deploy_watch_chat_debug_delete(platform, open_page):
    base = platform.base
    page, watch = open_page()
    page.goto(f"{base}/")
    expect(page.get_by_text("No deployments yet")).to_be_visible()

    # deploy the embedded model from the form
    page.get_by_role("navigation", name="Main").get_by_role("link", name="New deployment").click()
    expect(page.get_by_role("heading", name="New deployment")).to_be_visible()
    page.get_by_label("Model", exact=True).fill("default")
    page.get_by_label("Deployment name").fill("chat")
    page.get_by_label("Max model length").fill("2048")
    page.get_by_label("Min replicas").fill("1")
    page.get_by_label("Max replicas").fill("1")
    page.get_by_label("Max queue length").fill("64")
    _shot(page, "new", full_page=True)
    page.get_by_role("button", name="Deploy").click()

    expect(page).to_have_url(re.compile(r"#/d/chat$"))
    expect(page.get_by_role("heading", name="chat", exact=True)).to_be_visible()
    expect(page.locator(".head-badge .badge")).to_have_text("running", timeout=240_000)
    expect(page.get_by_label("OpenAI-compatible base URL")).to_have_value(f"{base}/v1")
    expect(page.get_by_role("button", name="Copy URL")).to_be_visible()
    curl = page.locator(".code-block code").first
    expect(curl).to_contain_text(f"curl {base}/v1/chat/completions")
    expect(curl).to_contain_text('"model": "chat"')
    page.get_by_role("tab", name="Python").click()
    expect(page.locator(".tab-panel:visible code")).to_contain_text(f'base_url="{base}/v1"')
    page.get_by_role("tab", name="JavaScript").click()
    expect(page.locator(".tab-panel:visible code")).to_contain_text("fetch(")
    expect(page.locator(".timeline")).to_contain_text("ReplicaReady")
    expect(page.locator(".kv")).to_contain_text("max_queue_len=64")
    expect(page.locator(".log-line").first).to_be_visible(timeout=30_000)
    expect(page.locator(".chart[data-chart='replicas'] .chart-value")).to_have_text(
        re.compile(r"^ready 1 · desired 1 · in flight \d+$"), timeout=30_000)

    # the playground: a streamed answer with TTFT and tokens/s
    page.get_by_role("link", name="Open playground").click()
    expect(page.get_by_role("heading", name="Playground: chat")).to_be_visible()
    page.get_by_label("Temperature value").fill("0")
    page.get_by_label("Message").fill("What is the capital of France?")
    page.get_by_label("Message").press("Enter")
    reply = page.locator(".msg-assistant").last
    expect(reply.locator("[data-stat='tps']")).to_contain_text("tok/s", timeout=60_000)
    expect(reply.locator(".msg-content")).to_have_text("The capital of France is Paris.")
    expect(reply.locator("[data-stat='ttft']")).to_contain_text(re.compile(r"TTFT [\d,]+ ms"))
    _shot(page, "playground")
    page.get_by_role("button", name="View code").click()
    dialog = page.get_by_role("dialog")
    expect(dialog).to_contain_text("curl")
    expect(dialog.locator(".code-block code").first).to_contain_text("The capital of France is Paris.")
    dialog.get_by_role("tab", name="Python").click()
    expect(dialog.locator(".tab-panel:visible code")).to_contain_text("client.chat.completions.create(")
    page.keyboard.press("Escape")
    expect(page.get_by_role("dialog")).to_have_count(0)

    # the score tab: /loglikelihood through the gateway
    page.get_by_role("tab", name="Score (log-likelihood)").click()
    page.get_by_role("button", name="Score", exact=True).click()
    expect(page.locator(".score-results tbody tr").first).to_contain_text("Paris", timeout=30_000)
    page.set_viewport_size(PHONE)
    page.get_by_role("tab", name="Chat").click()
    _no_horizontal_scroll(page)
    page.set_viewport_size(DESKTOP)

    # back on the deployment page: logs with their filters, charts with traffic
    page.get_by_role("link", name="Deployment details").click()
    expect(page.locator(".log-line").first).to_be_visible(timeout=30_000)
    page.get_by_label("Level").select_option("warning")
    expect(page.locator(".log-line:not(.level-warning):not(.level-error):not(.level-critical)")).to_have_count(0)
    page.get_by_label("Level").select_option("")
    page.get_by_label("Filter").fill("ready")
    expect(page.locator(".log-line").first).to_contain_text("ready")
    page.get_by_label("Filter").fill("")
    replica_id = page.locator(".log-replica").first.inner_text()
    page.get_by_label("Replica", exact=True).select_option(replica_id)
    assert set(page.locator(".log-replica").all_inner_texts()) == {replica_id}
    expect(page.locator(".chart[data-chart='tokens'] canvas")).to_have_count(1)
    with platform.client() as c:
        for _ in range(3):
            c.post("/v1/chat/completions", json={"model": "chat", "max_tokens": 8,
                                                 "messages": [{"role": "user", "content": "Say hi"}]}, timeout=60)
        deadline = time.time() + 15
        while not any(pt["tokens_per_s"] > 0 for pt in c.get("/api/v1/deployments/chat/metrics").json()["series"]):
            assert time.time() < deadline, "the metrics never saw the traffic"
            time.sleep(0.5)
    expect(page.locator(".chart[data-chart='tokens'] .chart-value")).not_to_have_text("—")
    page.wait_for_timeout(2500)  # one more refresh, so the screenshot shows the traffic
    _shot(page, "deployment", full_page=True)
    page.set_viewport_size(PHONE)
    _no_horizontal_scroll(page)
    page.set_viewport_size(DESKTOP)

    # scale: a dialog with its own validation, closable with Escape
    page.get_by_role("button", name="Scale…").click()
    expect(page.get_by_role("dialog")).to_be_visible()
    page.get_by_role("dialog").get_by_label("Max replicas").fill("0")
    watch.allowed.append(re.compile(r"status of 422\b"))  # the invalid value on purpose
    page.get_by_role("dialog").get_by_role("button", name="Save").click()
    expect(page.locator("#scale-max-error")).not_to_be_empty()
    page.keyboard.press("Escape")
    expect(page.get_by_role("dialog")).to_have_count(0)
    watch.allowed.pop()

    # the list: running, 1/1, live numbers
    page.get_by_role("link", name="Deployments", exact=True).first.click()
    row = page.locator("tr[data-name='chat']")
    expect(row.locator(".badge")).to_have_text("running")
    expect(row).to_contain_text("1/1")
    _shot(page, "list")

    # delete: Escape cancels the confirmation, the button confirms it, then the deployment is gone
    row.get_by_role("link", name="chat").click()
    page.get_by_role("button", name="Delete…").click()
    expect(page.get_by_role("dialog")).to_contain_text("Delete chat?")
    page.keyboard.press("Escape")
    expect(page.get_by_role("dialog")).to_have_count(0)
    with platform.client() as c:
        assert c.get("/api/v1/deployments/chat").status_code == 200
    page.get_by_role("button", name="Delete…").click()
    page.get_by_role("dialog").get_by_role("button", name="Delete deployment").click()
    expect(page).to_have_url(re.compile(r"#/$"))
    expect(page.get_by_text("No deployments yet")).to_be_visible(timeout=60_000)
    with platform.client() as c:
        assert c.get("/api/v1/deployments/chat").status_code == 404
    watch.check()
