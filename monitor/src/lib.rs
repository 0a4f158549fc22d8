//! hapg monitor: the cluster state schema, the group state machine, the monitor
//! service (health checks and decisions), and the client every other component
//! uses to talk to the monitor database.

pub mod client;
pub mod error;
pub mod fsm;
pub mod http_server;
pub mod pgconn;
pub mod schema;
pub mod service;
pub mod state;
pub mod store;

pub use client::MonitorClient;
pub use error::MonitorError;
pub use state::{Health, NodeState};
pub use store::MonitorStore;
