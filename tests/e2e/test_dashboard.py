"""The dashboard in a real headless Chromium (Debian's, driven by Playwright) against a real cluster serving
SmolLM2 behind API keys and an admin key: cluster rows, charts, the chat playground (streaming, Stop, multi-turn),
the live replica log, text-only rendering of model output and log lines, admin-gated scaling, and a layout that
fits a phone. Every test leaves a screenshot under test-artifacts/dashboard/; one becomes docs/img/dashboard.png."""
from __future__ import annotations

import json
import shutil
import threading
from pathlib import Path

import pytest

from support.cluster import Cluster, http
from support.waiting import wait_for
from gridserve.common.model_config import DEFAULT_MODEL_CONFIGS

pytestmark = pytest.mark.timeout(420)

REPO = Path(__file__).resolve().parents[2]
ARTIFACTS = REPO / "test-artifacts" / "dashboard"
DOCS_IMAGE = REPO / "docs" / "img" / "dashboard.png"
KEY = "sk-e2e-dashboard-0001"
ADMIN = "adm-e2e-dashboard-0001"
MODEL = "smollm2"
XSS = "<img src=x onerror=alert(1)>"
DESKTOP = {"width": 1280, "height": 800}


def chromium_path() -> str:
    path = shutil.which("chromium") or shutil.which("chromium-browser")
    if not path:
        pytest.fail("no chromium on PATH: `make install` installs Debian's with apt-get install -y chromium")
    return path


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    """Head (API keys and an admin key) with its proxy, one 2-CPU node, SmolLM2 deployed and READY once."""
    root = tmp_path_factory.mktemp("dashboard")
    (root / "keys").write_text(f"{KEY}\n")
    (root / "admin").write_text(f"{ADMIN}\n")
    with Cluster(root, DEFAULT_MODEL_CONFIGS) as c:
        c.start_head(["--api-key-file", str(root / "keys"), "--admin-key-file", str(root / "admin")])
        c.start_scheduler("n1", num_cpus=2, extra=["--threads-per-replica", "1"])  # it scales to 2 replicas
        c.cli("deploy", MODEL)
        c.wait_ready(MODEL, 1, timeout=240)
        yield c


@pytest.fixture(scope="module")
def browser():
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=chromium_path(), headless=True)
        try:
            yield b
        finally:
            b.close()


class Tab:
    """A page of the dashboard in its own browser context, with the console errors and dialogs it saw."""

    def __init__(self, browser, cluster: Cluster, viewport: dict, api_key: str = KEY, admin_key: str = ADMIN):
        self.context = browser.new_context(viewport=viewport)
        stored = {"gridserve.apiKey": api_key, "gridserve.adminKey": admin_key}
        self.context.add_init_script(f"for (const [k, v] of Object.entries({json.dumps(stored)})) "
                                     f"if (v) sessionStorage.setItem(k, v);")
        self.page = self.context.new_page()
        self.errors: list[str] = []
        self.dialogs: list[str] = []
        self.page.on("console", lambda m: m.type == "error" and self.errors.append(m.text))
        self.page.on("pageerror", lambda e: self.errors.append(str(e)))
        self.page.on("dialog", lambda d: (self.dialogs.append(d.message), d.dismiss()))
        self.page.goto(cluster.url("/dashboard"))

    def replica_row(self, replica_id: str):
        return self.page.locator(f'#replicas tr[data-key="{replica_id}"]')

    def wait_text(self, selector: str, text: str, timeout_s: float = 30) -> None:
        self.page.locator(selector).filter(has_text=text).first.wait_for(timeout=timeout_s * 1000)

    def shot(self, name: str, full_page: bool = False) -> Path:
        ARTIFACTS.mkdir(parents=True, exist_ok=True)
        path = ARTIFACTS / f"{name}.png"
        self.page.screenshot(path=str(path), full_page=full_page)
        return path

    def close(self) -> None:
        self.context.close()


@pytest.fixture
def tabs(browser, cluster, request):
    """Opens Tabs; each one's screenshot is saved at the end of the test, whatever its outcome."""
    opened: list[Tab] = []

    def open_tab(viewport: dict = DESKTOP, **kw) -> Tab:
        opened.append(Tab(browser, cluster, viewport, **kw))
        return opened[-1]

    yield open_tab
    for i, tab in enumerate(opened):
        tab.shot(request.node.name + (f"-{i}" if i else ""), full_page=True)
        tab.close()


def ready_replica(cluster: Cluster) -> str:
    return cluster.wait_ready(MODEL, 1)[0].replica_id


def chat(tab: Tab, text: str, max_tokens: int, temperature: float = 0.0, wait: bool = True) -> None:
    page = tab.page
    page.fill("#pg-temperature", str(temperature))
    page.fill("#pg-max-tokens", str(max_tokens))
    page.fill("#pg-input", text)
    page.click("#pg-send")
    if wait:
        page.wait_for_function("() => document.querySelector('#pg-stats').dataset.outcome !== undefined "
                               "&& !document.querySelector('#pg-send').disabled", timeout=120_000)


