import Testing
@testable import GuestMemoryLinux
@testable import HintSourcesLinux
@testable import BalloonMemoryLinux
import BalloonBlocks
import PlatformLinux

/// The guardian recovers right after a kill, while the killed balloond may still be a zombie
/// (its parent has not reaped it): a zombie holds nothing, so its state files are recovered.
@Suite("Recovery after a kill: a zombie writer is not a running balloond")
struct KilledWorkerRecoveryFaultInjectionTests {
    @Test("a state file written by a balloond that is now a zombie is recovered; a running one is left alone")
    func zombieWriterIsRecovered() throws {
        let f = BalloonFixture()
        try HugeTLBBalloonMemoryTests.leaveCrashState(f, original: 0, set: 4, previous: 0, pid: 4242)
        f.tree.file("/proc/4242/comm", "balloond\n")
        f.tree.file("/proc/4242/stat", "4242 (balloond) S 1 4242 4242 0 -1 4194560 0 0 0 0 5 3 0 0 20 0 1 0 100 0 0\n")
        #expect(try HugeTLBBalloonMemory.recoverAfterCrash(root: f.tree.root) == .otherInstanceRunning(pid: 4242))

        f.tree.file("/proc/4242/stat", "4242 (balloond) Z 1 4242 4242 0 -1 4194316 0 0 0 0 5 3 0 0 20 0 1 0 100 0 0\n")
        #expect(try HugeTLBBalloonMemory.recoverAfterCrash(root: f.tree.root) == .restored(sysctl: "/proc/sys/vm/nr_overcommit_hugepages", from: 4, to: 0))
        #expect(f.overcommit == "0\n" && f.hugeState == nil)
    }
}
