//! hapg router: follows the monitor and relays client traffic to the current primary (see docs/router.md).
