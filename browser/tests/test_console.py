"""The seller's console (docs/console-contract.md) in a real headless Chromium.

The catalog is set up over the admin API: asset USD (scale 2, one USD is worth one dollar),
product `chat` with the dimension `tokens`, plan `std` (0.001 USD per token, published as a
version), wallets `good` (metadata tier=pro) and `loss` (tier=free) on it with 100 USD each;
`good` used 5 × 1000 tokens that cost 0.2 USD each (revenue 1 USD each: profitable), `loss`
3 × 1000 tokens that cost 2.5 USD each (unprofitable).

Then, through the page as a seller would use it: a wrong key and a gateway key are refused; the
admin key signs in and the wallets are listed; a grant of 5.00 to `loss` changes its balance
exactly; margins per wallet put `loss` first, with the API's exact margin and the per-day chart;
a draft of `std` at twice the price is saved and tested on the recorded usage, and the page's
exact difference equals the one computed here; a state-changing call without the CSRF token is
refused; the page works at 375 px; signing out ends the session. Screenshots of each page state
go to TALLY_SCREENSHOTS.
"""

import json
import time
import urllib.error
import urllib.request
from datetime import datetime, timedelta, timezone
from decimal import Decimal

import pytest
from selenium.common.exceptions import StaleElementReferenceException, TimeoutException
from selenium.webdriver.common.action_chains import ActionChains
from selenium.webdriver.common.by import By
from selenium.webdriver.common.keys import Keys
from selenium.webdriver.support.ui import Select, WebDriverWait

from conftest import get_no_redirect, http_call

WAIT = 30  # seconds an element may take to show what it should (a debug build)
PRICE = Decimal("0.001")  # USD per token in std version 1
TOKENS = 1000
EVENTS = {"good": (5, "0.2"), "loss": (3, "2.5")}  # wallet: (events, cost_usd of each)


# --- setup -------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def console_data(tally):
    """The catalog, the two wallets and their usage; waits until the history store has it all.
    Returns {"version": the published version of std, "usage": {wallet: [usage rows]}}."""
    tally.ok("POST", "/v1/assets", {"code": "USD", "scale": 2, "usd_value": "1"}, "asset-usd")
    tally.ok("POST", "/v1/products", {"code": "chat", "dimensions": ["tokens"]}, "product-chat")
    tally.ok("PUT", "/v1/plans/std/draft", {
        "asset": "USD",
        "rules": [{"product": "chat", "rounding": "up",
                   "components": [{"dimension": "tokens",
                                   "price": {"type": "per_unit", "unit_price": str(PRICE)}}]}],
    }, "console-std-draft-1")
    version = tally.ok("POST", "/v1/plans/std/publish", None, "console-std-publish-1")["version"]
    for wallet, tier in (("good", "pro"), ("loss", "free")):
        tally.ok("POST", "/v1/wallets", {"id": wallet, "metadata": {"tier": tier}},
                 f"console-{wallet}-create")
        tally.ok("PUT", f"/v1/wallets/{wallet}/plan", {"plan": "std", "version": version},
                 f"console-{wallet}-plan")
        tally.ok("POST", f"/v1/wallets/{wallet}/grants", {"asset": "USD", "amount": "100.00"},
                 f"console-{wallet}-grant")
    for wallet, (count, cost) in EVENTS.items():
        for i in range(count):
            answer = tally.usage(wallet, "chat", {"tokens": TOKENS}, cost_usd=cost,
                                 model="gpt-test", mode="strict",
                                 idem=f"console-{wallet}-usage-{i}")
            assert Decimal(answer["charged"]) == TOKENS * PRICE, answer
    usage = {wallet: tally.history_usage(wallet, count) for wallet, (count, _) in EVENTS.items()}
    for wallet, (count, _) in EVENTS.items():
        assert len(usage[wallet]) == count, usage[wallet]
    return {"version": version, "usage": usage}


# --- helpers -----------------------------------------------------------------------------


def until(browser, check, what, timeout=WAIT):
    """Waits until `check(browser)` is truthy and returns it; fails saying `what` otherwise."""
    try:
        return WebDriverWait(browser, timeout, ignored_exceptions=(StaleElementReferenceException,)) \
            .until(check, message=what)
    except TimeoutException:
        raise AssertionError(f"within {timeout} s: {what} (at {browser.current_url})") from None


