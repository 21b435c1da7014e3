//! The HTTP listeners: binding, the actix application with its routes and middleware, and
//! serving each listener (main, downloads, metrics) until shutdown.

use super::*;

pub(super) fn bind(addr: SocketAddr) -> Result<(TcpListener, SocketAddr), StartupError> {
    let listener = TcpListener::bind(addr).map_err(|source| StartupError::Bind { addr, source })?;
    let bound = listener
        .local_addr()
        .map_err(|source| StartupError::Bind { addr, source })?;
    Ok((listener, bound))
}

/// The app of one listener: the same middleware everywhere, the routes of its role.
pub(super) fn app(
    data: web::Data<AppState>,
    role: Listener,
) -> App<
    impl actix_web::dev::ServiceFactory<
        actix_web::dev::ServiceRequest,
        Config = (),
        Response = actix_web::dev::ServiceResponse<impl actix_web::body::MessageBody>,
        Error = actix_web::Error,
        InitError = (),
    >,
> {
    App::new()
        .app_data(data)
        .app_data(role)
        .wrap(http::json_errors())
        .wrap_fn(|req, srv| {
            use actix_web::HttpMessage;
            use actix_web::dev::Service;
            let id = req
                .extensions()
                .get::<tracing_actix_web::RequestId>()
                .map(|id| id.to_string());
            let stopping = req
                .app_data::<web::Data<AppState>>()
                .map(|s| s.stopping.clone());
            let fut = srv.call(req);
            async move {
                let mut res = fut.await?;
                if stopping.is_some_and(|s| s.is_cancelled()) {
                    res.response_mut()
                        .head_mut()
                        .set_connection_type(actix_web::http::ConnectionType::Close);
                }
                if let Some(v) =
                    id.and_then(|id| actix_web::http::header::HeaderValue::from_str(&id).ok())
                {
                    res.headers_mut().insert(
                        actix_web::http::header::HeaderName::from_static("x-request-id"),
                        v,
                    );
                }
                Ok(res)
            }
        })
        // Tokens and scopes, rate limits, download slots, the audit log.
        .wrap(actix_web::middleware::from_fn(http::access::gate))
        .wrap(TracingLogger::default())
        .configure(move |cfg| match role {
            Listener::Main => http::routes(cfg),
            Listener::Downloads => http::download_routes(cfg),
            Listener::Metrics => http::metrics_routes(cfg),
        })
        .default_service(web::to(http::access::not_found))
}

/// How long an idle keep-alive connection stays open (also the longest an idle client can
/// delay a shutdown).
const KEEP_ALIVE: Duration = Duration::from_secs(5);

/// The HTTP/1 service over one kind of connection, as actix-web's HttpServer builds it (which
/// cannot wrap the connection: the wrapper gives actix-http's own error answers JSON).
fn http_service<T>(
    data: web::Data<AppState>,
    role: Listener,
    addr: SocketAddr,
) -> impl actix_service::ServiceFactory<
    (T, actix_http::Protocol, Option<SocketAddr>),
    Config = (),
    Response = (),
    Error = actix_http::error::DispatchError,
    InitError = (),
>
where
    T: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + 'static,
{
    use actix_service::{IntoServiceFactory, ServiceFactoryExt, map_config};
    let connections = data.budget.clone();
    actix_http::HttpService::build()
        // actix drains connections on shutdown but never closes idle keep-alive ones: an idle
        // connection is closed after KEEP_ALIVE instead of holding the whole grace period, and
        // while stopping every answer says `Connection: close`.
        .keep_alive(KEEP_ALIVE)
        .client_request_timeout(Duration::from_secs(10))
        .local_addr(addr)
        // Each open connection takes a share of the download buffer budget.
        .on_connect_ext(move |_: &T, ext: &mut actix_web::dev::Extensions| {
            ext.insert(connections.connection_guard());
        })
        .finish(map_config(
            app(data, role)
                .into_factory()
                .map_err(|e: actix_web::Error| e.error_response()),
            |_| actix_web::dev::AppConfig::default(),
        ))
}

/// An HTTP server for `role` on `listener` (HTTPS with `tls`).
pub(super) fn serve(
    data: &web::Data<AppState>,
    role: Listener,
    listener: TcpListener,
    tls: Option<rustls::ServerConfig>,
    grace: Duration,
) -> Result<Server, StartupError> {
    use actix_service::{ServiceFactoryExt, fn_service};
    use http_conn::JsonErrorIo;

    let addr = listener
        .local_addr()
        .unwrap_or_else(|_| SocketAddr::from(([0, 0, 0, 0], 0)));
    let bind_err = |source| StartupError::Bind { addr, source };
    let data = data.clone();
    let builder = actix_server::Server::build()
        .disable_signals()
        .shutdown_timeout(grace.as_secs());
    let name = format!("fwrepo-{addr}");
    let builder = match tls {
        None => builder.listen(name, listener, move || {
            fn_service(|io: actix_rt::net::TcpStream| async move {
                let peer = io.peer_addr().ok();
                Ok::<_, actix_http::error::DispatchError>((
                    JsonErrorIo::new(io),
                    actix_http::Protocol::Http1,
                    peer,
                ))
            })
            .and_then(http_service(data.clone(), role, addr))
        }),
        Some(mut config) => {
            config.alpn_protocols = vec![b"http/1.1".to_vec()];
            builder.listen(name, listener, move || {
                let mut acceptor = actix_tls::accept::rustls_0_23::Acceptor::new(config.clone());
                acceptor.set_handshake_timeout(Duration::from_secs(10));
                acceptor
                    .map_init_err(|_| ())
                    .map_err(|e| {
                        tracing::debug!(error = ?e, "TLS handshake failed");
                        actix_http::error::DispatchError::Io(std::io::Error::other(
                            "TLS handshake failed",
                        ))
                    })
                    .and_then(fn_service(
                        |io: actix_tls::accept::rustls_0_23::TlsStream<
                            actix_rt::net::TcpStream,
                        >| async move {
                            let peer = io.get_ref().0.peer_addr().ok();
                            Ok::<_, actix_http::error::DispatchError>((
                                JsonErrorIo::new(io),
                                actix_http::Protocol::Http1,
                                peer,
                            ))
                        },
                    ))
                    .and_then(http_service(data.clone(), role, addr))
            })
        }
    }
    .map_err(bind_err)?;
    Ok(builder.run())
}
