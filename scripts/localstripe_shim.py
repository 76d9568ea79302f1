"""Runs localstripe (a fake, stateful Stripe server) for tally's tests, closer to real Stripe.

    python localstripe_shim.py --port PORT

Started by scripts/localstripe, which installs the pinned localstripe into a venv first. This
module imports localstripe's aiohttp application and changes it in place before serving it:

1. It listens on 127.0.0.1 only, and keeps its state in memory only: localstripe itself binds
   every interface and loads/saves its whole store from/to /tmp/localstripe.pickle, so two runs
   (or two tests running side by side) would share state.
2. It replays a repeated `Idempotency-Key` on POST like Stripe: the first response is stored
   (per API key, method, path and key) and returned again, without executing the request again,
   with `Idempotent-Replayed: true`; the same key with other parameters gets Stripe's 400
   `idempotency_error`. Concurrent requests with one key run one after the other, so the second
   is a replay. As in Stripe, a request that failed validation (400, 404) stores nothing.
3. It completes PaymentIntent (and Charge) objects, wherever they are exported (responses,
   lists, errors, webhook events), with the fields that async-stripe 1.0 requires to
   deserialize them, and makes error bodies look like Stripe's (card errors are `card_error`
   with a `decline_code` and the PaymentIntent, unknown URLs and crashes answer JSON). Creating
   a PaymentIntent with confirm=true&off_session=true for a card that needs authentication
   fails like Stripe's (402 `authentication_required`) instead of localstripe's
   `requires_action`.
4. It adds what tally needs to find PaymentIntents again: `GET /v1/payment_intents?customer=`
   and a small `GET /v1/payment_intents/search?query=` (metadata/customer/status/currency/amount
   clauses joined by AND).
5. Webhook events get `pending_webhooks` and `request` ({id, idempotency_key}) like Stripe's, and
   creating a refund through the API sends `refund.created` and `charge.refunded`.

The rest is localstripe's: see its resources.py for the test cards it knows.
"""

import argparse
import asyncio
import collections
import contextvars
import hashlib
import itertools
import json
import logging
import re
import secrets
import urllib.parse

from aiohttp import web

from localstripe import resources, server, webhooks
from localstripe.errors import UserError
from localstripe.resources import Charge, Event, PaymentIntent, Refund, store

log = logging.getLogger("localstripe.shim")

# How many idempotency keys are remembered; the oldest finished ones are forgotten first.
# (Stripe keeps keys for 24 hours; a test run never comes near this many.)
MAX_IDEMPOTENCY_KEYS = 100_000
# Stripe rejects longer keys.
MAX_IDEMPOTENCY_KEY_LENGTH = 255


# --- 1. Memory only -------------------------------------------------------------------------

# localstripe's Store writes the whole store to /tmp/localstripe.pickle on every change and its
# `main` loads it back on start: disabled, so the state of a run dies with its process.
resources.Store.try_load_from_disk = lambda self: None
resources.Store.dump_to_disk = lambda self: None


# --- Request context, for webhook events -----------------------------------------------------

# The request being handled, so that the events it causes can name it like Stripe's `request`
# field does ({id, idempotency_key}); events created outside any request have None.
_current_request = contextvars.ContextVar("current_request", default=None)


def json_response(body, status=200, headers=None):
    # Same formatting as localstripe's own responses.
    return web.Response(
        text=json.dumps(body, indent=2, sort_keys=True) + "\n",
        status=status,
        content_type="application/json",
        headers=headers,
    )


def stripe_error(status, error_type, message, **fields):
    return json_response({"error": {"type": error_type, "message": message, **fields}}, status)


# --- 2. Idempotency keys ----------------------------------------------------------------------


class _Entry:
    """One idempotency key: the parameters it was first used with and, once the request has
    finished, the response to replay. The lock makes a concurrent request with the same key wait
    for the first one instead of executing too."""

    def __init__(self):
        self.fingerprint = None  # None until a request claims the key
        self.lock = asyncio.Lock()
        self.response = None  # (status, content_type, body bytes) once stored