def last_answer(tab: Tab) -> str:
    return tab.page.locator("#pg-conversation .msg.assistant .text").last.text_content()


def test_page_loads_without_console_errors_and_shows_node_and_replica_ready(cluster, tabs):
    tab = tabs()
    rid = ready_replica(cluster)
    tab.wait_text(f'#replicas tr[data-key="{rid}"] .state', "READY")
    tab.wait_text('#nodes tr[data-key="n1"] .state', "READY")
    tab.wait_text('#deployments tr[data-key="smollm2"] .ready-count', "1/1")
    tab.wait_text("#conn", "live")
    assert tab.replica_row(rid).locator("td").nth(1).text_content() == MODEL
    assert tab.page.locator("#proxies tbody tr").count() == 1
    assert tab.errors == []


def test_read_views_need_a_key_and_never_carry_the_cluster_token(cluster):
    status, _, _ = http("GET", cluster.url("/dashboard/api/cluster"))
    assert status == 401
    token = cluster.token_file.read_text().strip()
    for path in ("/dashboard", "/dashboard/static/app.js", "/dashboard/api/cluster", "/dashboard/api/history",
                 "/dashboard/api/catalog", "/dashboard/api/config"):
        status, headers, body = http("GET", cluster.url(path), headers={"Authorization": f"Bearer {KEY}"})
        assert status == 200, path
        assert token not in b"".join(body).decode() and token not in json.dumps(headers)
    _, headers, _ = http("GET", cluster.url("/dashboard"))
    assert "script-src 'self'" in headers["content-security-policy"]
    status, headers, _ = http("GET", cluster.url("/dashboard/"))
    assert status == 302 and headers["location"] == "/dashboard"


