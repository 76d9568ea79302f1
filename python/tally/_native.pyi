"""Type stubs of the native module (Rust, PyO3): the bridge under tally.Client and tally.AsyncClient.

Operations and their bodies are JSON text in the engine's serde shapes; answers come back as
JSON text. Failures raise the classes of tally.errors.
"""

from collections.abc import Awaitable
from typing import final

@final
class NativeClient:
    def __init__(
        self,
        addr: str,
        cert: str,
        api_key: str,
        *,
        retry_for: float,
        connect_timeout: float,
        batch_max: int,
    ) -> None:
        """Connects (QUIC, the pinned certificate, hello, auth), without holding the GIL."""

    def call(self, op: str, body: str) -> str:
        """Runs one operation (command, query, health, session, key_create, key_revoke,
        snapshot) and returns its answer as JSON text; releases the GIL while it waits."""

    def call_async(self, op: str, body: str) -> Awaitable[str]:
        """The same, as an awaitable."""

    def close(self) -> None:
        """Closes the connection; later calls connect again."""

def result_codes() -> list[tuple[int, str]]:
    """Every engine result code as (number, name)."""

def error_codes() -> list[tuple[int, str]]:
    """Every transport error code as (number, name)."""

def client_version() -> str:
    """The Rust client's name and version, e.g. tally-client/0.1.0."""
