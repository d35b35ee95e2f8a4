//! Frontends expose an attached volume to the host. The one frontend is ublk:
//! `/dev/ublkbN`, whose queues feed the volume's [`crate::engine`].

mod ublk;

pub use ublk::{ublk_available, FrontendError, FrontendOptions, UblkDevice};
