//! The scenarios, by area; each is an `async fn()` that starts the
//! daemons it needs and panics on a failed assertion.

pub mod expiry;
pub mod files;
pub mod lifecycle;
pub mod linux;
pub mod live;
pub mod server;
pub mod shutdown;
pub mod snapshots;
