//! Failpoint-driven data-safety tests (see daemon/Cargo.toml `failpoints`).
