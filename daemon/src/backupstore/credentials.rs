//! Backup-target credentials: the `backup-target-credential-secret` setting.
//!
//! The setting names a file; without it the same keys are read from the
//! daemon's process environment. The file holds one `KEY=VALUE` per line:
//!
//! ```text
//! # comments and blank lines are ignored; `export KEY=VALUE` is accepted
//! AWS_ACCESS_KEY_ID=AKIAIOSFODNN7EXAMPLE
//! AWS_SECRET_ACCESS_KEY='wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY'
//! AWS_ENDPOINTS=https://minio.example:9000
//! VIRTUAL_HOSTED_STYLE=false
//! AWS_CERT="-----BEGIN CERTIFICATE-----
//! MIIB...
//! -----END CERTIFICATE-----"
//! ```
//!
//! | key | meaning |
//! |---|---|
//! | `AWS_ACCESS_KEY_ID`, `AWS_SECRET_ACCESS_KEY` | static key pair; both or neither |
//! | `AWS_SESSION_TOKEN` | optional, only with the key pair |
//! | `AWS_ENDPOINTS` | S3-compatible endpoint `http(s)://host[:port]`; default AWS |
//! | `VIRTUAL_HOSTED_STYLE` | `true`: `BUCKET.host/key`; `false` (default): `host/BUCKET/key` |
//! | `AWS_CERT` | CA bundle (PEM, several certificates allowed) the endpoint is checked against, in addition to the system roots |
//! | `AWS_CERT_FILE` | the same bundle in a file (relative to the credentials file); not with `AWS_CERT` |
//! | `HTTP_PROXY` / `HTTPS_PROXY` | proxy for an `http://` / `https://` endpoint (AWS itself: `HTTPS_PROXY`) |
//! | `NO_PROXY` | comma-separated hosts/CIDRs that bypass that proxy |
//!
//! When no proxy key is set, reqwest still honours the daemon's own
//! `HTTP(S)_PROXY` environment.
//!
//! Values may be wrapped in `"..."` or `'...'`; only a quoted value may span
//! lines (that is how a PEM is written inline). There are no trailing
//! comments: text after a closing quote is an error, and an unquoted value
//! runs to the end of its line. Unknown keys are ignored so that a Longhorn secret dumped to a file
//! works as it is. In the environment, `AWS_CERT` holds the PEM directly.
//!
//! No `AWS_ACCESS_KEY_ID`/`AWS_SECRET_ACCESS_KEY` means "use the node's
//! identity": IRSA web identity, ECS container credentials or the EC2 instance
//! role (object_store's default chain).
//!
//! Secrets (secret key, session token, proxy URLs, which may carry a password)
//! never appear in `Debug`, `Display` or errors.

use std::fmt;
use std::path::{Path, PathBuf};

/// Where the credentials came from; named in errors so the operator knows
/// which file to fix.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum CredentialSource {
    /// A `KEY=VALUE` file named by `backup-target-credential-secret`.
    File(PathBuf),
    /// The daemon's process environment.
    Environment,
}

impl fmt::Display for CredentialSource {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            CredentialSource::File(p) => write!(f, "{}", p.display()),
            CredentialSource::Environment => f.write_str("the cairnd environment"),
        }
    }
}

/// A value that must not be printed.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(String);

impl Secret {
    pub fn new(value: impl Into<String>) -> Self {
        Secret(value.into())
    }
    /// The secret itself, for handing to the S3 client only.
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("<redacted>")
    }
}

/// Errors reading or validating credentials. Never contain a secret value.
#[derive(Debug, thiserror::Error)]
pub enum CredentialsError {
    #[error("read credentials {path}: {source}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("credentials {source_name} line {line}: {problem}")]
    Syntax {
        source_name: CredentialSource,
        line: usize,
        problem: String,
    },
    #[error("credentials {source_name}: {problem}")]
    Invalid {
        source_name: CredentialSource,
        problem: String,
    },
}

