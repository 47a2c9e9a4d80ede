//! `GET /openapi.json`, checked from outside: the served document is OpenAPI 3.1 and valid by
//! the official OpenAPI 3.1 JSON Schema, as judged by an independent validator (the
//! `jsonschema` crate, not utoipa, which wrote it); every API route is in it with its request,
//! response and problem schemas; every `$ref` resolves; every schema is valid JSON Schema
//! 2020-12; and what the server really answers is documented and matches its schema.
//!
//! Known gaps, left out of the contract tests below because the document does not cover them
//! (they belong to the handlers' annotations, not to this test): `POST /orders/{id}/cancel`
//! also answers 400 (malformed JSON, bad `If-Match`), 413 and 415; `POST /orders/{id}/ship`
//! answers 400 on a bad `If-Match`; `GET /inventory` answers 400 on a malformed `after` token.

use std::collections::BTreeSet;

use reqwest::Method;
use serde_json::{Value, json};

use crate::helpers::{Backend, TestApp};

/// The official JSON Schema of OpenAPI 3.1 documents,
/// `https://spec.openapis.org/oas/3.1/schema/2022-10-07` (the OpenAPI Initiative's
/// `schemas/v3.1/schema.json` in <https://github.com/OAI/OpenAPI-Specification>; Apache-2.0,
/// © The Linux Foundation / OpenAPI Initiative). Tests have no network, so it is vendored: copied
/// byte for byte from the copy that the PyPI package `openapi-spec-validator` 0.9.0 (itself
/// Apache-2.0) bundles as `openapi_spec_validator/resources/schemas/v3.1/schema.json`;
/// sha256 `e7cb616a2a10849a166c4e4a93c62c56cfea02cc00eadf287e2fb875e7124098`.
///
/// It checks the document's structure; Schema Objects it only requires to be objects or
/// booleans (its `$dynamicRef: "#meta"`), so they are checked against the JSON Schema 2020-12
/// meta-schema separately.
const OPENAPI_3_1_SCHEMA: &str = include_str!("openapi-3.1-schema.json");
const OPENAPI_3_1_SCHEMA_ID: &str = "https://spec.openapis.org/oas/3.1/schema/2022-10-07";

/// Every API route the server answers: (method, path template, takes a JSON body). Left out:
/// the operational `/health/live`, `/health/ready`, `/metrics` and `/openapi.json` itself.
const ROUTES: &[(&str, &str, bool)] = &[
    ("post", "/orders", true),
    ("post", "/orders/{id}/cancel", true),
    ("post", "/orders/{id}/ship", false),
    ("post", "/inventory/{sku}/receipts", true),
    ("post", "/inventory/{sku}/adjustments", true),
    ("get", "/orders", false),
    ("get", "/orders/{id}", false),
    ("get", "/inventory", false),
    ("get", "/inventory/{sku}", false),
    ("get", "/payments/{order_id}", false),
];

const JSON_SCHEMA_2020_12: &str = "https://json-schema.org/draft/2020-12/schema";

/// The document a running platform serves.
async fn served_document(app: &TestApp) -> Value {
    let reply = app.get("/openapi.json").await;
    let document = reply.expect(200).clone();
    assert_eq!(
        reply.header("content-type"),
        Some("application/json"),
        "the document is served as JSON"
    );
    assert!(document.is_object(), "a JSON object: {document}");
    document
}

/// A validator for OpenAPI 3.1 documents, built from the vendored official schema.
fn official_validator() -> jsonschema::Validator {
    let schema: Value = serde_json::from_str(OPENAPI_3_1_SCHEMA).expect("the schema is JSON");
    assert_eq!(schema["$id"], OPENAPI_3_1_SCHEMA_ID, "the vendored schema");
    assert_eq!(schema["$schema"], JSON_SCHEMA_2020_12);
    jsonschema::draft202012::options()
        .should_validate_formats(true)
        .build(&schema)
        .unwrap_or_else(|error| panic!("the official OpenAPI 3.1 schema does not build: {error}"))
}

