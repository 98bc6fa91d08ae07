#if canImport(Glibc)
import Glibc
#endif
import Logging
import SystemPackage
import TestSupport
import Testing
import VirtioCore
import VirtioPCI
import VirtioQueue
@testable import PlatformLinux

/// A logger that drops everything (the sources log at info and warning).
let quietLogger = Logger(label: "balloond.test.vfio", factory: { _ in SwiftLogNoOpLogHandler() })

/// A balloon at 0000:00:03.0 bound to vfio-pci in IOMMU group 7 (a fake sysfs tree), and a
/// fake vfio kernel that knows the group and the device.
final class VFIORig {
    let bdf = PCIAddress("0000:00:03.0")!
    let tree = FakeTree()
    let kernel: FakeVFIOKernel

    init(msixVectors: UInt32 = 3, bar4Mappable: Bool = true, bar4: MMIORegion? = nil, group: Bool = true) {
        kernel = FakeVFIOKernel.balloon(bdf: bdf.bdf, group: 7, msixVectors: msixVectors, bar4Mappable: bar4Mappable, bar4: bar4)
        tree.pciDevice(bdf.bdf, vendor: 0x1af4, device: 0x1045, driver: vfioPCIDriver, resources: balloonResources)
        if group { tree.iommuGroup(7, members: [bdf.bdf]) }
    }

    func open() throws(VFIOError) -> VFIODevice {
        try VFIODevice(address: bdf, kernel: kernel, root: tree.root, logger: quietLogger)
    }

    /// The error `open` throws (nil: it opened).
    func openError() -> VFIOError? {
        do { _ = try open(); return nil } catch { return error }
    }
}

// MARK: - parseIOMMUInfo

/// A `vfio_iommu_type1_info` buffer as the kernel fills it (docs/vfio.md §1).
private struct InfoBuffer {
    var bytes: [UInt8]
    init(size: Int, flags: UInt32, pageSizes: UInt64, capOffset: UInt32) {
        bytes = [UInt8](repeating: 0, count: size)
        put32(UInt32(size), at: 0)
        put32(flags, at: 4)
        put64(pageSizes, at: 8)
        put32(capOffset, at: 16)
    }
    mutating func put16(_ v: UInt16, at o: Int) { for i in 0..<2 { bytes[o + i] = UInt8(truncatingIfNeeded: v >> (8 * UInt16(i))) } }
    mutating func put32(_ v: UInt32, at o: Int) { for i in 0..<4 { bytes[o + i] = UInt8(truncatingIfNeeded: v >> (8 * UInt32(i))) } }
    mutating func put64(_ v: UInt64, at o: Int) { for i in 0..<8 { bytes[o + i] = UInt8(truncatingIfNeeded: v >> (8 * UInt64(i))) } }
    /// A capability header {id, version 1, next} at `o`.
    mutating func cap(at o: Int, id: UInt16, next: UInt32) {
        put16(id, at: o)
        put16(1, at: o + 2)
        put32(next, at: o + 4)
    }
    /// The IOVA-range capability at `o` with `ranges` ({start, end} inclusive).
    mutating func iovaRanges(at o: Int, next: UInt32 = 0, count: UInt32? = nil, _ ranges: [(UInt64, UInt64)]) {
        cap(at: o, id: 1, next: next)
        put32(count ?? UInt32(ranges.count), at: o + 8)
        for (i, r) in ranges.enumerated() {
            put64(r.0, at: o + 16 + 16 * i)
            put64(r.1, at: o + 24 + 16 * i)
        }
    }
}

private let vtdRanges: [(UInt64, UInt64)] = [(0, 0xfedf_ffff), (0xfef0_0000, 0x7f_ffff_ffff)]

@Suite("parseIOMMUInfo: vfio_iommu_type1_info and its capability chain")
struct ParseIOMMUInfoTests {
    @Test("iova_pgsizes is read at offset 8 when PGSIZES is set; its lowest bit is the mapping granule")
    func pageSizes() {
        let b = InfoBuffer(size: 24, flags: 0x1, pageSizes: 0x4020_1000, capOffset: 0)
        let info = parseIOMMUInfo(b.bytes)
        #expect(info.pageSizes == 0x4020_1000)
        #expect(info.minimumPageSize == 4096)
        #expect(info.iovaRanges.isEmpty)
        // Without the PGSIZES flag the field is not trusted, and the granule defaults to 4 KiB.
        let none = parseIOMMUInfo(InfoBuffer(size: 24, flags: 0, pageSizes: 0x20_0000, capOffset: 0).bytes)
        #expect(none.pageSizes == 0 && none.minimumPageSize == 4096)
        // A 2 MiB-only IOMMU has a 2 MiB granule.
        #expect(parseIOMMUInfo(InfoBuffer(size: 24, flags: 0x1, pageSizes: 0x20_0000, capOffset: 0).bytes).minimumPageSize == 0x20_0000)
    }

    @Test("the IOVA-range capability's two windows are read with inclusive ends")
    func twoRanges() {
        var b = InfoBuffer(size: 24 + 16 + 32, flags: 0x3, pageSizes: 0x1000, capOffset: 24)
        b.iovaRanges(at: 24, vtdRanges)
        let info = parseIOMMUInfo(b.bytes)
        #expect(info.iovaRanges == [0...0xfedf_ffff, 0xfef0_0000...0x7f_ffff_ffff])
        #expect(info.iovaRanges[0].contains(0xfedf_ffff), "end is inclusive")
    }

    @Test("a capability of another kind is skipped by following next")
    func chainedAfterAnotherCapability() {
        var b = InfoBuffer(size: 24 + 16 + 16 + 32, flags: 0x3, pageSizes: 0x1000, capOffset: 24)
        b.cap(at: 24, id: 3, next: 40)  // DMA_AVAIL
        b.put32(65535, at: 32)
        b.iovaRanges(at: 40, vtdRanges)
        #expect(parseIOMMUInfo(b.bytes).iovaRanges.count == 2)
    }

    @Test("without the CAPS flag the chain is not walked")
    func capsFlagRequired() {
        var b = InfoBuffer(size: 24 + 16 + 32, flags: 0x1, pageSizes: 0x1000, capOffset: 24)
        b.iovaRanges(at: 24, vtdRanges)
        #expect(parseIOMMUInfo(b.bytes).iovaRanges.isEmpty)
    }

    @Test("a chain that loops ends the walk, keeping what was read once")
    func loopingChain() {
        // The range capability points back at itself.
        var selfLoop = InfoBuffer(size: 24 + 16 + 32, flags: 0x3, pageSizes: 0x1000, capOffset: 24)
        selfLoop.iovaRanges(at: 24, next: 24, vtdRanges)
        #expect(parseIOMMUInfo(selfLoop.bytes).iovaRanges.count == 2)
        // Two capabilities pointing at each other.
        var pair = InfoBuffer(size: 24 + 16 + 32 + 8, flags: 0x3, pageSizes: 0x1000, capOffset: 24)
        pair.iovaRanges(at: 24, next: 72, vtdRanges)
        pair.cap(at: 72, id: 3, next: 24)
        #expect(parseIOMMUInfo(pair.bytes).iovaRanges.count == 2)
    }

