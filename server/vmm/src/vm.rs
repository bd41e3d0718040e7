//! Creating the KVM VM: checks, memory slot, in-kernel irqchip, vCPUs, the
//! loaded guest and its boot environment.

use kvm_bindings::{
    kvm_userspace_memory_region, CpuId, KVM_MAX_CPUID_ENTRIES, KVM_MEM_LOG_DIRTY_PAGES,
};
use kvm_ioctls::{Kvm, VcpuFd, VmFd};

use crate::error::{Result, VmmError};
use crate::memory::{GuestRam, PageSize};
use crate::state::{self, VmState};
use crate::{boot, cpu, loader};

/// What to build.
#[derive(Clone, Debug)]
pub struct VmConfig {
    /// Guest RAM in MiB.
    pub memory_mib: u32,
    /// Number of vCPUs.
    pub vcpus: u8,
    /// The pages behind a cold-booted guest's RAM.
    pub page_size: PageSize,
}

/// A built VM, ready to run.
pub struct Vm {
    /// Kept open for the VM's lifetime.
    pub kvm: Kvm,
    /// The VM.
    pub fd: VmFd,
    /// Guest RAM.
    pub ram: GuestRam,
    /// The vCPUs, in index order.
    pub vcpus: Vec<VcpuFd>,
    /// TSC frequency the guest was told.
    pub tsc_khz: u64,
}

impl Vm {
    /// Builds a VM running `image` (an ELF) with `config`.
    pub fn create(config: &VmConfig, image: &[u8]) -> Result<Vm> {
        if config.vcpus == 0 || u64::from(config.vcpus) > forkd_guest_abi::MAX_VCPUS {
            return Err(VmmError::Config(format!(
                "vcpus must be between 1 and {}, got {}",
                forkd_guest_abi::MAX_VCPUS,
                config.vcpus
            )));
        }
        if config.memory_mib < forkd_guest_abi::MIN_MEMORY_MIB {
            return Err(VmmError::Config(format!(
                "memory must be at least {} MiB, got {}",
                forkd_guest_abi::MIN_MEMORY_MIB,
                config.memory_mib
            )));
        }
        let (kvm, fd) = create_vm()?;
        let ram = GuestRam::with_page_size(u64::from(config.memory_mib) << 20, config.page_size)?;
        attach_memory(&fd, &ram)?;

        let entry = loader::load(&ram, image)?;
        let vcpus = create_vcpus(&kvm, &fd, config.vcpus, |vcpu, supported, index| {
            cpu::set_cpuid(vcpu, supported, index)?;
            cpu::set_entry_state(vcpu, index, entry)
        })?;
        let tsc_khz = tsc_khz(&vcpus[0]);
        boot::build_environment(&ram, u32::from(config.vcpus), tsc_khz)?;
        Ok(Vm {
            kvm,
            fd,
            ram,
            vcpus,
            tsc_khz,
        })
    }

