//! tally-python: the native half of tally's Python package (the module `tally._native`).
//!
//! It wraps [`tally_client::Client`] (QUIC with the pinned certificate, automatic batching of
//! concurrent usage and reserve calls, retries with the same request id, reconnects) behind a
//! deliberately small bridge: a request goes in and its answer comes out as JSON text in the
//! engine's own serde shapes (the shapes `tally plan draft --file` reads), so the typed Python
//! layer (`tally/_client.py`) names the operations and turns amounts into `decimal.Decimal`
//! without a second schema in Rust. Decimals stay strings on both sides; no float is involved.
//!
//! Every operation has a blocking entry point ([`NativeClient::call`], which releases the GIL
//! while it waits, so Python threads share one client) and an asyncio one
//! ([`NativeClient::call_async`], an awaitable). Both run on one tokio runtime per process,
//! created on first use, so a process that forks before it makes a client (a pre-forking server)
//! is safe.
//!
//! Failures become the exception classes of `tally.errors`, built by its `_from_native` factory:
//! this crate decides the kind and the code, Python owns the classes.
//!
//! What it deliberately does not do: retry on its own (the Rust client's retry budget is the only
//! one), choose request ids or times (the caller does, so a repeat is the same request), or know
//! anything about LiteLLM.

use std::sync::OnceLock;
use std::time::Duration;

use pyo3::exceptions::PyRuntimeError;
use pyo3::prelude::*;
use serde_json::{json, Value};
use tally_client::{Client, ClientConfig, Error};
use tally_engine::{Command, Name, Query, Request, ResultCode};
use tally_net::message::{ReserveItem, Scope, WalletInfo};
use tally_net::{Answer, ErrorCode};

/// Worker threads of the process's tokio runtime: the client's work per call is small (encode,
/// decode, a QUIC packet), and Python holds most of the CPU.
const RUNTIME_WORKERS: usize = 2;

static RUNTIME: OnceLock<tokio::runtime::Runtime> = OnceLock::new();

/// The process's runtime, built on first use and shared with `pyo3-async-runtimes`.
fn runtime() -> PyResult<&'static tokio::runtime::Runtime> {
    if let Some(rt) = RUNTIME.get() {
        return Ok(rt);
    }
    let built = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(RUNTIME_WORKERS)
        .thread_name("tally-client")
        .enable_all()
        .build()
        .map_err(|e| PyRuntimeError::new_err(format!("cannot start the tokio runtime: {e}")))?;
    // Another thread may have won the race; its runtime is the one.
    let _ = RUNTIME.set(built);
    let rt = RUNTIME.get().expect("the runtime was just set");
    // Fails only if it was already given this same runtime.
    let _ = pyo3_async_runtimes::tokio::init_with_runtime(rt);
    Ok(rt)
}

/// One operation, checked and decoded before anything is sent.
#[derive(Debug)]
enum Call {
    Command(Request),
    Reserve(ReserveItem),
    Query(Query),
    Health,
    Session,
    KeyCreate { label: Name, scope: Scope },
    KeyRevoke(u64),
    Snapshot,
}

/// Why a call failed before it reached the client: bad input from Python.
#[derive(Debug)]
struct InputError(String);

fn parse<T: serde::de::DeserializeOwned>(body: &str, what: &str) -> Result<T, InputError> {
    serde_json::from_str(body).map_err(|e| InputError(format!("{what}: {e}")))
}

impl Call {
    fn decode(op: &str, body: &str) -> Result<Call, InputError> {
        Ok(match op {
            "command" => {
                let request: Request = parse(body, "not a tally request")?;
                match request.command {
                    Command::Reserve {
                        wallet,
                        amount,
                        deadline,
                    } => Call::Reserve(ReserveItem {
                        id: request.id,
                        wallet,
                        amount,
                        deadline,
                    }),
                    _ => Call::Command(request),
                }
            }
            "query" => Call::Query(parse(body, "not a tally query")?),
            "health" => Call::Health,
            "session" => Call::Session,
            "key_create" => {
                #[derive(serde::Deserialize)]
                struct KeyCreate {
                    label: Name,
                    scope: String,
                }
                let k: KeyCreate = parse(body, "not a key creation")?;
                let scope = match k.scope.as_str() {
                    "gateway" => Scope::Gateway,
                    "admin" => Scope::Admin,
                    other => {
                        return Err(InputError(format!(
                            "scope {other:?} is neither \"gateway\" nor \"admin\""
                        )))
                    }
                };
                Call::KeyCreate {
                    label: k.label,
                    scope,
                }
            }
            "key_revoke" => Call::KeyRevoke(parse(body, "not a key id")?),
            "snapshot" => Call::Snapshot,
            other => return Err(InputError(format!("unknown operation {other:?}"))),
        })
    }

