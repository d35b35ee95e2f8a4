//! Backup targets: the `backup-target` setting turned into an object store.
//!
//! ```text
//!  "s3://bucket@region/path/" ─┐                      ┌─ AmazonS3 (SigV4, endpoint, CA, proxy)
//!  "nfs://host:/export/path"  ─┼─ BackupTarget::parse ─ open_target ─┼─ LocalFileSystem on <mount_root>/<hash>
//!  "file:///srv/backups"      ─┘        + Credentials  (+ mount)     └─ LocalFileSystem on the directory
//!                                                    │
//!                                  (Arc<dyn ObjectStore>, prefix)
//! ```
//!
//! URLs follow Longhorn: `s3://BUCKET@REGION/PATH/` (region and trailing `/`
//! required, `PATH` may be empty), `nfs://HOST:/PATH[?nfsOptions=o1,o2]`
//! (NFSv4) and `file:///ABSOLUTE/PATH`.
//!
//! **Prefix.** [`open_target`] returns the prefix `PATH` (empty for nfs and
//! file targets, whose store is rooted at the directory). Longhorn keeps its
//! data under `<PATH>/backupstore/...`; appending `backupstore/` is the
//! format module's job, not this one's.
//!
//! **TLS.** object_store's `aws` feature uses reqwest with rustls and the
//! aws-lc-rs provider. reqwest 0.13 uses a process-default rustls
//! `CryptoProvider` when one is installed and its own aws-lc-rs one
//! otherwise, so opening a store never hits rustls' "could not determine the
//! process-level CryptoProvider" panic (tested against a TLS endpoint).
//!
//! **NFS.** Opening an nfs target mounts it with `mount -t nfs4` on
//! `<mount_root>/<hash of the export>` unless something is already mounted
//! there; [`unmount_target`] undoes it when the setting changes.

use std::fmt;
use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::str::FromStr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use object_store::aws::AmazonS3Builder;
use object_store::client::{DnsFuture, DnsResolver};
use object_store::local::LocalFileSystem;
use object_store::path::Path as ObjectPath;
use object_store::{
    BackoffConfig, Certificate, ClientOptions, ObjectStore, ObjectStoreExt, RetryConfig,
};
use sha2::{Digest, Sha256};

use super::credentials::{CredentialSource, Credentials, CredentialsError};

/// NFS mount options when the URL has no `?nfsOptions=` (Longhorn's), tried
/// with each of [`DEFAULT_NFS_VERSIONS`] in turn.
pub const DEFAULT_NFS_OPTIONS: &str = "actimeo=1,soft,timeo=300,retry=2";

/// NFSv4 minor versions tried, in order, when the URL sets no options. Not
/// 4.2: measured in the guest, a Linux 6.12 client on NFSv4.2 (READ_PLUS)
/// against Debian 12's nfs-ganesha 4.3 reads freshly written files back as
/// zeros; 4.1 and 4.0 read them correctly. `?nfsOptions=nfsvers=4.2,...`
/// still selects 4.2.
pub const DEFAULT_NFS_VERSIONS: [&str; 2] = ["4.1", "4.0"];

/// How long a `mount`/`umount` may take before it is abandoned.
pub const MOUNT_TIMEOUT: Duration = Duration::from_secs(60);

/// A parsed `backup-target` setting. `Display` gives back the URL (it holds no secret).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum BackupTarget {
    S3 {
        bucket: String,
        region: String,
        /// `PATH` without leading/trailing `/`; may be empty.
        path: String,
    },
    Nfs {
        host: String,
        /// Absolute export path, e.g. `/exports/backups`.
        path: String,
        /// `?nfsOptions=` value when given.
        options: Option<String>,
    },
    File {
        path: PathBuf,
    },
}