    @Test("a truncated buffer yields what fits: a cut range list, a capability offset past the end, a short header")
    func truncated() {
        var b = InfoBuffer(size: 24 + 16 + 32, flags: 0x3, pageSizes: 0x1000, capOffset: 24)
        b.iovaRanges(at: 24, vtdRanges)
        // nr_iovas says 2; the buffer ends inside the second pair.
        let cut = parseIOMMUInfo(Array(b.bytes.prefix(24 + 16 + 16 + 8)))
        #expect(cut.iovaRanges == [0...0xfedf_ffff])
        // A huge nr_iovas stops at the end of the buffer.
        var lying = b
        lying.put32(0xffff_ffff, at: 32)
        #expect(parseIOMMUInfo(lying.bytes).iovaRanges.count == 2)
        // cap_offset beyond the buffer: page sizes stay, no ranges.
        let far = parseIOMMUInfo(InfoBuffer(size: 24, flags: 0x3, pageSizes: 0x1000, capOffset: 4096).bytes)
        #expect(far.pageSizes == 0x1000 && far.iovaRanges.isEmpty)
        // Shorter than the fixed header.
        #expect(parseIOMMUInfo(Array(b.bytes.prefix(10))) == VFIOIOMMUInfo(pageSizes: 0, iovaRanges: []))
        #expect(parseIOMMUInfo([]) == VFIOIOMMUInfo(pageSizes: 0, iovaRanges: []))
    }

    @Test("a range whose start is past its end ends the list")
    func invertedRange() {
        var b = InfoBuffer(size: 24 + 16 + 48, flags: 0x3, pageSizes: 0x1000, capOffset: 24)
        b.iovaRanges(at: 24, [(0, 0xfff), (0x5000, 0x4000), (0x10000, 0x1ffff)])
        #expect(parseIOMMUInfo(b.bytes).iovaRanges == [0...0xfff])
    }
}

// MARK: - VFIOIOMMUInfo.allows

@Suite("VFIOIOMMUInfo.allows: a mapping must lie inside one usable IOVA window")
struct IOMMUWindowTests {
    let vtd = VFIOIOMMUInfo(pageSizes: 0x1000, iovaRanges: [0...0xfedf_ffff, 0xfef0_0000...0x7f_ffff_ffff])

    @Test("mappings that end exactly at a window's inclusive end are allowed; one byte more is not")
    func windowEdges() {
        #expect(vtd.allows(iova: 0, size: 0x1000))
        #expect(vtd.allows(iova: 0xfedf_f000, size: 0x1000))
        #expect(!vtd.allows(iova: 0xfedf_f000, size: 0x1001))
        #expect(vtd.allows(iova: 0x7f_ffff_f000, size: 0x1000))
        #expect(!vtd.allows(iova: 0x7f_ffff_f000, size: 0x2000))
        #expect(!vtd.allows(iova: 0x80_0000_0000, size: 0x1000))
    }

    @Test("the MSI window 0xfee00000-0xfeefffff is refused, also when a mapping only crosses it")
    func msiHole() {
        #expect(!vtd.allows(iova: 0xfee0_0000, size: 0x1000))
        #expect(!vtd.allows(iova: 0xfeef_f000, size: 0x1000))
        #expect(vtd.allows(iova: 0xfef0_0000, size: 0x1000))
        // Both ends in usable windows, the middle in the hole.
        #expect(!vtd.allows(iova: 0xfedf_f000, size: 0x10_2000))
    }

    @Test("an empty size and a wrapping range are refused; no reported windows allow any non-wrapping range")
    func emptyAndWrapping() {
        #expect(!vtd.allows(iova: 0x1000, size: 0))
        let open = VFIOIOMMUInfo(pageSizes: 0x1000, iovaRanges: [])
        #expect(open.allows(iova: 0xfee0_0000, size: 0x1000))
        #expect(open.allows(iova: UInt64.max - 0xfff, size: 0x1000))
        #expect(!open.allows(iova: UInt64.max - 0xfff, size: 0x2000))
    }
}

// MARK: - IOMMU groups in sysfs

@Suite("IOMMUGroup from sysfs")
struct IOMMUGroupTests {
    @Test("the group number comes from the iommu_group link, members and their drivers from the group's devices")
    func readsGroup() throws {
        let t = FakeTree()
        t.pciDevice("0000:00:03.0", vendor: 0x1af4, device: 0x1045, driver: "virtio-pci")
        t.pciDevice("0000:00:04.0", vendor: 0x8086, device: 0x10d3, driver: "e1000e")
        t.pciDevice("0000:00:05.0", vendor: 0x8086, device: 0x10d3)
        t.iommuGroup(12, type: "DMA-FQ", members: ["0000:00:03.0", "0000:00:04.0", "0000:00:05.0"])
        let g = try #require(try IOMMUGroup.of(PCIAddress("0000:00:03.0")!, root: t.root))
        #expect(g.number == 12)
        #expect(g.domainType == "DMA-FQ")
        #expect(g.members.map(\.description) == ["0000:00:03.0 (virtio-pci)", "0000:00:04.0 (e1000e)", "0000:00:05.0 (no driver)"])
        #expect(g.description == "group 12 (DMA-FQ): 0000:00:03.0 (virtio-pci), 0000:00:04.0 (e1000e), 0000:00:05.0 (no driver)")
    }

    @Test("no iommu_group link: no group (nil), not an error")
    func noGroup() throws {
        let t = FakeTree()
        t.pciDevice("0000:00:03.0", vendor: 0x1af4, device: 0x1045)
        #expect(try IOMMUGroup.of(PCIAddress("0000:00:03.0")!, root: t.root) == nil)
    }

    @Test("a link that does not end in a group number is a malformed-file error")
    func badLink() {
        let t = FakeTree()
        t.pciDevice("0000:00:03.0", vendor: 0x1af4, device: 0x1045)
        t.symlink("/sys/bus/pci/devices/0000:00:03.0/iommu_group", to: "../../../kernel/iommu_groups/seven")
        #expect(throws: PlatformError.self) { try IOMMUGroup.of(PCIAddress("0000:00:03.0")!, root: t.root) }
    }

    @Test("blockers: members on a normal driver block; the device itself, unbound members, vfio-pci and pci-stub do not")
    func blockers() {
        func m(_ bdf: String, _ driver: String?) -> IOMMUGroup.Member { IOMMUGroup.Member(address: PCIAddress(bdf)!, driver: driver) }
        let g = IOMMUGroup(number: 3, domainType: "DMA", members: [
            m("0000:00:03.0", "virtio-pci"), m("0000:00:04.0", "e1000e"), m("0000:00:05.0", nil),
            m("0000:00:06.0", "vfio-pci"), m("0000:00:07.0", "pci-stub"),
        ])
        #expect(g.blockers(besides: PCIAddress("0000:00:03.0")!) == [m("0000:00:04.0", "e1000e")])
    }

    @Test("blockers: a PCIe port (pcieport sets driver_managed_dma, docs/vfio.md §2) does not keep the group from vfio")
    func pcieportIsNoBlocker() {
        let g = IOMMUGroup(number: 3, domainType: "DMA", members: [
            IOMMUGroup.Member(address: PCIAddress("0000:00:1c.0")!, driver: "pcieport"),
            IOMMUGroup.Member(address: PCIAddress("0000:01:00.0")!, driver: "vfio-pci"),
        ])
        #expect(g.blockers(besides: PCIAddress("0000:01:00.0")!).isEmpty)
    }
}

// MARK: - VFIODevice open

