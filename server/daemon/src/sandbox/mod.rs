//! Sandboxes: the registry of every sandbox, starting and stopping them,
//! their ids, lifetimes and console logs, Exec and file transfer, and the
//! Linux images and host check a Linux boot needs.

pub mod console;
pub mod exec;
pub mod expiry;
pub mod files;
pub mod huge_pages;
pub mod ids;
pub mod image_lookup;
pub mod lifecycle;
pub mod linux_host;
pub mod registry;