/// Everything that can go wrong between a setting and a usable store.
#[derive(Debug, thiserror::Error)]
pub enum TargetError {
    #[error("backup-target {url:?}: {problem}")]
    InvalidUrl { url: String, problem: String },
    #[error(transparent)]
    Credentials(#[from] CredentialsError),
    #[error("backup target {target}: {problem}")]
    Config { target: String, problem: String },
    #[error("backup target {target}: access denied: check AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY in {credentials}")]
    AccessDenied {
        target: String,
        credentials: CredentialSource,
        #[source]
        source: Box<object_store::Error>,
    },
    #[error("backup target {target}: bucket {bucket} not found at {endpoint}: create it or fix the bucket in backup-target")]
    BucketNotFound {
        target: String,
        bucket: String,
        endpoint: String,
    },
    #[error("backup target {target}: cannot reach endpoint {endpoint}: check AWS_ENDPOINTS, the network and proxies")]
    Unreachable {
        target: String,
        endpoint: String,
        #[source]
        source: Box<object_store::Error>,
    },
    #[error("backup target {target}: TLS to {endpoint} failed ({reason}): set AWS_CERT to the CA that signed the endpoint's certificate")]
    Tls {
        target: String,
        endpoint: String,
        reason: String,
        #[source]
        source: Box<object_store::Error>,
    },
    #[error("backup target {target}: {source}")]
    Store {
        target: String,
        #[source]
        source: Box<object_store::Error>,
    },
    #[error("backup target {target}: mount.nfs4 not found: install the NFS client (nfs-common / nfs-utils) on this node")]
    NfsClientMissing { target: String },
    #[error("backup target {target}: `{command}` failed: {detail}")]
    Mount {
        target: String,
        command: String,
        detail: String,
    },
    #[error("backup target {target}: {context} {path}: {source}")]
    Io {
        target: String,
        context: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

impl fmt::Display for BackupTarget {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            BackupTarget::S3 {
                bucket,
                region,
                path,
            } if path.is_empty() => write!(f, "s3://{bucket}@{region}/"),
            BackupTarget::S3 {
                bucket,
                region,
                path,
            } => write!(f, "s3://{bucket}@{region}/{path}/"),
            BackupTarget::Nfs {
                host,
                path,
                options,
            } => {
                write!(f, "nfs://{host}:{path}")?;
                match options {
                    Some(o) => write!(f, "?nfsOptions={o}"),
                    None => Ok(()),
                }
            }
            BackupTarget::File { path } => write!(f, "file://{}", path.display()),
        }
    }
}

impl FromStr for BackupTarget {
    type Err = TargetError;
    fn from_str(s: &str) -> Result<Self, TargetError> {
        BackupTarget::parse(s)
    }
}

impl BackupTarget {
    /// Parses a `backup-target` setting (forms in the module doc).
    pub fn parse(url: &str) -> Result<BackupTarget, TargetError> {
        let bad = |problem: String| TargetError::InvalidUrl {
            url: url.to_string(),
            problem,
        };
        let url_t = url.trim();
        if url_t.is_empty() {
            return Err(bad(
                "empty: use s3://BUCKET@REGION/PATH/, nfs://HOST:/PATH or file:///PATH".into(),
            ));
        }
        let Some((scheme, rest)) = url_t.split_once("://") else {
            return Err(bad(
                "no scheme: use s3://BUCKET@REGION/PATH/, nfs://HOST:/PATH or file:///PATH".into(),
            ));
        };
        match scheme.to_ascii_lowercase().as_str() {
            "s3" => parse_s3(rest).map_err(bad),
            "nfs" => parse_nfs(rest).map_err(bad),
            "file" => parse_file(rest).map_err(bad),
            other => Err(bad(format!(
                "unknown scheme {other:?}: use s3://, nfs:// or file:// (cifs and azblob are not supported)"
            ))),
        }
    }

    /// Directory an nfs target is mounted on under `mount_root`:
    /// `<mount_root>/<first 16 hex digits of sha256(HOST:PATH?OPTIONS)>`.
    pub fn mount_dir(&self, mount_root: &Path) -> Option<PathBuf> {
        match self {
            BackupTarget::Nfs { .. } => {
                let digest = Sha256::digest(self.to_string().as_bytes());
                let hex: String = digest.iter().take(8).map(|b| format!("{b:02x}")).collect();
                Some(mount_root.join(hex))
            }
            _ => None,
        }
    }
}

fn parse_s3(rest: &str) -> Result<BackupTarget, String> {
    let Some((authority, path)) = rest.split_once('/') else {
        return Err(if rest.contains('@') {
            format!("missing trailing '/': write s3://{rest}/")
        } else {
            format!("missing region: write s3://{rest}@REGION/ (e.g. @us-east-1)")
        });
    };
    let Some((bucket, region)) = authority.split_once('@') else {
        return Err(format!(
            "missing region: write s3://{authority}@REGION/{path} (e.g. @us-east-1)"
        ));
    };
    if bucket.is_empty() {
        return Err("empty bucket: write s3://BUCKET@REGION/PATH/".into());
    }
    validate_bucket(bucket)?;
    if region.is_empty()
        || !region
            .chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-')
    {
        return Err(format!(
            "bad region {region:?}: use an S3 region such as us-east-1 (any name for MinIO-like servers, lower case)"
        ));
    }
    if !path.is_empty() && !path.ends_with('/') {
        return Err(format!(
            "missing trailing '/': write s3://{authority}/{path}/"
        ));
    }
    let path = path.trim_end_matches('/');
    if path
        .split('/')
        .any(|seg| seg.is_empty() || seg == "." || seg == "..")
        && !path.is_empty()
    {
        return Err(format!("bad path {path:?}: no empty, '.' or '..' segments"));
    }
    if path.contains(['?', '#']) {
        return Err(format!("bad path {path:?}: no '?' or '#'"));
    }
    ObjectPath::parse(path).map_err(|e| format!("bad path {path:?}: {e}"))?;
    Ok(BackupTarget::S3 {
        bucket: bucket.to_string(),
        region: region.to_string(),
        path: path.to_string(),
    })
}

/// S3 bucket naming rules (legacy upper case and `_` accepted for old buckets).
fn validate_bucket(bucket: &str) -> Result<(), String> {
    let ok_chars = bucket
        .chars()
        .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '-' | '_'));
    let ends_ok = bucket.starts_with(|c: char| c.is_ascii_alphanumeric())
        && bucket.ends_with(|c: char| c.is_ascii_alphanumeric());
    if !(3..=63).contains(&bucket.len()) || !ok_chars || !ends_ok || bucket.contains("..") {
        return Err(format!(
            "invalid bucket {bucket:?}: 3-63 letters, digits, '.', '-', starting and ending with a letter or digit"
        ));
    }
    Ok(())
}

