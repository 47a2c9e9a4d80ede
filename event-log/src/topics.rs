//! Topic names: `<prefix>.<aggregate type>.events` and `<prefix>.<service>.commands`. The
//! prefix lets tests and tenants share one cluster.

/// The events topic of an aggregate type.
pub fn events(prefix: &str, aggregate_type: &str) -> String {
    format!("{prefix}.{aggregate_type}.events")
}

/// The commands topic a service consumes (the saga sends there).
pub fn commands(prefix: &str, service: &str) -> String {
    format!("{prefix}.{service}.commands")
}
