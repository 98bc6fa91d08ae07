import VirtioCore
import VirtioPCI

/// The simulated function's PCI config space: QEMU 7.2's identity and capability layout
/// (docs/virtio-balloon.md §1.1–1.2), and the Command register's bus-master coupling.
public final class SimulatedConfigSpace: PCIConfigSpace {
    unowned let device: SimulatedBalloonDevice
    public private(set) var bytes: [UInt8]
    /// Firmware leaves Command at 0x0103 (I/O + memory decode, SERR; no bus master).
    public var command: UInt16 {
        get { UInt16(bytes[4]) | UInt16(bytes[5]) << 8 }
        set { bytes[4] = UInt8(newValue & 0xff); bytes[5] = UInt8(newValue >> 8) }
    }
    /// Every Command write, in order.
    public private(set) var commandWrites: [UInt16] = []

    /// BAR sizes: BAR0 legacy I/O (64 B) on transitional devices, BAR4 16 KiB MMIO.
    public var barSizes: [UInt64?] {
        [device.properties.modernOnly ? nil : 64, nil, nil, nil, 0x4000, nil]
    }

    init(device: SimulatedBalloonDevice) {
        self.device = device
        bytes = Array(repeating: 0, count: 256)
        let modern = device.properties.modernOnly
        put16(PCIConfig.virtioVendor, 0x00)
        put16(modern ? PCIConfig.balloonModernID : PCIConfig.balloonTransitionalID, 0x02)
        put16(0x0103, 0x04)
        put16(PCIConfig.statusCapList, 0x06)
        bytes[0x08] = modern ? 1 : 0
        bytes[0x0a] = 0xff  // class 0x00ff00: PCI_CLASS_OTHERS
        put16(PCIConfig.virtioVendor, 0x2c)
        put16(modern ? 0x1100 : PCIConfig.virtioBalloonDeviceType, 0x2e)
        bytes[0x3d] = 1  // INTA
        let shift = modern ? 0x44 : 0
        if modern {
            // PCIe capability at 0x40 (end of list) and PM at 0x7c.
            bytes[0x40] = 0x10; bytes[0x41] = 0x00
            bytes[0x7c] = 0x01; bytes[0x7d] = 0x40
        }
        bytes[PCIConfig.capabilitiesPointer] = UInt8(0x84 + shift)
        vendorCap(at: 0x84 + shift, next: 0x70 + shift, length: 20, type: 5, bar: 0, offset: 0, size: 0)
        vendorCap(at: 0x70 + shift, next: 0x60 + shift, length: 20, type: 2, bar: 4, offset: 0x3000, size: 0x1000)
        put32(4, 0x70 + shift + 16)  // notify_off_multiplier
        vendorCap(at: 0x60 + shift, next: 0x50 + shift, length: 16, type: 4, bar: 4, offset: 0x2000, size: 0x1000)
        vendorCap(at: 0x50 + shift, next: 0x40 + shift, length: 16, type: 3, bar: 4, offset: 0x1000, size: 0x1000)
        vendorCap(at: 0x40 + shift, next: modern ? 0x7c : 0, length: 16, type: 1, bar: 4, offset: 0, size: 0x1000)
    }

    private func put16(_ v: UInt16, _ o: Int) { bytes[o] = UInt8(v & 0xff); bytes[o + 1] = UInt8(v >> 8) }
    private func put32(_ v: UInt32, _ o: Int) { for i in 0..<4 { bytes[o + i] = UInt8(truncatingIfNeeded: v >> (8 * UInt32(i))) } }
    private func vendorCap(at o: Int, next: Int, length: UInt8, type: UInt8, bar: UInt8, offset: UInt32, size: UInt32) {
        bytes[o] = 0x09; bytes[o + 1] = UInt8(next); bytes[o + 2] = length; bytes[o + 3] = type; bytes[o + 4] = bar
        put32(offset, o + 8); put32(size, o + 12)
    }

    /// Test support: overwrite raw config bytes (to build malformed capability lists).
    public func poke(_ offset: Int, _ value: UInt8) { bytes[offset] = value }

    /// Fault injection: rewrites the BAR offset and/or length of the first virtio capability
    /// of `cfgType` (1 common, 2 notify, 3 ISR, 4 device), e.g. an ISR of length 0 or a
    /// common config at an unaligned offset. Returns whether such a capability was found.
    @discardableResult
    public func overrideCapability(cfgType: UInt8, offset: UInt32? = nil, length: UInt32? = nil) -> Bool {
        var p = Int(bytes[PCIConfig.capabilitiesPointer])
        var seen = Set<Int>()
        while p != 0, p + 16 <= 256, seen.insert(p).inserted {
            if bytes[p] == 0x09, bytes[p + 3] == cfgType {
                if let offset { put32(offset, p + 8) }
                if let length { put32(length, p + 12) }
                return true
            }
            p = Int(bytes[p + 1])
        }
        return false
    }

    private func check(_ o: Int, _ w: Int) throws(PCIError) {
        guard o >= 0, o + w <= 256 else { throw .configAccess(offset: o, reason: PCIAccessProblem.outsideConfigSpace(width: w, size: 256)) }
    }

    public func read8(at offset: Int) throws(PCIError) -> UInt8 {
        try check(offset, 1)
        return bytes[offset]
    }

    public func read16(at offset: Int) throws(PCIError) -> UInt16 {
        try check(offset, 2)
        var v = UInt16(bytes[offset]) | UInt16(bytes[offset + 1]) << 8
        if offset == PCIConfig.status, device.interruptAssertedIgnoringMask { v |= PCIConfig.statusInterrupt }
        return v
    }

    public func read32(at offset: Int) throws(PCIError) -> UInt32 {
        try check(offset, 4)
        return (0..<4).reduce(UInt32(0)) { $0 | UInt32(bytes[offset + $1]) << (8 * UInt32($1)) }
    }

    public func write16(_ value: UInt16, at offset: Int) throws(PCIError) {
        try check(offset, 2)
        guard offset == PCIConfig.command else { return }  // only Command is writable here
        let wasMaster = command & PCIConfig.commandBusMaster != 0
        var value = value
        if wasMaster, value & PCIConfig.commandBusMaster == 0 {
            if device.faults.busMasterClearFails { throw .configAccess(offset: offset, reason: InjectedFault.busMasterClearFails) }
            if device.faults.busMasterStuckOn { value |= PCIConfig.commandBusMaster }
        }
        command = value
        commandWrites.append(value)
        let isMaster = value & PCIConfig.commandBusMaster != 0
        if wasMaster != isMaster { device.record(.busMaster(isMaster)) }
        // QEMU virtio_write_config: a Command write with Bus Master clear disables the device
        // and clears DRIVER_OK.
        if value & PCIConfig.commandBusMaster == 0 { device.busMasterCleared() }
    }
}

extension SimulatedBalloonDevice {
    var interruptAssertedIgnoringMask: Bool { isr != 0 }

    func busMasterCleared() {
        var s = status
        s.remove(.driverOK)
        writeStatusRaw(s)
    }
}

/// A failure the simulator injects on request (`DeviceFaults`).
public enum InjectedFault: Error, Hashable, Sendable, CustomStringConvertible {
    /// The config space write that clears Bus Master fails.
    case busMasterClearFails

    public var description: String {
        switch self {
        case .busMasterClearFails: return "injected: Bus Master clear fails"
        }
    }
}
