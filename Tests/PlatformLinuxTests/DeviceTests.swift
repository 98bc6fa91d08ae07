#if canImport(Glibc)
import VirtioCore
import Glibc
#endif
import Testing
import TestSupport
import VirtioPCI
@testable import PlatformLinux

@Suite struct DeviceLockTests {
    @Test func secondLockOnTheSameDeviceNamesTheHolder() throws {
        let t = FakeTree()
        let bdf = PCIAddress("0000:00:03.0")!
        let first = try DeviceLock(address: bdf, root: t.root)
        #expect(first.path == t.at("/run/balloond/0000:00:03.0.lock"))
        #expect(DeviceLock.recordedPID(at: first.path) == getpid())
        do {
            _ = try DeviceLock(address: bdf, root: t.root)
            Issue.record("a second lock must fail while the first is held")
        } catch {
            #expect(error == .deviceBusy(bdf: "0000:00:03.0", lockPath: first.path, holderPID: getpid()))
            #expect(error.description.contains("held by another balloond (pid \(getpid()))"))
        }
        // Another device is independent.
        _ = try DeviceLock(address: PCIAddress("0000:00:04.0")!, root: t.root)
        first.unlock()
        let again = try DeviceLock(address: bdf, root: t.root)
        #expect(DeviceLock.recordedPID(at: again.path) == getpid())
    }

    @Test func lockIsReleasedWhenTheObjectGoes() throws {
        let t = FakeTree()
        let path = t.at("/run/x/dev.lock")
        do { _ = try DeviceLock(path: path, bdf: "x") }
        _ = try DeviceLock(path: path, bdf: "x")
    }
}

@Suite struct SysfsConfigSpaceTests {
    func tree() -> (FakeTree, PCIAddress) {
        let t = FakeTree()
        let a = PCIAddress("0000:00:03.0")!
        t.pciDevice(a.bdf, vendor: 0x1af4, device: 0x1045, revision: 1, resources: balloonResources)
        return (t, a)
    }

    @Test func readsLittleEndianRegisters() throws {
        let (t, a) = tree()
        let c = try SysfsConfigSpace(address: a, root: t.root)
        #expect(c.size == 256)
        #expect(try c.read16(at: PCIConfig.vendorID) == 0x1af4)
        #expect(try c.read16(at: PCIConfig.deviceID) == 0x1045)
        #expect(try c.read32(at: 0) == 0x1045_1af4)
        #expect(try c.read8(at: PCIConfig.revision) == 1)
        #expect(try c.read16(at: PCIConfig.subsystemID) == 0x1100)
    }

    @Test func write16HitsExactlyTheCommandRegister() throws {
        let (t, a) = tree()
        let c = try SysfsConfigSpace(address: a, root: t.root)
        try c.write16(0x0506, at: PCIConfig.command)
        let bytes = try OpenFile(path: t.at("/sys/bus/pci/devices/\(a.bdf)/config"), flags: O_RDONLY).pread(count: 4096, offset: 0)
        #expect(bytes.count == 256)
        #expect(Array(bytes[2...7]) == [0x45, 0x10, 0x06, 0x05, 0, 0])
        #expect(try c.read16(at: PCIConfig.command) == 0x0506)
    }