/// Parsed backup-target credentials and connection options.
#[derive(Clone, PartialEq, Eq)]
pub struct Credentials {
    pub source: CredentialSource,
    /// `AWS_ACCESS_KEY_ID`; not a secret in AWS's model (it is in logs and
    /// error bodies), shown in `Debug`.
    pub access_key_id: Option<String>,
    pub secret_access_key: Option<Secret>,
    pub session_token: Option<Secret>,
    /// `AWS_ENDPOINTS`: `http(s)://host[:port]`, no trailing path.
    pub endpoint: Option<String>,
    /// PEM bundle from `AWS_CERT` / `AWS_CERT_FILE`, checked to hold at least one certificate.
    pub ca_pem: Option<String>,
    pub virtual_hosted_style: bool,
    pub http_proxy: Option<Secret>,
    pub https_proxy: Option<Secret>,
    pub no_proxy: Option<String>,
}

impl fmt::Debug for Credentials {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let set = |b: bool| if b { "<set>" } else { "<unset>" };
        f.debug_struct("Credentials")
            .field("source", &self.source)
            .field("access_key_id", &self.access_key_id)
            .field("secret_access_key", &set(self.secret_access_key.is_some()))
            .field("session_token", &set(self.session_token.is_some()))
            .field("endpoint", &self.endpoint)
            .field("ca_pem", &set(self.ca_pem.is_some()))
            .field("virtual_hosted_style", &self.virtual_hosted_style)
            .field("http_proxy", &set(self.http_proxy.is_some()))
            .field("https_proxy", &set(self.https_proxy.is_some()))
            .field("no_proxy", &self.no_proxy)
            .finish()
    }
}

impl fmt::Display for Credentials {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "credentials from {}", self.source)?;
        match &self.access_key_id {
            Some(id) => write!(f, " (access key {id})"),
            None => f.write_str(" (node identity)"),
        }
    }
}

/// The keys this module reads; everything else in a file is ignored.
pub const KEYS: &[&str] = &[
    "AWS_ACCESS_KEY_ID",
    "AWS_SECRET_ACCESS_KEY",
    "AWS_SESSION_TOKEN",
    "AWS_ENDPOINTS",
    "AWS_CERT",
    "AWS_CERT_FILE",
    "VIRTUAL_HOSTED_STYLE",
    "HTTP_PROXY",
    "HTTPS_PROXY",
    "NO_PROXY",
];

impl Credentials {
    /// Credentials for `backup-target-credential-secret`: the file when
    /// `path` is given, the process environment otherwise.
    pub fn load(path: Option<&Path>) -> Result<Credentials, CredentialsError> {
        match path {
            Some(p) => Credentials::from_file(p),
            None => Credentials::from_env(),
        }
    }

    /// Reads and parses a `KEY=VALUE` file (format in the module doc).
    pub fn from_file(path: &Path) -> Result<Credentials, CredentialsError> {
        let text = std::fs::read_to_string(path).map_err(|source| CredentialsError::Read {
            path: path.to_owned(),
            source,
        })?;
        let source = CredentialSource::File(path.to_owned());
        let pairs = parse_key_values(&text, &source)?;
        let base = path.parent().unwrap_or(Path::new("."));
        Credentials::from_pairs(source, pairs, base)
    }

    /// Reads the keys from the process environment.
    pub fn from_env() -> Result<Credentials, CredentialsError> {
        let pairs = KEYS
            .iter()
            .filter_map(|k| std::env::var(k).ok().map(|v| (k.to_string(), v)))
            .collect();
        Credentials::from_pairs(CredentialSource::Environment, pairs, Path::new("."))
    }

    /// Parses file text; `base` resolves a relative `AWS_CERT_FILE`.
    pub fn parse(
        text: &str,
        source: CredentialSource,
        base: &Path,
    ) -> Result<Credentials, CredentialsError> {
        let pairs = parse_key_values(text, &source)?;
        Credentials::from_pairs(source, pairs, base)
    }

