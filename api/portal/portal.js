/*
 * tally billing portal: the page's script (api/portal/portal.js).
 *
 * Plain ES2017, no dependencies, no build step. Served from /portal/assets/portal.js under a
 * CSP without inline scripts. The contract with the server is docs/portal-contract.md.
 *
 * Rules kept throughout:
 * - data from the API is rendered with textContent only (never innerHTML);
 * - amounts are decimal strings and stay strings: they are never parsed into numbers;
 * - every state-changing call sends X-CSRF-Token and Content-Type: application/json;
 * - a 401 from any call replaces the main content with #session-error.
 */
(function () {
  'use strict';

  // ---------------------------------------------------------------- configuration

  function meta(name) {
    var el = document.querySelector('meta[name="' + name + '"]');
    var value = el ? (el.getAttribute('content') || '').trim() : '';
    // An unreplaced placeholder (the file opened without the server) counts as empty.
    if (/^\{\{[a-z_]+\}\}$/.test(value)) value = '';
    return value;
  }

  var CSRF = meta('csrf-token');
  var WALLET = meta('tally-wallet');
  var STRIPE_JS = meta('stripe-js');
  var STRIPE_KEY = meta('stripe-key');
  var RETURN_URL = meta('return-url');

  var USAGE_PAGE_SIZE = 20;
  var SESSION_EXPIRED_TEXT =
    'Your session has expired. Open the billing portal again from the app.';

  function $(id) { return document.getElementById(id); }

  // ---------------------------------------------------------------- errors and the API

  class SessionExpired extends Error {
    constructor() { super(SESSION_EXPIRED_TEXT); this.name = 'SessionExpired'; }
  }

  class ApiError extends Error {
    constructor(status, body, message) {
      super(message);
      this.name = 'ApiError';
      this.status = status;
      this.body = body;
    }
  }

  var sessionEnded = false;

  function endSession() {
    if (sessionEnded) return;
    sessionEnded = true;
    var main = $('main');
    if (!main) return;
    while (main.firstChild) main.removeChild(main.firstChild);
    var p = document.createElement('p');
    p.id = 'session-error';
    p.className = 'notice session-error';
    p.setAttribute('role', 'alert');
    p.textContent = SESSION_EXPIRED_TEXT;
    main.appendChild(p);
    try { main.focus(); } catch (e) { /* not focusable: fine */ }
  }

  /**
   * Calls the portal API. Resolves with the parsed JSON (or null for an empty body); rejects
   * with ApiError carrying the API's `message`, or SessionExpired on 401 (after replacing the
   * page's content).
   */
  async function api(method, path, body, extraHeaders) {
    if (sessionEnded) throw new SessionExpired();
    var headers = { 'Accept': 'application/json' };
    var opts = { method: method, credentials: 'same-origin', cache: 'no-store', headers: headers };
    if (method !== 'GET' && method !== 'HEAD') {
      headers['X-CSRF-Token'] = CSRF;
      headers['Content-Type'] = 'application/json';
      if (method !== 'DELETE') opts.body = JSON.stringify(body === undefined ? {} : body);
    }
    if (extraHeaders) {
      Object.keys(extraHeaders).forEach(function (k) { headers[k] = extraHeaders[k]; });
    }
    var res;
    try {
      res = await fetch(path, opts);
    } catch (e) {
      throw new ApiError(0, null,
        'The request could not be sent. Check your connection and try again.');
    }
    if (res.status === 401) {
      endSession();
      throw new SessionExpired();
    }
    var data = null;
    var text = '';
    try { text = await res.text(); } catch (e) { text = ''; }
    if (text) {
      try { data = JSON.parse(text); } catch (e) { data = null; }
    }
    if (!res.ok) {
      var message = data && typeof data.message === 'string' && data.message
        ? data.message
        : 'The request failed (HTTP ' + res.status + '). Try again later.';
      throw new ApiError(res.status, data, message);
    }
    return data;
  }

  function newIdempotencyKey() {
    var c = window.crypto;
    if (c && typeof c.randomUUID === 'function') {
      try { return c.randomUUID(); } catch (e) { /* insecure context: fall through */ }
    }
    var bytes = new Uint8Array(16);
    c.getRandomValues(bytes);
    bytes[6] = (bytes[6] & 0x0f) | 0x40; // version 4
    bytes[8] = (bytes[8] & 0x3f) | 0x80; // variant 10
    var hex = Array.prototype.map.call(bytes, function (b) {
      return (b < 16 ? '0' : '') + b.toString(16);
    }).join('');
    return hex.slice(0, 8) + '-' + hex.slice(8, 12) + '-' + hex.slice(12, 16) + '-' +
      hex.slice(16, 20) + '-' + hex.slice(20);
  }

  // ---------------------------------------------------------------- small helpers

  function setMessage(el, text, kind) {
    if (!el) return;
    el.textContent = text || '';
    el.classList.remove('is-error', 'is-ok');
    if (kind === 'error') el.classList.add('is-error');
    else if (kind === 'ok') el.classList.add('is-ok');
  }

  function showError(err, el) {
    if (err instanceof SessionExpired || sessionEnded) return;
    var text = err && err.message ? err.message : String(err);
    setMessage(el, text, 'error');
  }

  function str(v) { return v === null || v === undefined ? '' : String(v); }

  function clearBody(table) {
    var tb = table.tBodies[0] || table.appendChild(document.createElement('tbody'));
    while (tb.firstChild) tb.removeChild(tb.firstChild);
    return tb;
  }

  function emptyRow(tbody, cols, text) {
    var tr = document.createElement('tr');
    tr.className = 'empty';
    var td = document.createElement('td');
    td.colSpan = cols;
    td.textContent = text;
    tr.appendChild(td);
    tbody.appendChild(tr);
  }

  function cell(tr, cls, text) {
    var td = document.createElement('td');
    if (cls) td.className = cls;
    td.textContent = str(text);
    tr.appendChild(td);
    return td;
  }

  /** A table cell holding a <time> with the machine value and a readable local date. */
  function timeCell(tr, cls, iso) {
    var td = document.createElement('td');
    if (cls) td.className = cls;
    if (iso) {
      var t = document.createElement('time');
      t.setAttribute('datetime', str(iso));
      t.textContent = formatDate(iso);
      td.appendChild(t);
    }
    tr.appendChild(td);
    return td;
  }

  /** Milliseconds since the epoch of an RFC 3339 string, or NaN. */
  function parseTime(iso) {
    if (!iso) return NaN;
    // Some engines refuse more than 3 fractional digits: keep milliseconds.
    return Date.parse(String(iso).replace(/(\.\d{3})\d+/, '$1'));
  }

  var dateFormat = null;
  try {
    dateFormat = new Intl.DateTimeFormat(undefined, {
      year: 'numeric', month: 'short', day: 'numeric', hour: '2-digit', minute: '2-digit'
    });
  } catch (e) { dateFormat = null; }

  function formatDate(iso) {
    var t = parseTime(iso);
    if (isNaN(t)) return str(iso);
    var d = new Date(t);
    return dateFormat ? dateFormat.format(d) : d.toLocaleString();
  }

  function plural(n, unit) { return n + ' ' + unit + (n === 1 ? '' : 's'); }

  /** "expires in 3 days", "expires in 5 hours", "expires in 12 minutes", "expired", "never expires". */
  function expiryWords(expiresAt, now) {
    if (!expiresAt) return 'never expires';
    var t = parseTime(expiresAt);
    if (isNaN(t)) return 'expires ' + str(expiresAt);
    var ms = t - now;
    if (ms <= 0) return 'expired';
    var minutes = Math.round(ms / 60000);
    if (minutes < 60) return 'expires in ' + plural(Math.max(1, minutes), 'minute');
    var hours = Math.round(ms / 3600000);
    if (hours < 24) return 'expires in ' + plural(hours, 'hour');
    return 'expires in ' + plural(Math.round(ms / 86400000), 'day');
  }

  var DECIMAL = /^\d+(\.\d+)?$/;

  /**
   * Pads a decimal string with trailing zeros up to the asset's scale ("5" -> "5.00"), for the
   * sentences only (table cells show the API's strings exactly). String work, no arithmetic;
   * never removes digits.
   */
  function padToScale(amount, asset) {
    var s = str(amount);
    var scale = assetScale(asset);
    if (!(scale > 0) || !/^-?\d+(\.\d+)?$/.test(s)) return s;
    var dot = s.indexOf('.');
    var frac = dot < 0 ? '' : s.slice(dot + 1);
    if (frac.length >= scale) return s;
    return (dot < 0 ? s : s.slice(0, dot)) + '.' + frac.padEnd(scale, '0');
  }

  /** Checks a typed amount; returns an error sentence, or '' when it is acceptable. */
  function checkAmount(value, asset, what) {
    if (!value) return 'Enter ' + what + '.';
    if (!DECIMAL.test(value)) return 'Enter ' + what + ' as a number like 20.00.';
    if (!/[1-9]/.test(value)) return 'Enter ' + what + ' above zero.';
    var scale = assetScale(asset);
    var dot = value.indexOf('.');
    if (dot >= 0 && scale >= 0 && value.length - dot - 1 > scale) {
      return scale === 0
        ? 'Enter ' + what + ' without decimals for ' + asset + '.'
        : 'Enter ' + what + ' with at most ' + plural(scale, 'decimal place') + ' for ' + asset + '.';
    }
    return '';
  }

  // ---------------------------------------------------------------- state

  var wallet = null;          // the last /portal/api/wallet answer
  var autoFormFilled = false; // the auto top-up form is filled once, then on asset change/save

  function assetScale(code) {
    var list = (wallet && wallet.assets) || [];
    for (var i = 0; i < list.length; i++) {
      if (list[i].code === code && typeof list[i].scale === 'number') return list[i].scale;
    }
    return -1;
  }

  function autoRule(asset) {
    var rules = (wallet && wallet.auto_topup) || [];
    for (var i = 0; i < rules.length; i++) {
      if (rules[i].asset === asset && rules[i].enabled !== false) return rules[i];
    }
    return null;
  }

  // ---------------------------------------------------------------- header

  function renderHeader() {
    var id = $('wallet-id');
    if (id) id.textContent = (wallet && wallet.wallet) || WALLET;
    var nav = $('header-nav');
    if (!nav || $('return-link') || !RETURN_URL) return;
    var url;
    try { url = new URL(RETURN_URL, window.location.href); } catch (e) { return; }
    if (url.protocol !== 'https:' && url.protocol !== 'http:') return;
    var a = document.createElement('a');
    a.id = 'return-link';
    a.className = 'return-link';
    a.href = url.href;
    a.textContent = 'Back to the app';
    nav.appendChild(a);
  }

  // ---------------------------------------------------------------- wallet: balances, grants, card, selects

  async function loadWallet() {
    try {
      var w = await api('GET', '/portal/api/wallet');
      if (sessionEnded) return;
      wallet = w || {};
      renderWallet();
      setMessage($('load-message'), '');
    } catch (e) {
      showError(e, $('load-message'));
    }
  }

  function renderWallet() {
    renderHeader();

    var notice = $('wallet-notice');
    if (notice) {
      if (wallet.frozen) {
        notice.textContent = 'This wallet is frozen. Contact the app\u2019s support if you think this is a mistake.';
        notice.hidden = false;
      } else {
        notice.textContent = '';
        notice.hidden = true;
      }
    }

    renderBalances();
    renderGrants();
    renderCardStatus();
    renderAssetSelects();
    if (!autoFormFilled) {
      fillAutoForm();
      autoFormFilled = true;
    }
    renderAutoStatus();
  }

  function renderBalances() {
    var table = $('balances');
    if (!table) return;
    var tb = clearBody(table);
    var list = wallet.balances || [];
    if (!list.length) { emptyRow(tb, 6, 'No balance yet.'); return; }
    list.forEach(function (b) {
      var tr = document.createElement('tr');
      tr.setAttribute('data-asset', str(b.asset));
      var th = document.createElement('th');
      th.scope = 'row';
      th.className = 'asset';
      th.textContent = str(b.asset);
      tr.appendChild(th);
      cell(tr, 'available num', b.available);
      cell(tr, 'held num', b.held);
      cell(tr, 'debt num', b.debt);
      cell(tr, 'overdraft num', b.overdraft);
      cell(tr, 'pending num', b.pending);
      tb.appendChild(tr);
    });
  }

  var SOURCES = { top_up: 'top-up', promotion: 'promotion', refund: 'refund', adjustment: 'adjustment' };

  function renderGrants() {
    var table = $('grants');
    if (!table) return;
    var tb = clearBody(table);
    var list = wallet.grants || [];
    if (!list.length) { emptyRow(tb, 6, 'No credit grants.'); return; }
    var now = Date.now();
    list.forEach(function (g) {
      var tr = document.createElement('tr');
      tr.setAttribute('data-grant', str(g.id));
      var src = cell(tr, 'source', SOURCES[g.source] || str(g.source).replace(/_/g, ' '));
      src.setAttribute('data-source', str(g.source));
      var eff = parseTime(g.effective_at);
      if (!isNaN(eff) && eff > now) {
        var note = document.createElement('span');
        note.className = 'small hint block';
        note.textContent = 'from ' + formatDate(g.effective_at);
        src.appendChild(note);
      }
      cell(tr, 'asset', g.asset);
      cell(tr, 'remaining num', g.remaining);
      cell(tr, 'amount num', g.amount);
      cell(tr, 'priority num', g.priority);
      var exp = cell(tr, 'expiry', expiryWords(g.expires_at, now));
      if (g.expires_at) {
        exp.setAttribute('data-expires', str(g.expires_at));
        exp.title = formatDate(g.expires_at);
      }
      tb.appendChild(tr);
    });
  }

  /** Keeps the expiry words current while the page stays open. */
  function refreshExpiryWords() {
    var now = Date.now();
    var cells = document.querySelectorAll('#grants td.expiry[data-expires]');
    Array.prototype.forEach.call(cells, function (td) {
      td.textContent = expiryWords(td.getAttribute('data-expires'), now);
    });
  }

  function renderCardStatus() {
    var el = $('card-status');
    if (!el) return;
    var card = wallet.card || {};
    if (card.saved) {
      var last4 = card.last4 || (card.card && card.card.last4);
      el.textContent = last4 ? 'Card saved (ending ' + str(last4) + ')' : 'Card saved';
    } else {
      el.textContent = 'No card saved';
    }
  }

  function fillSelect(select, codes) {
    if (!select) return;
    var current = select.value;
    while (select.firstChild) select.removeChild(select.firstChild);
    codes.forEach(function (code) {
      var o = document.createElement('option');
      o.value = code;
      o.textContent = code;
      select.appendChild(o);
    });
    if (!codes.length) {
      var none = document.createElement('option');
      none.value = '';
      none.textContent = 'No asset available';
      select.appendChild(none);
      select.disabled = true;
      return;
    }
    select.disabled = false;
    if (current && codes.indexOf(current) >= 0) select.value = current;
  }

  function renderAssetSelects() {
    var priced = (wallet.assets || []).map(function (a) { return str(a.code); });
    fillSelect($('topup-asset'), priced);

    // Auto top-up: the priced assets, plus any asset that already has a rule.
    var autoCodes = priced.slice();
    (wallet.auto_topup || []).forEach(function (r) {
      if (r.asset && autoCodes.indexOf(r.asset) < 0) autoCodes.push(str(r.asset));
    });
    var autoSel = $('auto-asset');
    var hadValue = autoSel && autoSel.value;
    fillSelect(autoSel, autoCodes);
    if (autoSel && !hadValue && !autoFormFilled) {
      // First render: show the first asset that has a rule, if any.
      var withRule = autoCodes.filter(function (c) { return autoRule(c); })[0];
      if (withRule) autoSel.value = withRule;
    }

    var topupMsg = $('topup-message');
    var noAssetText = 'No asset can be topped up here.';
    if (!priced.length && !topupMsg.textContent) setMessage(topupMsg, noAssetText, 'error');
    else if (priced.length && topupMsg.textContent === noAssetText) setMessage(topupMsg, '');
  }

  // ---------------------------------------------------------------- top-up

  var topupBusy = false;

  function initTopup() {
    var amount = $('topup-amount');
    var presets = document.querySelectorAll('#topup-presets button.topup-preset');
    function syncPressed() {
      Array.prototype.forEach.call(presets, function (b) {
        b.setAttribute('aria-pressed', String(b.getAttribute('data-amount') === amount.value.trim()));
      });
    }
    Array.prototype.forEach.call(presets, function (b) {
      b.addEventListener('click', function () {
        amount.value = b.getAttribute('data-amount') || '';
        syncPressed();
      });
    });
    amount.addEventListener('input', syncPressed);
    syncPressed();
    $('topup-form').addEventListener('submit', function (ev) {
      ev.preventDefault();
      submitTopup();
    });
  }

  // One key per intended top-up: kept until the server gives a final answer (succeeded or
  // failed), so a retry after a lost answer or a "pending" is the same top-up, never a second
  // charge. Changing the asset or amount makes it a new top-up.
  var topupKey = null;
  var topupKeyFor = '';

  async function submitTopup() {
    if (topupBusy || sessionEnded) return;
    var msg = $('topup-message');
    var asset = $('topup-asset').value;
    var amount = $('topup-amount').value.trim();
    if (!asset) { setMessage(msg, 'No asset can be topped up here.', 'error'); return; }
    var problem = checkAmount(amount, asset, 'an amount');
    if (problem) { setMessage(msg, problem, 'error'); $('topup-amount').focus(); return; }

    var intent = asset + ' ' + amount;
    if (!topupKey || topupKeyFor !== intent) {
      topupKey = newIdempotencyKey();
      topupKeyFor = intent;
    }
    topupBusy = true;
    var button = $('topup-submit');
    button.setAttribute('aria-disabled', 'true');
    setMessage(msg, 'Topping up\u2026');
    try {
      var r = await api('POST', '/portal/api/topups', { asset: asset, amount: amount },
        { 'Idempotency-Key': topupKey });
      r = r || {};
      // A final answer ends this top-up; the next click is a new one.
      if (r.status === 'succeeded' || r.status === 'failed') topupKey = null;
      var shownAsset = r.asset || asset;
      if (r.status === 'succeeded') {
        setMessage(msg, 'Topped up ' + padToScale(r.amount || amount, shownAsset) + ' ' + shownAsset, 'ok');
      } else if (r.status === 'pending') {
        setMessage(msg, 'Top-up pending', 'ok');
      } else {
        setMessage(msg, 'Top-up failed: ' + (r.failure_reason || 'unknown reason'), 'error');
      }
      await refreshAll();
    } catch (e) {
      showError(e, msg);
    } finally {
      topupBusy = false;
      button.removeAttribute('aria-disabled');
    }
  }

  // ---------------------------------------------------------------- card (Stripe)

  var cardsEnabled = !!STRIPE_KEY && (!!STRIPE_JS || typeof window.Stripe === 'function');
  var stripeLoading = null;
  var stripe = null;
  var cardElement = null;
  var cardBusy = false;

  function loadStripeJs() {
    if (typeof window.Stripe === 'function') return Promise.resolve();
    if (!stripeLoading) {
      stripeLoading = new Promise(function (resolve, reject) {
        var s = document.createElement('script');
        s.src = STRIPE_JS;
        s.async = true;
        s.onload = function () {
          if (typeof window.Stripe === 'function') resolve();
          else { stripeLoading = null; reject(new Error('The card form could not be loaded.')); }
        };
        s.onerror = function () {
          stripeLoading = null;
          if (s.parentNode) s.parentNode.removeChild(s);
          reject(new Error('The card form could not be loaded. Check your connection and try again.'));
        };
        // Appended last in the document: some Stripe.js stand-ins find their origin from the
        // last <script> element.
        document.body.appendChild(s);
      });
    }
    return stripeLoading;
  }

  async function ensureCardElement() {
    await loadStripeJs();
    if (!stripe) stripe = window.Stripe(STRIPE_KEY);
    if (!cardElement) {
      var el = stripe.elements().create('card');
      el.mount('#card-element');
      cardElement = el;
    }
    return cardElement;
  }

  function initCard() {
    var button = $('card-save');
    var msg = $('card-message');
    if (!cardsEnabled) {
      button.disabled = true;
      $('card-element').classList.add('is-unavailable');
      setMessage(msg, 'Cards cannot be saved here: card payments are not set up for this account.');
      return;
    }
    button.addEventListener('click', saveCard);
    // Mount at once so the card form is ready to type into.
    ensureCardElement().catch(function (e) { showError(e, msg); });
  }

  async function saveCard() {
    if (cardBusy || sessionEnded) return;
    var button = $('card-save');
    var msg = $('card-message');
    cardBusy = true;
    button.setAttribute('aria-disabled', 'true');
    setMessage(msg, 'Saving the card\u2026');
    try {
      var element = await ensureCardElement();
      var setup = await api('POST', '/portal/api/cards/setup', {});
      if (!setup || !setup.client_secret) throw new Error('The card could not be saved. Try again.');
      var result = await stripe.confirmCardSetup(setup.client_secret, {
        payment_method: { card: element }
      });
      if (!result || result.error || !result.setupIntent) {
        var m = result && result.error && result.error.message;
        setMessage(msg, m || 'The card could not be saved. Try again.', 'error');
        return;
      }
      await api('POST', '/portal/api/cards', { setup_intent: result.setupIntent.id });
      setMessage(msg, 'Card saved', 'ok');
      await refreshAll();
    } catch (e) {
      showError(e, msg);
    } finally {
      cardBusy = false;
      button.removeAttribute('aria-disabled');
    }
  }

  // ---------------------------------------------------------------- auto top-up

  var autoBusy = false;

  function fillAutoForm() {
    var asset = $('auto-asset').value;
    var rule = autoRule(asset);
    $('auto-threshold').value = rule ? str(rule.threshold) : '';
    $('auto-kind').value = rule && rule.kind === 'target' ? 'target' : 'fixed';
    $('auto-amount').value = rule ? str(rule.amount) : '';
    $('auto-cap').value = rule && rule.monthly_cap !== null && rule.monthly_cap !== undefined
      ? str(rule.monthly_cap) : '';
  }

  function renderAutoStatus() {
    var asset = $('auto-asset').value;
    var rule = autoRule(asset);
    var status = $('auto-status');
    var note = $('auto-note');
    if (!rule) {
      status.textContent = 'Off';
      note.hidden = true;
      note.textContent = '';
      return;
    }
    var text = 'On: below ' + padToScale(rule.threshold, asset) +
      (rule.kind === 'target' ? ' top up to ' : ' add ') + padToScale(rule.amount, asset);
    if (rule.daily_cap !== null && rule.daily_cap !== undefined && rule.daily_cap !== '') {
      text += ', at most ' + padToScale(rule.daily_cap, asset) + ' a day';
    }
    if (rule.monthly_cap !== null && rule.monthly_cap !== undefined && rule.monthly_cap !== '') {
      text += ', at most ' + padToScale(rule.monthly_cap, asset) + ' a month';
    }
    status.textContent = text;
    if (rule.last_failure || rule.flagged) {
      note.textContent = rule.last_failure
        ? 'The last automatic top-up failed: ' + str(rule.last_failure) + '. Check your card.'
        : 'The last automatic top-up needs attention. Check your card.';
      note.hidden = false;
    } else {
      note.hidden = true;
      note.textContent = '';
    }
  }

  function initAuto() {
    $('auto-asset').addEventListener('change', function () {
      fillAutoForm();
      renderAutoStatus();
      setMessage($('auto-message'), '');
    });
    $('auto-form').addEventListener('submit', function (ev) {
      ev.preventDefault();
      saveAuto();
    });
    $('auto-off').addEventListener('click', turnAutoOff);
  }

  async function saveAuto() {
    if (autoBusy || sessionEnded) return;
    var msg = $('auto-message');
    var asset = $('auto-asset').value;
    var threshold = $('auto-threshold').value.trim();
    var amount = $('auto-amount').value.trim();
    var cap = $('auto-cap').value.trim();
    if (!asset) { setMessage(msg, 'No asset can be topped up here.', 'error'); return; }
    var problem = checkAmount(threshold, asset, 'a threshold');
    if (problem) { setMessage(msg, problem, 'error'); $('auto-threshold').focus(); return; }
    problem = checkAmount(amount, asset, 'an amount');
    if (problem) { setMessage(msg, problem, 'error'); $('auto-amount').focus(); return; }
    if (cap) {
      problem = checkAmount(cap, asset, 'a monthly cap');
      if (problem) { setMessage(msg, problem, 'error'); $('auto-cap').focus(); return; }
    }

    autoBusy = true;
    setMessage(msg, 'Saving\u2026');
    try {
      var target = $('auto-kind').value === 'target';
      // A daily cap the seller set is kept: this form sets the monthly one.
      var existing = autoRule(asset);
      await api('PUT', '/portal/api/auto-topup', {
        asset: asset, threshold: threshold,
        amount: target ? null : amount, target: target ? amount : null,
        monthly_cap: cap ? cap : null,
        daily_cap: existing && existing.daily_cap ? existing.daily_cap : null
      });
      setMessage(msg, 'Auto top-up saved', 'ok');
      await loadWallet();
      if (sessionEnded) return;
      fillAutoForm();
      renderAutoStatus();
    } catch (e) {
      showError(e, msg);
    } finally {
      autoBusy = false;
    }
  }

  async function turnAutoOff() {
    if (autoBusy || sessionEnded) return;
    var msg = $('auto-message');
    var asset = $('auto-asset').value;
    if (!asset) { setMessage(msg, 'No asset can be topped up here.', 'error'); return; }
    autoBusy = true;
    setMessage(msg, 'Turning off\u2026');
    try {
      await api('DELETE', '/portal/api/auto-topup/' + encodeURIComponent(asset));
      setMessage(msg, 'Auto top-up turned off', 'ok');
      await loadWallet();
      if (sessionEnded) return;
      fillAutoForm();
      renderAutoStatus();
    } catch (e) {
      showError(e, msg);
    } finally {
      autoBusy = false;
    }
  }

  // ---------------------------------------------------------------- usage

  var usage = {
    cursor: null,   // the cursor of the page shown (null: the first page)
    stack: [],      // the cursors of the pages before it
    nextCursor: null,
    product: '',
    model: '',
    seq: 0,
    loading: false
  };

  function usageQuery() {
    var q = new URLSearchParams();
    q.set('limit', String(USAGE_PAGE_SIZE));
    if (usage.cursor) q.set('cursor', usage.cursor);
    if (usage.product) q.set('product', usage.product);
    if (usage.model) q.set('model', usage.model);
    return '/portal/api/usage?' + q.toString();
  }

  async function loadUsage() {
    var seq = ++usage.seq;
    var table = $('usage');
    var msg = $('usage-message');
    usage.loading = true;
    table.setAttribute('aria-busy', 'true');
    try {
      var r = await api('GET', usageQuery());
      if (seq !== usage.seq || sessionEnded) return;
      r = r || {};
      renderUsage(r.data || []);
      usage.nextCursor = r.has_more && r.next_cursor ? String(r.next_cursor) : null;
      setMessage(msg, '');
    } catch (e) {
      if (seq !== usage.seq) return;
      usage.nextCursor = null;
      showError(e, msg);
    } finally {
      if (seq === usage.seq) {
        usage.loading = false;
        if (!sessionEnded) {
          table.removeAttribute('aria-busy');
          updatePager();
        }
      }
    }
  }

  function renderUsage(rows) {
    var tb = clearBody($('usage'));
    if (!rows.length) {
      emptyRow(tb, 6, usage.product || usage.model
        ? 'No usage matches these filters.'
        : (usage.cursor ? 'No more usage.' : 'No usage yet.'));
      return;
    }
    rows.forEach(function (u) {
      var tr = document.createElement('tr');
      tr.setAttribute('data-request', str(u.request_id));
      timeCell(tr, 'when', u.occurred_at);
      cell(tr, 'product', u.product);
      cell(tr, 'model', u.model === null || u.model === undefined || u.model === '' ? '\u2014' : u.model);
      cell(tr, 'charged num', u.charged);
      cell(tr, 'refunded num', u.refunded);
      cell(tr, 'asset', u.asset);
      tb.appendChild(tr);
    });
  }

  function updatePager() {
    var prev = $('usage-prev');
    var next = $('usage-next');
    var focused = document.activeElement;
    prev.disabled = usage.stack.length === 0;
    next.disabled = !usage.nextCursor;
    // Do not strand keyboard focus on a button that just became disabled.
    if (focused === next && next.disabled) (prev.disabled ? $('usage') : prev).focus();
    else if (focused === prev && prev.disabled) (next.disabled ? $('usage') : next).focus();
  }

  function applyUsageFilters() {
    var product = $('usage-product').value.trim();
    var model = $('usage-model').value.trim();
    if (product === usage.product && model === usage.model) return;
    usage.product = product;
    usage.model = model;
    usage.cursor = null;
    usage.stack = [];
    usage.nextCursor = null;
    loadUsage();
  }

  function initUsage() {
    var table = $('usage');
    if (!table.hasAttribute('tabindex')) table.setAttribute('tabindex', '-1');
    $('usage-product').addEventListener('change', applyUsageFilters);
    $('usage-model').addEventListener('change', applyUsageFilters);
    $('usage-filters').addEventListener('submit', function (ev) {
      ev.preventDefault();
      applyUsageFilters();
    });
    $('usage-next').addEventListener('click', function () {
      if (usage.loading || !usage.nextCursor) return;
      usage.stack.push(usage.cursor);
      usage.cursor = usage.nextCursor;
      loadUsage();
    });
    $('usage-prev').addEventListener('click', function () {
      if (usage.loading || !usage.stack.length) return;
      usage.cursor = usage.stack.pop();
      loadUsage();
    });
  }

  // ---------------------------------------------------------------- top-up history

  async function loadTopups() {
    try {
      var r = await api('GET', '/portal/api/topups');
      if (sessionEnded) return;
      renderTopups((r && r.data) || []);
    } catch (e) {
      showError(e, $('load-message'));
    }
  }

  function renderTopups(rows) {
    var tb = clearBody($('topups'));
    if (!rows.length) { emptyRow(tb, 6, 'No top-ups yet.'); return; }
    rows.forEach(function (t) {
      var tr = document.createElement('tr');
      tr.setAttribute('data-topup', str(t.id));
      timeCell(tr, 'when', t.requested_at);
      cell(tr, 'kind', str(t.kind).replace(/_/g, ' '));
      cell(tr, 'amount num', t.amount);
      cell(tr, 'asset', t.asset);
      var st = cell(tr, 'status', t.status);
      st.classList.add('status-' + str(t.status).replace(/[^a-z_]/g, ''));
      cell(tr, 'reason', t.failure_reason ? str(t.failure_reason).replace(/_/g, ' ') : '');
      tb.appendChild(tr);
    });
  }

  // ---------------------------------------------------------------- start

  function refreshAll() {
    if (sessionEnded) return Promise.resolve();
    return Promise.all([loadWallet(), loadUsage(), loadTopups()]);
  }

  function start() {
    renderHeader();
    initTopup();
    initCard();
    initAuto();
    initUsage();
    refreshAll();
    window.setInterval(function () { if (!sessionEnded) refreshExpiryWords(); }, 60000);
  }

  if (document.readyState === 'loading') {
    document.addEventListener('DOMContentLoaded', start);
  } else {
    start();
  }
})();
