/*
 * tally seller's console: the page's script (api/console/console.js).
 *
 * Plain ES2017, no dependencies, no build step. Served from /console/assets/console.js under a
 * CSP without inline scripts. The contract with the server is docs/console-contract.md.
 *
 * Rules kept throughout:
 * - data from the API is rendered with textContent (and createElementNS for the SVG chart),
 *   never innerHTML;
 * - amounts are decimal strings and are shown as the API returned them; the only arithmetic on
 *   them (the draft test's difference, a refund's default amount) is exact, on BigInt scaled
 *   integers; Number() is used only for the chart's pixel geometry;
 * - every non-GET call sends X-CSRF-Token, Content-Type: application/json and a fresh
 *   Idempotency-Key per user action;
 * - a 401 from any call shows the sign-in form again.
 */
(function () {
  'use strict';

  // ---------------------------------------------------------------- configuration

  function meta(name) {
    var el = document.querySelector('meta[name="' + name + '"]');
    var value = el ? (el.getAttribute('content') || '').trim() : '';
    if (/^\{\{[a-z_]+\}\}$/.test(value)) value = ''; // an unreplaced placeholder
    return value;
  }

  var CSRF = meta('csrf-token');
  var SIGNED_IN = meta('signed-in') === 'true';
  var WALLET_PAGE = 100;
  var USAGE_PAGE = 20;
  var SVG_NS = 'http://www.w3.org/2000/svg';

  function $(id) { return document.getElementById(id); }

  // ---------------------------------------------------------------- exact decimals

  /** A decimal string ("-12.50") as {n: BigInt of all its digits, scale}, or null. */
  function parseDecimal(text) {
    var m = /^(-)?(\d+)(?:\.(\d+))?$/.exec(String(text === null || text === undefined ? '' : text).trim());
    if (!m) return null;
    var frac = m[3] || '';
    var n = BigInt(m[2] + frac);
    if (m[1]) n = -n;
    return { n: n, scale: frac.length };
  }

  function rescale(d, scale) {
    var n = d.n;
    for (var i = d.scale; i < scale; i++) n = n * BigInt(10);
    return n;
  }

  /** A scaled integer back to a decimal string, without trailing zeros (as the API writes). */
  function formatDecimal(n, scale) {
    var zero = BigInt(0);
    var neg = n < zero;
    var digits = (neg ? -n : n).toString();
    if (scale > 0) {
      while (digits.length <= scale) digits = '0' + digits;
      var intPart = digits.slice(0, digits.length - scale);
      var frac = digits.slice(digits.length - scale).replace(/0+$/, '');
      digits = frac ? intPart + '.' + frac : intPart;
    }
    if (digits === '0') neg = false;
    return (neg ? '-' : '') + digits;
  }

  /** a − b, exactly, for decimal strings; null when either is not a decimal. */
  function subtractDecimals(a, b) {
    var x = parseDecimal(a);
    var y = parseDecimal(b);
    if (!x || !y) return null;
    var scale = Math.max(x.scale, y.scale);
    return formatDecimal(rescale(x, scale) - rescale(y, scale), scale);
  }

  function isNegative(text) {
    var d = parseDecimal(text);
    return !!d && d.n < BigInt(0);
  }

  // Exposed for checks from a browser console or a test (read-only helpers, no state).
  window.tallyConsoleDecimal = { parse: parseDecimal, subtract: subtractDecimals, format: formatDecimal };

  // ---------------------------------------------------------------- errors and the API

  class SignedOut extends Error {
    constructor() { super('Your session has ended: sign in again.'); this.name = 'SignedOut'; }
  }

  class ApiError extends Error {
    constructor(status, body, message) {
      super(message);
      this.name = 'ApiError';
      this.status = status;
      this.body = body;
    }
  }

  function newIdempotencyKey() {
    var c = window.crypto;
    if (c && typeof c.randomUUID === 'function') {
      try { return c.randomUUID(); } catch (e) { /* insecure context: fall through */ }
    }
    var bytes = new Uint8Array(16);
    c.getRandomValues(bytes);
    bytes[6] = (bytes[6] & 0x0f) | 0x40;
    bytes[8] = (bytes[8] & 0x3f) | 0x80;
    var hex = Array.prototype.map.call(bytes, function (b) {
      return (b < 16 ? '0' : '') + b.toString(16);
    }).join('');
    return hex.slice(0, 8) + '-' + hex.slice(8, 12) + '-' + hex.slice(12, 16) + '-' +
      hex.slice(16, 20) + '-' + hex.slice(20);
  }

  /**
   * Calls the server. Resolves with the parsed JSON (null for an empty body); rejects with
   * ApiError carrying the API's `message`, or SignedOut on 401 (after showing the sign-in form).
   * `opts.idem`: the Idempotency-Key of this user action (a fresh one when left out);
   * `opts.signin`: a 401 is an ordinary error (the sign-in call itself).
   */
  async function api(method, path, body, opts) {
    opts = opts || {};
    var headers = { 'Accept': 'application/json' };
    var init = { method: method, credentials: 'same-origin', cache: 'no-store', headers: headers };
    if (method !== 'GET' && method !== 'HEAD') {
      headers['X-CSRF-Token'] = CSRF;
      headers['Content-Type'] = 'application/json';
      headers['Idempotency-Key'] = opts.idem || newIdempotencyKey();
      if (body !== undefined) init.body = JSON.stringify(body);
    }
    var res;
    try {
      res = await fetch(path, init);
    } catch (e) {
      throw new ApiError(0, null, 'The request could not be sent. Check the connection and try again.');
    }
    var data = null;
    var text = '';
    try { text = await res.text(); } catch (e) { text = ''; }
    if (text) {
      try { data = JSON.parse(text); } catch (e) { data = null; }
    }
    if (res.status === 401 && !opts.signin) {
      showSignin('Your session has ended: sign in again.');
      throw new SignedOut();
    }
    if (!res.ok) {
      var message = data && typeof data.message === 'string' && data.message
        ? data.message
        : 'The request failed (HTTP ' + res.status + ').';
      throw new ApiError(res.status, data, message);
    }
    return data;
  }

  // ---------------------------------------------------------------- small helpers

  function setMessage(el, text, kind) {
    if (!el) return;
    el.textContent = text || '';
    el.classList.remove('is-error', 'is-ok');
    if (kind === 'error') el.classList.add('is-error');
    else if (kind === 'ok') el.classList.add('is-ok');
  }

  /** The one #message line: the last action's result or error. */
  function say(text, kind) { setMessage($('message'), text, kind); }

  function sayError(err) {
    if (err instanceof SignedOut) return;
    say(err && err.message ? err.message : String(err), 'error');
  }

  function str(v) { return v === null || v === undefined ? '' : String(v); }

  function clearBody(table) {
    var tb = table.tBodies[0] || table.appendChild(document.createElement('tbody'));
    while (tb.firstChild) tb.removeChild(tb.firstChild);
    return tb;
  }

  function clear(el) { while (el.firstChild) el.removeChild(el.firstChild); return el; }

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

  function headerCell(tr, cls, text) {
    var th = document.createElement('th');
    th.scope = 'row';
    if (cls) th.className = cls;
    th.textContent = str(text);
    tr.appendChild(th);
    return th;
  }

  function link(href, text) {
    var a = document.createElement('a');
    a.href = href;
    a.textContent = text;
    return a;
  }

  var dateFormat = null;
  try {
    dateFormat = new Intl.DateTimeFormat(undefined, {
      year: 'numeric', month: 'short', day: 'numeric', hour: '2-digit', minute: '2-digit',
      second: '2-digit'
    });
  } catch (e) { dateFormat = null; }

  function timeCell(tr, cls, iso) {
    var td = document.createElement('td');
    if (cls) td.className = cls;
    if (iso) {
      var t = document.createElement('time');
      t.setAttribute('datetime', str(iso));
      var ms = Date.parse(String(iso).replace(/(\.\d{3})\d+/, '$1'));
      t.textContent = dateFormat && !isNaN(ms) ? dateFormat.format(new Date(ms)) : str(iso);
      t.title = str(iso);
      td.appendChild(t);
    } else {
      td.textContent = '\u2014';
    }
    tr.appendChild(td);
    return td;
  }

  function yesNo(v) { return v ? 'yes' : 'no'; }

  function sourceWords(source) {
    var type = source && typeof source === 'object' ? source.type : source;
    var words = str(type).replace(/_/g, ' ');
    if (source && source.payment_id) words += ' (' + str(source.payment_id) + ')';
    return words;
  }

  function pairs(obj) {
    if (!obj || typeof obj !== 'object') return '';
    return Object.keys(obj).map(function (k) { return k + '=' + str(obj[k]); }).join(', ');
  }

  /** A button that refuses a second click while its action runs. */
  async function busy(button, action) {
    if (button) {
      if (button.getAttribute('aria-disabled') === 'true') return;
      button.setAttribute('aria-disabled', 'true');
    }
    try {
      await action();
    } catch (e) {
      sayError(e);
    } finally {
      if (button) button.removeAttribute('aria-disabled');
    }
  }

  // ---------------------------------------------------------------- UTC days

  function pad2(n) { return (n < 10 ? '0' : '') + n; }

  /** YYYY-MM-DD of a Date, in UTC. */
  function utcDay(d) {
    return d.getUTCFullYear() + '-' + pad2(d.getUTCMonth() + 1) + '-' + pad2(d.getUTCDate());
  }

  function addDays(day, n) {
    var d = new Date(day + 'T00:00:00Z');
    d.setUTCDate(d.getUTCDate() + n);
    return utcDay(d);
  }

  function validDay(day) { return /^\d{4}-\d{2}-\d{2}$/.test(day) && !isNaN(Date.parse(day + 'T00:00:00Z')); }

  /** [from, to) in RFC 3339 for the UTC days `fromDay` to `toDay`, both included. */
  function dayRange(fromDay, toDay) {
    return { from: fromDay + 'T00:00:00Z', to: addDays(toDay, 1) + 'T00:00:00Z' };
  }

  /** Fills two date inputs with the last 7 days including today (UTC), unless already set. */
  function defaultPeriod(fromInput, toInput) {
    var today = utcDay(new Date());
    if (!fromInput.value) fromInput.value = addDays(today, -6);
    if (!toInput.value) toInput.value = today;
  }

  function readPeriod(fromInput, toInput) {
    var f = fromInput.value;
    var t = toInput.value;
    if (!validDay(f)) { fromInput.focus(); throw new Error('Choose a valid "from" day.'); }
    if (!validDay(t)) { toInput.focus(); throw new Error('Choose a valid "to" day.'); }
    if (t < f) { toInput.focus(); throw new Error('The "to" day is before the "from" day.'); }
    return { fromDay: f, toDay: t, range: dayRange(f, t) };
  }

  // ---------------------------------------------------------------- signing in and out

  function showSignin(text) {
    SIGNED_IN = false;
    $('app-nav').hidden = true;
    Array.prototype.forEach.call(document.querySelectorAll('.page'), function (p) { p.hidden = true; });
    $('signin').hidden = false;
    say('');
    if (text) setMessage($('signin-message'), text, 'error');
    $('signin-key').focus();
  }

  async function signIn() {
    var msg = $('signin-message');
    var key = $('signin-key').value.trim();
    if (!key) { setMessage(msg, 'Enter an admin API key.', 'error'); $('signin-key').focus(); return; }
    setMessage(msg, 'Signing in\u2026');
    try {
      await api('POST', '/console/session', { api_key: key }, { signin: true });
    } catch (e) {
      var text = e.message;
      if (e.status === 401) text = 'This key is unknown or revoked: check it and try again.';
      else if (e.status === 403) text = 'This is a gateway key: the console needs an admin key.';
      setMessage(msg, text.trim(), 'error');
      $('signin-key').select();
      return;
    }
    $('signin-key').value = '';
    setMessage(msg, 'Signed in', 'ok');
    location.reload(); // the page comes back with the session's CSRF token
  }

  async function signOut() {
    try {
      await api('DELETE', '/console/session', undefined, { signin: true });
    } catch (e) {
      /* an ended session is signed out already */
    }
    location.reload();
  }

  // ---------------------------------------------------------------- routing

  var route = { page: '', wallet: null, plan: null };

  function parseRoute() {
    var h = location.hash.replace(/^#\/?/, '');
    var parts = h.split('/');
    var first = parts[0] || 'wallets';
    var rest = parts.slice(1).join('/');
    var arg = null;
    if (rest) {
      try { arg = decodeURIComponent(rest); } catch (e) { arg = rest; }
    }
    if (first === 'wallets' && arg) return { page: 'wallet', wallet: arg, plan: null };
    if (first === 'margins') return { page: 'margins', wallet: null, plan: null };
    if (first === 'pricing') return { page: 'pricing', wallet: null, plan: arg };
    return { page: 'wallets', wallet: null, plan: null };
  }

  function showRoute(focus) {
    if (!SIGNED_IN) return;
    var next = parseRoute();
    var pages = { wallets: 'page-wallets', wallet: 'page-wallet', margins: 'page-margins', pricing: 'page-pricing' };
    Object.keys(pages).forEach(function (k) { $(pages[k]).hidden = k !== next.page; });
    var nav = { wallets: 'nav-wallets', wallet: 'nav-wallets', margins: 'nav-margins', pricing: 'nav-pricing' };
    ['nav-wallets', 'nav-margins', 'nav-pricing'].forEach(function (id) {
      if (id === nav[next.page]) $(id).setAttribute('aria-current', 'page');
      else $(id).removeAttribute('aria-current');
    });
    route = next;
    var titles = { wallets: 'Wallets', wallet: 'Wallet ' + str(next.wallet), margins: 'Margins', pricing: 'Pricing' };
    document.title = titles[next.page] + ' \u2014 tally console';
    if (next.page === 'wallets') enterWallets();
    else if (next.page === 'wallet') enterWallet(next.wallet);
    else if (next.page === 'margins') enterMargins();
    else if (next.page === 'pricing') enterPricing(next.plan);
    if (focus) {
      var heading = { wallets: 'wallets-h', wallet: 'wallet-h', margins: 'margins-h', pricing: 'pricing-h' }[next.page];
      try { $(heading).focus(); } catch (e) { /* fine */ }
    }
  }

  // ---------------------------------------------------------------- wallets

  var wallets = { rows: [], cursor: null, hasMore: false, loaded: false, filter: null, seq: 0 };

  function walletQuery() {
    var q = new URLSearchParams();
    q.set('limit', String(WALLET_PAGE));
    if (wallets.cursor) q.set('cursor', wallets.cursor);
    if (wallets.filter) q.set('metadata[' + wallets.filter.key + ']', wallets.filter.value);
    return '/v1/wallets?' + q.toString();
  }

  async function loadWallets(more) {
    var seq = ++wallets.seq;
    if (!more) { wallets.rows = []; wallets.cursor = null; }
    var table = $('wallet-list');
    table.setAttribute('aria-busy', 'true');
    try {
      var r = (await api('GET', walletQuery())) || {};
      if (seq !== wallets.seq) return;
      wallets.rows = wallets.rows.concat(r.data || []);
      wallets.hasMore = !!r.has_more && !!r.next_cursor;
      wallets.cursor = wallets.hasMore ? String(r.next_cursor) : null;
      wallets.loaded = true;
      renderWallets();
    } finally {
      if (seq === wallets.seq) table.removeAttribute('aria-busy');
      $('wallet-more').disabled = !wallets.hasMore;
    }
  }

  function firstBalance(w) {
    var b = (w.balances || [])[0];
    return b ? str(b.available) + ' ' + str(b.asset) : '\u2014';
  }

  function renderWallets() {
    var tb = clearBody($('wallet-list'));
    if (!wallets.rows.length) {
      emptyRow(tb, 5, wallets.hasMore ? 'None on this page: load more.' : 'No wallets.');
    }
    wallets.rows.forEach(function (w) {
      var tr = document.createElement('tr');
      tr.setAttribute('data-wallet', str(w.id));
      var th = headerCell(tr, 'id', '');
      th.appendChild(link('#/wallets/' + encodeURIComponent(str(w.id)), str(w.id)));
      cell(tr, 'available num', firstBalance(w));
      cell(tr, 'frozen', yesNo(w.frozen));
      cell(tr, 'in-debt', yesNo(w.in_debt));
      cell(tr, 'metadata', pairs(w.metadata));
      tb.appendChild(tr);
    });
    applyWalletSearch();
  }

  function applyWalletSearch() {
    var needle = $('wallet-search').value.trim().toLowerCase();
    var shown = 0;
    Array.prototype.forEach.call(document.querySelectorAll('#wallet-list tbody tr[data-wallet]'), function (tr) {
      var hit = !needle || tr.getAttribute('data-wallet').toLowerCase().indexOf(needle) >= 0;
      tr.hidden = !hit;
      if (hit) shown++;
    });
    var total = wallets.rows.length;
    $('wallet-count').textContent = needle
      ? shown + ' of ' + total + ' loaded wallets match'
      : total + ' wallet' + (total === 1 ? '' : 's') + ' loaded' + (wallets.hasMore ? ' (more to load)' : '');
  }

  function enterWallets() {
    loadWallets(false).catch(sayError);
  }

  function initWallets() {
    $('wallet-search').addEventListener('input', applyWalletSearch);
    $('wallet-more').addEventListener('click', function () {
      var b = $('wallet-more');
      busy(b, function () { return loadWallets(true); });
    });
    $('wallet-filters').addEventListener('submit', function (ev) {
      ev.preventDefault();
      var key = $('wallet-meta-key').value.trim();
      var value = $('wallet-meta-value').value.trim();
      if (key && !value) { say('Give the metadata value too, or clear the key.', 'error'); $('wallet-meta-value').focus(); return; }
      wallets.filter = key ? { key: key, value: value } : null;
      say(key ? 'Showing wallets whose ' + key + ' is ' + value : 'Showing all wallets', 'ok');
      loadWallets(false).catch(sayError);
    });
  }

  // ---------------------------------------------------------------- one wallet

  var current = { id: null, wallet: null, usageCursor: null, usageRows: [], seq: 0 };

  function walletPath(suffix) {
    return '/v1/wallets/' + encodeURIComponent(current.id) + (suffix || '');
  }

  function enterWallet(id) {
    if (current.id !== id) {
      current.id = id;
      current.wallet = null;
      ['grant-amount', 'adjust-amount', 'adjust-reason', 'refund-event', 'refund-amount']
        .forEach(function (f) { $(f).value = ''; });
      clear($('portal-url'));
      ['wallet-balances', 'wallet-grants', 'wallet-usage', 'wallet-topups', 'wallet-transactions']
        .forEach(function (t) { emptyRow(clearBody($(t)), 10, 'Loading\u2026'); });
      $('grant-asset').value = '';
      $('adjust-asset').value = '';
    }
    $('wallet-id').textContent = id;
    reloadWallet().catch(sayError);
  }

  /** Re-reads everything about the wallet shown (after each action too). */
  function reloadWallet() {
    var seq = ++current.seq;
    var id = current.id;
    return Promise.all([
      api('GET', walletPath()).then(function (w) { if (seq === current.seq && id === current.id) renderWallet(w || {}); }),
      loadUsage(seq, false),
      api('GET', walletPath('/topups?limit=50')).then(function (r) {
        if (seq === current.seq) renderTopups((r && r.data) || []);
      }),
      api('GET', walletPath('/transactions?limit=50')).then(function (r) {
        if (seq === current.seq) renderTransactions((r && r.data) || []);
      })
    ]);
  }

  function renderWallet(w) {
    current.wallet = w;
    var state = [];
    state.push(w.frozen ? 'Frozen' : 'Not frozen');
    state.push(w.in_debt ? 'in debt' : 'not in debt');
    if (w.topup_flagged && w.topup_flagged.length) state.push('auto top-up stopped for ' + w.topup_flagged.join(', '));
    $('wallet-state').textContent = state.join(', ') + '.';
    $('freeze').disabled = !!w.frozen;
    $('unfreeze').disabled = !w.frozen;

    var tb = clearBody($('wallet-balances'));
    var balances = w.balances || [];
    if (!balances.length) emptyRow(tb, 6, 'No balance yet.');
    balances.forEach(function (b) {
      var tr = document.createElement('tr');
      tr.setAttribute('data-asset', str(b.asset));
      headerCell(tr, 'asset', b.asset);
      cell(tr, 'available num', b.available);
      cell(tr, 'held num', b.held);
      cell(tr, 'debt num', b.debt);
      cell(tr, 'pending num', b.pending);
      cell(tr, 'overdraft num', b.overdraft);
      tb.appendChild(tr);
    });

    var list = clear($('wallet-assets'));
    balances.forEach(function (b) {
      var o = document.createElement('option');
      o.value = str(b.asset);
      list.appendChild(o);
    });
    if (balances.length) {
      if (!$('grant-asset').value) $('grant-asset').value = str(balances[0].asset);
      if (!$('adjust-asset').value) $('adjust-asset').value = str(balances[0].asset);
    }

    var facts = clear($('wallet-facts'));
    function fact(term, value) {
      var dt = document.createElement('dt');
      dt.textContent = term;
      var dd = document.createElement('dd');
      dd.textContent = value;
      facts.appendChild(dt);
      facts.appendChild(dd);
    }
    var m = w.margin || {};
    fact('Margin (all time, USD)', str(m.margin_usd) + ' (revenue ' + str(m.revenue_usd) + ', cost ' +
      str(m.cost_usd) + ', refunded ' + str(m.refunded_usd) + ', ' + str(m.events) + ' events)');
    fact('Plans', (w.plans || []).map(function (p) {
      return str(p.plan) + ' v' + str(p.version) + ' from ' + str(p.effective_from);
    }).join('; ') || 'none');
    fact('Metadata', pairs(w.metadata) || 'none');
    fact('Stripe customer', w.customer ? str(w.customer) + (w.payment_method ? ', card ' + str(w.payment_method) : ', no card') : 'none');
    fact('Auto top-up', (w.topup_rules || []).map(function (r) {
      var amount = r.amount && typeof r.amount === 'object'
        ? (r.amount.fixed ? str(r.amount.fixed) : 'up to ' + str(r.amount.target))
        : str(r.amount);
      return str(r.asset) + ': below ' + str(r.threshold) + ' add ' + amount;
    }).join('; ') || 'off');
    if ((w.holds || []).length) fact('Open holds', String(w.holds.length));

    var gb = clearBody($('wallet-grants'));
    var grants = w.grants || [];
    if (!grants.length) emptyRow(gb, 8, 'No grant with a remainder.');
    grants.forEach(function (g) {
      var tr = document.createElement('tr');
      tr.setAttribute('data-grant', str(g.id));
      cell(tr, 'grant-id num', g.id);
      cell(tr, 'source', sourceWords(g.source));
      cell(tr, 'asset', g.asset);
      cell(tr, 'remaining num', g.remaining);
      cell(tr, 'amount num', g.amount);
      cell(tr, 'priority num', g.priority);
      timeCell(tr, 'effective', g.effective_at);
      timeCell(tr, 'expiry', g.expires_at);
      gb.appendChild(tr);
    });
  }

  async function loadUsage(seq, more) {
    var q = new URLSearchParams();
    q.set('limit', String(USAGE_PAGE));
    if (more && current.usageCursor) q.set('cursor', current.usageCursor);
    var r = (await api('GET', walletPath('/usage?' + q.toString()))) || {};
    if (seq !== current.seq) return;
    current.usageRows = more ? current.usageRows.concat(r.data || []) : (r.data || []);
    current.usageCursor = r.has_more && r.next_cursor ? String(r.next_cursor) : null;
    renderUsage();
  }

  function renderUsage() {
    var tb = clearBody($('wallet-usage'));
    if (!current.usageRows.length) emptyRow(tb, 11, 'No usage recorded.');
    current.usageRows.forEach(function (u) {
      var tr = document.createElement('tr');
      tr.setAttribute('data-request', str(u.request_id));
      timeCell(tr, 'when', u.occurred_at);
      cell(tr, 'product', u.product);
      cell(tr, 'model', u.attributes && u.attributes.model ? u.attributes.model : '\u2014');
      cell(tr, 'quantities', pairs(u.quantities));
      cell(tr, 'charged num', u.charged);
      cell(tr, 'asset', u.asset);
      cell(tr, 'refunded num', u.refunded);
      cell(tr, 'revenue num', u.revenue_usd);
      cell(tr, 'cost num', u.cost_usd);
      cell(tr, 'plan', u.plan ? str(u.plan) + ' v' + str(u.plan_version) : '');
      var td = document.createElement('td');
      var b = document.createElement('button');
      b.type = 'button';
      b.className = 'refund small-button';
      b.textContent = 'Refund';
      b.setAttribute('aria-label', 'Refund the event ' + str(u.request_id));
      b.addEventListener('click', function () {
        $('refund-event').value = str(u.request_id);
        // What is left to refund: the charge minus what was refunded, exactly.
        var left = subtractDecimals(u.charged, u.refunded || '0');
        $('refund-amount').value = left === null ? str(u.charged) : left;
        $('refund-amount').focus();
        say('Refund form filled with event ' + str(u.request_id));
      });
      td.appendChild(b);
      tr.appendChild(td);
      tb.appendChild(tr);
    });
    $('usage-more').disabled = !current.usageCursor;
  }

  function renderTopups(rows) {
    var tb = clearBody($('wallet-topups'));
    if (!rows.length) emptyRow(tb, 6, 'No top-up requests.');
    rows.forEach(function (t) {
      var tr = document.createElement('tr');
      timeCell(tr, 'when', t.at);
      cell(tr, 'event', t.event);
      cell(tr, 'asset', t.asset);
      cell(tr, 'amount num', t.amount);
      cell(tr, 'trigger num', t.trigger);
      cell(tr, 'payment-method', t.payment_method);
      tb.appendChild(tr);
    });
  }

  function renderTransactions(rows) {
    var tb = clearBody($('wallet-transactions'));
    if (!rows.length) emptyRow(tb, 7, 'No journal entries.');
    rows.forEach(function (t) {
      var tr = document.createElement('tr');
      timeCell(tr, 'when', t.at);
      cell(tr, 'kind', t.kind);
      cell(tr, 'asset', t.asset);
      cell(tr, 'amount num', t.amount);
      cell(tr, 'from', t.from);
      cell(tr, 'to', t.to);
      cell(tr, 'grant num', t.grant_id);
      tb.appendChild(tr);
    });
  }

  function need(input, what) {
    var v = input.value.trim();
    if (!v) { input.focus(); throw new Error('Enter ' + what + '.'); }
    return v;
  }

  function decimalField(input, what) {
    var v = need(input, what);
    if (!parseDecimal(v)) { input.focus(); throw new Error(what.charAt(0).toUpperCase() + what.slice(1) + ' must be a decimal number such as 5.00.'); }
    return v;
  }

  /*
   * One Idempotency-Key per intended action: kept (per button) until the action succeeds, so a
   * retry after a lost answer or an error is the same action, never a second grant; editing
   * the form makes it a new one.
   */
  var actionKeys = {};
  document.addEventListener('input', function (ev) {
    var form = ev.target && ev.target.form;
    var submit = form && form.querySelector('button[type=submit]');
    if (submit && submit.id) delete actionKeys[submit.id];
  });

  /** Runs one wallet action, then re-reads the wallet. */
  function walletAction(button, action) {
    return busy(button, async function () {
      var id = button.id || '';
      var key = actionKeys[id] || newIdempotencyKey();
      if (id) actionKeys[id] = key;
      var done = await action(key);
      if (id) delete actionKeys[id];
      say(done, 'ok');
      await reloadWallet();
    });
  }

  function initWallet() {
    $('grant-form').addEventListener('submit', function (ev) {
      ev.preventDefault();
      walletAction($('grant-submit'), async function (idem) {
        var asset = need($('grant-asset'), 'an asset');
        var amount = decimalField($('grant-amount'), 'an amount');
        await api('POST', walletPath('/grants'), { asset: asset, amount: amount }, { idem: idem });
        $('grant-amount').value = '';
        return 'Granted ' + amount + ' ' + asset + ' to ' + current.id;
      });
    });
    $('adjust-form').addEventListener('submit', function (ev) {
      ev.preventDefault();
      walletAction($('adjust-submit'), async function (idem) {
        var asset = need($('adjust-asset'), 'an asset');
        var amount = decimalField($('adjust-amount'), 'an amount');
        var reason = need($('adjust-reason'), 'a reason');
        await api('POST', walletPath('/adjustments'), { asset: asset, amount: amount, reason: reason }, { idem: idem });
        $('adjust-amount').value = '';
        $('adjust-reason').value = '';
        return 'Adjusted ' + current.id + ' by ' + amount + ' ' + asset;
      });
    });
    $('refund-form').addEventListener('submit', function (ev) {
      ev.preventDefault();
      walletAction($('refund-submit'), async function (idem) {
        var event = need($('refund-event'), 'the event to refund');
        var amount = $('refund-amount').value.trim();
        var body = { event: event };
        if (amount) body.amount = decimalField($('refund-amount'), 'an amount');
        await api('POST', walletPath('/refunds'), body, { idem: idem });
        $('refund-event').value = '';
        $('refund-amount').value = '';
        return 'Refunded ' + (amount || 'what was left of') + ' event ' + event;
      });
    });
    $('freeze').addEventListener('click', function () {
      walletAction($('freeze'), async function (idem) {
        await api('POST', walletPath('/freeze'), {}, { idem: idem });
        return current.id + ' is frozen';
      });
    });
    $('unfreeze').addEventListener('click', function () {
      walletAction($('unfreeze'), async function (idem) {
        await api('POST', walletPath('/unfreeze'), {}, { idem: idem });
        return current.id + ' is no longer frozen';
      });
    });
    $('portal-open').addEventListener('click', function () {
      busy($('portal-open'), async function () {
        var r = (await api('POST', '/v1/portal/sessions', { wallet: current.id })) || {};
        var p = clear($('portal-url'));
        var a = link(str(r.url), str(r.url));
        a.target = '_blank';
        a.rel = 'noopener noreferrer';
        p.appendChild(document.createTextNode('One-time link' +
          (r.token_expires_at ? ' (valid until ' + str(r.token_expires_at) + ')' : '') + ': '));
        p.appendChild(a);
        say('Portal link created for ' + current.id, 'ok');
      });
    });
    $('usage-more').addEventListener('click', function () {
      busy($('usage-more'), function () { return loadUsage(current.seq, true); });
    });
  }

  // ---------------------------------------------------------------- margins

  var margins = { ran: false, seq: 0 };

  function enterMargins() {
    defaultPeriod($('margin-from'), $('margin-to'));
    syncMarginKey();
    if (!margins.ran) runMargins().catch(sayError);
  }

  function syncMarginKey() {
    var metadata = $('margin-group').value === 'metadata';
    $('margin-key').disabled = !metadata;
    $('margin-key').required = metadata;
  }

  async function runMargins() {
    var period = readPeriod($('margin-from'), $('margin-to'));
    var group = $('margin-group').value;
    var groupBy = group;
    if (group === 'metadata') {
      var key = $('margin-key').value.trim();
      if (!key) { $('margin-key').focus(); throw new Error('Enter the metadata key to group by.'); }
      groupBy = 'metadata:' + key;
    }
    var seq = ++margins.seq;
    margins.ran = true;
    var q = new URLSearchParams();
    q.set('group_by', groupBy);
    q.set('from', period.range.from);
    q.set('to', period.range.to);
    q.set('order', 'margin');
    q.set('limit', '100');
    var days = new URLSearchParams();
    days.set('group_by', 'day');
    days.set('from', period.range.from);
    days.set('to', period.range.to);
    days.set('order', 'key');
    days.set('limit', '10000');
    var table = $('margin-table');
    table.setAttribute('aria-busy', 'true');
    try {
      var answers = await Promise.all([
        api('GET', '/v1/analytics/margin?' + q.toString()),
        api('GET', '/v1/analytics/margin?' + days.toString())
      ]);
      if (seq !== margins.seq) return;
      $('margin-group-name').textContent = group === 'metadata' ? 'metadata ' + groupBy.slice(9) : $('margin-group').selectedOptions[0].textContent.toLowerCase();
      renderMargins((answers[0] && answers[0].data) || []);
      drawChart((answers[1] && answers[1].data) || [], period);
      say('Margins from ' + period.fromDay + ' to ' + period.toDay + ' (UTC)', 'ok');
    } finally {
      if (seq === margins.seq) table.removeAttribute('aria-busy');
    }
  }

  function renderMargins(groups) {
    var tb = clearBody($('margin-table'));
    if (!groups.length) emptyRow(tb, 6, 'No usage in this period.');
    groups.forEach(function (g) {
      var tr = document.createElement('tr');
      tr.setAttribute('data-key', str(g.key));
      var negative = isNegative(g.margin_usd);
      if (negative) tr.className = 'loss';
      var th = headerCell(tr, 'key', '');
      var group = $('margin-group').value;
      if (group === 'wallet') th.appendChild(link('#/wallets/' + encodeURIComponent(str(g.key)), str(g.key)));
      else th.textContent = str(g.key);
      cell(tr, 'events num', g.events);
      cell(tr, 'revenue num', g.revenue_usd);
      cell(tr, 'cost num', g.cost_usd);
      cell(tr, 'refunded num', g.refunded_usd);
      var m = cell(tr, 'margin num', g.margin_usd);
      if (negative) {
        var note = document.createElement('span');
        note.className = 'visually-hidden';
        note.textContent = ' (a loss)';
        // Kept outside the .margin text: the cell reads exactly the API's string.
        th.appendChild(note);
        m.title = 'A loss';
      }
      tb.appendChild(tr);
    });
  }

  function svg(name, attrs, parent) {
    var el = document.createElementNS(SVG_NS, name);
    Object.keys(attrs || {}).forEach(function (k) { el.setAttribute(k, String(attrs[k])); });
    if (parent) parent.appendChild(el);
    return el;
  }

  function svgText(parent, attrs, text) {
    var t = svg('text', attrs, parent);
    t.textContent = text;
    return t;
  }

  var SERIES = [
    { field: 'revenue_usd', name: 'Revenue', cls: 'series-revenue' },
    { field: 'cost_usd', name: 'Cost', cls: 'series-cost' },
    { field: 'margin_usd', name: 'Margin', cls: 'series-margin' }
  ];

  /** Grouped bars per UTC day of the period: revenue, cost and margin (USD). */
  function drawChart(rows, period) {
    var figure = clear($('margin-chart'));
    var byDay = {};
    rows.forEach(function (r) { byDay[str(r.key).slice(0, 10)] = r; });
    var days = [];
    for (var d = period.fromDay; d <= period.toDay && days.length < 366; d = addDays(d, 1)) days.push(d);

    // Pixel geometry only: Number() of the API's strings. Labels keep the strings.
    var maxV = 0, minV = 0, maxS = '0', minS = '0';
    days.forEach(function (day) {
      var r = byDay[day];
      if (!r) return;
      SERIES.forEach(function (s) {
        var v = Number(r[s.field]);
        if (!isFinite(v)) return;
        if (v > maxV) { maxV = v; maxS = str(r[s.field]); }
        if (v < minV) { minV = v; minS = str(r[s.field]); }
      });
    });

    var W = 720, H = 300;
    var left = 64, right = 12, top = 40, bottom = 48;
    var plotW = W - left - right, plotH = H - top - bottom;
    var span = (maxV - minV) || 1;
    function y(v) { return top + (maxV - v) / span * plotH; }

    var titleId = 'margin-chart-title', descId = 'margin-chart-desc';
    var root = svg('svg', {
      viewBox: '0 0 ' + W + ' ' + H, width: W, height: H, role: 'img',
      'aria-labelledby': titleId + ' ' + descId, 'class': 'margin-svg'
    });
    var title = svg('title', { id: titleId }, root);
    title.textContent = 'Revenue, cost and margin per day (USD), ' + period.fromDay + ' to ' + period.toDay + ' (UTC)';
    var desc = svg('desc', { id: descId }, root);
    var withData = days.filter(function (day) { return byDay[day]; });
    desc.textContent = withData.length
      ? withData.map(function (day) {
        var r = byDay[day];
        return day + ': revenue ' + str(r.revenue_usd) + ', cost ' + str(r.cost_usd) + ', margin ' + str(r.margin_usd);
      }).join('; ')
      : 'No usage in this period.';

    // Legend.
    var legend = svg('g', { 'class': 'legend' }, root);
    SERIES.forEach(function (s, i) {
      var x = left + i * 110;
      svg('rect', { x: x, y: 12, width: 12, height: 12, 'class': s.cls }, legend);
      svgText(legend, { x: x + 18, y: 22, 'class': 'legend-text' }, s.name);
    });

    // Axes: zero line, and the extremes labelled with the API's own strings.
    var axis = svg('g', { 'class': 'axis' }, root);
    svg('line', { x1: left, x2: W - right, y1: y(0), y2: y(0), 'class': 'zero' }, axis);
    svg('line', { x1: left, x2: left, y1: top, y2: top + plotH, 'class': 'y-axis' }, axis);
    svgText(axis, { x: left - 6, y: y(0) + 4, 'text-anchor': 'end', 'class': 'tick' }, '0');
    if (maxV > 0) {
      svg('line', { x1: left, x2: W - right, y1: y(maxV), y2: y(maxV), 'class': 'grid' }, axis);
      svgText(axis, { x: left - 6, y: y(maxV) + 4, 'text-anchor': 'end', 'class': 'tick' }, maxS);
    }
    if (minV < 0) {
      svg('line', { x1: left, x2: W - right, y1: y(minV), y2: y(minV), 'class': 'grid' }, axis);
      svgText(axis, { x: left - 6, y: y(minV) + 4, 'text-anchor': 'end', 'class': 'tick' }, minS);
    }
    svgText(axis, { x: 14, y: top + plotH / 2, 'class': 'axis-label', 'text-anchor': 'middle',
      transform: 'rotate(-90 14 ' + (top + plotH / 2) + ')' }, 'USD');

    var slot = plotW / Math.max(days.length, 1);
    var barW = Math.max(1, Math.min(18, (slot - 4) / 3));
    var every = Math.max(1, Math.ceil(days.length / 10)); // at most ~10 day labels
    var bars = svg('g', { 'class': 'bars' }, root);
    days.forEach(function (day, i) {
      var x0 = left + i * slot + (slot - barW * 3) / 2;
      var r = byDay[day];
      if (r) {
        SERIES.forEach(function (s, j) {
          var v = Number(r[s.field]);
          if (!isFinite(v)) return;
          var y1 = y(Math.max(v, 0)), y2 = y(Math.min(v, 0));
          var rect = svg('rect', {
            x: (x0 + j * barW).toFixed(2), y: y1.toFixed(2), width: barW.toFixed(2),
            height: Math.max(0.5, y2 - y1).toFixed(2), 'class': s.cls + (v < 0 ? ' negative' : '')
          }, bars);
          var t = svg('title', {}, rect);
          t.textContent = day + ' ' + s.name.toLowerCase() + ': ' + str(r[s.field]) + ' USD';
        });
      }
      if (i % every === 0 || i === days.length - 1) {
        svgText(axis, { x: (left + i * slot + slot / 2).toFixed(2), y: H - bottom + 18,
          'text-anchor': 'middle', 'class': 'tick day' }, day.slice(5));
      }
    });
    svgText(axis, { x: left + plotW / 2, y: H - 8, 'text-anchor': 'middle', 'class': 'axis-label' },
      'Day (UTC, month-day), ' + period.fromDay.slice(0, 4));
    figure.appendChild(root);
    var caption = document.createElement('figcaption');
    caption.className = 'hint small';
    caption.textContent = withData.length
      ? 'Bars per day: revenue, cost, margin (below the zero line: a loss). Hover or focus a bar for its value.'
      : 'No usage in this period.';
    figure.appendChild(caption);
  }

  function initMargins() {
    $('margin-group').addEventListener('change', syncMarginKey);
    $('margin-form').addEventListener('submit', function (ev) {
      ev.preventDefault();
      busy($('margin-run'), runMargins);
    });
  }

  // ---------------------------------------------------------------- pricing

  var pricing = { plans: [], selected: null, savedRules: null, refill: false, seq: 0 };

  function enterPricing(plan) {
    defaultPeriod($('test-from'), $('test-to'));
    loadPlans(plan).catch(sayError);
  }

  async function loadPlans(select) {
    var seq = ++pricing.seq;
    var r = (await api('GET', '/v1/plans')) || {};
    if (seq !== pricing.seq) return;
    pricing.plans = r.data || [];
    renderPlans();
    selectPlan(select === undefined ? pricing.selected : select);
  }

  /**
   * The draft's rules. The contract says `draft` is the rules array; an object
   * `{"asset", "rules", ...}` (the shape of a version) is read too.
   */
  function draftRules(p) {
    if (!p.draft) return null;
    if (Array.isArray(p.draft)) return p.draft;
    return Array.isArray(p.draft.rules) ? p.draft.rules : null;
  }

  function draftAsset(p) {
    return p.draft && !Array.isArray(p.draft) && p.draft.asset ? p.draft.asset : p.asset;
  }

  function latestVersion(p) {
    var v = p.versions || [];
    return v.length ? v[v.length - 1] : null;
  }

  function renderPlans() {
    var tb = clearBody($('plan-list'));
    if (!pricing.plans.length) emptyRow(tb, 5, 'No plans yet: create one with PUT /v1/plans/{plan}/draft.');
    pricing.plans.forEach(function (p) {
      var tr = document.createElement('tr');
      tr.setAttribute('data-plan', str(p.plan));
      var th = headerCell(tr, 'plan', '');
      var a = link('#/pricing/' + encodeURIComponent(str(p.plan)), str(p.plan));
      a.setAttribute('aria-label', 'Select the plan ' + str(p.plan));
      th.appendChild(a);
      cell(tr, 'custom-for', p.custom_for ? p.custom_for : '\u2014');
      cell(tr, 'asset', p.asset);
      var latest = latestVersion(p);
      cell(tr, 'version num', latest ? latest.version : 'none');
      cell(tr, 'draft', p.draft ? 'yes' : 'no');
      if (pricing.selected === p.plan) tr.classList.add('selected');
      tb.appendChild(tr);
    });
  }

  function selectPlan(name) {
    var p = null;
    pricing.plans.forEach(function (x) { if (x.plan === name) p = x; });
    var changed = pricing.selected !== (p ? p.plan : null);
    pricing.selected = p ? p.plan : null;
    $('plan-detail').hidden = !p;
    Array.prototype.forEach.call(document.querySelectorAll('#plan-list tr[data-plan]'), function (tr) {
      var on = tr.getAttribute('data-plan') === pricing.selected;
      tr.classList.toggle('selected', on);
      var a = tr.querySelector('a');
      if (a) { if (on) a.setAttribute('aria-current', 'true'); else a.removeAttribute('aria-current'); }
    });
    if (!p) {
      if (name) say('No plan named ' + name + '.', 'error');
      return;
    }
    $('plan-name').textContent = p.plan;
    var latest = latestVersion(p);
    $('plan-summary').textContent = 'Prices in ' + str(p.asset) +
      (p.custom_for ? ', custom plan of ' + str(p.custom_for) : '') + '; ' +
      (latest ? 'latest version ' + latest.version : 'not published yet') + '; ' +
      (p.draft ? 'has a draft.' : 'no draft.');
    var box = clear($('plan-versions'));
    var versions = (p.versions || []).slice().reverse();
    if (!versions.length) {
      var none = document.createElement('p');
      none.className = 'hint';
      none.textContent = 'No published version.';
      box.appendChild(none);
    }
    versions.forEach(function (v, i) {
      var details = document.createElement('details');
      details.className = 'version';
      details.setAttribute('data-version', str(v.version));
      if (i === 0) details.open = true;
      var summary = document.createElement('summary');
      summary.textContent = 'Version ' + str(v.version) + (i === 0 ? ' (latest)' : '');
      var pre = document.createElement('pre');
      pre.tabIndex = 0;
      pre.textContent = JSON.stringify(v.rules || [], null, 2);
      details.appendChild(summary);
      details.appendChild(pre);
      box.appendChild(details);
    });
    var rules = draftRules(p) || (latest ? latest.rules : []);
    var text = JSON.stringify(rules || [], null, 2);
    // Keep edits in progress when the same plan is re-read; refill on a change of plan.
    if (changed || pricing.refill || $('draft-rules').value === pricing.savedRules || !$('draft-rules').value) {
      $('draft-rules').value = text;
    }
    pricing.savedRules = text;
    pricing.refill = false;
    $('draft-publish').disabled = !p.draft;
    if (changed) {
      emptyRow(clearBody($('test-table')), 9, 'No test run yet.');
      clear($('test-table').tFoot || $('test-table').createTFoot());
      $('test-summary').textContent = '';
    }
  }

  function selectedPlan() {
    var p = null;
    pricing.plans.forEach(function (x) { if (x.plan === pricing.selected) p = x; });
    if (!p) throw new Error('Select a plan first.');
    return p;
  }

  async function saveDraft() {
    var p = selectedPlan();
    var rules;
    try {
      rules = JSON.parse($('draft-rules').value);
    } catch (e) {
      $('draft-rules').focus();
      throw new Error('The rules are not valid JSON: ' + e.message);
    }
    if (!Array.isArray(rules)) {
      $('draft-rules').focus();
      throw new Error('The rules must be a JSON array of rules.');
    }
    var body = { asset: draftAsset(p) || (latestVersion(p) || {}).asset, rules: rules };
    if (p.custom_for) body.custom_for = p.custom_for;
    await api('PUT', '/v1/plans/' + encodeURIComponent(p.plan) + '/draft', body);
    pricing.refill = true; // show the server's copy of what was saved
    await loadPlans(p.plan);
    say('Draft of ' + p.plan + ' saved', 'ok');
  }

  async function publishDraft() {
    var p = selectedPlan();
    var r = (await api('POST', '/v1/plans/' + encodeURIComponent(p.plan) + '/publish', {})) || {};
    await loadPlans(p.plan);
    say('Published ' + p.plan + ' version ' + str(r.version), 'ok');
  }

  function testRow(tr, row) {
    cell(tr, 'events num', row.events);
    cell(tr, 'current-revenue num', row.revenue_current_usd);
    cell(tr, 'draft-revenue num', row.revenue_draft_usd);
    var diff = subtractDecimals(row.revenue_draft_usd, row.revenue_current_usd);
    var d = cell(tr, 'difference num', diff === null ? '\u2014' : diff);
    if (diff !== null && isNegative(diff)) d.classList.add('negative');
    cell(tr, 'cost num', row.cost_usd);
    var cm = cell(tr, 'current-margin num', row.margin_current_usd);
    if (isNegative(row.margin_current_usd)) cm.classList.add('negative');
    var dm = cell(tr, 'draft-margin num', row.margin_draft_usd);
    if (isNegative(row.margin_draft_usd)) dm.classList.add('negative');
    cell(tr, 'unpriced num', str(row.unpriced_current === undefined ? 0 : row.unpriced_current) + ' / ' +
      str(row.unpriced_draft === undefined ? 0 : row.unpriced_draft));
  }

  async function testDraft() {
    var p = selectedPlan();
    var period = readPeriod($('test-from'), $('test-to'));
    var unsaved = $('draft-rules').value !== pricing.savedRules;
    var r = (await api('POST', '/v1/plans/' + encodeURIComponent(p.plan) + '/draft/test',
      { from: period.range.from, to: period.range.to })) || {};
    var table = $('test-table');
    var tb = clearBody(table);
    var rows = r.wallets || [];
    if (!rows.length) emptyRow(tb, 9, 'No usage of this plan in the period.');
    rows.forEach(function (row) {
      var tr = document.createElement('tr');
      tr.setAttribute('data-wallet', str(row.wallet));
      var th = headerCell(tr, 'wallet', '');
      th.appendChild(link('#/wallets/' + encodeURIComponent(str(row.wallet)), str(row.wallet)));
      testRow(tr, row);
      tb.appendChild(tr);
    });
    var foot = clear(table.tFoot || table.createTFoot());
    if (r.total) {
      var tr = document.createElement('tr');
      tr.id = 'test-total';
      headerCell(tr, 'wallet', 'Total');
      testRow(tr, r.total);
      foot.appendChild(tr);
    }
    $('test-summary').textContent = 'The draft of ' + str(r.plan || p.plan) + ' against ' +
      (r.current_version === null || r.current_version === undefined ? 'no published version' : 'version ' + r.current_version) +
      ', usage from ' + period.fromDay + ' to ' + period.toDay + ' (UTC).';
    say(unsaved ? 'Tested the saved draft: your unsaved edits are not included.' : 'Draft tested', unsaved ? 'error' : 'ok');
  }

  function initPricing() {
    $('draft-form').addEventListener('submit', function (ev) {
      ev.preventDefault();
      busy($('draft-save'), saveDraft);
    });
    $('draft-publish').addEventListener('click', function () {
      busy($('draft-publish'), publishDraft);
    });
    $('test-form').addEventListener('submit', function (ev) {
      ev.preventDefault();
      busy($('draft-test'), testDraft);
    });
  }

  // ---------------------------------------------------------------- start

  function start() {
    $('signin-form').addEventListener('submit', function (ev) {
      ev.preventDefault();
      busy($('signin-submit'), signIn);
    });
    $('signout').addEventListener('click', function () { busy($('signout'), signOut); });
    if (!SIGNED_IN) {
      showSignin('');
      return;
    }
    $('signin').hidden = true;
    $('app-nav').hidden = false;
    initWallets();
    initWallet();
    initMargins();
    initPricing();
    window.addEventListener('hashchange', function () { say(''); showRoute(true); });
    if (!location.hash || location.hash === '#' || location.hash === '#/') {
      history.replaceState(null, '', '#/wallets');
    }
    showRoute(false);
  }

  if (document.readyState === 'loading') {
    document.addEventListener('DOMContentLoaded', start);
  } else {
    start();
  }
})();
