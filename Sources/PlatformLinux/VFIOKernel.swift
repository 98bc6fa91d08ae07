#if canImport(Glibc)
import Glibc
#endif
import CBalloonShims
import SystemPackage
import VirtioCore
import VirtioPCI

// The vfio type1 container/group/device API (Linux uapi <linux/vfio.h>; docs/vfio.md §1) as
// typed operations: the seam between balloond's vfio backend and the kernel. The real
// conformance issues the ioctls through the syscall funnel with the header's own structs
// (so their layout is the kernel's by construction); tests use a fake kernel that enforces
// the same rules (TestSupport's FakeVFIOKernel).

/// vfio-pci's fixed region indexes (uapi `VFIO_PCI_*_REGION_INDEX`).
public enum VFIOPCIRegion {
    /// BAR `n` is region `n` (0–5).
    public static func bar(_ n: Int) -> UInt32 { UInt32(n) }
    /// Config space: never mmap-able, pread/pwrite only.
    public static let config: UInt32 = 7
    /// Regions vfio-pci always reports (BAR0–5, ROM, config, VGA).
    public static let count: UInt32 = 9
}

/// vfio-pci's fixed IRQ indexes (uapi `VFIO_PCI_*_IRQ_INDEX`).
public enum VFIOPCIIRQ {
    public static let intx: UInt32 = 0
    public static let msi: UInt32 = 1
    public static let msix: UInt32 = 2
}

/// `VFIO_DEVICE_GET_INFO`.
public struct VFIODeviceInfo: Hashable, Sendable {
    public var flags: UInt32
    public var regionCount: UInt32
    public var irqCount: UInt32
    public init(flags: UInt32, regionCount: UInt32, irqCount: UInt32) {
        self.flags = flags
        self.regionCount = regionCount
        self.irqCount = irqCount
    }
    /// `VFIO_DEVICE_FLAGS_PCI`.
    public var isPCI: Bool { flags & 0x2 != 0 }
    /// `VFIO_DEVICE_FLAGS_RESET`: the kernel found a function reset method.
    public var canReset: Bool { flags & 0x1 != 0 }
}

/// `VFIO_DEVICE_GET_REGION_INFO`.
public struct VFIORegionInfo: Hashable, Sendable {
    public var index: UInt32
    public var flags: UInt32
    public var size: UInt64
    /// Where the region starts in the device descriptor's file offsets (vfio-pci: index << 40).
    public var offset: UInt64
    public init(index: UInt32, flags: UInt32, size: UInt64, offset: UInt64) {
        self.index = index
        self.flags = flags
        self.size = size
        self.offset = offset
    }
    public var readable: Bool { flags & 0x1 != 0 }
    public var writable: Bool { flags & 0x2 != 0 }
    /// `VFIO_REGION_INFO_FLAG_MMAP`.
    public var mappable: Bool { flags & 0x4 != 0 }
}

/// `VFIO_DEVICE_GET_IRQ_INFO`.
public struct VFIOIRQInfo: Hashable, Sendable {
    public var index: UInt32
    public var flags: UInt32
    public var count: UInt32
    public init(index: UInt32, flags: UInt32, count: UInt32) {
        self.index = index
        self.flags = flags
        self.count = count
    }
    /// `VFIO_IRQ_INFO_EVENTFD`.
    public var signalsEventFD: Bool { flags & 0x1 != 0 }
}

/// `VFIO_IOMMU_GET_INFO` for type1: the IOMMU page sizes and the usable IOVA windows.
public struct VFIOIOMMUInfo: Hashable, Sendable {
    /// Bitmap of supported page sizes (`iova_pgsizes`).
    public var pageSizes: UInt64
    /// The IOVA ranges (inclusive ends) from the IOVA-range capability; empty when the kernel
    /// reported none (then every IOVA the IOMMU's width allows is taken as usable).
    public var iovaRanges: [ClosedRange<UInt64>]
    public init(pageSizes: UInt64, iovaRanges: [ClosedRange<UInt64>]) {
        self.pageSizes = pageSizes
        self.iovaRanges = iovaRanges
    }
    /// The smallest mapping granule (the lowest set bit; 4 KiB if the kernel reported none).
    public var minimumPageSize: UInt64 { pageSizes == 0 ? 4096 : pageSizes & (~pageSizes &+ 1) }

