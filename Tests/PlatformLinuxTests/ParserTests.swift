import Testing
import VirtioCore
@testable import PlatformLinux

@Suite struct PCIAddressTests {
    @Test func parsesSysfsAndLspciForms() throws {
        let a = try #require(PCIAddress("0000:00:03.0"))
        #expect(a == PCIAddress(domain: 0, bus: 0, device: 3, function: 0))
        #expect(a.description == "0000:00:03.0")
        let b = try #require(PCIAddress("01:1f.7"))
        #expect(b == PCIAddress(domain: 0, bus: 1, device: 0x1f, function: 7))
        #expect(b.bdf == "0000:01:1f.7")
        #expect(PCIAddress("10000:AB:00.1")?.description == "10000:ab:00.1")
    }

    @Test(arguments: ["", "0000:00:03", "0000:00:20.0", "0000:00:03.8", "0000:100:03.0", "zz:00.0", "0000:00:03.0.1", "0000:00:03.", "a:b:c:d.0"])
    func rejectsMalformed(_ text: String) {
        #expect(PCIAddress(text) == nil)
    }

    @Test func ordersByDomainBusDeviceFunction() {
        let list = ["0000:01:00.0", "0000:00:1f.3", "0000:00:03.0", "0001:00:00.0"].compactMap(PCIAddress.init)
        #expect(list.sorted().map(\.bdf) == ["0000:00:03.0", "0000:00:1f.3", "0000:01:00.0", "0001:00:00.0"])
    }
}

@Suite struct ResourceFileTests {
    // A transitional virtio-balloon under QEMU 7.2: BAR0 I/O (64 B), BAR4 64-bit
    // prefetchable MMIO (16 KiB), nothing else.
    let transitional = """
    0x000000000000c040 0x000000000000c07f 0x0000000000040101
    0x0000000000000000 0x0000000000000000 0x0000000000000000
    0x0000000000000000 0x0000000000000000 0x0000000000000000
    0x0000000000000000 0x0000000000000000 0x0000000000000000
    0x0000000fe0004000 0x0000000fe0007fff 0x000000000014220c
    0x0000000000000000 0x0000000000000000 0x0000000000000000
    0x0000000000000000 0x0000000000000000 0x0000000000000000

    """

    @Test func parsesTransitionalBalloon() throws {
        let r = try parseSysfsResourceFile(transitional)
        #expect(r.count == 7)
        #expect(r[0].isPresent && r[0].isIO && !r[0].isMemory)
        #expect(r[0].size == 64)
        #expect(r[4].isPresent && r[4].isMemory && r[4].is64Bit && r[4].isPrefetchable && !r[4].isIO)
        #expect(r[4].start == 0xf_e000_4000)
        #expect(r[4].size == 0x4000)
        for i in [1, 2, 3, 5, 6] {
            #expect(!r[i].isPresent)
            #expect(r[i].size == 0)
        }
    }

    @Test func rejectsWrongFieldCount() {
        #expect(throws: PlatformError.malformedFile(path: "res", reason: .resourceFieldCount(line: 2, fields: 2, text: "0x0 0x0"))) {
            try parseSysfsResourceFile("0x0 0x0 0x0\n0x0 0x0\n", path: "res")
        }
        #expect(PlatformError.malformedFile(path: "res", reason: .resourceFieldCount(line: 2, fields: 2, text: "0x0 0x0")).description
            == "unexpected contents in res: line 2 has 2 fields, expected 'start end flags': 0x0 0x0")
    }

    @Test func rejectsNonHex() {
        #expect(throws: PlatformError.self) { try parseSysfsResourceFile("0x0 0xzz 0x0\n") }
    }

    @Test func rejectsEndBelowStart() {
        #expect(throws: PlatformError.self) { try parseSysfsResourceFile("0x2000 0x1000 0x200\n") }
    }

    @Test func describesBARKinds() throws {
        let r = try parseSysfsResourceFile(transitional)
        #expect(r[4].description.contains("64-bit prefetchable memory"))
        #expect(r[0].description.hasPrefix("I/O"))
        #expect(r[1].description == "absent")
    }
}

