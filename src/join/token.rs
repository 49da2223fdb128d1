//! The worker's credential with the newest controller, renewed before it expires, as Iris's
//! worker does: Iris's worker tokens are JWTs of 30 days, exchanged for a fresh one through
//! `ControllerService/RenewWorkerToken` (authorised by the current one) once less than a day
//! is left. The renewed token replaces the one every client of the worker sends (they share
//! it: [`AuthToken::replace`]) and is kept, root-only, in the state directory
//! (`credentials/worker.jwt`), so a restarted worker starts from it rather than from the
//! `--auth-token-file` it was given weeks ago — which may have expired meanwhile.
//!
//! A token that is not a JWT with an `exp` (a static shared secret) is never renewed.

use std::path::{Path, PathBuf};
use std::time::Duration;

use base64::Engine;
use iris_wire::auth::AuthToken;

use crate::proto::newest::iris::cluster::controller::{RenewWorkerTokenRequest, RenewWorkerTokenResponse};
use crate::rpc::connect::ConnectClient;

/// Renewed once less than this is left (Iris's `WORKER_TOKEN_REFRESH_MARGIN`).
pub const RENEW_MARGIN: Duration = Duration::from_secs(86_400);
/// After a failed renewal, the next try.
const RETRY_AFTER: Duration = Duration::from_secs(60);
/// The longest sleep between looks at the clock (a suspended host wakes late).
const LOOK_EVERY: Duration = Duration::from_secs(3600);
/// RenewWorkerToken's deadline (Iris's worker uses 10 s).
const CALL_TIMEOUT: Duration = Duration::from_secs(10);

/// The claims of a JWT that say whose it is and until when (its signature is the controller's
/// to check, not ours).
#[derive(Debug, Clone, PartialEq, Eq, serde::Deserialize)]
pub struct Claims {
    /// Expiry, Unix seconds.
    pub exp: i64,
    #[serde(default)]
    pub iss: Option<String>,
    #[serde(default)]
    pub aud: Option<serde_json::Value>,
    #[serde(default)]
    pub sub: Option<String>,
}

impl Claims {
    /// The claims of `token`, if it is a JWT with an expiry.
    pub fn of(token: &str) -> Option<Claims> {
        let mut parts = token.split('.');
        let (_header, payload, _signature) = (parts.next()?, parts.next()?, parts.next()?);
        if parts.next().is_some() {
            return None;
        }
        let json = base64::engine::general_purpose::URL_SAFE_NO_PAD.decode(payload.trim_end_matches('=')).ok()?;
        serde_json::from_slice(&json).ok()
    }

    /// Whether `other` is a credential of the same holder from the same issuer.
    fn same_holder(&self, other: &Claims) -> bool {
        (&self.iss, &self.aud, &self.sub) == (&other.iss, &other.aud, &other.sub)
    }
}

/// Where the renewed token is kept.
pub fn cache_path(state_dir: &Path) -> PathBuf {
    state_dir.join(crate::taskdir::CREDENTIALS).join(crate::taskdir::WORKER_TOKEN)
}

/// At start: the token renewed by an earlier run replaces `token` when it is the same
/// holder's and lasts longer.
pub fn adopt_cached(token: &AuthToken, state_dir: &Path) {
    let Some(given) = Claims::of(&token.value()) else { return };
    let Ok(text) = std::fs::read_to_string(cache_path(state_dir)) else { return };
    let cached = text.trim();
    match Claims::of(cached) {
        Some(c) if c.same_holder(&given) && c.exp > given.exp && token.replace(cached) => {
            tracing::info!(expires_at = c.exp, "using the worker token renewed by an earlier run");
        }
        _ => {}
    }
}

/// Renews `token` through the controller `client` whenever less than [`RENEW_MARGIN`] is left;
/// returns at once for a token without an expiry. Runs until its task is dropped.
pub async fn keep_renewed(client: ConnectClient, token: AuthToken, state_dir: PathBuf) {
    loop {
        let Some(claims) = Claims::of(&token.value()) else {
            tracing::debug!("the worker token is no JWT with an expiry: it is not renewed");
            return;
        };
        let due = claims.exp.saturating_sub(RENEW_MARGIN.as_secs() as i64);
        let now = iris_wire::clock::now_ms() / 1000;
        if now < due {
            let wait = Duration::from_secs((due - now) as u64).min(LOOK_EVERY);
            tokio::time::sleep(wait).await;
            continue;
        }
        match renew(&client, &token, &claims, &state_dir).await {
            Ok(exp) => tracing::info!(expires_at = exp, "renewed the worker token"),
            Err(why) => {
                tracing::warn!(error = %why, expires_at = claims.exp, "renewing the worker token; retrying");
                tokio::time::sleep(RETRY_AFTER).await;
            }
        }
    }
}

