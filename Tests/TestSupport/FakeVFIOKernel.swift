#if canImport(Glibc)
import Glibc
#endif
import PlatformLinux
import SystemPackage
import VirtioCore
import VirtioPCI

/// A stand-in for the kernel's vfio (type1 container, groups, one vfio-pci device) that
/// enforces the rules of docs/vfio.md §1 and records every call in order.
///
/// Descriptors are real (each container, group and device is an open /dev/null, so an
/// `OpenFile`'s deinit closes a real descriptor) and the fake keys its objects by descriptor
/// number. Interrupt eventfds given to SET_IRQS are kept, so `fire` can signal one the way
/// vfio-pci's handler does.
public final class FakeVFIOKernel: VFIOKernel {
    /// One call, as recorded.
    public enum Call: Hashable, Sendable, CustomStringConvertible {
        case openContainer
        case openGroup(Int)
        case apiVersion
        case checkExtension(Int32)
        case groupStatus
        case setContainer
        case setIOMMU(Int32)
        case iommuInfo
        case deviceDescriptor(String)
        case deviceInfo
        case regionInfo(UInt32)
        case irqInfo(UInt32)
        case setIRQs(index: UInt32, VFIOIRQAction)
        case mapDMA(virtualAddress: UInt, iova: UInt64, size: UInt64)
        case unmapDMA(iova: UInt64, size: UInt64)
        case resetDevice
        case read(offset: UInt64, count: Int)
        case write(offset: UInt64, bytes: [UInt8])
        case mapRegion(offset: UInt64, length: Int)

        public var description: String {
            switch self {
            case .openContainer: return "open /dev/vfio/vfio"
            case .openGroup(let n): return "open /dev/vfio/\(n)"
            case .apiVersion: return "VFIO_GET_API_VERSION"
            case .checkExtension(let e): return "VFIO_CHECK_EXTENSION(\(e))"
            case .groupStatus: return "VFIO_GROUP_GET_STATUS"
            case .setContainer: return "VFIO_GROUP_SET_CONTAINER"
            case .setIOMMU(let t): return "VFIO_SET_IOMMU(\(t))"
            case .iommuInfo: return "VFIO_IOMMU_GET_INFO"
            case .deviceDescriptor(let n): return "VFIO_GROUP_GET_DEVICE_FD(\(n))"
            case .deviceInfo: return "VFIO_DEVICE_GET_INFO"
            case .regionInfo(let i): return "VFIO_DEVICE_GET_REGION_INFO(\(i))"
            case .irqInfo(let i): return "VFIO_DEVICE_GET_IRQ_INFO(\(i))"
            case .setIRQs(let i, let a): return "VFIO_DEVICE_SET_IRQS(\(i), \(a))"
            case .mapDMA(let va, let iova, let size): return "VFIO_IOMMU_MAP_DMA(va 0x\(String(va, radix: 16)), iova 0x\(String(iova, radix: 16)), \(size))"
            case .unmapDMA(let iova, let size): return "VFIO_IOMMU_UNMAP_DMA(iova 0x\(String(iova, radix: 16)), \(size))"
            case .resetDevice: return "VFIO_DEVICE_RESET"
            case .read(let o, let n): return "pread(0x\(String(o, radix: 16)), \(n))"
            case .write(let o, let b): return "pwrite(0x\(String(o, radix: 16)), \(b))"
            case .mapRegion(let o, let n): return "mmap(0x\(String(o, radix: 16)), \(n))"
            }
        }
    }

    /// The operations, for injecting a failure into one (`failures`).
    public enum Op: Hashable, Sendable {
        case openContainer, openGroup, apiVersion, checkExtension, groupStatus, setContainer, setIOMMU, iommuInfo
        case deviceDescriptor, deviceInfo, regionInfo, irqInfo, setIRQs, mapDMA, unmapDMA, resetDevice, read, write, mapRegion
    }

    /// An IOMMU group as /dev/vfio/N presents it.
    public struct Group: Sendable {
        /// VFIO_GROUP_GET_STATUS's VIABLE bit.
        public var viable: Bool
        /// Opening /dev/vfio/N fails with EBUSY (another process holds it).
        public var busy: Bool
        /// The device names VFIO_GROUP_GET_DEVICE_FD accepts.
        public var devices: [String]
        public init(viable: Bool = true, busy: Bool = false, devices: [String]) {
            self.viable = viable
            self.busy = busy
            self.devices = devices
        }
    }

