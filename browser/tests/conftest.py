"""Fixtures of the browser tests: localstripe, a real `tally serve` wired to it, and a headless
Chromium driven over WebDriver (Debian's chromedriver, never one Selenium Manager downloads).

Run them with `scripts/browser-tests`, which installs everything and sets:

- TALLY_BIN          the tally binary
- CHROMIUM           the browser binary (`/usr/bin/chromium`)
- CHROMEDRIVER       Debian's chromedriver (`/usr/bin/chromedriver`)
- TALLY_SCREENSHOTS  where `shot(driver, NAME)` writes NAME.png (default target/screenshots)

Every process a fixture starts, it stops (SIGTERM, then SIGKILL after 10 s).
"""

import json
import os
import re
import shutil
import socket
import subprocess
import tempfile
import threading
import time
import urllib.error
import urllib.request
import uuid
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
ADMIN_KEY = "tally_admin_browser_test_key_0123456789"
STRIPE_SECRET_KEY = "sk_test_tally"
STRIPE_PUBLISHABLE_KEY = "pk_test_tally"
STRIPE_WEBHOOK_SECRET = "whsec_test"
PORTAL_IDLE_SECS = 5
LOCALSTRIPE_START_SECS = 180  # its first run may install it
TALLY_START_SECS = 60
STOP_SECS = 10

# Selenium Manager must never try the network (there is none but the package registries).
os.environ.setdefault("SE_OFFLINE", "true")


def free_port():
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def stop(process):
    """SIGTERM, SIGKILL after STOP_SECS; returns the exit status."""
    if process.poll() is None:
        process.terminate()
        try:
            process.wait(STOP_SECS)
        except subprocess.TimeoutExpired:
            process.kill()
    return process.wait()


def screenshots_dir():
    path = Path(os.environ.get("TALLY_SCREENSHOTS") or REPO / "target" / "screenshots")
    path.mkdir(parents=True, exist_ok=True)
    return path


def shot(driver, name):
    """Saves the browser's viewport as TALLY_SCREENSHOTS/NAME.png; returns the path."""
    path = screenshots_dir() / f"{name}.png"
    assert driver.save_screenshot(str(path)), f"screenshot {path} failed"
    return path


def tool(variable, name):
    path = os.environ.get(variable) or shutil.which(name)
    if not path:
        pytest.fail(f"{variable} is not set and no {name} is on PATH: run scripts/browser-tests")
    return path


# --- localstripe ---------------------------------------------------------------------------


