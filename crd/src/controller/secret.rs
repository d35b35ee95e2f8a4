//! The cluster secret every `cairnd` authenticates its peers with: a
//! Kubernetes Secret made once at install by `cairn-controller
//! init-secret` (the chart's `cairn-init` Job), 32 random bytes, never
//! replaced. The node pods mount it; they start once it exists.

use std::collections::BTreeMap;
use std::io::Read as _;

use k8s_openapi::api::core::v1::Secret;
use k8s_openapi::ByteString;
use kube::api::{Api, ObjectMeta, PostParams};

use super::Error;

/// The key of the Secret's data that holds the secret.
pub const SECRET_KEY: &str = "secret";

/// Whether [`ensure`] made the Secret or found it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Ensured {
    Created,
    Existed,
}

/// Makes Secret `name` with fresh random bytes unless it exists (a second
/// run, or a race with another, keeps the first one's).
pub async fn ensure(client: kube::Client, namespace: &str, name: &str) -> Result<Ensured, Error> {
    let api: Api<Secret> = Api::namespaced(client, namespace);
    if api.get_opt(name).await?.is_some() {
        return Ok(Ensured::Existed);
    }
    let mut bytes = [0u8; 32];
    std::fs::File::open("/dev/urandom")
        .and_then(|mut f| f.read_exact(&mut bytes))
        .map_err(|e| Error::Refused(format!("reading /dev/urandom: {e}")))?;
    let hex: String = bytes.iter().map(|b| format!("{b:02x}")).collect();
    let secret = Secret {
        metadata: ObjectMeta {
            name: Some(name.to_string()),
            namespace: Some(namespace.to_string()),
            labels: Some(BTreeMap::from([(
                "app.kubernetes.io/part-of".to_string(),
                "cairn".to_string(),
            )])),
            ..Default::default()
        },
        data: Some(BTreeMap::from([(
            SECRET_KEY.to_string(),
            ByteString(hex.into_bytes()),
        )])),
        type_: Some("Opaque".into()),
        ..Default::default()
    };
    match api.create(&PostParams::default(), &secret).await {
        Ok(_) => Ok(Ensured::Created),
        Err(kube::Error::Api(s)) if s.code == 409 => Ok(Ensured::Existed),
        Err(e) => Err(e.into()),
    }
}
