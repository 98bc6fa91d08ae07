#if canImport(Glibc)
import Glibc
#endif
import Logging
import SystemPackage
import VirtioCore
import VirtioPCI

/// A PCI function's IOMMU group as sysfs shows it (docs/vfio.md §2): the `iommu_group` link
/// and the group's members with their drivers.
public struct IOMMUGroup: Hashable, Sendable, CustomStringConvertible {
    public let number: Int
    /// The group's default domain type (`DMA`, `DMA-FQ`, `identity`, ...), if readable.
    public let domainType: String?
    /// Every function in the group and the driver bound to it (nil: none).
    public let members: [Member]

    public struct Member: Hashable, Sendable, CustomStringConvertible {
        public let address: PCIAddress
        public let driver: String?
        public var description: String { "\(address) (\(driver ?? "no driver"))" }
    }

    /// The group of `address`, or nil when the function has none (no IOMMU translates it).
    public static func of(_ address: PCIAddress, root: SysRoot = .host) throws(PlatformError) -> IOMMUGroup? {
        let link = address.sysfsDirectory(in: root) + "/iommu_group"
        let target: String
        do {
            guard try Sys.lstatIfExists(link) != nil else { return nil }
            target = try Sys.readlink(link)
        } catch { throw .system(error) }
        guard let last = target.split(separator: "/").last, let number = Int(last) else {
            throw .malformedFile(path: link, reason: .noIOMMUGroup(target: target))
        }
        let dir = root.path("/sys/kernel/iommu_groups/\(number)")
        let type = try? Sys.readAttribute(dir + "/type")
        var members: [Member] = []
        let names: [String]
        do { names = try Sys.listDirectory(dir + "/devices") } catch { throw .system(error) }
        for name in names.sorted() {
            guard let a = PCIAddress(name) else { continue }
            members.append(Member(address: a, driver: try PCIEnumerator.currentDriver(of: a, root: root)))
        }
        return IOMMUGroup(number: number, domainType: type, members: members)
    }

    /// Drivers whose devices do not keep a group from being viable: vfio's own, pci-stub, and
    /// pcieport (it manages no DMA: `driver_managed_dma`).
    static let viableDrivers: Set<String> = [vfioPCIDriver, "pci-stub", "pcieport"]

    /// Members other than `address` that keep the group from being viable for vfio: bound
    /// to a driver other than those (unbound ones are fine).
    public func blockers(besides address: PCIAddress) -> [Member] {
        members.filter { $0.address != address && $0.driver.map { !Self.viableDrivers.contains($0) } ?? false }
    }

    public var description: String {
        "group \(number)\(domainType.map { " (\($0))" } ?? ""): " + members.map(\.description).joined(separator: ", ")
    }
}

/// The kernel driver name of vfio-pci.
public let vfioPCIDriver = "vfio-pci"

/// Why the vfio backend could not open or drive the device. Each message says what to do.
public enum VFIOError: Error, Hashable, Sendable, CustomStringConvertible {
    /// /dev/vfio/vfio could not be opened.
    case noContainer(SystemCallError)
    /// The IOMMU group could not be read from sysfs.
    case sysfs(PlatformError)
    /// The container speaks another API version.
    case apiVersion(Int32)
    /// The kernel has no type1 IOMMU backend.
    case noType1
    /// The device has no IOMMU group: nothing translates its DMA, so vfio cannot own it.
    case noIOMMUGroup(bdf: String)
    /// /dev/vfio/N could not be opened.
    case groupUnavailable(group: Int, bdf: String, SystemCallError)
    /// Another member of the group is bound to a normal driver.
    case groupNotViable(group: Int, blockers: [IOMMUGroup.Member])
    /// A container ioctl failed (SET_CONTAINER, SET_IOMMU, GET_INFO).
    case container(step: String, SystemCallError)
    /// VFIO_GROUP_GET_DEVICE_FD or the device's info ioctls failed.
    case device(bdf: String, step: String, SystemCallError)
    /// The device is not a vfio-pci device with the regions balloond needs.
    case unexpectedDevice(bdf: String, info: VFIODeviceInfo)
    /// A DMA mapping is outside the IOMMU's windows or misaligned.
    case badMapping(iova: UInt64, size: UInt64, reason: String)
    /// VFIO_IOMMU_MAP_DMA failed.
    case mapFailed(iova: UInt64, size: UInt64, SystemCallError)
    /// VFIO_IOMMU_UNMAP_DMA failed or unmapped something else than what was mapped.
    case unmapFailed(iova: UInt64, size: UInt64, unmapped: UInt64?, SystemCallError?)
    /// An interrupt index could not be set up.
    case interrupts(index: UInt32, reason: String, SystemCallError?)

