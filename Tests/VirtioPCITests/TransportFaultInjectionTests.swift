import Testing
import BalloonSimulator
import VirtioCore
@testable import VirtioPCI

/// A hostile or broken device, as the transport sees it: every fault is a typed error before
/// any register access, or bounded work; never a trap or a hang (issue 9 L1).
@Suite("Transport fault injection: hostile capabilities and config")
struct TransportFaultInjectionTests {
    private func transport(_ edit: (SimulatedBalloonDevice) -> Void) throws(TransportError) -> (SimulatedBalloonDevice, ModernPCITransport) {
        let device = SimulatedBalloonDevice()
        edit(device)
        return (device, try device.makeTransport())
    }

    @Test("an ISR capability of length 0 is refused with a typed error before any ISR read")
    func zeroLengthISR() {
        #expect(throws: TransportError.capabilities(.windowTooSmall(at: 0x50, type: .isr, length: 0, minimum: 1))) {
            _ = try transport { $0.configSpace.overrideCapability(cfgType: 3, length: 0) }
        }
    }

    @Test("a zero-length notify window is refused")
    func zeroLengthNotify() {
        #expect(throws: TransportError.capabilities(.windowTooSmall(at: 0x70, type: .notify, length: 0, minimum: 2))) {
            _ = try transport { $0.configSpace.overrideCapability(cfgType: 2, length: 0) }
        }
    }

    @Test("a common config window too short for its registers is refused")
    func shortCommon() {
        #expect(throws: TransportError.capabilities(.windowTooSmall(at: 0x40, type: .common, length: 8, minimum: 56))) {
            _ = try transport { $0.configSpace.overrideCapability(cfgType: 1, length: 8) }
        }
    }

    @Test("a common config at an unaligned BAR offset is refused before the first 32-bit access")
    func unalignedCommon() {
        #expect(throws: TransportError.capabilities(.offsetMisaligned(at: 0x40, type: .common, offset: 2, alignment: 4))) {
            _ = try transport { $0.configSpace.overrideCapability(cfgType: 1, offset: 2, length: 0xff0) }
        }
    }

    @Test("a device config at an unaligned BAR offset is refused")
    func unalignedDevice() {
        #expect(throws: TransportError.capabilities(.offsetMisaligned(at: 0x60, type: .device, offset: 0x2001, alignment: 4))) {
            _ = try transport { $0.configSpace.overrideCapability(cfgType: 4, offset: 0x2001, length: 0xf00) }
        }
    }

    @Test("a notify structure at an odd BAR offset is refused")
    func unalignedNotify() {
        #expect(throws: TransportError.capabilities(.offsetMisaligned(at: 0x70, type: .notify, offset: 0x3001, alignment: 2))) {
            _ = try transport { $0.configSpace.overrideCapability(cfgType: 2, offset: 0x3001, length: 0xf00) }
        }
    }

    @Test("an ISR window overlapping the common config is refused (reading one would touch the other)")
    func overlapping() {
        #expect(throws: TransportError.capabilities(.overlapping(at: 0x50, other: 0x40, bar: 4))) {
            _ = try transport { $0.configSpace.overrideCapability(cfgType: 3, offset: 0x800, length: 0x1000) }
        }
    }

    @Test("QEMU's own layout still passes every new check, and the ISR reads")
    func qemuLayoutAccepted() throws {
        let (device, t) = try transport { _ in }
        withExtendedLifetime(device) { #expect(t.readISR() == []) }
    }

    @Test("a config_generation that never settles gives a typed error after a bounded number of reads")
    func unstableGeneration() throws {
        let (device, t) = try transport { _ in }
        device.faults.unstableGenerationReads = 100_000
        #expect(throws: TransportError.configGenerationUnstable(attempts: configReadMaxAttempts)) {
            _ = try t.readConsistent { () throws(TransportError) -> UInt32 in try t.readDeviceConfig32(at: 0) }
        }
        // Two generation reads per attempt, no more.
        #expect(100_000 - device.faults.unstableGenerationReads == 2 * configReadMaxAttempts)
    }

    @Test("a generation that settles after a few changes still gives one consistent snapshot")
    func settlingGeneration() throws {
        let (device, t) = try transport { _ in }
        device.faults.unstableGenerationReads = 5
        let v = try t.readConsistent { () throws(TransportError) -> UInt32 in try t.readDeviceConfig32(at: 0) }
        #expect(v == 0)
        #expect(device.faults.unstableGenerationReads == 0)
    }
}
