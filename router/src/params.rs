//! Reported parameters (ParameterStatus): the lists a session, its server
//! connection and the router share, the parameters a client may change and
//! the router restores, and the router's last-seen list.

use std::sync::Arc;

use arc_swap::ArcSwap;

/// Reported parameters (ParameterStatus), shared: a session, its server
/// connection and the router's last-seen copy point at one list until one of
/// them changes, so a login does not copy it.
pub(crate) type Params = Arc<Vec<(String, String)>>;

/// Sets `name` to `value` in `params` (added when missing).
pub(crate) fn set_param(params: &mut Vec<(String, String)>, name: &str, value: &str) {
    match params.iter_mut().find(|(k, _)| k == name) {
        Some(slot) => {
            if slot.1 != value {
                slot.1 = value.to_string();
            }
        }
        None => params.push((name.to_string(), value.to_string())),
    }
}

/// True when `a` and `b` hold the same settings, in any order (a list names
/// each setting once).
pub(crate) fn same_params(a: &[(String, String)], b: &[(String, String)]) -> bool {
    a.len() == b.len() && a.iter().all(|pair| b.contains(pair))
}

/// [`set_param`] on a shared list, copied first only when it changes.
pub(crate) fn set_shared_param(params: &mut Params, name: &str, value: &str) {
    if !params.iter().any(|(k, v)| k == name && v == value) {
        set_param(Arc::make_mut(params), name, value);
    }
}

/// Reported parameters a client may change with SET or set_config and the
/// router restores on a new server connection.
pub(crate) const SETTABLE: &[&str] = &[
    "application_name",
    "client_encoding",
    "DateStyle",
    "IntervalStyle",
    "TimeZone",
    "standard_conforming_strings",
    "default_transaction_read_only",
    "search_path",
];

/// SQL that sets each of `pairs` (name, value) at session level, as SET
/// would: one `set_config` per parameter, empty for none.
pub(crate) fn set_config_sql<'a>(pairs: impl IntoIterator<Item = &'a (String, String)>) -> String {
    let mut sql = String::new();
    for (name, value) in pairs {
        sql.push_str(&format!(
            "SELECT set_config({}, {}, false);",
            postgres_protocol::escape::escape_literal(name),
            postgres_protocol::escape::escape_literal(value)
        ));
    }
    sql
}

/// The server parameters of the newest server connection, told to clients
/// that log in while no server connection can be opened; and the one list
/// the connections of a pool share with the sessions told it, so that "in
/// step" is one pointer comparison.
pub(crate) struct LastParams(ArcSwap<Vec<(String, String)>>);

impl Default for LastParams {
    fn default() -> Self {
        LastParams(ArcSwap::from_pointee(Vec::new()))
    }
}

impl LastParams {
    /// The last-seen list.
    pub fn load_full(&self) -> Params {
        self.0.load_full()
    }

    /// Keeps `params` as the newest server connection's; a pooled connection
    /// handed out again shares its list, and storing the same list is skipped.
    pub fn remember(&self, params: &Params) {
        if !Arc::ptr_eq(&self.0.load(), params) {
            self.0.store(params.clone());
        }
    }

    /// The last-seen list when it holds the same values as `params` (in any
    /// order); else `params`, which becomes the last seen. The connections
    /// of a pool then share one list with the sessions told it, and a
    /// transaction-mode session taking a connection sees by pointer that it
    /// has nothing to set or report.
    pub fn share(&self, params: &Params) -> Params {
        let last = self.0.load();
        if !Arc::ptr_eq(&last, params) && same_params(&last, params) {
            return Arc::clone(&last);
        }
        self.remember(params);
        params.clone()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn list(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn the_same_settings_in_another_order_are_the_same_params() {
        let zone_first = list(&[("TimeZone", "UTC"), ("DateStyle", "ISO, MDY")]);
        let style_first = list(&[("DateStyle", "ISO, MDY"), ("TimeZone", "UTC")]);
        assert!(same_params(&zone_first, &style_first));
        let other_zone = list(&[("DateStyle", "ISO, MDY"), ("TimeZone", "Etc/UTC")]);
        assert!(!same_params(&zone_first, &other_zone));
        // One list holding the other and more is not the same.
        let more = list(&[("DateStyle", "ISO, MDY"), ("TimeZone", "UTC"), ("a", "b")]);
        assert!(!same_params(&zone_first, &more));
        assert!(!same_params(&more, &zone_first));
    }
}