    /// What backs a region's reads and writes.
    public enum Backing {
        /// The fake's byte array for the region (`regionBytes[index]`).
        case bytes
        /// A register window (e.g. a simulator's BAR): reads and writes of 1, 2 and 4 bytes.
        case mmio(MMIORegion)
    }

    // MARK: configuration

    /// What VFIO_GET_API_VERSION returns.
    public var apiVersionValue: Int32 = VFIOConstant.apiVersion
    /// Extensions VFIO_CHECK_EXTENSION reports (type1 and type1v2 by default).
    public var extensions: Set<Int32> = [VFIOConstant.type1IOMMU, VFIOConstant.type1v2IOMMU]
    /// Groups by number; a number not here is ENOENT on open (no device bound to vfio-pci).
    public var groups: [Int: Group] = [:]
    /// /dev/vfio/vfio cannot be opened with this error (e.g. ENOENT: vfio not loaded).
    public var containerOpenError: Errno?
    /// VFIO_SET_IOMMU fails with this (EPERM: no interrupt remapping).
    public var setIOMMUError: Errno?
    /// Any operation fails with the given errno (checked before the operation's rules).
    public var failures: [Op: Errno] = [:]
    /// `iova_pgsizes` for VFIO_IOMMU_GET_INFO (4 KiB, 2 MiB, 1 GiB by default).
    public var pageSizes: UInt64 = 0x4000_1000 | 0x20_0000
    /// The IOVA-range capability's windows (inclusive ends): VT-d with a 39-bit address width
    /// around the MSI window, by default.
    public var iovaRanges: [ClosedRange<UInt64>] = [0...0xfedf_ffff, 0xfef0_0000...0x7f_ffff_ffff]
    /// VFIO_DEVICE_GET_INFO.
    public var deviceInfoValue = VFIODeviceInfo(flags: 0x2, regionCount: VFIOPCIRegion.count, irqCount: 5)
    /// Region infos by index; indexes below the region count that are missing here read as
    /// absent (size 0, flags 0).
    public var regions: [UInt32: VFIORegionInfo] = [:]
    /// IRQ infos by index; missing ones have count 0.
    public var irqs: [UInt32: VFIOIRQInfo] = [:]
    /// Region contents (for `.bytes` backing).
    public var regionBytes: [UInt32: [UInt8]] = [:]
    /// How each region's accesses are served (default `.bytes`).
    public var backings: [UInt32: Backing] = [:]
    /// VFIO_IOMMU_UNMAP_DMA reports this many bytes fewer than it removed (a kernel that
    /// stopped part-way, as type1 does at a mapping of another mm).
    public var unmapShortfall: UInt64 = 0

    // MARK: observed state

    /// Every call, in order.
    public private(set) var calls: [Call] = []
    /// Live IOMMU mappings: IOVA → (virtual address, size).
    public private(set) var mappings: [UInt64: (virtualAddress: UInt, size: UInt64)] = [:]
    /// The last SET_IRQS action per IRQ index.
    public private(set) var lastIRQAction: [UInt32: VFIOIRQAction] = [:]
    /// The eventfds of each IRQ index with an eventfd trigger set (empty or absent: off).
    public private(set) var triggers: [UInt32: [Int32]] = [:]
    /// ACTION_UNMASKs of INTx.
    public private(set) var unmaskCount = 0
    /// The IOMMU type set on the container (nil: none yet).
    public private(set) var iommuType: Int32?
    /// Whether the group is attached to the container.
    public private(set) var groupAttached = false

    private enum Kind {
        case container
        case group(Int)
        case device(group: Int, name: String)
    }
    private var objects: [Int32: Kind] = [:]
    /// Open group files, to refuse a second open (only one open per group).
    private var openGroups: [Int: WeakFile] = [:]
    /// The open container, to drop its state (IOMMU, mappings, attached group) when it closes.
    private var containerFile: WeakFile?
    private final class WeakFile {
        weak var file: OpenFile?
        init(_ file: OpenFile) { self.file = file }
    }

    public init() {}

