"""The console in a real headless browser (Debian's chromium + chromium-driver, via selenium)
against a whole gateway: real listeners, a real redis-server, a real upstream.

Controls are found the way SPEC names them (the `Token` field, `Sign in`, a workspace link by
its id, a table row by the key's name, `Create key`, `data-token`, `Copy`, `Done`, `Revoke`,
`Rotate`, `role="dialog"`), as a person would. Every test ends by checking that the browser
console logged no error and that no token is left in storage, a cookie or the URL.

With ``KEYGATE_SCREENSHOTS=DIR`` the run saves the README's screenshots into DIR.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import os
import re
import shutil
import tempfile
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import pytest
import redis as redis_sync
from aiohttp import ClientSession, web

from conftest import free_port
from gateway.app import running_gateway, start_listeners, stop_listeners
from gateway.config import StoreConfig
from harness import ADMIN_TOKEN, make_config

CHROMIUM, CHROMEDRIVER = shutil.which("chromium"), shutil.which("chromedriver")
if CHROMIUM is None or CHROMEDRIVER is None:
    pytest.skip("the console's browser tests need Debian's chromium and chromium-driver "
                "(apt-get install chromium chromium-driver); .ci/run installs them",
                allow_module_level=True)
webdriver = pytest.importorskip("selenium.webdriver", reason="selenium (the test extra) is "
                                "not installed")
from selenium.common.exceptions import (NoSuchElementException,  # noqa: E402
                                        StaleElementReferenceException, TimeoutException)
from selenium.webdriver.common.action_chains import ActionChains  # noqa: E402
from selenium.webdriver.common.by import By  # noqa: E402
from selenium.webdriver.common.keys import Keys  # noqa: E402
from selenium.webdriver.support.ui import Select, WebDriverWait  # noqa: E402

WAIT = 20  # seconds: generous, the machine is shared


# --- a whole gateway on its own event loop thread (selenium blocks the test's thread) ---------

class ThreadedGateway:
    def __init__(self, redis_url: str, **changes: Any) -> None:
        self.redis_url = redis_url
        self.changes = changes  # to the test config (make_config's keywords)
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True,
                                       name="console-gateway")
        self._stack = contextlib.AsyncExitStack()

    def run(self, coro) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(60)

    def start(self) -> "ThreadedGateway":
        self.thread.start()
        self.run(self._start())
        return self

    async def _start(self) -> None:
        async def echo(request: web.Request) -> web.Response:
            return web.json_response({"path": request.path,
                                      "workspace": request.headers.get("X-Workspace-Id")})
        upstream_app = web.Application()
        upstream_app.router.add_route("*", "/{tail:.*}", echo)
        runner = web.AppRunner(upstream_app, access_log=None)
        await runner.setup()
        self._stack.push_async_callback(runner.cleanup)
        upstream_port = free_port()
        await web.TCPSite(runner, "127.0.0.1", upstream_port).start()
        base = make_config(f"http://127.0.0.1:{upstream_port}", **self.changes)
        config = dataclasses.replace(
            base, server=dataclasses.replace(base.server, port=free_port(), access_log="off"),
            admin=dataclasses.replace(base.admin, host="127.0.0.1", port=free_port()))
        gw = self.gw = await self._stack.enter_async_context(
            running_gateway(config, self.redis_url))
        runners = await start_listeners(gw)
        self._stack.push_async_callback(stop_listeners, runners)
        self.proxy_url = f"http://127.0.0.1:{config.server.port}"
        self.admin_url = f"http://127.0.0.1:{config.admin.port}"

    def stop(self) -> None:
        self.run(self._stack.aclose())
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)
        self.loop.close()

    # plain blocking HTTP from the test's thread
    def call(self, base: str, method: str, path: str, body: Any = None,
             token: str | None = ADMIN_TOKEN) -> tuple[int, Any]:
        data = None if body is None else json.dumps(body).encode()
        request = urllib.request.Request(base + path, data=data, method=method)
        if token is not None:
            request.add_header("Authorization", f"Bearer {token}")
        if data is not None:
            request.add_header("Content-Type", "application/json")
        try:
            with urllib.request.urlopen(request, timeout=30) as response:
                return response.status, json.loads(response.read() or b"null")
        except urllib.error.HTTPError as exc:
            return exc.code, json.loads(exc.read() or b"null")

    def admin(self, method: str, path: str, body: Any = None, token: str = ADMIN_TOKEN):
        return self.call(self.admin_url, method, "/admin/v1" + path, body, token)

    def proxy(self, path: str, token: str) -> tuple[int, Any]:
        return self.call(self.proxy_url, "GET", path, token=token)

    def key(self, ws: str, **fields: Any) -> tuple[str, dict]:
        status, body = self.admin("POST", f"/workspaces/{ws}/keys", fields)
        assert status == 201, body
        return body["token"], body["key"]


def start_gateway(redis_url: str, admin_token: str = ADMIN_TOKEN,
                  **changes: Any) -> ThreadedGateway:
    previous = os.environ.get("KEYGATE_ADMIN_TOKEN")
    os.environ["KEYGATE_ADMIN_TOKEN"] = admin_token  # read when the admin app is made
    try:
        return ThreadedGateway(redis_url, **changes).start()
    finally:
        if previous is None:
            del os.environ["KEYGATE_ADMIN_TOKEN"]
        else:
            os.environ["KEYGATE_ADMIN_TOKEN"] = previous


@pytest.fixture(scope="module")
def gateway(redis_server_url):
    client = redis_sync.Redis.from_url(redis_server_url)
    client.flushdb()
    client.close()
    gw = start_gateway(redis_server_url)
    yield gw
    gw.stop()


@pytest.fixture(scope="module")
def browser():
    from selenium.webdriver.chrome.service import Service
    profile = tempfile.mkdtemp(prefix="keygate-chromium-")
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic",
                 "--no-first-run", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--disable-dev-shm-usage",
                 "--window-size=1360,900", f"--user-data-dir={profile}"):
        options.add_argument(flag)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    driver = webdriver.Chrome(options=options, service=Service(executable_path=CHROMEDRIVER))
    driver.set_page_load_timeout(60)
    try:
        yield driver
    finally:
        driver.quit()
        shutil.rmtree(profile, ignore_errors=True)


def open_console(browser, url: str) -> None:
    """Load the console at ``url`` afresh, with what the browser logged before dropped.

    Loaded straight over the page an earlier test left (a new document all the same: its
    script state, dialogs and token are gone; what its unload logs now counts against the
    test that follows), not through about:blank first: each visit to about:blank and back
    started new Chromium processes (133 in the file, now 36): ~20% of the file's CPU."""
    browser.get_log("browser")  # drop what earlier tests left
    browser.get(url)
    wait(browser, lambda d: d.execute_script("return document.documentElement.dataset.ready"))


@pytest.fixture
def page(browser, gateway):
    """The console, freshly loaded (signed out); afterwards: no console errors, no token kept."""
    open_console(browser, gateway.admin_url + "/console/")
    console = Console(browser, gateway)
    yield console
    console.assert_nothing_kept()
    console.assert_no_console_errors()


@pytest.fixture
def patient_page(browser, own_redis):
    """A console on a gateway of its own whose store calls wait up to 30 s: for the tests that
    hold Redis's writes (CLIENT PAUSE) until they have sent two calls. With the shipped 2 s
    store timeout a fixed pause had to be shorter than 2 s, and on a loaded machine the clicks
    took longer than that; the first call's token dialog then opened too soon."""
    gw = start_gateway(own_redis.url, store=StoreConfig(timeout=30.0))
    try:
        open_console(browser, gw.admin_url + "/console/")
        console = Console(browser, gw)
        yield console, gw, own_redis.url
        console.assert_nothing_kept()
        console.assert_no_console_errors()
    finally:
        gw.stop()


# the rows of any table (`//table//tbody/tr`, in document order) with a th or td cell whose
# text is ``arguments[0]`` once case and whitespace are set aside: a superset of the rows whose
# cell selenium reads as exactly that text (innerText is the rendered text, or textContent where
# nothing is rendered), which Console.row checks each of
ROW_CANDIDATES = """
const loose = (text) => text.replace(/\\s+/g, "").toLowerCase();
const wanted = loose(arguments[0]);
return Array.from(document.querySelectorAll("table tbody > tr")).filter((r) =>
  Array.from(r.children).some((c) => (c.tagName === "TH" || c.tagName === "TD")
                                     && loose(c.innerText) === wanted));
"""


POLL = 0.1  # seconds between looks: WebDriverWait's default (0.5 s) was idle time in each wait


def wait(driver, condition, timeout: float = WAIT):
    # the page re-renders rows and dialogs as answers arrive: a vanished element means "retry"
    return WebDriverWait(driver, timeout, poll_frequency=POLL,
                         ignored_exceptions=(StaleElementReferenceException,)).until(condition)


class Console:
    """A person at the console: finds controls by their visible labels."""

    def __init__(self, driver, gateway: ThreadedGateway) -> None:
        self.driver, self.gateway = driver, gateway
        self.allowed_errors: list[str] = []  # substrings of console errors a test provokes
        self.tokens_seen: list[str] = []

    def field(self, label: str, scope=None):
        scope = scope or self.driver
        tag = scope.find_element(By.XPATH, f".//label[normalize-space()='{label}']")
        return self.driver.find_element(By.ID, tag.get_attribute("for"))

    def button(self, text: str, scope=None):
        scope = scope or self.driver
        return wait(self.driver, lambda d: next(
            (b for b in scope.find_elements(By.XPATH, f".//button[normalize-space()='{text}']")
             if b.is_displayed()), False))

    def link(self, text: str):
        return wait(self.driver, lambda d: next(
            (a for a in d.find_elements(By.LINK_TEXT, text) if a.is_displayed()), False))

    def sign_in(self, token: str) -> None:
        """Paste ``token`` into the Token field and press Sign in.

        Pasted as a person pastes a token: one insertion through the browser's editing path
        (Input.insertText: beforeinput and input events, as a paste or an IME makes), not a
        key press for each of its ~60 characters (~0.3 s of CPU each sign-in, 58 in the file).
        Typing a token key by key is tested on its own (the keyboard test)."""
        box = self.field("Token")
        box.clear()
        self.driver.execute_script("arguments[0].focus()", box)
        self.driver.execute_cdp_cmd("Input.insertText", {"text": token})
        assert box.get_property("value") == token, box.get_property("value")
        self.button("Sign in").click()

    def rows(self) -> list[str]:
        """The key table's names (each row's th), as the browser shows them. The th elements
        are found in one call (not two for each row: a redraw of many rows read one by one took
        seconds); a row without its th is still an error."""
        names = self.driver.execute_script(
            "return Array.from(document.querySelectorAll('#keys tbody tr'),"
            " (r) => r.querySelector(':scope > th'))")
        if None in names:
            raise NoSuchElementException("a row of #keys has no th")
        return [th.text for th in names]

    def row(self, name: str):
        """The first table row with a cell (th or td) that shows exactly ``name``.

        Each cell's text is still read as the browser shows it (selenium's text); a script finds
        the candidate rows first, in one call: rows with a cell whose text, without case and
        whitespace, is the name's. Reading every cell of every row (the hidden workspace list's
        too) cost one call a cell each time the wait looked, seconds with many rows."""
        def found(d):
            candidates = d.execute_script(ROW_CANDIDATES, name)
            return next((r for r in candidates  # name in [each cell's text], read lazily
                         if any(c.text == name for c in r.find_elements(By.XPATH, "./th|./td"))),
                        False)
        return wait(self.driver, found)

    def dialog(self):
        return wait(self.driver, lambda d: next(
            (x for x in d.find_elements(By.CSS_SELECTOR, '[role="dialog"]') if x.is_displayed()),
            False))

    def no_dialog(self) -> None:
        wait(self.driver, lambda d: not d.find_elements(By.CSS_SELECTOR, '[role="dialog"]'))

    def create_key(self, name: str, *, description: str = "", role: str | None = None,
                   scopes: str = "", expires: str = "") -> None:
        self.button("Create key").click()
        # "Create" names one button while the form is open, by its text and by the name a
        # screen reader or voice control gives it (the Created column's header button is
        # "Sort by created")
        shown = [(b.text, b.accessible_name) for b in self.driver.find_elements(
                     By.XPATH, "//button[starts-with(normalize-space(), 'Create')]")
                 if b.is_displayed() and (b.text == "Create" or
                                          b.accessible_name.startswith("Create"))]
        assert shown == [("Create", "Create")], shown
        self.field("Name").send_keys(name)
        if description:
            self.field("Description").send_keys(description)
        if role is not None:
            Select(self.field("Role")).select_by_visible_text(role)
        if scopes:
            self.field("Scopes").send_keys(scopes)
        if expires:
            self.field("Expires").send_keys(expires)
        self.button("Create").click()

    def press(self, text: str, row: str) -> None:
        """Press the button ``text`` in the row named ``row``. The list is drawn anew when an
        earlier action's answer comes: a button found just before that is stale when clicked
        (the click is refused, nothing was pressed), and the row and button are found again."""
        def pressed(d) -> bool:
            button = next((b for b in self.row(row).find_elements(
                By.XPATH, f".//button[normalize-space()='{text}']") if b.is_displayed()), None)
            if button is None:
                return False
            button.click()
            return True
        wait(self.driver, pressed)

    def in_dialog(self, opener: str, row: str, label: str, value: str, submit: str) -> None:
        """Open ``row``'s ``opener`` dialog, set its field ``label`` to ``value``, and press
        ``submit``."""
        self.press(opener, row)
        dialog = self.dialog()
        field = self.field(label, dialog)
        field.clear()
        field.send_keys(value)
        self.button(submit, dialog).click()

    def take_token(self, screenshot: str | None = None) -> str:
        """The token from the shown-once dialog: Copy, then Done; it is gone afterwards."""
        shown = wait(self.driver, lambda d: next(
            (t for t in d.find_elements(By.CSS_SELECTOR, '[role="dialog"] [data-token]')
             if t.is_displayed()), False))
        dialog = shown.find_element(By.XPATH, './ancestor::*[@role="dialog"]')
        token = shown.text.strip()
        assert "cannot be shown again" in dialog.text
        self.button("Copy", dialog).click()
        wait(self.driver, lambda d: dialog.find_element(By.CSS_SELECTOR, ".copied").text)
        if screenshot:
            self.screenshot(screenshot)
        self.button("Done", dialog).click()
        self.no_dialog()
        assert not self.driver.find_elements(By.CSS_SELECTOR, "[data-token]")
        assert token not in self.driver.page_source
        self.tokens_seen.append(token)
        return token

    def alert_text(self) -> str:
        return wait(self.driver, lambda d: next(
            (a.text for a in d.find_elements(By.CSS_SELECTOR, '[role="alert"]')
             if a.is_displayed() and a.text), False))

    def screenshot(self, name: str) -> None:
        folder = os.environ.get("KEYGATE_SCREENSHOTS")
        target = Path(folder) if folder else Path(tempfile.gettempdir()) / "keygate-console"
        target.mkdir(parents=True, exist_ok=True)
        assert self.driver.save_screenshot(str(target / name))

    def assert_nothing_kept(self) -> None:
        state = self.driver.execute_script(
            "return {local: Object.keys(localStorage).map(k => k + '=' + localStorage[k]),"
            " session: Object.keys(sessionStorage).map(k => k + '=' + sessionStorage[k]),"
            " cookie: document.cookie, url: location.href, history: history.length}")
        assert state["local"] == [] and state["session"] == [] and state["cookie"] == ""
        stores = self.driver.execute_script(
            "return Promise.all([indexedDB.databases().then(d => d.map(x => x.name)),"
            " caches.keys(), navigator.serviceWorker.getRegistrations().then(r => r.length)])")
        assert stores == [[], [], 0], stores  # no IndexedDB, Cache Storage or service worker
        assert self.driver.get_cookies() == []
        assert state["url"].startswith(self.gateway.admin_url + "/console/")
        for token in self.tokens_seen + [ADMIN_TOKEN]:
            assert token not in state["url"]
            assert token not in json.dumps(state)

    def requested_paths(self) -> set[str]:
        """Every URL the page loaded or fetched, from the browser's own record of them."""
        urls = self.driver.execute_script(
            "return performance.getEntriesByType('resource').map(e => e.name)"
            ".concat([location.href])")
        origin = self.gateway.admin_url
        foreign = [u for u in urls if not u.startswith(origin + "/")]
        assert foreign == [], foreign  # nothing from elsewhere: no CDN, fonts, trackers
        for token in self.tokens_seen + [ADMIN_TOKEN]:
            assert not any(token in u for u in urls)  # a token never goes in a URL
        return {u[len(origin):].split("?")[0].split("#")[0] for u in urls}

    def assert_only_documented_api(self, paths: set[str]) -> None:
        """The page calls the admin API and nothing else; with an OpenAPI document served,
        only the paths it describes."""
        api = {p for p in paths if not p.startswith("/console/")}
        assert all(p.startswith("/admin/v1/") for p in api), api
        status, document = self.gateway.call(self.gateway.admin_url, "GET",
                                              "/admin/v1/openapi.json", token=None)
        if status != 200:
            return
        templates = [re.compile(re.sub(r"\\\{[^}]+\\\}", "[^/]+", re.escape(t)) + "$")
                     for t in document["paths"]]
        undocumented = [p for p in api if not any(t.match(p.removeprefix("/admin/v1"))
                                                  or t.match(p) for t in templates)]
        assert undocumented == [], undocumented

    def assert_no_console_errors(self) -> None:
        errors = [e["message"] for e in self.driver.get_log("browser")
                  if e["level"] in ("SEVERE", "ERROR")
                  and not any(a in e["message"] for a in self.allowed_errors)]
        assert errors == [], errors


