//! The OpenAPI document, generated from the handlers' annotations.

use serde_json::{Value, json};
use utoipa::OpenApi;

/// The API description served at `/api/v1/openapi.json`.
#[derive(OpenApi)]
#[openapi(
    info(title = "fwrepo", description = "Firmware artifact repository and OTA rollout server"),
    paths(
        super::firmware::upload,
        super::firmware::list,
        super::firmware::get,
        super::firmware::delete,
        super::firmware::disable,
        super::firmware::enable,
        super::firmware::verify,
        super::downloads::list,
        super::downloads::for_firmware,
        super::files::file,
        super::ota::create,
        super::ota::list,
        super::ota::get,
        super::ota::events,
        super::ota::download,
        super::ota::download_signed,
        super::rollouts::create,
        super::rollouts::list,
        super::rollouts::get,
        super::rollouts::devices,
        super::rollouts::timeline,
        super::rollouts::action,
        super::rollouts::events,
        super::devices::list,
        super::devices::get,
        super::devices::put,
        super::devices::delete,
        super::ops::healthz,
        super::ops::readyz,
        super::ops::metrics,
        super::ops::openapi,
        super::ops::cluster,
        super::tokens::create,
        super::tokens::list,
        super::tokens::get,
        super::tokens::revoke,
        super::tokens::audit,
    ),
    components(schemas(crate::audit::AuditEntry)),
    tags(
        (name = "firmware", description = "Release engineers: upload and manage packages"),
        (name = "downloads", description = "Gateways: package downloads and their progress"),
        (name = "ota", description = "Operators: upgrade a dock and its aircraft over MQTT"),
        (name = "rollouts", description = "Operators: stage a release across a fleet"),
        (name = "devices", description = "Docks and aircraft learned over MQTT or declared"),
        (name = "operations", description = "Health, readiness, metrics"),
        (name = "auth", description = "Admins: API tokens and the audit log"),
    ),
    modifiers(&UniqueOperationIds, &BearerAuth)
)]
pub struct ApiDoc;

/// Operation ids are the handlers' names, which repeat across modules (`list`, `get`, …);
/// OpenAPI requires them unique, so each is prefixed with its tag (`rollouts_list`). A handler
/// serving two methods (`POST` and `PUT /api/v1/firmware`) keeps its id on the first and gets
/// the method as a suffix on the others (`firmware_upload_put`).
struct UniqueOperationIds;

impl utoipa::Modify for UniqueOperationIds {
    fn modify(&self, api: &mut utoipa::openapi::OpenApi) {
        let mut seen = std::collections::HashSet::new();
        for (method, op) in methods(api) {
            let tag = op.tags.as_ref().and_then(|t| t.first()).cloned();
            if let (Some(tag), Some(id)) = (tag, op.operation_id.as_mut()) {
                if !id.starts_with(&format!("{tag}_")) {
                    *id = format!("{tag}_{id}");
                }
                if !seen.insert(id.clone()) {
                    *id = format!("{id}_{method}");
                }
            }
        }
    }
}

/// Every operation needs `Authorization: Bearer <token>` unless it says `security(())` (health
/// checks, this document, the signed download URLs).
struct BearerAuth;

impl utoipa::Modify for BearerAuth {
    fn modify(&self, api: &mut utoipa::openapi::OpenApi) {
        use utoipa::openapi::security::{
            HttpAuthScheme, HttpBuilder, SecurityRequirement, SecurityScheme,
        };
        let components = api.components.get_or_insert_with(Default::default);
        components.add_security_scheme(
            "bearer",
            SecurityScheme::Http(
                HttpBuilder::new()
                    .scheme(HttpAuthScheme::Bearer)
                    .description(Some(
                        "An API token (`fwrepo token create`; the first admin token is in \
                         <data-dir>/admin.token). Scopes: read, upload, operate, admin.",
                    ))
                    .build(),
            ),
        );
        api.security = Some(vec![SecurityRequirement::new(
            "bearer",
            Vec::<String>::new(),
        )]);
        // What the access gate may answer before any handler runs.
        let gate = [
            (
                "401",
                "unauthorized: token missing, malformed, unknown, revoked or expired",
            ),
            ("403", "forbidden: the token lacks the scope"),
            ("429", "rate_limited (Retry-After)"),
        ];
        for op in operations(api) {
            // `security(())` = open (health checks, this document, signed URLs).
            if op.security.is_some() {
                continue;
            }
            for (code, text) in gate {
                if !op.responses.responses.contains_key(code) {
                    let response = utoipa::openapi::ResponseBuilder::new()
                        .description(text)
                        .content(
                            "application/json",
                            utoipa::openapi::ContentBuilder::new()
                                .schema(Some(utoipa::openapi::Ref::from_schema_name("ErrorBody")))
                                .build(),
                        )
                        .build();
                    op.responses
                        .responses
                        .insert(code.to_string(), response.into());
                }
            }
        }
    }
}