    /// Builds and validates credentials from key/value pairs (later pairs win).
    pub fn from_pairs(
        source: CredentialSource,
        pairs: Vec<(String, String)>,
        base: &Path,
    ) -> Result<Credentials, CredentialsError> {
        let invalid = |problem: String| CredentialsError::Invalid {
            source_name: source.clone(),
            problem,
        };
        let get = |key: &str| -> Option<String> {
            pairs
                .iter()
                .rev()
                .find(|(k, _)| k == key)
                .map(|(_, v)| v.trim().to_string())
                .filter(|v| !v.is_empty())
        };
        let access_key_id = get("AWS_ACCESS_KEY_ID");
        let secret_access_key = get("AWS_SECRET_ACCESS_KEY").map(Secret);
        let session_token = get("AWS_SESSION_TOKEN").map(Secret);
        match (&access_key_id, &secret_access_key) {
            (Some(_), None) => {
                return Err(invalid(
                    "AWS_ACCESS_KEY_ID is set but AWS_SECRET_ACCESS_KEY is not: set both, or neither to use the node's IAM role".into(),
                ))
            }
            (None, Some(_)) => {
                return Err(invalid(
                    "AWS_SECRET_ACCESS_KEY is set but AWS_ACCESS_KEY_ID is not: set both, or neither to use the node's IAM role".into(),
                ))
            }
            (None, None) if session_token.is_some() => {
                return Err(invalid(
                    "AWS_SESSION_TOKEN needs AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY".into(),
                ))
            }
            _ => {}
        }

        let endpoint = get("AWS_ENDPOINTS")
            .map(|e| validate_endpoint(&e).map_err(invalid))
            .transpose()?;

        let virtual_hosted_style = match get("VIRTUAL_HOSTED_STYLE") {
            None => false,
            Some(v) => match v.to_ascii_lowercase().as_str() {
                "true" | "1" | "yes" => true,
                "false" | "0" | "no" => false,
                _ => {
                    return Err(invalid(format!(
                        "VIRTUAL_HOSTED_STYLE={v:?} is not a boolean: use true or false"
                    )))
                }
            },
        };

        let ca_pem = match (get("AWS_CERT"), get("AWS_CERT_FILE")) {
            (Some(_), Some(_)) => {
                return Err(invalid("set AWS_CERT or AWS_CERT_FILE, not both".into()))
            }
            (Some(pem), None) => {
                validate_pem(&pem).map_err(|p| invalid(format!("AWS_CERT: {p}")))?;
                Some(pem)
            }
            (None, Some(file)) => {
                let path = base.join(&file);
                let pem = std::fs::read_to_string(&path)
                    .map_err(|e| invalid(format!("AWS_CERT_FILE {}: {e}", path.display())))?;
                validate_pem(&pem)
                    .map_err(|p| invalid(format!("AWS_CERT_FILE {}: {p}", path.display())))?;
                Some(pem)
            }
            (None, None) => None,
        };

        let proxy = |key: &str| -> Result<Option<Secret>, CredentialsError> {
            match get(key) {
                None => Ok(None),
                Some(v) if v.starts_with("http://") || v.starts_with("https://") => {
                    Ok(Some(Secret(v)))
                }
                // Do not echo the value: it may carry user:password.
                Some(_) => Err(invalid(format!(
                    "{key} must be an http:// or https:// proxy URL"
                ))),
            }
        };
        Ok(Credentials {
            source: source.clone(),
            access_key_id,
            secret_access_key,
            session_token,
            endpoint,
            ca_pem,
            virtual_hosted_style,
            http_proxy: proxy("HTTP_PROXY")?,
            https_proxy: proxy("HTTPS_PROXY")?,
            no_proxy: get("NO_PROXY"),
        })
    }