_idempotency = collections.OrderedDict()  # scope tuple -> _Entry, oldest first


def _params_fingerprint(request, body):
    """A digest of the request's parameters, independent of the order of distinct form fields
    (repeated fields, i.e. lists, keep their order), so that equal requests compare equal."""
    if request.content_type == "application/x-www-form-urlencoded":
        pairs = urllib.parse.parse_qsl(body.decode("utf-8", "replace"), keep_blank_values=True)
        canonical = json.dumps(sorted(pairs, key=lambda kv: kv[0]))
    elif request.content_type == "application/json" and body:
        try:
            canonical = json.dumps(json.loads(body), sort_keys=True)
        except ValueError:
            canonical = body.decode("utf-8", "replace")
    else:
        canonical = body.decode("utf-8", "replace")
    return hashlib.sha256(canonical.encode("utf-8")).hexdigest()


def _forget_old_keys():
    # The oldest first, finished ones only: a running request's entry has waiters on its lock.
    excess = len(_idempotency) - MAX_IDEMPOTENCY_KEYS
    if excess > 0:
        for scope in list(itertools.islice(_idempotency, excess)):
            if not _idempotency[scope].lock.locked():
                del _idempotency[scope]


def _replay(entry, key):
    status, content_type, body = entry.response
    return web.Response(
        body=body,
        status=status,
        content_type=content_type,
        headers={"Idempotency-Key": key, "Idempotent-Replayed": "true"},
    )


@web.middleware
async def request_context_middleware(request, handler):
    """Outermost: gives every request a Stripe-like id (also sent as `Request-Id`) and records
    it, with the idempotency key, for the events the request causes."""
    request_id = "req_" + secrets.token_hex(7)
    token = _current_request.set(
        {
            "id": request_id,
            "idempotency_key": request.headers.get("Idempotency-Key"),
            "stripe_version": request.headers.get("Stripe-Version"),
        }
    )
    try:
        response = await handler(request)
    finally:
        _current_request.reset(token)
    response.headers["Request-Id"] = request_id
    return response


@web.middleware
async def idempotency_middleware(request, handler):
    """Stripe's idempotent requests, for POST (GET and DELETE are idempotent anyway)."""
    key = request.headers.get("Idempotency-Key")
    if request.method != "POST" or key is None:
        return await handler(request)
    if not key or len(key) > MAX_IDEMPOTENCY_KEY_LENGTH:
        return stripe_error(
            400,
            "invalid_request_error",
            f"Invalid Idempotency-Key: it must be 1 to {MAX_IDEMPOTENCY_KEY_LENGTH} characters.",
        )

    # Keys belong to an API key (Stripe: to an account); the method and path are part of the
    # scope too, so one key on two endpoints is two entries.
    scope = (request.headers.get("Authorization", ""), request.method, request.path, key)
    # read() caches the body, so localstripe can still parse it afterwards.
    fingerprint = _params_fingerprint(request, await request.read())

    entry = _idempotency.get(scope)
    if entry is None:
        entry = _idempotency[scope] = _Entry()
        _forget_old_keys()

    async with entry.lock:
        # Checked under the lock: a request waiting for another with the same key learns how
        # that one ended before it decides.
        if entry.fingerprint is None:
            entry.fingerprint = fingerprint
        elif entry.fingerprint != fingerprint:
            # Stripe's error for this case.
            return stripe_error(
                400,
                "idempotency_error",
                "Keys for idempotent requests can only be used with the same parameters they "
                f"were first used with. Try using a key other than '{key}' if you meant to "
                "execute a different request.",
            )
        if entry.response is not None:
            log.info("idempotency key %r: replaying the stored response", key)
            return _replay(entry, key)
        try:
            response = await handler(request)
        except BaseException:
            entry.fingerprint = None  # nothing to replay: the key is free again
            raise
        # Like Stripe, stored once the endpoint has executed: a success, or a card error (402,
        # e.g. a decline, after which the PaymentIntent exists). Other errors (localstripe
        # validates everything before it changes anything: 400, 404; 401; 5xx when localstripe
        # crashed) leave the key free, so a retry, even with other parameters, runs again.
        if (response.status < 400 or response.status == 402) and response.body is not None:
            entry.response = (response.status, response.content_type, bytes(response.body))
        else:
            entry.fingerprint = None
        response.headers["Idempotency-Key"] = key
        return response


