//! The gRPC client the CLI verbs (and the tests) use: plain HTTP/2, or TLS (hyper-rustls over
//! the configured roots and client certificate), with the token in every call's metadata.

use anyhow::Context;
use tonic::service::interceptor::InterceptedService;
use tonic::transport::{Channel, Endpoint};

use crate::proto::worker_service_client::WorkerServiceClient;
use crate::rpc::ClientSecurity;

/// Adds `authorization: Bearer <token>` to each call when a token is set.
#[derive(Clone)]
pub struct Authorize(Option<tonic::metadata::MetadataValue<tonic::metadata::Ascii>>);

impl tonic::service::Interceptor for Authorize {
    fn call(&mut self, mut req: tonic::Request<()>) -> Result<tonic::Request<()>, tonic::Status> {
        if let Some(v) = &self.0 {
            req.metadata_mut().insert("authorization", v.clone());
        }
        Ok(req)
    }
}

/// A worker client that presents the CLI's token and TLS settings.
pub type WorkerClient = WorkerServiceClient<InterceptedService<Channel, Authorize>>;

/// Connects to a worker at `addr` presenting `security`.
pub async fn connect_with(addr: &str, security: &ClientSecurity) -> anyhow::Result<WorkerClient> {
    let url = security.url(addr);
    let endpoint = Endpoint::from_shared(url.clone()).with_context(|| format!("the worker address {url}"))?;
    let channel = if url.starts_with("https://") {
        let mut http = hyper_util::client::legacy::connect::HttpConnector::new();
        http.enforce_http(false);
        http.set_nodelay(true);
        let connector = hyper_rustls::HttpsConnector::from((http, security.tls_for(b"h2")));
        endpoint.connect_with_connector(connector).await
    } else {
        endpoint.connect().await
    }
    .with_context(|| format!("connecting to the worker at {url}"))?;
    let token = match &security.token {
        Some(t) => Some(t.bearer().parse().context("the token is not a valid header value")?),
        None => None,
    };
    Ok(WorkerServiceClient::with_interceptor(channel, Authorize(token)))
}
