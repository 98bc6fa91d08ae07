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
    case malformedFile(path: String, reason: FileFormatProblem)
    /// libpci could not be set up or could not read a device.
    case libpci(LibPCIProblem)
    /// Not running as root.
    case notRoot(effectiveUID: UInt32)
    /// The kernel is locked down (Secure Boot); userspace BAR access is forbidden.
    case kernelLockdown(mode: String)
    /// The function sits behind a translating guest IOMMU, so guest-physical addresses
    /// are not what the device sees.
    case iommuTranslating(bdf: String, group: String, domainType: String)
    /// Physical addresses cannot be read from /proc/self/pagemap.
    case pagemap(PagemapProblem)
    /// No 2 MiB hugepage could be had.
    case hugePages(HugePageProblem)
    /// A kernel module is neither loaded nor loadable.
    case moduleUnavailable(name: String, attempts: [ModuleLoadAttempt])
    /// Binding uio_pci_generic did not take.
    case bindFailed(bdf: String, expected: String, found: String?, detail: BindFailureDetail)
    /// uio_pci_generic is bound but its /dev/uioN cannot be found or made.
    case uioDeviceMissing(bdf: String, UIODeviceProblem)
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
        case .libpci(let p):
            return "libpci: \(p)"
        case .notRoot(let uid):
            return "balloond must run as root (effective uid is \(uid)): it rebinds PCI drivers, maps BARs and reads physical addresses from /proc/self/pagemap. Run it as root (e.g. with sudo)"
        case .kernelLockdown(let mode):
            return "the kernel is in lockdown mode '\(mode)' (usually enforced by UEFI Secure Boot): it forbids userspace access to PCI BARs, so uio cannot work. Disable Secure Boot in the VM firmware, or boot a kernel that is not locked down (lockdown cannot be lifted at run time)"
        case .iommuTranslating(let bdf, let group, let type):
            return "PCI function \(bdf) is in IOMMU group \(group) with domain type '\(type)': the guest IOMMU translates its DMA, so the guest-physical ring addresses the uio backend programs would be wrong. Use --backend vfio (it maps balloond's memory in the IOMMU), or boot the guest with iommu=pt (or intel_iommu=off / amd_iommu=off)"
        case .pagemap(let p):
            return p.description
        case .hugePages(let p):
            return p.description
        case .moduleUnavailable(let name, let attempts):
            let tried = attempts.isEmpty ? "" : " Tried: " + attempts.map(\.description).joined(separator: "; ") + "."
            if name.hasPrefix("vfio") {
                return "kernel module \(name) is not loaded and could not be loaded.\(tried) Install the modules for the running kernel (Debian: linux-image-$(uname -r)) or use a kernel built with CONFIG_VFIO_PCI=m and CONFIG_VFIO_IOMMU_TYPE1=m (or =y); or use --backend uio"
            }
            return "kernel module \(name) is not loaded and could not be loaded.\(tried) Install the modules for the running kernel (Debian: linux-image-$(uname -r), which ships \(name).ko) or use a kernel built with CONFIG_UIO=m and CONFIG_UIO_PCI_GENERIC=m (or =y)"
        case .bindFailed(let bdf, let expected, let found, let detail):
            return "binding \(bdf) to \(expected) failed: its driver is \(found ?? "none") afterwards. \(detail) Check `dmesg` (uio_pci_generic refuses devices without INTx masking support)"
        case .uioDeviceMissing(let bdf, let problem):
            return "uio_pci_generic is bound to \(bdf) but its /dev/uioN is unusable: \(problem)"
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

/// One failed way of loading a kernel module (`PlatformError.moduleUnavailable`).
public enum ModuleLoadAttempt: Hashable, Sendable, CustomStringConvertible {
    /// `modprobe module` failed, or succeeded without the module appearing.
    case modprobe(module: String, CommandResult)
    /// `insmod path` failed, or succeeded without the module appearing.
    case insmod(path: String, module: String, CommandResult)
    /// No module file under either module directory of `kernelRelease`.
    case noModuleFile(module: String, kernelRelease: String)

