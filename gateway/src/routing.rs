//! Which upstream serves a request, and for a command which aggregate's owner takes it.

use axum::http::Method;
use http_edge::security::RouteClass;

/// The services behind the gateway.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Upstream {
    Order,
    Inventory,
    Customer,
    Query,
    Saga,
}

impl Upstream {
    pub const ALL: [Upstream; 5] = [
        Upstream::Order,
        Upstream::Inventory,
        Upstream::Customer,
        Upstream::Query,
        Upstream::Saga,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Upstream::Order => "order",
            Upstream::Inventory => "inventory",
            Upstream::Customer => "customer",
            Upstream::Query => "query",
            Upstream::Saga => "saga",
        }
    }
}

/// Where a request goes: the upstream, and for a command the aggregate whose owner takes it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Route {
    pub upstream: Upstream,
    /// `(aggregate type, aggregate id)`: `("order", id)`, `("stock", sku)` or `("customer", id)`.
    pub aggregate: Option<(&'static str, String)>,
    pub command: bool,
}

pub(crate) fn segments(path: &str) -> Vec<String> {
    path.trim_matches('/')
        .split('/')
        .map(|segment| {
            percent_encoding::percent_decode_str(segment)
                .decode_utf8()
                .map_or_else(|_| segment.to_owned(), std::borrow::Cow::into_owned)
        })
        .collect()
}

/// Whether `path` names what it seems to: no `.` or `..` segment and no backslash, raw or
/// percent-encoded. The gateway classes a request by its first segment but the client that
/// forwards it resolves dot segments (`/console/../metrics` would be checked as the console's
/// and reach `/metrics`), so such paths are refused instead.
pub fn is_plain(path: &str) -> bool {
    segments(path).iter().all(|segment| {
        segment != "." && segment != ".." && !segment.contains('\\') && !segment.contains('/')
    }) && !path.contains('\\')
}

/// The class of the upstream route a request goes to, as the upstream declares it (the command
/// services' routes are commands, the query API's reads, `/audit` audit, a saga's retry an
/// operation); what no upstream serves is a read (it gets 404 after the check).
pub fn class(method: &Method, path: &str) -> RouteClass {
    let parts = segments(path);
    let read = method == Method::GET || method == Method::HEAD;
    match parts.first().map(String::as_str).unwrap_or_default() {
        "openapi.json" => RouteClass::Open,
        // The console checks its callers itself (its session cookie, its roles) and answers a
        // browser with pages: a sign-in page instead of a 401 problem, a page saying what a
        // role may not see instead of a 403 one.
        "console" => RouteClass::Open,
        "audit" => RouteClass::Audit,
        "sagas" if !read => RouteClass::Operator,
        "orders" | "inventory" | "customers" if !read => RouteClass::Command,
        _ => RouteClass::Read,
    }
}

