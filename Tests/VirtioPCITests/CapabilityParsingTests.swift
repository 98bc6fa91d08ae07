import Testing
import TestSupport
import BalloonSimulator
import VirtioCore
@testable import VirtioPCI

@Suite("virtio-pci capability parsing (virtio 1.2 §4.1.4)")
struct CapabilityParsingTests {
    @Test("QEMU 7.2 transitional layout: common/ISR/device/notify in BAR4, multiplier 4, PCI_CFG skipped")
    func transitional() throws {
        let caps = try parse(qemuConfigBytes())
        #expect(caps.common == VirtioStructureLocation(bar: 4, offset: 0, length: 0x1000, capabilityOffset: 0x40))
        #expect(caps.isr == VirtioStructureLocation(bar: 4, offset: 0x1000, length: 0x1000, capabilityOffset: 0x50))
        #expect(caps.device == VirtioStructureLocation(bar: 4, offset: 0x2000, length: 0x1000, capabilityOffset: 0x60))
        #expect(caps.notify == VirtioStructureLocation(bar: 4, offset: 0x3000, length: 0x1000, capabilityOffset: 0x70))
        #expect(caps.notifyOffMultiplier == 4)
    }

    @Test("modern-only layout is found by walking the list (shifted by 0x44, past PM and PCIe caps)")
    func modernOnly() throws {
        let caps = try parse(qemuConfigBytes(modern: true), bars: [nil, nil, nil, nil, 0x4000, nil])
        #expect(caps.common.capabilityOffset == 0x84)
        #expect(caps.notify.capabilityOffset == 0xb4)
        #expect(caps.notify.offset == 0x3000)
    }

    struct Malformed: Sendable, CustomStringConvertible {
        let name: String
        let edit: @Sendable (inout [UInt8]) -> Void
        let bars: [UInt64?]
        let expected: VirtioCapabilityError
        var description: String { name }
        init(_ name: String, bars: [UInt64?] = qemuBARs, expected: VirtioCapabilityError, edit: @escaping @Sendable (inout [UInt8]) -> Void) {
            self.name = name
            self.edit = edit
            self.bars = bars
            self.expected = expected
        }
    }

    static let malformed: [Malformed] = [
        Malformed("status without the capability-list bit", expected: .noCapabilityList) { $0[0x06] = 0 },
        Malformed("capability pointer 0", expected: .noCapabilityList) { $0[0x34] = 0 },
        Malformed("pointer into the standard header", expected: .pointerBelowHeader(at: 0x71, pointer: 0x20)) { $0[0x71] = 0x20 },
        Malformed("misaligned pointer", expected: .pointerMisaligned(at: 0x34, pointer: 0x85)) { $0[0x34] = 0x85 },
        Malformed("a next pointer that loops", expected: .loop(at: 0x84)) { $0[0x41] = 0x84 },
        Malformed("virtio cap_len below 16", expected: .lengthTooSmall(at: 0x50, type: 3, length: 12, minimum: 16)) { $0[0x52] = 12 },
        Malformed("notify cap_len below 20", expected: .lengthTooSmall(at: 0x70, type: 2, length: 16, minimum: 20)) { $0[0x72] = 16 },
        Malformed("BAR index above 5", expected: .barOutOfRange(at: 0x40, bar: 6)) { $0[0x44] = 6 },
        Malformed("BAR not implemented", expected: .barMissing(at: 0x40, bar: 2)) { $0[0x44] = 2 },
        Malformed("offset + length overflows 32 bits", expected: .offsetOverflow(at: 0x60, offset: 0xffff_f000, length: 0x1000)) {
            $0[0x68] = 0x00; $0[0x69] = 0xf0; $0[0x6a] = 0xff; $0[0x6b] = 0xff
        },
        Malformed("structure past the end of its BAR", bars: [64, nil, nil, nil, 0x2000, nil],
                  expected: .outsideBAR(at: 0x70, bar: 4, end: 0x4000, barSize: 0x2000)) { _ in },
        Malformed("odd notify_off_multiplier", expected: .notifyMultiplierInvalid(at: 0x70, multiplier: 3)) { $0[0x80] = 3 },
        Malformed("no common config capability", expected: .missing(.common)) { $0[0x43] = 9 },
        Malformed("no notify capability", expected: .missing(.notify)) { $0[0x73] = 9 },
        Malformed("no ISR capability", expected: .missing(.isr)) { $0[0x53] = 8 },
        Malformed("capability running past config space", expected: .capabilityOutsideConfigSpace(at: 0xf8, length: 20)) {
            $0[0x71] = 0xf8; $0[0xf8] = 0x09; $0[0xf9] = 0; $0[0xfa] = 20; $0[0xfb] = 4
        },
    ]

    @Test("malformed capability lists are refused with an error naming the problem", arguments: malformed)
    func refused(_ m: Malformed) {
        var bytes = qemuConfigBytes()
        m.edit(&bytes)
        #expect(throws: m.expected) { try parse(bytes, bars: m.bars) }
    }

    @Test("the first capability of each type wins; unknown types are skipped")
    func firstWins() throws {
        var bytes = qemuConfigBytes()
        // Add a second COMMON cap (pointing elsewhere) at 0xa0, chained first, with an unknown type before it.
        bytes[0x34] = 0xa0
        for (i, b) in [UInt8(0x09), 0xb0, 16, 1, 4, 0, 0, 0, 0x00, 0x08, 0, 0, 0x00, 0x01, 0, 0].enumerated() { bytes[0xa0 + i] = b }
        for (i, b) in [UInt8(0x09), 0x84, 16, 0x42, 4, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0].enumerated() { bytes[0xb0 + i] = b }
        let caps = try parse(bytes)
        #expect(caps.common.offset == 0x800)
        #expect(caps.common.capabilityOffset == 0xa0)
    }
}
