"""The billing portal (docs/portal-contract.md) in a real headless Chromium.

The catalog is set up over the admin API: asset USD (scale 2, one USD costs one dollar in
top-ups), wallet w1 with 12.50 and w2 with 7. Then, through the page as a person would use it:
w1's balance; a card saved through localstripe's fake Stripe.js; a top-up of 20.00 with that card;
an auto top-up rule (checked with the admin API and the CLI); a second session in the same browser
that only ever sees w2; used and tampered links refused with 403; a session that expires after
TALLY_PORTAL_IDLE_SECS (5 s here) without a request.

Every session starts from a fresh link (POST /v1/portal/sessions), so that no step depends on
the previous one having been quick enough for the 5 s idle limit. Screenshots of each page
state go to TALLY_SCREENSHOTS.
"""

import json
import subprocess
import time
from decimal import Decimal

import pytest
from selenium.common.exceptions import (StaleElementReferenceException, TimeoutException,
                                        WebDriverException)
from selenium.webdriver.common.by import By
from selenium.webdriver.support.ui import Select, WebDriverWait

from conftest import PORTAL_IDLE_SECS, STRIPE_PUBLISHABLE_KEY, get_no_redirect

WAIT = 30  # seconds an element may take to show what it should (a debug build, Stripe calls)
BALANCE = '#balances tr[data-asset="USD"] .available'


# --- setup -------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def catalog(tally):
    """USD with cents, priced one dollar per unit; w1 with 12.50, w2 with 7."""
    tally.ok("POST", "/v1/assets", {"code": "USD", "scale": 2, "usd_value": "1"}, "asset-usd")
    tally.ok("PUT", "/v1/assets/USD/price", {"currency": "usd", "unit_amount": "1"}, "price-usd")
    for wallet, amount in (("w1", "12.50"), ("w2", "7")):
        tally.ok("POST", "/v1/wallets", {"id": wallet}, f"{wallet}-create")
        tally.ok("POST", f"/v1/wallets/{wallet}/grants", {"asset": "USD", "amount": amount},
                 f"{wallet}-grant")
    assert tally.ok("GET", "/v1/wallets/w1")["balances"][0]["available"] == "12.5"
    assert tally.ok("GET", "/v1/wallets/w2")["balances"][0]["available"] == "7"


# --- helpers -----------------------------------------------------------------------------


def new_link(tally, wallet):
    """A fresh portal link for `wallet` (admin API); checks the answer's shape."""
    link = tally.ok("POST", "/v1/portal/sessions", {"wallet": wallet})
    assert link["wallet"] == wallet, link
    assert link["url"].startswith(f"{tally.http}/portal/session?token="), link
    assert link["token_expires_at"], link
    return link["url"]


def token_of(url):
    return url.split("token=", 1)[1]


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


def meta(browser, name):
    found = browser.find_elements(By.CSS_SELECTOR, f'meta[name="{name}"]')
    return found[0].get_attribute("content") if found else None


def page_status(browser):
    """The HTTP status of the document the browser shows (Navigation Timing Level 2)."""
    return browser.execute_script(
        "const e = performance.getEntriesByType('navigation')[0]; return e ? e.responseStatus : null;")


