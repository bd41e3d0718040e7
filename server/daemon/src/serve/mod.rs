//! Serving the API: the listeners and the shutdown sequence, and the tower
//! layers every call passes (authentication, connection accounting,
//! draining).

pub mod auth;
pub mod connections;
pub mod drain;
pub mod guarded_body;
pub mod peer;
pub mod server;
