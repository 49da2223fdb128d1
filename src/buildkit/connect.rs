//! BuildKit addresses and the gRPC channel to them.
//!
//! - `unix://PATH`: a buildkitd's socket.
//! - `tcp://HOST:PORT`: a buildkitd listening on TCP (plain HTTP/2, no TLS).
//! - `docker-unix://PATH`: a Docker daemon's socket; its embedded BuildKit answers gRPC after
//!   an HTTP/1.1 `POST /grpc` with `Upgrade: h2c`, on the same connection.

use std::path::PathBuf;
use std::time::Duration;

use hyper_util::rt::TokioIo;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::UnixStream;
use tonic::transport::{Channel, Endpoint, Uri};

use super::BuildkitError;

/// How long connecting (and the Docker upgrade) may take.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// A parsed BuildKit address.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Address {
    Unix(PathBuf),
    Tcp(String),
    DockerUnix(PathBuf),
}

impl Address {
    pub fn parse(addr: &str) -> Result<Address, BuildkitError> {
        let bad = |reason: &str| BuildkitError::BadAddress { addr: addr.into(), reason: reason.into() };
        if let Some(path) = addr.strip_prefix("unix://") {
            if path.is_empty() {
                return Err(bad("no socket path after unix://"));
            }
            Ok(Address::Unix(path.into()))
        } else if let Some(path) = addr.strip_prefix("docker-unix://") {
            if path.is_empty() {
                return Err(bad("no socket path after docker-unix://"));
            }
            Ok(Address::DockerUnix(path.into()))
        } else if let Some(hostport) = addr.strip_prefix("tcp://") {
            match hostport.rsplit_once(':') {
                Some((host, port)) if !host.is_empty() && port.parse::<u16>().is_ok() => {
                    Ok(Address::Tcp(hostport.into()))
                }
                _ => Err(bad("expected tcp://HOST:PORT")),
            }
        } else {
            Err(bad("expected unix://PATH, tcp://HOST:PORT or docker-unix://PATH"))
        }
    }
}

/// Connects to `addr` (its text form, for errors).
pub async fn channel(addr: &str) -> Result<Channel, BuildkitError> {
    let parsed = Address::parse(addr)?;
    let unreachable = |reason: String| BuildkitError::Unreachable { addr: addr.to_string(), reason };
    let endpoint = |uri: String| {
        Endpoint::from_shared(uri)
            .map(|e| e.connect_timeout(CONNECT_TIMEOUT))
            .map_err(|e| BuildkitError::BadAddress { addr: addr.to_string(), reason: e.to_string() })
    };
    let result = match parsed {
        Address::Tcp(hostport) => endpoint(format!("http://{hostport}"))?.connect().await,
        Address::Unix(path) => {
            endpoint("http://buildkitd".into())?
                .connect_with_connector(tower::service_fn(move |_: Uri| {
                    let path = path.clone();
                    async move { UnixStream::connect(&path).await.map(TokioIo::new) }
                }))
                .await
        }
        Address::DockerUnix(path) => {
            endpoint("http://docker".into())?
                .connect_with_connector(tower::service_fn(move |_: Uri| {
                    let path = path.clone();
                    async move {
                        let stream = tokio::time::timeout(CONNECT_TIMEOUT, upgrade(&path)).await.map_err(|_| {
                            std::io::Error::new(std::io::ErrorKind::TimedOut, "the upgrade timed out")
                        })??;
                        Ok::<_, std::io::Error>(TokioIo::new(stream))
                    }
                }))
                .await
        }
    };
    result.map_err(|e| unreachable(error_chain(&e)))
}

/// The HTTP/1.1 upgrade of a Docker daemon's connection to its BuildKit's HTTP/2 gRPC.
async fn upgrade(path: &std::path::Path) -> std::io::Result<UnixStream> {
    let mut stream = UnixStream::connect(path).await?;
    stream
        .write_all(
            b"POST /grpc HTTP/1.1\r\nHost: docker\r\nConnection: Upgrade\r\nUpgrade: h2c\r\nContent-Length: 0\r\n\r\n",
        )
        .await?;
    // Read the response head a byte at a time: the daemon may start HTTP/2 (its SETTINGS)
    // right after it, and those bytes belong to the HTTP/2 client, not to us.
    let mut head = Vec::with_capacity(256);
    while !head.ends_with(b"\r\n\r\n") {
        if head.len() > 16 << 10 {
            return Err(std::io::Error::other("the daemon's response head is too long"));
        }
        let b = stream.read_u8().await?;
        head.push(b);
    }
    let text = String::from_utf8_lossy(&head);
    let status = text.lines().next().unwrap_or_default().to_string();
    if status.split_whitespace().nth(1) != Some("101") {
        return Err(std::io::Error::other(format!("POST /grpc was answered {status:?}, not 101 Switching Protocols")));
    }
    Ok(stream)
}

/// An error with its causes, for messages (tonic's transport error alone says "transport error").
pub(crate) fn error_chain(e: &dyn std::error::Error) -> String {
    let mut out = e.to_string();
    let mut cur = e.source();
    while let Some(s) = cur {
        let text = s.to_string();
        if !out.contains(&text) {
            out.push_str(": ");
            out.push_str(&text);
        }
        cur = s.source();
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn addresses_parse_and_bad_ones_are_named() {
        assert_eq!(
            Address::parse("unix:///run/buildkit/buildkitd.sock").unwrap(),
            Address::Unix("/run/buildkit/buildkitd.sock".into())
        );
        assert_eq!(Address::parse("tcp://127.0.0.1:1234").unwrap(), Address::Tcp("127.0.0.1:1234".into()));
        assert_eq!(
            Address::parse("docker-unix:///var/run/docker.sock").unwrap(),
            Address::DockerUnix("/var/run/docker.sock".into())
        );
        for bad in ["http://x", "tcp://nohost", "unix://", "tcp://:12"] {
            let e = Address::parse(bad).unwrap_err().to_string();
            assert!(e.contains(bad), "{e}");
        }
    }

    #[tokio::test]
    async fn an_unreachable_daemon_is_named_in_the_error() {
        let dir = tempfile::tempdir().unwrap();
        for addr in [
            format!("unix://{}/none.sock", dir.path().display()),
            format!("docker-unix://{}/none.sock", dir.path().display()),
        ] {
            let e = channel(&addr).await.unwrap_err();
            assert!(matches!(e, BuildkitError::Unreachable { .. }), "{e}");
            assert!(e.to_string().contains(&addr), "{e}");
        }
    }
}