@Suite("VFIODevice: opening container, group and device (docs/vfio.md §1)")
struct VFIODeviceOpenTests {
    @Test("the open sequence: container, API version, type1v2, group, viable, SET_CONTAINER, SET_IOMMU(3), GET_INFO, device fd, infos")
    func happyPath() throws {
        let rig = VFIORig()
        let d = try rig.open()
        let k = rig.kernel
        #expect(k.calls == [
            .openContainer, .apiVersion, .checkExtension(3), .openGroup(7), .groupStatus, .setContainer, .setIOMMU(3), .iommuInfo,
            .deviceDescriptor("0000:00:03.0"), .deviceInfo,
            .regionInfo(0), .regionInfo(1), .regionInfo(2), .regionInfo(3), .regionInfo(4), .regionInfo(5), .regionInfo(7),
        ])
        #expect(d.group.number == 7 && d.group.domainType == "DMA-FQ")
        #expect(d.iommu.iovaRanges == k.iovaRanges)
        #expect(d.iommu.minimumPageSize == 4096)
        #expect(d.barSizes == [nil, nil, nil, nil, 0x4000, nil])
        #expect(d.configRegion.size == 256 && d.configRegion.offset == 7 << 40)
        #expect(d.info.isPCI && !d.info.canReset)
        #expect(k.iommuType == VFIOConstant.type1v2IOMMU && k.groupAttached)
        #expect(d.descriptor.descriptor >= 0)
    }

    @Test("releasing the device closes its descriptors: the container goes, and the group can be opened again")
    func closesOnDeinit() throws {
        let rig = VFIORig()
        var d: VFIODevice? = try rig.open()
        try d!.map(virtualAddress: 0x10_0000, length: 0x1000, at: 0x10_0000)
        #expect(rig.kernel.containerOpen)
        d = nil
        #expect(!rig.kernel.containerOpen)
        // A second open while the first is held is refused; after release it works, and
        // starts without the old mappings (they went with the container).
        let again = try rig.open()
        #expect(rig.kernel.mappings.isEmpty && again.mappings.isEmpty)
        #expect(rig.openError().map { if case .groupUnavailable(7, _, let e) = $0 { return e.errno == .resourceBusy }; return false } == true)
        _ = d
    }

    @Test("/dev/vfio/N missing (ENOENT): the message says the device is not bound to vfio-pci")
    func groupMissing() throws {
        let rig = VFIORig()
        rig.kernel.groups = [:]
        let e = try #require(rig.openError())
        guard case .groupUnavailable(7, "0000:00:03.0", let sys) = e else { Issue.record("unexpected \(e)"); return }
        #expect(sys.errno == .noSuchFileOrDirectory)
        #expect(e.description.contains("/dev/vfio/7"))
        #expect(e.description.contains("0000:00:03.0 is not bound to vfio-pci"))
        #expect(!rig.kernel.calls.contains(.setContainer))
    }

    @Test("/dev/vfio/N busy (EBUSY): the message says another process holds the group")
    func groupBusy() throws {
        let rig = VFIORig()
        rig.kernel.groups[7]?.busy = true
        let e = try #require(rig.openError())
        guard case .groupUnavailable(7, _, let sys) = e else { Issue.record("unexpected \(e)"); return }
        #expect(sys.errno == .resourceBusy)
        #expect(e.description.contains("Another process"))
        #expect(e.description.contains("IOMMU group 7"))
    }

    @Test("a group that is not viable names the other member and its driver from sysfs, and what to do")
    func notViable() throws {
        let rig = VFIORig()
        rig.tree.pciDevice("0000:00:04.0", vendor: 0x8086, device: 0x10d3, driver: "e1000e")
        rig.tree.pciDevice("0000:00:05.0", vendor: 0x8086, device: 0x10d3)
        rig.tree.iommuGroup(7, members: ["0000:00:03.0", "0000:00:04.0", "0000:00:05.0"])
        rig.kernel.groups[7]?.viable = false
        let e = try #require(rig.openError())
        #expect(e == .groupNotViable(group: 7, blockers: [IOMMUGroup.Member(address: PCIAddress("0000:00:04.0")!, driver: "e1000e")]))
        #expect(e.description.contains("IOMMU group 7 is not viable"))
        #expect(e.description.contains("0000:00:04.0 (e1000e)"))
        #expect(!e.description.contains("0000:00:05.0"), "an unbound member does not block")
        #expect(e.description.contains("--backend uio"))
        // Refused before the group joins the container.
        #expect(!rig.kernel.calls.contains(.setContainer))
    }

    @Test("SET_IOMMU EPERM (no interrupt remapping): the message says to give the guest intremap=on")
    func noInterruptRemapping() throws {
        let rig = VFIORig()
        rig.kernel.setIOMMUError = .notPermitted
        let e = try #require(rig.openError())
        guard case .container("VFIO_SET_IOMMU", let sys) = e else { Issue.record("unexpected \(e)"); return }
        #expect(sys.errno == .notPermitted)
        #expect(e.description.contains("interrupt remapping"))
        #expect(e.description.contains("intremap=on"))
        // Another errno on another step is reported plainly.
        #expect(VFIOError.container(step: "VFIO_GROUP_SET_CONTAINER", sys).description.hasPrefix("VFIO_GROUP_SET_CONTAINER failed:"))
        #expect(!VFIOError.container(step: "VFIO_GROUP_SET_CONTAINER", sys).description.contains("intremap"))
    }

    @Test("no type1v2 extension: noType1, which says to load vfio_iommu_type1, and no group is opened")
    func noType1() throws {
        let rig = VFIORig()
        rig.kernel.extensions = [VFIOConstant.type1IOMMU]
        let e = try #require(rig.openError())
        #expect(e == .noType1)
        #expect(e.description.contains("vfio_iommu_type1"))
        #expect(!rig.kernel.calls.contains(.openGroup(7)))
    }

    @Test("no iommu_group link: noIOMMUGroup (suggests a virtual IOMMU or uio) before any vfio call")
    func noGroupLink() throws {
        let rig = VFIORig(group: false)
        let e = try #require(rig.openError())
        #expect(e == .noIOMMUGroup(bdf: "0000:00:03.0"))
        #expect(e.description.contains("virtual IOMMU") && e.description.contains("--backend uio"))
        #expect(rig.kernel.calls.isEmpty)
    }

    @Test("no /dev/vfio/vfio: noContainer, which says to load vfio-pci and run as root")
    func noContainer() throws {
        let rig = VFIORig()
        rig.kernel.containerOpenError = .noSuchFileOrDirectory
        let e = try #require(rig.openError())
        guard case .noContainer(let sys) = e else { Issue.record("unexpected \(e)"); return }
        #expect(sys.errno == .noSuchFileOrDirectory)
        #expect(e.description.contains("modprobe vfio-pci"))
    }

    @Test("another vfio API version is refused before any group is touched")
    func apiVersion() throws {
        let rig = VFIORig()
        rig.kernel.apiVersionValue = 1
        #expect(rig.openError() == .apiVersion(1))
        #expect(!rig.kernel.calls.contains(.openGroup(7)))
    }

    @Test("GET_DEVICE_FD failing names the step and the device")
    func deviceFDFails() throws {
        let rig = VFIORig()
        rig.kernel.failures[.deviceDescriptor] = .operationNotSupportedByDevice
        let e = try #require(rig.openError())
        guard case .device("0000:00:03.0", "VFIO_GROUP_GET_DEVICE_FD", let sys) = e else { Issue.record("unexpected \(e)"); return }
        #expect(sys.errno == .operationNotSupportedByDevice)
        #expect(e.description.hasPrefix("VFIO_GROUP_GET_DEVICE_FD for 0000:00:03.0 failed"))
    }

    @Test("a device that is not vfio-pci (no PCI flag, or without the config region) is refused")
    func unexpectedDevice() throws {
        let rig = VFIORig()
        rig.kernel.deviceInfoValue = VFIODeviceInfo(flags: 0, regionCount: 9, irqCount: 5)
        #expect(rig.openError() == .unexpectedDevice(bdf: "0000:00:03.0", info: rig.kernel.deviceInfoValue))
        let few = VFIORig()
        few.kernel.deviceInfoValue = VFIODeviceInfo(flags: 0x2, regionCount: 7, irqCount: 5)
        let e = try #require(few.openError())
        #expect(e == .unexpectedDevice(bdf: "0000:00:03.0", info: few.kernel.deviceInfoValue))
        #expect(e.description.contains("7 regions") && e.description.contains("9 regions"))
    }

    @Test("region info failing names GET_REGION_INFO")
    func regionInfoFails() throws {
        let rig = VFIORig()
        rig.kernel.failures[.regionInfo] = .invalidArgument
        let e = try #require(rig.openError())
        guard case .device(_, "VFIO_DEVICE_GET_REGION_INFO", _) = e else { Issue.record("unexpected \(e)"); return }
    }

    @Test("resetFunction issues VFIO_DEVICE_RESET; a device without a reset method reports the step")
    func reset() throws {
        let rig = VFIORig()
        let d = try rig.open()
        #expect(throws: VFIOError.self) { try d.resetFunction() }
        #expect(rig.kernel.calls.last == .resetDevice)
        rig.kernel.deviceInfoValue = VFIODeviceInfo(flags: 0x3, regionCount: 9, irqCount: 5)
        try d.resetFunction()
    }
}

