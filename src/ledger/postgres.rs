//! The PostgreSQL sink: ledger entries as rows, one table per entry type, inserted in batches
//! and deduplicated on the entry id.
//!
//! The sink connects lazily (on [`PostgresSink::connect_and_migrate`] or the first delivery),
//! keeps one connection, and drops it after any error, so the next delivery reconnects. A
//! database that is down makes a delivery fail with [`SinkError::Retryable`] within the
//! connect timeout; nothing panics and nothing waits longer than the delivery timeout.
//!
//! Each delivery is one transaction: `INSERT … SELECT * FROM UNNEST(…) ON CONFLICT (id) DO
//! NOTHING` per table, so a batch lands whole or not at all, and a batch delivered again
//! (at-least-once delivery after a crash) adds no rows.
//!
//! # Schema
//!
//! Created on connect, idempotently, under a transaction-scoped advisory lock (several gateways
//! may share one database); applied migrations are listed in `tollgate_schema_version`.
//! Amounts are `numeric` (exact, unbounded); token counts and durations are `bigint` (values
//! beyond `i64::MAX` are stored as `i64::MAX`); enums are their snake_case JSON names.
//!
//! `tollgate_usage`, one row per metered request ([`UsageRecord`]):
//!
//! | column | type | null | notes |
//! |---|---|---|---|
//! | `id` | `uuid` | no | primary key; the record's UUIDv7 |
//! | `timestamp` | `timestamptz` | no | when the request arrived |
//! | `key_id` | `text` | no | the client key's configured id |
//! | `account` | `text` | no | |
//! | `model` | `text` | yes | |
//! | `upstream` | `text` | no | |
//! | `endpoint` | `text` | no | `chat_completions`, `messages`, `outcomes`, … |
//! | `streamed` | `boolean` | no | |
//! | `status` | `integer` | no | HTTP status |
//! | `outcome` | `text` | no | `completed`, `upstream_error`, `cut_off`, … |
//! | `input_tokens` | `bigint` | no | |
//! | `output_tokens` | `bigint` | no | includes `reasoning_tokens` |
//! | `cached_input_tokens` | `bigint` | no | |
//! | `cache_creation_input_tokens` | `bigint` | no | |
//! | `reasoning_tokens` | `bigint` | no | |
//! | `estimated` | `boolean` | no | some figure came from tollgate's tokenizer |
//! | `upstream_ttfb_us` | `bigint` | yes | microseconds |
//! | `upstream_total_us` | `bigint` | no | microseconds |
//! | `feature`, `workflow`, `end_user` | `text` | yes | caller-supplied dimensions |
//! | `cost` | `numeric` | yes | charged, in `unit` |
//! | `rated_cost` | `numeric` | yes | at price-book rates, in `unit` |
//! | `unit` | `text` | yes | `USD`, `credits`, … |
//! | `metric` | `text` | yes | reported outcome's name |
//! | `quantity` | `bigint` | yes | reported outcome's count |
//! | `recorded_at` | `timestamptz` | no | default `now()`: when the row was inserted |
//!
//! Index `tollgate_usage_account_timestamp` on `(account, timestamp)`.
//!
//! `tollgate_grants`, one row per grant added at run time ([`GrantEntry`]):
//!
//! | column | type | null | notes |
//! |---|---|---|---|
//! | `id` | `uuid` | no | primary key; the journal entry's UUIDv7 |
//! | `timestamp` | `timestamptz` | no | |
//! | `account` | `text` | no | |
//! | `grant_id` | `text` | no | the grant's own id |
//! | `amount` | `numeric` | no | in `unit` |
//! | `unit` | `text` | no | |
//! | `kind` | `text` | no | `paid` or `promotional` |
//! | `priority` | `integer` | no | lower is drawn first |
//! | `expires_at` | `timestamptz` | yes | |
//! | `expires_at_period_end` | `boolean` | no | |
//! | `source` | `text` | no | `admin` or `auto_top_up` |
//! | `recorded_at` | `timestamptz` | no | default `now()` |
//!
//! `tollgate_schema_version`: `version integer` primary key, `applied_at timestamptz`.