    public var description: String {
        switch self {
        case .noContainer(let e):
            return "cannot open the vfio container: \(e). Load vfio-pci (modprobe vfio-pci) and run balloond as root"
        case .sysfs(let e):
            return e.description
        case .apiVersion(let v):
            return "/dev/vfio/vfio speaks vfio API version \(v), not 0: this kernel's vfio is not one balloond knows"
        case .noType1:
            return "this kernel's vfio has no type1 IOMMU backend (vfio_iommu_type1); load it (modprobe vfio_iommu_type1) or use --backend uio"
        case .noIOMMUGroup(let bdf):
            return "\(bdf) has no IOMMU group: no IOMMU translates its DMA, so vfio cannot own it (boot the guest with a virtual IOMMU and intel_iommu=on, or use --backend uio)"
        case .groupUnavailable(let group, let bdf, let e):
            switch e.errno {
            case .noSuchFileOrDirectory:
                return "cannot open /dev/vfio/\(group): \(e). \(bdf) is not bound to vfio-pci"
            case .resourceBusy:
                return "cannot open /dev/vfio/\(group): \(e). Another process (a VM, or another balloond) holds IOMMU group \(group) of \(bdf)"
            default:
                return "cannot open /dev/vfio/\(group) for \(bdf): \(e); run balloond as root"
            }
        case .groupNotViable(let group, let blockers):
            return "IOMMU group \(group) is not viable for vfio: it also holds " + blockers.map(\.description).joined(separator: ", ")
                + ", bound to other drivers. vfio can only own a whole group: put the balloon in a slot of its own (e.g. behind its own pcie-root-port), or use --backend uio"
        case .container(let step, let e):
            if step == "VFIO_SET_IOMMU", e.errno == .notPermitted {
                return "VFIO_SET_IOMMU failed: \(e). The IOMMU does not remap interrupts, so vfio's type1 refuses it: give the guest an IOMMU with interrupt remapping (QEMU: -device intel-iommu,intremap=on), or use --backend uio"
            }
            return "\(step) failed: \(e)"
        case .device(let bdf, let step, let e):
            return "\(step) for \(bdf) failed: \(e)"
        case .unexpectedDevice(let bdf, let info):
            return "vfio reports \(bdf) as \(info.isPCI ? "a PCI device" : "not a PCI device") with \(info.regionCount) regions and \(info.irqCount) IRQ indexes; balloond needs a vfio-pci function with config space (9 regions)"
        case .badMapping(let iova, let size, let reason):
            return "cannot map \(size) bytes at IOVA 0x\(String(iova, radix: 16)): \(reason)"
        case .mapFailed(let iova, let size, let e):
            var hint = ""
            switch e.errno {
            case .fileExists: hint = " (something is already mapped there)"
            case .noSpace: hint = " (vfio_iommu_type1.dma_entry_limit reached)"
            case .noMemory: hint = " (RLIMIT_MEMLOCK: run balloond as root or raise the limit)"
            default: break
            }
            return "VFIO_IOMMU_MAP_DMA of \(size) bytes at IOVA 0x\(String(iova, radix: 16)) failed: \(e)\(hint)"
        case .unmapFailed(let iova, let size, let unmapped, let e):
            if let e { return "VFIO_IOMMU_UNMAP_DMA of \(size) bytes at IOVA 0x\(String(iova, radix: 16)) failed: \(e)" }
            return "VFIO_IOMMU_UNMAP_DMA of \(size) bytes at IOVA 0x\(String(iova, radix: 16)) unmapped \(unmapped ?? 0) bytes"
        case .interrupts(let index, let reason, let e):
            let name = index == VFIOPCIIRQ.intx ? "INTx" : index == VFIOPCIIRQ.msix ? "MSI-X" : "IRQ index \(index)"
            return "\(name): \(reason)\(e.map { ": \($0)" } ?? "")"
        }
    }
}