/// The route of a request; `None` when no upstream serves it (404). `idempotency_key` is the
/// (trimmed) key the request carries and `actor` its authenticated caller, which together
/// derive a new order's id as the order service does.
pub fn route(
    method: &Method,
    path: &str,
    idempotency_key: Option<&str>,
    actor: Option<&str>,
) -> Option<Route> {
    let parts = segments(path);
    let first = parts.first().map(String::as_str).unwrap_or_default();
    let read = method == Method::GET || method == Method::HEAD;
    let to = |upstream| Route {
        upstream,
        aggregate: None,
        command: false,
    };
    match first {
        "orders" if !read => {
            let id = match parts.get(1) {
                Some(raw) => uuid::Uuid::parse_str(raw).ok().map(|id| id.to_string()),
                None => idempotency_key
                    .map(|key| http_edge::headers::id_for_key("order-id", key, actor).to_string()),
            };
            Some(Route {
                upstream: Upstream::Order,
                aggregate: id.map(|id| ("order", id)),
                command: true,
            })
        }
        "inventory" if !read => Some(Route {
            upstream: Upstream::Inventory,
            aggregate: parts
                .get(1)
                .filter(|sku| domain::Sku::parse(sku).is_ok())
                .map(|sku| ("stock", sku.clone())),
            command: true,
        }),
        "customers" if !read => {
            let id = match parts.get(1) {
                Some(raw) => domain::CustomerId::parse(raw).ok().map(|id| id.to_string()),
                None => idempotency_key.map(|key| {
                    http_edge::headers::id_for_key("customer-id", key, actor).to_string()
                }),
            };
            Some(Route {
                upstream: Upstream::Customer,
                aggregate: id.map(|id| ("customer", id)),
                command: true,
            })
        }
        "orders" | "inventory" | "payments" | "customers" => read.then(|| to(Upstream::Query)),
        "audit" | "openapi.json" => Some(to(Upstream::Query)),
        // The query API's console shows every part (it reads the saga store too); its actions
        // are not retried by the gateway.
        "console" => Some(Route {
            command: !read,
            ..to(Upstream::Query)
        }),
        "sagas" => Some(Route {
            command: !read,
            ..to(Upstream::Saga)
        }),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn commands_route_to_their_aggregate_and_reads_to_the_query_api() {
        let id = "0192f5a4-1111-7000-8000-000000000001";
        let post = Method::POST;
        let get = Method::GET;
        assert_eq!(
            route(&post, &format!("/orders/{id}/cancel"), None, None),
            Some(Route {
                upstream: Upstream::Order,
                aggregate: Some(("order", id.to_owned())),
                command: true
            })
        );
        let placed = route(&post, "/orders", Some("k-1"), Some("key:alice")).expect("route");
        assert_eq!(
            placed.aggregate,
            Some((
                "order",
                http_edge::headers::id_for_key("order-id", "k-1", Some("key:alice")).to_string()
            ))
        );
        assert_eq!(
            route(&post, "/inventory/SKU%2D1/receipts", None, None)
                .expect("route")
                .aggregate,
            Some(("stock", "SKU-1".to_owned()))
        );
        assert_eq!(
            route(&get, "/orders/x", None, None).map(|r| r.upstream),
            Some(Upstream::Query)
        );
        assert_eq!(
            route(&get, "/payments/x", None, None).map(|r| r.upstream),
            Some(Upstream::Query)
        );
        assert_eq!(
            route(&post, "/sagas/x/retry", None, None).map(|r| (r.upstream, r.command)),
            Some((Upstream::Saga, true))
        );
        let registered = route(&post, "/customers", Some("k-2"), Some("key:alice")).expect("route");
        assert_eq!(registered.upstream, Upstream::Customer);
        assert_eq!(
            registered.aggregate,
            Some((
                "customer",
                http_edge::headers::id_for_key("customer-id", "k-2", Some("key:alice")).to_string()
            ))
        );
        assert_eq!(
            route(&Method::PATCH, &format!("/customers/{id}"), None, None),
            Some(Route {
                upstream: Upstream::Customer,
                aggregate: Some(("customer", id.to_owned())),
                command: true
            })
        );
        assert_eq!(
            class(&post, &format!("/customers/{id}/erase")),
            RouteClass::Command
        );
        assert_eq!(route(&get, "/nowhere", None, None), None);
        assert_eq!(route(&post, "/payments/x", None, None), None);
    }

    #[test]
    fn paths_with_dot_segments_or_backslashes_are_not_plain() {
        for path in [
            "/orders/x",
            "/console/sagas/a.b",
            "/inventory/SKU-1/receipts",
            "/",
        ] {
            assert!(is_plain(path), "{path}");
        }
        for path in [
            "/console/../metrics",
            "/console/%2e%2e/audit/order/x",
            "/console/%2E%2E/x",
            "/console/./sagas",
            "/console\\..\\health/ready",
            "/console/%5C../x",
            "/console/a%2F..%2Fb",
        ] {
            assert!(!is_plain(path), "{path}");
        }
    }

    #[test]
    fn the_console_goes_to_the_query_api_which_checks_its_callers() {
        let (get, post) = (Method::GET, Method::POST);
        for (method, path) in [
            (&get, "/console"),
            (&get, "/console/sagas/x"),
            (&post, "/console/sagas/x/retry"),
            (&post, "/console/parked"),
            (&get, "/console/audit/order/x"),
            (&post, "/console/login"),
        ] {
            assert_eq!(class(method, path), RouteClass::Open, "{method} {path}");
            let route = route(method, path, None, None).expect("a route");
            assert_eq!(route.upstream, Upstream::Query, "{path}");
            assert_eq!(
                route.command,
                method == Method::POST,
                "actions are not retried"
            );
        }
    }
}