// MARK: - The fake's own rules

@Suite("FakeVFIOKernel enforces vfio's ordering rules (so sequence tests mean something)")
struct FakeVFIOKernelRuleTests {
    @Test("SET_IOMMU before SET_CONTAINER, MAP_DMA before SET_IOMMU and a device fd before either are EINVAL")
    func ordering() throws {
        let k = FakeVFIOKernel.balloon()
        let c = try k.openContainer()
        let g = try k.openGroup(7)
        #expect(throws: SystemCallError(call: "VFIO_SET_IOMMU(3)", path: nil, errno: .invalidArgument)) { try k.setIOMMU(container: c, type: 3) }
        #expect(throws: SystemCallError(call: "VFIO_GROUP_GET_DEVICE_FD(0000:00:03.0)", path: nil, errno: .invalidArgument)) {
            _ = try k.deviceDescriptor(group: g, name: "0000:00:03.0")
        }
        try k.setContainer(group: g, container: c)
        #expect(throws: SystemCallError.self) { try k.mapDMA(container: c, virtualAddress: 0x1000, iova: 0x1000, size: 0x1000) }
        try k.setIOMMU(container: c, type: 3)
        try k.mapDMA(container: c, virtualAddress: 0x1000, iova: 0x1000, size: 0x1000)
        // A container ioctl on a group descriptor is ENOTTY.
        #expect(throws: SystemCallError(call: "VFIO_GET_API_VERSION", path: nil, errno: .inappropriateIOCTLForDevice)) { _ = try k.apiVersion(container: g) }
    }

    @Test("MAP_DMA overlapping is EEXIST; UNMAP bisecting a mapping is EINVAL; UNMAP of nothing returns 0; UNMAP of a span removes whole mappings")
    func mappingRules() throws {
        let k = FakeVFIOKernel.balloon()
        let c = try k.openContainer(), g = try k.openGroup(7)
        try k.setContainer(group: g, container: c)
        try k.setIOMMU(container: c, type: 3)
        try k.mapDMA(container: c, virtualAddress: 0x10000, iova: 0x10000, size: 0x4000)
        #expect(throws: SystemCallError(call: "VFIO_IOMMU_MAP_DMA(va 0x13000, iova 0x13000, 4096)", path: nil, errno: .fileExists)) {
            try k.mapDMA(container: c, virtualAddress: 0x13000, iova: 0x13000, size: 0x1000)
        }
        #expect(throws: SystemCallError.self) { _ = try k.unmapDMA(container: c, iova: 0x10000, size: 0x1000) }
        #expect(try k.unmapDMA(container: c, iova: 0x100000, size: 0x1000) == 0)
        try k.mapDMA(container: c, virtualAddress: 0x14000, iova: 0x14000, size: 0x1000)
        #expect(try k.unmapDMA(container: c, iova: 0, size: 0x100000) == 0x5000)
        #expect(k.mappings.isEmpty)
    }

    @Test("enabling MSI-X while the INTx trigger is set is EINVAL, as in vfio-pci")
    func oneInterruptType() throws {
        let k = FakeVFIOKernel.balloon()
        let c = try k.openContainer(), g = try k.openGroup(7)
        try k.setContainer(group: g, container: c)
        try k.setIOMMU(container: c, type: 3)
        let d = try k.deviceDescriptor(group: g, name: "0000:00:03.0")
        let e = try EventFD()
        try k.setIRQs(device: d, index: VFIOPCIIRQ.intx, .trigger(eventfds: [e.descriptor]))
        #expect(throws: SystemCallError.self) { try k.setIRQs(device: d, index: VFIOPCIIRQ.msix, .trigger(eventfds: [e.descriptor])) }
        try k.setIRQs(device: d, index: VFIOPCIIRQ.intx, .disable)
        try k.setIRQs(device: d, index: VFIOPCIIRQ.msix, .trigger(eventfds: [e.descriptor]))
        #expect(k.fire(index: VFIOPCIIRQ.msix, vector: 0))
        #expect(try e.take() == 1)
    }
}

// MARK: - DMA mappings

@Suite("VFIODevice DMA mappings: checked before they reach the kernel, unmapped exactly")
struct VFIODMATests {
    @Test("an aligned mapping inside a window reaches MAP_DMA and is remembered")
    func maps() throws {
        let rig = VFIORig()
        let d = try rig.open()
        try d.map(virtualAddress: 0x7f00_0000_0000, length: 0x20_0000, at: 0x1_0000_0000)
        #expect(rig.kernel.calls.last == .mapDMA(virtualAddress: 0x7f00_0000_0000, iova: 0x1_0000_0000, size: 0x20_0000))
        #expect(rig.kernel.mappings[0x1_0000_0000]?.size == 0x20_0000)
        #expect(d.mappings == [0x1_0000_0000: 0x20_0000])
    }

