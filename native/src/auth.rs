//! Authentication at the native edge: who is calling, before any method runs or any request
//! byte reaches Python.
//!
//! The rule is the Python transport's (`rnnserve.api.auth`), decided here for this transport:
//! - a bearer token (`authorization: Bearer <token>`, RFC 6750 section 2.1) names the
//!   principal the token file gives its SHA-256 digest; the presented token's digest is
//!   compared with every known digest in constant time, never looked up;
//! - under mutual TLS, a call without a token is its verified client certificate's principal;
//! - health, liveness and readiness stay open ([`OPEN_PREFIXES`]); any other call without a
//!   principal is refused UNAUTHENTICATED with one message whatever it asked for, and a call
//!   presenting a token the file does not know is refused even when its certificate would do.
//!
//! Python reads the token file (and reads it again when it changes) and hands the digests
//! over with `set_tokens`.

use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, RwLock};
use std::task::{Context as TaskContext, Poll};

use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;
use tonic::Status;
use tonic::body::Body;

use crate::queue::{Principal, Refusal};
use crate::service::Context;
use crate::tls::Peer;

/// Methods any caller may use: probes and load balancers call them without credentials.
pub const OPEN_PREFIXES: [&str; 3] = [
    "/grpc.health.v1.Health/",
    "/inference.GRPCInferenceService/ServerLive",
    "/inference.GRPCInferenceService/ServerReady",
];

const SCHEME: &str = "bearer ";

/// A request's principal, as a request extension for the services behind the layer.
#[derive(Debug, Clone)]
pub struct Authenticated(pub Principal);

type Tokens = Arc<Vec<([u8; 32], Arc<str>)>>;

/// Who a call is, from its token or its connection's certificate.
pub struct Authenticator {
    /// Token digests and their principals; None when the server takes no tokens.
    tokens: RwLock<Option<Tokens>>,
    certificates: bool,
    message: String,
}

impl Authenticator {
    /// `tokens`: the server takes bearer tokens (filled by `set_tokens`); `certificates`:
    /// mutual TLS names principals; `message`: what a refused call is told.
    pub fn new(tokens: bool, certificates: bool, message: String) -> Self {
        Self {
            tokens: RwLock::new(tokens.then(|| Arc::new(Vec::new()))),
            certificates,
            message,
        }
    }

    fn current_tokens(&self) -> Option<Tokens> {
        self.tokens
            .read()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .clone()
    }

    /// Replace the known tokens: (SHA-256 digest, principal) pairs.
    pub fn set_tokens(&self, tokens: Vec<([u8; 32], Arc<str>)>) {
        let mut current = self
            .tokens
            .write()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        if current.is_some() {
            *current = Some(Arc::new(tokens));
        }
    }

    /// What a call refused authentication is told.
    pub fn message(&self) -> &str {
        &self.message
    }

    /// The principal of a call to `path` with `authorization` metadata on a connection whose
    /// certificate named `peer`; None when the server authenticates no one or the method is
    /// open; the refusal otherwise.
    pub fn principal(
        &self,
        path: &str,
        authorization: Option<&str>,
        peer: &Principal,
    ) -> Result<Principal, Refusal> {
        let tokens = self.current_tokens();
        if (tokens.is_none() && !self.certificates)
            || OPEN_PREFIXES.iter().any(|p| path.starts_with(p))
        {
            return Ok(None);
        }
        if let Some(tokens) = tokens
            && (authorization.is_some() || !self.certificates)
        {
            return token_principal(&tokens, authorization).map(Some);
        }
        peer.clone().map(Some).ok_or(Refusal::Missing)
    }
}

fn token_principal(
    tokens: &[([u8; 32], Arc<str>)],
    authorization: Option<&str>,
) -> Result<Arc<str>, Refusal> {
    let authorization = authorization.ok_or(Refusal::Missing)?;
    let scheme = authorization.get(..SCHEME.len()).unwrap_or_default();
    let token = authorization.get(SCHEME.len()..).unwrap_or_default().trim();
    if !scheme.eq_ignore_ascii_case(SCHEME) || token.is_empty() {
        return Err(Refusal::Malformed);
    }
    let presented: [u8; 32] = Sha256::digest(token.as_bytes()).into();
    let mut found = None;
    for (digest, principal) in tokens {
        // Every entry: the time taken does not tell which matched.
        if bool::from(digest.ct_eq(&presented)) && found.is_none() {
            found = Some(principal.clone());
        }
    }
    found.ok_or(Refusal::Unknown)
}

/// The layer that authenticates every call before routing it.
#[derive(Clone)]
pub struct AuthLayer {
    pub authenticator: Arc<Authenticator>,
    pub context: Arc<Context>,
}

impl<S> tower::Layer<S> for AuthLayer {
    type Service = Auth<S>;

    fn layer(&self, inner: S) -> Auth<S> {
        Auth {
            inner,
            layer: self.clone(),
        }
    }
}