    /// Whether `[iova, iova + size)` lies inside one usable window.
    public func allows(iova: UInt64, size: UInt64) -> Bool {
        guard size > 0, iova <= UInt64.max - (size - 1) else { return false }
        if iovaRanges.isEmpty { return true }
        let last = iova + (size - 1)
        return iovaRanges.contains { $0.contains(iova) && $0.contains(last) }
    }
}

/// What `VFIO_DEVICE_SET_IRQS` is asked to do with one IRQ index.
public enum VFIOIRQAction: Hashable, Sendable {
    /// `DATA_EVENTFD | ACTION_TRIGGER` from subindex 0: signal these eventfds (one per
    /// vector; for MSI-X this enables MSI-X on the function and programs its table).
    case trigger(eventfds: [Int32])
    /// `DATA_NONE | ACTION_UNMASK` of subindex 0 (INTx after the handler ran).
    case unmask
    /// `DATA_NONE | ACTION_TRIGGER` with count 0: the index off.
    case disable
}

/// The vfio operations balloond uses, one method per ioctl (plus the device descriptor's
/// region reads, writes and mappings). Every failure is the call's `SystemCallError`.
public protocol VFIOKernel: AnyObject {
    /// Opens `/dev/vfio/vfio` (a new container).
    func openContainer() throws(SystemCallError) -> OpenFile
    /// Opens `/dev/vfio/<number>`.
    func openGroup(_ number: Int) throws(SystemCallError) -> OpenFile
    func apiVersion(container: OpenFile) throws(SystemCallError) -> Int32
    func checkExtension(container: OpenFile, _ extensionID: Int32) throws(SystemCallError) -> Bool
    /// `VFIO_GROUP_GET_STATUS` flags (VIABLE = 1, CONTAINER_SET = 2).
    func groupStatus(group: OpenFile) throws(SystemCallError) -> UInt32
    func setContainer(group: OpenFile, container: OpenFile) throws(SystemCallError)
    func setIOMMU(container: OpenFile, type: Int32) throws(SystemCallError)
    func iommuInfo(container: OpenFile) throws(SystemCallError) -> VFIOIOMMUInfo
    /// `VFIO_GROUP_GET_DEVICE_FD` for the device named `name` (its BDF).
    func deviceDescriptor(group: OpenFile, name: String) throws(SystemCallError) -> OpenFile
    func deviceInfo(device: OpenFile) throws(SystemCallError) -> VFIODeviceInfo
    func regionInfo(device: OpenFile, index: UInt32) throws(SystemCallError) -> VFIORegionInfo
    func irqInfo(device: OpenFile, index: UInt32) throws(SystemCallError) -> VFIOIRQInfo
    func setIRQs(device: OpenFile, index: UInt32, _ action: VFIOIRQAction) throws(SystemCallError)
    /// `VFIO_IOMMU_MAP_DMA`, readable and writable by the device.
    func mapDMA(container: OpenFile, virtualAddress: UInt, iova: UInt64, size: UInt64) throws(SystemCallError)
    /// `VFIO_IOMMU_UNMAP_DMA`; returns the bytes the kernel unmapped.
    func unmapDMA(container: OpenFile, iova: UInt64, size: UInt64) throws(SystemCallError) -> UInt64
    func resetDevice(device: OpenFile) throws(SystemCallError)
    /// pread of the device descriptor at `offset` (a region's offset plus the register's).
    func read(device: OpenFile, offset: UInt64, count: Int) throws(SystemCallError) -> [UInt8]
    /// pwrite of the device descriptor; returns the bytes written.
    func write(device: OpenFile, _ bytes: [UInt8], offset: UInt64) throws(SystemCallError) -> Int
    /// mmap of `length` bytes of the device descriptor at `offset` (a mappable region).
    func mapRegion(device: OpenFile, offset: UInt64, length: Int) throws(SystemCallError) -> MMIORegion
}

/// Type1 extension ids and group status bits (uapi).
public enum VFIOConstant {
    public static let apiVersion: Int32 = 0
    public static let type1IOMMU: Int32 = 1
    public static let type1v2IOMMU: Int32 = 3
    public static let groupViable: UInt32 = 1
    public static let groupContainerSet: UInt32 = 2
    /// `VFIO_IOMMU_TYPE1_INFO_CAP_IOVA_RANGE`.
    public static let iovaRangeCapability: UInt16 = 1
}

