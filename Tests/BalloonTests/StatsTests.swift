import Testing
import BalloonSimulator
import VirtioCore
import VirtioPCI
import VirtioQueue
import FreePages
@testable import Balloon

@Suite("Stats values (docs/virtio-balloon.md §5)")
struct StatsTests {
    @Test("stats come from /proc/vmstat and /proc/meminfo as Linux computes them, all sixteen tags in Linux 6.12's order")
    func compute() {
        let vmstat = "nr_free_pages 1000\nnr_file_pages 300\npswpin 2\npswpout 3\npgmajfault 7\npgfault 99\nhtlb_buddy_alloc_success 5\nhtlb_buddy_alloc_fail 1\n"
        let meminfo = "MemTotal:        1000 kB\nMemFree:          500 kB\nMemAvailable:     700 kB\nBuffers:           10 kB\nCached:            20 kB\n"
        let s = computeBalloonStats(vmstat: vmstat, meminfo: meminfo)
        #expect(s.map(\.tag.rawValue) == [0, 1, 2, 3, 10, 11, 12, 13, 14, 15, 8, 9, 4, 5, 6, 7])
        let d = Dictionary(uniqueKeysWithValues: s.map { ($0.tag, $0.value) })
        #expect(d[.swapIn] == 2 * 4096 && d[.swapOut] == 3 * 4096)
        #expect(d[.majorFaults] == 7 && d[.minorFaults] == 99)
        #expect(d[.memFree] == 500 * 1024 && d[.memTotal] == 1000 * 1024 && d[.available] == 700 * 1024)
        #expect(d[.caches] == 300 * 4096)
        #expect(d[.hugetlbAllocations] == 5 && d[.hugetlbFailures] == 1)
    }

    @Test("entries are packed 10-byte little-endian {le16 tag, le64 val}")
    func encoding() {
        let bytes = encodeBalloonStats([BalloonStat(.memFree, 0x0102_0304_0506_0708), BalloonStat(.caches, 1)])
        #expect(bytes.count == 20)
        #expect(Array(bytes[0..<10]) == [4, 0, 8, 7, 6, 5, 4, 3, 2, 1])
        #expect(Array(bytes[10..<12]) == [7, 0])
    }
}
