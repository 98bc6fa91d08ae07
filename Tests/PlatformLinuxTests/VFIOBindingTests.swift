import TestSupport
import Testing
@testable import PlatformLinux

/// FakeKernel plus what vfio-pci does: drivers_probe with driver_override=vfio-pci binds it
/// (unless `vfioAcceptsDevices` is false), and the vfio modules can be modprobed.
final class VFIOBindingKernel: KernelControl {
    let tree: FakeTree
    let inner: FakeKernel
    var vfioAcceptsDevices = true

    init(tree: FakeTree) {
        self.tree = tree
        inner = FakeKernel(tree: tree)
        inner.modprobeable = ["uio", "uio_pci_generic", "vfio", "vfio_iommu_type1", "vfio_pci"]
    }

    var writes: [FakeKernel.Write] { inner.writes }
    var commands: [[String]] { inner.commands }

    func writeAttribute(_ path: String, _ value: String) throws(PlatformError) {
        try inner.writeAttribute(path, value)
        guard path == tree.at("/sys/bus/pci/drivers_probe") else { return }
        let override = tree.read("/sys/bus/pci/devices/\(value)/driver_override")?.trimmingNewline
        guard override == vfioPCIDriver else { return }
        guard vfioAcceptsDevices else { throw .system(SystemCallError(call: "write", path: path, errno: .invalidArgument)) }
        tree.bindLink(value, vfioPCIDriver)
    }

    func runCommand(_ program: String, _ arguments: [String]) -> CommandResult { inner.runCommand(program, arguments) }

    func makeCharacterDevice(_ path: String, major: UInt32, minor: UInt32) throws(PlatformError) {
        try inner.makeCharacterDevice(path, major: major, minor: minor)
    }
}

@Suite("DriverBinder.bindVFIO and restore: vfio-pci through driver_override")
struct VFIOBindingTests {
    let bdf = PCIAddress("0000:00:03.0")!
    let stateFile = "/run/balloond/0000:00:03.0.driver"

    func setUp(driver: String? = "virtio-pci", group: Bool = true) -> (FakeTree, VFIOBindingKernel, DriverBinder) {
        let t = FakeTree()
        t.pciDevice(bdf.bdf, vendor: 0x1af4, device: 0x1045, driver: driver, resources: balloonResources)
        t.pciDriver("virtio-pci")
        t.file("/sys/bus/pci/drivers_probe", "")
        t.directory("/dev")
        if group { t.iommuGroup(7, members: [bdf.bdf]) }
        let k = VFIOBindingKernel(tree: t)
        let b = DriverBinder(root: t.root, kernel: k, kernelRelease: "6.1.0-test", logger: quietLogger)
        b.deviceNodeWait = (0, 0)
        return (t, k, b)
    }