/// Parses a `vfio_iommu_type1_info` buffer with its capability chain (docs/vfio.md §1):
/// `iova_pgsizes` at 8, `cap_offset` at 16 when flags has CAPS (2); each capability is
/// {id u16, version u16, next u32}; the IOVA-range one (id 1) has nr_iovas at 8 and
/// {start, end} u64 pairs from 16. Pure; a chain that loops or leaves the buffer ends the
/// walk (what was read stays).
public func parseIOMMUInfo(_ bytes: [UInt8]) -> VFIOIOMMUInfo {
    func u16(_ o: Int) -> UInt16? { o >= 0 && o + 2 <= bytes.count ? UInt16(bytes[o]) | UInt16(bytes[o + 1]) << 8 : nil }
    func u32(_ o: Int) -> UInt32? { guard let lo = u16(o), let hi = u16(o + 2) else { return nil }; return UInt32(lo) | UInt32(hi) << 16 }
    func u64(_ o: Int) -> UInt64? { guard let lo = u32(o), let hi = u32(o + 4) else { return nil }; return UInt64(lo) | UInt64(hi) << 32 }
    let flags = u32(4) ?? 0
    let pageSizes = flags & 0x1 != 0 ? (u64(8) ?? 0) : 0
    var ranges: [ClosedRange<UInt64>] = []
    guard flags & 0x2 != 0, var cap = u32(16).map(Int.init), cap != 0 else { return VFIOIOMMUInfo(pageSizes: pageSizes, iovaRanges: []) }
    var seen: Set<Int> = []
    while cap != 0, !seen.contains(cap), let id = u16(cap), let next = u32(cap + 4) {
        seen.insert(cap)
        if id == VFIOConstant.iovaRangeCapability, let n = u32(cap + 8) {
            for i in 0..<Int(min(n, 4096)) {
                guard let start = u64(cap + 16 + 16 * i), let end = u64(cap + 24 + 16 * i), start <= end else { break }
                ranges.append(start...end)
            }
        }
        cap = Int(next)
    }
    return VFIOIOMMUInfo(pageSizes: pageSizes, iovaRanges: ranges)
}

/// The kernel's vfio: ioctls through `Sys.call` on the uapi structs.
public final class LinuxVFIOKernel: VFIOKernel {
    public let root: SysRoot

    public init(root: SysRoot = .host) { self.root = root }

    public func openContainer() throws(SystemCallError) -> OpenFile {
        try OpenFile(path: root.path("/dev/vfio/vfio"), flags: O_RDWR)
    }

    public func openGroup(_ number: Int) throws(SystemCallError) -> OpenFile {
        try OpenFile(path: root.path("/dev/vfio/\(number)"), flags: O_RDWR)
    }

    private func ioctl(_ file: OpenFile, _ name: String, _ request: UInt, value: UInt) throws(SystemCallError) -> Int32 {
        let fd = file.descriptor
        return try Sys.call("ioctl(\(name))", path: file.path) { bs_ioctl_value(fd, request, value) }
    }

    private func ioctl<T>(_ file: OpenFile, _ name: String, _ request: UInt, _ argument: inout T) throws(SystemCallError) -> Int32 {
        let fd = file.descriptor
        // The vfio argument structs are plain C structs (no object references).
        return try Sys.call("ioctl(\(name))", path: file.path) {
            unsafe withUnsafeMutableBytes(of: &argument) { unsafe bs_ioctl_pointer(fd, request, $0.baseAddress) }
        }
    }

    private func ioctl(_ file: OpenFile, _ name: String, _ request: UInt, bytes: inout [UInt8]) throws(SystemCallError) -> Int32 {
        let fd = file.descriptor
        return try Sys.call("ioctl(\(name))", path: file.path) {
            unsafe bytes.withUnsafeMutableBytes { raw in unsafe bs_ioctl_pointer(fd, request, raw.baseAddress) }
        }
    }

    public func apiVersion(container: OpenFile) throws(SystemCallError) -> Int32 {
        try ioctl(container, "VFIO_GET_API_VERSION", bs_vfio_get_api_version(), value: 0)
    }

