//! The router's configuration file (`router.toml`): see docs/router.md.