use std::str::FromStr;
use std::time::Duration;

use chrono::{DateTime, Utc};
use serde::Serialize;
use tokio::sync::Mutex;
use tokio::task::JoinHandle;
use tokio_postgres::{Client, NoTls, Statement};
use uuid::Uuid;

use super::sink::{BoxFuture, Sink, SinkError};
use super::{GrantEntry, LedgerEntry, UsageRecord};
use crate::config::Secret;

/// Default time allowed to open a connection, when the URL sets no `connect_timeout`.
pub const DEFAULT_POSTGRES_CONNECT_TIMEOUT_MS: u64 = 5_000;
/// Default time allowed for one delivery: connecting, migrating and the insert transaction.
pub const DEFAULT_POSTGRES_DELIVERY_TIMEOUT_MS: u64 = 30_000;

/// Key of the advisory lock that serialises schema migrations across gateways
/// (`tollgate` in ASCII).
const MIGRATION_LOCK_KEY: i64 = 0x746f_6c6c_6761_7465;

/// The schema, as numbered migrations applied in order; never edit one that shipped, add one.
const MIGRATIONS: &[(i32, &str)] = &[(
    1,
    "CREATE TABLE IF NOT EXISTS tollgate_usage (
        id uuid PRIMARY KEY,
        timestamp timestamptz NOT NULL,
        key_id text NOT NULL,
        account text NOT NULL,
        model text,
        upstream text NOT NULL,
        endpoint text NOT NULL,
        streamed boolean NOT NULL,
        status integer NOT NULL,
        outcome text NOT NULL,
        input_tokens bigint NOT NULL,
        output_tokens bigint NOT NULL,
        cached_input_tokens bigint NOT NULL,
        cache_creation_input_tokens bigint NOT NULL,
        reasoning_tokens bigint NOT NULL,
        estimated boolean NOT NULL,
        upstream_ttfb_us bigint,
        upstream_total_us bigint NOT NULL,
        feature text,
        workflow text,
        end_user text,
        cost numeric,
        rated_cost numeric,
        unit text,
        metric text,
        quantity bigint,
        recorded_at timestamptz NOT NULL DEFAULT now()
    );
    CREATE INDEX IF NOT EXISTS tollgate_usage_account_timestamp
        ON tollgate_usage (account, timestamp);
    CREATE TABLE IF NOT EXISTS tollgate_grants (
        id uuid PRIMARY KEY,
        timestamp timestamptz NOT NULL,
        account text NOT NULL,
        grant_id text NOT NULL,
        amount numeric NOT NULL,
        unit text NOT NULL,
        kind text NOT NULL,
        priority integer NOT NULL,
        expires_at timestamptz,
        expires_at_period_end boolean NOT NULL,
        source text NOT NULL,
        recorded_at timestamptz NOT NULL DEFAULT now()
    );",
)];

const INSERT_USAGE: &str = "INSERT INTO tollgate_usage (
        id, timestamp, key_id, account, model, upstream, endpoint, streamed, status, outcome,
        input_tokens, output_tokens, cached_input_tokens, cache_creation_input_tokens,
        reasoning_tokens, estimated, upstream_ttfb_us, upstream_total_us,
        feature, workflow, end_user, cost, rated_cost, unit, metric, quantity)
    SELECT * FROM UNNEST(
        $1::uuid[], $2::timestamptz[], $3::text[], $4::text[], $5::text[], $6::text[],
        $7::text[], $8::boolean[], $9::integer[], $10::text[],
        $11::bigint[], $12::bigint[], $13::bigint[], $14::bigint[], $15::bigint[],
        $16::boolean[], $17::bigint[], $18::bigint[],
        $19::text[], $20::text[], $21::text[], $22::text[]::numeric[], $23::text[]::numeric[],
        $24::text[], $25::text[], $26::bigint[])
    ON CONFLICT (id) DO NOTHING";

