//! The committed CRDs are what the types generate: run
//! `cargo run -p cairn-crd --bin crdgen -- --write` after changing
//! `crd/src/resources.rs`.

#[test]
fn committed_crds_match_the_types() {
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../deploy/helm/cairn/crds/cairn.io.yaml");
    let committed = std::fs::read_to_string(&path).expect("deploy/helm/cairn/crds/cairn.io.yaml");
    let generated = cairn_crd::resources::crds_yaml().expect("yaml");
    assert!(
        committed == generated,
        "{} drifted from crd/src/resources.rs: run `cargo run -p cairn-crd --bin crdgen -- --write` and commit it",
        path.display()
    );
}

#[test]
fn every_crd_has_status_printer_columns_and_a_namespaced_scope() {
    let crds = cairn_crd::resources::crds();
    assert_eq!(crds.len(), 7);
    for crd in &crds {
        let name = crd.metadata.name.clone().unwrap_or_default();
        assert!(name.ends_with(".cairn.io"), "{name}");
        assert_eq!(crd.spec.scope, "Namespaced", "{name}");
        for v in &crd.spec.versions {
            assert_eq!(v.name, "v1alpha1");
            assert!(
                v.subresources
                    .as_ref()
                    .and_then(|s| s.status.as_ref())
                    .is_some(),
                "{name}: status subresource"
            );
            assert!(
                v.additional_printer_columns
                    .as_ref()
                    .is_some_and(|c| !c.is_empty()),
                "{name}: printer columns"
            );
        }
    }
}