    /// Whether a container descriptor handed out is still open.
    public var containerOpen: Bool { (containerFile?.file?.descriptor ?? -1) >= 0 }

    /// What the kernel does when the container's or the group's last descriptor closes:
    /// the group leaves the container, and with the container go the IOMMU type and every
    /// mapping (its pages unpinned).
    private func dropClosedState() {
        let groupOpen = openGroups.values.contains { ($0.file?.descriptor ?? -1) >= 0 }
        if !containerOpen || !groupOpen { groupAttached = false }
        if !containerOpen {
            iommuType = nil
            mappings = [:]
        }
    }

    /// A virtio-balloon the way vfio-pci reports it (docs/vfio.md §1 steps 7–9): 9 regions,
    /// config (256 bytes, read-write, never mappable) backed by a byte array with the
    /// balloon's IDs, BAR4 16 KiB (read-write, mappable unless `bar4Mappable` is false)
    /// backed by a byte array or `bar4`, INTx with one line and MSI-X with `msixVectors`
    /// vectors (0: no MSI-X capability), group `group` holding `bdf`.
    public static func balloon(bdf: String = "0000:00:03.0", group: Int = 7, msixVectors: UInt32 = 3,
                               bar4Mappable: Bool = true, bar4: MMIORegion? = nil, canReset: Bool = false) -> FakeVFIOKernel {
        let k = FakeVFIOKernel()
        k.groups[group] = Group(devices: [bdf])
        k.deviceInfoValue = VFIODeviceInfo(flags: 0x2 | (canReset ? 0x1 : 0), regionCount: VFIOPCIRegion.count, irqCount: 5)
        for i in 0..<VFIOPCIRegion.count {
            k.regions[i] = VFIORegionInfo(index: i, flags: 0, size: 0, offset: UInt64(i) << 40)
        }
        k.regions[4] = VFIORegionInfo(index: 4, flags: 0x3 | (bar4Mappable ? 0x4 : 0), size: 0x4000, offset: 4 << 40)
        k.regions[VFIOPCIRegion.config] = VFIORegionInfo(index: VFIOPCIRegion.config, flags: 0x3, size: 256, offset: UInt64(VFIOPCIRegion.config) << 40)
        var config = [UInt8](repeating: 0, count: 256)
        config[0] = 0xf4; config[1] = 0x1a; config[2] = 0x45; config[3] = 0x10
        k.regionBytes[VFIOPCIRegion.config] = config
        k.regionBytes[4] = [UInt8](repeating: 0, count: 0x4000)
        if let bar4 { k.backings[4] = .mmio(bar4) }
        k.irqs[VFIOPCIIRQ.intx] = VFIOIRQInfo(index: VFIOPCIIRQ.intx, flags: 0x1 | 0x2 | 0x4, count: 1)
        k.irqs[VFIOPCIIRQ.msi] = VFIOIRQInfo(index: VFIOPCIIRQ.msi, flags: 0x1, count: 0)
        k.irqs[VFIOPCIIRQ.msix] = VFIOIRQInfo(index: VFIOPCIIRQ.msix, flags: 0x1 | 0x8, count: msixVectors)
        return k
    }

    // MARK: helpers for tests

    /// What vfio-pci's interrupt handler does: adds 1 to the eventfd of `vector` of `index`.
    /// False when no eventfd is set there.
    @discardableResult
    public func fire(index: UInt32, vector: Int = 0) -> Bool {
        guard let fds = triggers[index], vector < fds.count, fds[vector] >= 0 else { return false }
        var one: UInt64 = 1
        return withUnsafeBytes(of: &one) { raw in Glibc.write(fds[vector], raw.baseAddress, 8) } == 8
    }

    /// Drops a mapping behind the driver's back (as if another party had unmapped it).
    public func forgetMapping(iova: UInt64) { mappings[iova] = nil }

    /// The calls of the open sequence (everything before the first region or IRQ access).
    public var callNames: [String] { calls.map(\.description) }

    // MARK: VFIOKernel

    private func enter(_ op: Op, _ call: Call) throws(SystemCallError) {
        calls.append(call)
        if let e = failures[op] { throw error(call, e) }
    }

    private func error(_ call: Call, _ errno: Errno) -> SystemCallError {
        SystemCallError(call: call.description, path: nil, errno: errno)
    }