const INSERT_GRANTS: &str = "INSERT INTO tollgate_grants (
        id, timestamp, account, grant_id, amount, unit, kind, priority, expires_at,
        expires_at_period_end, source)
    SELECT * FROM UNNEST(
        $1::uuid[], $2::timestamptz[], $3::text[], $4::text[], $5::text[]::numeric[],
        $6::text[], $7::text[], $8::integer[], $9::timestamptz[], $10::boolean[], $11::text[])
    ON CONFLICT (id) DO NOTHING";

/// Settings of a [`PostgresSink`].
#[derive(Clone, Debug)]
pub struct PostgresSinkConfig {
    /// libpq-style connection string (`postgres://user:pw@host/db` or `host=… dbname=…`);
    /// it may carry a password, hence a [`Secret`].
    pub url: Secret,
    /// Used when the URL sets no `connect_timeout`.
    pub connect_timeout: Duration,
    /// Bound on one whole delivery.
    pub delivery_timeout: Duration,
}

impl PostgresSinkConfig {
    /// The defaults (`DEFAULT_POSTGRES_*`) with this URL.
    pub fn new(url: Secret) -> Self {
        Self {
            url,
            connect_timeout: Duration::from_millis(DEFAULT_POSTGRES_CONNECT_TIMEOUT_MS),
            delivery_timeout: Duration::from_millis(DEFAULT_POSTGRES_DELIVERY_TIMEOUT_MS),
        }
    }
}

/// Checks a connection string without echoing it (it may hold a password).
pub fn parse_url(url: &str) -> Result<tokio_postgres::Config, String> {
    tokio_postgres::Config::from_str(url)
        .map_err(|e| format!("not a valid PostgreSQL connection string: {e}"))
}

/// An open connection and its statements.
struct Connection {
    client: Client,
    insert_usage: Statement,
    insert_grants: Statement,
    /// Drives the socket; aborted when the connection is dropped.
    _driver: DriverGuard,
}

/// Delivers ledger entries to PostgreSQL. See the module docs for the schema.
pub struct PostgresSink {
    name: String,
    /// The parsed connection settings, or why the URL is unusable (every delivery then fails).
    pg: Result<tokio_postgres::Config, String>,
    delivery_timeout: Duration,
    /// The connection, when one is open; the lock also serialises deliveries.
    conn: Mutex<Option<Connection>>,
}

impl PostgresSink {
    /// A sink that connects on first use; it never fails (an invalid URL makes every delivery
    /// fail with [`SinkError::Rejected`]).
    pub fn new(name: impl Into<String>, config: &PostgresSinkConfig) -> Self {
        let pg = parse_url(config.url.expose()).map(|mut pg| {
            if pg.get_connect_timeout().is_none() {
                pg.connect_timeout(config.connect_timeout);
            }
            pg
        });
        Self {
            name: name.into(),
            pg,
            delivery_timeout: config.delivery_timeout,
            conn: Mutex::new(None),
        }
    }

    /// Connects (unless connected) and creates or migrates the schema. Deliveries do this
    /// themselves; calling it at start surfaces a misconfiguration early.
    pub async fn connect_and_migrate(&self) -> Result<(), SinkError> {
        let mut conn = self.conn.lock().await;
        match tokio::time::timeout(self.delivery_timeout, self.ensure_connected(&mut conn)).await {
            Ok(Ok(_)) => Ok(()),
            Ok(Err(e)) => {
                *conn = None;
                Err(e)
            }
            Err(_) => {
                *conn = None;
                Err(self.timed_out())
            }
        }
    }

    fn timed_out(&self) -> SinkError {
        SinkError::Retryable(format!(
            "postgres sink `{}`: no answer within {} ms",
            self.name,
            self.delivery_timeout.as_millis()
        ))
    }

