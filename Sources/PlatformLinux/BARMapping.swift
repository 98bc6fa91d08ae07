#if canImport(Glibc)
import VirtioCore
import Glibc
#endif
import VirtioPCI

/// Maps a PCI function's memory BARs through sysfs: `mmap` of
/// `/sys/bus/pci/devices/BDF/resourceN` (MAP_SHARED, read-write), uncached as sysfs maps
/// non-prefetchable and prefetchable BARs alike for `resourceN` (`pci_mmap_resource_uc`).
///
/// uio_pci_generic does not export the modern virtio BAR as a uio map (it only exports
/// resources whose flags are exactly MEM|SIZEALIGN, and BAR4 is 64-bit prefetchable;
/// docs/virtio-balloon.md §1.4), so this is how balloond reaches BAR4. It only works once no
/// kernel driver claims the BAR: with `CONFIG_IO_STRICT_DEVMEM=y` (Debian) the mmap fails
/// with EINVAL while virtio-pci owns the device.
public struct BARMapper: Sendable {
    public let address: PCIAddress
    public let root: SysRoot

    public init(address: PCIAddress, root: SysRoot = .host) {
        self.address = address
        self.root = root
    }

    /// Maps BAR `index` whole. The window length is the BAR's size from the `resource` file.
    ///
    /// Throws `PCIError.bar` with what to do: I/O BAR, absent BAR, a kernel driver still
    /// owning the device, lockdown.
    public func map(_ index: Int) throws(PCIError) -> MMIOWindow {
        guard (0..<6).contains(index) else { throw .bar(index: index, reason: BARProblem.noSuchBAR) }
        let resources: [PCIResource]
        do { resources = try readPCIResources(address, root: root) } catch {
            throw .bar(index: index, reason: BARProblem.resources(error))
        }
        guard index < resources.count, resources[index].isPresent else {
            throw .bar(index: index, reason: BARProblem.notImplemented(address: address, index: index))
        }
        let resource = resources[index]
        if resource.isIO {
            throw .bar(index: index, reason: BARProblem.ioPort(address: address, index: index, resource: resource))
        }
        guard resource.isMemory else {
            throw .bar(index: index, reason: BARProblem.notMemory(address: address, index: index, resource: resource))
        }
        let size = Int(resource.size)
        let path = address.sysfsDirectory(in: root) + "/resource\(index)"
        let file: OpenFile
        do { file = try OpenFile(path: path, flags: O_RDWR | O_SYNC) } catch {
            if error.errno == .noSuchFileOrDirectory { throw .bar(index: index, reason: BARProblem.noResourceFile(path: path)) }
            throw .bar(index: index, reason: BARProblem.openFailed(error))
        }
        let length = roundUp(size, to: Sys.pageSize)
        let base: UnsafeMutableRawPointer
        do {
            unsafe base = try MappedMemory.map(length: length, protection: PROT_READ | PROT_WRITE, flags: MAP_SHARED,
                                        descriptor: file.descriptor, path: path)
        } catch {
            throw .bar(index: index, reason: mmapFailure(error, index: index))
        }
        // The mapping outlives the descriptor; close it now.
        file.close()
        return unsafe MMIOWindow(unsafeBase: base, length: size, unmap: MappedMemory.unmapper(base, length: length))
    }

    /// An mmap failure, with the driver bound now: EINVAL while a kernel driver owns the
    /// device is the IO_STRICT_DEVMEM refusal; EPERM is lockdown.
    func mmapFailure(_ error: SystemCallError, index: Int) -> BARProblem {
        let driver = (try? PCIEnumerator.currentDriver(of: address, root: root)) ?? nil
        return .mmapFailed(error, address: address, index: index, driver: driver)
    }
}

/// Why a BAR could not be mapped (the reason inside `PCIError.bar`).
public enum BARProblem: Error, Hashable, Sendable, CustomStringConvertible {
    /// An index outside 0–5.
    case noSuchBAR
    /// The sysfs resource file could not be read.
    case resources(PlatformError)
    /// The BAR's resource line is empty.
    case notImplemented(address: PCIAddress, index: Int)
    /// An I/O-port BAR.
    case ioPort(address: PCIAddress, index: Int, resource: PCIResource)
    /// Neither an I/O nor a memory BAR.
    case notMemory(address: PCIAddress, index: Int, resource: PCIResource)
    /// The kernel exports no resourceN file for it.
    case noResourceFile(path: String)
    /// Opening resourceN failed.
    case openFailed(SystemCallError)
    /// mmap of resourceN failed; `driver` is the driver bound to the function then.
    case mmapFailed(SystemCallError, address: PCIAddress, index: Int, driver: String?)

    public var description: String {
        switch self {
        case .noSuchBAR:
            return "a PCI function has BARs 0–5 only"
        case .resources(let e):
            return e.description
        case .notImplemented(let address, let index):
            return "\(address) does not implement BAR\(index) (its sysfs resource line is empty)"
        case .ioPort(let address, let index, let resource):
            return "BAR\(index) of \(address) is an I/O-port BAR (\(resource)); I/O ports cannot be memory-mapped. balloond uses the modern virtio-pci memory BAR that the capabilities name (BAR4 on QEMU)"
        case .notMemory(let address, let index, let resource):
            return "BAR\(index) of \(address) is not a memory BAR (\(resource))"
        case .noResourceFile(let path):
            return "\(path) does not exist: the kernel exports no mappable file for this BAR"
        case .openFailed(let e):
            return e.errno == .permissionDenied || e.errno == .notPermitted ? "\(e); run balloond as root" : e.description
        case .mmapFailed(let e, let address, let index, let driver):
            switch e.errno {
            case .invalidArgument:
                if let driver, driver != uioPCIGenericDriver {
                    return "\(e). The kernel driver '\(driver)' still owns \(address), and kernels built with CONFIG_IO_STRICT_DEVMEM=y (Debian's) refuse to map BARs a driver has claimed. Bind uio_pci_generic first (`balloond bind \(address)`)"
                }
                return "\(e). The kernel refused to map BAR\(index) of \(address) (driver: \(driver ?? "none")); check that it is a memory BAR and that no driver claims it"
            case .notPermitted, .permissionDenied:
                return "\(e). Mapping BARs needs root, and a locked-down kernel (Secure Boot) forbids it: check /sys/kernel/security/lockdown"
            default:
                return e.description
            }
        }
    }
}
