#if canImport(Glibc)
import Glibc
#endif
import Testing
import PlatformLinux

/// A device for the guardian's decisions.
final class FakeGuardedDevice: GuardedDevice {
    var resetFails: String?
    var busMasterFails: String?
    private(set) var calls: [String] = []
    func reset() throws(GuardianDeviceError) {
        calls.append("reset")
        if let resetFails { throw GuardianDeviceError(resetFails) }
    }
    func clearBusMaster() throws(GuardianDeviceError) {
        calls.append("busMaster")
        if let busMasterFails { throw GuardianDeviceError(busMasterFails) }
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
        d.resetFails = "device_status did not read 0"
        #expect(GuardianState().workerGone(device: d) == .releaseAfterStop(reset: false, busMasterCleared: true))
    }

    @Test("when both reset and clearing Bus Master fail, the memory is kept")
    func bothFailKeepsMemory() {
        let d = FakeGuardedDevice()
        d.resetFails = "no BAR"
        d.busMasterFails = "no config"
        let v = GuardianState().workerGone(device: d)
        #expect(!v.releasesMemory)
        #expect(v == .keepMemory(reset: "no BAR", busMaster: "no config"))
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