    @Test func rejectsOutOfRangeAndMisaligned() throws {
        let (t, a) = tree()
        let c = try SysfsConfigSpace(address: a, root: t.root)
        #expect(throws: PCIError.configAccess(offset: 254, reason: ConfigSpaceProblem.outOfRange(width: 4, size: 256, address: a))) { try c.read32(at: 254) }
        #expect(throws: PCIError.configAccess(offset: 3, reason: ConfigSpaceProblem.outOfRange(width: 2, size: 256, address: a))) { try c.read16(at: 3) }
        #expect(throws: PCIError.configAccess(offset: 256, reason: ConfigSpaceProblem.outOfRange(width: 2, size: 256, address: a, write: true))) {
            try c.write16(0, at: 256)
        }
        #expect(ConfigSpaceProblem.outOfRange(width: 2, size: 256, address: a, write: true).description
            == "2-byte write is misaligned or outside the 256-byte config space of 0000:00:03.0")
    }

    @Test func readOnlyConfigRefusesWrites() throws {
        let (t, a) = tree()
        let c = try SysfsConfigSpace(address: a, root: t.root, writable: false)
        do {
            try c.write16(0x7, at: 4)
            Issue.record("a write through a read-only descriptor must fail")
        } catch {
            #expect(error == .configAccess(offset: 4, reason: ConfigSpaceProblem.writeFailed(SystemCallError(call: "pwrite", path: t.at("/sys/bus/pci/devices/\(a.bdf)/config"), errno: .badFileDescriptor))))
            #expect(error.description.contains("opened read-only"))
        }
    }

    @Test func missingDevice() {
        let t = FakeTree()
        #expect(throws: PlatformError.deviceNotFound(bdf: "0000:00:07.0")) {
            try SysfsConfigSpace(address: PCIAddress("0000:00:07.0")!, root: t.root)
        }
    }
}

@Suite struct UIOInterruptLineTests {
    /// A FIFO stands in for /dev/uioN: readable when "the kernel" (the test) writes a count.
    func fifo(_ t: FakeTree) -> String {
        let p = t.at("/dev/uio0")
        t.directory("/dev")
        #expect(mkfifo(p, 0o600) == 0)
        return p
    }

    @Test func waitReadsTheEventCount() throws {
        let t = FakeTree()
        let path = fifo(t)
        let config = FakePCIConfigSpace(bytes: [])
        let line = try UIOInterruptLine(devicePath: path, config: config, requireCharacterDevice: false)
        #expect(line.pollDescriptor != nil)
        #expect(try line.wait(timeoutMilliseconds: 0) == false)
        #expect(line.eventCount == nil)
        let writer = try OpenFile(path: path, flags: O_WRONLY | O_NONBLOCK)
        try writer.writeAll([7, 1, 0, 0])
        #expect(try line.wait(timeoutMilliseconds: 1000) == true)
        #expect(line.eventCount == 0x107)
        #expect(try line.wait(timeoutMilliseconds: 10) == false)
    }

    @Test func unmaskClearsINTxDisableAndKeepsBusMaster() throws {
        let t = FakeTree()
        let path = fifo(t)
        var header = [UInt8](repeating: 0, count: 8)
        header[4] = 0x03; header[5] = 0x04  // Command 0x0403: I/O, memory, INTx disabled, no BME
        let config = FakePCIConfigSpace(bytes: header)
        let line = try UIOInterruptLine(devicePath: path, config: config, requireCharacterDevice: false)
        try line.unmask()
        #expect(config.writes.count == 1)
        #expect(config.writes.first?.0 == PCIConfig.command)
        #expect(config.writes.first?.1 == 0x0007)
        // Already unmasked with BME: no write at all.
        try line.unmask()
        #expect(config.writes.count == 1)
    }

    @Test func refusesARegularFileAsUIODevice() {
        let t = FakeTree()
        t.file("/dev/uio0", "")
        do {
            _ = try UIOInterruptLine(devicePath: t.at("/dev/uio0"), config: FakePCIConfigSpace(bytes: []))
            Issue.record("a regular file must be refused")
        } catch {
            #expect(error == .uioDeviceMissing(bdf: t.at("/dev/uio0"), .notACharacterDevice(path: t.at("/dev/uio0"))))
            #expect(error.description.contains("is not a character device"))
        }
    }

    @Test func missingDeviceNode() {
        let t = FakeTree()
        do {
            _ = try UIOInterruptLine(devicePath: t.at("/dev/uio9"), config: FakePCIConfigSpace(bytes: []))
            Issue.record("a missing node must fail")
        } catch {
            let path = t.at("/dev/uio9")
            #expect(error == .uioDeviceMissing(bdf: path, .cannotOpen(path: path, SystemCallError(call: "open", path: path, errno: .noSuchFileOrDirectory))))
        }
    }
}

