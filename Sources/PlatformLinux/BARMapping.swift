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
        guard (0..<6).contains(index) else { throw .bar(index: index, reason: "a PCI function has BARs 0–5 only") }
        let resources: [PCIResource]
        do { resources = try readPCIResources(address, root: root) } catch {
            throw .bar(index: index, reason: error.description)
        }
        guard index < resources.count, resources[index].isPresent else {
            throw .bar(index: index, reason: "\(address) does not implement BAR\(index) (its sysfs resource line is empty)")
        }
        let resource = resources[index]
        if resource.isIO {
            throw .bar(index: index, reason: "BAR\(index) of \(address) is an I/O-port BAR (\(resource)); I/O ports cannot be memory-mapped. balloond uses the modern virtio-pci memory BAR that the capabilities name (BAR4 on QEMU)")
        }
        guard resource.isMemory else {
            throw .bar(index: index, reason: "BAR\(index) of \(address) is not a memory BAR (\(resource))")
        }
        let size = Int(resource.size)
        let path = address.sysfsDirectory(in: root) + "/resource\(index)"
        let file: OpenFile
        do { file = try OpenFile(path: path, flags: O_RDWR | O_SYNC) } catch {
            if error.errno == .noSuchFileOrDirectory {
                throw .bar(index: index, reason: "\(path) does not exist: the kernel exports no mappable file for this BAR")
            }
            var reason = error.description
            if error.errno == .permissionDenied || error.errno == .notPermitted { reason += "; run balloond as root" }
            throw .bar(index: index, reason: reason)
        }
        let length = roundUp(size, to: Sys.pageSize)
        let base: UnsafeMutableRawPointer
        do {
            unsafe base = try MappedMemory.map(length: length, protection: PROT_READ | PROT_WRITE, flags: MAP_SHARED,
                                        descriptor: file.descriptor, path: path)
        } catch {
            throw .bar(index: index, reason: mmapFailureReason(error, index: index))
        }
        // The mapping outlives the descriptor; close it now.
        file.close()
        return unsafe MMIOWindow(unsafeBase: base, length: size, unmap: MappedMemory.unmapper(base, length: length))
    }

    /// Explains an mmap failure: EINVAL while a kernel driver owns the device is the
    /// IO_STRICT_DEVMEM refusal; EPERM is lockdown.
    func mmapFailureReason(_ error: SystemCallError, index: Int) -> String {
        let driver = (try? PCIEnumerator.currentDriver(of: address, root: root)) ?? nil
        switch error.errno {
        case .invalidArgument:
            if let driver, driver != uioPCIGenericDriver {
                return "\(error). The kernel driver '\(driver)' still owns \(address), and kernels built with CONFIG_IO_STRICT_DEVMEM=y (Debian's) refuse to map BARs a driver has claimed. Bind uio_pci_generic first (`balloond bind \(address)`)"
            }
            return "\(error). The kernel refused to map BAR\(index) of \(address) (driver: \(driver ?? "none")); check that it is a memory BAR and that no driver claims it"
        case .notPermitted, .permissionDenied:
            return "\(error). Mapping BARs needs root, and a locked-down kernel (Secure Boot) forbids it: check /sys/kernel/security/lockdown"
        default:
            return error.description
        }
    }
}