fn errors(validator: &jsonschema::Validator, instance: &Value) -> Vec<String> {
    validator
        .iter_errors(instance)
        .map(|error| format!("{error} (at {})", error.instance_path()))
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_document_is_openapi_3_1_and_valid_by_the_official_schema() {
    let app = TestApp::spawn(Backend::Embedded).await;
    let document = served_document(&app).await;

    let version = document["openapi"].as_str().expect("an `openapi` string");
    let patch = version
        .strip_prefix("3.1.")
        .unwrap_or_else(|| panic!("OpenAPI 3.1.x, got {version}"));
    assert!(
        patch.split('-').next().is_some_and(|digits| {
            !digits.is_empty() && digits.bytes().all(|byte| byte.is_ascii_digit())
        }),
        "OpenAPI 3.1.x, got {version}"
    );
    assert!(
        document["info"]["title"]
            .as_str()
            .is_some_and(|title| !title.is_empty()),
        "a title"
    );
    assert_eq!(document["info"]["version"], env!("CARGO_PKG_VERSION"));

    let errors = errors(&official_validator(), &document);
    assert!(
        errors.is_empty(),
        "the served document breaks the official OpenAPI 3.1 schema:\n  {}",
        errors.join("\n  ")
    );
}

/// The check above would be worthless if the validator skipped what it cannot resolve (the
/// official schema relies on `$dynamicRef`, `unevaluatedProperties` and `dependentSchemas`), so
/// documents broken in those places must fail it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_official_schema_check_rejects_broken_documents() {
    let app = TestApp::spawn(Backend::Embedded).await;
    let document = served_document(&app).await;
    let validator = official_validator();
    assert!(
        validator.is_valid(&document),
        "the served document is valid"
    );

    type Breakage = fn(&mut Value);
    let breakages: &[(&str, Breakage)] = &[
        ("no info", |doc| {
            doc.as_object_mut().expect("object").remove("info");
        }),
        ("OpenAPI 3.0", |doc| doc["openapi"] = json!("3.0.3")),
        ("no paths, components or webhooks", |doc| {
            let doc = doc.as_object_mut().expect("object");
            doc.remove("paths");
            doc.remove("components");
        }),
        ("an unknown field on an operation", |doc| {
            doc["paths"]["/orders"]["post"]["bogus"] = json!(true);
        }),
        ("a response without a description", |doc| {
            doc["paths"]["/orders"]["post"]["responses"]["201"]
                .as_object_mut()
                .expect("a 201 response")
                .remove("description");
        }),
        ("an optional path parameter", |doc| {
            doc["paths"]["/orders/{id}/ship"]["post"]["parameters"][0]["required"] = json!(false);
        }),
        ("a component schema that is a number ($dynamicRef)", |doc| {
            doc["components"]["schemas"]["Problem"] = json!(42);
        }),
        (
            "a media type schema that is a string ($dynamicRef)",
            |doc| {
                doc["paths"]["/orders"]["post"]["requestBody"]["content"]["application/json"]["schema"] =
                    json!("PlaceOrderRequest");
            },
        ),
    ];
    for (what, breaks) in breakages {
        let mut broken = document.clone();
        breaks(&mut broken);
        assert!(
            !validator.is_valid(&broken),
            "a document with {what} passes the official schema"
        );
    }
}

