//! Which hypervisor backs `/dev/kvm`: Intel VMX (`kvm_intel`), AMD SVM
//! (`kvm_amd`) or KVM-PVM (`kvm_pvm`), and what each allows.
//!
//! The vendor module is the evidence: it is listed in `/proc/modules` when
//! loaded as a module, and has a directory in `/sys/module` when loaded or
//! built in (all three have parameters, so a built-in one shows up there
//! too; kernels without module support have no `/proc/modules` at all).
//! The CPU flags `vmx`/`svm` say what the hardware offers, and `hypervisor`
//! that this kernel itself runs in a VM (then VMX/SVM mean nested
//! virtualization, and PVM is the usual way to get KVM at all).
//! On VMX and SVM the vendor module's `ept`/`npt` parameter says whether
//! KVM uses two-dimensional paging (EPT/NPT); without it KVM falls back to
//! shadow page tables, which work but make every guest page-table change
//! and every dirty-log pass much slower.
//! [`detect`] is pure, so it is tested on sample inputs.

use std::collections::BTreeSet;
use std::path::Path;

use serde_json::json;

use super::report::Check;

/// Name of this check.
pub const NAME: &str = "hypervisor";

/// A KVM backend.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Backend {
    /// Intel VT-x, module `kvm_intel`.
    Vmx,
    /// AMD-V, module `kvm_amd`.
    Svm,
    /// KVM-PVM, the paravirtual software hypervisor, module `kvm_pvm`.
    Pvm,
}

impl Backend {
    /// The vendor module's parameter that enables two-dimensional paging,
    /// and the feature's name; None for PVM (it always shadows).
    pub fn tdp_param(self) -> Option<(&'static str, &'static str)> {
        match self {
            Backend::Vmx => Some(("ept", "EPT")),
            Backend::Svm => Some(("npt", "nested paging (NPT)")),
            Backend::Pvm => None,
        }
    }

    /// The vendor module that provides it.
    pub fn module(self) -> &'static str {
        match self {
            Backend::Vmx => "kvm_intel",
            Backend::Svm => "kvm_amd",
            Backend::Pvm => "kvm_pvm",
        }
    }

    /// Stable lower-case id, as in the JSON output.
    pub fn id(self) -> &'static str {
        match self {
            Backend::Vmx => "vmx",
            Backend::Svm => "svm",
            Backend::Pvm => "pvm",
        }
    }

    /// Human name.
    pub fn title(self) -> &'static str {
        match self {
            Backend::Vmx => "Intel VMX",
            Backend::Svm => "AMD SVM",
            Backend::Pvm => "KVM-PVM",
        }
    }

    /// Whether guest kernel mode (CPL0) runs at native speed.
    pub fn native_cpl0(self) -> bool {
        !matches!(self, Backend::Pvm)
    }

    /// What this backend allows, in one clause.
    pub fn allows(self) -> &'static str {
        match self {
            Backend::Vmx | Backend::Svm => {
                "hardware virtualization: guest code at every privilege level runs at native \
                 speed; forkd's reference guest runs, and so would a stock Linux guest"
            }
            Backend::Pvm => {
                "a software hypervisor: guest CPL3 code runs at native speed, guest CPL0 code is \
                 emulated (~1000x slower); forkd's reference guest (CPL3) runs at full speed, a \
                 stock Linux guest does not boot"
            }
        }
    }

    fn all() -> [Backend; 3] {
        [Backend::Vmx, Backend::Svm, Backend::Pvm]
    }
}

/// What the host says about its virtualization.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Detection {
    /// Vendor modules present (loaded or built in), as backends.
    pub loaded: Vec<Backend>,
    /// KVM-related modules seen (`kvm`, `kvm_intel`, ...), sorted.
    pub modules: Vec<String>,
    /// Whether any module list could be read at all.
    pub modules_known: bool,
    /// The CPU flag `vmx`.
    pub cpu_vmx: bool,
    /// The CPU flag `svm`.
    pub cpu_svm: bool,
    /// The CPU flag `hypervisor`: this kernel runs inside a VM.
    pub in_vm: bool,
    /// Whether the vendor module has two-dimensional paging on (its `ept`
    /// or `npt` parameter), when that could be read.
    pub tdp: Option<bool>,
}

