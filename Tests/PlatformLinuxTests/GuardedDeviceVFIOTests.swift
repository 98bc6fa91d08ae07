#if canImport(Glibc)
import Glibc
#endif
import Testing
import PlatformLinux
import TestSupport
import VirtioCore

/// The guardian's real device under vfio: the kernel revokes a sysfs BAR mapping once
/// vfio-pci claims the BAR, and a guardian touching it then dies of SIGBUS without stopping
/// the device or giving the ring page back. Under vfio it must never map a BAR.
@Suite("Guardian device access under vfio")
struct GuardedDeviceVFIOTests {
    /// A balloon's sysfs directory with a 256-byte config (Command = Memory | Bus Master) and
    /// resource lines, but no resource4 file: any attempt to map BAR4 fails.
    static func tree() -> FakeTree {
        let t = FakeTree()
        var config = [UInt8](repeating: 0, count: 256)
        config[4] = 0x06
        t.file("/sys/bus/pci/devices/0000:01:00.0/config", bytes: config)
        t.file("/sys/bus/pci/devices/0000:01:00.0/resource", String(repeating: "0x0000000000000000 0x0000000000000000 0x0000000000000000\n", count: 4)
               + "0x0000000080000000 0x0000000080003fff 0x000000000014220c\n" + "0x0000000000000000 0x0000000000000000 0x0000000000000000\n")
        return t
    }

    @Test("with vfio the guardian prepares config space only, refuses a BAR reset and stops the device through Bus Master")
    func busMasterOnly() throws {
        let t = Self.tree()
        let address = try #require(PCIAddress("0000:01:00.0"))
        let device = SysfsGuardedDevice(address: address, root: t.root, barAccess: false)
        try device.prepare()
        #expect(throws: GuardianDeviceError.noBARAccessUnderVFIO(address: address)) { try device.reset() }
        let verdict = GuardianState().workerGone(device: device)
        #expect(verdict == .releaseAfterStop(reset: false, busMasterCleared: true) && verdict.releasesMemory)
        let config = try #require(FileManagerBytes.read(t.at("/sys/bus/pci/devices/0000:01:00.0/config")))
        #expect(config[4] & 0x4 == 0, "Bus Master still set: command 0x\(String(config[4], radix: 16))")
        #expect(config[4] & 0x2 != 0, "memory decode was cleared too")
    }

    @Test("without vfio the guardian still maps BAR4 to reset (and reports it when it cannot)")
    func barAccessByDefault() throws {
        let t = Self.tree()
        let address = try #require(PCIAddress("0000:01:00.0"))
        let device = SysfsGuardedDevice(address: address, root: t.root)
        #expect(throws: GuardianDeviceError.self) { try device.prepare() }
        do {
            try device.reset()
            Issue.record("reset without a resource4 file succeeded")
        } catch {
            #expect(error != .noBARAccessUnderVFIO(address: address))
        }
    }
}

/// Whole-file reads for assertions.
enum FileManagerBytes {
    static func read(_ path: String) -> [UInt8]? {
        guard let f = try? OpenFile(path: path, flags: O_RDONLY) else { return nil }
        return try? f.readToEnd()
    }
}