    public var description: String {
        func outcome(_ r: CommandResult, _ module: String) -> String {
            r.succeeded ? "ok, but /sys/module/\(module) did not appear" : r.description
        }
        switch self {
        case .modprobe(let module, let r):
            return "modprobe \(module): \(outcome(r, module))"
        case .insmod(let path, let module, let r):
            return "insmod \(path): \(outcome(r, module))"
        case .noModuleFile(let module, let release):
            return "no \(module).ko, .ko.xz or .ko.zst under /lib/modules/\(release)/kernel/drivers/uio or /usr/lib/modules/\(release)/kernel/drivers/uio"
        }
    }
}

/// Why binding uio_pci_generic did not take, and what was done about it
/// (`PlatformError.bindFailed`).
public indirect enum BindFailureDetail: Hashable, Sendable, CustomStringConvertible {
    /// The kernel has no driver_override (older than 3.16); nothing was changed.
    case noDriverOverride(path: String)
    /// vfio-pci was asked for a device that no IOMMU translates.
    case noIOMMUGroup
    /// driver_override was cleared and the device handed back to `previous` (nil: the kernel).
    case rolledBack(previous: String?)
    /// Rolling back failed as well.
    case rollbackFailed(PlatformError, address: PCIAddress)

    public var description: String {
        switch self {
        case .noDriverOverride(let path):
            return "\(path) does not exist (the kernel is older than 3.16)."
        case .noIOMMUGroup:
            return "It has no IOMMU group: no IOMMU translates its DMA, and vfio-pci only takes devices behind one (boot the guest with a virtual IOMMU and intel_iommu=on, or use --backend uio)."
        case .rolledBack(let previous):
            return "Rolled back: driver_override cleared and the device handed back to \(previous ?? "the kernel")."
        case .rollbackFailed(let e, let address):
            return "Rolling back also failed (\(e)); run `balloond unbind \(address)` to retry."
        }
    }
}

/// What in a kernel file did not have the expected format (`PlatformError.malformedFile`).
/// Line numbers count from 1.
public enum FileFormatProblem: Hashable, Sendable, CustomStringConvertible {
    /// A /proc/meminfo line without ':'.
    case noColon(line: Int, text: String)
    /// A /proc/meminfo line that is not `Key: number [kB]`.
    case notKeyNumber(line: Int, text: String)
    /// A /proc/meminfo value with a unit other than kB.
    case unitNotKB(line: Int, unit: String)
    /// A sysfs resource line without exactly three fields.
    case resourceFieldCount(line: Int, fields: Int, text: String)
    /// A sysfs resource field that is not a hex number.
    case notHex(line: Int, field: String)
    /// A sysfs resource line whose end is below its start.
    case endBelowStart(line: Int, start: UInt64, end: UInt64)
    /// An entry of /sys/bus/pci/devices that is not a PCI address.
    case notAPCIAddressEntry(String)
    /// A sysfs file libpci needs to describe the function is missing or unreadable.
    case unreadableForLibPCI(function: String)
    /// The lockdown file has no `[selected]` mode.
    case noSelectedLockdownMode(text: String)
    /// The iommu_group link's target names no group.
    case noIOMMUGroup(target: String)
    /// The PSI trigger write was short.
    case shortTriggerWrite(written: Int, of: Int)
    /// A driver name with characters other than letters, digits, '_', '.' and '-'.
    case badDriverName(String)
    /// Not a 16-bit hex ID (vendor, device).
    case notHexID(String)
    /// A uio `dev` file that is not `major:minor`.
    case notMajorMinor(String)
    /// Not a decimal number.
    case notANumber(String)
    /// /proc/meminfo's default hugepage size is not 2 MiB and sysfs has no 2 MiB pool.
    case defaultHugePageSizeNot2MiB(bytes: UInt64, missingSysfsDirectory: String)
    /// /proc/meminfo has no HugePages_Free line.
    case noHugePagesFree
    /// /proc/meminfo lacks one of HugePages_Total, HugePages_Free, HugePages_Rsvd.
    case noHugePageCounters