def new_workspace(gateway: ThreadedGateway, ws: str, name: str, plan: str = "starter") -> None:
    status, body = gateway.admin("POST", "/workspaces", {"id": ws, "name": name, "plan": plan})
    assert status == 201, body


# --- the operator -------------------------------------------------------------------------------

def test_operator_manages_keys_from_workspace_list_to_revocation(page, gateway):
    new_workspace(gateway, "acme", "Acme Corp")
    new_workspace(gateway, "globex", "Globex", plan="unlimited")
    used_token, _ = gateway.key("acme", name="ci-deploy", description="GitHub Actions deploys",
                                role="editor")
    assert gateway.proxy("/people", used_token)[0] == 200  # last used: now
    gateway.key("acme", name="nightly-export", description="Warehouse export",
                scopes=["companies:read"], expires_in=90 * 86400)
    old_token, old = gateway.key("acme", name="legacy-crm", scopes=["people:read"])
    gateway.admin("POST", f"/workspaces/acme/keys/{old['id']}/revoke")
    rotate_token, _ = gateway.key("acme", name="partner-feed", role="reader")

    page.sign_in(ADMIN_TOKEN)
    workspaces = wait(page.driver, lambda d: d.find_element(By.ID, "workspaces"))
    wait(page.driver, lambda d: "globex" in workspaces.text)
    assert "unlimited" in page.row("globex").text and "starter" in page.row("acme").text
    page.link("acme").click()
    wait(page.driver, lambda d: "partner-feed" in page.rows())
    assert sorted(page.rows()) == ["ci-deploy", "legacy-crm", "nightly-export", "partner-feed"]
    ci = page.row("ci-deploy").text
    assert "GitHub Actions deploys" in ci and "editor" in ci and "active" in ci
    assert "never" in page.row("partner-feed").text  # never used
    assert "revoked" in page.row("legacy-crm").text
    assert page.driver.find_element(By.ID, "keys-text").text == "3 of 5 active keys allowed"
    assert "1 of 1,000 requests" in page.driver.find_element(By.ID, "usage-text").text

    # create: a role, an expiry; the token is shown once and works at the proxy
    page.create_key("billing-sync", description="Stripe webhook sync", role="reader",
                    expires="30d")
    token = page.take_token(screenshot="console-token.png")
    assert token.startswith("kg_live_") and len(token) == len("kg_live_") + 50
    status, body = gateway.proxy("/people", token)
    assert status == 200 and body["workspace"] == "acme"
    row = page.row("billing-sync")
    assert "Stripe webhook sync" in row.text and "reader" in row.text
    assert page.driver.find_element(By.ID, "keys-text").text == "4 of 5 active keys allowed"
    page.screenshot("console-keys.png")

    # rotate with a grace: the new token works, the old one too until the grace ends
    page.in_dialog("Rotate", "partner-feed", "Grace", "1h", "Rotate")
    rotated = page.take_token()
    assert rotated != rotate_token
    assert gateway.proxy("/people", rotated)[0] == 200
    assert gateway.proxy("/people", rotate_token)[0] == 200
    wait(page.driver, lambda d: page.rows().count("partner-feed") == 2)

    # revoke through the confirmation dialog: the very next request is refused
    page.press("Revoke", "billing-sync")
    dialog = page.dialog()
    assert "permanent" in dialog.text
    page.button("Revoke", dialog).click()
    page.no_dialog()
    wait(page.driver, lambda d: "revoked" in page.row("billing-sync").text)
    assert page.driver.find_element(By.CSS_SELECTOR, '[role="status"]').text == \
        "Key billing-sync revoked."
    status, body = gateway.proxy("/people", token)
    assert status == 401 and body["error"]["code"] == "revoked_key"

    # edit: role and expiry
    page.press("Edit", "nightly-export")
    dialog = page.dialog()
    for label in ("Role", "Scopes", "Expires"):  # one control per label on the whole page
        assert len(page.driver.find_elements(By.XPATH, f"//label[normalize-space()='{label}']")) == 1
    Select(page.field("Role", dialog)).select_by_visible_text("reader")
    page.field("Scopes", dialog).clear()
    expires = page.field("Expires", dialog)
    expires.clear()
    expires.send_keys("2030-06-30")
    page.button("Save", dialog).click()
    page.no_dialog()
    wait(page.driver, lambda d: "2030-06-30" in page.row("nightly-export").text)
    status, listing = gateway.admin("GET", "/workspaces/acme/keys")
    edited = next(k for k in listing["items"] if k["name"] == "nightly-export")
    assert edited["role"] == "reader" and edited["expires_at"] == "2030-06-30T00:00:00Z"

    # filter and sort
    Select(page.field("Status")).select_by_visible_text("Revoked")
    wait(page.driver, lambda d: sorted(page.rows()) == ["billing-sync", "legacy-crm"])
    Select(page.field("Status")).select_by_visible_text("Active")
    status, listing = gateway.admin("GET", "/workspaces/acme/keys")
    unused = sorted(k["name"] for k in listing["items"]
                    if k["status"] == "active" and k["last_used_at"] is None)
    assert "ci-deploy" not in unused and "nightly-export" in unused
    page.field("Unused for (days)").send_keys("7")
    wait(page.driver, lambda d: sorted(page.rows()) == unused)
    page.field("Unused for (days)").clear()
    Select(page.field("Status")).select_by_visible_text("All")
    Select(page.field("Sort by")).select_by_visible_text("Name, A to Z")
    wait(page.driver, lambda d: page.rows() == sorted(page.rows()) and len(page.rows()) == 6)
    assert page.driver.find_element(By.XPATH, "//th[@data-sort='name']").get_attribute(
        "aria-sort") == "ascending"
    Select(page.field("Sort by")).select_by_visible_text("Name, Z to A")
    wait(page.driver, lambda d: page.rows() == sorted(page.rows(), reverse=True))
    Select(page.field("Sort by")).select_by_visible_text("Recently used first")
    # the keys last used at the latest instant the API shows (to the second: ci-deploy's,
    # partner-feed's and billing-sync's last uses can fall in one second, a tie)
    status, listing = gateway.admin("GET", "/workspaces/acme/keys")
    latest = max(k["last_used_at"] for k in listing["items"] if k["last_used_at"])
    newest = {k["name"] for k in listing["items"] if k["last_used_at"] == latest}
    assert newest & {"ci-deploy", "partner-feed"}, listing
    wait(page.driver, lambda d: page.rows()[0] in newest)

    # back to the list, then a reload signs out (the token was in memory only)
    page.link("All workspaces").click()
    page.link("globex")
    page.assert_only_documented_api(page.requested_paths())
    page.tokens_seen += [used_token, rotate_token, old_token]
    page.assert_nothing_kept()
    page.driver.refresh()
    wait(page.driver, lambda d: page.field("Token").is_displayed())
    assert not page.driver.find_element(By.ID, "workspaces-view").is_displayed()


# --- a workspace admin --------------------------------------------------------------------------

def test_workspace_admin_sees_only_its_workspace_and_cannot_widen(page, gateway):
    new_workspace(gateway, "initech", "Initech", plan="metered")
    new_workspace(gateway, "umbrella", "Umbrella")
    gateway.key("umbrella", name="umbrella-secret-project", scopes=["people:read"])
    admin_token, admin_key = gateway.key("initech", name="initech-admin",
                                         scopes=["keys:admin", "people:read"])
    page.tokens_seen.append(admin_token)

    page.sign_in(admin_token)
    wait(page.driver, lambda d: "initech-admin" in page.rows())
    wait(page.driver, lambda d: d.find_element(By.ID, "ws-title").text == "Initech (initech)")
    assert not page.driver.find_element(By.ID, "workspaces-view").is_displayed()
    assert not page.driver.find_elements(By.LINK_TEXT, "All workspaces") or \
        not page.driver.find_element(By.LINK_TEXT, "All workspaces").is_displayed()
    assert "umbrella" not in page.driver.page_source
    assert f"key kg_live_{admin_key['id']}" in page.driver.find_element(By.ID, "who").text

    # within its own scopes: fine, and the token works
    page.create_key("hr-sync", scopes="people:read")
    token = page.take_token()
    status, body = gateway.proxy("/people", token)
    assert status == 200 and body["workspace"] == "initech"

    # wider than itself: refused, with the API's own message and request id
    page.allowed_errors.append("403")  # the refused call's network line in the console
    page.create_key("too-wide", scopes="people:write")
    problem = page.alert_text()
    assert "cannot grant scopes it does not hold itself: people:write" in problem
    assert "request id" in problem
    page.button("Cancel").click()
    assert "too-wide" not in page.rows()

    # revoke its own creation through the dialog; Escape first cancels
    page.press("Revoke", "hr-sync")
    page.dialog()
    page.driver.switch_to.active_element.send_keys(Keys.ESCAPE)
    page.no_dialog()
    assert gateway.proxy("/people", token)[0] == 200
    page.press("Revoke", "hr-sync")
    page.button("Revoke", page.dialog()).click()
    page.no_dialog()
    wait(page.driver, lambda d: "revoked" in page.row("hr-sync").text)
    status, body = gateway.proxy("/people", token)
    assert status == 401 and body["error"]["code"] == "revoked_key"
    status, listing = gateway.admin("GET", "/workspaces/umbrella/keys")
    assert [k["status"] for k in listing["items"]] == ["active"]
    paths = page.requested_paths()
    page.assert_only_documented_api(paths)
    assert not any("umbrella" in p for p in paths)

    # signing out forgets the workspace and its keys
    page.button("Sign out").click()
    wait(page.driver, lambda d: page.field("Token").is_displayed())
    assert page.rows() == []
    assert "initech" not in page.driver.find_element(By.TAG_NAME, "main").get_attribute(
        "innerHTML")


# --- errors and hostile data --------------------------------------------------------------------

def test_a_wrong_token_shows_the_api_message_and_request_id(page, gateway):
    page.allowed_errors.append("401")
    page.sign_in("not-the-operator-token")
    problem = page.alert_text()
    assert "The operator token is not valid." in problem and "request id" in problem
    assert page.field("Token").get_attribute("value") == ""  # not left in the field either
    assert page.field("Token").is_displayed()


def test_a_token_pasted_with_quotes_or_an_ellipsis_is_named_as_the_problem(page, gateway):
    """A token copied with typographic quotes around it, from a cut-short display ('…') or
    with a zero-width space cannot go in a header: the page said 'The admin API could not be
    reached (... non ISO-8859-1 code point.)', as if the server were down. It now says which
    character the token holds that no token has, and sends nothing."""
    cases = (("\u201c" + ADMIN_TOKEN + "\u201d", "U+201C", 1),
             ("kg_live_abc\u2026", "U+2026", 12),
             (ADMIN_TOKEN[:10] + "\u200b" + ADMIN_TOKEN[10:], "U+200B", 11))
    for token, code, position in cases:
        page.sign_in(token)
        problem = page.alert_text()
        assert "could not be reached" not in problem, problem
        assert f"{code} (character {position})" in problem and "paste" in problem, problem
        assert page.field("Token").is_displayed()
    page.sign_in(ADMIN_TOKEN)  # the field works as ever afterwards
    wait(page.driver, lambda d: d.find_element(By.ID, "workspaces-view").is_displayed())
    page.button("Sign out").click()


def test_key_names_are_shown_as_text_never_as_markup(page, gateway):
    new_workspace(gateway, "hostile", "<b>Hostile</b>")
    gateway.key("hostile", name='<img src=x onerror="document.title=1">',
                description="<script>alert(1)</script>", scopes=["people:read"])
    page.sign_in(ADMIN_TOKEN)
    page.link("hostile").click()
    row = page.row('<img src=x onerror="document.title=1">')
    assert "<script>alert(1)</script>" in row.text
    assert not page.driver.find_elements(By.CSS_SELECTOR, "#keys img, #keys script")
    wait(page.driver, lambda d: d.find_element(By.ID, "ws-title").text == "<b>Hostile</b> (hostile)")
    assert page.driver.title == "keygate console"


# Installed (while a test is `spying`) before the page's own script on every load: notes every
# way a page can send something (fetch, XHR, a beacon, a WebSocket, an EventSource, a new window)
# for the test to read back. A handler injected through hostile data would set window.__pwned.
SPY = r"""
window.__sent = [];
const note = (kind, url, extra) => window.__sent.push(Object.assign({kind, url: String(url)},
                                                                    extra || {}));
const realFetch = window.fetch;
window.fetch = function (input, init) {
  const options = init || {};
  note("fetch", input instanceof Request ? input.url : input,
       {method: options.method || "GET", headers: options.headers || {},
        body: options.body === undefined ? null : String(options.body)});
  return realFetch.apply(this, arguments);
};
const realOpen = XMLHttpRequest.prototype.open;
XMLHttpRequest.prototype.open = function (method, url) {
  note("xhr", url);
  return realOpen.apply(this, arguments);
};
navigator.sendBeacon = (url) => { note("beacon", url); return false; };
window.WebSocket = function (url) { note("websocket", url); throw new Error("spied"); };
window.EventSource = function (url) { note("eventsource", url); throw new Error("spied"); };
window.open = (url) => { note("open", url); return null; };
"""


@contextlib.contextmanager
def spying(page: Console, *, without_csp: bool = False):
    """The console loaded afresh with SPY in it; ``without_csp``: with the browser ignoring the
    page's Content-Security-Policy, so that what is checked is the page's own handling of data
    (text, never markup), not the CSP stopping an injected handler."""
    driver = page.driver
    spy = driver.execute_cdp_cmd("Page.addScriptToEvaluateOnNewDocument", {"source": SPY})
    try:
        if without_csp:
            driver.execute_cdp_cmd("Page.setBypassCSP", {"enabled": True})
        driver.get(page.gateway.admin_url + "/console/")
        wait(driver, lambda d: d.execute_script("return document.documentElement.dataset.ready"))
        assert driver.execute_script("return Array.isArray(window.__sent)")
        yield
    finally:
        driver.execute_cdp_cmd("Page.removeScriptToEvaluateOnNewDocument",
                               {"identifier": spy["identifier"]})
        driver.execute_cdp_cmd("Page.setBypassCSP", {"enabled": False})


HOSTILE = ('<img src=x onerror="window.__pwned=1">', '"><svg onload="window.__pwned=2">',
           "<script>window.__pwned=3</script>", "javascript:window.__pwned=4",
           '<a href="javascript:window.__pwned=5">click</a>',
           '<iframe srcdoc="<script>parent.__pwned=6</script>"></iframe>',
           "</textarea><img src=x onerror=window.__pwned=7>",
           "'-alert(1)-'&lt;b&gt;&#x3c;i&#x3e;")
MARKUP = ("main img, main svg, main iframe, main a[href^='javascript'], dialog img, dialog svg, "
          "dialog iframe, dialog a, script:not([src]), main b, dialog b, main i, dialog i")


def assert_no_markup_ran(page: Console) -> None:
    state = page.driver.execute_script(
        f"return {{pwned: window.__pwned, markup: document.querySelectorAll({MARKUP!r}).length,"
        " title: document.title}")
    assert state == {"pwned": None, "markup": 0, "title": "keygate console"}, state


def test_hostile_text_anywhere_is_shown_as_text_even_without_the_csp(page, gateway):
    """A workspace admin writes markup into every field it can (through /_keygate/v1/keys, as
    a key-management script would); the operator then reads it everywhere the console shows it:
    the workspace list, the key table, the edit, rotate and revoke dialogs, the shown-once token
    dialog, the status line and an API error that quotes the input. With the CSP switched off
    in the browser nothing runs and the DOM holds the text, not elements."""
    new_workspace(gateway, "mallory", HOSTILE[1] + HOSTILE[0], plan="unlimited")
    admin_token, _ = gateway.key("mallory", name="mallory-admin",
                                 scopes=["keys:admin", "people:read"])
    page.tokens_seen.append(admin_token)
    long_text = (" ".join(HOSTILE) * 8)[:2000]  # as long as a description may be
    for name in HOSTILE:
        status, body = gateway.call(gateway.proxy_url, "POST", "/_keygate/v1/keys",
                                    {"name": name, "description": long_text,
                                     "scopes": ["people:read"], "meta": {"note": name}},
                                    token=admin_token)
        assert status == 201, body
    page.allowed_errors.append("400")  # the refused create's network line
    with spying(page, without_csp=True):
        page.sign_in(ADMIN_TOKEN)
        wait(page.driver, lambda d: page.row("mallory"))
        assert page.row("mallory").text.startswith("mallory " + HOSTILE[1] + HOSTILE[0])
        page.link("mallory").click()
        wait(page.driver, lambda d: len(page.rows()) == len(HOSTILE) + 1)
        assert sorted(page.rows()) == sorted(HOSTILE + ("mallory-admin",))
        assert page.driver.find_element(By.ID, "ws-title").text == \
            HOSTILE[1] + HOSTILE[0] + " (mallory)"
        texts = [c.get_attribute("textContent") for c in
                 page.driver.find_elements(By.CSS_SELECTOR, "#keys td.description")]
        assert sorted(texts) == [""] + [long_text] * len(HOSTILE)  # the admin key's is empty
        assert_no_markup_ran(page)

        victim = HOSTILE[0]
        page.press("Edit", victim)
        assert page.dialog().find_element(By.TAG_NAME, "h2").text == "Edit key " + victim
        assert_no_markup_ran(page)
        page.button("Cancel", page.dialog()).click()
        page.in_dialog("Rotate", victim, "Grace", "0", "Rotate")
        shown = wait(page.driver, lambda d: d.find_element(By.CSS_SELECTOR, "[data-token]"))
        assert f"Key {victim} (" in page.dialog().text
        assert_no_markup_ran(page)
        page.tokens_seen.append(shown.text.strip())
        page.button("Done", page.dialog()).click()
        page.no_dialog()
        target = HOSTILE[6]
        page.press("Revoke", target)
        assert page.dialog().find_element(By.TAG_NAME, "h2").text == f"Revoke key {target}?"
        page.button("Revoke", page.dialog()).click()
        page.no_dialog()
        wait(page.driver, lambda d: d.find_element(By.ID, "status").text ==
             f"Key {target} revoked.")
        # an API error that quotes what was typed
        page.create_key(HOSTILE[2], scopes=HOSTILE[0])
        problem = page.alert_text()
        assert "malformed scope '<img'" in problem
        assert_no_markup_ran(page)
        page.button("Cancel").click()


