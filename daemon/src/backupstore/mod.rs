pub mod credentials;
pub mod target;
