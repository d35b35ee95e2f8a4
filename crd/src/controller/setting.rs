//! `Setting` and `BackupTarget` objects, applied by every node's controller
//! to its own `cairnd`. Each controller writes only its node's entry of
//! `status.nodes` (a list-map keyed by node, merged by server-side apply),
//! so `kubectl get setting X -o yaml` shows where a value took and where it
//! was refused, with `cairnd`'s reason. A refused value changes nothing on
//! that node (`cairnd` checks it first).
//!
//! The backup target's credential Secret is written for `cairnd` as a
//! `KEY=VALUE` file (mode 0600, in [`Context`]'s credentials directory) and
//! named by the `backup-target-credential-secret` setting; its values are
//! never logged.

use std::collections::BTreeMap;
use std::io::Write as _;
use std::os::unix::fs::OpenOptionsExt as _;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use cairn_api::pb;
use k8s_openapi::api::core::v1::Secret;
use kube::api::{Api, Patch, PatchParams};
use kube::runtime::controller::Action;
use kube::ResourceExt;
use serde_json::json;

use super::{manager_name, Context, Error};
use crate::resources::{BackupTarget, NodeApplied, Setting};

/// Settings are applied again this often (a `cairnd` that restarted with
/// its own defaults gets them back).
pub const REAPPLY: Duration = Duration::from_secs(60);

/// The one `BackupTarget` applied.
pub const DEFAULT_TARGET: &str = "default";

pub async fn reconcile_setting(s: Arc<Setting>, ctx: Arc<Context>) -> Result<Action, Error> {
    let started = Instant::now();
    let result = apply_setting(&s, &ctx).await;
    ctx.metrics
        .reconciled("setting", started.elapsed(), result.as_ref().err());
    result
}

async fn apply_setting(s: &Setting, ctx: &Context) -> Result<Action, Error> {
    let name = s.name_any();
    let outcome = set(ctx, &name, &s.spec.value).await?;
    if let Err(why) = &outcome {
        ctx.event(s, true, "SettingRefused", format!("{}: {why}", ctx.node))
            .await;
    }
    let api: Api<Setting> = Api::namespaced(ctx.client.clone(), &ctx.namespace);
    write_node_status(&api, "Setting", &name, ctx, outcome).await?;
    Ok(Action::requeue(REAPPLY))
}

/// Sets one setting on the local `cairnd`: `Ok(Err(why))` when `cairnd`
/// refused the value (nothing changed), `Err` when it could not be asked.
async fn set(ctx: &Context, name: &str, value: &str) -> Result<Result<(), String>, Error> {
    let mut c = ctx.cairnd.client().await?;
    match c
        .set_setting(pb::SetSettingRequest {
            name: name.to_string(),
            value: value.to_string(),
        })
        .await
    {
        Ok(_) => Ok(Ok(())),
        Err(s)
            if matches!(
                s.code(),
                tonic::Code::InvalidArgument
                    | tonic::Code::NotFound
                    | tonic::Code::FailedPrecondition
            ) =>
        {
            Ok(Err(s.message().to_string()))
        }
        Err(s) => Err(Error::cairnd(format!("setting {name}"))(s)),
    }
}

async fn write_node_status<K>(
    api: &Api<K>,
    kind: &str,
    name: &str,
    ctx: &Context,
    outcome: Result<(), String>,
) -> Result<(), Error>
where
    K: kube::Resource + Clone + serde::de::DeserializeOwned + std::fmt::Debug,
{
    let entry = NodeApplied {
        node: ctx.node.clone(),
        applied: outcome.is_ok(),
        message: outcome.err().unwrap_or_default(),
    };
    let patch = json!({
        "apiVersion": "cairn.io/v1alpha1",
        "kind": kind,
        "status": { "nodes": [entry] },
    });
    api.patch_status(
        name,
        &PatchParams::apply(&manager_name(&ctx.node)).force(),
        &Patch::Apply(&patch),
    )
    .await?;
    Ok(())
}

pub async fn reconcile_target(t: Arc<BackupTarget>, ctx: Arc<Context>) -> Result<Action, Error> {
    let started = Instant::now();
    let result = apply_target(&t, &ctx).await;
    ctx.metrics
        .reconciled("backuptarget", started.elapsed(), result.as_ref().err());
    result
}

