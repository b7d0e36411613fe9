//! TLS on the native transport (rustls): the server's certificate and key, with a client CA
//! mutual TLS, reloaded when the files change; and who a verified client certificate names.
//!
//! The rule is the Python transport's (`rnnserve.tls`), decided here for this transport: each
//! new connection's handshake compares the files' stat (inode, size, modification time) with
//! the ones loaded and reads them again only when one changed, so a renewed certificate
//! reaches new connections without a restart while connections already open keep theirs. A
//! half-written rotation (a certificate without its new key) is refused with a warning and
//! the previous pair goes on serving until the files agree again.

use std::io;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context as TaskContext, Poll};

use rustls::ServerConfig;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::WebPkiClientVerifier;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;
use tokio_rustls::server::TlsStream;

use crate::queue::Principal;

/// Where the server's PEM files are.
#[derive(Debug, Clone)]
pub struct TlsFiles {
    pub cert: PathBuf,
    pub key: PathBuf,
    pub client_ca: Option<PathBuf>,
}

/// A TLS file that cannot be used, naming it and the flag that set it.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("{flag} {path}: cannot read it ({source})")]
    Unreadable {
        flag: &'static str,
        path: String,
        source: io::Error,
    },
    #[error("{flag} {path}: {what}")]
    Unusable {
        flag: &'static str,
        path: String,
        what: String,
    },
    #[error("TLS files {cert} and {key} keep changing while read")]
    Changing { cert: String, key: String },
}

type Signature = Vec<Option<(u64, u64, i64, i64)>>;

#[derive(PartialEq)]
struct Material {
    cert: Vec<u8>,
    key: Vec<u8>,
    client_ca: Option<Vec<u8>>,
}

struct Loaded {
    signature: Signature,
    material: Material,
    config: Arc<ServerConfig>,
}

/// The server's TLS configuration, loaded now and again when its files change.
pub struct TlsSource {
    files: TlsFiles,
    loaded: Mutex<Loaded>,
}

impl TlsSource {
    /// Load and check the files; the error names the one that cannot be used.
    pub fn new(files: TlsFiles) -> Result<Self, TlsError> {
        let signature = signature(&files);
        let (material, config) = load(&files)?;
        Ok(Self {
            files,
            loaded: Mutex::new(Loaded {
                signature,
                material,
                config,
            }),
        })
    }

    /// Whether clients must present a certificate the client CA signed.
    pub fn mutual(&self) -> bool {
        self.files.client_ca.is_some()
    }

    /// The configuration for a new connection: the files' current one when they changed and
    /// are whole, else the one in use.
    pub fn config(&self) -> Arc<ServerConfig> {
        let mut loaded = self
            .loaded
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        let seen = signature(&self.files);
        if seen == loaded.signature {
            return loaded.config.clone();
        }
        loaded.signature = seen;
        match load(&self.files) {
            Ok((material, config)) => {
                if material != loaded.material {
                    loaded.material = material;
                    loaded.config = config;
                    tracing::info!(
                        "TLS certificate reloaded from {}",
                        self.files.cert.display()
                    );
                }
            }
            Err(error) => {
                tracing::warn!("{error}; the previous certificate is served until it is fixed")
            }
        }
        loaded.config.clone()
    }
}

fn signature(files: &TlsFiles) -> Signature {
    // A rotation that renames files into place (or swaps a Secret's symlink) changes the
    // inode; one that rewrites them changes the size or the modification time.
    [
        Some(&files.cert),
        Some(&files.key),
        files.client_ca.as_ref(),
    ]
    .into_iter()
    .flatten()
    .map(|path| {
        std::fs::metadata(path)
            .ok()
            .map(|m| (m.ino(), m.size(), m.mtime(), m.mtime_nsec()))
    })
    .collect()
}

fn read(path: &Path, flag: &'static str) -> Result<Vec<u8>, TlsError> {
    std::fs::read(path).map_err(|source| TlsError::Unreadable {
        flag,
        path: path.display().to_string(),
        source,
    })
}

fn read_all(files: &TlsFiles) -> Result<Material, TlsError> {
    let client_ca = match &files.client_ca {
        Some(path) => Some(read(path, "--tls-client-ca")?),
        None => None,
    };
    Ok(Material {
        cert: read(&files.cert, "--tls-cert")?,
        key: read(&files.key, "--tls-key")?,
        client_ca,
    })
}

/// The files' bytes and the configuration they make. The bytes are read before and after
/// building it: a rotation between the two reads is read again, not used half-way.
fn load(files: &TlsFiles) -> Result<(Material, Arc<ServerConfig>), TlsError> {
    for _ in 0..3 {
        let material = read_all(files)?;
        let config = configure(files, &material)?;
        if read_all(files)? == material {
            return Ok((material, Arc::new(config)));
        }
    }
    Err(TlsError::Changing {
        cert: files.cert.display().to_string(),
        key: files.key.display().to_string(),
    })
}

fn unusable(flag: &'static str, path: &Path, what: impl Into<String>) -> TlsError {
    TlsError::Unusable {
        flag,
        path: path.display().to_string(),
        what: what.into(),
    }
}