    @Test("a misaligned IOVA, length or virtual address, or length 0, is refused without a kernel call", arguments: [
        (UInt(0x10_0000), 0x1000, UInt64(0x10_0800)),
        (UInt(0x10_0000), 0x800, UInt64(0x10_0000)),
        (UInt(0x10_0010), 0x1000, UInt64(0x10_0000)),
        (UInt(0x10_0000), 0, UInt64(0x10_0000)),
    ])
    func misaligned(va: UInt, length: Int, iova: UInt64) throws {
        let rig = VFIORig()
        let d = try rig.open()
        let before = rig.kernel.calls.count
        do {
            try d.map(virtualAddress: va, length: length, at: iova)
            Issue.record("a misaligned mapping must be refused")
        } catch {
            guard case .badMapping(iova, UInt64(length), let reason) = error else { Issue.record("unexpected \(error)"); return }
            #expect(reason.contains("multiples of the IOMMU page (4096 bytes)"))
        }
        #expect(rig.kernel.calls.count == before)
        #expect(d.mappings.isEmpty)
    }

    @Test("a mapping outside the IOVA windows (the MSI hole, past the top) is refused without a kernel call", arguments: [
        UInt64(0xfee0_0000), UInt64(0xfedf_f000), UInt64(0x80_0000_0000),
    ])
    func outsideWindows(iova: UInt64) throws {
        let rig = VFIORig()
        let d = try rig.open()
        let before = rig.kernel.calls.count
        do {
            try d.map(virtualAddress: 0x10_0000, length: 0x2000, at: iova)
            Issue.record("must be refused")
        } catch {
            #expect(error == .badMapping(iova: iova, size: 0x2000, reason: "outside the IOMMU's usable IOVA ranges"))
            #expect(error.description.contains("cannot map 8192 bytes at IOVA 0x\(String(iova, radix: 16))"))
        }
        #expect(rig.kernel.calls.count == before)
    }

    @Test("an overlapping mapping is refused before MAP_DMA; an adjacent one is fine")
    func overlap() throws {
        let rig = VFIORig()
        let d = try rig.open()
        try d.map(virtualAddress: 0x10_0000, length: 0x4000, at: 0x10_0000)
        let before = rig.kernel.calls.count
        do {
            try d.map(virtualAddress: 0x20_0000, length: 0x4000, at: 0x10_2000)
            Issue.record("must be refused")
        } catch {
            guard case .badMapping(0x10_2000, 0x4000, let reason) = error else { Issue.record("unexpected \(error)"); return }
            #expect(reason.contains("overlaps the mapping at 0x100000 (+16384)"))
        }
        // A mapping that covers the existing one from below is refused too.
        #expect(throws: VFIOError.self) { try d.map(virtualAddress: 0x20_0000, length: 0x10000, at: 0xf_f000) }
        #expect(rig.kernel.calls.count == before, "the kernel's EEXIST is never reached")
        try d.map(virtualAddress: 0x20_0000, length: 0x1000, at: 0x10_4000)
        try d.map(virtualAddress: 0x30_0000, length: 0x1000, at: 0xf_f000)
        #expect(d.mappings.count == 3)
    }

    @Test("a kernel refusal of MAP_DMA is mapFailed with a hint for ENOSPC and ENOMEM; nothing is remembered")
    func kernelRefuses() throws {
        let rig = VFIORig()
        let d = try rig.open()
        for (errno, hint) in [(Errno.noSpace, "dma_entry_limit"), (Errno.noMemory, "RLIMIT_MEMLOCK"), (Errno.fileExists, "already mapped")] {
            rig.kernel.failures[.mapDMA] = errno
            do {
                try d.map(virtualAddress: 0x10_0000, length: 0x1000, at: 0x10_0000)
                Issue.record("must fail")
            } catch {
                guard case .mapFailed(0x10_0000, 0x1000, let sys) = error else { Issue.record("unexpected \(error)"); continue }
                #expect(sys.errno == errno)
                #expect(error.description.contains(hint))
            }
        }
        #expect(d.mappings.isEmpty)
    }

    @Test("unmap takes exactly what was mapped off the kernel and forgets it")
    func exactUnmap() throws {
        let rig = VFIORig()
        let d = try rig.open()
        try d.map(virtualAddress: 0x10_0000, length: 0x4000, at: 0x10_0000)
        try d.unmap(deviceAddress: 0x10_0000, length: 0x4000)
        #expect(rig.kernel.calls.last == .unmapDMA(iova: 0x10_0000, size: 0x4000))
        #expect(rig.kernel.mappings.isEmpty && d.mappings.isEmpty)
        // The range can be mapped again.
        try d.map(virtualAddress: 0x10_0000, length: 0x4000, at: 0x10_0000)
    }

    @Test("unmap of a range that is not exactly one mapping (part of one, unknown) is refused without a kernel call")
    func unmapOfUnknownRange() throws {
        let rig = VFIORig()
        let d = try rig.open()
        try d.map(virtualAddress: 0x10_0000, length: 0x4000, at: 0x10_0000)
        let before = rig.kernel.calls.count
        #expect(throws: VFIOError.badMapping(iova: 0x10_0000, size: 0x1000, reason: "no mapping of exactly this range")) {
            try d.unmap(deviceAddress: 0x10_0000, length: 0x1000)
        }
        #expect(throws: VFIOError.badMapping(iova: 0x50_0000, size: 0x1000, reason: "no mapping of exactly this range")) {
            try d.unmap(deviceAddress: 0x50_0000, length: 0x1000)
        }
        #expect(rig.kernel.calls.count == before)
        #expect(d.mappings == [0x10_0000: 0x4000])
    }

    @Test("a kernel that unmaps less than was mapped is unmapFailed with the count, and the mapping is kept as live")
    func partialUnmap() throws {
        let rig = VFIORig()
        let d = try rig.open()
        try d.map(virtualAddress: 0x10_0000, length: 0x4000, at: 0x10_0000)
        rig.kernel.unmapShortfall = 0x1000
        #expect(throws: VFIOError.unmapFailed(iova: 0x10_0000, size: 0x4000, unmapped: 0x3000, nil)) {
            try d.unmap(deviceAddress: 0x10_0000, length: 0x4000)
        }
        #expect(d.mappings == [0x10_0000: 0x4000], "not forgotten: the device may still reach it")
        #expect(VFIOError.unmapFailed(iova: 0x10_0000, size: 0x4000, unmapped: 0x3000, nil).description.contains("unmapped 12288 bytes"))
    }

    @Test("a mapping the kernel no longer has unmaps 0 bytes: unmapFailed(unmapped: 0)")
    func vanishedMapping() throws {
        let rig = VFIORig()
        let d = try rig.open()
        try d.map(virtualAddress: 0x10_0000, length: 0x1000, at: 0x10_0000)
        rig.kernel.forgetMapping(iova: 0x10_0000)
        #expect(throws: VFIOError.unmapFailed(iova: 0x10_0000, size: 0x1000, unmapped: 0, nil)) {
            try d.unmap(deviceAddress: 0x10_0000, length: 0x1000)
        }
    }

    @Test("UNMAP_DMA failing is unmapFailed with the error")
    func unmapErrors() throws {
        let rig = VFIORig()
        let d = try rig.open()
        try d.map(virtualAddress: 0x10_0000, length: 0x1000, at: 0x10_0000)
        rig.kernel.failures[.unmapDMA] = .invalidArgument
        do {
            try d.unmap(deviceAddress: 0x10_0000, length: 0x1000)
            Issue.record("must fail")
        } catch {
            guard case .unmapFailed(0x10_0000, 0x1000, nil, let sys?) = error else { Issue.record("unexpected \(error)"); return }
            #expect(sys.errno == .invalidArgument)
            #expect(error.description.contains("failed"))
        }
    }
}

// MARK: - Config space and BARs