@Suite struct PagemapDecodingTests {
    @Test func decodesBits() {
        let e = PagemapEntry(rawValue: 1 << 63 | 1 << 61 | 1 << 56 | 1 << 55 | 0x12345)
        #expect(e.present)
        #expect(!e.swapped)
        #expect(e.fileOrShared)
        #expect(e.exclusive)
        #expect(e.softDirty)
        #expect(e.pfn == 0x12345)
        // Bits above 54 never leak into the PFN.
        #expect(PagemapEntry(rawValue: UInt64.max).pfn == (1 << 55) - 1)
    }

    @Test func translatesPresentPage() throws {
        let e = PagemapEntry(rawValue: 1 << 63 | 0x1_2345)
        let pa = try physicalAddress(from: e, virtualAddress: 0x7f00_0000_1abc, pageSize: 4096)
        #expect(pa == PhysicalAddress(0x1_2345_000 + 0xabc))
    }

    @Test func pfnZeroNeedsCapSysAdmin() {
        do {
            _ = try physicalAddress(from: PagemapEntry(rawValue: 1 << 63), virtualAddress: 0x1000)
            Issue.record("PFN 0 must be an error")
        } catch {
            #expect(error == .pagemap(.pfnHidden(virtualAddress: 0x1000)))
            // The rendered message tells the operator why and what to do.
            #expect(error.description.contains("CAP_SYS_ADMIN"))
            #expect(error.description.contains("PFN 0"))
        }
    }