# --- 3. Complete PaymentIntents and Stripe-shaped errors --------------------------------------


def _payment_method_type(pm_id):
    # Read the store directly: PaymentMethod._api_retrieve would create a new object for the
    # special test ids (pm_card_visa, ...) on every call.
    pm = store.get("payment_method:" + pm_id) if isinstance(pm_id, str) else None
    return getattr(pm, "type", None) or "card"


# Error code -> the `decline_code` Stripe gives with it for localstripe's declining test cards.
_DECLINE_CODES = {
    "card_declined": "generic_decline",
    "authentication_required": "authentication_required",
}


def _complete_payment_intent(obj, expand):
    """Adds to an exported PaymentIntent (a dict) what async-stripe requires or expects."""
    status = obj.get("status")
    # Required by async-stripe (i64): what can still be captured; only a manual-capture
    # PaymentIntent waiting for capture has any.
    obj.setdefault("amount_capturable", obj["amount"] if status == "requires_capture" else 0)
    # Required by async-stripe (i64): what was collected; all of it once succeeded
    # (localstripe has no partial capture amount to show).
    obj.setdefault("amount_received", obj["amount"] if status == "succeeded" else 0)
    # Required by async-stripe (enum): Stripe's default, localstripe has no manual confirmation.
    obj.setdefault("confirmation_method", "automatic")
    # Required by async-stripe (Vec<String>): localstripe does not keep the request's list;
    # the payment method's type is what Stripe would show.
    obj.setdefault("payment_method_types", [_payment_method_type(obj.get("payment_method"))])
    # localstripe exports the whole Charge here; Stripe sends its id unless expanded, and
    # async-stripe would try (and fail) to read localstripe's Charge as a full Charge object.
    charge = obj.get("latest_charge")
    if isinstance(charge, dict) and "latest_charge" not in expand:
        obj["latest_charge"] = charge["id"]
    # `charges` was removed from PaymentIntents in API version 2022-11-15.
    obj.pop("charges", None)
    error = obj.get("last_payment_error")
    if isinstance(error, dict):
        # Required by async-stripe (ApiErrors.type): a declined card is a `card_error`, a failed
        # 3-D Secure authentication an `invalid_request_error`, as in Stripe.
        if error.get("code") == "payment_intent_authentication_failure":
            error.setdefault("type", "invalid_request_error")
        else:
            error.setdefault("type", "card_error")
        # Stripe's reason for the decline (localstripe's test cards decline for no other reason).
        if error.get("code") in _DECLINE_CODES:
            error.setdefault("decline_code", _DECLINE_CODES[error["code"]])
        # Stripe names the payment method type that failed.
        error.setdefault("payment_method_type", obj["payment_method_types"][0])
    return obj


_original_pi_export = PaymentIntent._export


def _export_payment_intent(self, expand=None):
    obj = _original_pi_export(self, expand=expand)
    return _complete_payment_intent(obj, expand or [])


# Every PaymentIntent export goes through here: API responses, lists, search results, the
# PaymentIntent in a card error and webhook events alike.
PaymentIntent._export = _export_payment_intent


_original_charge_export = Charge._export