@Suite("VFIOConfigSpace and mapBAR: through the device's regions")
struct VFIORegionTests {
    @Test("config reads and writes go to the config region's offset (7 << 40) plus the register")
    func configSpace() throws {
        let rig = VFIORig()
        let d = try rig.open()
        let cfg = d.configSpace()
        #expect(cfg.size == 256)
        #expect(try cfg.read16(at: 0) == 0x1af4)
        #expect(try cfg.read16(at: 2) == 0x1045)
        #expect(try cfg.read32(at: 0) == 0x1045_1af4)
        #expect(try cfg.read8(at: 3) == 0x10)
        #expect(rig.kernel.calls.contains(.read(offset: 7 << 40 | 2, count: 2)))
        try cfg.write16(0x0406, at: 4)
        #expect(rig.kernel.calls.last == .write(offset: 7 << 40 | 4, bytes: [0x06, 0x04]))
        #expect(rig.kernel.regionBytes[7]?[4] == 0x06 && rig.kernel.regionBytes[7]?[5] == 0x04)
        #expect(try cfg.read16(at: 4) == 0x0406)
    }

    @Test("out-of-range and misaligned config accesses are refused without a kernel call")
    func configBounds() throws {
        let rig = VFIORig()
        let d = try rig.open()
        let cfg = d.configSpace()
        let before = rig.kernel.calls.count
        #expect(throws: PCIError.self) { try cfg.read32(at: 256) }
        #expect(throws: PCIError.self) { try cfg.read32(at: 254) }
        #expect(throws: PCIError.self) { try cfg.read16(at: 1) }
        #expect(throws: PCIError.self) { try cfg.write16(0, at: 255) }
        #expect(throws: PCIError.self) { try cfg.read8(at: -1) }
        #expect(rig.kernel.calls.count == before)
    }

    @Test("a failing pread or pwrite of the config region is a config access error with the errno")
    func configErrors() throws {
        let rig = VFIORig()
        let d = try rig.open()
        rig.kernel.failures[.read] = .ioError
        do {
            _ = try d.configSpace().read16(at: 0)
            Issue.record("must fail")
        } catch {
            guard case .configAccess(0, let reason) = error, let p = reason as? ConfigSpaceProblem, case .readFailed(let e) = p else {
                Issue.record("unexpected \(error)"); return
            }
            #expect(e.errno == .ioError)
        }
        rig.kernel.failures[.write] = .ioError
        #expect(throws: PCIError.self) { try d.configSpace().write16(0, at: 4) }
    }

    @Test("a mappable BAR is mmap'ed whole through its region; accesses then need no pread/pwrite")
    func mapsMappableBAR() throws {
        let rig = VFIORig()
        let d = try rig.open()
        let bar = try d.mapBAR(4)
        #expect(rig.kernel.calls.last == .mapRegion(offset: 4 << 40, length: 0x4000))
        #expect(bar.length == 0x4000)
        let before = rig.kernel.calls.count
        bar.write32(0xdead_beef, at: 0x14)
        #expect(bar.read32(at: 0x14) == 0xdead_beef)
        #expect(Array(rig.kernel.regionBytes[4]![0x14..<0x18]) == [0xef, 0xbe, 0xad, 0xde])
        #expect(rig.kernel.calls.count == before)
    }

    @Test("the mmap returns the region's own backing (a register window)")
    func mapsMMIOBacking() throws {
        let window = RecordingWindow(length: 0x4000)
        let rig = VFIORig(bar4: window)
        let d = try rig.open()
        let bar = try d.mapBAR(4)
        #expect(bar === window)
    }

    @Test("a BAR vfio does not let us mmap is served by pread/pwrite at its region's offset")
    func preadFallback() throws {
        let rig = VFIORig(bar4Mappable: false)
        let d = try rig.open()
        let bar = try d.mapBAR(4)
        #expect(!rig.kernel.calls.contains { if case .mapRegion = $0 { return true }; return false })
        bar.write16(0xbeef, at: 0x10)
        #expect(rig.kernel.calls.last == .write(offset: 4 << 40 | 0x10, bytes: [0xef, 0xbe]))
        #expect(bar.read16(at: 0x10) == 0xbeef)
        #expect(rig.kernel.calls.last == .read(offset: 4 << 40 | 0x10, count: 2))
        bar.write8(0x5a, at: 0x3)
        bar.write32(0x0102_0304, at: 0x20)
        #expect(bar.read8(at: 0x3) == 0x5a)
        #expect(bar.read32(at: 0x20) == 0x0102_0304)
        // A failing read reads as all-ones, as a vanished device does.
        rig.kernel.failures[.read] = .ioError
        #expect(bar.read16(at: 0x10) == 0xffff)
        #expect(bar.read32(at: 0x20) == 0xffff_ffff)
    }

    @Test("an mmap that fails falls back to pread/pwrite")
    func mmapFailureFallsBack() throws {
        let rig = VFIORig()
        let d = try rig.open()
        rig.kernel.failures[.mapRegion] = .invalidArgument
        let bar = try d.mapBAR(4)
        bar.write16(0x1234, at: 0x8)
        #expect(rig.kernel.calls.last == .write(offset: 4 << 40 | 0x8, bytes: [0x34, 0x12]))
    }

    @Test("absent BARs, indexes outside 0-5, and regions neither mappable nor read-write are refused")
    func badBARs() throws {
        let rig = VFIORig()
        rig.kernel.regions[2] = VFIORegionInfo(index: 2, flags: 0x1, size: 0x1000, offset: 2 << 40)  // read-only, not mappable
        let d = try rig.open()
        #expect(throws: PCIError.bar(index: 0, reason: BARProblem.notImplemented(address: rig.bdf, index: 0))) { _ = try d.mapBAR(0) }
        #expect(throws: PCIError.bar(index: 6, reason: BARProblem.noSuchBAR)) { _ = try d.mapBAR(6) }
        #expect(throws: PCIError.bar(index: -1, reason: BARProblem.noSuchBAR)) { _ = try d.mapBAR(-1) }
        #expect(throws: PCIError.bar(index: 2, reason: VFIORegionProblem.notReadWrite(flags: 0x1))) { _ = try d.mapBAR(2) }
    }
}

/// A register window that stores what is written.
final class RecordingWindow: MMIORegion {
    let length: Int
    var bytes: [UInt8]
    init(length: Int) {
        self.length = length
        bytes = [UInt8](repeating: 0, count: length)
    }
    private func get(_ o: Int, _ w: Int) -> UInt32 { (0..<w).reduce(UInt32(0)) { $0 | UInt32(bytes[o + $1]) << (8 * UInt32($1)) } }
    private func set(_ o: Int, _ w: Int, _ v: UInt32) { for i in 0..<w { bytes[o + i] = UInt8(truncatingIfNeeded: v >> (8 * UInt32(i))) } }
    func read8(at offset: Int) -> UInt8 { UInt8(get(offset, 1)) }
    func read16(at offset: Int) -> UInt16 { UInt16(get(offset, 2)) }
    func read32(at offset: Int) -> UInt32 { get(offset, 4) }
    func write8(_ value: UInt8, at offset: Int) { set(offset, 1, UInt32(value)) }
    func write16(_ value: UInt16, at offset: Int) { set(offset, 2, UInt32(value)) }
    func write32(_ value: UInt32, at offset: Int) { set(offset, 4, value) }
}