def test_the_token_goes_only_to_this_origins_api_in_the_authorization_header(page, gateway):
    """Through sign-in, opening a workspace, create, rotate, edit, revoke and back: every
    request the page makes is a fetch to /admin/v1/ on its own origin carrying exactly
    'Authorization: Bearer <token>'; no token in a URL or a body, no beacon, XHR or socket,
    no history entry or fragment; a reload then signs out."""
    new_workspace(gateway, "tessier", "Tessier-Ashpool")
    admin_token, _ = gateway.key("tessier", name="tessier-admin",
                                 scopes=["keys:admin", "people:read"])
    page.tokens_seen.append(admin_token)
    with spying(page):
        history = page.driver.execute_script("return history.length")
        for token, operator in ((ADMIN_TOKEN, True), (admin_token, False)):
            page.sign_in(token)
            if operator:
                page.link("tessier").click()
            wait(page.driver, lambda d: "tessier-admin" in page.rows())
            page.create_key("straylight-" + str(operator), scopes="people:read")
            page.take_token()
            page.in_dialog("Rotate", "straylight-" + str(operator), "Grace", "1h", "Rotate")
            page.take_token()
            page.in_dialog("Edit", "tessier-admin", "Expires", "2031-01-01", "Save")
            page.no_dialog()
            page.press("Revoke", "straylight-" + str(operator))
            page.button("Revoke", page.dialog()).click()
            page.no_dialog()
            if operator:
                page.link("All workspaces").click()
                page.link("tessier")
            sent = page.driver.execute_script("return window.__sent.splice(0)")
            assert len(sent) >= 8 and {s["kind"] for s in sent} == {"fetch"}, sent
            for request in sent:
                assert request["url"].startswith("/admin/v1/"), request  # this origin, the API
                assert request["headers"]["Authorization"] == "Bearer " + token, request
                for seen in page.tokens_seen + [ADMIN_TOKEN]:
                    assert seen not in request["url"] and seen not in (request["body"] or "")
            state = page.driver.execute_script(
                "return [history.length, location.hash, location.search]")
            assert state == [history, "", ""], state
            page.assert_nothing_kept()
            page.button("Sign out").click()
            assert_signed_out(page)
        page.sign_in(admin_token)
        wait(page.driver, lambda d: "tessier-admin" in page.rows())
        page.driver.refresh()
        assert_signed_out(page, "tessier-admin")
        assert admin_token not in page.driver.page_source
        assert page.driver.execute_script("return window.__sent") == []


def test_the_page_refuses_html_sinks_through_trusted_types(page, gateway):
    """Defence in depth beside textContent: the CSP requires Trusted Types with no policy, so
    any HTML written into the page by script (innerHTML and the like), even by code added
    later, is refused by the browser instead of parsed."""
    page.allowed_errors.append("TrustedHTML")
    refused = page.driver.execute_script(
        "try { document.createElement('div').innerHTML = '<b>x</b>'; return 'parsed'; }"
        " catch (e) { return e.name; }")
    assert refused == "TypeError"


def test_the_page_refuses_to_be_framed(page, gateway):
    page.allowed_errors += ["frame-ancestors", "X-Frame-Options", "refused to connect"]
    page.driver.execute_script(
        "const f = document.createElement('iframe'); f.id = 'framed';"
        "f.addEventListener('load', () => { f.dataset.loaded = 'yes'; });"
        "f.src = '/console/'; document.body.append(f);")
    # the frame's load event comes once its document is in (the console, or the browser's page
    # for a refused frame); after it the frame holds no console (was: 3 s of looking for one)
    wait(page.driver, lambda d: d.execute_script(
        "return document.getElementById('framed').dataset.loaded === 'yes'"))
    assert not page.driver.execute_script(
        "const f = document.getElementById('framed');"
        "try { return f.contentDocument && f.contentDocument.getElementById('token') !== null; }"
        "catch (e) { return false; }")


def test_signing_in_creating_and_revoking_work_from_the_keyboard(page, gateway):
    new_workspace(gateway, "hooli", "Hooli")
    admin_token, _ = gateway.key("hooli", name="hooli-admin", scopes=["keys:admin", "people:read"])
    page.tokens_seen.append(admin_token)
    keyboard = lambda *keys: page.driver.switch_to.active_element.send_keys(*keys)  # noqa: E731

    page.field("Token").send_keys(admin_token, Keys.ENTER)
    wait(page.driver, lambda d: "hooli-admin" in page.rows())
    keyboard(Keys.TAB)  # from the workspace's title, the first control is Create key
    assert page.driver.switch_to.active_element.text == "Create key"
    keyboard(Keys.ENTER)
    wait(page.driver, lambda d: d.switch_to.active_element.get_attribute("id") == "create-name")
    keyboard("kbd-key", Keys.TAB, Keys.TAB, Keys.TAB, "people:read", Keys.ENTER)
    shown = wait(page.driver, lambda d: d.find_element(By.CSS_SELECTOR, "[data-token]"))
    token = shown.text
    assert page.driver.switch_to.active_element.text == "Copy"  # focus moved into the dialog
    keyboard(Keys.TAB)
    assert page.driver.switch_to.active_element.text == "Done"
    keyboard(Keys.ENTER)
    page.no_dialog()
    assert page.driver.switch_to.active_element.text == "Create key"  # focus came back
    page.tokens_seen.append(token)
    assert gateway.proxy("/people", token)[0] == 200

    page.row("kbd-key").find_element(By.XPATH, ".//button[normalize-space()='Revoke']") \
        .send_keys(Keys.ENTER)
    page.dialog()
    assert page.driver.switch_to.active_element.text == "Cancel"  # the safe choice first
    keyboard(Keys.SHIFT, Keys.TAB)
    assert page.driver.switch_to.active_element.text == "Revoke"
    keyboard(Keys.ENTER)
    page.no_dialog()
    wait(page.driver, lambda d: "revoked" in page.row("kbd-key").text)
    assert gateway.proxy("/people", token)[1]["error"]["code"] == "revoked_key"

    # revoking the key one is signed in with says so first
    page.press("Revoke", "hooli-admin")
    assert "the key you are signed in with" in page.dialog().text
    keyboard(Keys.ESCAPE)
    page.no_dialog()


def test_a_store_outage_shows_the_api_message_and_request_id(browser, own_redis):
    outage = start_gateway(own_redis.url)
    try:
        new_workspace(outage, "acme", "Acme")
        outage.key("acme", name="doomed", scopes=["people:read"])
        browser.get(outage.admin_url + "/console/")
        browser.get_log("browser")
        page = Console(browser, outage)
        page.sign_in(ADMIN_TOKEN)
        page.link("acme").click()
        page.row("doomed")
        own_redis.stop()
        page.press("Revoke", "doomed")
        dialog = page.dialog()
        page.button("Revoke", dialog).click()
        problem = wait(browser, lambda d: dialog.find_element(By.CSS_SELECTOR, ".form-error").text)
        assert problem.startswith("The key store is unavailable")
        assert re.search(r"\(request id [0-9a-f]{32}\)$", problem), problem
        assert "revoked" not in page.row("doomed").text
        page.allowed_errors.append("503")
        page.assert_no_console_errors()
        page.assert_nothing_kept()
    finally:
        outage.stop()


def test_key_controls_disable_enable_cap_and_delete(page, gateway):
    new_workspace(gateway, "stark", "Stark")
    token, key = gateway.key("stark", name="jarvis", scopes=["people:read"])
    if "enabled" not in key:
        pytest.skip("this build's API has no key controls (SPEC 'Key controls beyond the "
                    "basics'); the console shows them only when key objects carry them")
    page.tokens_seen.append(token)
    page.sign_in(ADMIN_TOKEN)
    page.link("stark").click()
    assert page.row("jarvis").find_element(By.CSS_SELECTOR, "td.month").text == "0"

    page.press("Disable", "jarvis")
    wait(page.driver, lambda d: "disabled" in page.row("jarvis").text)
    status, body = gateway.proxy("/people", token)
    assert status == 401 and body["error"]["code"] == "disabled_key"
    page.press("Enable", "jarvis")
    wait(page.driver, lambda d: "disabled" not in page.row("jarvis").text)
    assert gateway.proxy("/people", token)[0] == 200

    page.press("Edit", "jarvis")
    dialog = page.dialog()
    page.field("Monthly cap", dialog).send_keys("2")
    page.button("Save", dialog).click()
    page.no_dialog()
    wait(page.driver, lambda d: page.row("jarvis").find_element(
        By.CSS_SELECTOR, "td.month").text == "1 of 2")
    assert gateway.proxy("/people", token)[0] == 200
    status, body = gateway.proxy("/people", token)
    assert status == 429 and body["error"]["code"] == "key_quota_exceeded"

    page.press("Revoke", "jarvis")
    page.button("Revoke", page.dialog()).click()
    page.no_dialog()
    page.press("Delete", "jarvis")
    page.button("Delete", page.dialog()).click()
    page.no_dialog()
    wait(page.driver, lambda d: "jarvis" not in page.rows())
    status, listing = gateway.admin("GET", "/workspaces/stark/keys")
    assert listing["items"] == []


def test_the_edit_form_says_a_keys_rate_is_held_within_the_workspaces(page, gateway):
    """The form said a key's rate was its own ("empty for the plan's"), while the gateway holds
    it within the workspace's rate in force: a key shown at 10/s under a 3/s override gets 3/s."""
    new_workspace(gateway, "lexcorp", "LexCorp")
    status, body = gateway.admin("PATCH", "/workspaces/lexcorp", {"limits": {"rate_limit": "3/s"}})
    assert status == 200, body
    token, key = gateway.key("lexcorp", name="alfred", scopes=["people:read"], rate_limit="10/s")
    page.tokens_seen.append(token)
    page.sign_in(ADMIN_TOKEN)
    page.link("lexcorp").click()
    page.press("Edit", "alfred")
    dialog = page.dialog()
    assert page.field("Rate limit", dialog).get_attribute("value") == "10/s"
    hint = dialog.find_element(By.ID, "edit-cap-hint").text
    assert "held within the workspace's (3/s)" in hint, hint
    page.button("Cancel", dialog).click()
    page.no_dialog()


# --- what a hurried person does -----------------------------------------------------------------

def keys_named(gateway: ThreadedGateway, ws: str, name: str) -> list[dict]:
    status, listing = gateway.admin("GET", f"/workspaces/{ws}/keys")
    assert status == 200, listing
    return [k for k in listing["items"] if k["name"] == name]


def answers_handled(page: Console) -> None:
    """Every call the page made from a form or dialog has its answer handled: oneAtATime sets
    aria-busy on the form or dialog when the call is sent and removes it once the answer is
    shown (a token dialog opened or queued) and the list read again."""
    wait(page.driver, lambda d: not d.find_elements(By.CSS_SELECTOR, '[aria-busy="true"]'))


def next_token_shown(page: Console):
    """The token element on screen once one is (None if none comes within WAIT)."""
    try:
        return wait(page.driver, lambda d: next(
            (t for t in d.find_elements(By.CSS_SELECTOR, "[data-token]") if t.is_displayed()),
            False))
    except TimeoutException:
        return None


def test_a_double_click_on_create_or_rotate_makes_one_key(page, gateway):
    from selenium.webdriver.common.action_chains import ActionChains
    new_workspace(gateway, "wayne", "Wayne")
    page.sign_in(ADMIN_TOKEN)
    page.link("wayne").click()
    page.button("Create key").click()
    page.field("Name").send_keys("double")
    page.field("Scopes").send_keys("people:read")
    ActionChains(page.driver).double_click(page.button("Create")).perform()
    token = page.take_token()
    wait(page.driver, lambda d: "double" in page.rows())
    assert len(keys_named(gateway, "wayne", "double")) == 1  # not a second key nobody holds
    assert gateway.proxy("/people", token)[0] == 200

    page.press("Rotate", "double")
    dialog = page.dialog()
    grace = page.field("Grace", dialog)
    grace.clear()
    grace.send_keys("1h")
    ActionChains(page.driver).double_click(page.button("Rotate", dialog)).perform()
    rotated = page.take_token()
    wait(page.driver, lambda d: page.rows().count("double") == 2)
    assert len(keys_named(gateway, "wayne", "double")) == 2  # the old one and one new one
    assert gateway.proxy("/people", rotated)[0] == 200


def test_a_token_shown_once_is_not_replaced_by_another_answer(patient_page):
    """Two calls that each answer a shown-once token (Create, from the inline form, and Rotate,
    from a row) are in flight together: the store is slow for a moment. Both keys are made;
    the second answer's dialog replaced the first's (openDialog closed every dialog), so one
    live key's token was never seen by anybody. SPEC: the token appears once 'until Done is
    pressed'. Now the second waits for the first one's Done."""
    page, gateway, store_url = patient_page
    new_workspace(gateway, "rcboth", "Both")
    gateway.key("rcboth", name="rotated-one", scopes=["people:read"])
    page.sign_in(ADMIN_TOKEN)
    page.link("rcboth").click()
    page.row("rotated-one")
    page.button("Create key").click()
    page.field("Name").send_keys("created-one")
    page.field("Scopes").send_keys("people:read")
    store = redis_sync.Redis.from_url(store_url)
    try:
        # a slow store until both calls are sent: a fixed pause ran out on a loaded machine
        # before the Rotate dialog was filled, and the Create's token dialog was found instead
        store.execute_command("CLIENT", "PAUSE", "30000", "WRITE")
        page.button("Create").click()
        page.press("Rotate", "rotated-one")
        dialog = page.dialog()
        grace = page.field("Grace", dialog)
        grace.clear()
        grace.send_keys("1h")
        page.button("Rotate", dialog).click()
        time.sleep(0.3)  # the Rotate call is on its way
    finally:
        store.execute_command("CLIENT", "UNPAUSE")
        store.close()
    # both keys exist: one created, one made by the rotation
    wait(page.driver, lambda d: len(keys_named(gateway, "rcboth", "created-one")) == 1
         and len(keys_named(gateway, "rcboth", "rotated-one")) == 2)
    answers_handled(page)  # both answers are in (was: a 2 s pause)
    seen: list[str] = []
    # each new token on screen in turn, until its Done (queued ones included); both answers are
    # handled, so once both tokens were seen no other can come (was: 3 s of looking for one)
    while len(set(seen)) < 2 and (shown := next_token_shown(page)) is not None:
        token = shown.get_attribute("data-token")
        seen.append(token)
        page.tokens_seen.append(token)
        page.button("Done", shown.find_element(By.XPATH, './ancestor::dialog')).click()
        wait(page.driver, lambda d: token not in d.page_source)
    assert not page.driver.find_elements(By.CSS_SELECTOR, "[data-token]")
    assert len(set(seen)) == 2, f"{len(set(seen))} of the 2 new tokens were shown"
    for token in seen:
        assert gateway.proxy("/people", token)[0] == 200


def test_focus_after_the_last_queued_token_dialog_goes_back_to_the_page(patient_page):
    """Keyboard only. A Create and a Rotate are on their way together; the second token waits
    for the first one's Done. After the last Done, focus went to <body>: the queued dialog was
    opened from inside the one just removed, so its `opener` was the body, and a keyboard user
    was thrown back to the top of the page. With one token dialog, focus goes back to the
    control that opened it; with a queue, to the control the first of them came from."""
    page, gateway, store_url = patient_page
    new_workspace(gateway, "rvfocus", "Focus")
    gateway.key("rvfocus", name="rot-one", scopes=["people:read"])
    page.sign_in(ADMIN_TOKEN)
    page.link("rvfocus").click()
    page.row("rot-one")
    page.button("Create key").click()
    page.field("Name").send_keys("made-one")
    page.field("Scopes").send_keys("people:read")
    store = redis_sync.Redis.from_url(store_url)
    try:
        store.execute_command("CLIENT", "PAUSE", "30000", "WRITE")  # until both are sent
        page.field("Name").send_keys(Keys.ENTER)  # Create, by keyboard
        page.press("Rotate", "rot-one")
        grace = page.field("Grace", page.dialog())
        grace.clear()
        grace.send_keys("1h")
        grace.send_keys(Keys.ENTER)  # Rotate, by keyboard
        time.sleep(0.3)  # the Rotate call is on its way
    finally:
        store.execute_command("CLIENT", "UNPAUSE")
        store.close()
    wait(page.driver, lambda d: len(keys_named(gateway, "rvfocus", "rot-one")) == 2
         and len(keys_named(gateway, "rvfocus", "made-one")) == 1)
    answers_handled(page)  # both answers are in (was: a 1.5 s pause)
    seen: list[str] = []
    # as in the test above: both answers handled, so no token comes after the second
    while len(set(seen)) < 2 and (shown := next_token_shown(page)) is not None:
        seen.append(shown.get_attribute("data-token"))
        page.tokens_seen.append(seen[-1])
        active = page.driver.switch_to.active_element
        assert active.text == "Copy", active.text  # each token dialog takes focus
        active.send_keys(Keys.TAB)
        done = page.driver.switch_to.active_element
        assert done.text == "Done"
        done.send_keys(Keys.ENTER)
        wait(page.driver, lambda d: seen[-1] not in d.page_source)
    assert len(set(seen)) == 2
    time.sleep(0.5)
    active = page.driver.switch_to.active_element
    assert active.tag_name != "body", (
        "after the last queued token's Done, keyboard focus is lost to <body>")
    # back on the page, at a control the keyboard user was on (or the workspace's title)
    assert (active.text in ("Rotate", "Create key")
            or active.get_attribute("id") == "ws-title"), active.get_attribute("outerHTML")