def _export_charge(self, expand=None):
    # A Charge is sent whole in `charge.refunded` events and with expand[]=latest_charge.
    obj = _original_charge_export(self, expand=expand)
    # Required by async-stripe's Charge (i64): what was captured.
    captured = obj.get("captured") and obj.get("paid")
    obj.setdefault("amount_captured", obj["amount"] if captured else 0)
    # Required by async-stripe's Charge: every field of it is optional.
    obj.setdefault("billing_details", {})
    # Required by async-stripe's Charge (bool): localstripe has no disputes.
    obj.setdefault("disputed", False)
    return obj


Charge._export = _export_charge


_original_pi_init = PaymentIntent.__init__


def _init_payment_intent(self, description=None, payment_method_types=None, **kwargs):
    # localstripe refuses these two creation parameters ("Unexpected ..."); Stripe accepts them.
    if description is not None and not isinstance(description, str):
        raise UserError(400, "Bad request")
    if payment_method_types is not None and not (
        isinstance(payment_method_types, list)
        and payment_method_types
        and all(isinstance(t, str) for t in payment_method_types)
    ):
        raise UserError(400, "Bad request")
    _original_pi_init(self, **kwargs)
    self.description = description
    if payment_method_types is not None:
        self.payment_method_types = payment_method_types


PaymentIntent.__init__ = _init_payment_intent

_original_pi_create = PaymentIntent._api_create.__func__


def _create_payment_intent(cls, confirm=None, off_session=None, **data):
    """Stripe's off-session confirmation of a card that needs authentication (3-D Secure): no
    customer is there to authenticate, so instead of localstripe's `requires_action` (which
    Stripe never returns with off_session=true) the payment fails with a 402
    `authentication_required` card error, and the PaymentIntent, with a failed charge, is back
    to `requires_payment_method` (and `payment_intent.payment_failed` is sent)."""
    pi = _original_pi_create(cls, confirm=confirm, off_session=off_session, **data)
    if resources.try_convert_to_bool(off_session) is True and pi.status == "requires_action":
        pi.next_action = None
        charge = Charge(
            amount=pi.amount,
            currency=pi.currency,
            customer=pi.customer,
            source=pi.payment_method,
            capture=(pi.capture_method != "manual"),
        )
        charge.payment_intent = pi.id
        charge._set_auth_failure()
        charge.failure_code = "authentication_required"
        charge.failure_message = "Your card was declined. This transaction requires authentication."
        pi.latest_charge = charge
        pi._report_failure()  # sends the event and raises the 402 with the charge's failure
    return pi


PaymentIntent._api_create = classmethod(_create_payment_intent)


def _error_for_charge(error):
    """Adds to a localstripe card error that names a failed charge what Stripe adds when a
    PaymentIntent confirmation fails: the PaymentIntent itself (with its id and status)."""
    if not isinstance(error.get("charge"), str):
        return
    charge = store.get("charge:" + error["charge"])
    if charge is None:
        return
    if charge.payment_intent:
        pi = store.get("payment_intent:" + charge.payment_intent)
        if pi is not None:
            exported = error["payment_intent"] = pi._export()
            error.setdefault("payment_method_type", exported["payment_method_types"][0])


@web.middleware
async def stripe_errors_middleware(request, handler):
    """Makes error responses look like Stripe's, which async-stripe parses into
    StripeError::Stripe(ApiErrors, status) (a body it cannot parse becomes a vague
    JSONDeserialize error)."""
    try:
        response = await handler(request)
    except web.HTTPException as e:
        if e.status < 400:
            raise
        # aiohttp's own 404/405 (an unknown URL or method) answer plain text.
        message = f"Unrecognized request URL ({request.method}: {request.path})."
        return stripe_error(e.status, "invalid_request_error", message)
    except Exception:
        log.exception("localstripe failed on %s %s", request.method, request.path_qs)
        return stripe_error(
            500,
            "api_error",
            f"localstripe failed on {request.method} {request.path} (see its log).",
        )

    if response.status < 400 or response.content_type != "application/json":
        return response
    try:
        body = json.loads(response.body)
        error = body["error"]
        assert isinstance(error, dict)
    except (ValueError, TypeError, KeyError, AssertionError):
        return response
    if response.status == 402:
        # localstripe says `invalid_request_error` for every error; Stripe's 402s are card errors.
        error["type"] = "card_error"
        if error.get("code") in _DECLINE_CODES:
            error.setdefault("decline_code", _DECLINE_CODES[error["code"]])
        _error_for_charge(error)
    elif response.status == 404:
        error.setdefault("code", "resource_missing")
    return json_response(body, response.status)


