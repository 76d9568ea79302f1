"""Fixtures: a real `tally serve` child process per test session (and fresh ones for restart
tests), an admin client, and a priced catalog.

The binary is $TALLY_BIN, or target/debug/tally of this repository (scripts/python-tests builds
it). Each server gets a temporary data directory, free loopback ports (asked of the kernel with
port 0, then read back from the "serving" line on stderr) and its own admin key; it is stopped
with SIGTERM when the fixture ends, and must exit 0.
"""

from __future__ import annotations

import os
import secrets
import signal
import subprocess
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from decimal import Decimal
from pathlib import Path

import pytest

# LiteLLM (imported by the tests and the hook) reads its cost map from the package, never the
# network; set before anything imports it.
os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")

import tally  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]
ASSET = "USD"
PRODUCT = "chat"
PLAN = "std"
#: Prices of the "std" plan, USD per token (the asset's scale is 10).
INPUT_PRICE = Decimal("0.000003")
OUTPUT_PRICE = Decimal("0.000012")


def tally_bin() -> str:
    path = os.environ.get("TALLY_BIN") or str(ROOT / "target" / "debug" / "tally")
    if not os.access(path, os.X_OK):
        pytest.exit(f"no tally binary at {path}: build it (cargo build --bin tally) or set TALLY_BIN", 2)
    return path


@dataclass
class Server:
    """A `tally serve` child process on a data directory."""

    data: Path
    admin_key: str = field(default_factory=lambda: "pytest-admin-" + secrets.token_hex(16))
    quic: str = "127.0.0.1:0"
    http: str = "127.0.0.1:0"
    process: subprocess.Popen[str] | None = None
    log: list[str] = field(default_factory=list)
    _drain: threading.Thread | None = None

    @property
    def cert(self) -> str:
        return str(self.data / "tls" / "cert.pem")

    def start(self, timeout: float = 60.0) -> Server:
        """Starts the server and waits for its "serving" line; later starts reuse the ports."""
        env = {k: v for k, v in os.environ.items() if k != "TALLY_API_KEY"}
        env["TALLY_ADMIN_KEY"] = self.admin_key
        self.process = subprocess.Popen(
            [tally_bin(), "serve", "--data-dir", str(self.data), "--shards", "2",
             "--listen", self.quic, "--http-listen", self.http],
            env=env, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
        )
        assert self.process.stderr is not None
        deadline = time.monotonic() + timeout
        while True:
            line = self.process.stderr.readline()
            if not line:
                raise RuntimeError("tally serve exited before serving:\n" + "".join(self.log))
            self.log.append(line)
            if "serving" in line and "QUIC on " in line:
                # "... QUIC on 127.0.0.1:PORT (ALPN tally/1), HTTP on 127.0.0.1:PORT ..."
                self.quic = line.split("QUIC on ")[1].split()[0]
                self.http = line.split("HTTP on ")[1].split()[0].rstrip(",;")
                break
            if time.monotonic() > deadline:
                raise RuntimeError("tally serve did not start in time:\n" + "".join(self.log))
        stderr = self.process.stderr
        self._drain = threading.Thread(target=lambda: self.log.extend(iter(stderr.readline, "")), daemon=True)
        self._drain.start()
        return self

    def stop(self) -> int:
        """SIGTERM, then waits; returns the exit status."""
        assert self.process is not None
        self.process.send_signal(signal.SIGTERM)
        status = self.process.wait(timeout=30)
        if self._drain is not None:
            self._drain.join(timeout=5)
        self.process = None
        return status

    def kill(self) -> None:
        """SIGKILL: a crash, nothing flushed that was not durable already."""
        assert self.process is not None
        self.process.kill()
        self.process.wait(timeout=30)
        self.process = None

    def client(self, api_key: str | None = None, **options: float) -> tally.Client:
        return tally.Client(self.quic, self.cert, api_key or self.admin_key, **options)  # type: ignore[arg-type]

    async def async_client(self, api_key: str | None = None, **options: float) -> tally.AsyncClient:
        return await tally.AsyncClient.connect(self.quic, self.cert, api_key or self.admin_key, **options)  # type: ignore[arg-type]


def prepare_catalog(admin: tally.Client) -> None:
    """USD at scale 10, the product "chat" (input and output tokens) and the published plan "std"."""
    admin.define_asset(ASSET, 10, usd_value=1)
    admin.define_product(PRODUCT, ["input_tokens", "output_tokens"])
    admin.draft_plan(PLAN, ASSET, [tally.per_unit_rule(PRODUCT, {"input_tokens": INPUT_PRICE, "output_tokens": OUTPUT_PRICE})])
    admin.publish_plan(PLAN)


def open_wallet(admin: tally.Client, credit: Decimal | str, *, prefix: str = "w") -> str:
    """A new wallet on plan std (version 1, from an hour ago) with a promotion grant."""
    wallet = f"{prefix}-{secrets.token_hex(6)}"
    admin.create_wallet(wallet)
    admin.assign_plan(wallet, PLAN, 1, effective_from=int((time.time() - 3600) * 1_000_000))
    if Decimal(credit) > 0:
        admin.grant(wallet, ASSET, credit)
    return wallet


@pytest.fixture(scope="session")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    srv = Server(tmp_path_factory.mktemp("tally") / "data").start()
    with srv.client() as admin:
        prepare_catalog(admin)
    yield srv
    assert srv.stop() == 0, "".join(srv.log[-50:])


@pytest.fixture
def fresh_server(tmp_path: Path) -> Iterator[Server]:
    """A server of the test's own (restart tests)."""
    srv = Server(tmp_path / "data").start()
    with srv.client() as admin:
        prepare_catalog(admin)
    yield srv
    if srv.process is not None:
        assert srv.stop() == 0, "".join(srv.log[-50:])


@pytest.fixture
def admin(server: Server) -> Iterator[tally.Client]:
    with server.client() as client:
        yield client