/// Reads a module's boolean parameter text: `Y`/`1` on, `N`/`0` off.
pub fn parse_bool_param(text: &str) -> Option<bool> {
    match text.trim() {
        "Y" | "y" | "1" => Some(true),
        "N" | "n" | "0" => Some(false),
        _ => None,
    }
}

/// How sure [`Detection::backend`] is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Evidence {
    /// Exactly one vendor module is present.
    Module,
    /// No module list could be read; inferred from the CPU flags.
    CpuFlags,
}

impl Detection {
    /// The backend of `/dev/kvm`, when it can be told, and on what grounds.
    pub fn backend(&self) -> Option<(Backend, Evidence)> {
        match self.loaded.as_slice() {
            [one] => Some((*one, Evidence::Module)),
            [] if !self.modules_known && self.cpu_vmx != self.cpu_svm => Some((
                if self.cpu_vmx {
                    Backend::Vmx
                } else {
                    Backend::Svm
                },
                Evidence::CpuFlags,
            )),
            _ => None,
        }
    }

    /// What to do to get a working `/dev/kvm`, given what is here (used as
    /// the kvm check's hint when the device is missing).
    pub fn enable_hint(&self) -> String {
        if self.cpu_vmx && !self.loaded.contains(&Backend::Vmx) {
            "the CPU has VMX: load KVM with `modprobe kvm_intel` (and `kvm`)".into()
        } else if self.cpu_svm && !self.loaded.contains(&Backend::Svm) {
            "the CPU has SVM: load KVM with `modprobe kvm_amd` (and `kvm`)".into()
        } else if self.in_vm {
            "this machine is a VM without VMX/SVM: enable nested virtualization on its host, \
             or run a kernel with KVM-PVM (kvm_pvm)"
                .into()
        } else {
            "enable virtualization (VT-x/AMD-V) in the firmware, then load kvm_intel or kvm_amd"
                .into()
        }
    }
}

/// Works out the backend from `/proc/cpuinfo` text and module names (from
/// `/proc/modules` and `/sys/module`); `modules_known` says whether either
/// list could be read.
pub fn detect<'a>(
    cpuinfo: &str,
    modules: impl IntoIterator<Item = &'a str>,
    modules_known: bool,
) -> Detection {
    let flags: BTreeSet<&str> = cpuinfo
        .lines()
        .find_map(|line| {
            let (key, value) = line.split_once(':')?;
            (key.trim() == "flags").then_some(value)
        })
        .map(|v| v.split_whitespace().collect())
        .unwrap_or_default();
    let modules: BTreeSet<String> = modules
        .into_iter()
        .filter(|m| *m == "kvm" || m.starts_with("kvm_"))
        .map(str::to_owned)
        .collect();
    Detection {
        loaded: Backend::all()
            .into_iter()
            .filter(|b| modules.contains(b.module()))
            .collect(),
        modules: modules.into_iter().collect(),
        modules_known,
        cpu_vmx: flags.contains("vmx"),
        cpu_svm: flags.contains("svm"),
        in_vm: flags.contains("hypervisor"),
        tdp: None,
    }
}

/// Reads the host's cpuinfo and module lists and runs [`detect`].
pub fn detect_host() -> Detection {
    let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let mut names = Vec::new();
    let mut known = false;
    if let Ok(text) = std::fs::read_to_string("/proc/modules") {
        known = true;
        names.extend(
            text.lines()
                .filter_map(|l| l.split_whitespace().next())
                .map(str::to_owned),
        );
    }
    if let Ok(dir) = std::fs::read_dir(Path::new("/sys/module")) {
        known = true;
        names.extend(
            dir.flatten()
                .filter_map(|e| e.file_name().into_string().ok()),
        );
    }
    let mut d = detect(&cpuinfo, names.iter().map(String::as_str), known);
    if let Some((backend, _)) = d.backend() {
        if let Some((param, _)) = backend.tdp_param() {
            let path = Path::new("/sys/module")
                .join(backend.module())
                .join("parameters")
                .join(param);
            d.tdp = std::fs::read_to_string(path)
                .ok()
                .and_then(|t| parse_bool_param(&t));
        }
    }
    d
}