    async fn ensure_connected<'c>(
        &self,
        slot: &'c mut Option<Connection>,
    ) -> Result<&'c mut Connection, SinkError> {
        if slot.as_ref().is_some_and(|c| c.client.is_closed()) {
            *slot = None;
        }
        if slot.is_none() {
            *slot = Some(self.connect().await?);
        }
        slot.as_mut()
            .ok_or_else(|| SinkError::Retryable("postgres sink: not connected".into()))
    }

    async fn connect(&self) -> Result<Connection, SinkError> {
        let pg = self.pg.as_ref().map_err(|e| {
            SinkError::Rejected(format!("postgres sink `{}`: the URL is {e}", self.name))
        })?;
        let (mut client, connection) = pg
            .connect(NoTls)
            .await
            .map_err(|e| classify(&self.name, "connect", &e))?;
        let name = self.name.clone();
        let driver = tokio::spawn(async move {
            if let Err(e) = connection.await {
                tracing::warn!(sink = %name, error = %error_chain(&e), "postgres connection closed");
            }
        });
        // From here on, an error path drops the guard, which ends the driver task.
        let driver = DriverGuard(driver);
        migrate(&mut client)
            .await
            .map_err(|e| classify(&self.name, "migrate", &e))?;
        let insert_usage = client
            .prepare(INSERT_USAGE)
            .await
            .map_err(|e| classify(&self.name, "prepare", &e))?;
        let insert_grants = client
            .prepare(INSERT_GRANTS)
            .await
            .map_err(|e| classify(&self.name, "prepare", &e))?;
        tracing::info!(sink = %self.name, "postgres sink connected");
        Ok(Connection {
            client,
            insert_usage,
            insert_grants,
            _driver: driver,
        })
    }

    async fn insert(&self, conn: &mut Connection, batch: &[LedgerEntry]) -> Result<(), SinkError> {
        let mut usage = UsageColumns::default();
        let mut grants = GrantColumns::default();
        for entry in batch {
            match entry {
                LedgerEntry::Usage(r) => usage.push(r),
                LedgerEntry::Grant(g) => grants.push(g),
            }
        }
        let tx = conn
            .client
            .transaction()
            .await
            .map_err(|e| classify(&self.name, "begin", &e))?;
        if !usage.id.is_empty() {
            tx.execute(&conn.insert_usage, &usage.params())
                .await
                .map_err(|e| classify(&self.name, "insert usage", &e))?;
        }
        if !grants.id.is_empty() {
            tx.execute(&conn.insert_grants, &grants.params())
                .await
                .map_err(|e| classify(&self.name, "insert grants", &e))?;
        }
        tx.commit()
            .await
            .map_err(|e| classify(&self.name, "commit", &e))
    }
}

/// Aborts a connection's driver task when dropped.
struct DriverGuard(JoinHandle<()>);

impl Drop for DriverGuard {
    fn drop(&mut self) {
        self.0.abort();
    }
}

impl Sink for PostgresSink {
    fn name(&self) -> &str {
        &self.name
    }

    fn deliver<'a>(&'a self, batch: &'a [LedgerEntry]) -> BoxFuture<'a, Result<(), SinkError>> {
        Box::pin(async move {
            if batch.is_empty() {
                return Ok(());
            }
            let mut slot = self.conn.lock().await;
            let attempt = async {
                let conn = self.ensure_connected(&mut slot).await?;
                self.insert(conn, batch).await
            };
            let result = match tokio::time::timeout(self.delivery_timeout, attempt).await {
                Ok(result) => result,
                Err(_) => Err(self.timed_out()),
            };
            if result.is_err() {
                // Whatever went wrong, start from a fresh connection next time; dropping this
                // one rolls back a transaction left open.
                *slot = None;
            }
            result
        })
    }
}