/// Every operation of the document.
fn operations(
    api: &mut utoipa::openapi::OpenApi,
) -> impl Iterator<Item = &mut utoipa::openapi::path::Operation> {
    methods(api).map(|(_, op)| op)
}

/// Every operation of the document with its method, in a fixed order.
fn methods(
    api: &mut utoipa::openapi::OpenApi,
) -> impl Iterator<Item = (&'static str, &mut utoipa::openapi::path::Operation)> {
    api.paths.paths.values_mut().flat_map(|item| {
        [
            ("get", &mut item.get),
            ("post", &mut item.post),
            ("put", &mut item.put),
            ("delete", &mut item.delete),
            ("head", &mut item.head),
            ("patch", &mut item.patch),
        ]
        .into_iter()
        .filter_map(|(m, op)| op.as_mut().map(|op| (m, op)))
    })
}

/// The document served at `/api/v1/openapi.json`: utoipa's, refined by [`build`]. Built once.
pub fn document() -> &'static Value {
    static DOC: std::sync::LazyLock<Value> = std::sync::LazyLock::new(|| {
        let (doc, missing) = build();
        for part in missing {
            tracing::error!(%part, "an OpenAPI refinement names a part the document lacks");
        }
        doc
    });
    &DOC
}

/// utoipa's document with what the annotations cannot say: the answers every operation of a
/// kind may give, the validation keywords of request types defined outside the HTTP layer and
/// of the parameters whose rules are regular expressions (one place for them, built from the
/// same pieces), and links. Also returns the refinements that found nothing to refine (a
/// renamed field, parameter or operation: a bug, which the unit test catches).
fn build() -> (Value, Vec<String>) {
    let mut doc = serde_json::to_value(ApiDoc::openapi()).unwrap_or_default();
    let mut missing = Vec::new();
    common_responses(&mut doc);
    parameters_are_never_null(&mut doc);
    constraints::apply(&mut doc, &mut missing);
    links(&mut doc, &mut missing);
    (doc, missing)
}

