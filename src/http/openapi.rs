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
    ),
    tags(
        (name = "firmware", description = "Release engineers: upload and manage packages"),
        (name = "downloads", description = "Gateways: package downloads and their progress"),
        (name = "ota", description = "Operators: upgrade a dock and its aircraft over MQTT"),
        (name = "rollouts", description = "Operators: stage a release across a fleet"),
        (name = "devices", description = "Docks and aircraft learned over MQTT or declared"),
        (name = "operations", description = "Health, readiness, metrics"),
    )
)]
pub struct ApiDoc;