/// Applies the migrations not yet recorded, under an advisory lock, in one transaction.
async fn migrate(client: &mut Client) -> Result<(), tokio_postgres::Error> {
    let tx = client.transaction().await?;
    tx.execute("SELECT pg_advisory_xact_lock($1)", &[&MIGRATION_LOCK_KEY])
        .await?;
    tx.batch_execute(
        "CREATE TABLE IF NOT EXISTS tollgate_schema_version (
            version integer PRIMARY KEY,
            applied_at timestamptz NOT NULL DEFAULT now()
        )",
    )
    .await?;
    let current: i32 = tx
        .query_one(
            "SELECT COALESCE(MAX(version), 0) FROM tollgate_schema_version",
            &[],
        )
        .await?
        .get(0);
    for (version, sql) in MIGRATIONS {
        if *version > current {
            tx.batch_execute(sql).await?;
            tx.execute(
                "INSERT INTO tollgate_schema_version (version) VALUES ($1)",
                &[version],
            )
            .await?;
            tracing::info!(version, "postgres sink schema migrated");
        }
    }
    let known = MIGRATIONS.last().map_or(0, |(v, _)| *v);
    if current > known {
        tracing::warn!(
            current,
            known,
            "postgres sink schema is newer than this tollgate; writing anyway"
        );
    }
    tx.commit().await
}

/// Retryable unless the database refused the data itself (SQLSTATE class 22, data exception,
/// or 23, integrity constraint violation): sending it again cannot help.
fn classify(name: &str, during: &str, e: &tokio_postgres::Error) -> SinkError {
    let message = format!("postgres sink `{name}`: {during}: {}", error_chain(e));
    match e.code().map(|c| c.code()) {
        Some(code) if code.starts_with("22") || code.starts_with("23") => {
            SinkError::Rejected(message)
        }
        _ => SinkError::Retryable(message),
    }
}

/// An error and its sources, `: `-joined (the top-level message alone is vague).
fn error_chain(e: &dyn std::error::Error) -> String {
    let mut out = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        let text = s.to_string();
        if !out.ends_with(&text) {
            out.push_str(": ");
            out.push_str(&text);
        }
        source = s.source();
    }
    out
}

/// An enum's snake_case JSON name.
fn wire_name<T: Serialize>(value: &T) -> String {
    match serde_json::to_value(value) {
        Ok(serde_json::Value::String(s)) => s,
        Ok(other) => other.to_string(),
        Err(e) => format!("<{e}>"),
    }
}

/// A count as `bigint`, saturating (no real count comes near `i64::MAX`).
fn bigint(n: u64) -> i64 {
    i64::try_from(n).unwrap_or(i64::MAX)
}

#[derive(Default)]
struct UsageColumns {
    id: Vec<Uuid>,
    timestamp: Vec<DateTime<Utc>>,
    key_id: Vec<String>,
    account: Vec<String>,
    model: Vec<Option<String>>,
    upstream: Vec<String>,
    endpoint: Vec<String>,
    streamed: Vec<bool>,
    status: Vec<i32>,
    outcome: Vec<String>,
    input_tokens: Vec<i64>,
    output_tokens: Vec<i64>,
    cached_input_tokens: Vec<i64>,
    cache_creation_input_tokens: Vec<i64>,
    reasoning_tokens: Vec<i64>,
    estimated: Vec<bool>,
    upstream_ttfb_us: Vec<Option<i64>>,
    upstream_total_us: Vec<i64>,
    feature: Vec<Option<String>>,
    workflow: Vec<Option<String>>,
    end_user: Vec<Option<String>>,
    cost: Vec<Option<String>>,
    rated_cost: Vec<Option<String>>,
    unit: Vec<Option<String>>,
    metric: Vec<Option<String>>,
    quantity: Vec<Option<i64>>,
}

