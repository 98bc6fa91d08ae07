#if canImport(Glibc)
import Glibc
#endif
import Logging

/// Loads the kernel modules balloond needs (`uio`, then `uio_pci_generic`).
///
/// A module counts as loaded when `/sys/module/NAME` exists, or for built-in drivers the
/// directory it registers (`/sys/bus/pci/drivers/uio_pci_generic`, `/sys/class/uio`), since
/// a built-in module only gets a `/sys/module` entry when it has parameters or a version.
///
/// Otherwise it runs `modprobe NAME`; if that fails (no modprobe, no modules.dep, as in a
/// minimal initramfs), `insmod` of `/lib/modules/$(uname -r)/kernel/drivers/uio/NAME.ko`
/// (or `/usr/lib/modules/...`, and `.ko.xz` / `.ko.zst`, which work only when the insmod at
/// hand — kmod, or busybox built with compression support — can decompress them).
public struct ModuleLoader {
    public let root: SysRoot
    public let kernel: KernelControl
    /// `uname -r`, for the module directory.
    public let kernelRelease: String
    public var logger: Logger

    public init(root: SysRoot = .host, kernel: KernelControl, kernelRelease: String = Sys.kernelRelease(),
                logger: Logger = Logger(label: "balloond.modules")) {
        self.root = root
        self.kernel = kernel
        self.kernelRelease = kernelRelease
        self.logger = logger
    }

    /// Where a built-in (or loaded) module shows itself besides /sys/module.
    static let presenceHints: [String: String] = [
        "uio": "/sys/class/uio",
        "uio_pci_generic": "/sys/bus/pci/drivers/uio_pci_generic",
    ]

    /// Whether `name` is loaded or built in.
    public func isLoaded(_ name: String) -> Bool {
        if Sys.exists(root.path("/sys/module/\(name)")) { return true }
        if let hint = Self.presenceHints[name], Sys.exists(root.path(hint)) { return true }
        return false
    }

    /// Where each module balloond loads lives under `kernel/` (its file name as the kernel
    /// tree spells it: vfio_pci's file is `vfio-pci.ko`).
    static let moduleFiles: [String: String] = [
        "uio": "drivers/uio/uio", "uio_pci_generic": "drivers/uio/uio_pci_generic",
        "vfio": "drivers/vfio/vfio", "vfio_iommu_type1": "drivers/vfio/vfio_iommu_type1",
        "vfio_pci": "drivers/vfio/pci/vfio-pci", "vfio_pci_core": "drivers/vfio/pci/vfio-pci-core",
    ]

    /// The candidate module files, in the order tried.
    public func moduleFileCandidates(_ name: String) -> [String] {
        let file = Self.moduleFiles[name] ?? "drivers/uio/\(name)"
        var result: [String] = []
        for base in ["/lib/modules", "/usr/lib/modules"] {
            for ext in [".ko", ".ko.xz", ".ko.zst"] {
                result.append("\(base)/\(kernelRelease)/kernel/\(file)\(ext)")
            }
        }
        return result
    }

    /// Loads `name` unless it is there already; throws `.moduleUnavailable` listing every
    /// attempt when it cannot.
    public func ensureLoaded(_ name: String) throws(PlatformError) {
        if isLoaded(name) { return }
        var attempts: [ModuleLoadAttempt] = []
        let probe = kernel.runCommand("modprobe", [name])
        if probe.succeeded && isLoaded(name) {
            logger.info("loaded kernel module \(name) with modprobe")
            return
        }
        attempts.append(.modprobe(module: name, probe))

        var found = false
        var seen: Set<[UInt64]> = []
        for candidate in moduleFileCandidates(name) {
            let path = root.path(candidate)
            guard let st = try? Sys.statIfExists(path) else { continue }
            // The same file is often reachable as /lib/modules and /usr/lib/modules (merged
            // /usr); trying it twice would only repeat the error.
            guard seen.insert([UInt64(st.st_dev), UInt64(st.st_ino)]).inserted else { continue }
            found = true
            let r = kernel.runCommand("insmod", [path])
            if (r.succeeded || r.output.contains("File exists")) && isLoaded(name) {
                logger.info("loaded kernel module \(name) with insmod \(path)")
                return
            }
            attempts.append(.insmod(path: path, module: name, r))
            if r.succeeded { break }
        }
        if !found {
            attempts.append(.noModuleFile(module: name, kernelRelease: kernelRelease))
        }
        throw .moduleUnavailable(name: name, attempts: attempts)
    }
}
