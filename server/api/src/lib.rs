//! The forkd gRPC API (`forkd.v1`), generated from `proto/forkd/v1`.
//!
//! The .proto files are the single source of truth; the Python and
//! TypeScript clients are generated from the same files.

/// Messages, enums, servers and clients of package `forkd.v1`.
pub mod v1 {
    #![allow(clippy::all, missing_docs)]
    tonic::include_proto!("forkd.v1");
}

/// Encoded `FileDescriptorSet` of the forkd protos, for server reflection.
pub const FILE_DESCRIPTOR_SET: &[u8] = tonic::include_file_descriptor_set!("forkd_descriptor");