def test_a_chart_has_points_after_some_load(cluster, tabs):
    tab = tabs({"width": 1280, "height": 1000})
    body = json.dumps({"model": MODEL, "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 4})
    load = threading.Thread(target=lambda: [http("POST", cluster.url("/v1/chat/completions"), body, {
        "Authorization": f"Bearer {KEY}", "Content-Type": "application/json"}) for _ in range(4)])
    load.start()
    load.join(120)
    tab.page.wait_for_function("() => Number(document.querySelector('#chart-requests').dataset.points || 0) > 0",
                               timeout=20_000)
    assert tab.page.locator("#chart-requests canvas").count() == 1
    tab.wait_text("#deployments .ready-count", "1/1")
    DOCS_IMAGE.parent.mkdir(parents=True, exist_ok=True)
    tab.page.screenshot(path=str(DOCS_IMAGE))  # the README's picture, made here rather than by hand
    assert tab.errors == []


def test_playground_streams_paris_token_by_token_and_continues_the_conversation(cluster, tabs):
    tab = tabs()
    page = tab.page
    page.wait_for_function("() => document.querySelector('#pg-model').value === 'smollm2'", timeout=20_000)
    page.evaluate("""() => {  // the answer's text at every change of the page, and at every painted frame
        window.states_seen = [];
        window.frames_seen = [];
        const answer = () => {
            const all = document.querySelectorAll('#pg-conversation .msg.assistant .text');
            return all.length ? all[all.length - 1].textContent : '';
        };
        new MutationObserver((records) => records.forEach((r) => r.addedNodes.forEach((n) => {
            if (n.nodeType === Node.TEXT_NODE && n.parentNode && n.parentNode.matches('.msg.assistant .text'))
                window.states_seen.push(n.data);
        }))).observe(document.getElementById('pg-conversation'), {childList: true, subtree: true});
        const tick = () => {
            const text = answer();
            if (text && window.frames_seen[window.frames_seen.length - 1] !== text) window.frames_seen.push(text);
            requestAnimationFrame(tick);
        };
        requestAnimationFrame(tick);
    }""")
    chat(tab, "What is the capital of France?", max_tokens=32)
    assert "Paris" in last_answer(tab)
    states, frames = page.evaluate("window.states_seen"), page.evaluate("window.frames_seen")
    # each streamed piece is shown as it comes (not the answer at once), and the page was painted mid-answer
    assert len(states) >= 5 and all(b.startswith(a) for a, b in zip(states, states[1:])), states
    assert len(frames) >= 2, frames
    stats = page.locator("#pg-stats")
    assert stats.get_attribute("data-outcome") == "done"
    assert stats.get_attribute("data-replica") == ready_replica(cluster)
    assert "TTFT" in stats.text_content() and "tokens/s" in stats.text_content()
    with page.expect_request("**/v1/chat/completions") as second:
        chat(tab, "And what is the capital of Germany?", max_tokens=16)
    sent = json.loads(second.value.post_data)["messages"]
    assert [m["role"] for m in sent] == ["user", "assistant", "user"] and "Paris" in sent[1]["content"]
    assert page.locator("#pg-conversation .msg").count() == 4
    assert tab.errors == []


def test_stop_cancels_a_long_answer_and_the_replica_log_shows_the_cancel(cluster, tabs):
    tab = tabs()
    page = tab.page
    rid = ready_replica(cluster)
    tab.replica_row(rid).locator(".logs-button").click()
    tab.wait_text("#log-output div", "replica")  # the tail of its log arrived
    chat(tab, "Write a very long story about a dragon who learns to cook.", max_tokens=1000,
         temperature=0.7, wait=False)
    page.wait_for_function("() => (document.querySelector('#pg-conversation .msg.assistant:last-child .text') || {})"
                           ".textContent?.length > 20", timeout=120_000)
    page.click("#pg-stop")
    page.wait_for_function("() => document.querySelector('#pg-stats').dataset.outcome === 'stopped'", timeout=10_000)
    request_id = page.locator("#pg-stats").get_attribute("data-request-id")
    assert request_id
    tab.wait_text("#log-output div", f"generate_done request_id={request_id} finish=cancelled", timeout_s=30)
    assert page.locator("#pg-send").is_enabled() and page.locator("#pg-stop").is_disabled()


def test_model_answers_and_log_lines_with_markup_are_shown_as_text(cluster, tabs):
    tab = tabs()
    page = tab.page
    rid = ready_replica(cluster)
    page.wait_for_function("() => document.querySelector('#pg-model').value === 'smollm2'", timeout=20_000)
    chat(tab, f"Repeat exactly this text: {XSS}", max_tokens=40)
    assert XSS in last_answer(tab)
    tab.replica_row(rid).locator(".logs-button").click()
    tab.wait_text("#log-output div", "replica")
    log_file = cluster.root / "n1" / "logs" / f"{rid}.log"
    with log_file.open("a") as f:
        f.write(f"a log line with markup {XSS} in it\n")
    tab.wait_text("#log-output div", f"a log line with markup {XSS} in it")
    page.wait_for_timeout(500)
    assert page.locator("#pg-conversation img, #log-output img").count() == 0
    assert tab.dialogs == []
    assert tab.errors == []


@pytest.mark.parametrize("viewport", [DESKTOP, {"width": 390, "height": 844}], ids=["desktop", "phone"])
def test_nothing_scrolls_sideways_at_desktop_and_phone_widths(cluster, tabs, viewport):
    tab = tabs(viewport)
    rid = ready_replica(cluster)
    tab.wait_text(f'#replicas tr[data-key="{rid}"] .state', "READY")
    tab.page.wait_for_function("() => document.querySelectorAll('.chart canvas').length === 6", timeout=20_000)
    tab.replica_row(rid).locator(".logs-button").click()
    tab.wait_text("#log-output div", "replica")
    widths = tab.page.evaluate("[document.documentElement.scrollWidth, document.documentElement.clientWidth,"
                               " document.body.scrollWidth]")
    assert widths[0] <= widths[1] and widths[2] <= widths[1], widths


def test_scaling_from_the_page_needs_the_admin_key_then_shows_two_of_two_ready(cluster, tabs):
    url = cluster.url("/dashboard/api/admin/scale")
    body = json.dumps({"model": MODEL, "replicas": 2})
    form = {"Authorization": f"Bearer {ADMIN}", "Content-Type": "application/x-www-form-urlencoded"}
    assert http("POST", url, "model=smollm2&replicas=2", form)[0] == 403  # what a cross-site form could send
    assert http("POST", url, body, {"Authorization": f"Bearer {KEY}", "X-Gridserve-Admin": "1",
                                    "Content-Type": "application/json"})[0] == 401  # an API key is no admin key
    tab = tabs(admin_key="")
    page = tab.page
    row = page.locator('#deployments tr[data-key="smollm2"]')
    row.wait_for(timeout=20_000)
    row.locator(".scale-input").fill("2")
    row.locator(".scale-button").click()
    tab.wait_text("#action-status", "scale refused (401)")
    assert [d.replicas for d in cluster.status().deployments] == [1]
    try:
        page.click("#creds-toggle")
        page.fill("#admin-key", ADMIN)
        page.click("#creds-form button[type=submit]")
        row.locator(".scale-button").click()
        tab.wait_text("#action-status", "scale: ")
        wait_for(lambda: [d.replicas for d in cluster.status().deployments] == [2], 10, "2 desired replicas")
        tab.wait_text('#deployments tr[data-key="smollm2"] .ready-count', "2/2", timeout_s=300)
        assert page.locator("#replicas .state", has_text="READY").count() == 2
    finally:
        cluster.cli("scale", MODEL, "1")
