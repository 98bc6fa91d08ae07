#if canImport(Glibc)
import Glibc
#endif
import Logging
import PlatformLinux
import TestSupport
import Testing
@testable import GuestMemoryLinux

/// `FakeMemoryBlocks` whose online writes fail for the `stuck` blocks (they stay offline).
final class StuckOnlineMemoryBlocks: MemoryBlockControl {
    let base: FakeMemoryBlocks
    var stuck: Set<Int> = []
    init(_ base: FakeMemoryBlocks) { self.base = base }
    var blockBytes: UInt64 { base.blockBytes }
    func offlinableBlocks() throws(GuestMemoryError) -> [Int] { try base.offlinableBlocks() }
    func isOffline(_ index: Int) -> Bool? { base.isOffline(index) }
    func offline(_ index: Int, timeoutMilliseconds: Int) -> MemoryBlockOfflineResult {
        base.offline(index, timeoutMilliseconds: timeoutMilliseconds)
    }
    func online(_ index: Int) throws(GuestMemoryError) {
        guard !stuck.contains(index) else {
            throw .cannotOnline(block: index, path: "/sys/devices/system/memory/memory\(index)/state",
                                SystemCallError(call: "write", path: nil, errno: .noMemory))
        }
        try base.online(index)
    }
}

/// The state file an `OfflineBlockLedger` keeps lists every block its owner may have offlined:
/// listed before the offline write, unlisted only once the block is online again.
@Suite struct OfflineBlockLedgerTests {
    static let statePath = OfflineBlockStateFile.defaultPath
    static let deadWriter = "pid=2147483000\ncomm=balloond\n"

    struct Setup {
        let tree = FakeTree()
        let blocks: FakeMemoryBlocks
        let control: StuckOnlineMemoryBlocks

        /// Blocks 0..<n, online; each offline write records what the state file said then.
        init(blocks n: Int = 4) {
            blocks = FakeMemoryBlocks(blockBytes: 4 << 20, present: Array(0..<n))
            control = StuckOnlineMemoryBlocks(blocks)
            tree.directory("/run/balloond")
            _ = chmod(tree.at("/run/balloond"), 0o700)
            let t = tree
            blocks.readState = { t.read(OfflineBlockLedgerTests.statePath) }
        }

        func ledger() -> OfflineBlockLedger {
            OfflineBlockLedger(stateFile: OfflineBlockStateFile(root: tree.root), control: control, logger: Logger(label: "test"))
        }

        var state: String? { tree.read(OfflineBlockLedgerTests.statePath) }
    }

    func offline(_ ledger: OfflineBlockLedger, _ b: Int) throws -> MemoryBlockOfflineResult {
        try ledger.offline(b, timeoutMilliseconds: 100) { _ in }
    }

    @Test func aBlockIsListedBeforeItsOfflineWriteAndRecordedOnceOffline() throws {
        let s = Setup()
        let ledger = s.ledger()
        #expect(try offline(ledger, 1) == .offlined)
        #expect(try offline(ledger, 3) == .offlined)
        #expect(s.blocks.offlineCalls == [1, 3])
        #expect(s.blocks.stateAtOffline[0]?.contains("blocks=1\n") == true, "a SIGKILL during the write must leave block 1 listed")
        #expect(s.blocks.stateAtOffline[1]?.contains("blocks=1,3\n") == true, "listed with the blocks held already")
        #expect(ledger.blocks == [1, 3])
        #expect(s.state?.contains("blocks=1,3\npid=\(Sys.processID)\n") == true)
    }

    @Test func aBlockWhoseListingCannotBeWrittenIsNeverOfflined() throws {
        let s = Setup()
        let ledger = s.ledger()
        #expect(chmod(s.tree.at("/run/balloond"), 0o755) == 0)  // refused: a state directory others can read
        #expect(throws: GuestMemoryError.self) { try offline(ledger, 2) }
        #expect(s.blocks.offlineCalls.isEmpty && s.blocks.offline.isEmpty)
        #expect(ledger.blocks.isEmpty)
    }