/// `operation.responses[status].content[content_type].schema`, if there.
fn media_schema<'a>(response: &'a Value, content_type: &str) -> Option<&'a Value> {
    response["content"][content_type]["schema"]
        .as_object()
        .map(|_| &response["content"][content_type]["schema"])
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_api_route_is_documented_with_request_response_and_problem_schemas() {
    let app = TestApp::spawn(Backend::Embedded).await;
    let document = served_document(&app).await;
    let paths = document["paths"].as_object().expect("paths");

    for &(method, path, takes_body) in ROUTES {
        let route = format!("{} {path}", method.to_uppercase());
        let operation = paths
            .get(path)
            .and_then(|item| item.get(method))
            .unwrap_or_else(|| panic!("{route} is not in the document"));
        let responses = operation["responses"]
            .as_object()
            .unwrap_or_else(|| panic!("{route} has no responses"));

        let successes: Vec<&String> = responses
            .keys()
            .filter(|status| status.starts_with('2'))
            .collect();
        assert!(
            successes
                .iter()
                .any(|status| media_schema(&responses[*status], "application/json").is_some()),
            "{route}: no 2xx response with an application/json schema ({successes:?})"
        );

        let failures: Vec<&String> = responses
            .keys()
            .filter(|status| status.starts_with('4') || status.starts_with('5'))
            .collect();
        assert!(!failures.is_empty(), "{route}: no 4xx/5xx response");
        for status in failures {
            let content = responses[status]["content"]
                .as_object()
                .unwrap_or_else(|| panic!("{route} {status}: no content"));
            assert_eq!(
                content.keys().collect::<Vec<_>>(),
                ["application/problem+json"],
                "{route} {status}: errors are problem+json"
            );
            assert!(
                media_schema(&responses[status], "application/problem+json").is_some(),
                "{route} {status}: no problem schema"
            );
        }

        if takes_body {
            let body = &operation["requestBody"];
            assert!(
                media_schema(body, "application/json").is_some(),
                "{route}: no requestBody with an application/json schema: {body}"
            );
        }

        // Every `{name}` of the template is declared as a (required) path parameter.
        let declared: BTreeSet<&str> = operation["parameters"]
            .as_array()
            .into_iter()
            .flatten()
            .filter(|parameter| parameter["in"] == "path")
            .map(|parameter| {
                assert_eq!(parameter["required"], true, "{route}: {parameter}");
                parameter["name"].as_str().expect("a parameter name")
            })
            .collect();
        let in_template: BTreeSet<&str> = path
            .split('/')
            .filter_map(|segment| segment.strip_prefix('{')?.strip_suffix('}'))
            .collect();
        assert_eq!(declared, in_template, "{route}: path parameters");
    }
}