    /// True when a static key pair is configured (else the default chain).
    pub fn has_keys(&self) -> bool {
        self.access_key_id.is_some()
    }
}

/// `http(s)://host[:port]` with an optional trailing `/`; returns it without the slash.
fn validate_endpoint(e: &str) -> Result<String, String> {
    let rest = e
        .strip_prefix("https://")
        .or_else(|| e.strip_prefix("http://"))
        .ok_or_else(|| {
            format!("AWS_ENDPOINTS={e:?} must start with http:// or https://, e.g. https://minio.example:9000")
        })?;
    let authority = rest.trim_end_matches('/');
    if authority.is_empty() || authority.contains('/') || authority.contains('@') {
        return Err(format!(
            "AWS_ENDPOINTS={e:?} must be scheme://host[:port] with no path or user"
        ));
    }
    Ok(e.trim_end_matches('/').to_string())
}

/// Checks that a PEM bundle holds at least one parsable certificate.
fn validate_pem(pem: &str) -> Result<(), String> {
    if !pem.contains("-----BEGIN CERTIFICATE-----") {
        return Err("no PEM certificate (-----BEGIN CERTIFICATE-----) found".into());
    }
    match object_store::Certificate::from_pem_bundle(pem.as_bytes()) {
        Ok(certs) if !certs.is_empty() => Ok(()),
        Ok(_) => Err("no certificate could be read from the PEM".into()),
        Err(e) => Err(format!("bad PEM certificate: {e}")),
    }
}