    public var description: String {
        switch self {
        case .noColon(let n, let text): return "line \(n) has no ':': \(text)"
        case .notKeyNumber(let n, let text): return "line \(n) is not 'Key: number [kB]': \(text)"
        case .unitNotKB(let n, let unit): return "line \(n) has unit '\(unit)', expected kB"
        case .resourceFieldCount(let n, let fields, let text): return "line \(n) has \(fields) fields, expected 'start end flags': \(text)"
        case .notHex(let n, let field): return "line \(n): '\(field)' is not a hex number"
        case .endBelowStart(let n, let start, let end): return "line \(n): end \(hex(end)) is below start \(hex(start))"
        case .notAPCIAddressEntry(let name): return "entry '\(name)' is not a PCI address"
        case .unreadableForLibPCI(let function): return "missing or unreadable (libpci needs it to describe \(function))"
        case .noSelectedLockdownMode(let text): return "no [selected] mode in '\(text)'"
        case .noIOMMUGroup(let target): return "link target '\(target)' names no group"
        case .shortTriggerWrite(let written, let of): return "the kernel took \(written) of \(of) bytes of the trigger"
        case .badDriverName(let name): return "the driver name '\(name)' has characters other than letters, digits, '_', '.' and '-'"
        case .notHexID(let text): return "'\(text)' is not a 16-bit hex ID"
        case .notMajorMinor(let text): return "'\(text)' is not major:minor"
        case .notANumber(let text): return "'\(text)' is not a number"
        case .defaultHugePageSizeNot2MiB(let bytes, let dir): return "the default hugepage size is \(bytes) bytes, not 2 MiB, and there is no \(dir)"
        case .noHugePagesFree: return "no HugePages_Free line"
        case .noHugePageCounters: return "no HugePages_Total/Free/Rsvd lines"
        }
    }
}

/// Why a bound device's /dev/uioN cannot be used.
public indirect enum UIODeviceProblem: Hashable, Sendable, CustomStringConvertible {
    /// The device's `uio/` directory cannot be listed.
    case noUIODirectory(path: String, SystemCallError)
    /// `uio/` does not hold exactly one uioN entry.
    case uioEntries(directory: String, found: [String])
    /// /dev/uioN did not appear and creating it failed.
    case mknodFailed(node: String, PlatformError)
    /// Opening /dev/uioN (or fstat of it) failed.
    case cannotOpen(path: String, SystemCallError)
    /// The path is not a character device.
    case notACharacterDevice(path: String)

    public var description: String {
        switch self {
        case .noUIODirectory(let path, let e):
            return "\(path) is missing (\(e)); uio_pci_generic did not register a uio device"
        case .uioEntries(let directory, let found):
            return "expected one uioN entry in \(directory), found \(found)"
        case .mknodFailed(let node, let e):
            return "\(node) does not exist and mknod failed: \(e)"
        case .cannotOpen(let path, let e):
            return "cannot open \(path): \(e)"
        case .notACharacterDevice(let path):
            return "\(path) is not a character device; remove it and bind again"
        }
    }
}

/// Why libpci could not list the PCI functions.
public enum LibPCIProblem: Hashable, Sendable, CustomStringConvertible {
    /// `/sys/bus/pci/devices` (under the root) is not a directory.
    case noSysfsDevices(directory: String)
    /// A C allocation (`pci_alloc`, `strdup`) returned NULL.
    case outOfMemory(call: String)
    /// libpci < 3.5 has no `sysfs.path` parameter.
    case noSysfsPathParameter

    public var description: String {
        switch self {
        case .noSysfsDevices(let directory):
            return "\(directory) does not exist: is sysfs mounted (mount -t sysfs sysfs /sys) and does this kernel have PCI support?"
        case .outOfMemory(let call):
            return "\(call) failed (out of memory)"
        case .noSysfsPathParameter:
            return "this libpci has no sysfs.path parameter; install libpci3 ≥ 3.5 (Debian: libpci3)"
        }
    }
}

