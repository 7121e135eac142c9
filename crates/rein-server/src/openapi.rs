//! `GET /openapi.json`: the API's OpenAPI 3.1 document, generated from the code (utoipa): each
//! handler's `#[utoipa::path]` (registered with the router by the same `routes!` call, so a
//! route cannot be served without being documented) and the types of its bodies and
//! parameters (`rein_app::views` for answers). What every `/v1` operation shares (its
//! authentication, the 401 and the problem+json default answer) is added here, once.

use axum::http::{HeaderValue, header};
use axum::response::{IntoResponse, Response};
use std::sync::Arc;
use utoipa::openapi::security::{Http, HttpAuthScheme, SecurityRequirement, SecurityScheme};
use utoipa::openapi::{
    ContentBuilder, InfoBuilder, OpenApi, OpenApiBuilder, Ref, RefOr, ResponseBuilder,
};

/// The security scheme of the tenants' API keys.
const TENANT_KEY: &str = "tenant_key";
/// The security scheme of the admin key.
const ADMIN_KEY: &str = "admin_key";

/// The document before the routes add their paths.
pub(super) fn base() -> OpenApi {
    OpenApiBuilder::new()
        .info(
            InfoBuilder::new()
                .title("Rein")
                .version(env!("CARGO_PKG_VERSION"))
                .description(Some(
                    "Rein's HTTP API: hosted agent runs (queued, streamed, approved, cancelled, \
                     traced, audited, costed) and an OpenAI-compatible gateway that governs \
                     plain model calls. Every /v1 request authenticates with a tenant's API key \
                     (`Authorization: Bearer`), which scopes everything it can see; /v1/admin \
                     takes the admin key. Errors are RFC 9457 problem+json.",
                ))
                .build(),
        )
        .build()
}

/// Adds what every `/v1` operation shares, and the security schemes.
pub(super) fn finish(mut doc: OpenApi) -> Arc<str> {
    let components = doc.components.get_or_insert_with(Default::default);
    components.add_security_scheme(
        TENANT_KEY,
        SecurityScheme::Http(Http::new(HttpAuthScheme::Bearer)),
    );
    components.add_security_scheme(
        ADMIN_KEY,
        SecurityScheme::Http(Http::new(HttpAuthScheme::Bearer)),
    );
    for (path, item) in doc.paths.paths.iter_mut() {
        if !path.starts_with("/v1/") {
            continue;
        }
        let scheme = if path.starts_with("/v1/admin/") {
            ADMIN_KEY
        } else {
            TENANT_KEY
        };
        for operation in [&mut item.get, &mut item.post, &mut item.delete]
            .into_iter()
            .flatten()
        {
            operation.security = Some(vec![SecurityRequirement::new::<_, _, String>(scheme, [])]);
            let responses = &mut operation.responses.responses;
            responses.entry("401".into()).or_insert_with(|| {
                problem("The `Authorization: Bearer` key is missing or not a key of this API")
            });
            if scheme == ADMIN_KEY {
                responses
                    .entry("403".into())
                    .or_insert_with(|| problem("The admin API is off (no admin key is set)"));
            }
            responses
                .entry("default".into())
                .or_insert_with(|| problem("Any other error, with its reason"));
        }
    }
    // Every answer names its request (the `request_id` middleware), whatever the route.
    let request_id = utoipa::openapi::header::HeaderBuilder::new()
        .description(Some(
            "The request's id: the client's own `X-Request-Id` when it is a plain token (1 to \
             128 letters, digits, `-`, `_`, `.`, `:`), else a new UUID. The server's log lines \
             for the request carry it.",
        ))
        .build();
    for item in doc.paths.paths.values_mut() {
        for operation in [&mut item.get, &mut item.post, &mut item.delete]
            .into_iter()
            .flatten()
        {
            for response in operation.responses.responses.values_mut() {
                if let RefOr::T(response) = response {
                    response
                        .headers
                        .insert("X-Request-Id".into(), RefOr::T(request_id.clone()));
                }
            }
        }
    }
    // Serializing a document of plain data cannot fail; an empty one would say so at once.
    Arc::from(serde_json::to_string(&doc).unwrap_or_default())
}

fn problem(description: &str) -> RefOr<utoipa::openapi::Response> {
    ResponseBuilder::new()
        .description(description)
        .content(
            "application/problem+json",
            ContentBuilder::new()
                .schema(Some(Ref::from_schema_name("ProblemView")))
                .build(),
        )
        .build()
        .into()
}

/// The document, as JSON.
pub(super) async fn serve(document: Arc<str>) -> Response {
    let mut response = document.to_string().into_response();
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    response
}
