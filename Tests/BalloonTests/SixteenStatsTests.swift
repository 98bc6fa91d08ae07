import Foundation
import Testing
import BalloonSimulator
import VirtioCore
import VirtioPCI
@testable import Balloon

/// /proc/vmstat of a 6.12 guest after memory pressure (the lines the stats use, and
/// look-alikes that must not count: khugepaged scans, anon/file split, per-zone pgsteal).
private let vmstat612 = """
    nr_free_pages 150000
    nr_file_pages 2000
    pgfault 123456
    pgmajfault 12
    pswpin 30
    pswpout 400
    allocstall_dma 1
    allocstall_dma32 20
    allocstall_normal 300
    allocstall_movable 4000
    allocstall_device 0
    pgsteal_kswapd 5000
    pgsteal_direct 600
    pgsteal_khugepaged 7
    pgscan_kswapd 9000
    pgscan_direct 800
    pgscan_khugepaged 9
    pgscan_direct_throttle 3
    pgscan_anon 9800
    pgscan_file 0
    pgsteal_anon 5600
    pgsteal_file 0
    htlb_buddy_alloc_success 5
    htlb_buddy_alloc_fail 1
    oom_kill 2

    """
private let meminfo = "MemTotal:        1000 kB\nMemFree:          500 kB\nMemAvailable:     700 kB\nBuffers:           10 kB\nCached:            20 kB\n"

/// Reads fixed file contents (the guest's /proc as a test sets it).
private final class FakeProc {
    var files: [String: String]
    init(_ files: [String: String]) { self.files = files }
    func read(_ path: String) -> String? { files[path] }
}

@Suite("The sixteen stats of Linux 6.12 (docs/virtio-balloon.md §11)")
struct SixteenStatsTests {
    @Test("the six 6.12 stats come from /proc/vmstat as update_balloon_vm_stats computes them: oom_kill, the sum of every zone's allocstall, kswapd/direct scans and steals in bytes")
    func linux612Values() {
        let s = computeBalloonStats(vmstat: vmstat612, meminfo: meminfo)
        let d = Dictionary(uniqueKeysWithValues: s.map { ($0.tag, $0.value) })
        #expect(d[.oomKills] == 2)
        #expect(d[.allocationStalls] == 1 + 20 + 300 + 4000 + 0)
        #expect(d[.asyncScans] == 9000 * 4096)
        #expect(d[.directScans] == 800 * 4096)
        #expect(d[.asyncReclaims] == 5000 * 4096)
        #expect(d[.directReclaims] == 600 * 4096)
        // The ten older stats are unchanged.
        #expect(d[.swapIn] == 30 * 4096 && d[.swapOut] == 400 * 4096)
        #expect(d[.majorFaults] == 12 && d[.minorFaults] == 123456)
        #expect(d[.hugetlbAllocations] == 5 && d[.hugetlbFailures] == 1)
        #expect(d[.memFree] == 500 * 1024 && d[.memTotal] == 1000 * 1024 && d[.available] == 700 * 1024)
        #expect(d[.caches] == 2000 * 4096)
        // A 64 KiB-page guest counts scans and steals in its own pages.
        let big = Dictionary(uniqueKeysWithValues: computeBalloonStats(vmstat: vmstat612, meminfo: meminfo, pageSize: 65536).map { ($0.tag, $0.value) })
        #expect(big[.asyncScans] == 9000 * 65536 && big[.oomKills] == 2)
    }

    @Test("all sixteen tags, each once, in Linux 6.12's order: vm events (0-3, 10-15, 8, 9), then memory (4-7)")
    func order() {
        let s = computeBalloonStats(vmstat: vmstat612, meminfo: meminfo)
        #expect(s.map(\.tag.rawValue) == [0, 1, 2, 3, 10, 11, 12, 13, 14, 15, 8, 9, 4, 5, 6, 7])
        #expect(Set(s.map(\.tag)) == Set(BalloonStatTag.allCases))
        #expect(encodeBalloonStats(s).count == 160)
    }

    @Test("a kernel without the counters (empty or older /proc/vmstat) gives 0, and a pre-4.10 single allocstall line counts")
    func missingCounters() {
        let d = Dictionary(uniqueKeysWithValues: computeBalloonStats(vmstat: "", meminfo: "").map { ($0.tag, $0.value) })
        #expect(d.count == 16 && d.values.allSatisfy { $0 == 0 })
        let old = Dictionary(uniqueKeysWithValues: computeBalloonStats(vmstat: "allocstall 17\npgfault 3\n", meminfo: "").map { ($0.tag, $0.value) })
        #expect(old[.allocationStalls] == 17 && old[.minorFaults] == 3)
    }

    @Test("counters near UInt64.max wrap like the kernel's unsigned arithmetic instead of trapping")
    func hugeCountersDoNotTrap() {
        let max = UInt64.max
        let vmstat = "pgscan_kswapd \(max)\npswpin \(max)\nallocstall_normal \(max)\nallocstall_movable 2\nnr_file_pages \(max)\n"
        let d = Dictionary(uniqueKeysWithValues: computeBalloonStats(vmstat: vmstat, meminfo: "MemFree: \(max) kB\n").map { ($0.tag, $0.value) })
        #expect(d[.asyncScans] == max &* 4096)
        #expect(d[.allocationStalls] == 1)  // max + 2 wraps to 1
        #expect(d[.memFree] == max &* 1024)
    }