async fn apply_target(t: &BackupTarget, ctx: &Context) -> Result<Action, Error> {
    let name = t.name_any();
    let api: Api<BackupTarget> = Api::namespaced(ctx.client.clone(), &ctx.namespace);
    if name != DEFAULT_TARGET {
        let why = format!(
            "only the BackupTarget named {DEFAULT_TARGET:?} is applied; rename {name:?} to it"
        );
        write_node_status(&api, "BackupTarget", &name, ctx, Err(why)).await?;
        return Ok(Action::await_change());
    }
    let credential = match &t.spec.credential_secret {
        None => String::new(),
        Some(secret) => {
            let secrets: Api<Secret> = Api::namespaced(ctx.client.clone(), &ctx.namespace);
            let found = match secrets.get_opt(secret).await? {
                Some(s) => s,
                None => {
                    let why = format!(
                        "credential Secret {secret:?} not found in namespace {}: create it (AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY, AWS_ENDPOINTS…)",
                        ctx.namespace
                    );
                    ctx.event(t, true, "CredentialMissing", why.clone()).await;
                    write_node_status(&api, "BackupTarget", &name, ctx, Err(why)).await?;
                    return Ok(Action::requeue(REAPPLY));
                }
            };
            let path = write_credentials(&ctx.credentials_dir(), secret, &found)
                .map_err(|e| Error::Refused(format!("writing the credentials of {secret}: {e}")))?;
            path.display().to_string()
        }
    };
    let poll = t.spec.poll_interval.map(|p| p.to_string());
    let mut steps: Vec<(&str, String)> = vec![
        ("backup-target-credential-secret", credential),
        ("backup-target", t.spec.url.clone()),
    ];
    if let Some(p) = poll {
        steps.push(("backupstore-poll-interval", p));
    }
    let mut outcome = Ok(());
    for (setting, value) in steps {
        if let Err(why) = set(ctx, setting, &value).await? {
            outcome = Err(format!("{setting}: {why}"));
            break;
        }
    }
    if let Err(why) = &outcome {
        ctx.event(
            t,
            true,
            "BackupTargetRefused",
            format!("{}: {why}", ctx.node),
        )
        .await;
    }
    write_node_status(&api, "BackupTarget", &name, ctx, outcome).await?;
    Ok(Action::requeue(REAPPLY))
}

/// Writes a Secret's data as the `KEY=VALUE` file `cairnd` reads (values
/// quoted; a PEM spans lines inside its quotes). Mode 0600, replaced
/// atomically.
pub fn write_credentials(dir: &Path, name: &str, secret: &Secret) -> std::io::Result<PathBuf> {
    std::fs::create_dir_all(dir)?;
    let mut data: BTreeMap<String, String> = BTreeMap::new();
    for (k, v) in secret.data.iter().flatten() {
        data.insert(k.clone(), String::from_utf8_lossy(&v.0).into_owned());
    }
    for (k, v) in secret.string_data.iter().flatten() {
        data.insert(k.clone(), v.clone());
    }
    let mut text = String::new();
    for (k, v) in &data {
        if !k.chars().all(|c| c.is_ascii_alphanumeric() || c == '_') {
            continue;
        }
        if v.contains('"') {
            text.push_str(&format!("{k}='{v}'\n"));
        } else {
            text.push_str(&format!("{k}=\"{v}\"\n"));
        }
    }
    let path = dir.join(format!("{name}.env"));
    let tmp = dir.join(format!(".{name}.env.tmp"));
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(&tmp)?;
    f.write_all(text.as_bytes())?;
    f.sync_all()?;
    std::fs::rename(&tmp, &path)?;
    std::fs::File::open(dir)?.sync_all()?;
    Ok(path)
}

pub fn error_policy<K>(_o: Arc<K>, _e: &Error, _ctx: Arc<Context>) -> Action {
    Action::requeue(Duration::from_secs(10))
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use k8s_openapi::ByteString;

    #[test]
    fn credentials_are_written_0600_with_quoted_values() {
        let dir = tempfile::tempdir().unwrap();
        let secret = Secret {
            data: Some(BTreeMap::from([
                (
                    "AWS_ACCESS_KEY_ID".to_string(),
                    ByteString(b"AKIA".to_vec()),
                ),
                (
                    "AWS_CERT".to_string(),
                    ByteString(
                        b"-----BEGIN CERTIFICATE-----\nMII\n-----END CERTIFICATE-----".to_vec(),
                    ),
                ),
                ("bad key".to_string(), ByteString(b"x".to_vec())),
            ])),
            ..Default::default()
        };
        let p = write_credentials(dir.path(), "s3", &secret).unwrap();
        use std::os::unix::fs::PermissionsExt as _;
        assert_eq!(
            std::fs::metadata(&p).unwrap().permissions().mode() & 0o777,
            0o600
        );
        let text = std::fs::read_to_string(&p).unwrap();
        assert!(text.contains("AWS_ACCESS_KEY_ID=\"AKIA\"\n"), "{text}");
        assert!(
            text.contains("AWS_CERT=\"-----BEGIN CERTIFICATE-----\nMII\n"),
            "{text}"
        );
        assert!(!text.contains("bad key"));
    }
}