def text_of(browser, css):
    """The visible text of the first element matching `css`, stripped, or None."""
    found = browser.find_elements(By.CSS_SELECTOR, css)
    return found[0].text.strip() if found else None


def wait_text(browser, css, check, what, timeout=WAIT):
    """Waits until `css` exists and `check(its text)` holds; returns the text."""
    last = {}

    def probe(driver):
        text = text_of(driver, css)
        last["text"] = text
        return text if text is not None and check(text) else None

    try:
        return WebDriverWait(browser, timeout, ignored_exceptions=(StaleElementReferenceException,)) \
            .until(probe)
    except TimeoutException:
        raise AssertionError(f"within {timeout} s: {css} {what}; it reads {last.get('text')!r}"
                             f" (at {browser.current_url})") from None


def visible(browser, css):
    found = browser.find_elements(By.CSS_SELECTOR, css)
    return bool(found) and found[0].is_displayed()


def fill(browser, css, text):
    element = browser.find_element(By.CSS_SELECTOR, css)
    element.clear()
    element.send_keys(text)
    assert element.get_attribute("value") == text, (css, element.get_attribute("value"))


def set_date(browser, css, day):
    """Sets a date input (YYYY-MM-DD) as a picker would, whatever the browser's locale."""
    element = browser.find_element(By.CSS_SELECTOR, css)
    browser.execute_script(
        "arguments[0].value = arguments[1];"
        "arguments[0].dispatchEvent(new Event('input', {bubbles: true}));"
        "arguments[0].dispatchEvent(new Event('change', {bubbles: true}));", element, day)
    assert element.get_attribute("value") == day, (css, element.get_attribute("value"))


def page_fetch(browser, path, method="GET", body=None, headers=None):
    """A fetch from the page (its cookie, its origin), with exactly the headers given:
    (status, JSON or text)."""
    return browser.execute_async_script(
        """
        const [path, method, body, extra, done] = arguments;
        const headers = Object.assign({'Accept': 'application/json'}, extra || {});
        if (body !== null) headers['Content-Type'] = 'application/json';
        fetch(path, {method, headers, credentials: 'same-origin',
                     body: body === null ? undefined : JSON.stringify(body)})
          .then(async r => {
            const text = await r.text();
            let value;
            try { value = JSON.parse(text); } catch (e) { value = text; }
            done([r.status, value]);
          })
          .catch(e => done([0, String(e)]));
        """,
        path, method, body, headers)


def utc_today():
    return datetime.now(timezone.utc).date()


def open_signed_out(browser, tally):
    browser.get(tally.http + "/console")
    until(browser, lambda d: visible(d, "#signin-key"), "the sign-in form is shown")
    meta = browser.find_element(By.CSS_SELECTOR, 'meta[name="signed-in"]').get_attribute("content")
    assert meta == "false", meta
    for hidden in ("#nav-wallets", "#signout", "#wallet-list", "#margin-table", "#plan-list"):
        assert not visible(browser, hidden), f"{hidden} is shown before signing in"


def sign_in(browser, key):
    fill(browser, "#signin-key", key)
    browser.find_element(By.CSS_SELECTOR, "#signin-submit").click()


def go(browser, nav_id, ready_css, what):
    browser.find_element(By.CSS_SELECTOR, nav_id).click()
    return until(browser, lambda d: visible(d, ready_css), what)


# --- the server side of signing in, over plain HTTP -----------------------------------------