def test_a_bare_number_as_rotation_grace_is_refused_not_read_as_seconds(page, gateway):
    """The Rotate dialog's Grace field says '0, or a duration such as 30m, 24h or 7d' and its
    own error message the same; the CLI refuses a bare number ('a bare 30 could mean seconds
    or days'). The console read '24' (meant as 24 hours) as 24 seconds and rotated: the old
    key, still deployed everywhere, stopped working 24 seconds later."""
    new_workspace(gateway, "rcgrace", "Grace")
    _, old = gateway.key("rcgrace", name="deployed", scopes=["people:read"])
    page.sign_in(ADMIN_TOKEN)
    page.link("rcgrace").click()
    page.in_dialog("Rotate", "deployed", "Grace", "24", "Rotate")
    deadline = time.monotonic() + 5
    problem = ""
    while time.monotonic() < deadline and not problem:
        tokens = page.driver.find_elements(By.CSS_SELECTOR, "[data-token]")
        if tokens:  # rotated: keep the shown-once token off the page before failing
            page.tokens_seen.append(tokens[0].get_attribute("data-token"))
            page.button("Done", page.dialog()).click()
            break
        problem = "".join(e.text for e in page.driver.find_elements(
            By.CSS_SELECTOR, "dialog .form-error") if e.is_displayed())
        time.sleep(0.2)
    status, key = gateway.admin("GET", f"/workspaces/rcgrace/keys/{old['id']}")
    assert key["expires_at"] is None, \
        f"rotated with a grace of 24 seconds: the old key now expires at {key['expires_at']}"
    assert "duration" in problem and "24h" in problem, problem
    assert keys_named(gateway, "rcgrace", "deployed") == [key]  # nothing rotated
    # with its unit it rotates, and "0" alone still means no grace
    dialog = page.dialog()
    grace = page.field("Grace", dialog)
    grace.clear()
    grace.send_keys("24h")
    page.button("Rotate", dialog).click()
    page.take_token()
    status, key = gateway.admin("GET", f"/workspaces/rcgrace/keys/{old['id']}")
    assert key["expires_at"] is not None and key["status"] == "active", key


def test_the_token_stays_on_screen_until_done_is_pressed(page, gateway):
    new_workspace(gateway, "oscorp", "Oscorp")
    page.sign_in(ADMIN_TOKEN)
    page.link("oscorp").click()
    page.create_key("escape-proof", scopes="people:read")
    shown = wait(page.driver, lambda d: d.find_element(By.CSS_SELECTOR, "[data-token]"))
    token = shown.text
    page.driver.switch_to.active_element.send_keys(Keys.ESCAPE)  # a reflex, not a decision
    page.driver.switch_to.active_element.send_keys(Keys.ESCAPE)
    # a second Escape in a row may close the dialog whatever the page says; the page opens it
    # again at once (its "close" event): the token is back on screen, never gone
    wait(page.driver, lambda d: d.find_element(By.CSS_SELECTOR, "[data-token]").text == token)
    assert page.take_token() == token  # Done, and only Done, puts it away


def test_leaving_the_page_with_a_token_on_screen_asks_first(page, gateway):
    """A shown-once token is on screen (its key is live, its token is nowhere else). A reload,
    Back, a closed tab or a typed address (Ctrl+R by reflex) lost it without a word: the page
    had no beforeunload handler, and its pagehide handler removes the dialog. The browser's
    'Leave site?' question now comes first while a token not yet put away is shown (SPEC:
    the token appears once ... 'until Done is pressed'); after Done, leaving is free."""
    new_workspace(gateway, "rcleave", "Leave")
    page.sign_in(ADMIN_TOKEN)
    page.link("rcleave").click()
    leaving = ("const e = new Event('beforeunload', {cancelable: true});"
               "window.dispatchEvent(e); return e.defaultPrevented || e.returnValue === false;")
    assert not page.driver.execute_script(leaving)  # nothing to lose yet
    page.create_key("about-to-be-lost", scopes="people:read")
    token = wait(page.driver, lambda d: d.find_element(By.CSS_SELECTOR, "[data-token]"))
    page.tokens_seen.append(token.get_attribute("data-token"))
    # the event the browser fires before unloading: a page that wants to ask cancels it
    # (headless chromium shows no prompt, so the page's answer is read from the event itself)
    asks = page.driver.execute_script(leaving)
    page.take_token()
    asks_after_done = page.driver.execute_script(leaving)
    assert not asks_after_done  # nothing to lose once Done was pressed: leave freely
    assert asks, "leaving the page with a shown-once token on screen loses it without asking"


def assert_signed_out(page: Console, *gone: str) -> None:
    """The sign-in form, and nothing of the session left on the page."""
    wait(page.driver, lambda d: page.field("Token").is_displayed())
    assert not page.driver.find_element(By.ID, "sign-out").is_displayed()
    assert page.driver.find_element(By.ID, "who").text == ""
    assert page.rows() == []
    main = page.driver.find_element(By.TAG_NAME, "main").get_attribute("innerHTML")
    for text in gone:
        assert text not in main, text


def signed_in_admin(page: Console, gateway, ws: str, name: str, key_name: str):
    """A new workspace and a keys:admin key of it, signed in on ``page`` (a 401 in the
    browser's console allowed: the tests that use it take that key's access away)."""
    new_workspace(gateway, ws, name)
    token, key = gateway.key(ws, name=key_name, scopes=["keys:admin", "people:read"])
    page.tokens_seen.append(token)
    page.allowed_errors.append("401")
    page.sign_in(token)
    wait(page.driver, lambda d: key_name in page.rows())
    return token, key


def test_losing_access_mid_session_returns_to_sign_in(page, gateway):
    # the operator revokes the key while its holder is signed in: the next step signs out
    admin_token, admin_key = signed_in_admin(page, gateway, "cyberdyne", "Cyberdyne",
                                             "skynet-admin")
    gateway.admin("POST", f"/workspaces/cyberdyne/keys/{admin_key['id']}/revoke")
    page.create_key("t-800", scopes="people:read")
    assert "This API key has been revoked." in page.alert_text()
    assert "request id" in page.alert_text()
    assert_signed_out(page, "skynet-admin", "Cyberdyne")
    assert keys_named(gateway, "cyberdyne", "t-800") == []

    # revoking the key one is signed in with, from the console: the same
    second_token, _ = gateway.key("cyberdyne", name="second-admin",
                                  scopes=["keys:admin", "people:read"])
    page.tokens_seen.append(second_token)
    page.sign_in(second_token)
    wait(page.driver, lambda d: "second-admin" in page.rows())
    page.press("Revoke", "second-admin")
    page.button("Revoke", page.dialog()).click()
    page.no_dialog()
    assert "This API key has been revoked." in page.alert_text()
    assert_signed_out(page, "second-admin", "Cyberdyne")


def test_a_key_that_loses_keys_admin_mid_session_is_signed_out(page, gateway):
    """The operator re-binds a signed-in workspace admin's key to scopes without keys:admin:
    every call of the page is then refused (403). The page stayed signed in, the workspace's
    keys still on screen for someone no longer allowed to see them, each step failing."""
    _, admin_key = signed_in_admin(page, gateway, "aperture", "Aperture", "glados")
    page.allowed_errors.append("403")
    status, body = gateway.admin("PATCH", f"/workspaces/aperture/keys/{admin_key['id']}",
                                 {"scopes": ["people:read"]})
    assert status == 200, body
    page.create_key("wheatley", scopes="people:read")
    problem = page.alert_text()
    assert problem.startswith("Signed out: ") and "keys:admin" in problem, problem
    assert "request id" in problem
    assert_signed_out(page, "glados", "Aperture")
    assert keys_named(gateway, "aperture", "wheatley") == []


def test_disabling_the_key_one_is_signed_in_with_asks_first(page, gateway):
    """Disable on one's own row signs the page out, and a workspace key cannot enable itself
    again: one click locked the person out with no word, where Revoke and Rotate say "the key
    you are signed in with" first."""
    _, admin_key = signed_in_admin(page, gateway, "wonka", "Wonka", "oompa")
    if "enabled" not in admin_key:
        pytest.skip("this build's API has no key controls")
    page.press("Disable", "oompa")
    dialog = page.dialog()
    assert "the key you are signed in with" in dialog.text
    page.button("Cancel", dialog).click()
    page.no_dialog()
    assert keys_named(gateway, "wonka", "oompa")[0]["enabled"] is True
    page.press("Disable", "oompa")
    page.button("Disable", page.dialog()).click()
    assert "This API key is disabled." in page.alert_text()
    assert_signed_out(page, "oompa", "Wonka")
    assert keys_named(gateway, "wonka", "oompa")[0]["enabled"] is False


def test_rotating_the_key_one_is_signed_in_with_shows_the_new_token_until_done(page, gateway):
    """A workspace admin rotating its own key with no grace revokes the key the page signs its
    calls with: the list's refresh then answers 401 and signs out. The new token (the only
    way back in, shown once) must stay on screen until Done, not vanish with the session."""
    admin_token, admin_key = signed_in_admin(page, gateway, "soylent", "Soylent", "self-rotor")
    page.press("Rotate", "self-rotor")
    dialog = page.dialog()
    assert "the key you are signed in with" in dialog.text  # said before, as Revoke says it
    page.button("Rotate", dialog).click()
    rotated = page.take_token()
    assert gateway.proxy("/people", rotated)[0] == 200
    assert gateway.proxy("/people", admin_token)[1]["error"]["code"] == "revoked_key"
    assert_signed_out(page, "self-rotor", "Soylent")  # then signed out, as the old key is gone
    page.sign_in(rotated)  # and the new token signs in
    wait(page.driver, lambda d: "self-rotor" in page.rows())
    page.button("Sign out").click()


def test_editing_the_expiry_keeps_a_role_the_page_has_not_listed(page, gateway):
    """The page reads the workspace's roles when it opens the workspace. A key bound to a role
    defined after that (by the CLI, meanwhile) must keep its role when only its expiry is
    edited: the Role field showed no such role, read as a change to "(none: use scopes)", and
    Save re-bound the key to no scopes at all."""
    new_workspace(gateway, "massive", "Massive Dynamic")
    gateway.key("massive", name="first", scopes=["people:read"])
    page.sign_in(ADMIN_TOKEN)
    page.link("massive").click()
    wait(page.driver, lambda d: "first" in page.rows())
    status, _ = gateway.admin("PUT", "/workspaces/massive/roles/auditor",
                              {"scopes": ["people:read"]})
    assert status == 200
    gateway.key("massive", name="audit-bot", role="auditor")
    page.create_key("second", scopes="people:read")  # the list is read again after it
    page.take_token()
    wait(page.driver, lambda d: "audit-bot" in page.rows())
    page.in_dialog("Edit", "audit-bot", "Expires", "2030-06-30", "Save")
    page.no_dialog()
    wait(page.driver, lambda d: "2030-06-30" in page.row("audit-bot").text)
    [edited] = keys_named(gateway, "massive", "audit-bot")
    assert edited["expires_at"] == "2030-06-30T00:00:00Z"
    assert edited["role"] == "auditor" and edited["scopes"] == ["people:read"]


def test_an_expiry_edited_as_a_duration_counts_from_the_servers_clock(browser, gateway):
    """The edit form turned "30d" into an instant with the browser's own clock (PATCH takes
    ``expires_at`` only): on a laptop whose clock was 10 days behind, the key was re-dated to
    expire 10 days early. It now counts from the admin API's clock, as the ``Date`` of its
    answers reads it (creating a key sends ``expires_in``, which the API counts itself). The
    browser's ``Date.now`` reads 10 days behind here, from before the page's own script runs."""
    import time
    from gateway.models import parse_rfc3339
    behind = browser.execute_cdp_cmd("Page.addScriptToEvaluateOnNewDocument", {"source": (
        "(() => { const real = Date.now; Date.now = () => real() - 10 * 86400000; })();")})
    try:
        browser.get("about:blank")
        browser.get_log("browser")
        browser.get(gateway.admin_url + "/console/")
        wait(browser, lambda d: d.execute_script(
            "return document.documentElement.dataset.ready"))
        assert browser.execute_script("return Date.now()") < time.time() * 1000 - 9 * 86400000
        page = Console(browser, gateway)
        new_workspace(gateway, "laptop", "Laptop Corp")
        gateway.key("laptop", name="skewed", scopes=["people:read"])
        page.sign_in(ADMIN_TOKEN)
        page.link("laptop").click()
        wait(browser, lambda d: "skewed" in page.rows())
        page.in_dialog("Edit", "skewed", "Expires", "30d", "Save")
        page.no_dialog()
        [edited] = keys_named(gateway, "laptop", "skewed")
        assert edited["expires_at"] is not None
        assert abs(parse_rfc3339(edited["expires_at"]) - (time.time() + 30 * 86400)) < 300, \
            edited["expires_at"]
        page.assert_nothing_kept()
        page.assert_no_console_errors()
    finally:
        browser.execute_cdp_cmd("Page.removeScriptToEvaluateOnNewDocument",
                                {"identifier": behind["identifier"]})


def test_a_workspace_admin_whose_key_expires_is_told_what_an_empty_expiry_means(page, gateway):
    """A key a workspace key makes may not outlive it: with Expires left empty the API gives
    the new key the acting key's expiry. The form said 'Empty for never' and the new key then
    expired with the admin's, unannounced; it now names that date."""
    new_workspace(gateway, "wallace", "Wallace Corp")
    token, _ = gateway.key("wallace", name="wallace-admin", scopes=["keys:admin", "people:read"],
                           expires_at="2031-03-01T12:00:00Z")
    page.tokens_seen.append(token)
    page.sign_in(token)
    wait(page.driver, lambda d: "wallace-admin" in page.rows())
    page.button("Create key").click()
    hint = page.driver.find_element(By.ID, "expires-hint").text
    assert "never" not in hint and "2031-03-01 12:00 UTC" in hint, hint
    assert page.field("Expires").get_attribute("placeholder") == "2031-03-01 12:00 UTC"
    page.field("Name").send_keys("bounded")
    page.field("Scopes").send_keys("people:read")
    page.button("Create").click()
    page.take_token()
    assert "2031-03-01 12:00 UTC" in page.row("bounded").text
    page.button("Sign out").click()
    page.sign_in(ADMIN_TOKEN)  # the operator's form still means never
    page.link("wallace").click()
    wait(page.driver, lambda d: "bounded" in page.rows())
    page.button("Create key").click()
    assert page.driver.find_element(By.ID, "expires-hint").text.startswith("Empty for never")
    assert page.field("Expires").get_attribute("placeholder") == "never"
    page.button("Cancel").click()


def test_a_rotation_by_a_workspace_admin_that_cuts_the_keys_life_says_so(page, gateway):
    """A key a workspace key makes may not outlive it, and the API applies that to a rotation
    too: a production key that never expires, rotated from the console by a workspace admin
    whose own key expires on a date, gets a successor that expires on that date (201, with
    expires_at cut; with an admin key of a day, the integration's new token dies tomorrow).
    The Rotate dialog said the new key has "the same name, role or scopes and rate limit" and
    the token dialog named only the key: nothing said that the token just handed to the
    integration stops working then, though the key it replaces never expired. The Create form
    names this very bound (its Expires hint, added after the same surprise on create); Rotate
    did not. The page must not present a cut-short replacement as a like-for-like one (SPEC
    Console: a workspace admin manages "within its own scopes"); both dialogs now name the
    date."""
    new_workspace(gateway, "rosen", "Rosen Association")
    token, admin = gateway.key("rosen", name="rosen-admin", scopes=["keys:admin", "people:read"],
                               expires_at="2031-03-01T12:00:00Z")
    gateway.key("rosen", name="prod", scopes=["people:read"])  # never expires
    page.tokens_seen.append(token)
    page.sign_in(token)
    wait(page.driver, lambda d: "prod" in page.rows())
    page.press("Rotate", "prod")
    rotate_text = page.dialog().text
    grace = page.field("Grace", page.dialog())
    grace.clear()
    grace.send_keys("24h")
    page.button("Rotate", page.dialog()).click()
    shown = wait(page.driver, lambda d: next(
        (t for t in d.find_elements(By.CSS_SELECTOR, '[role="dialog"] [data-token]')
         if t.is_displayed()), False))
    token_text = page.dialog().text
    new_token = shown.text.strip()
    page.tokens_seen.append(new_token)
    status, listing = gateway.admin("GET", "/workspaces/rosen/keys?status=active")
    new = next(k for k in listing["items"] if k["name"] == "prod" and
               new_token.startswith(k["prefix"]))
    assert new["expires_at"] == "2031-03-01T12:00:00Z"  # the API did cut it
    page.button("Done", page.dialog()).click()
    page.no_dialog()
    told = "2031-03-01 12:00 UTC" in rotate_text or "2031-03-01 12:00 UTC" in token_text
    assert told, (rotate_text, token_text)