    /// Sends the call and renders the answer as JSON text.
    async fn execute(self, client: Client) -> Result<String, Error> {
        let value = match self {
            Call::Command(request) => reply_json(client.command(request).await?),
            Call::Reserve(item) => reply_json(client.reserve(item).await?),
            Call::Query(query) => answer_json(&client.query(query).await?),
            Call::Health => {
                let h = client.health().await?;
                json!({
                    "shards": h.shards,
                    "shards_running": h.shards_running,
                    "uptime_us": h.uptime_us,
                    "connections_open": h.connections_open,
                    "rejected_unauthenticated": h.rejected_unauthenticated,
                    "rejected_key": h.rejected_key,
                    "rejected_scope": h.rejected_scope,
                    "server": h.server,
                })
            }
            Call::Session => {
                let s = client.session().await?;
                json!({
                    "key_id": s.key_id,
                    "scope": scope_name(s.scope),
                    "in_flight_max": s.in_flight_max,
                    "batch_items_max": s.batch_items_max,
                })
            }
            Call::KeyCreate { label, scope } => {
                let (key_id, secret) = client.create_key(label, scope).await?;
                json!({ "key_id": key_id, "secret": secret })
            }
            Call::KeyRevoke(key_id) => {
                client.revoke_key(key_id).await?;
                json!({})
            }
            Call::Snapshot => {
                let infos = client.snapshot().await?;
                Value::Array(
                    infos
                        .iter()
                        .map(|c| {
                            json!({
                                "shard": c.shard,
                                "lsn": c.lsn,
                                "digest": c.digest,
                                "stall_us": c.stall_us,
                            })
                        })
                        .collect(),
                )
            }
        };
        Ok(value.to_string())
    }
}

fn scope_name(scope: Scope) -> &'static str {
    match scope {
        Scope::Gateway => "gateway",
        Scope::Admin => "admin",
    }
}

fn to_value<T: serde::Serialize>(value: &T) -> Value {
    // The engine's reply and view types are plain data with string decimals: they always
    // serialize.
    serde_json::to_value(value).expect("engine types serialize to JSON")
}

fn reply_json(reply: tally_engine::Reply) -> Value {
    json!({ "code": reply.code.name(), "value": to_value(&reply.value) })
}

fn wallet_json(w: &WalletInfo) -> Value {
    json!({
        "wallet": w.wallet,
        "frozen": w.frozen,
        "topup_flagged": w.topup_flagged,
        "metadata": w.metadata,
        "balances": to_value(&w.balances),
        "grants": to_value(&w.grants),
        "holds": w.holds.iter().map(|h| json!({
            "id": h.id.0,
            "asset": h.asset,
            "amount": h.amount.to_string(),
            "deadline": h.deadline.0,
        })).collect::<Vec<_>>(),
        "plans": w.plans,
        "topup_rules": to_value(&w.topup_rules),
        "margin": to_value(&w.margin),
    })
}

fn answer_json(answer: &Answer) -> Value {
    match answer {
        Answer::Wallet(w) => json!({ "Wallet": wallet_json(w) }),
        Answer::Balance(b) => json!({ "Balance": to_value(b) }),
        Answer::Margin(m) => json!({ "Margin": to_value(m) }),
        Answer::Price(p) => json!({ "Price": to_value(p) }),
        Answer::DraftTest(r) => json!({ "DraftTest": to_value(r) }),
        Answer::Asset(a) => json!({ "Asset": to_value(a) }),
        Answer::Plans(p) => json!({ "Plans": to_value(p) }),
    }
}

/// Builds the `tally.errors` exception for a failure (the factory picks the class).
fn raise(
    py: Python<'_>,
    kind: &str,
    code: Option<u16>,
    name: &str,
    message: String,
    reply: Option<String>,
) -> PyErr {
    let made = py
        .import("tally.errors")
        .and_then(|m| m.getattr("_from_native"))
        .and_then(|f| f.call1((kind, code, name, message.clone(), reply)));
    match made {
        Ok(exception) => PyErr::from_value(exception),
        // The package is broken (tally.errors missing): still say what happened.
        Err(e) => {
            PyRuntimeError::new_err(format!("{kind}: {message} (and tally.errors failed: {e})"))
        }
    }
}

