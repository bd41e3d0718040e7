//! The gRPC face of the daemon: the two services, request validation, the
//! API views of snapshots, what clients may see of errors, and the one
//! mapping from the daemon's errors to `tonic::Status`.

pub mod error;
pub mod public;
pub mod sandbox_service;
pub mod snapshot_service;
pub mod snapshot_view;
pub mod validate;
