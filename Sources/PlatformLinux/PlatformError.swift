import VirtioCore
import SystemPackage
import VirtioPCI

/// Everything that can go wrong on the Linux side of balloond. Each description says what
/// happened and what the operator can do about it.
public enum PlatformError: Error, Hashable, Sendable, CustomStringConvertible {
    /// A system call failed where no more specific case applies.
    case system(SystemCallError)
    /// A PCI address that is not `DDDD:BB:DD.F` (or `BB:DD.F`).
    case invalidPCIAddress(String)
    /// No such PCI function in sysfs.
    case deviceNotFound(bdf: String)
    /// balloond only drives virtio balloons; it refuses to bind or touch anything else.
    case notAVirtioBalloon(bdf: String, vendor: UInt16, device: UInt16)
    /// A kernel file did not have the expected format.
    case malformedFile(path: String, reason: String)
    /// libpci could not be set up or could not read a device.
    case libpci(String)
    /// Not running as root.
    case notRoot(effectiveUID: UInt32)
    /// The kernel is locked down (Secure Boot); userspace BAR access is forbidden.
    case kernelLockdown(mode: String)
    /// The function sits behind a translating guest IOMMU, so guest-physical addresses
    /// are not what the device sees.
    case iommuTranslating(bdf: String, group: String, domainType: String)
    /// Physical addresses cannot be read from /proc/self/pagemap.
    case pagemap(String)
    /// No 2 MiB hugepage could be had.
    case hugePages(String)
    /// A kernel module is neither loaded nor loadable.
    case moduleUnavailable(name: String, attempts: [String])
    /// Binding uio_pci_generic did not take.
    case bindFailed(bdf: String, expected: String, found: String?, detail: String)
    /// uio_pci_generic is bound but its /dev/uioN cannot be found or made.
    case uioDeviceMissing(bdf: String, reason: String)
    /// Another process holds the device's lock.
    case deviceBusy(bdf: String, lockPath: String, holderPID: Int32?)
    /// The device is bound to a driver balloond does not take devices from without `--force`.
    case foreignDriver(bdf: String, driver: String)
    /// A state file under /run/balloond cannot be used.
    case stateFile(StateFileError)

    public var description: String {
        switch self {
        case .system(let e):
            var s = e.description
            if e.errno == .permissionDenied || e.errno == .notPermitted {
                s += ". Run balloond as root."
            }
            return s
        case .invalidPCIAddress(let a):
            return "'\(a)' is not a PCI address; use the domain:bus:device.function form shown by `balloond list` (e.g. 0000:00:03.0)"
        case .deviceNotFound(let bdf):
            return "no PCI function \(bdf) in /sys/bus/pci/devices; run `balloond list` to see the virtio balloons in this guest"
        case .notAVirtioBalloon(let bdf, let v, let d):
            return "PCI function \(bdf) is \(hex4(v)):\(hex4(d)), not a virtio balloon (1af4:1002 or 1af4:1045); balloond refuses to touch it. Run `balloond list` to find the balloon"
        case .malformedFile(let path, let reason):
            return "unexpected contents in \(path): \(reason)"
        case .libpci(let m):
            return "libpci: \(m)"
        case .notRoot(let uid):
            return "balloond must run as root (effective uid is \(uid)): it rebinds PCI drivers, maps BARs and reads physical addresses from /proc/self/pagemap. Run it as root (e.g. with sudo)"
        case .kernelLockdown(let mode):
            return "the kernel is in lockdown mode '\(mode)' (usually enforced by UEFI Secure Boot): it forbids userspace access to PCI BARs, so uio cannot work. Disable Secure Boot in the VM firmware, or boot a kernel that is not locked down (lockdown cannot be lifted at run time)"
        case .iommuTranslating(let bdf, let group, let type):
            return "PCI function \(bdf) is in IOMMU group \(group) with domain type '\(type)': the guest IOMMU translates its DMA, so the guest-physical ring addresses balloond programs would be wrong. Boot the guest with iommu=pt (or intel_iommu=off / amd_iommu=off)"
        case .pagemap(let m):
            return m
        case .hugePages(let m):
            return m
        case .moduleUnavailable(let name, let attempts):
            let tried = attempts.isEmpty ? "" : " Tried: " + attempts.joined(separator: "; ") + "."
            return "kernel module \(name) is not loaded and could not be loaded.\(tried) Install the modules for the running kernel (Debian: linux-image-$(uname -r), which ships \(name).ko) or use a kernel built with CONFIG_UIO=m and CONFIG_UIO_PCI_GENERIC=m (or =y)"
        case .bindFailed(let bdf, let expected, let found, let detail):
            return "binding \(bdf) to \(expected) failed: its driver is \(found ?? "none") afterwards. \(detail) Check `dmesg` (uio_pci_generic refuses devices without INTx masking support)"
        case .uioDeviceMissing(let bdf, let reason):
            return "uio_pci_generic is bound to \(bdf) but its /dev/uioN is unusable: \(reason)"
        case .deviceBusy(let bdf, let path, let pid):
            let who = pid.map { "another balloond (pid \($0))" } ?? "another balloond"
            return "device \(bdf) held by \(who): \(path) is locked. Stop that process first, or pick another device"
        case .foreignDriver(let bdf, let driver):
            return "PCI function \(bdf) is bound to \(driver), not virtio-pci or uio_pci_generic: something else (a VM passthrough, another tool) is using it, and balloond leaves it alone. Unbind it from \(driver) first, or pass --force to take it anyway"
        case .stateFile(let e):
            return e.description
        }
    }
}

extension PlatformError {
    /// Wraps a syscall failure.
    init(_ e: SystemCallError) { self = .system(e) }
}

/// Lowercase hex with "0x".
func hex(_ v: UInt64) -> String { "0x" + String(v, radix: 16) }