fn parse_nfs(rest: &str) -> Result<BackupTarget, String> {
    let (main, query) = match rest.split_once('?') {
        Some((m, q)) => (m, Some(q)),
        None => (rest, None),
    };
    let Some((host, path)) = main.split_once(":/") else {
        return Err(format!(
            "missing export path: write nfs://{}:/PATH",
            main.trim_end_matches(':')
        ));
    };
    if host.is_empty() {
        return Err("empty host: write nfs://HOST:/PATH".into());
    }
    if host.contains(['/', '@', ' ']) {
        return Err(format!("bad host {host:?}: write nfs://HOST:/PATH"));
    }
    let path = format!("/{}", path.trim_end_matches('/'));
    if path.contains(['\n', ',', ' ']) || path.split('/').any(|s| s == "..") {
        return Err(format!("bad export path {path:?}"));
    }
    let options = match query {
        None => None,
        Some(q) => {
            let Some(opts) = q.strip_prefix("nfsOptions=") else {
                return Err(format!(
                    "unknown query {q:?}: only ?nfsOptions=opt1,opt2 is supported"
                ));
            };
            if opts.is_empty() || opts.contains(['&', ' ', '\n']) {
                return Err(format!(
                    "bad nfsOptions {opts:?}: a comma-separated mount option list"
                ));
            }
            Some(opts.to_string())
        }
    };
    Ok(BackupTarget::Nfs {
        host: host.to_string(),
        path,
        options,
    })
}

fn parse_file(rest: &str) -> Result<BackupTarget, String> {
    if !rest.starts_with('/') {
        return Err(format!(
            "needs an absolute path: write file:///{} (three slashes)",
            rest.trim_start_matches("./")
        ));
    }
    let path = Path::new(rest);
    if path
        .components()
        .any(|c| matches!(c, std::path::Component::ParentDir))
    {
        return Err("no '..' in a file path".into());
    }
    Ok(BackupTarget::File {
        path: path.to_path_buf(),
    })
}

/// The commands that may mount an nfs target, in the order to try them:
/// `mount -t nfs4 -o OPTS HOST:/PATH DIR`, once with the URL's options, or
/// once per default version. Pure so that the guest-less build can test it.
pub fn nfs_mount_commands(target: &BackupTarget, mount_dir: &Path) -> Vec<Vec<String>> {
    let BackupTarget::Nfs {
        host,
        path,
        options,
    } = target
    else {
        return Vec::new();
    };
    let option_sets: Vec<String> = match options {
        Some(o) => vec![o.clone()],
        None => DEFAULT_NFS_VERSIONS
            .iter()
            .map(|v| format!("nfsvers={v},{DEFAULT_NFS_OPTIONS}"))
            .collect(),
    };
    option_sets
        .into_iter()
        .map(|o| {
            vec![
                "mount".into(),
                "-t".into(),
                "nfs4".into(),
                "-o".into(),
                o,
                format!("{host}:{path}"),
                mount_dir.display().to_string(),
            ]
        })
        .collect()
}

/// True when `/proc/self/mountinfo` text shows a mount on `dir`.
pub fn is_mount_point(mountinfo: &str, dir: &Path) -> bool {
    let want = dir.display().to_string();
    mountinfo.lines().any(|line| {
        // Field 5 is the mount point, with ' ' '\t' '\n' '\\' octal-escaped.
        line.split(' ')
            .nth(4)
            .map(|mp| unescape_mountinfo(mp) == want)
            .unwrap_or(false)
    })
}