/// One exchange: the new token's expiry, once it is what the worker sends and is kept.
async fn renew(client: &ConnectClient, token: &AuthToken, old: &Claims, state_dir: &Path) -> Result<i64, String> {
    let resp: RenewWorkerTokenResponse = client
        .call("iris.cluster.ControllerService", "RenewWorkerToken", &RenewWorkerTokenRequest {}, CALL_TIMEOUT)
        .await
        .map_err(|e| e.to_string())?;
    let Some(new) = Claims::of(&resp.token) else {
        return Err("the controller's answer is no JWT with an expiry".into());
    };
    // A token that would be due again at once (a host clock far ahead, a short-lived issuer)
    // is refused: the retry waits a minute rather than ask again in a loop.
    let due_now = iris_wire::clock::now_ms() / 1000 + RENEW_MARGIN.as_secs() as i64;
    if new.exp <= old.exp.max(due_now) {
        return Err(format!("the controller's token expires too soon ({}) to be of use", new.exp));
    }
    if !token.replace(&resp.token) {
        return Err("the controller's token is not a valid header value".into());
    }
    // Kept for the next start; the running worker already sends it, so a failure here only
    // costs a renewal after a restart.
    if let Err(e) = keep(state_dir, &resp.token) {
        tracing::warn!(error = %e, "keeping the renewed worker token");
    }
    Ok(new.exp)
}

/// Writes the token, root-only, under a temp name renamed into place: a reader never sees
/// half of it.
fn keep(state_dir: &Path, token: &str) -> std::io::Result<()> {
    let dir = state_dir.join(crate::taskdir::CREDENTIALS);
    crate::taskdir::make_private_dir(&dir)?;
    let tmp = dir.join(format!(".{}.tmp", crate::taskdir::WORKER_TOKEN));
    crate::taskdir::write_private(&tmp, token.as_bytes())?;
    std::fs::rename(&tmp, dir.join(crate::taskdir::WORKER_TOKEN))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn jwt(claims: &str) -> String {
        let b64 = |s: &str| base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(s);
        format!("{}.{}.c2ln", b64(r#"{"alg":"EdDSA","typ":"JWT"}"#), b64(claims))
    }

    #[test]
    fn a_jwt_says_whose_it_is_and_until_when() {
        let c = Claims::of(&jwt(r#"{"sub":"system:worker","iss":"c1","aud":"iris","exp":1800000000}"#)).unwrap();
        assert_eq!((c.exp, c.sub.as_deref(), c.iss.as_deref()), (1_800_000_000, Some("system:worker"), Some("c1")));
        assert_eq!(Claims::of("a-static-shared-secret"), None);
        assert_eq!(Claims::of(&jwt(r#"{"sub":"x"}"#)), None, "no expiry: never renewed");
        assert_eq!(Claims::of("a.b.c.d"), None);
    }

    #[test]
    fn a_kept_token_is_adopted_only_when_it_is_the_same_holders_and_lasts_longer() {
        let state = tempfile::tempdir().unwrap();
        let given = jwt(r#"{"sub":"w","iss":"c1","exp":1000}"#);
        let later = jwt(r#"{"sub":"w","iss":"c1","exp":2000}"#);
        let other_cluster = jwt(r#"{"sub":"w","iss":"c2","exp":3000}"#);
        let token = AuthToken::new(&given).unwrap();
        adopt_cached(&token, state.path());
        assert_eq!(&*token.value(), given, "nothing kept yet");
        keep(state.path(), &other_cluster).unwrap();
        adopt_cached(&token, state.path());
        assert_eq!(&*token.value(), given, "another cluster's token");
        keep(state.path(), &later).unwrap();
        let clone = token.clone();
        adopt_cached(&token, state.path());
        assert_eq!(&*clone.value(), later, "every clone sends the adopted token");
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(cache_path(state.path())).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
    }
}
