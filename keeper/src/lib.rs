//! hapg keeper: supervises one local PostgreSQL instance (a node, or the
//! monitor's own) and carries out the goal states the monitor assigns.

pub mod create;
pub mod error;
pub mod http;
pub mod keeper;
pub mod liveness;
pub mod metrics;
pub mod monitor_node;
pub mod monitor_status;
pub mod node_status;
pub mod paths;
pub mod pidfile;
pub mod postgres;
pub mod rejoin;
pub mod state_file;
pub mod transitions;

pub use error::KeeperError;
pub use paths::NodePaths;