# --- 4. Finding PaymentIntents ----------------------------------------------------------------


def _list_payment_intents(cls, url, customer=None, limit=None, starting_after=None, **kwargs):
    """GET /v1/payment_intents, newest first, with Stripe's `customer` filter (localstripe's
    list takes no filter at all)."""
    if kwargs:
        raise UserError(400, "Unexpected " + ", ".join(kwargs.keys()))
    if customer is not None and not (isinstance(customer, str) and customer.startswith("cus_")):
        raise UserError(400, "Bad request")
    li = resources.List(url, limit=limit, starting_after=starting_after)
    li._list = [
        value
        for key, value in reversed(list(store.items()))
        if key.startswith("payment_intent:") and (customer is None or value.customer == customer)
    ]
    return li


PaymentIntent._api_list_all = classmethod(_list_payment_intents)

# One clause of Stripe's search query language: field:'value', field:number or
# metadata['key']:'value' (quotes may be escaped with a backslash).
_CLAUSE = re.compile(
    r"""\s*(?:metadata\[(?P<mq>["'])(?P<mkey>(?:\\.|(?!(?P=mq)).)*)(?P=mq)\]|(?P<field>[a-z_]+))"""
    r"""\s*:\s*(?:(?P<vq>["'])(?P<value>(?:\\.|(?!(?P=vq)).)*)(?P=vq)|(?P<number>-?\d+))\s*$"""
)
_SEARCH_FIELDS = ("customer", "status", "currency", "amount")


def _unescape(s):
    return re.sub(r"\\(.)", r"\1", s)


def _parse_search_query(query):
    """Returns a predicate on PaymentIntents, or raises UserError for what it does not support."""
    if not isinstance(query, str) or not query.strip():
        raise UserError(400, "Missing required param: query.", {"param": "query"})
    if re.search(r"\sOR\s", query):
        raise UserError(400, "localstripe shim: OR is not supported in search queries.")
    tests = []
    for clause in re.split(r"\s+AND\s+", query.strip()):
        m = _CLAUSE.match(clause)
        if m is None:
            raise UserError(
                400,
                f"localstripe shim: unsupported search clause {clause!r} (supported: "
                "metadata['KEY']:'VALUE', customer:'ID', status:'STATUS', currency:'CUR', "
                "amount:N, joined by AND).",
                {"param": "query"},
            )
        value = _unescape(m["value"]) if m["value"] is not None else m["number"]
        if m["mkey"] is not None:
            key = _unescape(m["mkey"])
            tests.append(lambda pi, k=key, v=value: (pi.metadata or {}).get(k) == v)
        elif m["field"] in _SEARCH_FIELDS:
            field = m["field"]
            tests.append(lambda pi, f=field, v=value: str(getattr(pi, f, None)) == v)
        else:
            raise UserError(
                400,
                f"localstripe shim: search field {m['field']!r} is not supported "
                f"(supported: metadata, {', '.join(_SEARCH_FIELDS)}).",
                {"param": "query"},
            )
    return lambda pi: all(test(pi) for test in tests)