fn unescape_mountinfo(s: &str) -> String {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let octal = (bytes[i] == b'\\')
            .then(|| s.get(i + 1..i + 4))
            .flatten()
            .and_then(|o| u8::from_str_radix(o, 8).ok());
        match octal {
            Some(v) => {
                out.push(v);
                i += 4;
            }
            None => {
                out.push(bytes[i]);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// Runs `argv` with a deadline; returns its stderr on failure.
fn run_with_timeout(argv: &[String], timeout: Duration) -> Result<(), String> {
    let (prog, args) = argv.split_first().ok_or("empty command")?;
    let mut child = Command::new(prog)
        .args(args)
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .map_err(|e| format!("cannot run {prog}: {e}"))?;
    let deadline = Instant::now() + timeout;
    loop {
        match child.try_wait() {
            Ok(Some(status)) => {
                if status.success() {
                    return Ok(());
                }
                let mut err = String::new();
                if let Some(mut e) = child.stderr.take() {
                    use std::io::Read;
                    let _ = e.read_to_string(&mut err);
                }
                return Err(format!("{status}: {}", err.trim()));
            }
            Ok(None) if Instant::now() >= deadline => {
                let _ = child.kill();
                let _ = child.wait();
                return Err(format!("timed out after {}s", timeout.as_secs()));
            }
            Ok(None) => std::thread::sleep(Duration::from_millis(50)),
            Err(e) => return Err(format!("wait: {e}")),
        }
    }
}

fn nfs_client_present() -> bool {
    [
        "/sbin/mount.nfs4",
        "/usr/sbin/mount.nfs4",
        "/sbin/mount.nfs",
        "/usr/sbin/mount.nfs",
    ]
    .iter()
    .any(|p| Path::new(p).exists())
}

/// Mounts an nfs target on its [`BackupTarget::mount_dir`] unless already
/// mounted; returns the directory. Blocking (runs `mount`).
pub fn mount_nfs(target: &BackupTarget, mount_root: &Path) -> Result<PathBuf, TargetError> {
    let t = target.to_string();
    let Some(dir) = target.mount_dir(mount_root) else {
        return Err(TargetError::Config {
            target: t,
            problem: "not an nfs target".into(),
        });
    };
    let mountinfo =
        std::fs::read_to_string("/proc/self/mountinfo").map_err(|source| TargetError::Io {
            target: t.clone(),
            context: "read",
            path: "/proc/self/mountinfo".into(),
            source,
        })?;
    if is_mount_point(&mountinfo, &dir) {
        return Ok(dir);
    }
    if !nfs_client_present() {
        return Err(TargetError::NfsClientMissing { target: t });
    }
    std::fs::create_dir_all(&dir).map_err(|source| TargetError::Io {
        target: t.clone(),
        context: "create mount directory",
        path: dir.clone(),
        source,
    })?;
    let commands = nfs_mount_commands(target, &dir);
    let mut failure = None;
    for argv in &commands {
        match run_with_timeout(argv, MOUNT_TIMEOUT) {
            Ok(()) => {
                tracing::info!(target = %t, dir = %dir.display(), options = %argv[4], "mounted the nfs backup target");
                return Ok(dir);
            }
            // Only a server without this minor version is worth the next one;
            // a missing export or an unreachable server fails the same way.
            Err(detail) => {
                let unsupported = detail.contains("not supported");
                failure = Some((argv.join(" "), detail));
                if !unsupported {
                    break;
                }
            }
        }
    }
    let (command, detail) = failure.unwrap_or_default();
    Err(TargetError::Mount {
        target: t,
        command,
        detail,
    })
}

/// Unmounts an nfs target's directory if mounted (for a changed setting);
/// a no-op for other targets. Falls back to a lazy unmount when busy.
pub fn unmount_target(target: &BackupTarget, mount_root: &Path) -> Result<(), TargetError> {
    let Some(dir) = target.mount_dir(mount_root) else {
        return Ok(());
    };
    let t = target.to_string();
    let mountinfo =
        std::fs::read_to_string("/proc/self/mountinfo").map_err(|source| TargetError::Io {
            target: t.clone(),
            context: "read",
            path: "/proc/self/mountinfo".into(),
            source,
        })?;
    if !is_mount_point(&mountinfo, &dir) {
        return Ok(());
    }
    let d = dir.display().to_string();
    let argv = vec!["umount".to_string(), d.clone()];
    if let Err(first) = run_with_timeout(&argv, MOUNT_TIMEOUT) {
        let lazy = vec!["umount".to_string(), "-l".into(), d];
        run_with_timeout(&lazy, MOUNT_TIMEOUT).map_err(|detail| TargetError::Mount {
            target: t.clone(),
            command: lazy.join(" "),
            detail: format!("{detail} (plain umount: {first})"),
        })?;
    }
    tracing::info!(target = %t, dir = %dir.display(), "unmounted the nfs backup target");
    Ok(())
}

/// Request limits: a backup keeps object_store's patient defaults; a probe
/// must answer a settings change in seconds.
#[derive(Clone, Copy)]
enum Use {
    Data,
    Probe,
}

/// The S3 endpoint requests go to, for messages: `AWS_ENDPOINTS` or AWS's regional one.
fn endpoint_for(bucket: &str, region: &str, creds: &Credentials) -> String {
    match &creds.endpoint {
        Some(e) => e.clone(),
        None if creds.virtual_hosted_style => format!("https://{bucket}.s3.{region}.amazonaws.com"),
        None => format!("https://s3.{region}.amazonaws.com"),
    }
}

/// `scheme://host:port` → `scheme://BUCKET.host:port` for virtual-hosted
/// requests to a custom endpoint (object_store expects the bucket in it).
pub fn virtual_hosted_endpoint(endpoint: &str, bucket: &str) -> Result<String, String> {
    let (scheme, authority) = endpoint
        .split_once("://")
        .ok_or_else(|| format!("endpoint {endpoint:?} has no scheme"))?;
    let host = host_of(authority);
    if host.parse::<IpAddr>().is_ok() || host.starts_with('[') {
        return Err(format!(
            "VIRTUAL_HOSTED_STYLE=true needs a DNS name in AWS_ENDPOINTS, not the address {host}: use path style or a name"
        ));
    }
    if host.starts_with(&format!("{bucket}.")) {
        return Ok(endpoint.to_string());
    }
    Ok(format!("{scheme}://{bucket}.{authority}"))
}

fn host_of(authority: &str) -> &str {
    if authority.starts_with('[') {
        return authority
            .split(']')
            .next()
            .map(|h| &authority[..h.len() + 1])
            .unwrap_or(authority);
    }
    authority
        .rsplit_once(':')
        .map(|(h, _)| h)
        .unwrap_or(authority)
}

/// Resolves `*.localhost` to loopback (RFC 6761 §6.3), which glibc does not,
/// so virtual-hosted style works against a local server; other names go to
/// the system resolver. Installed only for endpoints under `.localhost`.
#[derive(Debug)]
struct LocalhostResolver;

impl DnsResolver for LocalhostResolver {
    fn resolve(&self, host: &str) -> DnsFuture {
        let host = host.to_string();
        Box::pin(async move {
            if host == "localhost" || host.ends_with(".localhost") {
                return Ok(vec![
                    IpAddr::from([127, 0, 0, 1]),
                    IpAddr::from(std::net::Ipv6Addr::LOCALHOST),
                ]);
            }
            let addrs = tokio::net::lookup_host((host.as_str(), 0)).await?;
            Ok(addrs.map(|a| a.ip()).collect())
        })
    }
}

/// The full `ClientOptions` for an S3 target, built in one place because
/// `AmazonS3Builder::with_client_options` replaces any set earlier.
fn client_options(endpoint: &str, creds: &Credentials, use_: Use) -> Result<ClientOptions, String> {
    let https = endpoint.starts_with("https://");
    let mut opts = ClientOptions::new().with_allow_http(!https);
    if let Some(pem) = &creds.ca_pem {
        let certs = Certificate::from_pem_bundle(pem.as_bytes())
            .map_err(|e| format!("AWS_CERT: bad PEM certificate: {e}"))?;
        for cert in certs {
            opts = opts.with_root_certificate(cert);
        }
    }
    let proxy = if https {
        &creds.https_proxy
    } else {
        &creds.http_proxy
    };
    if let Some(p) = proxy {
        opts = opts.with_proxy_url(p.expose());
        if let Some(np) = &creds.no_proxy {
            opts = opts.with_proxy_excludes(np.clone());
        }
    }
    let host = endpoint
        .split_once("://")
        .map(|(_, a)| host_of(a))
        .unwrap_or_default();
    if host == "localhost" || host.ends_with(".localhost") {
        opts = opts.with_dns_resolver(Arc::new(LocalhostResolver));
    }
    if let Use::Probe = use_ {
        opts = opts
            .with_connect_timeout(Duration::from_secs(5))
            .with_timeout(Duration::from_secs(15));
    }
    Ok(opts)
}

/// Environment keys object_store's default credential chain reads
/// (IRSA, ECS, instance metadata); copied only when no key pair is set.
const IDENTITY_ENV: &[&str] = &[
    "AWS_WEB_IDENTITY_TOKEN_FILE",
    "AWS_ROLE_ARN",
    "AWS_ROLE_SESSION_NAME",
    "AWS_ENDPOINT_URL_STS",
    "AWS_CONTAINER_CREDENTIALS_RELATIVE_URI",
    "AWS_CONTAINER_CREDENTIALS_FULL_URI",
    "AWS_CONTAINER_AUTHORIZATION_TOKEN_FILE",
    "AWS_METADATA_ENDPOINT",
];

fn build_s3(
    target: &BackupTarget,
    bucket: &str,
    region: &str,
    creds: &Credentials,
    use_: Use,
) -> Result<Arc<dyn ObjectStore>, TargetError> {
    let t = target.to_string();
    let config = |problem: String| TargetError::Config {
        target: t.clone(),
        problem,
    };
    let endpoint = endpoint_for(bucket, region, creds);
    let mut b = AmazonS3Builder::new()
        .with_bucket_name(bucket)
        .with_region(region)
        .with_virtual_hosted_style_request(creds.virtual_hosted_style);
    if creds.endpoint.is_some() {
        let e = if creds.virtual_hosted_style {
            virtual_hosted_endpoint(&endpoint, bucket).map_err(config)?
        } else {
            endpoint.clone()
        };
        b = b.with_endpoint(e);
    }
    match (&creds.access_key_id, &creds.secret_access_key) {
        (Some(id), Some(secret)) => {
            b = b
                .with_access_key_id(id)
                .with_secret_access_key(secret.expose());
            if let Some(tok) = &creds.session_token {
                b = b.with_token(tok.expose());
            }
        }
        _ => {
            for key in IDENTITY_ENV {
                if let (Ok(v), Ok(k)) = (std::env::var(key), key.to_ascii_lowercase().parse()) {
                    b = b.with_config(k, v);
                }
            }
        }
    }
    let effective_endpoint = if creds.virtual_hosted_style && creds.endpoint.is_some() {
        virtual_hosted_endpoint(&endpoint, bucket).map_err(config)?
    } else {
        endpoint
    };
    b = b.with_client_options(client_options(&effective_endpoint, creds, use_).map_err(config)?);
    if let Use::Probe = use_ {
        b = b.with_retry(RetryConfig {
            backoff: BackoffConfig::default(),
            max_retries: 1,
            retry_timeout: Duration::from_secs(10),
        });
    }
    let store = b.build().map_err(|source| TargetError::Store {
        target: t.clone(),
        source: Box::new(source),
    })?;
    Ok(Arc::new(store))
}

fn local_store(target: &BackupTarget, dir: &Path) -> Result<Arc<dyn ObjectStore>, TargetError> {
    let t = target.to_string();
    std::fs::create_dir_all(dir).map_err(|source| TargetError::Io {
        target: t.clone(),
        context: "create",
        path: dir.to_path_buf(),
        source,
    })?;
    let fs = LocalFileSystem::new_with_prefix(dir).map_err(|source| TargetError::Store {
        target: t,
        source: Box::new(source),
    })?;
    // A finished backup must survive a crash of the target host, as an S3
    // PUT does: each block and config is fsynced, and its directory, before
    // the write counts as done.
    Ok(Arc::new(fs.with_fsync(true)))
}

async fn open(
    target: &BackupTarget,
    creds: &Credentials,
    mount_root: &Path,
    use_: Use,
) -> Result<(Arc<dyn ObjectStore>, ObjectPath), TargetError> {
    match target {
        BackupTarget::S3 {
            bucket,
            region,
            path,
        } => {
            let store = build_s3(target, bucket, region, creds, use_)?;
            // Validated by parse; from_url_path would re-escape.
            let prefix = ObjectPath::parse(path).map_err(|e| TargetError::Config {
                target: target.to_string(),
                problem: format!("path: {e}"),
            })?;
            Ok((store, prefix))
        }
        BackupTarget::Nfs { .. } => {
            let target2 = target.clone();
            let root = mount_root.to_path_buf();
            let dir = tokio::task::spawn_blocking(move || mount_nfs(&target2, &root))
                .await
                .map_err(|e| TargetError::Mount {
                    target: target.to_string(),
                    command: "mount".into(),
                    detail: format!("mount task failed: {e}"),
                })??;
            Ok((local_store(target, &dir)?, ObjectPath::default()))
        }
        BackupTarget::File { path } => Ok((local_store(target, path)?, ObjectPath::default())),
    }
}

/// Builds the object store for `target` and returns it with the prefix under
/// which the backupstore lives (`PATH` of an s3 URL, empty otherwise; the
/// format module appends `backupstore/`). Mounts an nfs target under
/// `mount_root`. No request is sent for s3: use [`check_target`] to probe.
pub async fn open_target(
    target: &BackupTarget,
    credentials: &Credentials,
    mount_root: &Path,
) -> Result<(Arc<dyn ObjectStore>, ObjectPath), TargetError> {
    open(target, credentials, mount_root, Use::Data).await
}

/// Opens `target` with short timeouts and one retry and lists its prefix,
/// turning the usual misconfigurations into a clear [`TargetError`]:
/// access denied, bucket not found, endpoint unreachable, TLS failure.
pub async fn check_target(
    target: &BackupTarget,
    credentials: &Credentials,
    mount_root: &Path,
) -> Result<(), TargetError> {
    let (store, prefix) = open(target, credentials, mount_root, Use::Probe).await?;
    let prefix = (!prefix.as_ref().is_empty()).then_some(prefix);
    let err = match store.list_with_delimiter(prefix.as_ref()).await {
        Ok(_) => return Ok(()),
        Err(e) => classify(target, credentials, e),
    };
    // object_store hands list failures back as `Generic` with the HTTP status
    // in a private type. A HEAD of the bucket itself (S3 HeadBucket) reports
    // it as a typed variant: 404 → no bucket, 403 → credentials.
    if let (TargetError::Store { .. }, BackupTarget::S3 { .. }) = (&err, target) {
        if let Err(head_err) = store.head(&ObjectPath::default()).await {
            let diagnosed = classify(target, credentials, head_err);
            if matches!(
                diagnosed,
                TargetError::AccessDenied { .. } | TargetError::BucketNotFound { .. }
            ) {
                return Err(diagnosed);
            }
        }
    }
    Err(err)
}

/// Maps an object_store error from a request against `target` to the
/// operator-facing error. Public so the backup code can use it on any failed call.
pub fn classify(
    target: &BackupTarget,
    creds: &Credentials,
    err: object_store::Error,
) -> TargetError {
    let t = target.to_string();
    let BackupTarget::S3 { bucket, region, .. } = target else {
        return TargetError::Store {
            target: t,
            source: Box::new(err),
        };
    };
    let endpoint = endpoint_for(bucket, region, creds);
    match &err {
        object_store::Error::PermissionDenied { .. }
        | object_store::Error::Unauthenticated { .. } => {
            return TargetError::AccessDenied {
                target: t,
                credentials: creds.source.clone(),
                source: Box::new(err),
            }
        }
        object_store::Error::NotFound { .. } => {
            return TargetError::BucketNotFound {
                target: t,
                bucket: bucket.clone(),
                endpoint,
            }
        }
        _ => {}
    }
    if let Some(reason) = tls_failure(&err) {
        return TargetError::Tls {
            target: t,
            endpoint,
            reason,
            source: Box::new(err),
        };
    }
    if is_connect_failure(&err) {
        return TargetError::Unreachable {
            target: t,
            endpoint,
            source: Box::new(err),
        };
    }
    TargetError::Store {
        target: t,
        source: Box::new(err),
    }
}

fn chain<'a>(
    err: &'a (dyn std::error::Error + 'static),
) -> impl Iterator<Item = &'a (dyn std::error::Error + 'static)> {
    std::iter::successors(Some(err), |e| e.source())
}