/// OpenAPI links from what creates a resource to what uses it, so clients and API fuzzers can
/// follow a created record's id instead of guessing one.
fn links(doc: &mut Value, missing: &mut Vec<String>) {
    let firmware = [
        ("firmware_get", "GetFirmware"),
        ("firmware_delete", "DeleteFirmware"),
        ("firmware_disable", "DisableFirmware"),
        ("firmware_enable", "EnableFirmware"),
        ("firmware_verify", "VerifyFirmware"),
        ("downloads_for_firmware", "FirmwareDownloads"),
    ];
    let rollout = [
        ("rollouts_get", "GetRollout"),
        ("rollouts_devices", "RolloutDevices"),
        ("rollouts_timeline", "RolloutTimeline"),
        ("rollouts_events", "RolloutEvents"),
        ("rollouts_action", "RolloutAction"),
    ];
    let by = |ops: &[(&str, &str)], param: &str, field: &str| -> Value {
        ops.iter()
            .map(|(op, name)| {
                let link = json!({
                    "operationId": op,
                    "parameters": {param: format!("$response.body#/{field}")}
                });
                (name.to_string(), link)
            })
            .collect::<serde_json::Map<_, _>>()
            .into()
    };
    let mut upload = by(&firmware, "id", "id");
    upload["DownloadFile"] = json!({
        "operationId": "downloads_file",
        "parameters": {"id": "$response.body#/id", "file_name": "$response.body#/file_name"}
    });
    let table = [
        ("/api/v1/firmware", "post", "201", upload.clone()),
        ("/api/v1/firmware", "post", "200", upload.clone()),
        ("/api/v1/firmware", "put", "201", upload.clone()),
        ("/api/v1/firmware", "put", "200", upload),
        ("/api/v1/rollouts", "post", "201", by(&rollout, "id", "id")),
        (
            "/api/v1/ota",
            "post",
            "202",
            by(
                &[("ota_get", "GetTask"), ("ota_events", "TaskEvents")],
                "id",
                "id",
            ),
        ),
        (
            "/api/v1/tokens",
            "post",
            "201",
            by(&[("auth_get", "GetToken")], "id", "id"),
        ),
        (
            "/api/v1/devices/{sn}",
            "put",
            "200",
            by(
                &[
                    ("devices_get", "GetDevice"),
                    ("devices_delete", "DeleteDevice"),
                ],
                "sn",
                "sn",
            ),
        ),
    ];
    for (path, method, status, links) in table {
        let pointer = format!(
            "/paths/{}/{method}/responses/{status}",
            path.replace('/', "~1")
        );
        match doc.pointer_mut(&pointer) {
            Some(response) => response["links"] = links,
            None => missing.push(pointer),
        }
    }
}

/// A query string or header has no `null`: an optional parameter is one that may be absent,
/// which `required: false` says (utoipa also makes an `Option` parameter's type nullable).
fn parameters_are_never_null(doc: &mut Value) {
    let ops = doc["paths"]
        .as_object_mut()
        .into_iter()
        .flat_map(|paths| paths.values_mut())
        .filter_map(Value::as_object_mut)
        .flat_map(|item| item.values_mut());
    // `get_mut`, not `[]`: indexing a missing key mutably would insert it.
    let params = ops
        .filter_map(|op| op.get_mut("parameters")?.as_array_mut())
        .flatten()
        .filter_map(|p| p.get_mut("schema"));
    for schema in params {
        if let Some(types) = schema.get_mut("type")
            && let Some(list) = types.as_array_mut()
        {
            list.retain(|t| t != "null");
            if let [only] = list.as_slice() {
                *types = only.clone();
            }
        }
    }
}

/// A response with the JSON error body.
fn error_response(description: &str) -> Value {
    json!({
        "description": description,
        "content": {"application/json": {"schema": {"$ref": "#/components/schemas/ErrorBody"}}}
    })
}

/// 400 wherever a parameter or body can be malformed, 413 on JSON bodies (over
/// [`super::JSON_LIMIT`]), and on every state-changing API call the answers of a catalog that
/// cannot write: 503 `catalog_unavailable`, 507 `insufficient_storage`.
fn common_responses(doc: &mut Value) {
    let Some(paths) = doc["paths"].as_object_mut() else {
        return;
    };
    for (path, item) in paths.iter_mut() {
        let Some(item) = item.as_object_mut() else {
            continue;
        };
        for (method, op) in item.iter_mut() {
            let write = matches!(method.as_str(), "post" | "put" | "delete" | "patch");
            let has_input = op["parameters"].as_array().is_some_and(|p| !p.is_empty())
                || op.get("requestBody").is_some();
            let json_body = op["requestBody"]["content"]
                .get("application/json")
                .is_some();
            let Some(responses) = op["responses"].as_object_mut() else {
                continue;
            };
            let mut add = |code: &str, description: &str| {
                match responses.get_mut(code) {
                    // Already documented: name the extra code in its description.
                    Some(existing) => {
                        let text = existing["description"].as_str().unwrap_or_default();
                        let first = description.split(':').next().unwrap_or(description);
                        if !text.contains(first) {
                            let joined = if text.is_empty() {
                                description.to_string()
                            } else {
                                format!("{text}; {description}")
                            };
                            existing["description"] = Value::from(joined);
                        }
                    }
                    None => {
                        responses.insert(code.to_string(), error_response(description));
                    }
                }
            };
            if has_input {
                add(
                    "400",
                    "invalid_request: a malformed parameter or body (see the message)",
                );
            }
            if json_body {
                add("413", "too_large: the JSON body is over 1 MiB");
            }
            if write && path.starts_with("/api/") {
                add(
                    "503",
                    "catalog_unavailable: the catalog cannot store changes now; nothing was stored (Retry-After)",
                );
                add(
                    "507",
                    "insufficient_storage: the disk is full; nothing was stored",
                );
            }
        }
    }
}

