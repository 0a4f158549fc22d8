//! The monitor database's schema: versioned migrations, applied in order and checked at start.
//!
//! Everything the cluster knows lives here, durable and transactional: formations
//! (with the primary epoch), nodes (identity, reported state, assigned goal, health),
//! events (every decision and why), operator requests, and routers.

use tokio_postgres::Client;

use crate::error::MonitorError;

/// The database that holds the cluster state on the monitor's Postgres instance.
pub const MONITOR_DBNAME: &str = "pg_auto_failover";
/// The role keepers, routers and the CLI use to connect to the monitor.
pub const MONITOR_ROLE: &str = "autoctl_node";
/// The role the monitor's health checks use to connect to nodes.
pub const HEALTH_CHECK_ROLE: &str = "pgautofailover_monitor";
/// The role standbys use for streaming replication, pg_basebackup and pg_rewind.
pub const REPLICATION_ROLE: &str = "pgautofailover_replicator";

/// NOTIFY channel: a goal or health changed (JSON payload, see [`crate::client::StateNotification`]).
pub const CHANNEL_STATE: &str = "hapg_state";
/// NOTIFY channel: a keeper reported (payload: node id); wakes the monitor service.
pub const CHANNEL_REPORT: &str = "hapg_report";
/// NOTIFY channel: an operator request was filed or answered (payload: request id).
pub const CHANNEL_REQUEST: &str = "hapg_request";
/// NOTIFY channel: a switchover asks the routers to drain the primary (payload:
/// the formation). Routers answer by setting `hapg.router.drained_at`.
pub const CHANNEL_DRAIN: &str = "hapg_drain";

/// Ordered migrations; a version is never edited once released, only added.
const MIGRATIONS: &[(i32, &str)] = &[
    (1, MIGRATION_1),
    (2, MIGRATION_2),
    (3, MIGRATION_3),
    (4, MIGRATION_4),
    (5, MIGRATION_5),
    (6, MIGRATION_6),
];

const MIGRATION_1: &str = r#"
CREATE TYPE hapg.replication_state AS ENUM (
    'init', 'single', 'wait_primary', 'primary', 'draining', 'demote_timeout',
    'demoted', 'catchingup', 'secondary', 'prepare_promotion', 'stop_replication',
    'wait_standby', 'maintenance', 'join_primary', 'apply_settings',
    'prepare_maintenance', 'wait_maintenance', 'report_lsn', 'fast_forward',
    'join_secondary', 'dropped'
);

CREATE TABLE hapg.formation (
    formation_id         text PRIMARY KEY,
    kind                 text NOT NULL DEFAULT 'pgsql' CHECK (kind = 'pgsql'),
    dbname               text NOT NULL DEFAULT 'postgres',
    number_sync_standbys int  NOT NULL DEFAULT 0 CHECK (number_sync_standbys >= 0),
    -- Increases each time a different node becomes writable; routers route per epoch.
    primary_epoch        bigint NOT NULL DEFAULT 0,
    primary_node_id      bigint
);

CREATE TABLE hapg.node (
    node_id              bigserial PRIMARY KEY,
    formation_id         text NOT NULL REFERENCES hapg.formation ON DELETE CASCADE,
    group_id             int  NOT NULL DEFAULT 0,
    node_name            text NOT NULL,
    node_host            text NOT NULL,
    node_port            int  NOT NULL CHECK (node_port BETWEEN 1 AND 65535),
    sys_identifier       bigint,
    goal_state           hapg.replication_state NOT NULL DEFAULT 'init',
    reported_state       hapg.replication_state NOT NULL DEFAULT 'init',
    reported_pg_running  bool NOT NULL DEFAULT false,
    reported_rep_state   text NOT NULL DEFAULT '',
    reported_tli         int  NOT NULL DEFAULT 1,
    reported_lsn         pg_lsn NOT NULL DEFAULT '0/0',
    -- A standby's word that its WAL receiver still hears from the primary.
    upstream_streaming   bool NOT NULL DEFAULT false,
    report_time          timestamptz,
    health               smallint NOT NULL DEFAULT -1,
    health_check_time    timestamptz,
    state_change_time    timestamptz NOT NULL DEFAULT now(),
    candidate_priority   int  NOT NULL DEFAULT 50 CHECK (candidate_priority BETWEEN 0 AND 100),
    replication_quorum   bool NOT NULL DEFAULT true,
    registered_at        timestamptz NOT NULL DEFAULT now(),
    UNIQUE (formation_id, node_name),
    UNIQUE (node_host, node_port)
);

CREATE TABLE hapg.event (
    event_id             bigserial PRIMARY KEY,
    event_time           timestamptz NOT NULL DEFAULT now(),
    formation_id         text NOT NULL,
    group_id             int,
    node_id              bigint,
    node_name            text,
    node_host            text,
    node_port            int,
    reported_state       hapg.replication_state,
    goal_state           hapg.replication_state,
    reported_tli         int,
    reported_lsn         pg_lsn,
    health               smallint,
    primary_epoch        bigint,
    description          text NOT NULL
);

-- Operator requests (switchover, maintenance, drop, ...): the CLI files them, the
-- monitor service alone decides, and answers in the same row.
CREATE TABLE hapg.request (
    request_id           bigserial PRIMARY KEY,
    created_at           timestamptz NOT NULL DEFAULT now(),
    formation_id         text NOT NULL,
    group_id             int NOT NULL DEFAULT 0,
    node_id              bigint,
    kind                 text NOT NULL,
    status               text NOT NULL DEFAULT 'pending'
                         CHECK (status IN ('pending', 'accepted', 'refused')),
    reply                text,
    answered_at          timestamptz
);