    /// A real descriptor (an open /dev/null) standing for a vfio object.
    private func newFile(_ kind: Kind, path: String) throws(SystemCallError) -> OpenFile {
        let fd = Glibc.open("/dev/null", O_RDWR | O_CLOEXEC)
        guard fd >= 0 else { throw SystemCallError(call: "open", path: "/dev/null", errno: Errno(rawValue: Glibc.errno)) }
        objects[fd] = kind
        return OpenFile(adopting: fd, path: path)
    }

    private func kind(of file: OpenFile, _ call: Call) throws(SystemCallError) -> Kind {
        guard file.descriptor >= 0 else { throw error(call, .badFileDescriptor) }
        guard let k = objects[file.descriptor] else { throw error(call, .badFileDescriptor) }
        return k
    }

    private func requireContainer(_ file: OpenFile, _ call: Call) throws(SystemCallError) {
        guard case .container = try kind(of: file, call) else { throw error(call, .inappropriateIOCTLForDevice) }
    }

    private func requireGroup(_ file: OpenFile, _ call: Call) throws(SystemCallError) -> Int {
        guard case .group(let n) = try kind(of: file, call) else { throw error(call, .inappropriateIOCTLForDevice) }
        return n
    }

    private func requireDevice(_ file: OpenFile, _ call: Call) throws(SystemCallError) {
        guard case .device = try kind(of: file, call) else { throw error(call, .inappropriateIOCTLForDevice) }
    }

    public func openContainer() throws(SystemCallError) -> OpenFile {
        let call = Call.openContainer
        try enter(.openContainer, call)
        if let e = containerOpenError { throw SystemCallError(call: "open", path: "/dev/vfio/vfio", errno: e) }
        dropClosedState()
        let f = try newFile(.container, path: "/dev/vfio/vfio")
        containerFile = WeakFile(f)
        return f
    }

    public func openGroup(_ number: Int) throws(SystemCallError) -> OpenFile {
        let call = Call.openGroup(number)
        try enter(.openGroup, call)
        let path = "/dev/vfio/\(number)"
        guard let g = groups[number] else { throw SystemCallError(call: "open", path: path, errno: .noSuchFileOrDirectory) }
        if g.busy { throw SystemCallError(call: "open", path: path, errno: .resourceBusy) }
        if let open = openGroups[number]?.file, open.descriptor >= 0 {
            throw SystemCallError(call: "open", path: path, errno: .resourceBusy)
        }
        dropClosedState()
        let f = try newFile(.group(number), path: path)
        openGroups[number] = WeakFile(f)
        return f
    }

    public func apiVersion(container: OpenFile) throws(SystemCallError) -> Int32 {
        let call = Call.apiVersion
        try enter(.apiVersion, call)
        try requireContainer(container, call)
        return apiVersionValue
    }

    public func checkExtension(container: OpenFile, _ extensionID: Int32) throws(SystemCallError) -> Bool {
        let call = Call.checkExtension(extensionID)
        try enter(.checkExtension, call)
        try requireContainer(container, call)
        return extensions.contains(extensionID)
    }

    public func groupStatus(group: OpenFile) throws(SystemCallError) -> UInt32 {
        let call = Call.groupStatus
        try enter(.groupStatus, call)
        let n = try requireGroup(group, call)
        let g = groups[n]
        return (g?.viable == true ? VFIOConstant.groupViable : 0) | (groupAttached ? VFIOConstant.groupContainerSet : 0)
    }

    public func setContainer(group: OpenFile, container: OpenFile) throws(SystemCallError) {
        let call = Call.setContainer
        try enter(.setContainer, call)
        let n = try requireGroup(group, call)
        try requireContainer(container, call)
        guard !groupAttached else { throw error(call, .resourceBusy) }
        guard groups[n]?.viable == true else { throw error(call, .notPermitted) }
        groupAttached = true
    }

    public func setIOMMU(container: OpenFile, type: Int32) throws(SystemCallError) {
        let call = Call.setIOMMU(type)
        try enter(.setIOMMU, call)
        try requireContainer(container, call)
        // Only after a group is attached; one type per container.
        guard groupAttached else { throw error(call, .invalidArgument) }
        guard iommuType == nil else { throw error(call, .resourceBusy) }
        guard extensions.contains(type) else { throw error(call, .invalidArgument) }
        if let e = setIOMMUError { throw error(call, e) }
        iommuType = type
    }

