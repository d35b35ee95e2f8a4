//! Backups in Longhorn's backupstore format, on any `object_store` target.
//!
//! - [`format`](mod@format): the layout, the JSON configs, checksums, compression and
//!   `bak://` handles (see `docs/design/0004-backupstore-format.md`);
//! - [`store`]: backup, restore, delete with garbage collection, listing and
//!   Longhorn's lock files;
//! - [`target`] and [`credentials`]: the `backup-target` URL (s3://, nfs://,
//!   file://) and its credentials, turned into an object store;
//! - [`progress`]: progress of a running backup or restore.

pub mod credentials;
pub mod format;
pub mod progress;
pub mod store;
pub mod target;

pub use progress::Progress;