    @Test("bindVFIO loads the vfio modules, unbinds virtio-pci, binds through driver_override=vfio-pci and saves virtio-pci")
    func binds() throws {
        let (t, k, b) = setUp()
        let binding = try b.bindVFIO(bdf)
        #expect(k.commands == [["modprobe", "vfio"], ["modprobe", "vfio_iommu_type1"], ["modprobe", "vfio_pci"]])
        #expect(k.writes == [
            .init(path: "/sys/bus/pci/drivers/virtio-pci/unbind", value: "0000:00:03.0"),
            .init(path: "/sys/bus/pci/devices/0000:00:03.0/driver_override", value: "vfio-pci"),
            .init(path: "/sys/bus/pci/drivers_probe", value: "0000:00:03.0"),
        ])
        #expect(binding == VFIOBinding(address: bdf, group: 7, previousDriver: "virtio-pci"))
        #expect(binding.description == "0000:00:03.0 bound to vfio-pci in IOMMU group 7 (previous driver: virtio-pci)")
        #expect(try b.currentDriver(of: bdf) == "vfio-pci")
        #expect(t.read(stateFile) == "virtio-pci\n")
    }

    @Test("a device already on vfio-pci without balloond's state file is a VM's: refused before anything changes")
    func refusesForeignVFIO() {
        let (t, k, b) = setUp(driver: "vfio-pci")
        #expect(throws: PlatformError.foreignDriver(bdf: "0000:00:03.0", driver: "vfio-pci")) { try b.bindVFIO(bdf) }
        #expect(throws: PlatformError.foreignDriver(bdf: "0000:00:03.0", driver: "vfio-pci")) { try b.bind(bdf) }
        #expect(k.writes.isEmpty && k.commands.isEmpty)
        #expect(!t.exists(stateFile))
    }

    @Test("with force, a device on a foreign vfio-pci binding is used as it is (nothing to unbind, no previous driver)")
    func forceTakesForeignVFIO() throws {
        let (_, k, b) = setUp(driver: "vfio-pci")
        let binding = try b.bindVFIO(bdf, force: true)
        #expect(binding.previousDriver == nil)
        #expect(k.writes.isEmpty)
        #expect(try b.currentDriver(of: bdf) == "vfio-pci")
    }

    @Test("a device on vfio-pci with balloond's state file is its own: accepted without force, the saved driver kept")
    func acceptsOwnVFIO() throws {
        let (t, k, b) = setUp(driver: "vfio-pci")
        t.stateFile(stateFile, "virtio-pci\n")
        let binding = try b.bindVFIO(bdf)
        #expect(binding.previousDriver == "virtio-pci")
        #expect(k.writes.isEmpty)
        #expect(t.read(stateFile) == "virtio-pci\n")
    }

    @Test("switching a device balloond left on vfio-pci to uio keeps the driver saved first, not vfio-pci")
    func uioAfterOwnVFIO() throws {
        let (t, k, b) = setUp(driver: "vfio-pci")
        t.stateFile(stateFile, "virtio-pci\n")
        let binding = try b.bind(bdf)
        #expect(binding.previousDriver == "virtio-pci")
        #expect(k.writes.first == .init(path: "/sys/bus/pci/drivers/vfio-pci/unbind", value: "0000:00:03.0"))
        #expect(try b.currentDriver(of: bdf) == "uio_pci_generic")
        #expect(t.read(stateFile) == "virtio-pci\n")
        // And back to vfio-pci: still virtio-pci.
        #expect(try b.bindVFIO(bdf).previousDriver == "virtio-pci")
        #expect(t.read(stateFile) == "virtio-pci\n")
    }

    @Test("restore in a later process unbinds vfio-pci, clears the override, rebinds the saved driver and removes the state file")
    func restore() throws {
        let (t, _, b) = setUp()
        _ = try b.bindVFIO(bdf)
        let k2 = VFIOBindingKernel(tree: t)
        let later = DriverBinder(root: t.root, kernel: k2, kernelRelease: "6.1.0-test", logger: quietLogger)
        #expect(try later.restore(bdf) == "virtio-pci")
        #expect(k2.writes == [
            .init(path: "/sys/bus/pci/drivers/vfio-pci/unbind", value: "0000:00:03.0"),
            .init(path: "/sys/bus/pci/devices/0000:00:03.0/driver_override", value: "\n"),
            .init(path: "/sys/bus/pci/drivers/virtio-pci/bind", value: "0000:00:03.0"),
        ])
        #expect(!t.exists(stateFile))
        #expect(try b.currentDriver(of: bdf) == "virtio-pci")
    }

    @Test("restore leaves a VM's vfio-pci device (no state file) bound, and its driver_override alone")
    func restoreLeavesForeignVFIO() throws {
        let (t, k, b) = setUp(driver: "vfio-pci")
        t.file("/sys/bus/pci/devices/0000:00:03.0/driver_override", "vfio-pci\n")
        #expect(try b.restore(bdf) == "vfio-pci")
        #expect(try b.currentDriver(of: bdf) == "vfio-pci")
        #expect(!k.writes.contains { $0.path.hasSuffix("/unbind") })
        #expect(k.writes.isEmpty)
        #expect(t.read("/sys/bus/pci/devices/0000:00:03.0/driver_override") == "vfio-pci\n")
    }

    @Test("a device without an IOMMU group: bindFailed with the noIOMMUGroup detail, before anything changes")
    func noIOMMUGroup() {
        let (t, k, b) = setUp(group: false)
        do {
            _ = try b.bindVFIO(bdf)
            Issue.record("must fail")
        } catch {
            #expect(error == .bindFailed(bdf: "0000:00:03.0", expected: "vfio-pci", found: "virtio-pci", detail: .noIOMMUGroup))
            #expect(error.description.contains("no IOMMU group"))
            #expect(error.description.contains("virtual IOMMU") && error.description.contains("--backend uio"))
        }
        #expect(k.writes.isEmpty && k.commands.isEmpty)
        #expect(!t.exists(stateFile))
    }

    @Test("a BDF with no device behind it is deviceNotFound, as with bind, not a missing IOMMU group")
    func missingDevice() {
        let (_, k, b) = setUp()
        #expect(throws: PlatformError.deviceNotFound(bdf: "0000:00:09.0")) { try b.bind(PCIAddress("0000:00:09.0")!) }
        #expect(throws: PlatformError.deviceNotFound(bdf: "0000:00:09.0")) { try b.bindVFIO(PCIAddress("0000:00:09.0")!) }
        #expect(k.writes.isEmpty)
    }

    @Test("vfio-pci refusing the probe rolls back to the previous driver")
    func rejectedProbeRollsBack() throws {
        let (t, k, b) = setUp()
        k.vfioAcceptsDevices = false
        do {
            _ = try b.bindVFIO(bdf)
            Issue.record("must fail")
        } catch {
            #expect(error == .bindFailed(bdf: "0000:00:03.0", expected: "vfio-pci", found: nil, detail: .rolledBack(previous: "virtio-pci")))
        }
        #expect(try b.currentDriver(of: bdf) == "virtio-pci")
        #expect(!t.exists(stateFile))
    }

    @Test("without modprobe, the vfio modules are insmod'ed from the kernel's vfio directory")
    func insmodFallback() throws {
        let (t, k, b) = setUp()
        k.inner.modprobeable = []
        t.file("/lib/modules/6.1.0-test/kernel/drivers/vfio/vfio.ko", "ELF")
        t.file("/lib/modules/6.1.0-test/kernel/drivers/vfio/vfio_iommu_type1.ko", "ELF")
        t.file("/lib/modules/6.1.0-test/kernel/drivers/vfio/pci/vfio-pci.ko", "ELF")
        let binding = try b.bindVFIO(bdf)
        #expect(binding.group == 7)
    }
}