/// Where the device may reach memory: maps a range of this process's memory so the device
/// sees it at `deviceAddress`, and unmaps it again. vfio's conformance is `VFIODevice`
/// (VFIO_IOMMU_MAP_DMA); uio needs none (the device sees guest-physical addresses).
public protocol DeviceAddressMapper: AnyObject {
    /// Makes `[virtualAddress, +length)` reachable by the device at `deviceAddress`
    /// (readable and writable). The memory must stay mapped and resident until `unmap`.
    func map(virtualAddress: UInt, length: Int, at deviceAddress: UInt64) throws(VFIOError)
    /// Makes `[virtualAddress, +length)` reachable by the device at a device address the
    /// mapper chooses (contiguous for the device even where the memory behind is not), and
    /// returns it. `unmap` with that address and length undoes it.
    func mapWindow(virtualAddress: UInt, length: Int) throws(VFIOError) -> UInt64
    /// Undoes one `map` or `mapWindow` with the same device address and length.
    func unmap(deviceAddress: UInt64, length: Int) throws(VFIOError)
}

/// The balloon through vfio-pci (docs/vfio.md §1): a type1 container, the device's group in
/// it, and the device descriptor. Config space and BARs go through the device's regions;
/// DMA goes through the IOMMU mappings made with `map` (each unmapped exactly as mapped).
///
/// Closing order (deinit): device descriptor, then group, then container; the kernel drops
/// every mapping and unpins its pages when the container goes, also when balloond is killed.
public final class VFIODevice: DeviceAddressMapper {
    public let address: PCIAddress
    public let group: IOMMUGroup
    public let kernel: VFIOKernel
    public let info: VFIODeviceInfo
    public let iommu: VFIOIOMMUInfo
    /// The device descriptor (for interrupts and region access).
    public let descriptor: OpenFile
    public let configRegion: VFIORegionInfo
    /// BAR0–5's regions (size 0: absent).
    public let barRegions: [VFIORegionInfo]
    private let container: OpenFile
    private let groupFile: OpenFile
    /// Live IOMMU mappings: IOVA → size.
    public private(set) var mappings: [UInt64: UInt64] = [:]
    /// Where `mapWindow` places mappings: IOVAs above any guest-physical address (identity
    /// mappings, IOVA = GPA, stay below), inside the IOMMU's usable ranges; nil until first
    /// used, and when no such window exists.
    private var window: (base: UInt64, space: OffsetAllocator)?
    /// The window: 64 GiB from 256 GiB (below 2^39, the smallest vIOMMU width QEMU gives).
    public static let windowBase: UInt64 = 1 << 38
    public static let windowSize: UInt64 = 1 << 36
    let logger: Logger