// MARK: - Interrupts

@Suite("VFIOINTxLine: one eventfd on IRQ index 0, unmasked with ACTION_UNMASK")
struct VFIOINTxTests {
    @Test("setup asks for the INTx info and sets one eventfd trigger on index 0 (the line's poll descriptor)")
    func setUp() throws {
        let rig = VFIORig()
        let d = try rig.open()
        let line = try VFIOINTxLine(device: d)
        let fd = try #require(line.pollDescriptor)
        #expect(rig.kernel.calls.suffix(2) == [.irqInfo(0), .setIRQs(index: 0, .trigger(eventfds: [fd]))])
        #expect(rig.kernel.triggers[VFIOPCIIRQ.intx] == [fd])
        #expect(line.takeCauses() == [], "INTx causes come from the ISR")
    }

    @Test("wait returns false on a timeout of 0, true once the kernel signals, and consumes the signal")
    func waitAndFire() throws {
        let rig = VFIORig()
        let line = try VFIOINTxLine(device: try rig.open())
        #expect(try line.wait(timeoutMilliseconds: 0) == false)
        #expect(rig.kernel.fire(index: VFIOPCIIRQ.intx))
        #expect(rig.kernel.fire(index: VFIOPCIIRQ.intx))
        #expect(try line.wait(timeoutMilliseconds: 0) == true)
        #expect(try line.wait(timeoutMilliseconds: 0) == false, "two signals are taken by one wait")
    }

    @Test("unmask is SET_IRQS ACTION_UNMASK on index 0")
    func unmask() throws {
        let rig = VFIORig()
        let line = try VFIOINTxLine(device: try rig.open())
        try line.unmask()
        #expect(rig.kernel.calls.last == .setIRQs(index: 0, .unmask))
        #expect(rig.kernel.unmaskCount == 1)
        rig.kernel.failures[.setIRQs] = .invalidArgument
        #expect(throws: TransportError.self) { try line.unmask() }
    }

    @Test("releasing the line disables index 0")
    func deinitDisables() throws {
        let rig = VFIORig()
        var line: VFIOINTxLine? = try VFIOINTxLine(device: try rig.open())
        line = nil
        #expect(rig.kernel.lastIRQAction[VFIOPCIIRQ.intx] == .disable)
        #expect(rig.kernel.triggers[VFIOPCIIRQ.intx] == nil)
        _ = line
    }

    @Test("a function without an INTx pin, or a failing SET_IRQS, is an interrupts error naming INTx")
    func failures() throws {
        let rig = VFIORig()
        rig.kernel.irqs[VFIOPCIIRQ.intx] = VFIOIRQInfo(index: 0, flags: 0x1, count: 0)
        let d = try rig.open()
        do {
            _ = try VFIOINTxLine(device: d)
            Issue.record("must fail")
        } catch {
            guard case .interrupts(0, let reason, nil) = error else { Issue.record("unexpected \(error)"); return }
            #expect(reason.contains("no INTx pin"))
            #expect(error.description.hasPrefix("INTx:"))
        }
        rig.kernel.irqs[VFIOPCIIRQ.intx] = VFIOIRQInfo(index: 0, flags: 0x7, count: 1)
        rig.kernel.failures[.setIRQs] = .resourceBusy
        #expect(throws: VFIOError.self) { _ = try VFIOINTxLine(device: d) }
    }
}

@Suite("VFIOMSIXLine: one eventfd per vector in an epoll set")
struct VFIOMSIXTests {
    @Test("the vector plan follows the table size, and SET_IRQS enables that many eventfds on index 2", arguments: [
        (UInt32(3), 2, 3), (UInt32(8), 5, 6), (UInt32(2), 5, 2), (UInt32(1), 3, 1),
    ])
    func planFromTable(table: UInt32, queues: Int, vectors: Int) throws {
        let rig = VFIORig(msixVectors: table)
        let line = try VFIOMSIXLine(device: try rig.open(), queueCount: queues)
        #expect(line.plan == MSIXVectorPlan(tableSize: Int(table), queueCount: queues))
        #expect(line.plan.vectorCount == vectors)
        guard case .setIRQs(2, .trigger(let fds))? = rig.kernel.calls.last else { Issue.record("no MSI-X enable"); return }
        #expect(fds.count == vectors)
        #expect(Set(fds).count == vectors && !fds.contains(line.pollDescriptor!), "distinct eventfds, none of them the epoll descriptor")
    }

    @Test("takeCauses: the config vector is a config change, any other vector a queue notification")
    func causes() throws {
        let rig = VFIORig(msixVectors: 4)
        let line = try VFIOMSIXLine(device: try rig.open(), queueCount: 3)
        #expect(try line.wait(timeoutMilliseconds: 0) == false)
        #expect(line.takeCauses() == [])

        rig.kernel.fire(index: VFIOPCIIRQ.msix, vector: 0)
        #expect(try line.wait(timeoutMilliseconds: 0))
        #expect(line.takeCauses() == [.configChange])
        #expect(line.takeCauses() == [], "taken once")

        rig.kernel.fire(index: VFIOPCIIRQ.msix, vector: 2)
        #expect(try line.wait(timeoutMilliseconds: 0))
        #expect(line.takeCauses() == [.queue])

        rig.kernel.fire(index: VFIOPCIIRQ.msix, vector: 3)
        rig.kernel.fire(index: VFIOPCIIRQ.msix, vector: 0)
        #expect(try line.wait(timeoutMilliseconds: 0))
        #expect(line.takeCauses() == [.configChange, .queue])
        #expect(try line.wait(timeoutMilliseconds: 0) == false, "every eventfd was drained")
    }

    @Test("the poll descriptor becomes readable when a vector fires")
    func pollDescriptorReadable() throws {
        let rig = VFIORig()
        let line = try VFIOMSIXLine(device: try rig.open(), queueCount: 2)
        var pfd = pollfd(fd: line.pollDescriptor!, events: Int16(POLLIN), revents: 0)
        #expect(poll(&pfd, 1, 0) == 0)
        rig.kernel.fire(index: VFIOPCIIRQ.msix, vector: 1)
        #expect(poll(&pfd, 1, 0) == 1)
        try line.unmask()  // nothing to unmask for MSI-X: no call
        #expect(rig.kernel.unmaskCount == 0)
    }

    @Test("with one vector shared by config and queues, a firing may be either: both causes are reported")
    func singleSharedVector() throws {
        let rig = VFIORig(msixVectors: 1)
        let line = try VFIOMSIXLine(device: try rig.open(), queueCount: 3)
        #expect(line.plan.vector(forQueue: 0) == line.plan.configVector)
        rig.kernel.fire(index: VFIOPCIIRQ.msix, vector: 0)
        #expect(try line.wait(timeoutMilliseconds: 0))
        let causes = line.takeCauses()
        #expect(causes.contains(.configChange))
        #expect(causes.contains(.queue))
    }

    @Test("releasing the line disables index 2")
    func deinitDisables() throws {
        let rig = VFIORig()
        var line: VFIOMSIXLine? = try VFIOMSIXLine(device: try rig.open(), queueCount: 2)
        #expect(rig.kernel.triggers[VFIOPCIIRQ.msix]?.count == 3)
        line = nil
        #expect(rig.kernel.lastIRQAction[VFIOPCIIRQ.msix] == .disable)
        #expect(rig.kernel.triggers[VFIOPCIIRQ.msix] == nil)
        _ = line
    }

