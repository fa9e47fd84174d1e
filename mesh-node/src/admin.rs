//! Admin endpoint, bound to localhost only: `GET /config_dump` (config, workloads, policies,
//! certificates with expiry — never keys), `GET /ready`, `GET /debug/explain?src=..&dst=..`
//! (why a connection or request ends as it does: [`crate::explain`]), `POST /logging?level=<filter>` (runtime
//! log level), `POST /quitquitquit` (start a graceful shutdown). The two `POST`s need the
//! admin token ([`credential`]).

pub mod credential;

use std::{net::SocketAddr, sync::Arc};

use http::{Method, StatusCode};
use tokio::{net::TcpListener, sync::watch};

pub use credential::Credential;

use crate::{
    drain, http_util,
    identity::CertStore,
    proxy,
    readiness::Ready,
    state::StateRx,
};

/// Changes the log filter at runtime (wired to tracing-subscriber's reload handle by `main`).
pub type LogControl = Arc<dyn Fn(&str) -> Result<(), String> + Send + Sync>;

pub struct Admin {
    listener: TcpListener,
    addr: SocketAddr,
    refused: proxy::accept::Refused,
    ctx: Arc<Ctx>,
}

struct Ctx {
    cfg: Arc<proxy::Config>,
    state: StateRx,
    certs: Arc<CertStore>,
    ready: Ready,
    log: Option<LogControl>,
    shutdown: watch::Sender<bool>,
    credential: Credential,
}

impl Admin {
    #[expect(clippy::too_many_arguments, reason = "one call site, in app::build_with, hands over what it built")]
    pub async fn new(
        listen: impl Into<proxy::Listen>,
        cfg: Arc<proxy::Config>,
        state: StateRx,
        certs: Arc<CertStore>,
        ready: Ready,
        log: Option<LogControl>,
        shutdown: watch::Sender<bool>,
        refused: proxy::accept::Refused,
        credential: Credential,
    ) -> Result<Self, proxy::Error> {
        let (listener, addr) = listen.into().open().await?;
        Ok(Self { listener, addr, refused, ctx: Arc::new(Ctx { cfg, state, certs, ready, log, shutdown, credential }) })
    }

    pub fn address(&self) -> SocketAddr {
        self.addr
    }

    /// A duplicate of the listening socket (for a successor, `crate::handoff`).
    pub fn socket(&self) -> std::io::Result<std::os::fd::OwnedFd> {
        std::os::fd::AsFd::as_fd(&self.listener).try_clone_to_owned()
    }

    pub async fn run(self, drain: drain::Watcher) {
        let ctx = self.ctx;
        let handler = Arc::new(move |req: http_util::Req| {
            let ctx = ctx.clone();
            async move { ctx.handle(&req) }
        });
        http_util::serve(self.listener, "admin", self.refused, handler, drain).await;
    }
}

impl Ctx {
    fn handle(&self, req: &http_util::Req) -> http::Response<http_util::Body> {
        let text = |code, body: String| http_util::reply(code, "text/plain", body);
        if req.method == Method::POST
            && let Err((code, why)) = self.credential.check(req.authorization.as_ref())
        {
            tracing::warn!(path = %req.path, status = code.as_u16(), "admin mutation refused");
            return text(code, why);
        }
        match (&req.method, req.path.as_str()) {
            (&Method::GET, "/config_dump") => {
                let state = self.state.borrow().clone();
                let dump = serde_json::json!({
                    "buildVersion": env!("CARGO_PKG_VERSION"),
                    "proxy": &*self.cfg,
                    "trustDomain": state.trust_domain,
                    "rootNamespace": state.root_namespace,
                    "config": state.snapshot(),
                    "certificates": self.certs.dump(),
                });
                http_util::reply(StatusCode::OK, "application/json", serde_json::to_string_pretty(&dump).unwrap_or_default())
            }
            (&Method::GET, "/ready") => crate::metrics::ready_reply(&self.ready),
            (&Method::GET, "/debug/explain") => match crate::explain::parse_query(&req.query) {
                Ok(q) => {
                    let state = self.state.borrow().clone();
                    let answer = crate::explain::explain(&state, &self.cfg.node_name, &q);
                    http_util::reply(StatusCode::OK, "application/json", serde_json::to_string_pretty(&answer).unwrap_or_default())
                }
                Err(e) => text(StatusCode::BAD_REQUEST, format!("{e}\n")),
            },
            (&Method::POST, "/logging") => {
                let Some(level) = req.query.split('&').find_map(|kv| kv.strip_prefix("level=")) else {
                    return text(StatusCode::BAD_REQUEST, "usage: POST /logging?level=<filter>\n".into());
                };
                match &self.log {
                    Some(set) => match set(level) {
                        Ok(()) => text(StatusCode::OK, format!("log level set to {level}\n")),
                        Err(e) => text(StatusCode::BAD_REQUEST, format!("{e}\n")),
                    },
                    None => text(StatusCode::NOT_IMPLEMENTED, "no log control in this process\n".into()),
                }
            }
            (&Method::POST, "/quitquitquit") => {
                self.shutdown.send_replace(true);
                text(StatusCode::OK, "draining\n".into())
            }
            _ => text(StatusCode::NOT_FOUND, "GET /config_dump, GET /ready, GET /debug/explain?src=&dst=, POST /logging?level=, POST /quitquitquit\n".into()),
        }
    }
}