@Suite struct BARMappingTests {
    let a = PCIAddress("0000:00:03.0")!

    func tree() -> FakeTree {
        let t = FakeTree()
        var lines = balloonResources
        lines[0] = "0x000000000000c040 0x000000000000c07f 0x0000000000040101"
        t.pciDevice(a.bdf, vendor: 0x1af4, device: 0x1002, resources: lines)
        return t
    }

    @Test func mapsTheResourceFileShared() throws {
        let t = tree()
        // A regular 16 KiB file stands in for resource4: the mmap path is the same.
        var bytes = [UInt8](repeating: 0, count: 0x4000)
        bytes[0x1000] = 0x5a
        bytes[0x2004] = 0x78; bytes[0x2005] = 0x56; bytes[0x2006] = 0x34; bytes[0x2007] = 0x12
        t.file("/sys/bus/pci/devices/\(a.bdf)/resource4", bytes: bytes)
        do {
            let w = try BARMapper(address: a, root: t.root).map(4)
            #expect(w.length == 0x4000)
            #expect(w.read8(at: 0x1000) == 0x5a)
            #expect(w.read32(at: 0x2004) == 0x1234_5678)
            w.write16(0xbeef, at: 0x3000)
        }
        // MAP_SHARED: the store reached the file.
        let after = try OpenFile(path: t.at("/sys/bus/pci/devices/\(a.bdf)/resource4"), flags: O_RDONLY).pread(count: 2, offset: 0x3000)
        #expect(after == [0xef, 0xbe])
    }

    @Test func ioBARIsRefused() {
        let t = tree()
        do {
            _ = try BARMapper(address: a, root: t.root).map(0)
            Issue.record("an I/O BAR must be refused")
        } catch {
            guard case .bar(0, let reason) = error, case .ioPort(a, 0, let resource)? = reason as? BARProblem else { Issue.record("unexpected \(error)"); return }
            #expect(resource.isIO)
            #expect(reason.description.contains("I/O-port BAR"))
            #expect(reason.description.contains("cannot be memory-mapped"))
        }
    }

    @Test func absentBARIsRefused() {
        let t = tree()
        do {
            _ = try BARMapper(address: a, root: t.root).map(2)
            Issue.record("an absent BAR must be refused")
        } catch {
            #expect(error == .bar(index: 2, reason: BARProblem.notImplemented(address: a, index: 2)))
            #expect(error.description == "BAR2: 0000:00:03.0 does not implement BAR2 (its sysfs resource line is empty)")
        }
        #expect(throws: PCIError.bar(index: 6, reason: BARProblem.noSuchBAR)) { try BARMapper(address: a, root: t.root).map(6) }
    }

    @Test func einvalWhileVirtioPCIOwnsTheDeviceSaysToBind() {
        let t = tree()
        t.bindLink(a.bdf, "virtio-pci")
        let m = BARMapper(address: a, root: t.root)
        let einval = SystemCallError(call: "mmap", path: "resource4", errno: .invalidArgument)
        let problem = m.mmapFailure(einval, index: 4)
        #expect(problem == .mmapFailed(einval, address: a, index: 4, driver: "virtio-pci"))
        // The rendered message says what to do.
        let reason = problem.description
        #expect(reason.contains("'virtio-pci' still owns 0000:00:03.0"))
        #expect(reason.contains("CONFIG_IO_STRICT_DEVMEM"))
        #expect(reason.contains("balloond bind 0000:00:03.0"))
        t.bindLink(a.bdf, "uio_pci_generic")
        #expect(m.mmapFailure(einval, index: 4) == .mmapFailed(einval, address: a, index: 4, driver: "uio_pci_generic"))
        #expect(!m.mmapFailure(einval, index: 4).description.contains("still owns"))
        #expect(m.mmapFailure(SystemCallError(call: "mmap", path: "resource4", errno: .notPermitted), index: 4).description.contains("lockdown"))
    }

