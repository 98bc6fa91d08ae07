#if canImport(Glibc)
import Glibc
#endif
import Testing
import PlatformLinux
import VirtioCore

/// A device for the guardian's decisions.
final class FakeGuardedDevice: GuardedDevice {
    var resetFails: GuardianDeviceError?
    var busMasterFails: GuardianDeviceError?
    private(set) var calls: [String] = []
    func reset() throws(GuardianDeviceError) {
        calls.append("reset")
        if let resetFails { throw resetFails }
    }
    func clearBusMaster() throws(GuardianDeviceError) {
        calls.append("busMaster")
        if let busMasterFails { throw busMasterFails }
    }
}

@Suite("Guardian decisions (issue 9 H2)")
struct GuardianStateFaultInjectionTests {
    @Test("a worker that quiesced the device exits cleanly: memory released, device untouched")
    func cleanExit() {
        var s = GuardianState()
        s.receive([GuardianMessage.quiesced.rawValue])
        let d = FakeGuardedDevice()
        #expect(s.workerGone(device: d) == .releaseClean)
        #expect(d.calls.isEmpty)
    }

    @Test("EOF without the quiesced byte: the device is reset and Bus Master cleared before memory is released")
    func killedWorker() {
        let d = FakeGuardedDevice()
        let v = GuardianState().workerGone(device: d)
        #expect(v == .releaseAfterStop(reset: true, busMasterCleared: true) && v.releasesMemory)
        #expect(d.calls == ["reset", "busMaster"])
    }

    @Test("a failed reset still releases memory once Bus Master is cleared")
    func resetFailsBusMasterWorks() {
        let d = FakeGuardedDevice()
        d.resetFails = .resetTimedOut(address: PCIAddress("0000:00:03.0")!, milliseconds: 100)
        #expect(GuardianState().workerGone(device: d) == .releaseAfterStop(reset: false, busMasterCleared: true))
        #expect(d.resetFails?.description == "device_status of 0000:00:03.0 did not read 0 within 100 ms after the reset")
    }

    @Test("when both reset and clearing Bus Master fail, the memory is kept")
    func bothFailKeepsMemory() {
        let d = FakeGuardedDevice()
        let address = PCIAddress("0000:00:03.0")!
        let noBAR = GuardianDeviceError.pci(.bar(index: 4, reason: PCIAccessProblem.notMapped))
        let noConfig = GuardianDeviceError.platform(.deviceNotFound(bdf: address.bdf))
        d.resetFails = noBAR
        d.busMasterFails = noConfig
        let v = GuardianState().workerGone(device: d)
        #expect(!v.releasesMemory)
        #expect(v == .keepMemory(reset: noBAR, busMaster: noConfig))
        #expect(v.description.contains("(reset: BAR4: not mapped; Bus Master: no PCI function 0000:00:03.0 in /sys/bus/pci/devices"))
    }

    @Test("pool growth messages are counted; unknown bytes are ignored")
    func poolMessages() {
        var s = GuardianState()
        s.receive([0x50, 0x50, 0x00, 0x70, 0xff])
        #expect(s.poolPagesGrown == 1 && !s.quiesced)
        s.receive([0x70, 0x70])
        #expect(s.poolPagesGrown == 0)
    }
}