    /// Opens the container, attaches the device's group (which must be viable), selects the
    /// type1v2 IOMMU and opens the device. The device must already be bound to vfio-pci.
    public init(address: PCIAddress, kernel: VFIOKernel, root: SysRoot = .host, logger: Logger) throws(VFIOError) {
        self.address = address
        self.kernel = kernel
        self.logger = logger
        let found: IOMMUGroup?
        do { found = try IOMMUGroup.of(address, root: root) } catch { throw .sysfs(error) }
        guard let group = found else { throw .noIOMMUGroup(bdf: address.bdf) }
        self.group = group
        do { container = try kernel.openContainer() } catch { throw .noContainer(error) }
        let version: Int32
        do { version = try kernel.apiVersion(container: container) } catch { throw .container(step: "VFIO_GET_API_VERSION", error) }
        guard version == VFIOConstant.apiVersion else { throw .apiVersion(version) }
        let hasType1v2: Bool
        do { hasType1v2 = try kernel.checkExtension(container: container, VFIOConstant.type1v2IOMMU) } catch {
            throw .container(step: "VFIO_CHECK_EXTENSION", error)
        }
        guard hasType1v2 else { throw .noType1 }
        do { groupFile = try kernel.openGroup(group.number) } catch { throw .groupUnavailable(group: group.number, bdf: address.bdf, error) }
        let status: UInt32
        do { status = try kernel.groupStatus(group: groupFile) } catch { throw .container(step: "VFIO_GROUP_GET_STATUS", error) }
        guard status & VFIOConstant.groupViable != 0 else {
            throw .groupNotViable(group: group.number, blockers: group.blockers(besides: address))
        }
        do { try kernel.setContainer(group: groupFile, container: container) } catch { throw .container(step: "VFIO_GROUP_SET_CONTAINER", error) }
        do { try kernel.setIOMMU(container: container, type: VFIOConstant.type1v2IOMMU) } catch { throw .container(step: "VFIO_SET_IOMMU", error) }
        do { iommu = try kernel.iommuInfo(container: container) } catch { throw .container(step: "VFIO_IOMMU_GET_INFO", error) }
        do { descriptor = try kernel.deviceDescriptor(group: groupFile, name: address.bdf) } catch {
            throw .device(bdf: address.bdf, step: "VFIO_GROUP_GET_DEVICE_FD", error)
        }
        do { info = try kernel.deviceInfo(device: descriptor) } catch { throw .device(bdf: address.bdf, step: "VFIO_DEVICE_GET_INFO", error) }
        guard info.isPCI, info.regionCount > VFIOPCIRegion.config else { throw .unexpectedDevice(bdf: address.bdf, info: info) }
        var bars: [VFIORegionInfo] = []
        do {
            for i in 0..<6 { bars.append(try kernel.regionInfo(device: descriptor, index: VFIOPCIRegion.bar(i))) }
            configRegion = try kernel.regionInfo(device: descriptor, index: VFIOPCIRegion.config)
        } catch { throw .device(bdf: address.bdf, step: "VFIO_DEVICE_GET_REGION_INFO", error) }
        barRegions = bars
        logger.info("vfio device open", metadata: [
            "group": "\(group.number)", "iova_page": "\(iommu.minimumPageSize)",
            "iova_ranges": "\(iommu.iovaRanges.map { "0x\(String($0.lowerBound, radix: 16))-0x\(String($0.upperBound, radix: 16))" })",
            "reset": "\(info.canReset)",
        ])
    }

    deinit {
        // Unmap before the memory behind the mappings can be freed by its owners: they
        // unmap their own (DMA regions); anything left goes with the container.
        descriptor.close()
        groupFile.close()
        container.close()
    }

    /// BAR sizes as the transport wants them (nil: absent).
    public var barSizes: [UInt64?] { barRegions.map { $0.size > 0 ? $0.size : nil } }

    /// Config space through the config region.
    public func configSpace() -> VFIOConfigSpace { VFIOConfigSpace(device: self) }

    /// Maps BAR `index` whole: mmap of its region where vfio allows it, else register
    /// accesses through pread/pwrite.
    public func mapBAR(_ index: Int) throws(PCIError) -> MMIORegion {
        guard (0..<6).contains(index) else { throw .bar(index: index, reason: BARProblem.noSuchBAR) }
        let region = barRegions[index]
        guard region.size > 0 else { throw .bar(index: index, reason: BARProblem.notImplemented(address: address, index: index)) }
        guard region.size <= 1 << 30 else { throw .bar(index: index, reason: VFIORegionProblem.tooLarge(size: region.size)) }
        if region.mappable {
            do { return try kernel.mapRegion(device: descriptor, offset: region.offset, length: Int(region.size)) } catch {
                logger.warning("mmap of BAR\(index) through vfio failed (\(error)); using pread/pwrite")
            }
        }
        guard region.readable, region.writable else { throw .bar(index: index, reason: VFIORegionProblem.notReadWrite(flags: region.flags)) }
        return VFIORegionWindow(device: self, region: region)
    }