/// Every `"$ref"` string in `value`, with where it was found.
fn refs<'a>(value: &'a Value, at: String, found: &mut Vec<(String, &'a str)>) {
    match value {
        Value::Object(object) => {
            for (key, child) in object {
                let here = format!("{at}/{key}");
                match (key.as_str(), child) {
                    ("$ref", Value::String(target)) => found.push((here, target)),
                    _ => refs(child, here, found),
                }
            }
        }
        Value::Array(items) => {
            for (index, child) in items.iter().enumerate() {
                refs(child, format!("{at}/{index}"), found);
            }
        }
        _ => {}
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_ref_resolves_to_a_component() {
    let app = TestApp::spawn(Backend::Embedded).await;
    let document = served_document(&app).await;

    let mut found = Vec::new();
    refs(&document, String::new(), &mut found);
    assert!(
        found.len() >= 5,
        "the command routes use component schemas: {found:?}"
    );
    for (at, target) in &found {
        let pointer = target
            .strip_prefix('#')
            .unwrap_or_else(|| panic!("{at}: {target} leaves the document"));
        assert!(
            pointer.starts_with("/components/"),
            "{at}: {target} points outside components"
        );
        assert!(
            document
                .pointer(pointer)
                .is_some_and(|target| !target.is_null()),
            "{at}: {target} resolves to nothing"
        );
    }

    // And nothing in components is left unused, which usually means a renamed type.
    let used: BTreeSet<&str> = found.iter().map(|(_, target)| *target).collect();
    for name in document["components"]["schemas"]
        .as_object()
        .expect("component schemas")
        .keys()
    {
        let target = format!("#/components/schemas/{name}");
        assert!(
            used.contains(target.as_str()),
            "{target} is never referenced"
        );
    }
}

/// Every Schema Object: the component schemas and the inline ones under `paths`.
fn schemas(document: &Value) -> Vec<(String, &Value)> {
    fn inline<'a>(value: &'a Value, at: String, found: &mut Vec<(String, &'a Value)>) {
        match value {
            Value::Object(object) => {
                for (key, child) in object {
                    let here = format!("{at}/{key}");
                    if key == "schema" {
                        found.push((here, child));
                    } else {
                        inline(child, here, found);
                    }
                }
            }
            Value::Array(items) => {
                for (index, child) in items.iter().enumerate() {
                    inline(child, format!("{at}/{index}"), found);
                }
            }
            _ => {}
        }
    }
    let mut found: Vec<(String, &Value)> = document["components"]["schemas"]
        .as_object()
        .expect("component schemas")
        .iter()
        .map(|(name, schema)| (format!("/components/schemas/{name}"), schema))
        .collect();
    inline(&document["paths"], "/paths".into(), &mut found);
    found
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_schema_is_valid_json_schema_2020_12() {
    let app = TestApp::spawn(Backend::Embedded).await;
    let document = served_document(&app).await;
    // OpenAPI 3.1's default dialect is JSON Schema 2020-12 (plus a few annotations, which
    // 2020-12 allows as unknown keywords).
    assert!(
        document.get("jsonSchemaDialect").is_none(),
        "the default dialect"
    );
    let schemas = schemas(&document);
    assert!(schemas.len() > 10, "{} schemas", schemas.len());
    for (at, schema) in schemas {
        if let Err(error) = jsonschema::draft202012::meta::validate(schema) {
            panic!("{at} is not valid JSON Schema 2020-12: {error}\n{schema:#}");
        }
    }
}

// ---------------------------------------------------------------------------------------------
// What the server answers against what it documents

/// A response, read whole, with its raw content type; `body` is `None` when there is none.
struct Answer {
    status: u16,
    content_type: String,
    etag: Option<String>,
    body: Option<Value>,
}

/// A running platform and the document it serves: sends requests and checks each answer
/// against the document.
struct Contract<'a> {
    app: &'a TestApp,
    document: &'a Value,
}

impl Contract<'_> {
    /// Sends a request: `body` is (content type, bytes).
    async fn send(
        &self,
        method: Method,
        path: &str,
        headers: &[(&str, &str)],
        body: Option<(&str, &str)>,
    ) -> Answer {
        let mut request = self.app.client.request(method.clone(), self.app.url(path));
        for (name, value) in headers {
            request = request.header(*name, *value);
        }
        if let Some((content_type, body)) = body {
            request = request
                .header("content-type", content_type)
                .body(body.to_owned());
        }
        let response = request.send().await.expect("send request");
        let status = response.status().as_u16();
        let header = |name: &str| {
            response
                .headers()
                .get(name)
                .and_then(|value| value.to_str().ok())
                .map(str::to_owned)
        };
        let content_type = header("content-type").unwrap_or_default();
        let etag = header("etag");
        let bytes = response.bytes().await.expect("read body");
        let body = (!bytes.is_empty()).then(|| {
            serde_json::from_slice(&bytes).unwrap_or_else(|error| {
                panic!(
                    "{method} {path} answered {status} with a body that is not JSON ({error}): {}",
                    String::from_utf8_lossy(&bytes)
                )
            })
        });
        Answer {
            status,
            content_type,
            etag,
            body,
        }
    }

    /// Checks that `answer` (to `method path`, an instance of `template`) has the expected
    /// status, that this status is documented for the route, and that the body is there exactly
    /// when documented, with a documented content type, matching the documented schema.
    #[track_caller]
    fn check(&self, method: &Method, template: &str, path: &str, answer: &Answer, expected: u16) {
        let route = format!("{method} {path}");
        assert_eq!(
            answer.status, expected,
            "{route}: unexpected status; body: {:?}",
            answer.body
        );
        let operation = &self.document["paths"][template][method.as_str().to_lowercase()];
        assert!(operation.is_object(), "{method} {template} is documented");
        let response = operation["responses"]
            .get(answer.status.to_string())
            .unwrap_or_else(|| {
                panic!(
                    "{route} answered {}, which {method} {template} does not document",
                    answer.status
                )
            });
        let Some(body) = &answer.body else {
            assert!(
                response.get("content").is_none(),
                "{route} answered {} without a body, but a body is documented: {response}",
                answer.status
            );
            return;
        };
        let schema = media_schema(response, &answer.content_type).unwrap_or_else(|| {
            panic!(
                "{route} answered {} as {:?}, which is not a documented content type: {response}",
                answer.status, answer.content_type
            )
        });
        assert_matches(
            self.document,
            &format!("{route} {}", answer.status),
            schema,
            body,
        );
    }

    async fn call(
        &self,
        method: Method,
        template: &str,
        path: &str,
        headers: &[(&str, &str)],
        body: Option<(&str, &str)>,
        expected: u16,
    ) -> Answer {
        let answer = self.send(method.clone(), path, headers, body).await;
        self.check(&method, template, path, &answer, expected);
        answer
    }

    async fn get(&self, template: &str, path: &str, expected: u16) -> Answer {
        self.call(Method::GET, template, path, &[], None, expected)
            .await
    }

    /// POSTs `body` as JSON (or nothing); a body the server takes must match the documented
    /// request schema.
    async fn post(&self, template: &str, path: &str, body: Option<Value>, expected: u16) -> Answer {
        let text = body.as_ref().map(Value::to_string);
        let answer = self
            .call(
                Method::POST,
                template,
                path,
                &[],
                text.as_deref().map(|text| ("application/json", text)),
                expected,
            )
            .await;
        if let (Some(body), true) = (&body, answer.status < 300) {
            let request_body = &self.document["paths"][template]["post"]["requestBody"];
            let schema = media_schema(request_body, "application/json")
                .unwrap_or_else(|| panic!("POST {template} documents no request schema"));
            assert_matches(
                self.document,
                &format!("request to POST {path}"),
                schema,
                body,
            );
        }
        answer
    }
}

/// A validator for `schema`, a Schema Object of `document`, its `#/components/...` references
/// resolved in the document's components.
fn schema_validator(document: &Value, schema: &Value) -> jsonschema::Validator {
    let mut root = json!({ "allOf": [schema] });
    root["$schema"] = json!(JSON_SCHEMA_2020_12);
    root["components"] = document["components"].clone();
    jsonschema::draft202012::options()
        .should_validate_formats(true)
        .build(&root)
        .unwrap_or_else(|error| panic!("{schema} does not build: {error}"))
}

#[track_caller]
fn assert_matches(document: &Value, what: &str, schema: &Value, instance: &Value) {
    let errors = errors(&schema_validator(document, schema), instance);
    assert!(
        errors.is_empty(),
        "{what}: {instance} does not match {schema}:\n  {}",
        errors.join("\n  ")
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn what_the_commands_answer_is_documented_and_matches_its_schema() {
    let app = TestApp::spawn(Backend::Embedded).await;
    let document = served_document(&app).await;
    let api = Contract {
        app: &app,
        document: &document,
    };
    let no_order = "0190b3a4-0000-7000-8000-000000000000";

    let receipts = "/inventory/{sku}/receipts";
    let adjustments = "/inventory/{sku}/adjustments";
    let receive = "/inventory/SKU-1/receipts";
    let adjust = "/inventory/SKU-1/adjustments";
    api.post(receipts, receive, Some(json!({"quantity": 10})), 200)
        .await;
    api.post(receipts, receive, Some(json!({"quantity": 0})), 422)
        .await;
    api.post(
        receipts,
        receive,
        Some(json!({"quantity": 1, "extra": 1})),
        422,
    )
    .await;
    let damaged = json!({"delta": -2, "reason": "damaged"});
    api.post(adjustments, adjust, Some(damaged), 200).await;
    let lost = json!({"delta": -100, "reason": "lost"});
    api.post(adjustments, adjust, Some(lost), 409).await;
    let json = |body| Some(("application/json", body));
    api.call(Method::POST, receipts, receive, &[], json("{"), 400)
        .await;
    let text = Some(("text/plain", "-2"));
    api.call(Method::POST, adjustments, adjust, &[], text, 415)
        .await;
    let huge = format!(
        "{{\"quantity\": 1, \"pad\": \"{}\"}}",
        "x".repeat(128 * 1024)
    );
    api.call(Method::POST, receipts, receive, &[], json(&huge), 413)
        .await;
    let stale = [("If-Match", "\"7\"")];
    let one = r#"{"quantity": 1}"#;
    api.call(Method::POST, receipts, receive, &stale, json(one), 409)
        .await;

    // A payment that never answers keeps the order pending while the test ships and cancels it.
    let place = json!({
        "customer_id": "c-1",
        "currency": "EUR",
        "payment_token": "tok_timeout",
        "lines": [{"sku": "SKU-1", "quantity": 2, "unit_price_minor": 1999}],
    });
    let placed = api
        .post("/orders", "/orders", Some(place.clone()), 201)
        .await;
    let body = placed.body.expect("a body");
    let order_id = body["order_id"].as_str().expect("an order id");
    let missing = json!({"customer_id": "c-1"});
    api.post("/orders", "/orders", Some(missing), 422).await;
    let mut zero = place.clone();
    zero["lines"][0]["quantity"] = json!(0);
    api.post("/orders", "/orders", Some(zero), 422).await;

    let ship = "/orders/{id}/ship";
    let cancel = "/orders/{id}/cancel";
    let ship_it = format!("/orders/{order_id}/ship");
    let cancel_it = format!("/orders/{order_id}/cancel");
    api.post(ship, &ship_it, None, 409).await;
    api.post(ship, &format!("/orders/{no_order}/ship"), None, 404)
        .await;
    let reason = json!({"reason": "changed my mind"});
    let cancel_none = format!("/orders/{no_order}/cancel");
    api.post(cancel, &cancel_none, Some(reason.clone()), 404)
        .await;
    api.post(cancel, &cancel_it, Some(json!({"reason": 5})), 422)
        .await;
    api.post(cancel, &cancel_it, Some(reason), 200).await;
    // The body is optional.
    api.post(cancel, &cancel_it, None, 200).await;
    api.post(ship, &ship_it, None, 409).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn what_the_queries_answer_is_documented_and_matches_its_schema() {
    let app = TestApp::spawn(Backend::Embedded).await;
    let document = served_document(&app).await;
    let api = Contract {
        app: &app,
        document: &document,
    };
    let received = app.receive("SKU-1", 10).await;
    let stock_token = received.expect(200)["consistency_token"]
        .as_str()
        .expect("a consistency token")
        .to_owned();
    let placed = app.place_order("tok_approve", &[("SKU-1", 2, 1999)]).await;
    let body = placed.expect(201);
    let order_id = body["order_id"].as_str().expect("an order id");
    let order_token = body["consistency_token"]
        .as_str()
        .expect("a consistency token");

    let order = "/orders/{id}";
    api.get(
        order,
        &format!("/orders/{order_id}?after={order_token}"),
        200,
    )
    .await;
    api.get(order, "/orders/0190b3a4-0000-7000-8000-000000000000", 404)
        .await;
    api.get(order, &format!("/orders/{order_id}?after=garbage"), 400)
        .await;

    let orders = "/orders";
    api.get(
        orders,
        &format!("/orders?customer_id=c-1&after={order_token}"),
        200,
    )
    .await;
    api.get(
        orders,
        "/orders?customer_id=c-1&status=pending&limit=1",
        200,
    )
    .await;
    api.get(orders, "/orders", 422).await;
    api.get(orders, "/orders?customer_id=c-1&cursor=zz", 400)
        .await;

    let stock = "/inventory/{sku}";
    let sku = format!("/inventory/SKU-1?after={stock_token}");
    let first = api.get(stock, &sku, 200).await;
    let etag = first.etag.expect("an ETag");
    let not_modified = [("If-None-Match", etag.as_str())];
    api.call(Method::GET, stock, &sku, &not_modified, None, 304)
        .await;
    api.get(stock, "/inventory/NOPE", 404).await;
    api.get(stock, "/inventory/SKU-1?after=garbage", 400).await;

    let low = "/inventory";
    api.get(
        low,
        &format!("/inventory?below=100&after={stock_token}"),
        200,
    )
    .await;
    api.get(low, "/inventory", 422).await;

    // The saga may or may not have authorised this order's payment yet: an id no order has is
    // the 404 for certain.
    api.get(
        "/payments/{order_id}",
        &format!("/payments/{}", uuid::Uuid::new_v4()),
        404,
    )
    .await;
}