impl UsageColumns {
    fn push(&mut self, r: &UsageRecord) {
        self.id.push(r.id);
        self.timestamp.push(r.timestamp);
        self.key_id.push(r.key_id.to_string());
        self.account.push(r.account.to_string());
        self.model.push(r.model.clone());
        self.upstream.push(r.upstream.to_string());
        self.endpoint.push(wire_name(&r.endpoint));
        self.streamed.push(r.streamed);
        self.status.push(i32::from(r.status));
        self.outcome.push(wire_name(&r.outcome));
        self.input_tokens.push(bigint(r.usage.input_tokens));
        self.output_tokens.push(bigint(r.usage.output_tokens));
        self.cached_input_tokens
            .push(bigint(r.usage.cached_input_tokens));
        self.cache_creation_input_tokens
            .push(bigint(r.usage.cache_creation_input_tokens));
        self.reasoning_tokens.push(bigint(r.usage.reasoning_tokens));
        self.estimated.push(r.estimated);
        self.upstream_ttfb_us.push(r.upstream_ttfb_us.map(bigint));
        self.upstream_total_us.push(bigint(r.upstream_total_us));
        self.feature.push(r.dimensions.feature.clone());
        self.workflow.push(r.dimensions.workflow.clone());
        self.end_user.push(r.dimensions.end_user.clone());
        self.cost.push(r.cost.map(|d| d.to_string()));
        self.rated_cost.push(r.rated_cost.map(|d| d.to_string()));
        self.unit.push(r.unit.as_deref().map(str::to_string));
        self.metric.push(r.metric.clone());
        self.quantity.push(r.quantity.map(bigint));
    }

    fn params(&self) -> [&(dyn tokio_postgres::types::ToSql + Sync); 26] {
        [
            &self.id,
            &self.timestamp,
            &self.key_id,
            &self.account,
            &self.model,
            &self.upstream,
            &self.endpoint,
            &self.streamed,
            &self.status,
            &self.outcome,
            &self.input_tokens,
            &self.output_tokens,
            &self.cached_input_tokens,
            &self.cache_creation_input_tokens,
            &self.reasoning_tokens,
            &self.estimated,
            &self.upstream_ttfb_us,
            &self.upstream_total_us,
            &self.feature,
            &self.workflow,
            &self.end_user,
            &self.cost,
            &self.rated_cost,
            &self.unit,
            &self.metric,
            &self.quantity,
        ]
    }
}

#[derive(Default)]
struct GrantColumns {
    id: Vec<Uuid>,
    timestamp: Vec<DateTime<Utc>>,
    account: Vec<String>,
    grant_id: Vec<String>,
    amount: Vec<String>,
    unit: Vec<String>,
    kind: Vec<String>,
    priority: Vec<i32>,
    expires_at: Vec<Option<DateTime<Utc>>>,
    expires_at_period_end: Vec<bool>,
    source: Vec<String>,
}

impl GrantColumns {
    fn push(&mut self, g: &GrantEntry) {
        self.id.push(g.id);
        self.timestamp.push(g.timestamp);
        self.account.push(g.account.clone());
        self.grant_id.push(g.grant_id.clone());
        self.amount.push(g.amount.to_string());
        self.unit.push(g.unit.clone());
        self.kind.push(wire_name(&g.kind));
        self.priority.push(g.priority);
        self.expires_at.push(g.expires_at);
        self.expires_at_period_end.push(g.expires_at_period_end);
        self.source.push(wire_name(&g.source));
    }

    fn params(&self) -> [&(dyn tokio_postgres::types::ToSql + Sync); 11] {
        [
            &self.id,
            &self.timestamp,
            &self.account,
            &self.grant_id,
            &self.amount,
            &self.unit,
            &self.kind,
            &self.priority,
            &self.expires_at,
            &self.expires_at_period_end,
            &self.source,
        ]
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls_are_checked_without_echoing_them() {
        assert!(parse_url("postgres://u:pw@localhost:5432/db").is_ok());
        assert!(parse_url("host=localhost dbname=db").is_ok());
        let e = parse_url("postgres://u:hunter2@localhost:notaport/db").unwrap_err();
        assert!(!e.contains("hunter2"), "{e}");
    }

    #[test]
    fn enums_use_their_json_names_and_counts_saturate() {
        assert_eq!(
            wire_name(&crate::provider::Endpoint::ChatCompletions),
            "chat_completions"
        );
        assert_eq!(
            wire_name(&super::super::GrantSource::AutoTopUp),
            "auto_top_up"
        );
        assert_eq!(bigint(u64::MAX), i64::MAX);
        assert_eq!(bigint(42), 42);
    }
}
