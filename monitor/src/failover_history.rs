//! The primary changes of every formation and how long each left it without
//! a writable primary, read from the monitor's events (for `/metrics` of the
//! monitor's `hapg run`). One read-only query, kept apart from the service's
//! SQL so it can move with the rest of the monitor's queries.

use std::time::Duration;

use tokio_postgres::Client;

use crate::error::MonitorError;

/// One completed change of primary.
#[derive(Debug, Clone, PartialEq)]
pub struct PrimaryChange {
    /// Formation.
    pub formation: String,
    /// The formation's primary epoch the change started.
    pub epoch: i64,
    /// From the monitor's first step away from the old primary (an old-epoch
    /// event assigning draining, demote_timeout, prepare_promotion,
    /// stop_replication or report_lsn) to the new primary's first report of
    /// a writable state (single, wait_primary or primary) in the new epoch.
    pub duration: Duration,
}

/// Every completed primary change, oldest first.
pub async fn primary_changes(client: &Client) -> Result<Vec<PrimaryChange>, MonitorError> {
    let rows = client
        .query(
            "SELECT s.formation_id, s.epoch,
                    extract(epoch FROM e.ended - s.started)::float8
               FROM (SELECT formation_id, primary_epoch + 1 AS epoch, min(event_time) AS started
                       FROM hapg.event
                      WHERE goal_state IN ('draining', 'demote_timeout', 'prepare_promotion',
                                           'stop_replication', 'report_lsn')
                      GROUP BY formation_id, primary_epoch) s
               JOIN (SELECT formation_id, primary_epoch AS epoch, min(event_time) AS ended
                       FROM hapg.event
                      WHERE reported_state IN ('single', 'wait_primary', 'primary')
                        AND description LIKE 'New state is reported by node %'
                      GROUP BY formation_id, primary_epoch) e USING (formation_id, epoch)
              WHERE e.ended >= s.started
              ORDER BY s.formation_id, s.epoch",
            &[],
        )
        .await?;
    rows.iter()
        .map(|row| {
            Ok(PrimaryChange {
                formation: row.try_get(0)?,
                epoch: row.try_get(1)?,
                duration: Duration::from_secs_f64(row.try_get::<_, f64>(2)?.max(0.0)),
            })
        })
        .collect()
}