def test_console_session_over_http(tally):
    status, headers, page = get_no_redirect(tally.http + "/console")
    assert status == 200, status
    csp = headers["Content-Security-Policy"]
    assert "default-src 'self'" in csp and "frame-ancestors 'none'" in csp, csp
    assert "script-src" not in csp or "'unsafe-inline'" not in csp.split("script-src", 1)[1].split(";")[0], csp
    assert '<meta name="signed-in" content="false">' in page
    assert "{{" not in page, "an unreplaced placeholder"

    def post(body):
        request = urllib.request.Request(
            tally.http + "/console/session", data=json.dumps(body).encode(), method="POST",
            headers={"Content-Type": "application/json", "Accept": "application/json"})
        try:
            with urllib.request.urlopen(request, timeout=30) as response:
                return response.status, response.headers, json.loads(response.read())
        except urllib.error.HTTPError as error:
            return error.code, error.headers, error.read().decode(errors="replace")

    status, headers, answer = post({"api_key": tally.admin})
    assert status == 200 and answer["csrf"], (status, answer)
    cookie = headers["Set-Cookie"]
    assert cookie.startswith("tally_console=") and "HttpOnly" in cookie, cookie
    assert "SameSite=Strict" in cookie and "Path=/" in cookie, cookie
    assert post({"api_key": "tally_not_a_key_0123456789abcdef"})[0] == 401
    gateway = tally.ok("POST", "/v1/keys", {"label": "console-gateway", "scope": "gateway"})["key"]
    assert post({"api_key": gateway})[0] == 403
    # Without the cookie, the JSON API still wants a key.
    assert http_call(urllib.request.Request(tally.http + "/v1/wallets"))[0] == 401


# --- the journey: sign in, wallets, a grant, margins, a draft, CSRF, sign out ---------------