def _rotate_as_workspace_admin(page, gateway, ws: str, *, admin_days: int,
                               made_days_ago: float, life_days: float) -> tuple:
    """Sign in with a keys:admin key of ``ws`` expiring in ``admin_days``, and rotate from the
    console a key "prod" made ``made_days_ago`` with a life of ``life_days`` (written into its
    record). Returns (the Rotate dialog's text and warnings, the token dialog's, the new key,
    the admin key's expiry as the API writes it)."""
    new_workspace(gateway, ws, ws.title())
    at = (int(time.time()) // 60 + admin_days * 24 * 60) * 60
    acting_iso = datetime.fromtimestamp(at, timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")
    token, _ = gateway.key(ws, name=f"{ws}-admin", scopes=["keys:admin", "people:read"],
                           expires_at=acting_iso)
    far = datetime.fromtimestamp(time.time() + 90 * 86400, timezone.utc)
    _, prod = gateway.key(ws, name="prod", scopes=["people:read"],
                          expires_at=far.strftime("%Y-%m-%dT%H:%M:%SZ"))
    r = redis_sync.Redis.from_url(gateway.redis_url)
    made = float(int(time.time())) - made_days_ago * 86400
    r.hset(f"kg:key:{{{ws}}}:{prod['id']}",
           mapping={"created_at": repr(made), "expires_at": repr(made + life_days * 86400)})
    r.close()
    page.tokens_seen.append(token)
    page.sign_in(token)
    wait(page.driver, lambda d: "prod" in page.rows())
    page.press("Rotate", "prod")

    def said() -> tuple[str, list[str]]:
        dialog = page.dialog()
        return dialog.text, [w.text for w in dialog.find_elements(By.CSS_SELECTOR, ".warning")]
    rotate = said()
    page.button("Rotate", page.dialog()).click()
    shown = wait(page.driver, lambda d: next(
        (t for t in d.find_elements(By.CSS_SELECTOR, '[role="dialog"] [data-token]')
         if t.is_displayed()), False))
    told = said()
    new_token = shown.text.strip()
    page.tokens_seen.append(new_token)
    status, keys = gateway.admin("GET", f"/workspaces/{ws}/keys?status=active")
    new = next(k for k in keys["items"] if k["name"] == "prod"
               and new_token.startswith(k["prefix"]))
    page.button("Done", page.dialog()).click()
    page.no_dialog()
    return rotate, told, new, acting_iso


def test_console_a_rotation_of_an_expired_key_cut_by_the_admins_key_says_so(page, gateway):
    """A rotation gives the new key the old key's *lifetime* from now (rotate_key: now +
    (expires_at - created_at)), capped by a workspace admin's own expiry. An expired
    30-day key (expired yesterday: the case "an expired key's rotation" is for) rotated by
    an operator gets 30 days; rotated from the console by a workspace admin whose key expires
    in 2 days, it gets 2 days. The console's first warnings compared the admin's expiry
    (Rotate dialog) and the new key's (token dialog) with the *old key's expiry*, which is in
    the past: neither dialog warned, and the integration was handed a token that dies in 2
    days instead of 30, silently. Both dialogs now compare with the old key's lifetime from
    now, and name the date."""
    (rotate_text, _), (token_text, _), new, acting_iso = _rotate_as_workspace_admin(
        page, gateway, "selfrot", admin_days=2, made_days_ago=31, life_days=30)
    assert new["expires_at"] == acting_iso  # the API cut 30 days to the admin's 2
    shown_at = acting_iso.replace("T", " ")[:16] + " UTC"
    assert shown_at in rotate_text and shown_at in token_text, (rotate_text, token_text)


def test_console_a_rotation_whose_lifetime_the_admins_key_cuts_says_so(page, gateway):
    """The same gap with an active key: "prod" has a 40-day life and 5 days left; a rotation
    gives its successor 40 days from now. A workspace admin whose key expires in 20 days
    rotates it: the API gives the successor 20 days (cut by half). Both warnings compared
    with the old key's expiry (5 days), so neither fired, and the Rotate dialog still
    promised a like-for-like replacement."""
    (rotate_text, _), (token_text, _), new, acting_iso = _rotate_as_workspace_admin(
        page, gateway, "selfrot2", admin_days=20, made_days_ago=35, life_days=40)
    assert new["expires_at"] == acting_iso  # 20 days where a rotation gives 40
    shown_at = acting_iso.replace("T", " ")[:16] + " UTC"
    assert shown_at in rotate_text and shown_at in token_text, (rotate_text, token_text)


def test_console_a_rotation_whose_lifetime_the_admins_key_holds_warns_of_nothing(page, gateway):
    """The other side of the two above: an expired key of a 10-day life (made 30 days ago),
    rotated by a workspace admin whose key expires in 20 days, gets its 10 days from now, not
    cut; neither dialog warns of an expiry, though the old key's (past) one is earlier than
    the admin's and its lifetime from its creation too."""
    (_, rotate_warnings), (_, token_warnings), new, _ = _rotate_as_workspace_admin(
        page, gateway, "selfrot3", admin_days=20, made_days_ago=30, life_days=10)
    created = datetime.strptime(new["created_at"], "%Y-%m-%dT%H:%M:%SZ")
    expires = datetime.strptime(new["expires_at"], "%Y-%m-%dT%H:%M:%SZ")
    assert (expires - created).total_seconds() == 10 * 86400  # not cut
    assert rotate_warnings == [], rotate_warnings
    assert [w for w in token_warnings if "expires" in w] == [], token_warnings


RENDER = """
const [id, value] = arguments;
const control = document.getElementById(id);
const started = performance.now();
control.value = value;
control.dispatchEvent(new Event(control.tagName === "SELECT" ? "change" : "input"));
return [performance.now() - started, document.querySelectorAll("#keys tbody tr").length,
        [...document.querySelectorAll("#keys tbody tr th")].slice(0, 2).map(t => t.textContent)];
"""


# how many rows the key table has: find_elements sent back a reference for each of 1,000 rows
COUNT_ROWS = "return document.querySelectorAll('#keys tbody tr').length"


def test_a_workspace_of_a_thousand_keys_stays_usable(page, gateway):
    """1,000 keys: listed whole, counted, sorted and filtered in the page, each redraw within
    two seconds even on a busy shared machine (~0.2 s here); a key deep in the list is revoked
    from its row."""
    new_workspace(gateway, "gigantic", "Gigantic Industries", plan="unlimited")

    async def make_keys() -> list:
        # made by the gateway's own store, as the admin API's create makes them (the same
        # script, records and audit entries; the operator as actor), 8 at a time on its loop:
        # this test is about the page, and 1,000 POSTs through the admin listener took ~4.3 s
        # of CPU to these ~2.5 s, on a 2-core machine the suite keeps busy (creates through the
        # API are tested in test_admin*.py and in this file's other tests)
        store, limit = gateway.gw.store, asyncio.Semaphore(8)
        environment = gateway.gw.config.keys.environments[0]  # a create's default

        async def make(i: int):
            async with limit:
                return (await store.create_key(
                    "gigantic", name=f"svc-{i:04d}", environment=environment,
                    description="batch " + str(i % 7), scopes=["people:read"])).key
        return await asyncio.gather(*(make(i) for i in range(1000)))
    made = gateway.run(make_keys())
    assert gateway.admin("POST", f"/workspaces/gigantic/keys/{made[777].id}/revoke")[0] == 200
    page.sign_in(ADMIN_TOKEN)
    page.link("gigantic").click()
    wait(page.driver, lambda d: d.execute_script(COUNT_ROWS) == 1000)
    assert page.driver.find_element(By.ID, "keys-text").text == "999 active (no cap)"
    took, count, first = page.driver.execute_script(RENDER, "sort", "name:asc")
    assert count == 1000 and first == ["svc-0000", "svc-0001"] and took < 2000, took
    took, count, first = page.driver.execute_script(RENDER, "sort", "name:desc")
    assert count == 1000 and first == ["svc-0999", "svc-0998"] and took < 2000, took
    took, count, first = page.driver.execute_script(RENDER, "filter-status", "revoked")
    assert (count, first) == (1, ["svc-0777"]) and took < 2000, took
    took, count, _ = page.driver.execute_script(RENDER, "filter-status", "active")
    assert count == 999 and took < 2000, took
    took, count, _ = page.driver.execute_script(RENDER, "filter-unused", "3")
    assert count == 999 and took < 2000, took  # never used: unused for any number of days
    row = page.driver.find_element(By.XPATH, "//table[@id='keys']/tbody/tr[th='svc-0500']")
    page.button("Revoke", row).click()
    page.button("Revoke", page.dialog()).click()
    page.no_dialog()
    wait(page.driver, lambda d: d.execute_script(COUNT_ROWS) == 998)
    assert page.driver.find_element(By.ID, "keys-text").text == "998 active (no cap)"


def test_an_expiry_typed_as_a_date_and_time_means_utc_as_the_form_says(page, gateway):
    new_workspace(gateway, "tyrell", "Tyrell")
    page.driver.execute_cdp_cmd("Emulation.setTimezoneOverride",
                                {"timezoneId": "America/New_York"})  # a person far from UTC
    try:
        page.sign_in(ADMIN_TOKEN)
        page.link("tyrell").click()
        # the workspace view shows its Create key button once the keys are in: waited for
        # (clicked at once, it was still hidden on a loaded machine: "element not interactable")
        hint = wait(page.driver, lambda d: next(
            (b for b in d.find_elements(By.ID, "create-open") if b.is_displayed()), False))
        hint.click()
        assert "(UTC)" in page.driver.find_element(By.ID, "expires-hint").text
        page.button("Cancel").click()

        page.create_key("replicant", scopes="people:read", expires="2031-01-31 12:00")
        page.take_token()
        wait(page.driver, lambda d: "2031-01-31 12:00 UTC" in page.row("replicant").text)
        [key] = keys_named(gateway, "tyrell", "replicant")
        assert key["expires_at"] == "2031-01-31T12:00:00Z"

        # a day that does not exist is refused, not moved to another one (Feb 31 → Mar 3)
        page.create_key("nexus", scopes="people:read", expires="2031-02-31")
        assert "Expires must be" in page.alert_text()
        page.button("Cancel").click()
        assert keys_named(gateway, "tyrell", "nexus") == []
    finally:
        page.driver.execute_cdp_cmd("Emulation.setTimezoneOverride", {"timezoneId": ""})


def assert_fits(page: Console, what: str) -> None:
    """Nothing sticks out sideways: the page has no horizontal scroll, nor does a dialog."""
    widths = page.driver.execute_script(
        "const d = document.querySelector('dialog');"
        "return [document.documentElement.scrollWidth, document.documentElement.clientWidth,"
        " d ? d.scrollWidth : 0, d ? d.clientWidth : 0]")
    assert widths[0] <= widths[1] and widths[2] <= widths[3], (what, widths)


def test_very_long_names_wrap_instead_of_widening_the_page(page, gateway):
    long_ws = "Initrode" + "W" * 140  # one 148-character word
    new_workspace(gateway, "initrode", long_ws)
    name = "k" * 200  # the longest name the API takes, with no space to break at
    gateway.key("initrode", name=name, description="d" * 2000, scopes=["people:read"])
    page.sign_in(ADMIN_TOKEN)
    page.link("initrode")
    assert_fits(page, "workspace list")
    page.link("initrode").click()
    page.row(name)
    assert_fits(page, "key list")
    page.press("Revoke", name)
    page.dialog()
    assert_fits(page, "revoke dialog")
    page.driver.switch_to.active_element.send_keys(Keys.ESCAPE)
    page.no_dialog()
    page.create_key("x" + name[1:], scopes="people:read")
    page.dialog()
    assert_fits(page, "token dialog")
    page.take_token()
    assert_fits(page, "key list, after a create")


def test_a_double_click_on_sign_in_signs_in_without_a_false_error(page, gateway):
    from selenium.webdriver.common.action_chains import ActionChains
    new_workspace(gateway, "hanso", "Hanso")
    page.field("Token").send_keys(ADMIN_TOKEN)
    ActionChains(page.driver).double_click(page.button("Sign in")).perform()
    page.link("hanso")
    alert = page.driver.find_element(By.ID, "alert")
    assert not alert.is_displayed(), alert.text


def test_a_call_without_an_answer_yet_shows_that_the_page_is_waiting(browser, gateway):
    """The admin API (behind a tunnel or a load balancer, or busy hashing) takes its time:
    Sign in was pressed and nothing on the page changed, for as long as the answer took (the
    page set aria-busy only, which nothing draws, and a second press is swallowed). A person
    could not tell a press that did nothing from a call on its way. Now the button is
    aria-disabled (its name stays) and a status line says "Signing in…"; after 10 s without an answer it says it is
    still waiting; the answer puts both back. A call from no form (opening a workspace) says
    so in the page's status line."""
    release = asyncio.Event()

    async def relay(request: web.Request) -> web.StreamResponse:
        if request.path.startswith("/admin/"):
            await release.wait()  # the API's answer is on its way, slowly
        async with ClientSession() as client:
            async with client.request(request.method, gateway.admin_url + request.path_qs,
                                      headers={k: v for k, v in request.headers.items()
                                               if k.lower() not in ("host",)},
                                      data=await request.read()) as upstream:
                body = await upstream.read()
                headers = {k: v for k, v in upstream.headers.items()
                           if k.lower() not in ("content-length", "transfer-encoding",
                                                "content-encoding", "connection")}
                return web.Response(status=upstream.status, body=body, headers=headers)

    async def start():
        app = web.Application()
        app.router.add_route("*", "/{tail:.*}", relay)
        runner = web.AppRunner(app, access_log=None)
        await runner.setup()
        port = free_port()
        await web.TCPSite(runner, "127.0.0.1", port).start()
        return runner, f"http://127.0.0.1:{port}"

    shows = ("const b = document.querySelector('#signin-form button[type=submit]');"
             "const w = document.querySelector('#signin-form .waiting');"
             "return {button: b.textContent.trim(), busy: b.getAttribute('aria-disabled'),"
             "        focused: document.activeElement === b,"
             "        waiting: w && w.offsetParent !== null ? w.textContent.trim() : ''};")
    new_workspace(gateway, "rcwait", "Wait")
    runner, origin = gateway.run(start())
    try:
        browser.get(origin + "/console/")
        wait(browser, lambda d: d.execute_script("return document.documentElement.dataset.ready"))
        browser.find_element(By.ID, "token").send_keys(ADMIN_TOKEN)
        button = browser.find_element(By.XPATH, "//button[normalize-space()='Sign in']")
        button.click()
        time.sleep(3)
        shown = browser.execute_script(shows)
        # the button keeps its name (the SPEC's `Sign in`): the status line says what runs
        assert shown["button"] == "Sign in" and shown["busy"] == "true", shown
        assert shown["waiting"].startswith("Signing in…"), shown
        assert "waiting for the admin api" in shown["waiting"].lower(), shown
        assert shown["focused"], shown  # not disabled: focus stays where the person left it
        button.click()  # a second press while waiting does nothing more
        wait(browser, lambda d: "still waiting" in d.execute_script(shows)["waiting"].lower(), 15)
        gateway.loop.call_soon_threadsafe(release.set)
        wait(browser, lambda d: d.find_element(By.ID, "workspaces-view").is_displayed())
        assert not browser.find_element(By.ID, "alert").is_displayed()
        shown = browser.execute_script(shows)
        assert shown["button"] == "Sign in" and shown["busy"] is None, shown
        assert shown["waiting"] == "", shown
        # a call from no form (a workspace's link) says so in the page's status line
        async def hold_again() -> None:
            release.clear()
        gateway.run(hold_again())  # cleared once this returns (was: a 0.2 s pause)
        wait(browser, lambda d: d.find_element(By.LINK_TEXT, "rcwait")).click()
        status = browser.find_element(By.ID, "status")
        wait(browser, lambda d: status.text == "Opening workspace rcwait…", 5)
        gateway.loop.call_soon_threadsafe(release.set)
        wait(browser, lambda d: d.find_element(By.ID, "ws-title").text == "Wait (rcwait)")
        assert status.text == ""
    finally:
        gateway.loop.call_soon_threadsafe(release.set)
        browser.get("about:blank")
        gateway.run(runner.cleanup())


def test_signing_out_forgets_the_filters_and_order_too(page, gateway):
    new_workspace(gateway, "dharma", "Dharma")
    gateway.key("dharma", name="swan", scopes=["people:read"])
    page.sign_in(ADMIN_TOKEN)
    page.link("dharma").click()
    page.row("swan")
    Select(page.field("Status")).select_by_visible_text("Revoked")
    page.field("Unused for (days)").send_keys("3")
    Select(page.field("Sort by")).select_by_visible_text("Name, Z to A")
    wait(page.driver, lambda d: page.rows() == [])
    page.button("Sign out").click()
    page.sign_in(ADMIN_TOKEN)  # the next person at this screen
    page.link("dharma").click()
    page.row("swan")  # the whole list, not the last person's view of it
    assert Select(page.field("Status")).first_selected_option.text == "All"
    assert page.field("Unused for (days)").get_attribute("value") == ""
    assert Select(page.field("Sort by")).first_selected_option.text == "Newest first"


def test_keyboard_focus_survives_the_list_being_redrawn(page, gateway):
    new_workspace(gateway, "vought", "Vought")
    gateway.key("vought", name="homelander", scopes=["people:read"])
    gateway.key("vought", name="starlight", scopes=["people:read"])
    keyboard = lambda *keys: page.driver.switch_to.active_element.send_keys(*keys)  # noqa: E731
    focused = lambda: page.driver.execute_script(  # noqa: E731
        "const e = document.activeElement; return e === document.body || e === null ? 'body'"
        " : e.tagName + ':' + e.textContent.trim().slice(0, 40)")
    page.sign_in(ADMIN_TOKEN)
    page.link("vought").click()

    # rotate from the keyboard: after Done, focus is back on the row, not lost to the page
    page.row("starlight").find_element(By.XPATH, ".//button[normalize-space()='Rotate']") \
        .send_keys(Keys.ENTER)
    page.dialog()
    keyboard(Keys.TAB, Keys.ENTER)  # focus opens on the title: Tab to Grace (0), Enter rotates
    page.tokens_seen.append(wait(page.driver, lambda d: d.find_element(
        By.CSS_SELECTOR, "[data-token]")).text)
    wait(page.driver, lambda d: page.rows().count("starlight") == 2)
    keyboard(Keys.TAB, Keys.ENTER)  # Copy, then Done
    page.no_dialog()
    assert focused() != "body"

    # revoke from the keyboard: the row is redrawn after the dialog closes; focus stays on it
    page.row("homelander").find_element(By.XPATH, ".//button[normalize-space()='Revoke']") \
        .send_keys(Keys.ENTER)
    page.dialog()
    keyboard(Keys.SHIFT, Keys.TAB)
    keyboard(Keys.ENTER)
    page.no_dialog()
    wait(page.driver, lambda d: "revoked" in page.row("homelander").text)
    assert focused() != "body"


def test_least_recently_used_first_puts_never_used_keys_first(page, gateway):
    # a key never used is the least recently used of all, as the API's sort=last_used and
    # `keygate keys list --sort last_used` order it: the keys nothing relies on lead the list
    new_workspace(gateway, "oceanic", "Oceanic")
    used_token, _ = gateway.key("oceanic", name="used", scopes=["people:read"])
    gateway.key("oceanic", name="never", scopes=["people:read"])
    status, body = gateway.proxy("/people", used_token)
    assert status == 200, body
    page.sign_in(ADMIN_TOKEN)
    page.link("oceanic").click()
    page.row("never")
    Select(page.field("Sort by")).select_by_visible_text("Least recently used first")
    wait(page.driver, lambda d: page.rows() == ["never", "used"])
    Select(page.field("Sort by")).select_by_visible_text("Recently used first")
    wait(page.driver, lambda d: page.rows() == ["used", "never"])


def test_the_column_headers_sort_by_click_and_keyboard_in_step_with_the_sort_menu(page, gateway):
    # The headers showed sort arrows but clicking them did nothing: only the Sort by menu
    # sorted. Each sortable header is a button in its <th> (aria-sort on the th) that sorts by
    # its column, again to reverse, and the menu and the headers always show the same order.
    new_workspace(gateway, "wernham", "Wernham Hogg")
    gateway.key("wernham", name="bravo", scopes=["people:read"], expires_in=30 * 86400)
    gateway.key("wernham", name="alpha", scopes=["people:read"], expires_in=10 * 86400)
    gateway.key("wernham", name="charlie", scopes=["people:read"])
    page.sign_in(ADMIN_TOKEN)
    page.link("wernham").click()
    page.row("charlie")

    def header(label: str):
        return page.driver.find_element(
            By.XPATH, f"//table[@id='keys']/thead//th[normalize-space()='{label}']")

    def control(label: str):
        return header(label).find_element(By.XPATH, "./button[@type='button']")

    def order() -> dict[str, str]:
        return {th.text.strip(): th.get_attribute("aria-sort")
                for th in page.driver.find_elements(By.CSS_SELECTOR, "#keys thead th[aria-sort]")
                if th.get_attribute("aria-sort") != "none"}

    def menu() -> str:
        return Select(page.field("Sort by")).first_selected_option.text

    for label in ("Name", "Created", "Last used", "Expires", "Status"):
        assert control(label).accessible_name == "Sort by " + label.lower()
    assert order() == {"Created": "descending"} and menu() == "Newest first"

    control("Name").click()
    wait(page.driver, lambda d: page.rows() == ["alpha", "bravo", "charlie"])
    assert order() == {"Name": "ascending"} and menu() == "Name, A to Z"
    control("Name").click()
    wait(page.driver, lambda d: page.rows() == ["charlie", "bravo", "alpha"])
    assert order() == {"Name": "descending"} and menu() == "Name, Z to A"

    # from the keyboard: Enter, then Space; focus stays on the header's button
    control("Expires").send_keys(Keys.ENTER)
    wait(page.driver, lambda d: page.rows() == ["alpha", "bravo", "charlie"])  # never: last
    assert order() == {"Expires": "ascending"} and menu() == "Expiring soonest first"
    page.driver.switch_to.active_element.send_keys(Keys.SPACE)
    wait(page.driver, lambda d: page.rows() == ["bravo", "alpha", "charlie"])
    assert order() == {"Expires": "descending"} and menu() == "Expiring latest first"
    assert page.driver.switch_to.active_element.get_attribute("aria-label") == "Sort by expires"

    # the menu moves the headers, and a header click goes on from the menu's order
    Select(page.field("Sort by")).select_by_visible_text("Name, Z to A")
    wait(page.driver, lambda d: order() == {"Name": "descending"})
    control("Name").click()
    wait(page.driver, lambda d: page.rows() == ["alpha", "bravo", "charlie"])
    assert menu() == "Name, A to Z"
    control("Status").click()
    wait(page.driver, lambda d: order() == {"Status": "ascending"})
    assert menu() == "Status"
    control("Status").click()
    wait(page.driver, lambda d: order() == {"Status": "descending"})
    assert menu() == "Status, revoked first"

    # "Create" still names one button: the Created header's button is "Sort by created"
    page.create_key("delta", scopes="people:read")
    page.take_token()
    wait(page.driver, lambda d: "delta" in page.rows())


def test_leaving_the_page_signs_out_so_back_does_not_bring_the_session_back(page, gateway):
    # The browser keeps a page it leaves in its back/forward cache, script state and all:
    # Back then showed the workspace signed in as the operator (token in memory, working), and
    # a shown-once token still on screen, to whoever came to the screen next.
    new_workspace(gateway, "ajira", "Ajira")
    page.sign_in(ADMIN_TOKEN)
    page.link("ajira").click()
    page.create_key("flight-316", scopes="people:read")
    shown = wait(page.driver, lambda d: d.find_elements(By.CSS_SELECTOR, "[data-token]"))
    page.tokens_seen.append(shown[0].text.strip())
    page.driver.get("data:text/html,<p>elsewhere</p>")
    page.driver.back()
    wait(page.driver, lambda d: d.current_url.startswith(gateway.admin_url + "/console/"))
    wait(page.driver, lambda d: page.field("Token").is_displayed())
    assert page.driver.find_element(By.ID, "who").text == ""
    assert not page.driver.find_element(By.ID, "workspace-view").is_displayed()
    assert not page.driver.find_elements(By.CSS_SELECTOR, "[data-token], dialog")
    assert page.tokens_seen[-1] not in page.driver.page_source


# --- a browser app on another origin calling the API through keygate (CORS) -------------------

@contextlib.contextmanager
def page_origin():
    """A plain page served on its own loopback origin (``http://127.0.0.1:<port>``)."""
    import http.server

    class Page(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            body = b"<!doctype html><title>app</title><p>an app"
            self.send_response(200)
            self.send_header("Content-Type", "text/html")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args: Any) -> None:
            pass
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Page)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()


FETCH = """
const [url, token, done] = arguments;
fetch(url, {headers: {"Authorization": "Bearer " + token, "Content-Type": "application/json"}})
  .then(async r => done({status: r.status, body: await r.json(),
                         retryAfter: r.headers.get("Retry-After"),
                         rateLimit: r.headers.get("RateLimit"),
                         requestId: r.headers.get("X-Request-Id")}))
  .catch(e => done({failed: String(e)}));
"""


def test_a_page_on_another_origin_reads_answers_through_keygate(browser, redis_server_url):
    """The page's fetch carries the key in Authorization (and a JSON Content-Type), so the
    browser sends a preflight first: keygate answers it without a key. The page then reads a
    200 and a 429's JSON and its Retry-After; a page on an origin not listed cannot read
    anything (the browser refuses before its code sees a status)."""
    from gateway.settings import CorsConfig
    with page_origin() as app, page_origin() as other:
        gw = start_gateway(redis_server_url, cors=CorsConfig((app,)))
        try:
            new_workspace(gw, "vandelay", "Vandelay")
            token, _ = gw.key("vandelay", name="spa", scopes=["people:read"], rate_limit="1/m")
            browser.set_script_timeout(WAIT)
            browser.get(app + "/")
            first = browser.execute_async_script(FETCH, gw.proxy_url + "/people/1", token)
            assert first["status"] == 200, first
            assert first["body"] == {"path": "/people/1", "workspace": "vandelay"}
            assert first["rateLimit"] and first["requestId"]
            second = browser.execute_async_script(FETCH, gw.proxy_url + "/people/1", token)
            assert second["status"] == 429, second
            assert second["body"]["error"]["code"] == "rate_limited"
            assert int(second["retryAfter"]) >= 1 and second["requestId"]
            usage = browser.execute_async_script(FETCH, gw.proxy_url + "/_keygate/v1/usage",
                                                 token)
            assert usage["status"] == 200 and usage["body"]["used"] == 1, usage

            browser.get(other + "/")
            refused = browser.execute_async_script(FETCH, gw.proxy_url + "/people/1", token)
            assert refused == {"failed": "TypeError: Failed to fetch"}
            assert gw.admin("GET", "/workspaces/vandelay/usage")[1]["used"] == 1  # never sent
        finally:
            gw.stop()


def test_listed_origins_are_kept_as_this_browser_serialises_them(browser):
    """What ``cors.allow_origins`` keeps of an origin is what the browser sends as ``Origin``
    for a page there (``new URL(...).origin``): a Unicode name, an IPv6 or IPv4 address in
    another spelling, a default port, case; and one the browser refuses is a problem."""
    from gateway.config.cors import origin_problem
    from test_config import BROWSER_ORIGINS
    listed = [text for text, _ in BROWSER_ORIGINS] + [
        "HTTPS://App.Example:443", "http://web_app:3000", "https://app.example.",
        "http://[::1]:80", "http://[0:1:0:0:1:0:0:0]", "http://0x.0x", "http://0xffffffff",
        "http://256.1.1.1", "https://example.123", "http://4294967296", "http://08",
        "https://b\u200dcher.example", "http://[fe80::1%25eth0]"]
    browser.get("about:blank")
    serialised = browser.execute_script(
        "return arguments[0].map(s => { try { return new URL(s).origin; } "
        "catch (e) { return null; } })", listed)
    assert [origin_problem(text)[0] for text in listed] == serialised


# --- answers that arrive late --------------------------------------------------------------------

# Installed (while a test is `slowed`) before the page's own script: holds back every fetch whose
# URL holds window.__slowPath (and whose method is window.__slowMethod, if set) by 1.5 s, as a
# busy admin API or a slow network would.
# window.__slowHeld counts the fetches held back; window.__slowPending those whose answer the
# page has not handled yet: it drops once the page read the answer's body (response.json(),
# which the page's api() calls for every answer) and then every step the page takes on it
# without waiting for anything else (drawing it, or not), or once the fetch failed.
SLOW = r"""
window.__slowPath = null;
window.__slowMethod = null;
window.__slowHeld = 0;
window.__slowPending = 0;
const fetchNow = window.fetch;
window.fetch = async function (input, init) {
  const method = (init && init.method) || "GET";
  if (!(window.__slowPath && String(input).includes(window.__slowPath)
        && (window.__slowMethod === null || method === window.__slowMethod))) {
    return fetchNow.apply(this, arguments);
  }
  window.__slowHeld += 1;
  window.__slowPending += 1;
  let handled = false;
  // a task after the body is read: the page's own steps on it (microtasks) have all run
  const done = () => {
    if (!handled) {
      handled = true;
      setTimeout(() => { window.__slowPending -= 1; }, 0);
    }
  };
  try {
    await new Promise((resolve) => setTimeout(resolve, 1500));
    const response = await fetchNow.apply(this, arguments);
    const json = response.json;
    response.json = function () {
      const read = json.apply(this, arguments);
      read.then(done, done);
      return read;
    };
    return response;
  } catch (err) {
    done();
    throw err;
  }
};
"""


@contextlib.contextmanager
def slowed(page: Console):
    driver = page.driver
    script = driver.execute_cdp_cmd("Page.addScriptToEvaluateOnNewDocument", {"source": SLOW})
    try:
        driver.get(page.gateway.admin_url + "/console/")
        wait(driver, lambda d: d.execute_script("return document.documentElement.dataset.ready"))
        def hold(path: str | None, method: str | None = None) -> None:
            driver.execute_script("window.__slowPath = arguments[0];"
                                  " window.__slowMethod = arguments[1]; window.__slowHeld = 0",
                                  path, method)
        yield hold
    finally:
        driver.execute_cdp_cmd("Page.removeScriptToEvaluateOnNewDocument",
                               {"identifier": script["identifier"]})


def assert_shows_workspace(page: Console, title: str, keys: list[str]) -> None:
    """The workspace view shows ``title`` and exactly ``keys``, and still does once every
    held-back answer (1.5 s) has arrived and the page has handled it (there was one)."""
    shown = lambda d: (d.find_element(By.ID, "ws-title").text, sorted(page.rows()))  # noqa: E731
    wait(page.driver, lambda d: shown(d) == (title, sorted(keys)))
    # (a fixed 2.5 s pause here waited for the held answers; now their handling is seen)
    wait(page.driver, lambda d: d.execute_script("return window.__slowPending") == 0)
    assert page.driver.execute_script("return window.__slowHeld") > 0  # a late answer came
    assert shown(page.driver) == (title, sorted(keys))


def test_a_late_answer_for_another_workspace_is_not_shown_under_this_one(page, gateway):
    """The operator opens one workspace and, while its keys are on their way, opens another
    (or goes back to the list and opens another after an action in the first). The late list
    of the first workspace was drawn under the second's title: its keys shown as the second's,
    Revoke on one of them a 404, Create key making a key in the workspace not listed."""
    new_workspace(gateway, "slowpoke", "Slowpoke")
    new_workspace(gateway, "speedy", "Speedy")
    gateway.key("slowpoke", name="slow-key", scopes=["people:read"])
    gateway.key("speedy", name="fast-key", scopes=["people:read"])
    with slowed(page) as slow:
        page.sign_in(ADMIN_TOKEN)
        slow("/workspaces/slowpoke/keys")
        page.link("slowpoke").click()
        page.link("speedy").click()  # changed their mind: the last one chosen is shown
        assert_shows_workspace(page, "Speedy (speedy)", ["fast-key"])

        # an action's refresh that arrives after another workspace was opened
        slow(None)
        page.link("All workspaces").click()
        page.link("slowpoke").click()
        wait(page.driver, lambda d: "slow-key" in page.rows())
        # the list read again after Create is held back (set before Create: set after it, the
        # read was at times sent before, and nothing late came; the Create itself is not held)
        slow("/workspaces/slowpoke/keys", "GET")
        page.create_key("another", scopes="people:read")
        page.take_token()
        page.link("All workspaces").click()
        page.link("speedy").click()
        assert_shows_workspace(page, "Speedy (speedy)", ["fast-key"])
        page.press("Revoke", "fast-key")
        page.button("Revoke", page.dialog()).click()
        page.no_dialog()
        wait(page.driver, lambda d: "revoked" in page.row("fast-key").text)


def test_an_operator_token_shaped_almost_like_a_key_signs_in_as_the_operator(browser, own_redis):
    """The admin API takes a token as a key only when it has a key's exact shape (a lowercase
    prefix of at most 10 characters, ...); anything else is checked as the operator token. The
    page used a looser shape of its own, so an operator token such as
    'Keygate-Ops_admin_<50 letters and digits>' signed in as "key Keygate-Ops_admin_..." and
    showed only the first workspace, with no way to the others."""
    token = "Keygate-Ops_admin_" + "x7Q" * 16 + "ab"
    gw = start_gateway(own_redis.url, admin_token=token)
    try:
        for ws in ("first", "second"):
            status, body = gw.admin("POST", "/workspaces", {"id": ws, "name": ws.title()},
                                    token=token)
            assert status == 201, body
        browser.get(gw.admin_url + "/console/")
        wait(browser, lambda d: d.execute_script("return document.documentElement.dataset.ready"))
        browser.get_log("browser")
        page = Console(browser, gw)
        page.tokens_seen.append(token)
        page.sign_in(token)
        page.link("second")
        assert page.link("first").is_displayed()
        assert browser.find_element(By.ID, "who").text == "Signed in as operator"
        page.link("second").click()
        wait(browser, lambda d: d.find_element(By.ID, "ws-title").text == "Second (second)")
        assert page.link("All workspaces").is_displayed()
        page.assert_nothing_kept()
        page.assert_no_console_errors()
        page.button("Sign out").click()
    finally:
        gw.stop()


def accessible_names(driver, role: str) -> list[str]:
    """The names the browser gives to a screen reader for the shown elements of ``role``."""
    tree = driver.execute_cdp_cmd("Accessibility.getFullAXTree", {})
    return [n.get("name", {}).get("value", "") for n in tree["nodes"]
            if not n.get("ignored") and n.get("role", {}).get("value") == role]


def test_a_screen_reader_hears_each_column_by_its_own_name(page, gateway):
    """The sortable headers hold a button named "Sort by created" (so "Create" names one
    button on the page); that name became the column header's too, so a screen reader read
    every cell of the column as "Sort by created: 2026-12-05 ..." instead of "Created: ..."."""
    new_workspace(gateway, "vox", "Vox")
    gateway.key("vox", name="speaker", scopes=["people:read"])
    page.sign_in(ADMIN_TOKEN)
    page.link("vox").click()
    wait(page.driver, lambda d: "speaker" in page.rows())
    headers = [n for n in accessible_names(page.driver, "columnheader")]
    assert headers == ["Name", "Description", "Role / scopes", "Prefix", "Created", "Last used",
                       "Expires", "This month", "Status", "Actions"], headers
    assert [n for n in accessible_names(page.driver, "button") if n.startswith("Sort by")] == [
        "Sort by name", "Sort by created", "Sort by last used", "Sort by expires",
        "Sort by status"]


def assert_calls_as_documented(gateway: ThreadedGateway, sent: list[dict]) -> None:
    """Each fetch is an operation the OpenAPI document describes: the method on the path, only
    the query parameters it lists, a JSON body valid against its request schema (or none where
    none is required)."""
    import jsonschema
    status, document = gateway.call(gateway.admin_url, "GET", "/admin/v1/openapi.json",
                                    token=None)
    assert status == 200
    components = {"components": document["components"]}
    for call in sent:
        path, _, query = call["url"].partition("?")
        item = next((item for template, item in document["paths"].items()
                     if re.fullmatch(re.sub(r"\\\{[^}]+\\\}", "[^/]+", re.escape(template)),
                                     path)), None)
        assert item is not None, call
        operation = item.get(call["method"].lower())
        assert operation is not None, call
        listed = {p["name"] for p in item.get("parameters", []) + operation.get("parameters", [])
                  if p["in"] == "query"}
        assert {pair.split("=")[0] for pair in query.split("&") if pair} <= listed, call
        if call["body"] is None:
            assert not operation.get("requestBody", {}).get("required"), call
            continue
        assert call["headers"].get("Content-Type") == "application/json", call
        schema = operation["requestBody"]["content"]["application/json"]["schema"]
        jsonschema.Draft202012Validator({**schema, **components}).validate(json.loads(call["body"]))


def test_every_call_the_page_makes_is_one_the_openapi_document_describes(page, gateway):
    """SPEC: the console uses only the admin API as the OpenAPI document describes it: not only
    its paths (checked elsewhere) but each call's method, query and body, through every step
    the page offers, as the operator and as a workspace admin."""
    new_workspace(gateway, "contract", "Contract")
    admin_token, _ = gateway.key("contract", name="contract-admin",
                                 scopes=["keys:admin", "people:read", "companies:read"])
    page.tokens_seen.append(admin_token)
    with spying(page):
        for token, operator in ((ADMIN_TOKEN, True), (admin_token, False)):
            tag = "op" if operator else "ws"
            page.sign_in(token)
            if operator:
                page.link("contract").click()
            wait(page.driver, lambda d: "contract-admin" in page.rows())
            page.create_key(f"{tag}-role", description="by role", role="reader", expires="30d")
            page.take_token()
            page.create_key(f"{tag}-scopes", scopes="people:read", expires="2030-01-01")
            page.take_token()
            page.in_dialog("Rotate", f"{tag}-role", "Grace", "1h", "Rotate")
            page.take_token()
            page.press("Edit", f"{tag}-scopes")
            dialog = page.dialog()
            Select(page.field("Role", dialog)).select_by_visible_text("reader")
            page.field("Scopes", dialog).clear()
            expires = page.field("Expires", dialog)
            expires.clear()
            expires.send_keys("7d")
            page.field("Monthly cap", dialog).send_keys("100")
            page.field("Rate limit", dialog).send_keys("1/s")
            page.button("Save", dialog).click()
            page.no_dialog()
            page.press("Disable", f"{tag}-scopes")
            wait(page.driver, lambda d: "disabled" in page.row(f"{tag}-scopes").text)
            page.press("Enable", f"{tag}-scopes")
            wait(page.driver, lambda d: "disabled" not in page.row(f"{tag}-scopes").text)
            page.press("Revoke", f"{tag}-scopes")
            page.button("Revoke", page.dialog()).click()
            page.no_dialog()
            page.press("Delete", f"{tag}-scopes")
            page.button("Delete", page.dialog()).click()
            page.no_dialog()
            wait(page.driver, lambda d: f"{tag}-scopes" not in page.rows())
            if operator:
                page.link("All workspaces").click()
                page.link("contract")
            sent = page.driver.execute_script("return window.__sent.splice(0)")
            assert {(s["method"], s["kind"]) for s in sent} == {
                ("GET", "fetch"), ("POST", "fetch"), ("PATCH", "fetch"), ("DELETE", "fetch")}
            assert_calls_as_documented(gateway, sent)
            page.button("Sign out").click()


def signing_in_says_to_wait(browser, gw, token: str) -> None:
    """Signing in with ``token`` on a fresh console page shows the 429's reason and how many
    seconds to wait (from Retry-After), with no console error but the 429 itself."""
    browser.get(gw.admin_url + "/console/")
    wait(browser, lambda d: d.execute_script("return document.documentElement.dataset.ready"))
    browser.get_log("browser")
    page = Console(browser, gw)
    page.sign_in(token)
    problem = page.alert_text()
    assert problem.startswith("Too many failed attempts"), problem
    found = re.search(r"Try again in (\d+) seconds?\.", problem)
    assert found and 1 <= int(found.group(1)) <= 60, problem
    page.allowed_errors.append("429")
    page.assert_no_console_errors()

def test_too_many_failures_says_how_long_to_wait(browser, own_redis):
    """After 10 wrong secrets for one key id the admin API answers 429 with the message "wait
    before trying again" and, in Retry-After, how long: the page showed the message only, so
    the person could only guess when to try again."""
    from gateway.tokens import checksum
    gw = start_gateway(own_redis.url)  # its own store: the failures it counts stay there
    try:
        new_workspace(gw, "throttled", "Throttled")
        token, _ = gw.key("throttled", name="real", scopes=["keys:admin"])
        heads = [token[:20] + f"{i:032d}" for i in range(21)]  # the key's id, wrong secrets
        forged = [head + checksum(head) for head in heads]
        statuses = [gw.admin("GET", "/workspaces", token=wrong)[0] for wrong in forged[:20]]
        assert statuses[0] == 401 and statuses[-1] == 429, statuses  # the per-key limit: 10
        signing_in_says_to_wait(browser, gw, forged[20])
    finally:
        gw.stop()


def test_an_operator_over_the_failure_limit_is_told_how_long_to_wait(browser, own_redis):
    """Past 20 wrong operator tokens from one address the admin API refuses that address's
    operator-token calls, the right token's too, with 429 and Retry-After: signing in then
    says so and how long to wait, not that the token is wrong."""
    gw = start_gateway(own_redis.url)  # its own store: the failures it counts stay there
    try:
        statuses = [gw.admin("GET", "/workspaces", token=f"wrong-operator-token-{i}")[0]
                    for i in range(20)]
        assert statuses == [401] * 20, statuses
        signing_in_says_to_wait(browser, gw, ADMIN_TOKEN)
    finally:
        gw.stop()


def test_a_workspace_admin_whose_workspace_cannot_be_opened_is_back_at_sign_in(page, gateway):
    """Signing in as a workspace admin is the listing and then the workspace (its keys, its
    usage). When the second step failed (a store blip, a proxy timeout in front of the admin
    listener) the page said "Signed in as key ..." above an alert and nothing else: no list,
    no view, no way to try again but to sign out first. It is now a failed sign-in: the form,
    with the reason, and Sign in tries again."""
    new_workspace(gateway, "blip", "Blip")
    token, _ = gateway.key("blip", name="blip-admin", scopes=["keys:admin", "people:read"])
    page.tokens_seen.append(token)
    page.allowed_errors += ["ERR_BLOCKED_BY_CLIENT", "Failed to fetch"]
    driver = page.driver
    driver.execute_cdp_cmd("Network.enable", {})
    driver.execute_cdp_cmd("Network.setBlockedURLs", {"urls": ["*/workspaces/blip/keys*"]})
    try:
        page.sign_in(token)
        assert "could not be reached" in page.alert_text()
        wait(driver, lambda d: page.field("Token").is_displayed())
        assert not driver.find_element(By.ID, "sign-out").is_displayed()
        assert driver.find_element(By.ID, "who").text == ""
    finally:
        driver.execute_cdp_cmd("Network.setBlockedURLs", {"urls": []})
        driver.execute_cdp_cmd("Network.disable", {})
    page.sign_in(token)
    wait(driver, lambda d: "blip-admin" in page.rows())
    assert not driver.find_element(By.ID, "alert").is_displayed()
    page.button("Sign out").click()


def test_leaving_the_page_forgets_a_token_typed_but_not_sent(page, gateway):
    """A token pasted into the Token field and left there (the person went elsewhere before
    pressing Sign in) stayed in the field of the page the browser keeps for Back (its
    back/forward cache, which a future browser may use despite no-store): whoever pressed Back
    found it ready to sign in with, or to read from the field. Leaving empties the field.
    (The page is left as the browser leaves it: a 'pagehide' for a page it keeps.)"""
    page.field("Token").send_keys(ADMIN_TOKEN)
    page.driver.execute_script(
        "window.dispatchEvent(new PageTransitionEvent('pagehide', {persisted: true}))")
    assert page.field("Token").get_attribute("value") == ""


def test_the_workspace_list_takes_keyboard_focus_when_shown(page, gateway):
    """Signing in as the operator hides the sign-in form (and its focused button); "All
    workspaces" hides the link pressed. Focus fell to the page's body both times: a screen
    reader said nothing of the list now shown, and Tab started again from the top bar. Focus
    now goes to the list's heading, from which Tab reaches the first workspace's link."""
    new_workspace(gateway, "focal", "Focal")
    keyboard = lambda *keys: page.driver.switch_to.active_element.send_keys(*keys)  # noqa: E731
    page.field("Token").send_keys(ADMIN_TOKEN, Keys.ENTER)
    page.link("focal")
    wait(page.driver, lambda d: d.switch_to.active_element.get_attribute("id") ==
         "workspaces-title")
    keyboard(Keys.TAB)
    first = page.driver.find_element(By.CSS_SELECTOR, "#workspaces tbody a")
    assert page.driver.switch_to.active_element == first
    page.link("focal").send_keys(Keys.ENTER)
    wait(page.driver, lambda d: d.switch_to.active_element.get_attribute("id") == "ws-title")
    page.link("All workspaces").send_keys(Keys.ENTER)
    wait(page.driver, lambda d: d.switch_to.active_element.get_attribute("id") ==
         "workspaces-title")


def test_a_token_made_as_the_person_signs_out_is_still_shown(page, gateway):
    """Create (or Rotate) pressed, then Sign out before the answer came: the key was made (or
    the old one revoked) and the answer, the only copy of its token, was dropped with the
    session: a live key whose token nobody saw, or a rotated service with no way back in. The
    token is shown as any new token is, on the sign-in screen, until Done."""
    new_workspace(gateway, "halfway", "Halfway")
    _, rotated_key = gateway.key("halfway", name="to-rotate", scopes=["people:read"])
    with slowed(page) as slow:
        page.sign_in(ADMIN_TOKEN)
        page.link("halfway").click()
        wait(page.driver, lambda d: "to-rotate" in page.rows())
        slow("/workspaces/halfway/keys")
        page.create_key("late", scopes="people:read")
        page.button("Sign out").click()
        wait(page.driver, lambda d: page.field("Token").is_displayed())
        created = page.take_token()
        assert gateway.proxy("/people", created)[0] == 200
        assert page.driver.find_element(By.ID, "token") == page.driver.switch_to.active_element

        slow(None)
        page.sign_in(ADMIN_TOKEN)  # typed into the field Done left focused
        page.link("halfway").click()
        wait(page.driver, lambda d: "late" in page.rows())
        slow("/workspaces/halfway/keys")
        page.in_dialog("Rotate", "to-rotate", "Grace", "0", "Rotate")
        # Cancel closes the dialog (Escape does not while its call is on its way) ...
        page.button("Cancel", page.dialog()).click()
        page.button("Sign out").click()  # ... and the person leaves before the answer
        wait(page.driver, lambda d: page.field("Token").is_displayed())
        rotated = page.take_token()
        assert gateway.proxy("/people", rotated)[0] == 200
        [old] = [k for k in keys_named(gateway, "halfway", "to-rotate")
                 if k["id"] == rotated_key["id"]]
        assert old["status"] == "revoked"  # no grace: the new token is the only way in now
        assert not page.driver.find_element(By.ID, "status").text


def test_a_narrower_window_scrolls_the_key_table_not_the_page(page, gateway):
    """The key table needs about 1,250 px; in a narrower window (a laptop at 125 % zoom, half a
    screen) the whole page scrolled sideways, the top bar, the usage and the toolbar with it,
    and a row's buttons were off to the right of everything. Only the table scrolls now, in
    its own box; its buttons are reached by Tab or by scrolling it, and still work."""
    new_workspace(gateway, "slim", "Slim")
    gateway.key("slim", name="wide-row", description="a description of a few words",
                role="reader", expires_in=86400)
    page.sign_in(ADMIN_TOKEN)
    page.link("slim").click()
    wait(page.driver, lambda d: "wide-row" in page.rows())
    page.driver.set_window_size(1024, 900)
    try:
        widths = page.driver.execute_script(
            "return [document.documentElement.scrollWidth, document.documentElement.clientWidth,"
            " document.getElementById('keys').scrollWidth]")
        assert widths[2] > widths[1] and widths[0] == widths[1], widths  # the table is wider
        page.press("Revoke", "wide-row")
        page.button("Revoke", page.dialog()).click()
        page.no_dialog()
        wait(page.driver, lambda d: "revoked" in page.row("wide-row").text)
    finally:
        page.driver.set_window_size(1360, 900)


# --- the console behind a reverse proxy that mounts it under a path prefix --------------------

class PrefixProxy:
    """A reverse proxy on the gateway's loop, as an operator puts one in front of the admin
    listener (nginx ``location /kg/ { proxy_pass http://127.0.0.1:8081/; }``): ``/kg/...`` is
    forwarded to the admin listener with the prefix taken off. The same host serves another
    application at ``/admin/...`` (anything else on that host), which records every
    ``Authorization`` header it is sent."""

    PREFIX = "/kg"

    def __init__(self, gw: ThreadedGateway) -> None:
        self.gw = gw
        self.elsewhere: list[tuple[str, str]] = []  # (path, Authorization) the other app got
        self.url = ""

    async def _start(self) -> None:
        self.session = ClientSession(auto_decompress=False)

        async def forward(request: web.Request) -> web.StreamResponse:
            target = self.gw.admin_url + "/" + request.match_info["tail"]
            if request.query_string:
                target += "?" + request.query_string
            headers = {k: v for k, v in request.headers.items()
                       if k.lower() not in ("host", "content-length", "transfer-encoding",
                                            "connection")}
            async with self.session.request(request.method, target, headers=headers,
                                            data=await request.read(),
                                            allow_redirects=False) as upstream:
                body = await upstream.read()
                out = web.Response(status=upstream.status, body=body)
                for name, value in upstream.headers.items():
                    if name.lower() not in ("content-length", "transfer-encoding", "connection",
                                            "content-encoding", "date", "server"):
                        out.headers.add(name, value)
            await self.hand_on(request)
            return out

        async def other_app(request: web.Request) -> web.Response:
            self.elsewhere.append((request.path, request.headers.get("Authorization", "")))
            return web.json_response({"other": "application"}, status=404)

        app = web.Application()
        app.router.add_route("*", self.PREFIX + "/{tail:.*}", forward)
        app.router.add_route("*", "/admin/{tail:.*}", other_app)
        self.runner = web.AppRunner(app, access_log=None)
        await self.runner.setup()
        port = free_port()
        await web.TCPSite(self.runner, "127.0.0.1", port).start()
        self.url = f"http://127.0.0.1:{port}"

    async def hand_on(self, request: web.Request) -> None:
        """Called with each forwarded answer read, before it is handed on."""

    async def _stop(self) -> None:
        await self.runner.cleanup()
        await self.session.close()

    def __enter__(self) -> "PrefixProxy":
        self.gw.run(self._start())
        return self

    def __exit__(self, *exc) -> None:
        self.gw.run(self._stop())


def test_the_console_under_a_path_prefix_calls_its_own_admin_api(browser, gateway):
    """Mounted under /kg/ by a reverse proxy, the page loads (its assets are relative:
    app.js, app.css) but its API calls go to the absolute ``/admin/v1/...`` of the host: the
    operator token is sent, in Authorization, to whatever else answers /admin/ there, and the
    console never works. The calls must stay under the page's own mount point
    (``../admin/v1/``), as the assets already do."""
    new_workspace(gateway, "prefixed", "Prefixed")
    with PrefixProxy(gateway) as proxy:
        open_console(browser, proxy.url + PrefixProxy.PREFIX + "/console/")
        person = Console(browser, gateway)
        person.sign_in(ADMIN_TOKEN)
        wait(browser, lambda d: proxy.elsewhere or d.find_elements(By.LINK_TEXT, "prefixed")
             or any(a.text for a in d.find_elements(By.CSS_SELECTOR, '[role="alert"]')))
        leaked = [path for path, auth in proxy.elsewhere if ADMIN_TOKEN in auth]
        assert leaked == [], f"the operator token went to another application at {leaked}"
        person.link("prefixed")  # signed in: the workspace list, through the prefix


# --- the /console redirect behind a path prefix ---------------------------------------------

def test_the_console_redirect_keeps_a_path_prefix(gateway):
    """``/console`` answers 308 to the absolute ``/console/``: behind a proxy that mounts the
    admin listener under /kg/, ``/kg/console`` sends the browser out of the mount, to the
    host's own /console/ (not keygate's). A relative ``Location: console/`` keeps it."""
    import http.client
    with PrefixProxy(gateway) as proxy:
        parsed = urllib.parse.urlsplit(proxy.url)
        connection = http.client.HTTPConnection(parsed.hostname, parsed.port, timeout=10)
        connection.request("GET", PrefixProxy.PREFIX + "/console")
        response = connection.getresponse()
        response.read()
        connection.close()
        assert response.status == 308
        followed = urllib.parse.urljoin(proxy.url + PrefixProxy.PREFIX + "/console",
                                        response.getheader("Location"))
        assert followed == proxy.url + PrefixProxy.PREFIX + "/console/", followed


# --- Rotate: a repeated Enter on the row's button rotates at once, revoking the old key -------

def test_enter_pressed_twice_on_rotate_does_not_revoke_the_old_key_unasked(page, gateway):
    """Revoke's dialog puts focus on Cancel, so a second Enter (a double press, a key held
    down) cannot confirm it. Rotate's dialog puts focus in the Grace field, prefilled with 0,
    where Enter submits the form: pressing Enter twice on a row's Rotate rotates the key with
    no grace, revoking the old key (still deployed) there and then. The second Enter must not
    confirm what the person has not seen yet."""
    new_workspace(gateway, "doubleenter", "Double Enter")
    old_token, old_key = gateway.key("doubleenter", name="billing-prod", scopes=["people:read"])
    page.sign_in(ADMIN_TOKEN)
    page.link("doubleenter").click()
    wait(page.driver, lambda d: "billing-prod" in page.rows())
    rotate = next(b for b in page.row("billing-prod").find_elements(By.TAG_NAME, "button")
                  if b.text == "Rotate")
    page.driver.execute_script("arguments[0].focus()", rotate)
    ActionChains(page.driver).send_keys(Keys.ENTER).send_keys(Keys.ENTER).perform()
    page.dialog()
    time.sleep(1.5)  # the answer of a rotation, had one been sent
    status, body = gateway.proxy("/people", old_token)
    rotated = page.driver.find_elements(By.CSS_SELECTOR, '[role="dialog"] [data-token]')
    if rotated:
        page.take_token()
    else:
        page.button("Cancel", page.dialog()).click()
    assert status == 200, f"the old key was revoked by a second Enter: {status} {body}"
    assert not rotated, "a second Enter rotated the key"


# --- Edit: taking keys:admin from the key one is signed in with -------------------------------

def test_editing_away_ones_own_keys_admin_asks_first(page, gateway):
    """Disable, Revoke and Rotate on one's own row say "the key you are signed in with" first
    (README: "Disabling, revoking or rotating that key from its own row asks first"), because
    a workspace key cannot give itself access back. Edit on one's own row re-scopes the key
    without a word: saving "people:read" in Scopes drops keys:admin from it, the page signs
    out at once, and no workspace key can grant keys:admin back (only the operator can)."""
    signed_in_admin(page, gateway, "selfedit", "Self Edit", "self-editor")
    page.allowed_errors.append("403")  # the calls refused once the key has lost keys:admin
    page.press("Edit", "self-editor")
    dialog = page.dialog()
    warned_up_front = "the key you are signed in with" in dialog.text
    scopes = page.field("Scopes", dialog)
    scopes.clear()
    scopes.send_keys("people:read")
    page.button("Save", dialog).click()
    time.sleep(1.5)  # the PATCH's answer and the refresh, had they been sent
    after = keys_named(gateway, "selfedit", "self-editor")[0]["scopes"]
    asked = [d.text for d in page.driver.find_elements(By.CSS_SELECTOR, '[role="dialog"]')
             if d.is_displayed() and "the key you are signed in with" in d.text]
    assert warned_up_front or asked or "keys:admin" in after, \
        f"the signed-in key lost keys:admin with no warning: scopes now {after}"


def test_editing_ones_own_key_into_a_lockout_saves_only_when_asked_again(page, gateway):
    """The warning on one's own row (keys:admin taken away, an expiry within the hour) sends
    nothing; focus goes to Cancel, so a second Enter does not save; Save pressed again on the
    same change saves it, and the page signs out as it said."""
    signed_in_admin(page, gateway, "selfedit2", "Self Edit Two", "self-editor")
    page.allowed_errors.append("403")
    before = keys_named(gateway, "selfedit2", "self-editor")[0]
    page.press("Edit", "self-editor")
    dialog = page.dialog()
    expires = page.field("Expires", dialog)
    expires.clear()
    expires.send_keys("30m" + Keys.ENTER)
    wait(page.driver, lambda d: "the key you are signed in with" in dialog.text)
    assert "expiring at" in dialog.text, dialog.text
    assert page.driver.switch_to.active_element.text == "Cancel"
    page.driver.switch_to.active_element.send_keys(Keys.ENTER)  # the second Enter: Cancel
    page.no_dialog()
    assert keys_named(gateway, "selfedit2", "self-editor")[0]["expires_at"] == \
        before["expires_at"]

    page.press("Edit", "self-editor")
    dialog = page.dialog()
    scopes = page.field("Scopes", dialog)
    scopes.clear()
    scopes.send_keys("people:read")
    page.button("Save", dialog).click()
    wait(page.driver, lambda d: "cannot give itself keys:admin back" in dialog.text)
    assert "keys:admin" in keys_named(gateway, "selfedit2", "self-editor")[0]["scopes"]
    page.button("Save", dialog).click()  # asked, and saved
    assert_signed_out(page, "self-editor", "Self Edit Two")
    assert keys_named(gateway, "selfedit2", "self-editor")[0]["scopes"] == ["people:read"]


# --- an operator token that has an API key's exact shape -------------------------------------

def test_an_operator_token_shaped_exactly_like_a_key_signs_in_as_the_operator(browser,
                                                                               own_redis):
    """The admin API checks a key-shaped token against the operator token first when the
    operator token is itself key-shaped (middleware.identify), so such a token is the
    operator. The page decides by shape alone (looksLikeKey): it signs the operator in as
    "key ops_admin_..." and opens only the first workspace, with no way to the others."""
    token = "ops_admin_" + "Q7x" * 16 + "ab"  # 10 + 50: [a-z0-9]{1,10}_[A-Za-z0-9]+_[50]
    gw = start_gateway(own_redis.url, admin_token=token)
    try:
        for ws in ("first", "second"):
            status, body = gw.admin("POST", "/workspaces", {"id": ws, "name": ws.title()},
                                    token=token)
            assert status == 201, body
        status, body = gw.admin("GET", "/workspaces", token=token)
        assert status == 200 and len(body["items"]) == 2  # the API: the operator
        browser.get(gw.admin_url + "/console/")
        wait(browser, lambda d: d.execute_script("return document.documentElement.dataset.ready"))
        browser.get_log("browser")
        person = Console(browser, gw)
        person.tokens_seen.append(token)
        person.sign_in(token)
        wait(browser, lambda d: d.find_element(By.ID, "who").text)
        assert browser.find_element(By.ID, "who").text == "Signed in as operator"
        person.link("second")
        person.button("Sign out").click()
    finally:
        gw.stop()


def test_a_key_shaped_operator_token_with_one_workspace_is_still_the_operator(browser,
                                                                               own_redis):
    """With one workspace the listing cannot tell the operator from that workspace's key: the
    page asks the API for the key the token names, which the operator's token is not."""
    token = "ops_admin_" + "Z9y" * 16 + "cd"
    gw = start_gateway(own_redis.url, admin_token=token)
    try:
        status, body = gw.admin("POST", "/workspaces", {"id": "only", "name": "Only"},
                                token=token)
        assert status == 201, body
        gw.admin("POST", "/workspaces/only/keys", {"name": "a-key", "scopes": ["people:read"]},
                 token=token)
        browser.get(gw.admin_url + "/console/")
        wait(browser, lambda d: d.execute_script("return document.documentElement.dataset.ready"))
        person = Console(browser, gw)
        person.tokens_seen.append(token)
        person.sign_in(token)
        wait(browser, lambda d: d.find_element(By.ID, "who").text)
        assert browser.find_element(By.ID, "who").text == "Signed in as operator"
        person.link("only").click()
        wait(browser, lambda d: "a-key" in person.rows())
        assert browser.find_element(By.ID, "back-nav").is_displayed()  # the operator's way back
        person.button("Sign out").click()
    finally:
        gw.stop()


# --- Create: Enter in Name makes a key bound to nothing -----------------------------------------

def test_create_without_role_or_scopes_is_refused_before_a_key_is_made(page, gateway):
    """SPEC: a key is bound to a role OR to explicit scopes, and the CLI's ``keys create``
    requires ``--role`` or ``--scope``; the form says "A key is bound to a role or to scopes".
    Typing a name and pressing Enter (the Role menu left at "(none: use scopes)", Scopes
    empty) sends ``"scopes": []``: a live key bound to no scope at all is made, takes one of
    the plan's key slots, and its token is shown. The form must ask for a role or scopes."""
    new_workspace(gateway, "unbound", "Unbound")
    page.sign_in(ADMIN_TOKEN)
    page.link("unbound").click()
    wait(page.driver, lambda d: d.find_element(By.ID, "ws-title").text == "Unbound (unbound)")
    page.allowed_errors.append("400")
    page.button("Create key").click()
    page.field("Name").send_keys("forgot-the-scopes" + Keys.ENTER)
    outcome = wait(page.driver, lambda d: next(
        (x for x in d.find_elements(By.CSS_SELECTOR, '[role="dialog"] [data-token], '
                                                     '#create-form .form-error')
         if x.is_displayed() and x.text), False))
    made = outcome.get_attribute("data-token") is not None
    if made:
        page.take_token()
    status, listing = gateway.admin("GET", "/workspaces/unbound/keys")
    bound_to_nothing = [k["id"] for k in listing["items"] if k["role"] is None and not k["scopes"]]
    assert bound_to_nothing == [], f"a key bound to no role and no scope was made: {listing}"
    assert "a role or to scopes" in outcome.text, outcome.text  # the form says what it needs
    page.button("Cancel").click()


# --- the Description field ------------------------------------------------------------------

def test_a_description_typed_on_two_lines_does_not_fail_the_create(page, gateway):
    """Description is a <textarea> (two rows): Enter in it makes a newline, which the API
    refuses (text fields with control characters are a 400). The form offers multi-line text
    that can never be sent; it must be a one-line field, or join the lines before sending."""
    new_workspace(gateway, "multiline", "Multiline")
    page.sign_in(ADMIN_TOKEN)
    page.link("multiline").click()
    wait(page.driver, lambda d: d.find_element(By.ID, "ws-title").text == "Multiline (multiline)")
    page.allowed_errors.append("400")
    page.create_key("two-lines", description="Sync job for HR.\nOwner: ops team",
                    scopes="people:read")
    shown = wait(page.driver, lambda d: next(
        (x.text for x in d.find_elements(By.CSS_SELECTOR, '[role="dialog"] [data-token], '
                                                          '#create-form .form-error')
         if x.is_displayed() and x.text), False))
    if "control characters" in shown:
        page.button("Cancel").click()
        pytest.fail(f"the create form refused its own Description field's newline: {shown}")
    page.take_token()


def test_a_description_pasted_with_a_tab_or_line_break_is_sent_on_one_line(page, gateway):
    """The Description field is one line (the browser drops a line break pasted into it); a
    tab pasted or put there by a script goes as a space, never as the control character the
    API refuses."""
    new_workspace(gateway, "oneline", "One Line")
    page.sign_in(ADMIN_TOKEN)
    page.link("oneline").click()
    wait(page.driver, lambda d: d.find_element(By.ID, "ws-title").text == "One Line (oneline)")
    page.button("Create key").click()
    description = page.field("Description")
    assert description.tag_name == "input"
    page.field("Name").send_keys("pasted")
    page.driver.execute_script("arguments[0].value = 'Sync\\tjob for\\t\\tHR'", description)
    page.field("Scopes").send_keys("people:read")
    page.button("Create").click()
    page.take_token()
    assert keys_named(gateway, "oneline", "pasted")[0]["description"] == "Sync job for HR"


# --- Sign in: a pasted token holding a Latin-1 character -------------------------------------

def test_a_token_pasted_with_a_soft_hyphen_or_guillemets_is_named_as_the_problem(page, gateway):
    """The page names a character no token holds (typographic quotes, an ellipsis, a
    zero-width space) and sends nothing; but it checks only for characters beyond Latin-1
    (fetch's limit), not for what a token can hold. A soft hyphen (U+00AD, invisible, left by
    a copy from wrapped text) or guillemets (U+00AB/U+00BB) are sent as they are: the answer
    is "The operator token is not valid." (counted as a wrong operator token), with no word
    of the character. The CLI refuses any non-ASCII character in a token; so must the page."""
    page.allowed_errors.append("401")
    cases = ((ADMIN_TOKEN[:10] + "\u00ad" + ADMIN_TOKEN[10:], "U+00AD", 11),
             ("\u00ab" + ADMIN_TOKEN + "\u00bb", "U+00AB", 1))
    for token, code, position in cases:
        page.sign_in(token)
        problem = page.alert_text()
        assert f"{code} (character {position})" in problem, problem
    page.sign_in(ADMIN_TOKEN)
    wait(page.driver, lambda d: d.find_element(By.ID, "workspaces-view").is_displayed())
    page.button("Sign out").click()


def test_escape_does_not_close_a_dialog_whose_call_is_on_its_way(patient_page):
    """Escape closed a confirmation dialog whose call was still on its way: the call went on,
    and its answer (an error above all) was written into a dialog no longer on the page, so
    nobody saw it. Until the answer, Escape leaves the dialog open; the answer then shows."""
    page, gateway, store_url = patient_page
    new_workspace(gateway, "escbusy", "Escape Busy")
    gateway.key("escbusy", name="pending-revoke", scopes=["people:read"])
    page.sign_in(ADMIN_TOKEN)
    page.link("escbusy").click()
    page.press("Revoke", "pending-revoke")
    dialog = page.dialog()
    store = redis_sync.Redis.from_url(store_url)
    try:
        store.execute_command("CLIENT", "PAUSE", "30000", "WRITE")
        page.button("Revoke", dialog).click()
        wait(page.driver, lambda d: dialog.get_attribute("aria-busy") == "true")
        page.driver.switch_to.active_element.send_keys(Keys.ESCAPE)
        time.sleep(0.3)
        page.driver.switch_to.active_element.send_keys(Keys.ESCAPE)  # a second one, too
        time.sleep(0.5)
        still_open = [d for d in page.driver.find_elements(By.CSS_SELECTOR, '[role="dialog"]')
                      if d.is_displayed()]
    finally:
        store.execute_command("CLIENT", "UNPAUSE")
        store.close()
    assert still_open, "Escape closed the dialog while its call was on its way"
    page.no_dialog()  # the answer came: the dialog closes as after any revoke
    wait(page.driver, lambda d: "revoked" in page.row("pending-revoke").text)


class HoldingProxy(PrefixProxy):
    """The prefix proxy, which can hold back the answer of one key listing: it forwards the
    request at once (the answer is what the store held then) and hands the answer on only when
    released, as a slow network does to one response of several."""

    def __init__(self, gw: ThreadedGateway) -> None:
        super().__init__(gw)
        self.armed = False
        self.holding = threading.Event()  # an answer is being held

    async def _start(self) -> None:
        self.release = asyncio.Event()
        await super()._start()

    async def hand_on(self, request: web.Request) -> None:
        if self.armed and request.method == "GET" and request.path.endswith("/keys"):
            self.armed = False
            self.holding.set()
            await self.release.wait()

    def let_go(self) -> None:
        self.gw.loop.call_soon_threadsafe(self.release.set)


def test_a_late_answer_of_an_earlier_refresh_does_not_redraw_the_list(browser, gateway):
    """Two steps in a row (Revoke one key, then another) each read the list again. When the
    first reading answers last, it was drawn over the second: the key revoked second was shown
    active again, Revoke and Rotate enabled on it. Only the latest reading is drawn."""
    new_workspace(gateway, "latelist", "Late List")
    gateway.key("latelist", name="stale-a", scopes=["people:read"])
    gateway.key("latelist", name="stale-b", scopes=["people:read"])
    with HoldingProxy(gateway) as proxy:
        open_console(browser, proxy.url + PrefixProxy.PREFIX + "/console/")
        page = Console(browser, gateway)
        page.sign_in(ADMIN_TOKEN)
        page.link("latelist").click()
        wait(browser, lambda d: "stale-b" in page.rows())
        try:
            proxy.armed = True
            page.press("Revoke", "stale-a")
            page.button("Revoke", page.dialog()).click()
            assert proxy.holding.wait(WAIT), "the first reading was not sent"
            page.press("Revoke", "stale-b")
            page.button("Revoke", page.dialog()).click()
            page.no_dialog()
            wait(browser, lambda d: "revoked" in page.row("stale-b").text)
        finally:
            proxy.let_go()
        time.sleep(1.0)  # the first reading's answer, now handed on
        assert "revoked" in page.row("stale-b").text, page.row("stale-b").text
        assert "revoked" in page.row("stale-a").text
        page.button("Sign out").click()