    @Test func aFailedOfflineIsUnlistedAgainAfterTheOwnersBookkeeping() throws {
        let s = Setup()
        let ledger = s.ledger()
        _ = try offline(ledger, 0)
        s.blocks.refuse[2] = .busy
        var failure: MemoryBlockOfflineResult?
        var stateWhenFailed: String?
        let result = try ledger.offline(2, timeoutMilliseconds: 100) { r in
            failure = r
            stateWhenFailed = s.state
        }
        #expect(result == .busy && failure == .busy, "the owner hears why")
        #expect(s.blocks.stateAtOffline.last??.contains("blocks=0,2\n") == true, "listed during the offline write")
        #expect(stateWhenFailed?.contains("blocks=0,2\n") == true, "the owner's bookkeeping runs before the unlisting")
        #expect(s.state?.contains("blocks=0\n") == true, "the kernel left it online: unlisted")
        #expect(ledger.blocks == [0])
        let alone = Setup()
        alone.blocks.refuse[1] = .timedOut(milliseconds: 100)
        #expect(try offline(alone.ledger(), 1) == .timedOut(milliseconds: 100))
        #expect(alone.state == nil, "nothing recorded: no file")
    }

    @Test func aBlockThatFailsToOnlineStaysOfflineAndListed() throws {
        let s = Setup()
        let ledger = s.ledger()
        for b in [0, 1, 2] { _ = try offline(ledger, b) }
        s.control.stuck = [1]
        var onlined: [Int] = []
        ledger.online([0, 1, 2]) { onlined.append($0) }
        #expect(onlined == [0, 2])
        #expect(s.blocks.offline == [1], "the kernel kept it offline")
        #expect(ledger.blocks == [1])
        #expect(s.state?.contains("blocks=1\n") == true, "listed for the guardian or the next start")
        s.control.stuck = []
        ledger.online([1])
        #expect(ledger.blocks.isEmpty && s.blocks.offline.isEmpty)
        #expect(s.state == nil, "everything online: no file")
    }

    @Test func leftoversOfADeadWriterAreAdoptedOnceWithoutRewritingTheFile() throws {
        let s = Setup()
        s.blocks.offline = [1, 3]
        let left = "blocks=1,2,3\n" + Self.deadWriter
        s.tree.stateFile(Self.statePath, left)
        let ledger = s.ledger()
        let adopted = try #require(ledger.adoptLeftovers())
        #expect(adopted.blocks == [1, 3], "block 2 is online again: nothing to take over")
        #expect(adopted.pid == 2147483000)
        #expect(ledger.blocks == [1, 3])
        #expect(s.state == left, "the file lists them already")
        #expect(ledger.adoptLeftovers()?.blocks == nil, "looked at once")
        _ = try offline(ledger, 0)
        #expect(s.blocks.stateAtOffline.last??.contains("blocks=0,1,3\npid=\(Sys.processID)\n") == true, "kept listed, now under this process")
        ledger.record()
        #expect(s.state?.contains("blocks=0,1,3\n") == true)
    }

    @Test func leftoversOfALiveWriterOrOfThisProcessAreLeftAlone() throws {
        let live = Setup()
        live.blocks.offline = [1]
        live.tree.file("/proc/4242/comm", "balloond\n")
        let running = "blocks=1\npid=4242\ncomm=balloond\n"
        live.tree.stateFile(Self.statePath, running)
        let ledger = live.ledger()
        #expect(ledger.adoptLeftovers()?.blocks == nil, "a running balloond's blocks are its own")
        #expect(ledger.blocks.isEmpty && live.state == running)

        let own = Setup()
        own.blocks.offline = [2]
        own.tree.stateFile(Self.statePath, "blocks=2\npid=\(Sys.processID)\ncomm=balloond\n")
        #expect(own.ledger().adoptLeftovers()?.blocks == nil, "this process's own file")
    }

    @Test func blocksSomeoneElseOnlinedAreForgottenWithoutTouchingTheKernel() throws {
        let s = Setup()
        let ledger = s.ledger()
        for b in [0, 1] { _ = try offline(ledger, b) }
        ledger.record(forgetting: [1])
        #expect(ledger.blocks == [0])
        #expect(s.state?.contains("blocks=0\n") == true)
        #expect(s.blocks.onlineCalls.isEmpty)
    }
}
