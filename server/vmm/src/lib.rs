//! forkd's virtual machine monitor: one KVM microVM per process.
//!
//! The daemon starts `forkd-vmm` with one end of a socket pair; the VMM
//! builds the VM (memfd RAM, page tables, GDT/TSS/IDT, vCPUs at CPL3),
//! loads the guest, runs one thread per vCPU and serves the control
//! protocol of `forkd-control` on the main thread.

pub mod agent;
pub mod boot;
pub mod capture;
pub mod control;
pub mod coordinator;
pub mod cpu;
pub mod devices;
pub mod error;
pub mod events;
pub mod kick;
pub mod kvm;
pub mod linux;
pub mod live;
pub mod loader;
pub mod memory;
pub mod snapshot;
pub mod standby;
pub mod startup;
pub mod state;
pub mod vcpu;
pub mod vm;