CREATE TABLE hapg.router (
    router_id            text PRIMARY KEY,
    formation_id         text NOT NULL,
    address              text NOT NULL,
    last_seen            timestamptz NOT NULL DEFAULT now(),
    routed_epoch         bigint NOT NULL DEFAULT 0
);

INSERT INTO hapg.formation (formation_id) VALUES ('default');
"#;

/// The drain handshake of a hitless switchover.
const MIGRATION_2: &str = r#"
-- Set when a switchover is requested; cleared when the primary is told to stop.
ALTER TABLE hapg.formation ADD COLUMN switchover_requested_at timestamptz;
-- A router's acknowledgement: it finished (or cut) its transactions on the
-- primary and pauses new ones until the monitor names the next primary.
ALTER TABLE hapg.router ADD COLUMN drained_at timestamptz;
"#;

/// `perform promotion` and the settings commands.
const MIGRATION_3: &str = r#"
-- The node `perform promotion` asked for; the election prefers it.
ALTER TABLE hapg.formation ADD COLUMN switchover_target bigint;
-- The value of a settings request (candidate priority, replication quorum, ...).
ALTER TABLE hapg.request ADD COLUMN value text;
"#;

/// What the keeper sees of its Postgres' role, to notice a node that diverged.
const MIGRATION_4: &str = r#"
-- pg_is_in_recovery() as the keeper last saw it; NULL while Postgres is down.
ALTER TABLE hapg.node ADD COLUMN reported_in_recovery bool;
"#;

/// How long a standby's WAL receiver had heard nothing from the primary.
const MIGRATION_5: &str = r#"
-- As of the keeper's last report; NULL when its WAL receiver does not stream.
-- The monitor counts a standby silent for long enough as no longer streaming.
ALTER TABLE hapg.node ADD COLUMN upstream_silence_ms bigint;
"#;

/// Where a router's read-only port listens.
const MIGRATION_6: &str = r#"
-- `router.listen_read_only` as the router advertises it; NULL without one.
ALTER TABLE hapg.router ADD COLUMN read_only_address text;
"#;

/// The schema version this binary expects.
pub fn latest_version() -> i32 {
    MIGRATIONS.last().map_or(0, |(version, _)| *version)
}

/// Creates the schema or brings it up to date. Safe to run concurrently: an
/// advisory lock serialises migrators, and each migration is one transaction.
pub async fn migrate(client: &mut Client) -> Result<i32, MonitorError> {
    let tx = client.transaction().await?;
    tx.batch_execute(
        "SELECT pg_advisory_xact_lock(hashtext('hapg.migrate'));
         CREATE SCHEMA IF NOT EXISTS hapg;
         CREATE TABLE IF NOT EXISTS hapg.schema_version (
             version    int PRIMARY KEY,
             applied_at timestamptz NOT NULL DEFAULT now()
         );",
    )
    .await?;
    let current: i32 = tx
        .query_one(
            "SELECT coalesce(max(version), 0) FROM hapg.schema_version",
            &[],
        )
        .await?
        .get(0);
    if current > latest_version() {
        return Err(MonitorError::SchemaTooNew {
            found: current,
            supported: latest_version(),
        });
    }
    for (version, sql) in MIGRATIONS.iter().filter(|(v, _)| *v > current) {
        tx.batch_execute(sql).await?;
        tx.execute(
            "INSERT INTO hapg.schema_version (version) VALUES ($1)",
            &[version],
        )
        .await?;
        tracing::info!(version, "applied monitor schema migration");
    }
    tx.batch_execute(&format!(
        "GRANT USAGE ON SCHEMA hapg TO {MONITOR_ROLE};
         GRANT SELECT, INSERT, UPDATE, DELETE ON ALL TABLES IN SCHEMA hapg TO {MONITOR_ROLE};
         GRANT USAGE ON ALL SEQUENCES IN SCHEMA hapg TO {MONITOR_ROLE};"
    ))
    .await?;
    tx.commit().await?;
    Ok(latest_version())
}

/// Checks that the monitor database holds exactly the schema this binary speaks.
pub async fn check(client: &Client) -> Result<(), MonitorError> {
    let exists: bool = client
        .query_one("SELECT to_regclass('hapg.schema_version') IS NOT NULL", &[])
        .await?
        .get(0);
    let found: Option<i32> = if exists {
        client
            .query_one("SELECT max(version) FROM hapg.schema_version", &[])
            .await?
            .get(0)
    } else {
        None
    };
    match found {
        Some(v) if v == latest_version() => Ok(()),
        Some(v) if v > latest_version() => Err(MonitorError::SchemaTooNew {
            found: v,
            supported: latest_version(),
        }),
        Some(v) => Err(MonitorError::SchemaTooOld {
            found: v,
            expected: latest_version(),
        }),
        None => Err(MonitorError::NotAMonitor),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::state::NodeState;

    #[test]
    fn sql_enum_matches_rust_enum() {
        let start = MIGRATION_1.find("ENUM (").expect("enum in migration 1") + 6;
        let end = start + MIGRATION_1[start..].find(");").expect("end of enum");
        let names: Vec<&str> = MIGRATION_1[start..end]
            .split(',')
            .map(|s| s.trim().trim_matches('\''))
            .collect();
        let expected: Vec<&str> = NodeState::ALL.iter().map(|s| s.as_str()).collect();
        assert_eq!(names, expected);
    }

    #[test]
    fn versions_increase() {
        for pair in MIGRATIONS.windows(2) {
            assert!(pair[0].0 < pair[1].0);
        }
    }
}