    @Test func missingResourceFile() {
        let t = tree()
        do {
            _ = try BARMapper(address: a, root: t.root).map(4)
            Issue.record("a missing resource4 must fail")
        } catch {
            #expect(error == .bar(index: 4, reason: BARProblem.noResourceFile(path: t.at("/sys/bus/pci/devices/\(a.bdf)/resource4"))))
        }
    }
}

@Suite struct PCIEnumerationTests {
    @Test func enumeratesAFakeTreeThroughLibPCI() throws {
        let t = FakeTree()
        t.pciDevice("0000:00:03.0", vendor: 0x1af4, device: 0x1045, classCode: 0x00ff00, revision: 1,
                    subsystemVendor: 0x1af4, subsystem: 0x1100, driver: "virtio-pci", resources: balloonResources)
        t.pciDevice("0000:00:01.0", vendor: 0x8086, device: 0x1237, classCode: 0x060000, revision: 2,
                    subsystemVendor: 0x1af4, subsystem: 0x1100)
        let all = try PCIEnumerator(root: t.root).functions()
        #expect(all.map(\.bdf) == ["0000:00:01.0", "0000:00:03.0"])
        let balloon = all[1]
        #expect(balloon.isVirtioBalloon)
        #expect(balloon.vendorID == 0x1af4 && balloon.deviceID == 0x1045)
        #expect(balloon.subsystemVendorID == 0x1af4 && balloon.subsystemID == 0x1100)
        #expect(balloon.revision == 1)
        #expect(balloon.classCode == 0x00ff00)
        #expect(balloon.barSizes == [nil, nil, nil, nil, 0x4000, nil])
        #expect(balloon.resources.count == 13)
        #expect(balloon.resources[4].isPrefetchable)
        #expect(balloon.driver == "virtio-pci")
        let host = all[0]
        #expect(!host.isVirtioBalloon)
        #expect(host.classCode == 0x060000)
        #expect(host.revision == 2)
        #expect(host.driver == nil)
        #expect(host.barSizes == [nil, nil, nil, nil, nil, nil])

        #expect(try PCIEnumerator(root: t.root).virtioBalloons().map(\.bdf) == ["0000:00:03.0"])
        #expect(try PCIEnumerator(root: t.root).function(at: PCIAddress("0000:00:03.0")!) == balloon)
        #expect(throws: PlatformError.deviceNotFound(bdf: "0000:00:05.0")) {
            try PCIEnumerator(root: t.root).function(at: PCIAddress("0000:00:05.0")!)
        }
    }

    @Test func missingSysfsIsAnErrorNotAnExit() {
        let t = FakeTree()
        do {
            _ = try PCIEnumerator(root: t.root).functions()
            Issue.record("no /sys/bus/pci must fail")
        } catch {
            #expect(error == .libpci(.noSysfsDevices(directory: t.at("/sys/bus/pci/devices"))))
            #expect(error.description.contains("is sysfs mounted"))
        }
    }

    @Test func incompleteDeviceDirectoryIsAnErrorNotAnExit() {
        let t = FakeTree()
        t.pciDevice("0000:00:03.0", vendor: 0x1af4, device: 0x1045)
        t.remove("/sys/bus/pci/devices/0000:00:03.0/class")
        #expect(throws: PlatformError.malformedFile(path: t.at("/sys/bus/pci/devices/0000:00:03.0/class"), reason: .unreadableForLibPCI(function: "0000:00:03.0"))) {
            try PCIEnumerator(root: t.root).functions()
        }
        t.directory("/sys/bus/pci/devices/garbage")
        #expect(throws: PlatformError.self) { try PCIEnumerator(root: t.root).functions() }
    }

    /// On the machine running the tests (any Linux with PCI): libpci's view agrees with
    /// sysfs's files for every function.
    @Test(.enabled(if: Sys.isDirectory("/sys/bus/pci/devices")))
    func hostEnumerationAgreesWithSysfs() throws {
        let all = try PCIEnumerator().functions()
        let names = try Sys.listDirectory("/sys/bus/pci/devices")
        #expect(all.map(\.bdf) == names.sorted())
        for f in all {
            let dir = "/sys/bus/pci/devices/\(f.bdf)"
            #expect(UInt64(f.vendorID) == parseNumber(try Sys.readAttribute(dir + "/vendor"), hex: true))
            #expect(UInt64(f.deviceID) == parseNumber(try Sys.readAttribute(dir + "/device"), hex: true))
            #expect(UInt64(f.classCode) == parseNumber(try Sys.readAttribute(dir + "/class"), hex: true))
            let resources = try readPCIResources(f.address)
            for i in 0..<6 {
                #expect(f.barSizes[i] == (resources[i].isPresent ? resources[i].size : nil))
            }
            #expect(f.isVirtioBalloon == isVirtioBalloonID(vendor: f.vendorID, device: f.deviceID))
        }
    }
}