/// The check: names the backend and what it allows. Ok when exactly one
/// backend is evident; a warning when none or several are.
pub fn check(d: &Detection) -> Check {
    let cpu_flags: Vec<&str> = [
        (d.cpu_vmx, "vmx"),
        (d.cpu_svm, "svm"),
        (d.in_vm, "hypervisor"),
    ]
    .into_iter()
    .filter_map(|(on, f)| on.then_some(f))
    .collect();
    let where_ = if d.in_vm {
        "; this host is itself a VM"
    } else {
        ""
    };
    let c = match d.backend() {
        Some((b, evidence)) => {
            let grounds = match evidence {
                Evidence::Module => format!("{} present{where_}", b.module()),
                Evidence::CpuFlags => format!("CPU flag {} (no module list readable)", b.id()),
            };
            let paging = match (b.tdp_param(), d.tdp) {
                (Some((_, feature)), Some(true)) => format!("; {feature} on"),
                (Some((_, feature)), Some(false)) => format!("; {feature} OFF: shadow paging"),
                _ => String::new(),
            };
            let mut c = Check::ok(
                NAME,
                format!("{} ({grounds}{paging}), {}", b.title(), b.allows()),
            );
            if evidence == Evidence::CpuFlags {
                c = Check::warn(
                    NAME,
                    c.finding,
                    "mount /sys (or /proc) so the KVM vendor module can be confirmed",
                );
            } else if let (Some((param, feature)), Some(false)) = (b.tdp_param(), d.tdp) {
                c = Check::warn(
                    NAME,
                    c.finding,
                    format!(
                        "{} runs without {feature}: guests work, but page-table changes and \
                         dirty-log passes are much slower; reload it with it on \
                         (`modprobe -r {m} && modprobe {m} {param}=1`), and on a nested host \
                         enable it for this VM on the outer host",
                        b.module(),
                        m = b.module()
                    ),
                );
            }
            c.with("backend", b.id())
                .with(
                    "evidence",
                    if evidence == Evidence::Module {
                        "module"
                    } else {
                        "cpu_flags"
                    },
                )
                .with("guest_cpl0_native", b.native_cpl0())
                .with("stock_linux_guests", b.native_cpl0())
                .with("two_dimensional_paging", json!(d.tdp))
        }
        None if d.loaded.len() > 1 => {
            let names: Vec<&str> = d.loaded.iter().map(|b| b.module()).collect();
            Check::warn(
                NAME,
                format!(
                    "{} are all present; cannot tell which one backs /dev/kvm",
                    names.join(", ")
                ),
                "look for the vendor module's load message in `dmesg | grep -i kvm`; forkd's \
                 reference guest runs on any of them",
            )
            .with("backend", serde_json::Value::Null)
        }
        None => Check::warn(
            NAME,
            format!(
                "cannot tell: no kvm_intel, kvm_amd or kvm_pvm module seen, CPU flags [{}]",
                cpu_flags.join(" ")
            ),
            d.enable_hint(),
        )
        .with("backend", serde_json::Value::Null),
    };
    c.with("modules", json!(d.modules))
        .with("cpu_flags", json!(cpu_flags))
        .with("in_vm", d.in_vm)
}

#[cfg(test)]
mod tests {
    use super::*;

    const PVM_CPUINFO: &str = "processor\t: 0\nvendor_id\t: AuthenticAMD\nmodel name\t: AMD EPYC\n\
        flags\t\t: fpu vme de pse tsc msr pae x2apic hypervisor lahf_lm avx512f\n\nprocessor\t: 1\n\
        flags\t\t: fpu vme de pse tsc msr pae x2apic hypervisor lahf_lm avx512f\n";
    const VMX_CPUINFO: &str = "processor\t: 0\nflags\t\t: fpu vme vmx ept sse2\n";
    const SVM_NESTED_CPUINFO: &str = "processor\t: 0\nflags\t\t: fpu svm npt hypervisor\n";

    #[test]
    fn pvm_from_sys_module() {
        // This project's machines: no /proc/modules, kvm and kvm_pvm built in.
        let sys = ["8250", "kvm", "kvm_pvm", "vsock", "xz_dec"];
        let d = detect(PVM_CPUINFO, sys, true);
        assert_eq!(d.loaded, [Backend::Pvm]);
        assert_eq!(d.modules, ["kvm", "kvm_pvm"]);
        assert!(d.in_vm && !d.cpu_vmx && !d.cpu_svm);
        assert_eq!(d.backend(), Some((Backend::Pvm, Evidence::Module)));
        let c = check(&d);
        assert_eq!(c.status, super::super::report::Status::Ok);
        assert!(
            c.finding
                .starts_with("KVM-PVM (kvm_pvm present; this host is itself a VM), a software"),
            "{}",
            c.finding
        );
        assert!(c.finding.contains("stock Linux guest does not boot"));
        assert_eq!(c.details["backend"], "pvm");
        assert_eq!(c.details["guest_cpl0_native"], false);
    }