    public func iommuInfo(container: OpenFile) throws(SystemCallError) -> VFIOIOMMUInfo {
        let call = Call.iommuInfo
        try enter(.iommuInfo, call)
        try requireContainer(container, call)
        guard iommuType != nil else { throw error(call, .invalidArgument) }
        return VFIOIOMMUInfo(pageSizes: pageSizes, iovaRanges: iovaRanges)
    }

    public func deviceDescriptor(group: OpenFile, name: String) throws(SystemCallError) -> OpenFile {
        let call = Call.deviceDescriptor(name)
        try enter(.deviceDescriptor, call)
        let n = try requireGroup(group, call)
        // The group must be in a container with an IOMMU set, and viable.
        guard groupAttached, iommuType != nil, groups[n]?.viable == true else { throw error(call, .invalidArgument) }
        guard groups[n]?.devices.contains(name) == true else { throw error(call, .operationNotSupportedByDevice) }
        return try newFile(.device(group: n, name: name), path: "vfio device \(name)")
    }

    public func deviceInfo(device: OpenFile) throws(SystemCallError) -> VFIODeviceInfo {
        let call = Call.deviceInfo
        try enter(.deviceInfo, call)
        try requireDevice(device, call)
        return deviceInfoValue
    }

    public func regionInfo(device: OpenFile, index: UInt32) throws(SystemCallError) -> VFIORegionInfo {
        let call = Call.regionInfo(index)
        try enter(.regionInfo, call)
        try requireDevice(device, call)
        guard index < deviceInfoValue.regionCount else { throw error(call, .invalidArgument) }
        return regions[index] ?? VFIORegionInfo(index: index, flags: 0, size: 0, offset: UInt64(index) << 40)
    }

    public func irqInfo(device: OpenFile, index: UInt32) throws(SystemCallError) -> VFIOIRQInfo {
        let call = Call.irqInfo(index)
        try enter(.irqInfo, call)
        try requireDevice(device, call)
        guard index < deviceInfoValue.irqCount else { throw error(call, .invalidArgument) }
        return irqs[index] ?? VFIOIRQInfo(index: index, flags: 0, count: 0)
    }

    public func setIRQs(device: OpenFile, index: UInt32, _ action: VFIOIRQAction) throws(SystemCallError) {
        let call = Call.setIRQs(index: index, action)
        try enter(.setIRQs, call)
        try requireDevice(device, call)
        guard index < deviceInfoValue.irqCount else { throw error(call, .invalidArgument) }
        let count = irqs[index]?.count ?? 0
        switch action {
        case .trigger(let fds):
            guard !fds.isEmpty, fds.count <= Int(count) else { throw error(call, .invalidArgument) }
            // One interrupt type at a time: INTx and MSI/MSI-X exclude each other.
            let others: [UInt32] = index == VFIOPCIIRQ.intx ? [VFIOPCIIRQ.msi, VFIOPCIIRQ.msix] : [VFIOPCIIRQ.intx]
            for o in others where !(triggers[o] ?? []).isEmpty { throw error(call, .invalidArgument) }
            // An eventfd must be a descriptor of this process.
            for fd in fds where fd >= 0 && fcntl(fd, F_GETFD) < 0 { throw error(call, .badFileDescriptor) }
            triggers[index] = fds
        case .unmask:
            guard index == VFIOPCIIRQ.intx, count >= 1 else { throw error(call, .invalidArgument) }
            unmaskCount += 1
        case .disable:
            triggers[index] = nil
        }
        lastIRQAction[index] = action
    }

    private var minimumPage: UInt64 { pageSizes == 0 ? 4096 : pageSizes & (~pageSizes &+ 1) }