    @Test("MSI-X cannot be enabled while the INTx trigger is set; once INTx is released it can")
    func exclusiveWithINTx() throws {
        let rig = VFIORig()
        let d = try rig.open()
        var intx: VFIOINTxLine? = try VFIOINTxLine(device: d)
        do {
            _ = try VFIOMSIXLine(device: d, queueCount: 2)
            Issue.record("must fail while INTx is on")
        } catch {
            guard case .interrupts(2, let reason, let sys?) = error else { Issue.record("unexpected \(error)"); return }
            #expect(sys.errno == .invalidArgument)
            #expect(reason.contains("enable 3 vectors"))
            #expect(error.description.hasPrefix("MSI-X:"))
        }
        intx = nil
        _ = try VFIOMSIXLine(device: d, queueCount: 2)
        _ = intx
    }

    @Test("a function without an MSI-X table is an interrupts error")
    func noTable() throws {
        let rig = VFIORig(msixVectors: 0)
        let d = try rig.open()
        #expect(throws: VFIOError.interrupts(index: 2, reason: "the function has no MSI-X table", nil)) { _ = try VFIOMSIXLine(device: d, queueCount: 2) }
    }
}

@Suite("MSIXVectorPlan: vector 0 for config, then per-queue, shared, or everything on 0")
struct MSIXVectorPlanTests {
    @Test("a table with room for 1 + queues gives each queue its own vector after the config vector", arguments: [(3, 2), (4, 3), (64, 5), (6, 5)])
    func perQueue(table: Int, queues: Int) {
        let p = MSIXVectorPlan(tableSize: table, queueCount: queues)
        #expect(p.vectorCount == 1 + queues)
        #expect(p.configVector == 0)
        #expect((0..<UInt16(queues)).map(p.vector(forQueue:)) == (1...UInt16(queues)).map { $0 })
    }

    @Test("a smaller table with at least 2 vectors shares vector 1 among the queues", arguments: [(2, 3), (5, 5), (3, 5)])
    func shared(table: Int, queues: Int) {
        let p = MSIXVectorPlan(tableSize: table, queueCount: queues)
        #expect(p.vectorCount == 2)
        #expect((0..<UInt16(queues)).allSatisfy { p.vector(forQueue: $0) == 1 })
    }

    @Test("one vector: config and every queue on vector 0")
    func single() {
        let p = MSIXVectorPlan(tableSize: 1, queueCount: 5)
        #expect(p.vectorCount == 1)
        #expect((0..<5).allSatisfy { p.vector(forQueue: $0) == 0 })
        #expect(p.configVector == 0)
    }
}

// MARK: - PageDMAAllocator through the IOMMU

/// A pagemap that reports every page present at a made-up PFN (no CAP_SYS_ADMIN needed).
final class FakePagemap: PagemapReading {
    let pageSize = 4096
    var next: UInt64 = 0x1_2340
    var pfns: [UInt: UInt64] = [:]
    /// After this many lookups of a page, it reports this PFN (a page migrated under the mapping).
    var moveOnSecondLookup: UInt64?
    private var lookups: [UInt: Int] = [:]
    func entries(forVirtual virtualAddress: UInt, count: Int) throws(PlatformError) -> [PagemapEntry] {
        (0..<count).map { i in
            let va = (virtualAddress & ~UInt(pageSize - 1)) + UInt(i * pageSize)
            lookups[va, default: 0] += 1
            if lookups[va]! >= 2, let moved = moveOnSecondLookup { return PagemapEntry(rawValue: 1 << 63 | moved) }
            if pfns[va] == nil { pfns[va] = next; next += 1 }
            return PagemapEntry(rawValue: 1 << 63 | pfns[va]!)
        }
    }
}

/// A migration hold that only counts.
final class CountingHold: MigrationHold {
    var held = 0
    func acquire() throws(MigrationHoldError) { held += 1 }
    func release() { held -= 1 }
}

@Suite("PageDMAAllocator with a vfio device mapper: each page mapped at IOVA = GPA, unmapped before it is freed")
struct PageDMAThroughIOMMUTests {
    @Test("a page is mapped at its guest-physical address and unmapped when its region is released")
    func mapsAtGPA() throws {
        let rig = VFIORig()
        let d = try rig.open()
        let hold = CountingHold()
        let a = PageDMAAllocator(pagemap: FakePagemap(), migrationHold: hold, arena: try DeviceMemoryArena(), deviceMapper: d)
        var region: DMARegion? = try a.allocate(byteCount: 64, alignment: 16)
        let gpa = region!.physicalAddress.value
        let page = try #require(a.livePageAddresses.first)
        #expect(gpa == page.pfn * 4096)
        #expect(rig.kernel.mappings[gpa]?.virtualAddress == page.virtual)
        #expect(rig.kernel.mappings[gpa]?.size == 4096)
        region = nil
        #expect(rig.kernel.mappings.isEmpty)
        #expect(rig.kernel.calls.last == .unmapDMA(iova: gpa, size: 4096))
        #expect(a.livePages == 0 && hold.held == 0)
        _ = region
    }

    @Test("a page whose IOVA is refused is not handed out, and its hold is released")
    func mapRefused() throws {
        let rig = VFIORig()
        rig.kernel.iovaRanges = [0...0xfff]  // nothing a made-up PFN lands in
        let d = try rig.open()
        let hold = CountingHold()
        let a = PageDMAAllocator(pagemap: FakePagemap(), migrationHold: hold, arena: try DeviceMemoryArena(), deviceMapper: d)
        do {
            _ = try a.allocate(byteCount: 64, alignment: 16)
            Issue.record("must fail")
        } catch {
            guard case .platform(let reason) = error, let m = reason as? DMAMemoryError, case .iommuMapFailed(.badMapping) = m else {
                Issue.record("unexpected \(error)"); return
            }
        }
        #expect(a.livePages == 0 && hold.held == 0)
    }

    @Test("a page that moved while being pinned is unmapped again and refused")
    func movedWhilePinned() throws {
        let rig = VFIORig()
        let d = try rig.open()
        let pagemap = FakePagemap()
        pagemap.moveOnSecondLookup = 0x9_9999
        let a = PageDMAAllocator(pagemap: pagemap, migrationHold: CountingHold(), arena: try DeviceMemoryArena(), deviceMapper: d)
        #expect(throws: DMAError.self) { _ = try a.allocate(byteCount: 64, alignment: 16) }
        #expect(rig.kernel.mappings.isEmpty && d.mappings.isEmpty)
        #expect(rig.kernel.calls.contains { if case .unmapDMA = $0 { return true }; return false })
    }

    @Test("a page the kernel does not fully unmap is kept (mapped and live), never freed under the device")
    func keptWhenUnmapFails() throws {
        let rig = VFIORig()
        let d = try rig.open()
        let hold = CountingHold()
        let a = PageDMAAllocator(pagemap: FakePagemap(), migrationHold: hold, arena: try DeviceMemoryArena(), deviceMapper: d)
        var region: DMARegion? = try a.allocate(byteCount: 64, alignment: 16)
        rig.kernel.failures[.unmapDMA] = .invalidArgument
        region = nil
        #expect(a.livePages == 1 && hold.held == 1)
        #expect(d.mappings.count == 1)
        _ = region
    }
}