    /// Function reset through vfio, when the kernel has a method for it.
    public func resetFunction() throws(VFIOError) {
        do { try kernel.resetDevice(device: descriptor) } catch { throw .device(bdf: address.bdf, step: "VFIO_DEVICE_RESET", error) }
    }

    // MARK: DMA

    public func map(virtualAddress: UInt, length: Int, at deviceAddress: UInt64) throws(VFIOError) {
        let size = UInt64(length)
        let page = iommu.minimumPageSize
        guard size > 0, deviceAddress % page == 0, size % page == 0, UInt64(virtualAddress) % page == 0 else {
            throw .badMapping(iova: deviceAddress, size: size, reason: "address and length must be multiples of the IOMMU page (\(page) bytes)")
        }
        guard iommu.allows(iova: deviceAddress, size: size) else {
            throw .badMapping(iova: deviceAddress, size: size, reason: "outside the IOMMU's usable IOVA ranges")
        }
        // Inclusive ends (allows() checked that the last byte does not wrap; so did each
        // earlier mapping's).
        let last = deviceAddress + (size - 1)
        if let clash = mappings.first(where: { $0.key <= last && deviceAddress <= $0.key + ($0.value - 1) }) {
            throw .badMapping(iova: deviceAddress, size: size, reason: "it overlaps the mapping at 0x\(String(clash.key, radix: 16)) (+\(clash.value))")
        }
        do { try kernel.mapDMA(container: container, virtualAddress: virtualAddress, iova: deviceAddress, size: size) } catch {
            throw .mapFailed(iova: deviceAddress, size: size, error)
        }
        mappings[deviceAddress] = size
    }

    public func mapWindow(virtualAddress: UInt, length: Int) throws(VFIOError) -> UInt64 {
        if window == nil {
            guard iommu.allows(iova: Self.windowBase, size: Self.windowSize) else {
                throw .badMapping(iova: Self.windowBase, size: Self.windowSize, reason: "the IOMMU's usable IOVA ranges do not hold balloond's window for owned memory")
            }
            window = (Self.windowBase, OffsetAllocator(capacity: Int(Self.windowSize), granule: Int(iommu.minimumPageSize)))
        }
        guard let offset = window!.space.allocate(length) else {
            throw .badMapping(iova: Self.windowBase, size: UInt64(length), reason: "balloond's IOVA window (\(Self.windowSize >> 30) GiB) is full")
        }
        let iova = Self.windowBase + UInt64(offset)
        do { try map(virtualAddress: virtualAddress, length: length, at: iova) } catch {
            window!.space.release(offset: offset, length: length)
            throw error
        }
        return iova
    }

    /// Unmaps exactly what `map` mapped and checks the kernel unmapped all of it (a partial
    /// or empty unmap would leave the device a way into memory about to be freed).
    public func unmap(deviceAddress: UInt64, length: Int) throws(VFIOError) {
        let size = UInt64(length)
        guard mappings[deviceAddress] == size else {
            throw .badMapping(iova: deviceAddress, size: size, reason: "no mapping of exactly this range")
        }
        let unmapped: UInt64
        do { unmapped = try kernel.unmapDMA(container: container, iova: deviceAddress, size: size) } catch {
            throw .unmapFailed(iova: deviceAddress, size: size, unmapped: nil, error)
        }
        guard unmapped == size else { throw .unmapFailed(iova: deviceAddress, size: size, unmapped: unmapped, nil) }
        mappings[deviceAddress] = nil
        if window != nil, deviceAddress >= Self.windowBase, deviceAddress - Self.windowBase < Self.windowSize {
            window!.space.release(offset: Int(deviceAddress - Self.windowBase), length: length)
        }
    }
}