    public func mapDMA(container: OpenFile, virtualAddress: UInt, iova: UInt64, size: UInt64) throws(SystemCallError) {
        let call = Call.mapDMA(virtualAddress: virtualAddress, iova: iova, size: size)
        try enter(.mapDMA, call)
        try requireContainer(container, call)
        guard iommuType != nil else { throw error(call, .invalidArgument) }
        let page = minimumPage
        guard size > 0, iova % page == 0, size % page == 0, UInt64(virtualAddress) % page == 0,
              iova <= UInt64.max - (size - 1) else { throw error(call, .invalidArgument) }
        let last = iova + (size - 1)
        guard iovaRanges.isEmpty || iovaRanges.contains(where: { $0.contains(iova) && $0.contains(last) }) else {
            throw error(call, .invalidArgument)
        }
        for (start, m) in mappings where start <= last && iova <= start + (m.size - 1) { throw error(call, .fileExists) }
        mappings[iova] = (virtualAddress, size)
    }

    public func unmapDMA(container: OpenFile, iova: UInt64, size: UInt64) throws(SystemCallError) -> UInt64 {
        let call = Call.unmapDMA(iova: iova, size: size)
        try enter(.unmapDMA, call)
        try requireContainer(container, call)
        guard iommuType != nil else { throw error(call, .invalidArgument) }
        let page = minimumPage
        guard size > 0, iova % page == 0, size % page == 0, iova <= UInt64.max - (size - 1) else { throw error(call, .invalidArgument) }
        let last = iova + (size - 1)
        // type1v2: the range may not bisect a mapping.
        for (start, m) in mappings {
            let end = start + (m.size - 1)
            let inside = start >= iova && end <= last
            let disjoint = end < iova || start > last
            if !inside && !disjoint { throw error(call, .invalidArgument) }
        }
        var removed: UInt64 = 0
        for (start, m) in mappings where start >= iova && start + (m.size - 1) <= last {
            mappings[start] = nil
            removed += m.size
        }
        return removed - min(removed, unmapShortfall)
    }

    public func resetDevice(device: OpenFile) throws(SystemCallError) {
        let call = Call.resetDevice
        try enter(.resetDevice, call)
        try requireDevice(device, call)
        guard deviceInfoValue.canReset else { throw error(call, .invalidArgument) }
    }

    /// The region an offset falls in, and the offset inside it.
    private func region(at offset: UInt64, _ call: Call) throws(SystemCallError) -> (VFIORegionInfo, Int) {
        let index = UInt32(truncatingIfNeeded: offset >> 40)
        guard index < deviceInfoValue.regionCount, let r = regions[index], r.size > 0 else { throw error(call, .invalidArgument) }
        let inside = offset - r.offset
        guard offset >= r.offset, inside < r.size else { throw error(call, .invalidArgument) }
        return (r, Int(inside))
    }

    public func read(device: OpenFile, offset: UInt64, count: Int) throws(SystemCallError) -> [UInt8] {
        let call = Call.read(offset: offset, count: count)
        try enter(.read, call)
        try requireDevice(device, call)
        let (r, at) = try region(at: offset, call)
        guard r.readable else { throw error(call, .invalidArgument) }
        let n = min(count, Int(r.size) - at)
        switch backings[r.index] ?? .bytes {
        case .bytes:
            let bytes = regionBytes[r.index] ?? []
            return (at..<(at + n)).map { $0 < bytes.count ? bytes[$0] : 0xff }
        case .mmio(let m):
            let v: UInt32
            switch n {
            case 1: v = UInt32(m.read8(at: at))
            case 2: v = UInt32(m.read16(at: at))
            case 4: v = m.read32(at: at)
            default: throw error(call, .invalidArgument)
            }
            return (0..<n).map { UInt8(truncatingIfNeeded: v >> (8 * UInt32($0))) }
        }
    }

    public func write(device: OpenFile, _ bytes: [UInt8], offset: UInt64) throws(SystemCallError) -> Int {
        let call = Call.write(offset: offset, bytes: bytes)
        try enter(.write, call)
        try requireDevice(device, call)
        let (r, at) = try region(at: offset, call)
        guard r.writable else { throw error(call, .invalidArgument) }
        let n = min(bytes.count, Int(r.size) - at)
        switch backings[r.index] ?? .bytes {
        case .bytes:
            var stored = regionBytes[r.index] ?? [UInt8](repeating: 0, count: Int(r.size))
            for i in 0..<n { stored[at + i] = bytes[i] }
            regionBytes[r.index] = stored
        case .mmio(let m):
            let v = bytes.prefix(n).enumerated().reduce(UInt32(0)) { $0 | UInt32($1.element) << (8 * UInt32($1.offset)) }
            switch n {
            case 1: m.write8(UInt8(truncatingIfNeeded: v), at: at)
            case 2: m.write16(UInt16(truncatingIfNeeded: v), at: at)
            case 4: m.write32(v, at: at)
            default: throw error(call, .invalidArgument)
            }
        }
        return n
    }