mod constraints;

#[cfg(test)]
mod tests {
    use serde_json::Value;

    /// Every operation as (path, method, operation).
    fn operations(doc: &Value) -> Vec<(&str, &str, &Value)> {
        let mut out = Vec::new();
        for (path, item) in doc["paths"].as_object().unwrap() {
            for (method, op) in item.as_object().unwrap() {
                out.push((path.as_str(), method.as_str(), op));
            }
        }
        out
    }

    #[test]
    fn every_constraint_finds_its_place_and_ids_stay_unique() {
        let (doc, missing) = super::build();
        assert_eq!(
            missing,
            Vec::<String>::new(),
            "refinements of missing parts"
        );
        let doc = &doc;
        let mut ids = std::collections::HashSet::new();
        for (path, method, op) in operations(doc) {
            let id = op["operationId"].as_str().unwrap();
            assert!(ids.insert(id), "duplicate operationId {id}");
            let write = matches!(method, "post" | "put" | "delete" | "patch");
            if write && path.starts_with("/api/") {
                for code in ["503", "507"] {
                    assert!(op["responses"][code].is_object(), "{method} {path}: {code}");
                }
            }
            let has_input = op["parameters"].as_array().is_some_and(|p| !p.is_empty())
                || op.get("requestBody").is_some();
            assert_eq!(
                op["responses"]["400"].is_object(),
                has_input,
                "{method} {path}"
            );
            // Parameters are never `null` (a query string or a header has no null).
            for p in op["parameters"].as_array().into_iter().flatten() {
                let types = &p["schema"]["type"];
                assert!(
                    !types.as_array().is_some_and(|t| t.contains(&"null".into())),
                    "{method} {path}: {}",
                    p["name"]
                );
            }
        }
        assert!(ids.contains("firmware_upload") && ids.contains("firmware_upload_put"));
        // No key was inserted as `null` by mistake (`enum` lists may hold `null`).
        fn no_null_keys(v: &Value, at: &str) {
            match v {
                Value::Object(m) => m.iter().for_each(|(k, x)| {
                    assert!(!x.is_null(), "{at}/{k} is null");
                    no_null_keys(x, &format!("{at}/{k}"));
                }),
                Value::Array(a) => a.iter().for_each(|x| no_null_keys(x, at)),
                _ => {}
            }
        }
        no_null_keys(doc, "");
        // Every link names an operation there is.
        for (path, method, op) in operations(doc) {
            for response in op["responses"].as_object().unwrap().values() {
                for link in response["links"]
                    .as_object()
                    .into_iter()
                    .flat_map(|l| l.values())
                {
                    let target = link["operationId"].as_str().unwrap();
                    assert!(ids.contains(target), "{method} {path} links to {target}");
                }
            }
        }
        let ota = &doc["paths"]["/api/v1/ota"]["post"]["responses"]["503"]["description"];
        let ota = ota.as_str().unwrap();
        assert!(ota.contains("broker_unavailable") && ota.contains("catalog_unavailable"));
    }

    #[test]
    fn unsigned_limits_are_exact() {
        let doc = super::document();
        let params = doc["paths"]["/api/v1/devices"]["get"]["parameters"]
            .as_array()
            .unwrap();
        for name in ["limit", "seen_within_s"] {
            let p = params.iter().find(|p| p["name"] == name).unwrap();
            assert_eq!(p["schema"]["maximum"], u64::MAX, "{name}");
            assert!(p["schema"].get("format").is_none(), "{name}");
        }
    }
}
