//! Writes the CRDs of `cairn.io` as YAML: to standard output, or with
//! `--write` to `deploy/helm/cairn/crds/cairn.io.yaml` (the committed copy
//! the chart installs; `crd/tests/crds.rs` fails when it drifts).

use std::path::Path;

fn main() -> anyhow::Result<()> {
    let yaml = cairn_crd::resources::crds_yaml()?;
    match std::env::args().nth(1).as_deref() {
        None => print!("{yaml}"),
        Some("--write") => {
            let path = Path::new(env!("CARGO_MANIFEST_DIR"))
                .join("../deploy/helm/cairn/crds/cairn.io.yaml");
            if let Some(dir) = path.parent() {
                std::fs::create_dir_all(dir)?;
            }
            std::fs::write(&path, yaml)?;
            eprintln!("wrote {}", path.display());
        }
        Some(other) => anyhow::bail!("unknown argument {other:?}: crdgen [--write]"),
    }
    Ok(())
}