@pytest.fixture(scope="session")
def localstripe():
    """scripts/localstripe on a free loopback port (a foreground process: the PID is the
    server's); yields its base URL, e.g. http://127.0.0.1:PORT (no trailing slash)."""
    port = free_port()
    log = tempfile.TemporaryFile()
    process = subprocess.Popen(
        [str(REPO / "scripts" / "localstripe"), str(port)],
        stdin=subprocess.DEVNULL,
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    try:
        deadline = time.monotonic() + LOCALSTRIPE_START_SECS
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                pass
            if process.poll() is not None:
                log.seek(0)
                pytest.fail(f"scripts/localstripe exited with {process.returncode}:\n"
                            + log.read().decode(errors="replace"))
            if time.monotonic() > deadline:
                pytest.fail(f"localstripe did not accept connections within {LOCALSTRIPE_START_SECS} s")
            time.sleep(0.1)
        yield f"http://127.0.0.1:{port}"
    finally:
        stop(process)
        log.close()


# --- tally serve -----------------------------------------------------------------------------


class Tally:
    """A running `tally serve`: `.http` its base URL, `.admin` the admin key, `.addr` its QUIC
    address, `.cert` its certificate (PEM, for the CLI's --cert), `.binary` the tally binary,
    `.log()` what it printed."""

    def __init__(self, binary, process, http, addr, data_dir, admin, lines):
        self.binary = binary
        self.process = process
        self.http = http
        self.addr = addr
        self.data_dir = Path(data_dir)
        self.cert = self.data_dir / "tls" / "cert.pem"
        self.admin = admin
        self._lines = lines

    def log(self):
        return "".join(self._lines)

    def api(self, method, path, body=None, idem=None, key=None):
        """One admin API call; returns (status, JSON body, or the text when it is not JSON).
        A state-changing call without `idem` gets a fresh Idempotency-Key."""
        headers = {"Authorization": f"Bearer {key or self.admin}", "Accept": "application/json"}
        data = None
        if body is not None:
            data = json.dumps(body).encode()
            headers["Content-Type"] = "application/json"
        if method.upper() not in ("GET", "HEAD"):
            headers["Idempotency-Key"] = idem or f"browser-{uuid.uuid4()}"
        request = urllib.request.Request(self.http + path, data=data, headers=headers,
                                         method=method.upper())
        return http_call(request)

    def ok(self, method, path, body=None, idem=None):
        """`api`, asserting a 2xx; returns the JSON body."""
        status, value = self.api(method, path, body, idem)
        assert 200 <= status < 300, f"{method} {path}: {status} {value}"
        return value

    def usage(self, wallet, product, quantities, cost_usd=None, model=None, mode=None,
              occurred_at=None, idem=None):
        """Reports one usage event (POST /v1/usage, asserting a 2xx); `occurred_at` defaults to
        now (UTC, whole seconds). Returns the answer (`request_id`, `charged`, ...)."""
        body = {"wallet": wallet, "product": product,
                "quantities": {k: str(v) for k, v in quantities.items()},
                "occurred_at": occurred_at or utc_now()}
        if cost_usd is not None:
            body["cost_usd"] = str(cost_usd)
        if model is not None:
            body["attributes"] = {"model": model}
        if mode is not None:
            body["mode"] = mode
        return self.ok("POST", "/v1/usage", body, idem)

    def history_usage(self, wallet, count, timeout=30):
        """Waits until the history store lists at least `count` usage rows of `wallet` (it trails
        the shards by about 1 s); returns them (newest first)."""
        rows = []
        deadline = time.monotonic() + timeout
        while True:
            rows = self.ok("GET", f"/v1/wallets/{wallet}/usage?limit=1000")["data"]
            if len(rows) >= count:
                return rows
            if time.monotonic() > deadline:
                raise AssertionError(f"within {timeout} s: {wallet} has {len(rows)} usage rows in "
                                     f"the history store, not {count}")
            time.sleep(0.2)


def utc_now():
    """Now in RFC 3339 UTC, whole seconds: `2026-11-29T12:00:00Z`."""
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


def http_call(request, timeout=30):
    """(status, JSON or text) of a urllib request, whatever the status."""
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            status, raw = response.status, response.read()
    except urllib.error.HTTPError as error:
        status, raw = error.code, error.read()
    text = raw.decode(errors="replace")
    try:
        return status, json.loads(text)
    except ValueError:
        return status, text


class NoRedirect(urllib.request.HTTPRedirectHandler):
    def redirect_request(self, *args, **kwargs):
        return None


def get_no_redirect(url, timeout=30):
    """(status, headers, text) of a plain GET that does not follow redirects."""
    opener = urllib.request.build_opener(NoRedirect)
    try:
        with opener.open(url, timeout=timeout) as response:
            return response.status, response.headers, response.read().decode(errors="replace")
    except urllib.error.HTTPError as error:
        return error.code, error.headers, error.read().decode(errors="replace")


SERVING = re.compile(r"QUIC on (\S+) .*HTTP on ([^;\s]+)")


@pytest.fixture(scope="session")
def tally(localstripe):
    """`$TALLY_BIN serve` with one shard on a temporary data directory, QUIC on a free port
    (`--listen 127.0.0.1:0`, learnt from its log line), HTTP on a free port chosen here (so the
    portal's public URL, derived from `http_listen`, is the real one), the admin key in
    TALLY_ADMIN_KEY, Stripe pointed at localstripe and a 5 s portal idle timeout. Ready when its
    log says what it serves and GET /readyz answers 200."""
    binary = tool("TALLY_BIN", "tally")
    http_port = free_port()
    data = tempfile.TemporaryDirectory(prefix="tally-browser-")
    env = dict(os.environ)
    env.update({
        "TALLY_ADMIN_KEY": ADMIN_KEY,
        "TALLY_STRIPE_SECRET_KEY": STRIPE_SECRET_KEY,
        "TALLY_STRIPE_API_BASE": f"{localstripe}/",
        "TALLY_STRIPE_WEBHOOK_SECRET": STRIPE_WEBHOOK_SECRET,
        "TALLY_STRIPE_PUBLISHABLE_KEY": STRIPE_PUBLISHABLE_KEY,
        "TALLY_PORTAL_STRIPE_JS": f"{localstripe}/js.stripe.com/v3/",
        "TALLY_PORTAL_IDLE_SECS": str(PORTAL_IDLE_SECS),
        "NO_COLOR": "1",
    })
    process = subprocess.Popen(
        [binary, "serve", "--shards", "1", "--data-dir", str(Path(data.name) / "data"),
         "--listen", "127.0.0.1:0", "--http-listen", f"127.0.0.1:{http_port}"],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        env=env,
    )
    lines = []
    found = {}
    seen = threading.Event()

    def read():  # keeps reading, so the server never blocks on a full pipe
        for raw in process.stderr:
            line = raw.decode(errors="replace")
            lines.append(line)
            match = SERVING.search(line)
            if match and not seen.is_set():
                found["addr"], found["http"] = match.group(1), match.group(2)
                seen.set()
        seen.set()

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    try:
        deadline = time.monotonic() + TALLY_START_SECS
        if not seen.wait(TALLY_START_SECS) or "addr" not in found:
            pytest.fail(f"tally serve did not start (exit status {process.poll()}):\n"
                        + "".join(lines))
        base = f"http://127.0.0.1:{http_port}"
        while True:
            try:
                status, _ = http_call(urllib.request.Request(base + "/readyz"), timeout=2)
            except (urllib.error.URLError, OSError):
                status = None  # not listening yet
            if status == 200:
                break
            if process.poll() is not None:
                pytest.fail(f"tally serve exited with {process.returncode}:\n" + "".join(lines))
            if time.monotonic() > deadline:
                pytest.fail(f"{base}/readyz did not answer 200 within {TALLY_START_SECS} s:\n"
                            + "".join(lines))
            time.sleep(0.2)
        yield Tally(binary, process, base, found["addr"], Path(data.name) / "data", ADMIN_KEY, lines)
        assert process.poll() is None, f"tally serve died during the tests:\n{''.join(lines)}"
    finally:
        stop(process)
        reader.join(5)
        data.cleanup()


# --- the browser -----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def browser():
    """Headless Chromium (Debian's) through Debian's chromedriver, 1280x900; quit at the end.
    Its console log is kept, and printed for a failed test (see pytest_runtest_makereport)."""
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    for argument in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage",
                     "--window-size=1280,900", "--disable-gpu", "--no-first-run",
                     "--disable-search-engine-choice-screen", "--lang=en-US"):
        options.add_argument(argument)
    options.binary_location = tool("CHROMIUM", "chromium")
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    service = Service(executable_path=tool("CHROMEDRIVER", "chromedriver"))
    driver = webdriver.Chrome(service=service, options=options)
    driver.set_page_load_timeout(30)
    driver.set_script_timeout(30)
    try:
        yield driver
    finally:
        driver.quit()