def portal_fetch(browser, path, method="GET", body=None, csrf=True):
    """A fetch from the page (its cookie, its origin): (status, JSON or text). With `csrf`, the
    X-CSRF-Token header carries the page's meta token, as portal.js sends it."""
    return browser.execute_async_script(
        """
        const [path, method, body, csrf, done] = arguments;
        const headers = {'Accept': 'application/json'};
        if (body !== null) headers['Content-Type'] = 'application/json';
        const token = document.querySelector('meta[name="csrf-token"]');
        if (csrf && token) headers['X-CSRF-Token'] = token.content;
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
        path, method, body, csrf)


def open_portal(browser, tally, wallet):
    """Opens a fresh link for `wallet`: the browser lands on /portal with the balances shown."""
    url = new_link(tally, wallet)
    browser.get(url)
    until(browser, lambda d: d.current_url.split("?")[0].endswith("/portal"),
          f"the link for {wallet} redirects to /portal")
    assert page_status(browser) == 200
    until(browser, lambda d: d.find_elements(By.CSS_SELECTOR, BALANCE),
          f"{wallet}'s USD balance is rendered")
    return url


def choose(browser, css, value):
    """Selects the option `value` (by value, or text starting with it) once it is offered."""
    element = until(browser, lambda d: d.find_element(By.CSS_SELECTOR, css), f"{css} exists")
    if element.tag_name.lower() != "select":
        return
    options = until(browser, lambda d: [o for o in Select(d.find_element(By.CSS_SELECTOR, css)).options
                                        if o.get_attribute("value") == value
                                        or o.text.strip().startswith(value)],
                    f"{css} offers {value}")
    if not options[0].is_selected():
        options[0].click()


def fill(browser, css, text):
    element = browser.find_element(By.CSS_SELECTOR, css)
    element.clear()
    element.send_keys(text)
    assert element.get_attribute("value") == text, (css, element.get_attribute("value"))


def usd_rule(rules):
    """The USD entry of a list of top-up rules (the admin API's or the CLI's shape)."""
    for rule in rules:
        if json.dumps(rule.get("asset")).strip('"') == "USD":
            return rule
    raise AssertionError(f"no USD top-up rule in {rules}")


def fixed_amount(amount):
    """20 out of {"fixed": "20", "target": null} (API), {"Fixed": "20"} (engine) or "20"."""
    if isinstance(amount, dict):
        for key, value in amount.items():
            if key.lower() == "fixed" and value is not None:
                return Decimal(value)
        raise AssertionError(f"not a fixed amount: {amount}")
    return Decimal(amount)


# --- w1: balance, card, top-up, auto top-up ------------------------------------------------


@pytest.mark.incremental
@pytest.mark.usefixtures("catalog")
class TestWalletJourney:
    def test_balance(self, browser, tally, shot):
        open_portal(browser, tally, "w1")
        wait_text(browser, BALANCE, lambda t: t == "12.5", "reads exactly 12.5")
        row = '#balances tr[data-asset="USD"]'
        for cell in ("held", "debt", "overdraft"):
            assert text_of(browser, f"{row} .{cell}") == "0", cell
        assert meta(browser, "tally-wallet") == "w1"
        assert meta(browser, "csrf-token")
        assert meta(browser, "stripe-key") == STRIPE_PUBLISHABLE_KEY
        # The page's own API: w1's data, nothing admin-only.
        status, wallet = portal_fetch(browser, "/portal/api/wallet")
        assert status == 200, wallet
        assert wallet["wallet"] == "w1"
        assert [(b["asset"], b["available"]) for b in wallet["balances"]] == [("USD", "12.5")]
        for secret in ("metadata", "customer", "margin", "topup_rules"):
            assert secret not in wallet, f"admin-only {secret} in {wallet}"
        shot(browser, "portal-balance")

    def test_save_card(self, browser, tally, shot):
        open_portal(browser, tally, "w1")
        wait_text(browser, "#card-status", lambda t: "No card saved" in t, 'says "No card saved"')
        # Stripe.js (localstripe's fake) is loaded when the card form is used (portal.js mounts
        # it at once); its card Element renders plain inputs named by their placeholders. A click
        # on the mount point, as a person would; it may still be empty (zero-sized) then.
        try:
            browser.find_element(By.CSS_SELECTOR, "#card-element").click()
        except WebDriverException:
            pass
        until(browser, lambda d: d.find_elements(By.CSS_SELECTOR, '#card-element input[placeholder="number"]'),
              "the card Element is mounted in #card-element")
        for field, value in (("number", "4242424242424242"), ("exp_month", "12"),
                             ("exp_year", "30"), ("cvc", "123"), ("postal_code", "75001")):
            element = browser.find_element(By.CSS_SELECTOR, f'#card-element input[placeholder="{field}"]')
            element.send_keys(value)
            assert element.get_attribute("value") == value, (field, element.get_attribute("value"))
        shot(browser, "portal-card-form")
        browser.find_element(By.CSS_SELECTOR, "#card-save").click()
        wait_text(browser, "#card-message", lambda t: "Card saved" in t, 'says "Card saved"')
        wait_text(browser, "#card-status", lambda t: "Card saved" in t, 'says "Card saved"')
        status, wallet = portal_fetch(browser, "/portal/api/wallet")
        assert status == 200 and wallet["card"]["saved"] is True, wallet
        assert wallet["card"]["payment_method"].startswith("pm_"), wallet
        admin = tally.ok("GET", "/v1/wallets/w1")
        assert admin["customer"] and admin["customer"].startswith("cus_"), admin
        assert admin["payment_method"] == wallet["card"]["payment_method"], admin
        shot(browser, "portal-card")

    def test_top_up(self, browser, tally, shot):
        open_portal(browser, tally, "w1")
        choose(browser, "#topup-asset", "USD")
        browser.find_element(By.CSS_SELECTOR, 'button.topup-preset[data-amount="20.00"]').click()
        browser.find_element(By.CSS_SELECTOR, "#topup-submit").click()
        wait_text(browser, "#topup-message", lambda t: "Topped up" in t, 'says "Topped up"')
        wait_text(browser, BALANCE, lambda t: t == "32.5", "reads exactly 32.5 after the top-up")
        status, wallet = portal_fetch(browser, "/portal/api/wallet")
        assert status == 200, wallet
        top_ups = [g for g in wallet["grants"] if g["source"] == "top_up"]
        assert len(top_ups) == 1 and Decimal(top_ups[0]["amount"]) == 20, wallet["grants"]
        row = f'#grants tr[data-grant="{top_ups[0]["id"]}"]'
        source = wait_text(browser, f"{row} .source", lambda t: t != "", "shows the grant's source")
        assert "top" in source.lower(), source
        until(browser, lambda d: d.find_elements(By.CSS_SELECTOR, "#topups tr[data-topup]"),
              "the top-up is listed in #topups")
        assert tally.ok("GET", "/v1/wallets/w1")["balances"][0]["available"] == "32.5"
        shot(browser, "portal-topup")

    def test_auto_top_up(self, browser, tally, shot):
        open_portal(browser, tally, "w1")
        wait_text(browser, "#auto-status", lambda t: t.startswith("Off"), 'says "Off"')
        choose(browser, "#auto-asset", "USD")
        fill(browser, "#auto-threshold", "5.00")
        fill(browser, "#auto-amount", "20.00")
        browser.find_element(By.CSS_SELECTOR, "#auto-save").click()
        status_text = wait_text(browser, "#auto-status", lambda t: t.startswith("On"), 'says "On: ..."')
        assert "5" in status_text and "20" in status_text, status_text
        shot(browser, "portal-auto-topup")

        # The admin API sees the rule the page set.
        rule = usd_rule(tally.ok("GET", "/v1/wallets/w1")["topup_rules"])
        assert Decimal(rule["threshold"]) == 5 and fixed_amount(rule["amount"]) == 20, rule
        # And so does the CLI, over QUIC with the server's pinned certificate.
        cli = subprocess.run(
            [tally.binary, "wallet", "get", "w1", "--addr", tally.addr, "--cert", str(tally.cert),
             "--api-key", tally.admin, "--json"],
            capture_output=True, text=True, timeout=60, stdin=subprocess.DEVNULL)
        assert cli.returncode == 0, f"tally wallet get: {cli.returncode}\n{cli.stdout}\n{cli.stderr}"
        printed = json.loads(cli.stdout)  # {"ok": true, "wallet": {..., "topup_rules": [...]}}
        rule = usd_rule(printed["wallet"]["topup_rules"])
        assert Decimal(rule["threshold"]) == 5 and fixed_amount(rule["amount"]) == 20, rule

        # Changed to a target balance with a monthly cap; then turned off.
        choose(browser, "#auto-kind", "target")
        fill(browser, "#auto-amount", "50.00")
        fill(browser, "#auto-cap", "100.00")
        browser.find_element(By.CSS_SELECTOR, "#auto-save").click()
        status_text = wait_text(browser, "#auto-status", lambda t: "month" in t, 'names the monthly cap')
        assert "top up to 50.00" in status_text and "100.00 a month" in status_text, status_text
        rule = usd_rule(tally.ok("GET", "/v1/wallets/w1")["topup_rules"])
        assert rule["amount"] == {"target": "50"} or Decimal(rule["amount"]["target"]) == 50, rule
        assert Decimal(rule["monthly_cap"]) == 100, rule
        browser.find_element(By.CSS_SELECTOR, "#auto-off").click()
        wait_text(browser, "#auto-status", lambda t: t.startswith("Off"), 'says "Off" again')
        assert tally.ok("GET", "/v1/wallets/w1")["topup_rules"] == []


# --- sessions: isolation, used and tampered links, expiry ----------------------------------


@pytest.mark.usefixtures("catalog")
def test_second_session_sees_only_its_wallet(browser, tally, shot):
    open_portal(browser, tally, "w1")
    open_portal(browser, tally, "w2")  # the same browser: its cookie is now w2's session
    wait_text(browser, BALANCE, lambda t: t == "7", "reads w2's 7")
    assert meta(browser, "tally-wallet") == "w2"
    for path in ("/portal/api/wallet", "/portal/api/wallet?wallet=w1"):
        status, wallet = portal_fetch(browser, path)
        assert status == 200 and wallet["wallet"] == "w2", (path, wallet)
        assert [(b["asset"], b["available"]) for b in wallet["balances"]] == [("USD", "7")], wallet
    # A state-changing call without the CSRF header is refused.
    status, answer = portal_fetch(browser, "/portal/api/topups", "POST",
                                  {"asset": "USD", "amount": "20.00"}, csrf=False)
    assert status == 403, answer
    shot(browser, "portal-w2")


@pytest.mark.usefixtures("catalog")
def test_used_and_tampered_links_are_refused(browser, tally, shot):
    # Plain HTTP first: a link is exchanged once for a cookie and a 303 to /portal.
    url = new_link(tally, "w1")
    status, headers, _ = get_no_redirect(url)
    assert status == 303 and headers["Location"].endswith("/portal"), (status, dict(headers))
    cookie = headers["Set-Cookie"]
    assert cookie.startswith("tally_portal=") and "HttpOnly" in cookie, cookie
    assert "SameSite=Lax" in cookie and "Path=/portal" in cookie, cookie
    assert get_no_redirect(url)[0] == 403

    # In the browser: the second opening of a link is refused.
    url = new_link(tally, "w1")
    browser.get(url)
    until(browser, lambda d: d.find_elements(By.CSS_SELECTOR, BALANCE), "the first opening works")
    browser.get(url)
    until(browser, lambda d: d.find_elements(By.CSS_SELECTOR, "#session-error"),
          "a used link shows #session-error")
    assert page_status(browser) == 403
    assert not browser.find_elements(By.CSS_SELECTOR, "#balances")
    shot(browser, "portal-link-used")

    # A link with one character changed is refused, and does not use up the real one.
    url = new_link(tally, "w1")
    token = token_of(url)
    tampered = url[: -len(token)] + ("B" if token[0] != "B" else "C") + token[1:]
    browser.get(tampered)
    until(browser, lambda d: d.find_elements(By.CSS_SELECTOR, "#session-error"),
          "a tampered link shows #session-error")
    assert page_status(browser) == 403
    shot(browser, "portal-link-tampered")
    browser.get(url)
    until(browser, lambda d: d.find_elements(By.CSS_SELECTOR, BALANCE),
          "the untampered link still opens the portal")


@pytest.mark.usefixtures("catalog")
def test_session_expires_when_idle(browser, tally, shot):
    open_portal(browser, tally, "w1")
    wait_text(browser, BALANCE, lambda t: t != "", "shows w1's balance")
    # The only fixed wait: time must pass without a request. One second more than the limit, and
    # one for the page's own late requests (the spend chart) and a coarse clock.
    time.sleep(PORTAL_IDLE_SECS + 2)
    browser.refresh()
    until(browser, lambda d: d.find_elements(By.CSS_SELECTOR, "#session-error"),
          "an expired session shows #session-error")
    assert page_status(browser) == 401
    status, answer = portal_fetch(browser, "/portal/api/wallet")
    assert status == 401 and answer["name"] == "Unauthenticated", answer
    shot(browser, "portal-expired")


@pytest.mark.usefixtures("catalog")
def test_legible_at_375_pixels_and_usable_from_the_keyboard(browser, tally, shot):
    """A phone-sized window: nothing spills sideways out of the page (wide tables scroll inside
    their own wrappers); every form control has a label; Tab reaches the top-up button."""
    browser.set_window_size(375, 812)
    try:
        open_portal(browser, tally, "w2")
        width = browser.execute_script("return document.documentElement.clientWidth")
        overflow = browser.execute_script(
            "return document.documentElement.scrollWidth - document.documentElement.clientWidth")
        assert overflow <= 0, f"the page is {overflow}px wider than the {width}px window"
        unlabelled = browser.execute_script("""
            return Array.from(document.querySelectorAll('input, select, textarea'))
              .filter(e => e.type !== 'hidden' && !e.closest('#card-element'))
              .filter(e => !(e.labels && e.labels.length) && !e.getAttribute('aria-label'))
              .map(e => e.id || e.name);""")
        assert unlabelled == [], f"controls without a label: {unlabelled}"
        shot(browser, "portal-375px")
        # Keyboard: tabbing from the top reaches the top-up button.
        browser.execute_script("document.activeElement && document.activeElement.blur()")
        body = browser.find_element(By.TAG_NAME, "body")
        reached = False
        for _ in range(40):
            body = browser.switch_to.active_element
            body.send_keys("\ue004")  # Tab
            if browser.switch_to.active_element.get_attribute("id") == "topup-submit":
                reached = True
                break
        assert reached, "Tab never reached #topup-submit"
    finally:
        browser.set_window_size(1280, 900)
