import VirtioCore
/// Where one virtio structure lives: a window of `length` bytes at `offset` in BAR `bar`.
public struct VirtioStructureLocation: Hashable, Sendable, CustomStringConvertible {
    public let bar: Int
    public let offset: UInt32
    public let length: UInt32
    /// Config-space offset of the capability that described it.
    public let capabilityOffset: Int
    public var description: String { "BAR\(bar)+0x\(String(offset, radix: 16)) len 0x\(String(length, radix: 16)) (cap@0x\(String(capabilityOffset, radix: 16)))" }
}

/// The virtio structures of a modern virtio-pci function, as its capability list says.
public struct VirtioCapabilities: Hashable, Sendable {
    public let common: VirtioStructureLocation
    public let notify: VirtioStructureLocation
    /// Byte distance between queue notify addresses (`notify_off_multiplier`).
    public let notifyOffMultiplier: UInt32
    public let isr: VirtioStructureLocation
    /// Absent on devices without device-specific config (the balloon always has one).
    public let device: VirtioStructureLocation?
}


/// Walks the PCI capability list from `config[0x34]` and parses the virtio vendor
/// capabilities (virtio 1.2 §4.1.4). The first capability of each type wins, as the spec
/// recommends; PCI_CFG, shared-memory and unknown types are skipped.
///
/// - Parameters:
///   - config: the function's config space.
///   - barSizes: size in bytes of each BAR 0–5, nil where the BAR is not implemented.
public func parseVirtioCapabilities(_ config: PCIConfigSpace, barSizes: [UInt64?]) throws(VirtioCapabilityError) -> VirtioCapabilities {
    func r8(_ o: Int) throws(VirtioCapabilityError) -> UInt8 {
        do { return try config.read8(at: o) } catch { throw .configSpace(error) }
    }
    func r32(_ o: Int) throws(VirtioCapabilityError) -> UInt32 {
        do { return try config.read32(at: o) } catch { throw .configSpace(error) }
    }
    let status: UInt16
    do { status = try config.read16(at: PCIConfig.status) } catch { throw .configSpace(error) }
    var pointer = Int(try r8(PCIConfig.capabilitiesPointer))
    guard status & PCIConfig.statusCapList != 0, pointer != 0 else { throw .noCapabilityList }

    var seen = Set<Int>()
    var found: [VirtioCapabilityType: (VirtioStructureLocation, UInt32)] = [:]
    var from = PCIConfig.capabilitiesPointer
    while pointer != 0 {
        guard pointer >= 0x40 else { throw .pointerBelowHeader(at: from, pointer: pointer) }
        guard pointer & 3 == 0 else { throw .pointerMisaligned(at: from, pointer: pointer) }
        guard pointer + 2 <= 256 else { throw .capabilityOutsideConfigSpace(at: pointer, length: 2) }
        guard seen.insert(pointer).inserted else { throw .loop(at: pointer) }
        let id = try r8(pointer)
        let next = Int(try r8(pointer + 1))
        if id == 0x09 {  // vendor-specific: a virtio capability
            let capLength = Int(try r8(pointer + 2))
            let rawType = try r8(pointer + 3)
            guard capLength >= 16 else { throw .lengthTooSmall(at: pointer, type: rawType, length: capLength, minimum: 16) }
            guard pointer + capLength <= 256 else { throw .capabilityOutsideConfigSpace(at: pointer, length: capLength) }
            if let type = VirtioCapabilityType(rawValue: rawType),
               [.common, .notify, .isr, .device].contains(type), found[type] == nil {
                let bar = Int(try r8(pointer + 4))
                let offset = try r32(pointer + 8)
                let length = try r32(pointer + 12)
                guard bar <= 5 else { throw .barOutOfRange(at: pointer, bar: bar) }
                let (end, overflow) = offset.addingReportingOverflow(length)
                guard !overflow else { throw .offsetOverflow(at: pointer, offset: offset, length: length) }
                guard let barSize = barSizes.indices.contains(bar) ? barSizes[bar] : nil else { throw .barMissing(at: pointer, bar: bar) }
                guard UInt64(end) <= barSize else { throw .outsideBAR(at: pointer, bar: bar, end: UInt64(end), barSize: barSize) }
                var multiplier: UInt32 = 0
                if type == .notify {
                    guard capLength >= 20 else { throw .lengthTooSmall(at: pointer, type: rawType, length: capLength, minimum: 20) }
                    multiplier = try r32(pointer + 16)
                    guard multiplier % 2 == 0 else { throw .notifyMultiplierInvalid(at: pointer, multiplier: multiplier) }
                }
                found[type] = (VirtioStructureLocation(bar: bar, offset: offset, length: length, capabilityOffset: pointer), multiplier)
            }
        }
        from = pointer + 1
        pointer = next
    }
    guard let common = found[.common]?.0 else { throw .missing(.common) }
    guard let notify = found[.notify] else { throw .missing(.notify) }
    guard let isr = found[.isr]?.0 else { throw .missing(.isr) }
    // Checked before any register access: MMIO accesses must be aligned and inside their
    // window, and a device that gets this wrong must give a typed error, not a trap.
    // Minimum lengths and alignments as Linux `vp_modern_probe` maps them (common: the
    // registers balloond uses, 4-aligned; notify: 2 bytes, 2-aligned; ISR: 1 byte; device
    // config: any length, 4-aligned), virtio 1.2 §4.1.4.3-4.1.4.6.
    let rules: [(VirtioCapabilityType, minimum: UInt32, alignment: UInt32)] = [
        (.common, UInt32(CommonConfig.queueDeviceHigh + 4), 4), (.notify, 2, 2), (.isr, 1, 1), (.device, 0, 4),
    ]
    var windows: [VirtioStructureLocation] = []
    for (type, minimum, alignment) in rules {
        guard let loc = found[type]?.0 else { continue }
        guard loc.length >= minimum else { throw .windowTooSmall(at: loc.capabilityOffset, type: type, length: loc.length, minimum: minimum) }
        guard loc.offset % alignment == 0 else { throw .offsetMisaligned(at: loc.capabilityOffset, type: type, offset: loc.offset, alignment: alignment) }
        for other in windows where other.bar == loc.bar && loc.length > 0 && other.length > 0 {
            // Both end without overflow (checked above), so the comparison is exact.
            if loc.offset < other.offset + other.length && other.offset < loc.offset + loc.length {
                throw .overlapping(at: loc.capabilityOffset, other: other.capabilityOffset, bar: loc.bar)
            }
        }
        windows.append(loc)
    }
    return VirtioCapabilities(common: common, notify: notify.0, notifyOffMultiplier: notify.1, isr: isr, device: found[.device]?.0)
}
