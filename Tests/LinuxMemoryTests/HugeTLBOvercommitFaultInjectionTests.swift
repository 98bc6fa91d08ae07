import FreePages
import Testing
@testable import GuestMemoryLinux
@testable import HintSourcesLinux
@testable import BalloonMemoryLinux
import BalloonBlocks
import PlatformLinux

/// Issue 9 L6: nr_overcommit_hugepages near ULONG_MAX must not trap.
@Suite("hugetlb balloon memory with a huge nr_overcommit_hugepages (issue 9 L6)")
struct HugeTLBOvercommitFaultInjectionTests {
    @Test("nr_overcommit_hugepages at ULONG_MAX makes take fail with a message, not an overflow trap")
    func overcommitAtMaximumIsAnError() throws {
        let f = BalloonFixture(overcommit: UInt64.max)
        let m = try f.hugeBackend()
        #expect { _ = try m.take(maxPages: 4 * 512, hugeOnly: true) } throws: { e in
            guard case .overcommitOverflow(_, let value, let raiseBy)? = reason(e, as: LinuxBalloonMemoryError.self) else { return false }
            return value == UInt64.max && raiseBy == 4 && "\(e)".contains("would overflow")
        }
        #expect(m.heldBytes == 0)
        #expect(f.overcommit == "\(UInt64.max)\n", "left as it was")
    }
}
