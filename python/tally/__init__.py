"""tally: a Python client for tally, the prepaid wallet and billing engine, and its LiteLLM hook.

```python
from decimal import Decimal
import tally

client = tally.Client("127.0.0.1:7400", "tally-data/tls/cert.pem", api_key)
hold = client.reserve("acme", product="chat", quantities={"input_tokens": 900, "output_tokens": 512},
                      attributes={"model": "gpt-4o"})
charge = client.settle("acme", hold.hold, "chat", {"input_tokens": 912, "output_tokens": 301},
                       attributes={"model": "gpt-4o"}, cost_usd=Decimal("0.0041"))
```

:class:`Client` blocks (and is thread-safe); :class:`AsyncClient` is the same API for asyncio.
Both run the Rust client (QUIC, pinned certificate, batching, retries with the same request id).
Failures are the exceptions of :mod:`tally.errors`. The LiteLLM proxy hook is
:mod:`tally.litellm`. The guide is docs/gateways.md.
"""

from . import errors
from ._client import (
    TOPUP_PRIORITY,
    Amount,
    AsyncClient,
    Client,
    RequestId,
    Time,
    new_request_id,
    per_unit_rule,
)
from ._native import client_version
from ._types import (
    Balance,
    Charge,
    Checkpoint,
    GrantAdded,
    GrantInfo,
    Health,
    HoldInfo,
    HoldPlaced,
    Margin,
    PlanAssignment,
    Price,
    Refunded,
    Session,
    Wallet,
)
from .errors import InsufficientFunds, InvalidInput, Rejected, TallyError, TransportError, Unavailable

__all__ = [
    "errors",
    "Client",
    "AsyncClient",
    "Amount",
    "Time",
    "RequestId",
    "TOPUP_PRIORITY",
    "new_request_id",
    "per_unit_rule",
    "client_version",
    "Balance",
    "Charge",
    "Checkpoint",
    "GrantAdded",
    "GrantInfo",
    "Health",
    "HoldInfo",
    "HoldPlaced",
    "Margin",
    "PlanAssignment",
    "Price",
    "Refunded",
    "Session",
    "Wallet",
    "TallyError",
    "Rejected",
    "InsufficientFunds",
    "TransportError",
    "Unavailable",
    "InvalidInput",
]