/// Why a physical address could not be read from `/proc/self/pagemap`.
public enum PagemapProblem: Hashable, Sendable, CustomStringConvertible {
    /// The page at the virtual address is swapped out.
    case swappedOut(virtualAddress: UInt)
    /// The page at the virtual address is not present (never faulted in).
    case notPresent(virtualAddress: UInt)
    /// The page is present but its PFN reads as 0: the kernel hides PFNs without CAP_SYS_ADMIN.
    case pfnHidden(virtualAddress: UInt)
    /// Opening the pagemap failed (`error.path` is the file).
    case cannotOpen(SystemCallError)
    /// `pread` of the pagemap failed.
    case readFailed(path: String, offset: Int, SystemCallError)
    /// `pread` returned fewer bytes than `entries` entries need.
    case shortRead(path: String, offset: Int, entries: Int, bytes: Int)
    /// The pagemap returned no entry for the page at the virtual address.
    case noEntry(virtualAddress: UInt)

    public var description: String {
        func hexVA(_ va: UInt) -> String { "0x" + String(va, radix: 16) }
        switch self {
        case .swappedOut(let va):
            return "the page at \(hexVA(va)) is swapped out; DMA memory must be locked with mlock before its address is read"
        case .notPresent(let va):
            return "the page at \(hexVA(va)) is not present; fault it in (touch it) and mlock it before reading its physical address"
        case .pfnHidden(let va):
            return "/proc/self/pagemap shows PFN 0 for the present page at \(hexVA(va)): the kernel hides physical addresses from processes without CAP_SYS_ADMIN (Linux ≥ 4.2). Run balloond as root, and open pagemap before dropping privileges"
        case .cannotOpen(let e):
            let path = e.path ?? "/proc/self/pagemap"
            if e.errno == .permissionDenied || e.errno == .notPermitted {
                return "cannot open \(path): \(e). Reading physical addresses needs CAP_SYS_ADMIN; run balloond as root"
            }
            return "cannot open \(path): \(e). balloond needs /proc mounted and a kernel with CONFIG_PROC_PAGE_MONITOR"
        case .readFailed(let path, let offset, let e):
            return "reading \(path) at offset \(offset) failed: \(e)"
        case .shortRead(let path, let offset, let entries, let bytes):
            let what = entries == 1 ? "the entry" : "\(entries) entries"
            return "\(path) returned \(bytes) bytes for \(what) at offset \(offset), expected \(entries * 8)"
        case .noEntry(let va):
            return "no pagemap entry for the DMA page at \(hexVA(va))"
        }
    }
}

/// Why no usable 2 MiB hugepage could be had.
public enum HugePageProblem: Hashable, Sendable, CustomStringConvertible {
    /// Raising `nr_hugepages` by one did not produce a free page (memory too fragmented).
    case poolDidNotGrow(countPath: String, before: UInt64)
    /// The mapped "hugepage" is not one aligned, physically contiguous 2 MiB frame.
    case notContiguous(first: PhysicalAddress, last: PhysicalAddress)

    public var description: String {
        switch self {
        case .poolDidNotGrow(let countPath, let before):
            return "raising \(countPath) from \(before) to \(before + 1) produced no free 2 MiB hugepage (memory is too fragmented); reserve one at boot with the kernel parameter hugepages=1 or early with `echo 1 > \(countPath)`"
        case .notContiguous(let first, let last):
            return "the hugepage at \(first) is not one aligned contiguous 2 MiB frame (last 4 KiB at \(last)); was it backed by a hugetlb page?"
        }
    }
}

extension PlatformError {
    /// Wraps a syscall failure.
    init(_ e: SystemCallError) { self = .system(e) }
}

/// Lowercase hex with "0x".
func hex(_ v: UInt64) -> String { "0x" + String(v, radix: 16) }