/// A rustls error anywhere in the chain. tokio-rustls wraps it in an
/// `io::Error`, whose `source()` skips the wrapped error, so each io::Error
/// is unwrapped by hand.
fn tls_failure(err: &object_store::Error) -> Option<String> {
    fn in_io(mut e: &(dyn std::error::Error + 'static)) -> Option<String> {
        loop {
            if let Some(r) = e.downcast_ref::<rustls::Error>() {
                return Some(r.to_string());
            }
            e = e.downcast_ref::<std::io::Error>()?.get_ref()?;
        }
    }
    chain(err).find_map(in_io)
}

fn is_connect_failure(err: &object_store::Error) -> bool {
    use object_store::client::HttpErrorKind;
    chain(err).any(|e| {
        e.downcast_ref::<object_store::client::HttpError>()
            .is_some_and(|h| matches!(h.kind(), HttpErrorKind::Connect | HttpErrorKind::Timeout))
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn err(url: &str) -> String {
        BackupTarget::parse(url).expect_err(url).to_string()
    }

    #[test]
    fn s3_urls() {
        let t = BackupTarget::parse("s3://backups@us-east-1/cluster/a/").expect("valid");
        assert_eq!(
            t,
            BackupTarget::S3 {
                bucket: "backups".into(),
                region: "us-east-1".into(),
                path: "cluster/a".into()
            }
        );
        assert_eq!(t.to_string(), "s3://backups@us-east-1/cluster/a/");
        let t = BackupTarget::parse("s3://b-1@us-east-1/").expect("valid");
        assert_eq!(t.to_string(), "s3://b-1@us-east-1/");
    }

    #[test]
    fn bad_urls_say_what_and_how() {
        let cases = [
            ("s3://bucket/path/", "missing region"),
            ("s3://bucket", "missing region"),
            ("s3://bucket@us-east-1", "missing trailing '/'"),
            (
                "s3://bucket@us-east-1/path",
                "write s3://bucket@us-east-1/path/",
            ),
            ("s3://@us-east-1/", "empty bucket"),
            ("s3://a@us-east-1/", "invalid bucket"),
            ("s3://bad/bucket@r/", "missing region"),
            ("s3://b_-@us-east-1/", "invalid bucket"),
            ("s3://bucket@/", "bad region"),
            ("s3://bucket@us-east-1/a//b/", "empty"),
            ("cifs://host/share", "unknown scheme \"cifs\""),
            ("backups", "no scheme"),
            ("", "empty"),
            ("file://relative/dir", "absolute path"),
            ("file:///a/../b", "'..'"),
            ("nfs://host", "missing export path"),
            ("nfs://host:", "missing export path"),
            ("nfs://:/export", "empty host"),
            ("nfs://h:/e?foo=bar", "only ?nfsOptions"),
        ];
        for (url, want) in cases {
            let e = err(url);
            assert!(e.contains(want), "{url}: {e}");
        }
    }

    #[test]
    fn nfs_and_file_urls() {
        let t = BackupTarget::parse("nfs://10.0.0.5:/exports/backups/?nfsOptions=nfsvers=4.1,soft")
            .expect("valid");
        assert_eq!(
            t,
            BackupTarget::Nfs {
                host: "10.0.0.5".into(),
                path: "/exports/backups".into(),
                options: Some("nfsvers=4.1,soft".into())
            }
        );
        assert_eq!(
            t.to_string(),
            "nfs://10.0.0.5:/exports/backups?nfsOptions=nfsvers=4.1,soft"
        );
        let dir = t
            .mount_dir(Path::new("/var/lib/cairn/backup-mounts"))
            .expect("nfs");
        assert!(dir.starts_with("/var/lib/cairn/backup-mounts"));
        assert_eq!(dir.file_name().map(|n| n.len()), Some(16));
        let cmds = nfs_mount_commands(&t, &dir);
        assert_eq!(
            cmds,
            vec![vec![
                "mount".to_string(),
                "-t".into(),
                "nfs4".into(),
                "-o".into(),
                "nfsvers=4.1,soft".into(),
                "10.0.0.5:/exports/backups".into(),
                dir.display().to_string()
            ]]
        );
        // Without options: 4.1, then 4.0 (never an unasked-for 4.2).
        let t = BackupTarget::parse("nfs://nas.local:/").expect("export root");
        let cmds = nfs_mount_commands(&t, Path::new("/m"));
        assert_eq!(cmds.len(), 2);
        assert_eq!(cmds[0][4], format!("nfsvers=4.1,{DEFAULT_NFS_OPTIONS}"));
        assert_eq!(cmds[1][4], format!("nfsvers=4.0,{DEFAULT_NFS_OPTIONS}"));
        assert_eq!(cmds[0][5], "nas.local:/");
        assert!(nfs_mount_commands(
            &BackupTarget::parse("file:///x").expect("file"),
            Path::new("/m")
        )
        .is_empty());
        let f = BackupTarget::parse("file:///srv/backups").expect("valid");
        assert_eq!(
            f,
            BackupTarget::File {
                path: "/srv/backups".into()
            }
        );
        assert_eq!(f.to_string(), "file:///srv/backups");
        assert_eq!(f.mount_dir(Path::new("/m")), None);
    }

    #[test]
    fn mountinfo_lookup() {
        let info = "36 35 98:0 / /mnt/a\\040b rw,noatime master:1 - nfs4 h:/e rw\n\
                    37 35 98:0 / /other rw - ext4 /dev/x rw\n";
        assert!(is_mount_point(info, Path::new("/mnt/a b")));
        assert!(is_mount_point(info, Path::new("/other")));
        assert!(!is_mount_point(info, Path::new("/mnt")));
    }

    #[test]
    fn virtual_hosted_endpoints() {
        assert_eq!(
            virtual_hosted_endpoint("http://localhost:9000", "bkt").expect("name"),
            "http://bkt.localhost:9000"
        );
        assert_eq!(
            virtual_hosted_endpoint("https://bkt.minio.example", "bkt").expect("name"),
            "https://bkt.minio.example"
        );
        let e = virtual_hosted_endpoint("http://127.0.0.1:9000", "bkt").expect_err("ip");
        assert!(e.contains("needs a DNS name"), "{e}");
    }

    #[test]
    fn proxy_chosen_by_endpoint_scheme() {
        let creds = Credentials::parse(
            "HTTP_PROXY=http://plain:1\nHTTPS_PROXY=http://tls:2\nNO_PROXY=.svc\n",
            CredentialSource::Environment,
            Path::new("."),
        )
        .expect("valid");
        use object_store::ClientConfigKey as K;
        let o = client_options("http://minio:9000", &creds, Use::Data).expect("opts");
        assert_eq!(
            o.get_config_value(&K::ProxyUrl).as_deref(),
            Some("http://plain:1")
        );
        assert_eq!(
            o.get_config_value(&K::ProxyExcludes).as_deref(),
            Some(".svc")
        );
        assert_eq!(o.get_config_value(&K::AllowHttp).as_deref(), Some("true"));
        let o = client_options("https://minio:9000", &creds, Use::Data).expect("opts");
        assert_eq!(
            o.get_config_value(&K::ProxyUrl).as_deref(),
            Some("http://tls:2")
        );
        assert_eq!(o.get_config_value(&K::AllowHttp).as_deref(), Some("false"));
    }
}