/// Why a vfio region cannot serve as a BAR window.
public enum VFIORegionProblem: Error, Hashable, Sendable, CustomStringConvertible {
    case tooLarge(size: UInt64)
    case notReadWrite(flags: UInt32)
    case accessFailed(SystemCallError)
    case shortAccess(done: Int, of: Int)

    public var description: String {
        switch self {
        case .tooLarge(let size): return "the region is \(size) bytes; balloond maps virtio register BARs of at most 1 GiB"
        case .notReadWrite(let flags): return "vfio reports the region neither mappable nor read-write (flags 0x\(String(flags, radix: 16)))"
        case .accessFailed(let e): return e.description
        case .shortAccess(let done, let of): return "vfio region access moved \(done) of \(of) bytes"
        }
    }
}

/// Config space through vfio's config region (pread/pwrite; vfio-pci virtualises parts of
/// it, and passes Command's Memory and Bus Master bits through).
public final class VFIOConfigSpace: PCIConfigSpace {
    private let registers: ConfigRegisterFile
    public var size: Int { registers.size }

    init(device: VFIODevice) {
        let base = device.configRegion.offset
        registers = ConfigRegisterFile(address: device.address, path: device.descriptor.path, size: Int(device.configRegion.size),
                                       readBytes: { (offset, count) throws(SystemCallError) in
                                           try device.kernel.read(device: device.descriptor, offset: base + UInt64(offset), count: count)
                                       },
                                       writeBytes: { (bytes, offset) throws(SystemCallError) in
                                           try device.kernel.write(device: device.descriptor, bytes, offset: base + UInt64(offset))
                                       })
    }

    public func read8(at offset: Int) throws(PCIError) -> UInt8 { try registers.read8(at: offset) }
    public func read16(at offset: Int) throws(PCIError) -> UInt16 { try registers.read16(at: offset) }
    public func read32(at offset: Int) throws(PCIError) -> UInt32 { try registers.read32(at: offset) }
    public func write16(_ value: UInt16, at offset: Int) throws(PCIError) { try registers.write16(value, at: offset) }
}

/// A BAR through pread/pwrite of its vfio region (for regions vfio does not let us mmap).
/// An access that fails reads as all-ones, as a vanished PCI device does.
final class VFIORegionWindow: MMIORegion {
    private let device: VFIODevice
    private let region: VFIORegionInfo
    var length: Int { Int(region.size) }

    init(device: VFIODevice, region: VFIORegionInfo) {
        self.device = device
        self.region = region
    }

    private func read(_ offset: Int, _ width: Int) -> UInt64 {
        precondition(offset >= 0 && offset + width <= length, "BAR access out of bounds")
        guard let b = try? device.kernel.read(device: device.descriptor, offset: region.offset + UInt64(offset), count: width), b.count == width else {
            return UInt64.max
        }
        return b.enumerated().reduce(0) { $0 | UInt64($1.element) << (8 * UInt64($1.offset)) }
    }

    private func write(_ value: UInt64, _ offset: Int, _ width: Int) {
        precondition(offset >= 0 && offset + width <= length, "BAR access out of bounds")
        let bytes = (0..<width).map { UInt8(truncatingIfNeeded: value >> (8 * UInt64($0))) }
        _ = try? device.kernel.write(device: device.descriptor, bytes, offset: region.offset + UInt64(offset))
    }

    func read8(at offset: Int) -> UInt8 { UInt8(truncatingIfNeeded: read(offset, 1)) }
    func read16(at offset: Int) -> UInt16 { UInt16(truncatingIfNeeded: read(offset, 2)) }
    func read32(at offset: Int) -> UInt32 { UInt32(truncatingIfNeeded: read(offset, 4)) }
    func write8(_ value: UInt8, at offset: Int) { write(UInt64(value), offset, 1) }
    func write16(_ value: UInt16, at offset: Int) { write(UInt64(value), offset, 2) }
    func write32(_ value: UInt32, at offset: Int) { write(UInt64(value), offset, 4) }
}