    @Test("QOM names of the sixteen tags are QEMU's balloon_stat_names")
    func qemuNames() {
        #expect(BalloonStatTag.allCases.count == 16)
        #expect(BalloonStatTag.allCases.map(\.rawValue) == Array(0..<16))
        #expect(BalloonStatTag.oomKills.qemuName == "stat-oom-kills")
        #expect(BalloonStatTag.allocationStalls.qemuName == "stat-alloc-stalls")
        #expect(BalloonStatTag.asyncScans.qemuName == "stat-async-scans")
        #expect(BalloonStatTag.directScans.qemuName == "stat-direct-scans")
        #expect(BalloonStatTag.asyncReclaims.qemuName == "stat-async-reclaims")
        #expect(BalloonStatTag.directReclaims.qemuName == "stat-direct-reclaims")
        #expect(Set(BalloonStatTag.allCases.map(\.qemuName)).count == 16)
        #expect(BalloonStatTag.virtio12.map(\.rawValue) == Array(0..<10))
    }
}

@Suite("Stats against the simulated QEMU 7.2 and QEMU 10.0 (docs/virtio-balloon.md §11)")
struct QEMUVersionStatsTests {
    /// A driver whose stats come from `proc`, brought up against a device of `version`.
    private static func bringUp(_ version: SimulatedQEMUVersion, _ proc: FakeProc) throws -> (SimulatedBalloonDevice, BalloonDriver<ModernPCITransport>, SimulatedInterruptLine) {
        var props = BalloonDeviceProperties()
        props.qemuVersion = version
        let device = SimulatedBalloonDevice(properties: props)
        let line = device.makeInterruptLine()
        let driver = BalloonDriver(transport: try device.makeTransport(), allocator: device.makeDMAAllocator(),
                                   statsSource: ProcStatsSource(readFile: proc.read))
        try driver.bringUp()
        return (device, driver, line)
    }

    private static func serviceAll(_ driver: BalloonDriver<ModernPCITransport>, _ line: SimulatedInterruptLine) throws {
        var n = 0
        while try line.wait(timeoutMilliseconds: 0), n < 100 {
            try driver.serviceInterrupt(line: line)
            n += 1
        }
    }

    @Test("QEMU 10.0 keeps all sixteen tags: guest-stats shows every one set, and they follow /proc on the next request")
    func qemu10ShowsSixteen() throws {
        let proc = FakeProc(["/proc/vmstat": vmstat612, "/proc/meminfo": meminfo])
        let (device, driver, line) = try Self.bringUp(.v10_0, proc)
        #expect(device.stats.count == 16)
        var gs = device.guestStats
        #expect(gs.count == 16)
        #expect(gs.values.allSatisfy { $0 != UInt64.max }, "\(gs)")
        #expect(gs["stat-oom-kills"] == 2 && gs["stat-alloc-stalls"] == 4321 && gs["stat-direct-reclaims"] == 600 * 4096)

        proc.files["/proc/vmstat"] = vmstat612.replacingOccurrences(of: "oom_kill 2", with: "oom_kill 3")
            .replacingOccurrences(of: "pgscan_direct 800", with: "pgscan_direct 900")
        device.requestStats()
        try Self.serviceAll(driver, line)
        gs = device.guestStats
        #expect(device.statsUpdates == 2)
        #expect(gs["stat-oom-kills"] == 3 && gs["stat-direct-scans"] == 900 * 4096)
        #expect(!device.status.contains(.needsReset))
    }

    @Test("QEMU 7.2 ignores tags 10-15 and keeps the ten it knows, which still update")
    func qemu72IgnoresUnknownTags() throws {
        let proc = FakeProc(["/proc/vmstat": vmstat612, "/proc/meminfo": meminfo])
        let (device, driver, line) = try Self.bringUp(.v7_2, proc)
        #expect(Set(device.stats.keys) == Set(0..<10))
        #expect(Set(device.guestStats.keys) == Set(BalloonStatTag.virtio12.map(\.qemuName)))
        #expect(device.guestStats["stat-minor-faults"] == 123456)

        proc.files["/proc/vmstat"] = vmstat612.replacingOccurrences(of: "pgfault 123456", with: "pgfault 200000")
        device.requestStats()
        try Self.serviceAll(driver, line)
        #expect(device.statsUpdates == 2)
        #expect(device.guestStats["stat-minor-faults"] == 200000)
        #expect(device.guestStats.count == 10 && device.guestStats.values.allSatisfy { $0 != UInt64.max })
        #expect(!device.status.contains(.needsReset))
    }

    @Test("a buffer without the 6.12 tags (a 6.1 guest's ten) leaves them unset on QEMU 10.0, as QEMU's reset_stats does")
    func qemu10TenTagBuffer() throws {
        var props = BalloonDeviceProperties()
        props.qemuVersion = .v10_0
        let device = SimulatedBalloonDevice(properties: props)
        let driver = BalloonDriver(transport: try device.makeTransport(), allocator: device.makeDMAAllocator(), statsSource: TenTagStats())
        try driver.bringUp()
        let gs = device.guestStats
        #expect(gs.count == 16)
        #expect(gs["stat-oom-kills"] == UInt64.max && gs["stat-free-memory"] == 7)
    }
}

/// The ten stats a 6.1 kernel sends.
private final class TenTagStats: BalloonStatsSource {
    func collect() -> [BalloonStat] { BalloonStatTag.virtio12.map { BalloonStat($0, 7) } }
}