#[derive(Clone)]
pub struct Auth<S> {
    inner: S,
    layer: AuthLayer,
}

type BoxFuture<T> = Pin<Box<dyn Future<Output = T> + Send + 'static>>;

impl<S> tower::Service<http::Request<Body>> for Auth<S>
where
    S: tower::Service<http::Request<Body>, Response = http::Response<Body>>
        + Clone
        + Send
        + 'static,
    S::Future: Send + 'static,
    S::Error: Send + 'static,
{
    type Response = http::Response<Body>;
    type Error = S::Error;
    type Future = BoxFuture<Result<http::Response<Body>, S::Error>>;

    fn poll_ready(&mut self, cx: &mut TaskContext<'_>) -> Poll<Result<(), S::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut request: http::Request<Body>) -> Self::Future {
        let authorization = request
            .headers()
            .get("authorization")
            .and_then(|v| v.to_str().ok());
        let peer = request
            .extensions()
            .get::<Peer>()
            .map(|p| p.principal.clone())
            .unwrap_or_default();
        let found = self
            .layer
            .authenticator
            .principal(request.uri().path(), authorization, &peer);
        match found {
            Ok(principal) => {
                request.extensions_mut().insert(Authenticated(principal));
                // The service that was made ready runs this call; a clone waits for the next.
                let clone = self.inner.clone();
                let mut ready = std::mem::replace(&mut self.inner, clone);
                Box::pin(ready.call(request))
            }
            Err(why) => {
                self.layer.context.inbox.refused(why);
                let refused = Status::unauthenticated(self.layer.authenticator.message.clone());
                Box::pin(std::future::ready(Ok(refused.into_http())))
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn digest(token: &str) -> [u8; 32] {
        Sha256::digest(token.as_bytes()).into()
    }

    fn tokens(certificates: bool) -> Authenticator {
        let auth = Authenticator::new(true, certificates, "refused".into());
        auth.set_tokens(vec![
            (digest("s3cret"), Arc::from("alice")),
            (digest("other"), Arc::from("bob")),
        ]);
        auth
    }

    const INFER: &str = "/inference.GRPCInferenceService/ModelInfer";

    #[test]
    fn a_known_token_names_its_principal_whatever_the_scheme_case() {
        let auth = tokens(false);
        for header in ["Bearer s3cret", "bearer s3cret", "BEARER   s3cret  "] {
            let found = auth.principal(INFER, Some(header), &None);
            assert_eq!(found.unwrap().as_deref(), Some("alice"), "{header}");
        }
    }

    #[test]
    fn refusals_say_why() {
        let auth = tokens(false);
        assert_eq!(auth.principal(INFER, None, &None), Err(Refusal::Missing));
        assert_eq!(
            auth.principal(INFER, Some("Basic x"), &None),
            Err(Refusal::Malformed)
        );
        assert_eq!(
            auth.principal(INFER, Some("Bearer "), &None),
            Err(Refusal::Malformed)
        );
        assert_eq!(
            auth.principal(INFER, Some("Bearer nope"), &None),
            Err(Refusal::Unknown)
        );
    }

    #[test]
    fn open_methods_need_no_principal() {
        let auth = tokens(false);
        for path in [
            "/grpc.health.v1.Health/Check",
            "/inference.GRPCInferenceService/ServerLive",
            "/inference.GRPCInferenceService/ServerReady",
        ] {
            assert_eq!(auth.principal(path, None, &None), Ok(None), "{path}");
        }
        let model_ready = "/inference.GRPCInferenceService/ModelReady";
        assert_eq!(
            auth.principal(model_ready, None, &None),
            Err(Refusal::Missing)
        );
    }

    #[test]
    fn a_certificate_names_a_call_without_a_token_but_never_overrides_a_wrong_one() {
        let auth = tokens(true);
        let peer: Principal = Some(Arc::from("client-cn"));
        assert_eq!(
            auth.principal(INFER, None, &peer).unwrap().as_deref(),
            Some("client-cn")
        );
        assert_eq!(
            auth.principal(INFER, Some("Bearer nope"), &peer),
            Err(Refusal::Unknown)
        );
        assert_eq!(auth.principal(INFER, None, &None), Err(Refusal::Missing));
    }

    #[test]
    fn without_tokens_or_certificates_nobody_is_asked() {
        let auth = Authenticator::new(false, false, String::new());
        assert_eq!(auth.principal(INFER, None, &None), Ok(None));
        auth.set_tokens(vec![(digest("x"), Arc::from("x"))]);
        let found = auth.principal(INFER, None, &None);
        assert_eq!(
            found,
            Ok(None),
            "tokens cannot be turned on after the start"
        );
    }

    #[test]
    fn revoked_tokens_stop_working() {
        let auth = tokens(false);
        auth.set_tokens(vec![(digest("other"), Arc::from("bob"))]);
        assert_eq!(
            auth.principal(INFER, Some("Bearer s3cret"), &None),
            Err(Refusal::Unknown)
        );
    }
}