    public func checkExtension(container: OpenFile, _ extensionID: Int32) throws(SystemCallError) -> Bool {
        try ioctl(container, "VFIO_CHECK_EXTENSION", bs_vfio_check_extension(), value: UInt(extensionID)) > 0
    }

    public func groupStatus(group: OpenFile) throws(SystemCallError) -> UInt32 {
        var status = vfio_group_status()
        status.argsz = UInt32(MemoryLayout<vfio_group_status>.size)
        _ = try ioctl(group, "VFIO_GROUP_GET_STATUS", bs_vfio_group_get_status(), &status)
        return status.flags
    }

    public func setContainer(group: OpenFile, container: OpenFile) throws(SystemCallError) {
        var fd = container.descriptor
        _ = try ioctl(group, "VFIO_GROUP_SET_CONTAINER", bs_vfio_group_set_container(), &fd)
    }

    public func setIOMMU(container: OpenFile, type: Int32) throws(SystemCallError) {
        _ = try ioctl(container, "VFIO_SET_IOMMU", bs_vfio_set_iommu(), value: UInt(type))
    }

    public func iommuInfo(container: OpenFile) throws(SystemCallError) -> VFIOIOMMUInfo {
        let base = MemoryLayout<vfio_iommu_type1_info>.size
        var bytes = [UInt8](repeating: 0, count: base)
        Self.store32(UInt32(base), into: &bytes, at: 0)
        _ = try ioctl(container, "VFIO_IOMMU_GET_INFO", bs_vfio_iommu_get_info(), bytes: &bytes)
        // With capabilities the kernel asks for a larger buffer through argsz: call again.
        let wanted = Int(UInt32(bytes[0]) | UInt32(bytes[1]) << 8 | UInt32(bytes[2]) << 16 | UInt32(bytes[3]) << 24)
        if wanted > base, wanted <= 1 << 20 {
            bytes = [UInt8](repeating: 0, count: wanted)
            Self.store32(UInt32(wanted), into: &bytes, at: 0)
            _ = try ioctl(container, "VFIO_IOMMU_GET_INFO", bs_vfio_iommu_get_info(), bytes: &bytes)
        }
        return parseIOMMUInfo(bytes)
    }

    public func deviceDescriptor(group: OpenFile, name: String) throws(SystemCallError) -> OpenFile {
        var cName = Array(name.utf8) + [0]
        let fd = try ioctl(group, "VFIO_GROUP_GET_DEVICE_FD", bs_vfio_group_get_device_fd(), bytes: &cName)
        return OpenFile(adopting: fd, path: "vfio device \(name)")
    }

    public func deviceInfo(device: OpenFile) throws(SystemCallError) -> VFIODeviceInfo {
        var info = vfio_device_info()
        info.argsz = UInt32(MemoryLayout<vfio_device_info>.size)
        _ = try ioctl(device, "VFIO_DEVICE_GET_INFO", bs_vfio_device_get_info(), &info)
        return VFIODeviceInfo(flags: info.flags, regionCount: info.num_regions, irqCount: info.num_irqs)
    }

    public func regionInfo(device: OpenFile, index: UInt32) throws(SystemCallError) -> VFIORegionInfo {
        var info = vfio_region_info()
        info.argsz = UInt32(MemoryLayout<vfio_region_info>.size)
        info.index = index
        _ = try ioctl(device, "VFIO_DEVICE_GET_REGION_INFO", bs_vfio_device_get_region_info(), &info)
        return VFIORegionInfo(index: index, flags: info.flags, size: info.size, offset: info.offset)
    }

    public func irqInfo(device: OpenFile, index: UInt32) throws(SystemCallError) -> VFIOIRQInfo {
        var info = vfio_irq_info()
        info.argsz = UInt32(MemoryLayout<vfio_irq_info>.size)
        info.index = index
        _ = try ioctl(device, "VFIO_DEVICE_GET_IRQ_INFO", bs_vfio_device_get_irq_info(), &info)
        return VFIOIRQInfo(index: index, flags: info.flags, count: info.count)
    }

