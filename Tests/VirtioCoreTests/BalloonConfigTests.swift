import Testing
@testable import VirtioCore

@Suite("Balloon config values")
struct BalloonConfigTests {
    @Test("cmd id values: 0 STOP, 1 DONE, anything else a round")
    func commands() {
        #expect(FreePageHintCommand(rawValue: 0) == .stop)
        #expect(FreePageHintCommand(rawValue: 1) == .done)
        #expect(FreePageHintCommand(rawValue: 0x8000_0001) == .round(0x8000_0001))
        #expect(FreePageHintCommand(rawValue: 2) == .round(2))
        #expect(FreePageHintCommand.round(7).rawValue == 7)
    }

    @Test("balloon PFNs are 4 KiB frames and must fit 32 bits")
    func pfns() {
        #expect(PhysicalAddress(0x1234_5000).balloonPFN == 0x12345)
        #expect(PhysicalAddress(UInt64(UInt32.max) << 12).balloonPFN == UInt32.max)
        #expect(PhysicalAddress(1 << 44).balloonPFN == nil)
    }

    @Test("device status names every bit")
    func statusNames() {
        let s: DeviceStatus = [.acknowledge, .driver, .featuresOK, .driverOK, .needsReset]
        #expect(s.description == "0x4f (ACKNOWLEDGE|DRIVER|FEATURES_OK|DRIVER_OK|NEEDS_RESET)")
        #expect(DeviceStatus().description == "0 (reset)")
    }
}