@pytest.fixture(name="shot")
def shot_fixture():
    """`shot(driver, NAME)`: the screenshot helper, as a fixture."""
    return shot


# --- journeys: a class marked `incremental` stops at its first failure --------------------
# (its later tests build on the earlier ones' state: they are reported as xfail, not as noise)

_failed_in = {}


def pytest_runtest_setup(item):
    if item.get_closest_marker("incremental") and item.cls is not None:
        failed = _failed_in.get(item.cls)
        if failed:
            pytest.xfail(f"an earlier step of this journey failed: {failed}")


# --- on failure: a screenshot, the browser's console and the server's log -------------------


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item, call):
    report = yield
    if report.failed and item.get_closest_marker("incremental") and item.cls is not None:
        _failed_in.setdefault(item.cls, item.name)
    if report.when == "call" and report.failed:
        driver = item.funcargs.get("browser")
        if driver is not None:
            name = re.sub(r"[^A-Za-z0-9_.-]+", "_", item.name)
            try:
                path = shot(driver, f"FAILED-{name}")
                report.sections.append(("screenshot", f"{path} (at {driver.current_url})"))
                console = "\n".join(f"{e.get('level')} {e.get('message')}"
                                    for e in driver.get_log("browser"))
                report.sections.append(("browser console", console or "(empty)"))
            except Exception as error:  # the browser itself may be what failed
                report.sections.append(("screenshot", f"not taken: {error}"))
        server = item.funcargs.get("tally")
        if server is not None:
            report.sections.append(("tally serve log (last 60 lines)",
                                    "".join(server.log().splitlines(True)[-60:])))
    return report