    /// `vfio_irq_set` is a 20-byte header (argsz, flags, index, start, count) followed by
    /// `count` 32-bit eventfds for DATA_EVENTFD.
    public func setIRQs(device: OpenFile, index: UInt32, _ action: VFIOIRQAction) throws(SystemCallError) {
        let header = 20
        let flags: UInt32, count: UInt32, fds: [Int32]
        switch action {
        case .trigger(let eventfds):
            flags = UInt32(VFIO_IRQ_SET_DATA_EVENTFD) | UInt32(VFIO_IRQ_SET_ACTION_TRIGGER)
            count = UInt32(eventfds.count)
            fds = eventfds
        case .unmask:
            flags = UInt32(VFIO_IRQ_SET_DATA_NONE) | UInt32(VFIO_IRQ_SET_ACTION_UNMASK)
            count = 1
            fds = []
        case .disable:
            flags = UInt32(VFIO_IRQ_SET_DATA_NONE) | UInt32(VFIO_IRQ_SET_ACTION_TRIGGER)
            count = 0
            fds = []
        }
        var bytes = [UInt8](repeating: 0, count: header + 4 * fds.count)
        Self.store32(UInt32(bytes.count), into: &bytes, at: 0)
        Self.store32(flags, into: &bytes, at: 4)
        Self.store32(index, into: &bytes, at: 8)
        Self.store32(0, into: &bytes, at: 12)
        Self.store32(count, into: &bytes, at: 16)
        for (i, fd) in fds.enumerated() { Self.store32(UInt32(bitPattern: fd), into: &bytes, at: header + 4 * i) }
        _ = try ioctl(device, "VFIO_DEVICE_SET_IRQS", bs_vfio_device_set_irqs(), bytes: &bytes)
    }

    public func mapDMA(container: OpenFile, virtualAddress: UInt, iova: UInt64, size: UInt64) throws(SystemCallError) {
        var map = vfio_iommu_type1_dma_map()
        map.argsz = UInt32(MemoryLayout<vfio_iommu_type1_dma_map>.size)
        map.flags = UInt32(VFIO_DMA_MAP_FLAG_READ) | UInt32(VFIO_DMA_MAP_FLAG_WRITE)
        map.vaddr = UInt64(virtualAddress)
        map.iova = iova
        map.size = size
        _ = try ioctl(container, "VFIO_IOMMU_MAP_DMA", bs_vfio_iommu_map_dma(), &map)
    }

    public func unmapDMA(container: OpenFile, iova: UInt64, size: UInt64) throws(SystemCallError) -> UInt64 {
        var unmap = vfio_iommu_type1_dma_unmap()
        unmap.argsz = UInt32(MemoryLayout<vfio_iommu_type1_dma_unmap>.size)
        unmap.iova = iova
        unmap.size = size
        _ = try ioctl(container, "VFIO_IOMMU_UNMAP_DMA", bs_vfio_iommu_unmap_dma(), &unmap)
        return unmap.size
    }

    public func resetDevice(device: OpenFile) throws(SystemCallError) {
        _ = try ioctl(device, "VFIO_DEVICE_RESET", bs_vfio_device_reset(), value: 0)
    }

    public func read(device: OpenFile, offset: UInt64, count: Int) throws(SystemCallError) -> [UInt8] {
        try device.pread(count: count, offset: Int(offset))
    }

    public func write(device: OpenFile, _ bytes: [UInt8], offset: UInt64) throws(SystemCallError) -> Int {
        try device.pwrite(bytes, offset: Int(offset))
    }

    public func mapRegion(device: OpenFile, offset: UInt64, length: Int) throws(SystemCallError) -> MMIORegion {
        let mapped = roundUp(length, to: Sys.pageSize)
        let base = try unsafe MappedMemory.map(length: mapped, protection: PROT_READ | PROT_WRITE, flags: MAP_SHARED,
                                               descriptor: device.descriptor, offset: Int(offset), path: device.path)
        return unsafe MMIOWindow(unsafeBase: base, length: length, unmap: MappedMemory.unmapper(base, length: mapped))
    }

    private static func store32(_ value: UInt32, into bytes: inout [UInt8], at offset: Int) {
        for i in 0..<4 { bytes[offset + i] = UInt8(truncatingIfNeeded: value >> (8 * UInt32(i))) }
    }
}