@pytest.mark.incremental
@pytest.mark.usefixtures("console_data")
class TestConsoleJourney:
    def test_wrong_keys_are_refused(self, browser, tally, shot):
        open_signed_out(browser, tally)
        sign_in(browser, "tally_wrong_key_0123456789abcdef")
        wait_text(browser, "#signin-message", lambda t: t != "" and "Signing in" not in t,
                  "says why the key was refused")
        assert visible(browser, "#signin-key") and not visible(browser, "#signout")
        gateway = tally.ok("POST", "/v1/keys", {"label": "console-gateway-ui", "scope": "gateway"})["key"]
        sign_in(browser, gateway)
        wait_text(browser, "#signin-message", lambda t: "admin" in t.lower(),
                  "says a gateway key is not enough")
        assert not visible(browser, "#signout")
        label = browser.find_element(By.CSS_SELECTOR, 'label[for="signin-key"]').text
        assert label == "Admin API key", label
        assert browser.find_element(By.CSS_SELECTOR, "#signin-key").get_attribute("type") == "password"
        shot(browser, "console-signin-refused")

    def test_sign_in_lists_wallets(self, browser, tally, shot):
        open_signed_out(browser, tally)
        sign_in(browser, tally.admin)
        until(browser, lambda d: d.find_elements(By.CSS_SELECTOR, '#wallet-list tr[data-wallet="loss"]'),
              "the wallet list shows loss after signing in")
        assert browser.current_url.endswith("#/wallets"), browser.current_url
        assert visible(browser, "#signout") and not visible(browser, "#signin-key")
        meta = browser.find_element(By.CSS_SELECTOR, 'meta[name="csrf-token"]').get_attribute("content")
        assert meta and "{{" not in meta, meta
        for wallet in ("good", "loss"):
            row = f'#wallet-list tr[data-wallet="{wallet}"]'
            assert text_of(browser, f"{row} .id") == wallet
            available = tally.ok("GET", f"/v1/wallets/{wallet}")["balances"][0]["available"]
            assert text_of(browser, f"{row} .available") == f"{available} USD"
            assert text_of(browser, f"{row} .frozen") == "no"
            assert text_of(browser, f"{row} .in-debt") == "no"
        # The search filters the loaded list by id as you type.
        fill(browser, "#wallet-search", "los")
        until(browser, lambda d: not visible(d, '#wallet-list tr[data-wallet="good"]'),
              "searching 'los' hides good")
        assert visible(browser, '#wallet-list tr[data-wallet="loss"]')
        browser.find_element(By.CSS_SELECTOR, "#wallet-search").send_keys(Keys.CONTROL, "a", Keys.BACK_SPACE)
        until(browser, lambda d: visible(d, '#wallet-list tr[data-wallet="good"]'),
              "clearing the search shows good again")
        shot(browser, "console-wallets")

    def test_wallet_page_grant(self, browser, tally, shot, console_data):
        browser.find_element(By.CSS_SELECTOR, '#wallet-list tr[data-wallet="loss"] .id a').click()
        until(browser, lambda d: d.current_url.endswith("#/wallets/loss"), "the link opens #/wallets/loss")
        wait_text(browser, "#wallet-id", lambda t: t == "loss", "names the wallet")
        balance = '#wallet-balances tr[data-asset="USD"] .available'
        before_api = tally.ok("GET", "/v1/wallets/loss")["balances"][0]["available"]
        before = wait_text(browser, balance, lambda t: t == before_api, f"reads {before_api}")
        assert Decimal(before) == 100 - 3 * TOKENS * PRICE, before
        # The usage rows, with their charge and cost, and a refund button that fills the form.
        until(browser, lambda d: len(d.find_elements(By.CSS_SELECTOR, "#wallet-usage tr[data-request]")) == 3,
              "the 3 usage events of loss are listed")
        first = console_data["usage"]["loss"][0]
        row = f'#wallet-usage tr[data-request="{first["request_id"]}"]'
        assert text_of(browser, f"{row} .cost") == first["cost_usd"]
        assert text_of(browser, f"{row} .charged") == first["charged"]
        browser.find_element(By.CSS_SELECTOR, f"{row} button.refund").click()
        assert browser.find_element(By.CSS_SELECTOR, "#refund-event").get_attribute("value") == first["request_id"]
        assert Decimal(browser.find_element(By.CSS_SELECTOR, "#refund-amount").get_attribute("value")) \
            == Decimal(first["charged"])
        for field in ("#refund-event", "#refund-amount"):
            browser.find_element(By.CSS_SELECTOR, field).clear()

        # Grant 5.00 through the form.
        fill(browser, "#grant-asset", "USD")
        fill(browser, "#grant-amount", "5.00")
        browser.find_element(By.CSS_SELECTOR, "#grant-submit").click()
        expected = Decimal(before) + Decimal("5.00")
        after = wait_text(browser, balance, lambda t: t != before, "changes after the grant")
        assert Decimal(after) == expected, (before, after)
        after_api = tally.ok("GET", "/v1/wallets/loss")["balances"][0]["available"]
        assert after == after_api, (after, after_api)  # exactly the API's string
        wait_text(browser, "#message", lambda t: "5.00" in t, "reports the grant")
        grants = tally.ok("GET", "/v1/wallets/loss")["grants"]
        assert any(Decimal(g["amount"]) == 5 for g in grants), grants
        browser.execute_script("window.scrollTo(0, 0)")
        shot(browser, "console-wallet")

    def test_margins(self, browser, tally, shot):
        go(browser, "#nav-margins", "#margin-run", "the margins page opens")
        today = utc_today()
        start = today - timedelta(days=6)
        assert browser.find_element(By.CSS_SELECTOR, "#margin-from").get_attribute("value") == start.isoformat()
        assert browser.find_element(By.CSS_SELECTOR, "#margin-to").get_attribute("value") == today.isoformat()
        Select(browser.find_element(By.CSS_SELECTOR, "#margin-group")).select_by_value("wallet")
        browser.find_element(By.CSS_SELECTOR, "#margin-run").click()

        def rows_when_done(d):  # (key, classes) of each row, once the run has answered
            if d.find_element(By.CSS_SELECTOR, "#margin-table").get_attribute("aria-busy") == "true":
                return None
            rows = d.find_elements(By.CSS_SELECTOR, "#margin-table tbody tr[data-key]")
            return [(r.get_attribute("data-key"), r.get_attribute("class").split()) for r in rows] or None

        rows = until(browser, rows_when_done, "the margin table has rows")
        assert rows[0][0] == "loss", rows
        assert "loss" in rows[0][1], rows

        # The same question to the API: the page shows its exact strings, in its order.
        frm = f"{start.isoformat()}T00:00:00Z"
        to = f"{(today + timedelta(days=1)).isoformat()}T00:00:00Z"
        groups = tally.ok("GET", f"/v1/analytics/margin?group_by=wallet&from={frm}&to={to}"
                                 "&order=margin&limit=100")["data"]
        assert groups[0]["key"] == "loss", groups
        loss = groups[0]
        assert text_of(browser, '#margin-table tr[data-key="loss"] .margin') == loss["margin_usd"]
        assert text_of(browser, '#margin-table tr[data-key="loss"] .revenue') == loss["revenue_usd"]
        assert text_of(browser, '#margin-table tr[data-key="loss"] .cost') == loss["cost_usd"]
        assert text_of(browser, '#margin-table tr[data-key="loss"] .events') == str(loss["events"])
        assert Decimal(loss["margin_usd"]) == 3 * (TOKENS * PRICE - Decimal("2.5")), loss
        good = text_of(browser, '#margin-table tr[data-key="good"] .margin')
        assert Decimal(good) == 5 * (TOKENS * PRICE - Decimal("0.2")), good
        assert "loss" not in dict(rows)["good"], rows
        assert [key for key, _ in rows] == [g["key"] for g in groups], (rows, groups)

        # The chart: an inline SVG with a title, a legend and today's bars.
        until(browser, lambda d: d.find_elements(By.CSS_SELECTOR, "#margin-chart svg"),
              "the chart is drawn")
        chart = browser.find_element(By.CSS_SELECTOR, "#margin-chart svg")
        title = browser.execute_script("return arguments[0].querySelector('title').textContent", chart)
        assert "margin" in title.lower(), title
        legend = browser.execute_script(
            "return Array.from(arguments[0].querySelectorAll('text')).map(t => t.textContent)", chart)
        for name in ("Revenue", "Cost", "Margin"):
            assert name in legend, legend
        assert today.isoformat()[5:] in legend, legend  # the day's axis label
        bars = browser.execute_script(
            "return Array.from(arguments[0].querySelectorAll('rect > title')).map(t => t.textContent)", chart)
        assert any(b.startswith(today.isoformat()) and "margin" in b for b in bars), bars
        browser.execute_script("arguments[0].scrollIntoView({block: 'start'})",
                               browser.find_element(By.CSS_SELECTOR, "#margin-table-h"))
        shot(browser, "console-margins")

    def test_pricing_draft_test(self, browser, tally, shot, console_data):
        go(browser, "#nav-pricing", "#plan-list", "the pricing page opens")
        until(browser, lambda d: d.find_elements(By.CSS_SELECTOR, '#plan-list tr[data-plan="std"] a'),
              "the plan std is listed")
        browser.find_element(By.CSS_SELECTOR, '#plan-list tr[data-plan="std"] a').click()
        textarea = until(browser, lambda d: d.find_element(By.CSS_SELECTOR, "#draft-rules")
                         if d.find_element(By.CSS_SELECTOR, "#draft-rules").get_attribute("value").strip()
                         else None, "#draft-rules is filled")
        rules = json.loads(textarea.get_attribute("value"))
        plans = {p["plan"]: p for p in tally.ok("GET", "/v1/plans")["data"]}
        latest = plans["std"]["versions"][-1]
        assert latest["version"] == console_data["version"], plans["std"]
        assert rules == latest["rules"], (rules, latest)  # no draft: the latest version's rules
        versions = text_of(browser, "#plan-versions")
        assert "0.001" in versions, versions

        # Twice the per-token price.
        price = rules[0]["components"][0]["price"]
        old = Decimal(price["unit_price"])
        assert old == PRICE, price
        new = old * 2
        price["unit_price"] = str(new)
        textarea.clear()
        textarea.send_keys(json.dumps(rules))
        browser.find_element(By.CSS_SELECTOR, "#draft-save").click()
        def std_draft(_):
            draft = [p for p in tally.ok("GET", "/v1/plans")["data"] if p["plan"] == "std"][0]["draft"]
            # The contract's shape is the rules array; a version-like {"rules": [...]} is read too.
            return draft if draft is None or isinstance(draft, list) else draft["rules"]

        draft = until(browser, std_draft, "the draft is saved on the server")
        assert Decimal(draft[0]["components"][0]["price"]["unit_price"]) == new, draft
        wait_text(browser, '#plan-list tr[data-plan="std"] .draft', lambda t: t == "yes",
                  "says std has a draft")

        # Test it on the recorded usage: from the day of the first event to today (UTC).
        events = [row for rows in console_data["usage"].values() for row in rows]
        first_day = min(row["occurred_at"][:10] for row in events)
        set_date(browser, "#test-from", first_day)
        set_date(browser, "#test-to", utc_today().isoformat())
        browser.find_element(By.CSS_SELECTOR, "#draft-test").click()
        difference = wait_text(browser, "#test-total .difference", lambda t: t != "",
                               "shows the total difference")
        wait_text(browser, "#message", lambda t: t == "Draft tested",
                  "says the saved draft was tested (no unsaved edits)")
        expected = sum((Decimal(row["quantities"]["tokens"]) * (new - old) for row in events),
                       Decimal(0))
        assert expected == Decimal(8), expected
        assert Decimal(difference) == expected, (difference, expected)
        for wallet, (count, _) in EVENTS.items():
            row = f'#test-table tr[data-wallet="{wallet}"]'
            assert Decimal(text_of(browser, f"{row} .difference")) == count * TOKENS * (new - old)
            assert text_of(browser, f"{row} .events") == str(count)
            current = Decimal(text_of(browser, f"{row} .current-revenue"))
            drafted = Decimal(text_of(browser, f"{row} .draft-revenue"))
            assert drafted - current == Decimal(text_of(browser, f"{row} .difference"))
        assert Decimal(text_of(browser, "#test-total .current-revenue")) == len(events) * TOKENS * old
        assert Decimal(text_of(browser, "#test-total .draft-revenue")) == len(events) * TOKENS * new
        browser.execute_script("arguments[0].scrollIntoView({block: 'center'})",
                               browser.find_element(By.CSS_SELECTOR, "#test-table"))
        shot(browser, "console-pricing")

    def test_csrf_is_required(self, browser, tally):
        status, answer = page_fetch(browser, "/v1/wallets/good/freeze", "POST",
                                    headers={"Idempotency-Key": "x"})
        assert status == 403, answer
        assert tally.ok("GET", "/v1/wallets/good")["frozen"] is False
        # Reading needs no token: the cookie stands for the key.
        status, answer = page_fetch(browser, "/v1/wallets/good")
        assert status == 200 and answer["id"] == "good", answer

    def test_narrow_screen(self, browser, tally, shot):
        browser.set_window_size(375, 812)
        try:
            browser.get(tally.http + "/console#/wallets")
            until(browser, lambda d: d.find_elements(By.CSS_SELECTOR, '#wallet-list tr[data-wallet="loss"]'),
                  "the wallets are listed at 375 px")
            width = browser.execute_script("return window.innerWidth")
            scroll = browser.execute_script("return document.documentElement.scrollWidth")
            assert scroll <= width, f"the page scrolls sideways at {width} px: {scroll} px wide"
            shot(browser, "console-narrow")
            # Keyboard: Tab moves through the navigation with a visible focus ring; Enter follows.
            browser.execute_script("document.getElementById('nav-wallets').focus()")
            ActionChains(browser).send_keys(Keys.TAB).perform()
            active = browser.switch_to.active_element
            assert active.get_attribute("id") == "nav-margins", active.get_attribute("id")
            outline = browser.execute_script(
                "const s = getComputedStyle(document.activeElement);"
                "return [s.outlineStyle, s.outlineWidth];")
            assert outline[0] != "none" and outline[1] != "0px", outline
            ActionChains(browser).send_keys(Keys.ENTER).perform()
            until(browser, lambda d: d.current_url.endswith("#/margins") and visible(d, "#margin-run"),
                  "Enter on the Margins link opens the margins page")
            assert browser.switch_to.active_element.get_attribute("id") == "margins-h"
        finally:
            browser.set_window_size(1280, 900)

    def test_sign_out(self, browser, tally, shot):
        browser.get(tally.http + "/console#/wallets")
        until(browser, lambda d: visible(d, "#signout"), "signed in, the sign-out button is shown")
        browser.find_element(By.CSS_SELECTOR, "#signout").click()
        until(browser, lambda d: visible(d, "#signin-key"), "the sign-in form is shown again")
        assert not visible(browser, "#signout")
        status, answer = page_fetch(browser, "/v1/wallets")
        assert status == 401, answer
        shot(browser, "console-signed-out")