    public func mapRegion(device: OpenFile, offset: UInt64, length: Int) throws(SystemCallError) -> MMIORegion {
        let call = Call.mapRegion(offset: offset, length: length)
        try enter(.mapRegion, call)
        try requireDevice(device, call)
        let (r, at) = try region(at: offset, call)
        guard r.mappable, at == 0, length > 0, UInt64(length) <= r.size else { throw error(call, .invalidArgument) }
        switch backings[r.index] ?? .bytes {
        case .bytes: return FakeRegionMapping(kernel: self, index: r.index, length: length)
        case .mmio(let m): return m
        }
    }

    fileprivate func mappedRead(_ index: UInt32, _ offset: Int, _ width: Int) -> UInt32 {
        let bytes = regionBytes[index] ?? []
        return (0..<width).reduce(UInt32(0)) { v, i in v | UInt32(offset + i < bytes.count ? bytes[offset + i] : 0xff) << (8 * UInt32(i)) }
    }

    fileprivate func mappedWrite(_ index: UInt32, _ offset: Int, _ width: Int, _ value: UInt32) {
        var stored = regionBytes[index] ?? [UInt8](repeating: 0, count: Int(regions[index]?.size ?? 0))
        for i in 0..<width where offset + i < stored.count { stored[offset + i] = UInt8(truncatingIfNeeded: value >> (8 * UInt32(i))) }
        regionBytes[index] = stored
    }
}

/// An "mmap" of a byte-backed fake region: accesses go straight to the fake's array
/// (no pread/pwrite calls are recorded, as with a real mapping).
public final class FakeRegionMapping: MMIORegion {
    public let kernel: FakeVFIOKernel
    public let index: UInt32
    public let length: Int

    init(kernel: FakeVFIOKernel, index: UInt32, length: Int) {
        self.kernel = kernel
        self.index = index
        self.length = length
    }

    private func check(_ offset: Int, _ width: Int) {
        precondition(offset >= 0 && offset % width == 0 && offset + width <= length, "fake region access out of bounds or misaligned")
    }

    public func read8(at offset: Int) -> UInt8 { check(offset, 1); return UInt8(truncatingIfNeeded: kernel.mappedRead(index, offset, 1)) }
    public func read16(at offset: Int) -> UInt16 { check(offset, 2); return UInt16(truncatingIfNeeded: kernel.mappedRead(index, offset, 2)) }
    public func read32(at offset: Int) -> UInt32 { check(offset, 4); return kernel.mappedRead(index, offset, 4) }
    public func write8(_ value: UInt8, at offset: Int) { check(offset, 1); kernel.mappedWrite(index, offset, 1, UInt32(value)) }
    public func write16(_ value: UInt16, at offset: Int) { check(offset, 2); kernel.mappedWrite(index, offset, 2, UInt32(value)) }
    public func write32(_ value: UInt32, at offset: Int) { check(offset, 4); kernel.mappedWrite(index, offset, 4, value) }
}

extension FakeTree {
    /// IOMMU group `number` as sysfs shows it: `/sys/kernel/iommu_groups/N/type`, one
    /// `devices/BDF` link per member, and each member's `iommu_group` link (the members'
    /// device directories are made by `pciDevice`; drivers by `bindLink`).
    public func iommuGroup(_ number: Int, type: String? = "DMA-FQ", members: [String]) {
        let dir = "/sys/kernel/iommu_groups/\(number)"
        directory(dir + "/devices")
        if let type { file(dir + "/type", type + "\n") }
        for bdf in members {
            symlink(dir + "/devices/\(bdf)", to: "../../../../devices/pci0000:00/\(bdf)")
            symlink("/sys/bus/pci/devices/\(bdf)/iommu_group", to: "../../../kernel/iommu_groups/\(number)")
        }
    }
}