    #[test]
    fn vmx_from_proc_modules() {
        let proc_modules = "kvm_intel 372736 0 - Live 0x0\nkvm 1110016 1 kvm_intel, Live 0x0\n";
        let names = proc_modules
            .lines()
            .filter_map(|l| l.split_whitespace().next());
        let d = detect(VMX_CPUINFO, names, true);
        assert_eq!(d.backend(), Some((Backend::Vmx, Evidence::Module)));
        assert!(!d.in_vm);
        let c = check(&d);
        assert_eq!(c.details["backend"], "vmx");
        assert!(c
            .finding
            .starts_with("Intel VMX (kvm_intel present), hardware virtualization:"));
        assert!(c.finding.contains("native speed"));
    }

    #[test]
    fn nested_svm() {
        let mut d = detect(SVM_NESTED_CPUINFO, ["kvm", "kvm_amd"], true);
        assert_eq!(d.backend(), Some((Backend::Svm, Evidence::Module)));
        assert!(check(&d).finding.contains("itself a VM"));
        assert_eq!(
            check(&d).details["two_dimensional_paging"],
            serde_json::Value::Null
        );
        d.tdp = Some(true);
        let c = check(&d);
        assert_eq!(c.status, super::super::report::Status::Ok);
        assert!(
            c.finding.starts_with(
                "AMD SVM (kvm_amd present; this host is itself a VM; nested paging (NPT) on)"
            ),
            "{}",
            c.finding
        );
        assert_eq!(c.details["two_dimensional_paging"], true);
    }

    #[test]
    fn shadow_paging_is_a_warning() {
        let mut d = detect(VMX_CPUINFO, ["kvm", "kvm_intel"], true);
        d.tdp = Some(false);
        let c = check(&d);
        assert_eq!(c.status, super::super::report::Status::Warn);
        assert!(
            c.finding.contains("EPT OFF: shadow paging"),
            "{}",
            c.finding
        );
        assert!(
            c.hint.as_deref().unwrap_or("").contains("kvm_intel ept=1"),
            "{:?}",
            c.hint
        );
        assert_eq!(c.details["two_dimensional_paging"], false);
    }

    #[test]
    fn bool_params() {
        assert_eq!(parse_bool_param("Y\n"), Some(true));
        assert_eq!(parse_bool_param("1\n"), Some(true));
        assert_eq!(parse_bool_param("N"), Some(false));
        assert_eq!(parse_bool_param("0"), Some(false));
        assert_eq!(parse_bool_param("maybe"), None);
    }

    #[test]
    fn cpu_flags_only_when_no_module_list() {
        let d = detect(VMX_CPUINFO, [], false);
        assert_eq!(d.backend(), Some((Backend::Vmx, Evidence::CpuFlags)));
        assert_eq!(check(&d).status, super::super::report::Status::Warn);
        // With a readable module list, a missing vendor module is not
        // papered over by the flag.
        let d = detect(VMX_CPUINFO, ["loop"], true);
        assert_eq!(d.backend(), None);
        assert!(d.enable_hint().contains("modprobe kvm_intel"));
    }

    #[test]
    fn several_or_none() {
        let d = detect(VMX_CPUINFO, ["kvm", "kvm_intel", "kvm_pvm"], true);
        assert_eq!(d.backend(), None);
        let c = check(&d);
        assert_eq!(c.status, super::super::report::Status::Warn);
        assert!(c.finding.contains("kvm_intel, kvm_pvm"));

        let d = detect(PVM_CPUINFO, ["loop"], true);
        assert_eq!(d.backend(), None);
        assert!(d.enable_hint().contains("nested virtualization"));
        let d = detect("flags: fpu", ["loop"], true);
        assert!(d.enable_hint().contains("firmware"));
    }

    #[test]
    fn no_flags_line() {
        let d = detect("", ["kvm_pvm"], true);
        assert!(!d.cpu_vmx && !d.cpu_svm && !d.in_vm);
        assert_eq!(d.backend(), Some((Backend::Pvm, Evidence::Module)));
    }
}