@Suite struct HugePagePoolTests {
    func sysfsPool(nr: Int, free: Int, resv: Int = 0) -> FakeTree {
        let t = FakeTree()
        t.file("/sys/kernel/mm/hugepages/hugepages-2048kB/nr_hugepages", "\(nr)\n")
        t.file("/sys/kernel/mm/hugepages/hugepages-2048kB/free_hugepages", "\(free)\n")
        t.file("/sys/kernel/mm/hugepages/hugepages-2048kB/resv_hugepages", "\(resv)\n")
        return t
    }

    @Test func freePageNeedsNoGrowth() throws {
        let t = sysfsPool(nr: 2, free: 1)
        let pool = HugePagePool(root: t.root)
        #expect(pool.isSupported())
        #expect(try pool.reserveOne() == false)
        #expect(t.read("/sys/kernel/mm/hugepages/hugepages-2048kB/nr_hugepages") == "2\n")
    }

    @Test func reservedPagesAreNotAvailable() throws {
        let t = sysfsPool(nr: 1, free: 1, resv: 1)
        #expect(try HugePagePool(root: t.root).available() == 0)
    }

    @Test func growthThatYieldsNothingIsUndone() {
        // The fake kernel never frees a page, like a fragmented one.
        let t = sysfsPool(nr: 0, free: 0)
        do {
            _ = try HugePagePool(root: t.root).reserveOne()
            Issue.record("growth without a free page must fail")
        } catch {
            #expect(error == .hugePages(.poolDidNotGrow(countPath: t.at("/sys/kernel/mm/hugepages/hugepages-2048kB/nr_hugepages"), before: 0)))
            #expect(error.description.contains("produced no free 2 MiB hugepage"))
            #expect(error.description.contains("hugepages=1"))
        }
        #expect(t.read("/sys/kernel/mm/hugepages/hugepages-2048kB/nr_hugepages") == "0\n")
    }

    @Test func giveBackShrinksByOne() throws {
        let t = sysfsPool(nr: 3, free: 0)
        try HugePagePool(root: t.root).giveBackOne()
        #expect(t.read("/sys/kernel/mm/hugepages/hugepages-2048kB/nr_hugepages") == "2\n")
    }

    @Test func procFallbackUsesMeminfo() throws {
        let t = FakeTree()
        t.file("/proc/sys/vm/nr_hugepages", "1\n")
        t.file("/proc/meminfo", "HugePages_Total:       1\nHugePages_Free:        1\nHugePages_Rsvd:        0\nHugepagesize:       2048 kB\n")
        let pool = HugePagePool(root: t.root)
        #expect(pool.isSupported())
        #expect(pool.countPath == t.at("/proc/sys/vm/nr_hugepages"))
        #expect(try pool.available() == 1)
        t.file("/proc/meminfo", "HugePages_Free:        1\nHugepagesize:    1048576 kB\n")
        #expect(!pool.isSupported())
    }
}