    /// Rebuilds a VM from a snapshot: `memory` is the snapshot's memory
    /// (mapped copy-on-write), `state` its saved KVM state.
    /// `mark` is called with the name of each step as it ends (start-up
    /// timing, [`crate::startup`]).
    pub fn restore(
        state: &VmState,
        memory: std::fs::File,
        mark: impl Fn(&'static str),
    ) -> Result<Vm> {
        if state.vcpus.len() as u64 > forkd_guest_abi::MAX_VCPUS {
            return Err(VmmError::Restore(format!(
                "vmstate has {} vCPUs; at most {} are supported",
                state.vcpus.len(),
                forkd_guest_abi::MAX_VCPUS
            )));
        }
        let (kvm, fd) = create_vm()?;
        if state.pit.is_some() {
            create_pit(&fd)?;
        }
        mark("vm");
        let ram = GuestRam::from_snapshot(memory, state.memory_bytes)?;
        mark("memory");
        attach_memory(&fd, &ram)?;
        mark("memslot");
        state::restore_vm(&fd, state)?;
        mark("vm_state");
        let mut vcpus = Vec::with_capacity(state.vcpus.len());
        for (index, saved) in state.vcpus.iter().enumerate() {
            let vcpu = fd
                .create_vcpu(index as u64)
                .map_err(VmmError::kvm("KVM_CREATE_VCPU"))?;
            state::restore_vcpu(&vcpu, saved)?;
            vcpus.push(vcpu);
        }
        mark("vcpus");
        Ok(Vm {
            kvm,
            fd,
            ram,
            vcpus,
            tsc_khz: state.tsc_khz,
        })
    }
}

/// Creates `count` vCPUs, each set up by `setup` with KVM's supported
/// CPUID and its index.
pub(crate) fn create_vcpus(
    kvm: &Kvm,
    fd: &VmFd,
    count: u8,
    setup: impl Fn(&VcpuFd, &CpuId, u8) -> Result<()>,
) -> Result<Vec<VcpuFd>> {
    let supported = kvm
        .get_supported_cpuid(KVM_MAX_CPUID_ENTRIES)
        .map_err(VmmError::kvm("KVM_GET_SUPPORTED_CPUID"))?;
    (0..count)
        .map(|index| {
            let vcpu = fd
                .create_vcpu(u64::from(index))
                .map_err(VmmError::kvm("KVM_CREATE_VCPU"))?;
            setup(&vcpu, &supported, index)?;
            Ok(vcpu)
        })
        .collect()
}

/// Opens KVM, checks it, and creates a VM with an in-kernel irqchip.
pub(crate) fn create_vm() -> Result<(Kvm, VmFd)> {
    let kvm = Kvm::new().map_err(VmmError::KvmUnavailable)?;
    crate::kvm::check(&kvm)?;
    let fd = kvm.create_vm().map_err(VmmError::kvm("KVM_CREATE_VM"))?;
    if let Err(e) = fd.set_tss_address(crate::kvm::TSS_ADDRESS) {
        // Only Intel VMX needs it; other backends may refuse it.
        eprintln!("forkd-vmm: KVM_SET_TSS_ADDR not accepted ({e}); continuing");
    }
    fd.create_irq_chip()
        .map_err(VmmError::kvm("KVM_CREATE_IRQCHIP"))?;
    Ok((kvm, fd))
}

/// Creates KVM's PIT (a Linux guest calibrates against it); its speaker
/// port is a dummy.
pub(crate) fn create_pit(fd: &VmFd) -> Result<()> {
    let pit = kvm_bindings::kvm_pit_config {
        flags: kvm_bindings::KVM_PIT_SPEAKER_DUMMY,
        ..Default::default()
    };
    fd.create_pit2(pit)
        .map_err(VmmError::kvm("KVM_CREATE_PIT2"))
}

/// Hands guest RAM to KVM as slot 0, with dirty logging for DIFF snapshots.
pub(crate) fn attach_memory(fd: &VmFd, ram: &GuestRam) -> Result<()> {
    // SAFETY: the range is a live mapping of `ram.size()` bytes owned by
    // `ram`, which the Vm keeps for as long as the VM exists.
    unsafe { attach_range(fd, ram.host_address(), ram.size()) }
}

/// Hands `size` bytes of host address space at `host_address` to KVM as
/// guest RAM (slot 0, from guest address 0, dirty-logged).
///
/// # Safety
/// The range must stay mapped or reserved by this process, and not be
/// used for anything but guest RAM, for as long as the VM exists.
pub(crate) unsafe fn attach_range(fd: &VmFd, host_address: u64, size: u64) -> Result<()> {
    let region = kvm_userspace_memory_region {
        slot: 0,
        flags: KVM_MEM_LOG_DIRTY_PAGES,
        guest_phys_addr: 0,
        memory_size: size,
        userspace_addr: host_address,
    };
    // SAFETY: the caller guarantees the range outlives the VM.
    unsafe { fd.set_user_memory_region(region) }
        .map_err(VmmError::kvm("KVM_SET_USER_MEMORY_REGION"))
}

/// The guest's TSC frequency: KVM's, or measured.
pub(crate) fn tsc_khz(vcpu: &VcpuFd) -> u64 {
    match vcpu.get_tsc_khz() {
        Ok(khz) if khz > 0 => u64::from(khz),
        _ => calibrate_tsc_khz(),
    }
}

/// Measures the host TSC against the monotonic clock (guest and host share
/// the TSC rate), for hosts where KVM_GET_TSC_KHZ is unavailable.
fn calibrate_tsc_khz() -> u64 {
    let t0 = std::time::Instant::now();
    // SAFETY: rdtsc has no preconditions on x86_64.
    let c0 = unsafe { core::arch::x86_64::_rdtsc() };
    std::thread::sleep(std::time::Duration::from_millis(20));
    // SAFETY: as above.
    let c1 = unsafe { core::arch::x86_64::_rdtsc() };
    let us = t0.elapsed().as_micros().max(1) as u64;
    (c1 - c0) * 1000 / us
}