/// Splits `KEY=VALUE` text into pairs (format in the module doc).
fn parse_key_values(
    text: &str,
    source: &CredentialSource,
) -> Result<Vec<(String, String)>, CredentialsError> {
    let syntax = |line: usize, problem: String| CredentialsError::Syntax {
        source_name: source.clone(),
        line,
        problem,
    };
    let mut out = Vec::new();
    let mut lines = text.lines().enumerate();
    while let Some((idx, raw)) = lines.next() {
        let lineno = idx + 1;
        let line = raw.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let line = line.strip_prefix("export ").unwrap_or(line).trim_start();
        let Some((key, value)) = line.split_once('=') else {
            // Only the key is echoed: a mistyped line may be a secret.
            return Err(syntax(lineno, "expected KEY=VALUE".into()));
        };
        let key = key.trim();
        if key.is_empty() || !key.chars().all(|c| c.is_ascii_alphanumeric() || c == '_') {
            return Err(syntax(lineno, "bad key: use letters, digits and _".into()));
        }
        let value = value.trim_start();
        let value = match value.chars().next() {
            Some(q @ ('"' | '\'')) => {
                // A quoted value may continue over following lines.
                let mut acc = value[1..].to_string();
                loop {
                    if let Some(end) = acc.find(q) {
                        if !acc[end + 1..].trim().is_empty() {
                            return Err(syntax(
                                lineno,
                                format!("{key}: text after the closing quote"),
                            ));
                        }
                        acc.truncate(end);
                        break acc;
                    }
                    match lines.next() {
                        Some((_, next)) => {
                            acc.push('\n');
                            acc.push_str(next);
                        }
                        None => {
                            return Err(syntax(lineno, format!("{key}: unterminated {q} quote")))
                        }
                    }
                }
            }
            _ => value.trim_end().to_string(),
        };
        out.push((key.to_string(), value));
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Result<Credentials, CredentialsError> {
        Credentials::parse(
            text,
            CredentialSource::File("/etc/cairn/backup.env".into()),
            Path::new("/nonexistent"),
        )
    }

    #[test]
    fn parses_keys_comments_quotes() {
        let c = parse(
            "# comment\n\nAWS_ACCESS_KEY_ID=AKIAEXAMPLE\nexport AWS_SECRET_ACCESS_KEY = \"s3cr3t value\"\n\
             AWS_SESSION_TOKEN='tok'\nAWS_ENDPOINTS=http://127.0.0.1:9000/\nVIRTUAL_HOSTED_STYLE=TRUE\n\
             HTTPS_PROXY=http://user:pw@proxy:3128\nNO_PROXY=localhost,.svc\nOTHER=ignored\n",
        )
        .expect("valid");
        assert_eq!(c.access_key_id.as_deref(), Some("AKIAEXAMPLE"));
        assert_eq!(
            c.secret_access_key.as_ref().map(Secret::expose),
            Some("s3cr3t value")
        );
        assert_eq!(c.session_token.as_ref().map(Secret::expose), Some("tok"));
        assert_eq!(c.endpoint.as_deref(), Some("http://127.0.0.1:9000"));
        assert!(c.virtual_hosted_style);
        assert_eq!(c.no_proxy.as_deref(), Some("localhost,.svc"));
        assert!(c.http_proxy.is_none());
        assert!(c.https_proxy.is_some());
    }

    #[test]
    fn debug_and_display_hide_secrets() {
        let c = parse(
            "AWS_ACCESS_KEY_ID=AKIAEXAMPLE\nAWS_SECRET_ACCESS_KEY=TOPSECRETKEY\nAWS_SESSION_TOKEN=TOPSECRETTOKEN\n\
             HTTP_PROXY=http://u:TOPSECRETPW@p:1\n",
        )
        .expect("valid");
        let shown = format!("{c:?} {c} {:?}", c.secret_access_key);
        assert!(!shown.contains("TOPSECRET"), "{shown}");
        assert!(shown.contains("AKIAEXAMPLE"));
        assert!(shown.contains("<redacted>"));
    }

    #[test]
    fn errors_name_problem_and_never_secret() {
        let cases: &[(&str, &str)] = &[
            ("AWS_ACCESS_KEY_ID=a\n", "AWS_SECRET_ACCESS_KEY is not"),
            ("AWS_SECRET_ACCESS_KEY=TOPSECRET\n", "AWS_ACCESS_KEY_ID is not"),
            ("AWS_SESSION_TOKEN=TOPSECRET\n", "needs AWS_ACCESS_KEY_ID"),
            ("VIRTUAL_HOSTED_STYLE=maybe\n", "not a boolean"),
            ("AWS_CERT=hello\n", "no PEM certificate"),
            (
                "AWS_CERT=\"-----BEGIN CERTIFICATE-----\n!!!notbase64!!!\n-----END CERTIFICATE-----\"\n",
                "AWS_CERT",
            ),
            ("AWS_ENDPOINTS=minio:9000\n", "must start with http"),
            ("AWS_ENDPOINTS=http://h:1/path\n", "no path"),
            ("HTTP_PROXY=TOPSECRET\n", "HTTP_PROXY must be"),
            ("AWS_SECRET_ACCESS_KEY TOPSECRET\n", "line 1: expected KEY=VALUE"),
            ("AWS_SECRET_ACCESS_KEY=\"TOPSECRET\n", "unterminated"),
            ("AWS_SECRET_ACCESS_KEY=\"TOPSECRET\" x\n", "after the closing quote"),
            ("AWS_CERT=a\nAWS_CERT_FILE=b\n", "not both"),
            ("AWS_CERT_FILE=missing.pem\n", "/nonexistent/missing.pem"),
        ];
        for (text, want) in cases {
            let err = parse(text).expect_err(text).to_string();
            assert!(err.contains(want), "{text:?}: {err}");
            assert!(err.contains("/etc/cairn/backup.env"), "{err}");
            assert!(!err.contains("TOPSECRET"), "{err}");
        }
    }

    #[test]
    fn no_keys_means_node_identity() {
        let c = parse("# nothing\n").expect("valid");
        assert!(!c.has_keys());
        assert_eq!(
            c.to_string(),
            "credentials from /etc/cairn/backup.env (node identity)"
        );
    }
}