fn client_error(py: Python<'_>, error: Error) -> PyErr {
    let message = error.to_string();
    match error {
        Error::Rejected { code, reply } => {
            let reply = reply.map(|r| reply_json(r).to_string());
            raise(
                py,
                "rejected",
                Some(code as u16),
                code.name(),
                message,
                reply,
            )
        }
        Error::Transport { code, .. } => raise(
            py,
            "transport",
            Some(code as u16),
            code.name(),
            message,
            None,
        ),
        Error::Connect(_) => raise(py, "connect", None, "Connect", message, None),
        Error::ConnectionLost(_) => {
            raise(py, "connection_lost", None, "ConnectionLost", message, None)
        }
        Error::Protocol(_) => raise(py, "protocol", None, "Protocol", message, None),
        Error::Config(_) => raise(py, "config", None, "Config", message, None),
    }
}

fn input_error(py: Python<'_>, error: InputError) -> PyErr {
    raise(py, "input", None, "InvalidInput", error.0, None)
}

/// One client: a logical connection to a tally server, shared by every thread and task that
/// holds it.
#[pyclass(frozen, module = "tally._native")]
#[derive(Debug)]
struct NativeClient {
    client: Client,
}

#[pymethods]
impl NativeClient {
    /// Connects (QUIC, the pinned certificate from `cert`, hello, auth); blocks without the GIL.
    #[new]
    #[pyo3(signature = (addr, cert, api_key, *, retry_for, connect_timeout, batch_max))]
    fn new(
        py: Python<'_>,
        addr: &str,
        cert: &str,
        api_key: &str,
        retry_for: f64,
        connect_timeout: f64,
        batch_max: usize,
    ) -> PyResult<NativeClient> {
        let seconds = |s: f64, what: &str| {
            Duration::try_from_secs_f64(s).map_err(|_| {
                input_error(
                    py,
                    InputError(format!("{what} must be a number of seconds >= 0, not {s}")),
                )
            })
        };
        let mut config =
            ClientConfig::from_files(addr, cert, api_key).map_err(|e| client_error(py, e))?;
        config.retry_for = seconds(retry_for, "retry_for")?;
        config.connect_timeout = seconds(connect_timeout, "connect_timeout")?;
        if batch_max == 0 {
            return Err(input_error(
                py,
                InputError("batch_max must be at least 1".into()),
            ));
        }
        config.batch_max = batch_max;
        let rt = runtime()?;
        let client = py
            .detach(|| rt.block_on(Client::connect(config)))
            .map_err(|e| client_error(py, e))?;
        Ok(NativeClient { client })
    }

    /// Runs one operation and waits for its answer (JSON text), without the GIL.
    fn call(&self, py: Python<'_>, op: &str, body: &str) -> PyResult<String> {
        let call = Call::decode(op, body).map_err(|e| input_error(py, e))?;
        let rt = runtime()?;
        let client = self.client.clone();
        py.detach(|| rt.block_on(call.execute(client)))
            .map_err(|e| client_error(py, e))
    }

    /// Runs one operation; returns an awaitable of its answer (JSON text).
    fn call_async<'py>(
        &self,
        py: Python<'py>,
        op: &str,
        body: &str,
    ) -> PyResult<Bound<'py, PyAny>> {
        let call = Call::decode(op, body).map_err(|e| input_error(py, e))?;
        runtime()?;
        let client = self.client.clone();
        pyo3_async_runtimes::tokio::future_into_py(py, async move {
            match call.execute(client).await {
                Ok(text) => Ok(text),
                Err(e) => Err(Python::attach(|py| client_error(py, e))),
            }
        })
    }

    /// Closes the connection (later calls connect again).
    fn close(&self, py: Python<'_>) -> PyResult<()> {
        let rt = runtime()?;
        let client = self.client.clone();
        py.detach(|| rt.block_on(client.close()));
        Ok(())
    }
}

/// Every result code as `(number, name)`, in number order.
#[pyfunction]
fn result_codes() -> Vec<(u16, &'static str)> {
    ResultCode::ALL
        .iter()
        .map(|c| (*c as u16, c.name()))
        .collect()
}

/// Every transport code as `(number, name)`, in number order.
#[pyfunction]
fn error_codes() -> Vec<(u16, &'static str)> {
    ErrorCode::ALL
        .iter()
        .map(|c| (*c as u16, c.name()))
        .collect()
}

/// The version of the Rust client inside.
#[pyfunction]
fn client_version() -> &'static str {
    tally_client::CLIENT_NAME
}

#[pymodule]
fn _native(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_class::<NativeClient>()?;
    m.add_function(wrap_pyfunction!(result_codes, m)?)?;
    m.add_function(wrap_pyfunction!(error_codes, m)?)?;
    m.add_function(wrap_pyfunction!(client_version, m)?)?;
    Ok(())
}
