//! The OpenAPI document, generated from the handlers' annotations.

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
/// OpenAPI requires them unique, so each is prefixed with its tag (`rollouts_list`).
struct UniqueOperationIds;

impl utoipa::Modify for UniqueOperationIds {
    fn modify(&self, api: &mut utoipa::openapi::OpenApi) {
        for op in operations(api) {
            let tag = op.tags.as_ref().and_then(|t| t.first()).cloned();
            if let (Some(tag), Some(id)) = (tag, op.operation_id.as_mut()) {
                if !id.starts_with(&format!("{tag}_")) {
                    *id = format!("{tag}_{id}");
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
    api.paths.paths.values_mut().flat_map(|item| {
        [
            &mut item.get,
            &mut item.put,
            &mut item.post,
            &mut item.delete,
            &mut item.head,
            &mut item.patch,
        ]
        .into_iter()
        .flatten()
    })
}