def _search_payment_intents(params):
    """GET /v1/payment_intents/search, newest first. Unlike Stripe's search, which can lag
    writes by up to a minute, this one sees every PaymentIntent at once. `page` is an offset."""
    matches = _parse_search_query(params.get("query"))
    limit = resources.try_convert_to_int(params.get("limit", 10))
    page = params.get("page")
    offset = resources.try_convert_to_int(page) if page is not None else 0
    if not (isinstance(limit, int) and 1 <= limit <= 100) or not (
        isinstance(offset, int) and offset >= 0
    ):
        raise UserError(400, "Bad request")
    found = [
        value
        for key, value in reversed(list(store.items()))
        if key.startswith("payment_intent:") and matches(value)
    ]
    expand = params.get("expand")
    items = found[offset : offset + limit]
    has_more = offset + limit < len(found)
    return {
        "object": "search_result",
        "url": "/v1/payment_intents/search",
        "data": [pi._export(expand=_strip_data_prefix(expand)) for pi in items],
        "has_more": has_more,
        "next_page": str(offset + limit) if has_more else None,
        "total_count": len(found),
    }


def _strip_data_prefix(expand):
    # Stripe's search and list take `expand[]=data.latest_charge`.
    if not expand:
        return None
    expand = expand if isinstance(expand, list) else [expand]
    return [e[len("data.") :] if e.startswith("data.") else e for e in expand]


@web.middleware
async def search_middleware(request, handler):
    """Innermost, so after localstripe's authentication: serves the search endpoint, which the
    router sends to GET /v1/payment_intents/{id} (registered first, it takes `search` as an id)."""
    if request.method == "GET" and request.path == "/v1/payment_intents/search":
        return json_response(_search_payment_intents(server.unflatten_data(request.query)))
    return await handler(request)


# --- 5. Webhook events ----------------------------------------------------------------------

_original_event_init = Event.__init__


def _init_event(self, type, data):
    _original_event_init(self, type, data)
    info = _current_request.get()
    # Required by async-stripe's Event (i64): the endpoints this event is (to be) sent to.
    self.pending_webhooks = sum(
        1 for w in webhooks._webhooks.values() if w.events is None or type in w.events
    )
    # Stripe's link from an event to the API request that caused it; its idempotency key lets
    # a webhook handler match the event to the request it sent.
    self.request = (
        {"id": info["id"], "idempotency_key": info["idempotency_key"]} if info else None
    )
    # Rendered with the objects' current shape: name the version the client asked for.
    if info and info["stripe_version"]:
        self.api_version = info["stripe_version"]


Event.__init__ = _init_event

_original_refund_create = Refund._api_create.__func__


def _create_refund(cls, **data):
    # localstripe sends no event for refunds; Stripe sends these two (among others).
    refund = _original_refund_create(cls, **data)
    webhooks.schedule_webhook(Event("refund.created", refund))
    webhooks.schedule_webhook(Event("charge.refunded", Charge._api_retrieve(refund.charge)))
    return refund


Refund._api_create = classmethod(_create_refund)


# --- Serving ----------------------------------------------------------------------------------


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--port", type=int, required=True)
    args = parser.parse_args()

    # Like localstripe's main: the access log and webhook deliveries (logged on aiohttp.access).
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")

    app = server.app
    # localstripe's own middlewares are [error, auth, save store]; the first listed is the
    # outermost. Ours wrap them: the request context, then idempotency (so a replay is the
    # finished, Stripe-shaped response), then the error shaping; search runs inside auth.
    for position, middleware in enumerate(
        (request_context_middleware, idempotency_middleware, stripe_errors_middleware)
    ):
        app.middlewares.insert(position, middleware)
    app.middlewares.append(search_middleware)

    web.run_app(
        app,
        host="127.0.0.1",
        port=args.port,
        access_log=logging.getLogger("aiohttp.access"),
        # Stopping is quick: a test stops the server when it is done with it.
        shutdown_timeout=1,
        print=lambda *a: log.info("listening on http://127.0.0.1:%d", args.port),
    )


if __name__ == "__main__":
    main()