fn configure(files: &TlsFiles, material: &Material) -> Result<ServerConfig, TlsError> {
    let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_slice_iter(&material.cert)
        .collect::<Result<_, _>>()
        .map_err(|e| unusable("--tls-cert", &files.cert, format!("not PEM ({e})")))?;
    if certs.is_empty() {
        return Err(unusable(
            "--tls-cert",
            &files.cert,
            "no PEM certificate in it",
        ));
    }
    if String::from_utf8_lossy(&material.key).contains("ENCRYPTED") {
        return Err(unusable(
            "--tls-key",
            &files.key,
            "the key is encrypted; the server needs it without a passphrase",
        ));
    }
    let key = PrivateKeyDer::from_pem_slice(&material.key)
        .map_err(|_| unusable("--tls-key", &files.key, "no PEM private key in it"))?;
    let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    let builder = ServerConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .map_err(|e| unusable("--tls-cert", &files.cert, e.to_string()))?;
    let builder = match (&files.client_ca, &material.client_ca) {
        (Some(path), Some(pem)) => {
            let mut roots = rustls::RootCertStore::empty();
            for ca in CertificateDer::pem_slice_iter(pem) {
                let ca = ca.map_err(|e| unusable("--tls-client-ca", path, e.to_string()))?;
                roots
                    .add(ca)
                    .map_err(|e| unusable("--tls-client-ca", path, e.to_string()))?;
            }
            if roots.is_empty() {
                return Err(unusable(
                    "--tls-client-ca",
                    path,
                    "no PEM CA certificates in it",
                ));
            }
            let verifier = WebPkiClientVerifier::builder_with_provider(roots.into(), provider)
                .build()
                .map_err(|e| unusable("--tls-client-ca", path, e.to_string()))?;
            builder.with_client_cert_verifier(verifier)
        }
        _ => builder.with_no_client_auth(),
    };
    let mut config = builder.with_single_cert(certs, key).map_err(|e| {
        let what = match e {
            rustls::Error::InconsistentKeys(_) => format!(
                "is not the key of the certificate in {}",
                files.cert.display()
            ),
            other => format!("cannot be loaded with {}: {other}", files.cert.display()),
        };
        unusable("--tls-key", &files.key, what)
    })?;
    config.alpn_protocols = vec![b"h2".to_vec()];
    Ok(config)
}

/// Who a verified client certificate names: its subject's common name, else its first
/// subject alternative name (a SPIFFE id, say); None when it has neither.
pub fn certificate_principal(der: &[u8]) -> Option<Arc<str>> {
    let (_, cert) = x509_parser::parse_x509_certificate(der).ok()?;
    if let Some(cn) = cert
        .subject()
        .iter_common_name()
        .next()
        .and_then(|cn| cn.as_str().ok())
        .filter(|cn| !cn.is_empty())
    {
        return Some(Arc::from(cn));
    }
    let names = cert.subject_alternative_name().ok()??;
    names.value.general_names.iter().find_map(|name| {
        use x509_parser::extensions::GeneralName;
        let text = match name {
            GeneralName::DNSName(s) | GeneralName::URI(s) | GeneralName::RFC822Name(s) => {
                (*s).to_owned()
            }
            GeneralName::IPAddress(ip) => match ip.len() {
                4 => std::net::Ipv4Addr::from(<[u8; 4]>::try_from(*ip).ok()?).to_string(),
                16 => std::net::Ipv6Addr::from(<[u8; 16]>::try_from(*ip).ok()?).to_string(),
                _ => return None,
            },
            _ => return None,
        };
        Some(Arc::from(text))
    })
}

/// What a connection tells its calls: the principal its client certificate names, if any.
#[derive(Debug, Clone, Default)]
pub struct Peer {
    pub principal: Principal,
}

/// An accepted connection, plain or TLS.
pub enum Conn {
    Plain(TcpStream),
    Tls(Box<TlsStream<TcpStream>>, Principal),
}

impl Conn {
    /// A TLS connection, with the principal of its verified client certificate.
    pub fn tls(stream: TlsStream<TcpStream>) -> Self {
        let principal = stream
            .get_ref()
            .1
            .peer_certificates()
            .and_then(|certs| certs.first())
            .and_then(|cert| certificate_principal(cert.as_ref()));
        Conn::Tls(Box::new(stream), principal)
    }
}

impl Conn {
    /// What the connection tells its calls.
    pub fn peer(&self) -> Peer {
        match self {
            Conn::Plain(_) => Peer::default(),
            Conn::Tls(_, principal) => Peer {
                principal: principal.clone(),
            },
        }
    }
}

impl AsyncRead for Conn {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut TaskContext<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Conn::Plain(s) => Pin::new(s).poll_read(cx, buf),
            Conn::Tls(s, _) => Pin::new(s.as_mut()).poll_read(cx, buf),
        }
    }
}

impl AsyncWrite for Conn {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut TaskContext<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            Conn::Plain(s) => Pin::new(s).poll_write(cx, buf),
            Conn::Tls(s, _) => Pin::new(s.as_mut()).poll_write(cx, buf),
        }
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut TaskContext<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            Conn::Plain(s) => Pin::new(s).poll_write_vectored(cx, bufs),
            Conn::Tls(s, _) => Pin::new(s.as_mut()).poll_write_vectored(cx, bufs),
        }
    }

    fn is_write_vectored(&self) -> bool {
        match self {
            Conn::Plain(s) => s.is_write_vectored(),
            Conn::Tls(s, _) => s.is_write_vectored(),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut TaskContext<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Conn::Plain(s) => Pin::new(s).poll_flush(cx),
            Conn::Tls(s, _) => Pin::new(s.as_mut()).poll_flush(cx),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut TaskContext<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Conn::Plain(s) => Pin::new(s).poll_shutdown(cx),
            Conn::Tls(s, _) => Pin::new(s.as_mut()).poll_shutdown(cx),
        }
    }
}