    @Test func notPresentAndSwappedAreErrors() {
        do {
            _ = try physicalAddress(from: PagemapEntry(rawValue: 0), virtualAddress: 0x1000)
            Issue.record("not present must be an error")
        } catch { #expect(error == .pagemap(.notPresent(virtualAddress: 0x1000))) }
        do {
            _ = try physicalAddress(from: PagemapEntry(rawValue: 1 << 62 | 0x55), virtualAddress: 0x1000)
            Issue.record("swapped must be an error")
        } catch { #expect(error == .pagemap(.swappedOut(virtualAddress: 0x1000))) }
    }
}

@Suite struct MemInfoTests {
    let sample = """
    MemTotal:       24580976 kB
    MemFree:        20123456 kB
    MemAvailable:   22000000 kB
    AnonHugePages:         0 kB
    HugePages_Total:       3
    HugePages_Free:        2
    HugePages_Rsvd:        1
    HugePages_Surp:        0
    Hugepagesize:       2048 kB
    Hugetlb:            6144 kB

    """

    @Test func parsesUnitsAndCounts() throws {
        let m = try MemInfo(parsing: sample)
        #expect(m.memTotal == 24_580_976 * 1024)
        #expect(m.memAvailable == 22_000_000 * 1024)
        #expect(m.hugePagesTotal == 3)
        #expect(m.hugePagesFree == 2)
        #expect(m.hugePagesReserved == 1)
        #expect(m.hugePagesAvailable == 1)
        #expect(m.hugePageSize == 2 << 20)
        #expect(m["Hugetlb"] == 6144 * 1024)
        #expect(m["Nope"] == nil)
    }

    @Test func parsesThisMachine() throws {
        let m = try MemInfo.read()
        #expect((m.memTotal ?? 0) > 0)
    }

    @Test(arguments: ["MemTotal 12 kB", "MemTotal: twelve kB", "MemTotal: 12 MB", "MemTotal: 12 kB extra"])
    func rejectsMalformed(_ line: String) {
        #expect(throws: PlatformError.self) { try MemInfo(parsing: line + "\n") }
    }
}

@Suite struct LockdownParserTests {
    @Test func findsBracketedMode() {
        #expect(selectedLockdownMode("[none] integrity confidentiality\n") == "none")
        #expect(selectedLockdownMode("none [integrity] confidentiality\n") == "integrity")
        #expect(selectedLockdownMode("none integrity [confidentiality]\n") == "confidentiality")
        #expect(selectedLockdownMode("none integrity confidentiality\n") == nil)
        #expect(selectedLockdownMode("") == nil)
    }
}

@Suite struct CPUIDTests {
    @Test func classifiesSignatures() {
        #expect(hypervisor(fromCPUIDSignature: Array("TCGTCGTCGTCG".utf8)) == .tcg)
        #expect(hypervisor(fromCPUIDSignature: Array("KVMKVMKVM".utf8) + [0, 0, 0]) == .kvm)
        #expect(hypervisor(fromCPUIDSignature: Array("Microsoft Hv".utf8)) == .other("Microsoft Hv"))
        #expect(hypervisor(fromCPUIDSignature: [UInt8](repeating: 0, count: 12)) == .none)
        #expect(hypervisor(fromCPUIDSignature: Array("TCGTCG".utf8)) == .none)
        // KVM without the NUL padding is not KVM.
        #expect(hypervisor(fromCPUIDSignature: Array("KVMKVMKVMKVM".utf8)) == .other("KVMKVMKVMKVM"))
    }

    @Test func assemblesRegistersLittleEndian() {
        // QEMU TCG: ebx="TCGT", ecx="CGTC", edx="GTCG" as little-endian words.
        let bytes = cpuidSignatureBytes(ebx: 0x5447_4354, ecx: 0x4354_4743, edx: 0x4743_5447)
        #expect(String(decoding: bytes, as: UTF8.self) == "TCGTCGTCGTCG")
        #expect(hypervisor(fromCPUIDSignature: bytes) == .tcg)
        // KVM: "KVMK" "VMKV" "M\0\0\0".
        let kvm = cpuidSignatureBytes(ebx: 0x4b4d_564b, ecx: 0x564b_4d56, edx: 0x0000_004d)
        #expect(hypervisor(fromCPUIDSignature: kvm) == .kvm)
    }

    @Test func detectionAgreesWithTheSignatureOnThisMachine() {
        let h = detectHypervisor()
        if let sig = cpuidHypervisorSignature() {
            #expect(h == hypervisor(fromCPUIDSignature: sig))
        } else {
            #expect(h == .none)
        }
        #expect(isRunningUnderTCG() == (h == .tcg))
        #expect(isRunningUnderKVM() == (h == .kvm))
    }
}

@Suite struct DeviceNumberTests {
    @Test func encodesLikeGlibc() {
        #expect(linuxDeviceNumber(major: 243, minor: 0) == 0xf300)
        #expect(linuxDeviceNumber(major: 1, minor: 3) == 0x103)
        #expect(linuxDeviceNumber(major: 8, minor: 0x123) == 0x10_0823)
        #expect(linuxDeviceNumber(major: 0x1234, minor: 0x56789) == 0x0000_1000_5672_3489)
    }
}

@Suite struct PollTimeoutTests {
    @Test("a wait becomes poll's milliseconds rounded up (time left never becomes a zero-timeout spin); nil and waits beyond Int32 milliseconds block")
    func roundsUpToMilliseconds() {
        #expect(pollTimeoutMilliseconds(nil) == -1)
        #expect(pollTimeoutMilliseconds(.zero) == 0)
        #expect(pollTimeoutMilliseconds(.nanoseconds(-5)) == 0)
        #expect(pollTimeoutMilliseconds(Duration(attoseconds: 1)) == 1)
        #expect(pollTimeoutMilliseconds(.microseconds(300)) == 1)
        #expect(pollTimeoutMilliseconds(.milliseconds(250)) == 250)
        #expect(pollTimeoutMilliseconds(.milliseconds(250) + Duration(attoseconds: 1)) == 251)
        #expect(pollTimeoutMilliseconds(.seconds(60)) == 60_000)
        #expect(pollTimeoutMilliseconds(.seconds(Int64(Int32.max))) == -1)
    }
}
