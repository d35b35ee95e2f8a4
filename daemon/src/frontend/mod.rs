//! Frontends expose an attached volume to the host. The one frontend is ublk:
//! `/dev/ublkbN`, whose queues feed the volume's [`crate::engine`].

mod ublk;

pub use ublk::{
    kernel_release, remove_leftover_device, resize_device, ublk_available, ublk_driver_features,
    FrontendError, FrontendOptions, KernelFeatures, UblkDevice,
};
