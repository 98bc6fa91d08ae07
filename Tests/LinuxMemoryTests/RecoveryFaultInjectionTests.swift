#if canImport(Glibc)
import Glibc
#endif
import TestSupport
import Logging
import Testing
@testable import GuestMemoryLinux
@testable import HintSourcesLinux
@testable import BalloonMemoryLinux
import BalloonBlocks
import PlatformLinux

/// Crash recovery against tampered, malformed, symlinked and wrong-mode state files, hostile
/// sysctl names, and settings an admin changed after the crash.
@Suite struct RecoveryFaultInjectionTests {
    static let pool = "/run/balloond/hugetlb-pool"
    static let compact = "/run/balloond/balloon-compact.state"
    static let overcommit = "/run/balloond/balloon-hugetlb.state"
    static let compactSetting = "/proc/sys/vm/compact_unevictable_allowed"
    static let overcommitSetting = "/proc/sys/vm/nr_overcommit_hugepages"

    /// A fake tree with a hugetlb pool of `poolSize` free pages and both sysctls.
    static func setup(poolSize: UInt64 = 1) -> (FakeTree, FakeHugeTLBKernel) {
        let tree = FakeTree()
        let kernel = FakeHugeTLBKernel(tree: tree, ramMiB: 64, buddyFrames: Array(8..<32))
        try! kernel.setPoolSize(poolSize)
        kernel.setPoolSizeCalls = []
        tree.file(compactSetting, "1\n")
        tree.file(overcommitSetting, "0\n")
        return (tree, kernel)
    }

    static func poolState(before: UInt64, set: UInt64, previous: UInt64, pid: Int32 = 999_999) -> String {
        "nr_hugepages_before=\(before)\nnr_hugepages_set=\(set)\nnr_hugepages_previous=\(previous)\npid=\(pid)\ncomm=balloond\n"
    }

    // MARK: malformed files are set aside, never acted on, and do not block the next start

    static let malformedPoolFiles: [String] = [
        "garbage\n",
        "nr_hugepages_before=1\n",                                                            // missing keys
        poolState(before: 1, set: 3, previous: 3) + "extra=1\n",                              // unknown key
        poolState(before: 1, set: 3, previous: 3) + "nr_hugepages_before=0\n",                // duplicate key
        poolState(before: 1, set: 3, previous: 3).replacingFirst("before=1", "before=-1"),    // signed
        poolState(before: 1, set: 3, previous: 3).replacingFirst("before=1", "before= 1"),    // space
        poolState(before: 1, set: 3, previous: 3).replacingFirst("before=1", "before=1e3"),   // not decimal
        poolState(before: 1, set: 3, previous: 3).replacingFirst("before=1", "before=99999999999999999999999"), // overflow
        poolState(before: 1, set: 3, previous: 3).replacingFirst("pid=999999", "pid=0"),      // no such pid
        "\n" + poolState(before: 1, set: 3, previous: 3),                                     // blank line
    ]

    @Test("a malformed hugetlb pool state file is set aside as .bad and the pool is not touched", arguments: malformedPoolFiles)
    func malformedPoolFileIsSetAsideNotActedOn(contents: String) throws {
        let (tree, kernel) = Self.setup(poolSize: 3)
        tree.stateFile(Self.pool, contents)
        let outcome = try HugeTLBPoolSource.recoverAfterCrash(root: tree.root, control: kernel)
        guard case .setAside(_, let to, _) = outcome else { Issue.record("expected setAside, got \(outcome)"); return }
        #expect(to == tree.at(Self.pool + ".bad"))
        #expect(kernel.setPoolSizeCalls.isEmpty && kernel.total == 3, "nothing of the file is used")
        #expect(!tree.exists(Self.pool) && tree.read(Self.pool + ".bad") == contents)
        #expect(try HugeTLBPoolSource.recoverAfterCrash(root: tree.root, control: kernel) == .nothingToDo, "the next start proceeds")
    }

    @Test func aMalformedPoolFileDoesNotBlockTheHintSource() throws {
        let (tree, kernel) = Self.setup(poolSize: 1)
        tree.stateFile(Self.pool, "garbage\n")
        let source = try HugeTLBPoolSource(root: tree.root, control: kernel, options: .init(limits: HugeTLBPoolSourceTests.limits(), firstStepBytes: 4 << 20, maxStepBytes: 8 << 20))
        try source.beginRound(id: 1)
        #expect(tree.exists(Self.pool + ".bad"))
        #expect(tree.read(Self.pool)?.hasPrefix("nr_hugepages_before=1\n") == true, "a fresh file for this session")
        source.releaseAll()
    }

    @Test func aSymlinkedStateFileIsNotFollowed() throws {
        let (tree, kernel) = Self.setup(poolSize: 3)
        tree.file("/elsewhere", Self.poolState(before: 1, set: 3, previous: 3))
        tree.stateFile("/run/balloond/placeholder", "")
        #expect(symlink(tree.at("/elsewhere"), tree.at(Self.pool)) == 0)
        let outcome = try HugeTLBPoolSource.recoverAfterCrash(root: tree.root, control: kernel)
        guard case .setAside(_, _, let reason) = outcome else { Issue.record("expected setAside, got \(outcome)"); return }
        #expect(reason == .fileIsSymlink(path: tree.at(Self.pool)), "\(reason)")
        #expect(kernel.setPoolSizeCalls.isEmpty && kernel.total == 3)
        #expect(tree.read("/elsewhere") == Self.poolState(before: 1, set: 3, previous: 3), "the link's target is untouched")
    }

    @Test func aStateFileWritableByOthersIsNotTrusted() throws {
        let (tree, kernel) = Self.setup(poolSize: 3)
        tree.stateFile(Self.pool, Self.poolState(before: 1, set: 3, previous: 3))
        #expect(chmod(tree.at(Self.pool), 0o666) == 0)
        let outcome = try HugeTLBPoolSource.recoverAfterCrash(root: tree.root, control: kernel)
        guard case .setAside(_, _, let reason) = outcome else { Issue.record("expected setAside, got \(outcome)"); return }
        guard case .fileWritableByOthers(tree.at(Self.pool), let mode) = reason else { Issue.record("expected fileWritableByOthers, got \(reason)"); return }
        #expect(mode & 0o7777 == 0o666)
        #expect(kernel.total == 3)
    }

    @Test func aFIFOInPlaceOfAStateFileIsRefusedWithoutHanging() throws {
        let (tree, kernel) = Self.setup(poolSize: 3)
        tree.stateFile("/run/balloond/placeholder", "")
        #expect(mkfifo(tree.at(Self.pool), 0o600) == 0)
        let outcome = try HugeTLBPoolSource.recoverAfterCrash(root: tree.root, control: kernel)
        guard case .setAside(_, _, let reason) = outcome else { Issue.record("expected setAside, got \(outcome)"); return }
        #expect(reason == .fileNotRegular(path: tree.at(Self.pool)), "\(reason)")
    }

    // MARK: the directory

    @Test func anOpenStateDirectoryStopsRecoveryWithTheFix() throws {
        let (tree, kernel) = Self.setup(poolSize: 3)
        tree.stateFile(Self.pool, Self.poolState(before: 1, set: 3, previous: 3))
        #expect(chmod(tree.at("/run/balloond"), 0o755) == 0)
        #expect(throws: StateFileError.directoryTooOpen(path: tree.at("/run/balloond"), mode: UInt32(S_IFDIR) | 0o755)) {
            _ = try recoverAfterCrash(root: tree.root, logger: Logger(label: "test"), poolControl: kernel)
        }
        #expect(kernel.total == 3 && tree.exists(Self.pool), "nothing is acted on")
        do { _ = try recoverAfterCrash(root: tree.root, poolControl: kernel) } catch {
            #expect(error.description.contains("chmod 0700"))
        }
    }

    @Test func aSymlinkedStateDirectoryIsRefused() throws {
        let (tree, kernel) = Self.setup(poolSize: 3)
        tree.stateFile("/real/hugetlb-pool", Self.poolState(before: 1, set: 3, previous: 3))
        #expect(symlink(tree.at("/real"), tree.at("/run/balloond")) == 0 || { try! Sys.makeDirectories(tree.at("/run")); return symlink(tree.at("/real"), tree.at("/run/balloond")) == 0 }())
        #expect(throws: StateFileError.directoryIsSymlink(path: tree.at("/run/balloond"))) {
            _ = try recoverAfterCrash(root: tree.root, poolControl: kernel)
        }
        #expect(kernel.total == 3)
    }

    // MARK: an admin's change after the crash is kept

    @Test func recoveryLeavesAnAdminsPoolSizeAlone() throws {
        let (tree, kernel) = Self.setup(poolSize: 7)
        // balloond grew 1 → 3 and died; an admin then set 7.
        tree.stateFile(Self.pool, Self.poolState(before: 1, set: 3, previous: 3))
        let outcome = try HugeTLBPoolSource.recoverAfterCrash(root: tree.root, control: kernel)
        #expect(outcome == .changedByOthers(value: 7, original: 1, balloondSet: 3))
        #expect(kernel.setPoolSizeCalls.isEmpty && kernel.total == 7)
        #expect(!tree.exists(Self.pool))
    }

    @Test func recoveryRestoresAPoolKilledMidGrowth() throws {
        // Killed while growing 3 → 5: the kernel had added one page.
        let (tree, kernel) = Self.setup(poolSize: 4)
        tree.stateFile(Self.pool, Self.poolState(before: 1, set: 5, previous: 3))
        #expect(try HugeTLBPoolSource.recoverAfterCrash(root: tree.root, control: kernel) == .restored(from: 4, to: 1))
        #expect(kernel.total == 1)
    }

    @Test func theSourceRecordsEachPoolSizeItSets() throws {
        let (tree, kernel) = Self.setup(poolSize: 1)
        let source = try HugeTLBPoolSource(root: tree.root, control: kernel, options: .init(limits: HugeTLBPoolSourceTests.limits(), firstStepBytes: 4 << 20, maxStepBytes: 8 << 20))
        try source.beginRound(id: 1)
        _ = try source.nextBatch(maxRanges: 64, maxRangeBytes: 4 << 20)
        let c = try #require(try HugeTLBPoolStateFile(root: tree.root).read())
        #expect(c.originalPoolSize == 1 && c.set == kernel.total && kernel.total > 1)
        // SIGKILL (as far as the state file goes), then an admin resizes the pool: recovery
        // keeps the admin's value.
        try kernel.setPoolSize(kernel.total + 2)
        let admin = kernel.total
        #expect(try HugeTLBPoolSource.recoverAfterCrash(root: tree.root, control: kernel)
                == .changedByOthers(value: admin, original: 1, balloondSet: c.set))
        #expect(kernel.total == admin)
    }

    // MARK: sysctl state files name only their own setting

    static let hostileSysctls = [
        "/sys/bus/pci/drivers/virtio-pci/unbind",
        "/proc/sys/kernel/core_pattern",
        "/proc/sys/vm/../kernel/core_pattern",
        "/proc/sys/vm/nr_overcommit_hugepages",   // a real setting, but not this file's
        "relative/path",
    ]

    @Test("a sysctl state file naming another setting is set aside and that setting untouched", arguments: hostileSysctls)
    func hostileSysctlIsRefused(sysctl: String) throws {
        let (tree, kernel) = Self.setup()
        let target = sysctl.hasPrefix("/") ? sysctl : "/" + sysctl
        tree.file(target, "5\n")
        tree.stateFile(Self.compact, "sysctl=\(sysctl)\noriginal=9\nset=5\nprevious=5\npid=999999\ncomm=balloond\n")
        let report = try recoverAfterCrash(root: tree.root, poolControl: kernel)
        guard case .setAside(_, _, let reason) = report.compactUnevictable else {
            Issue.record("expected setAside, got \(report.compactUnevictable)"); return
        }
        guard case .malformed(tree.at(Self.compact), .badValue(key: "sysctl", value: sysctl, let expected)) = reason else {
            Issue.record("expected a malformed sysctl line, got \(reason)"); return
        }
        #expect(expected.contains("/proc/sys/vm/compact_unevictable_allowed"), "names what the file may hold")
        #expect(tree.read(target) == "5\n", "the named file is not written")
        #expect(tree.read(Self.compactSetting) == "1\n")
        #expect(tree.exists(Self.compact + ".bad"))
    }

    @Test func writingAStateFileForAnUnexpectedSettingIsRefused() {
        let (tree, _) = Self.setup()
        let file = SysctlStateFile(root: tree.root, path: Self.compact)
        #expect(throws: GuestMemoryError.self) {
            try file.write(.init(sysctl: "/proc/sys/kernel/core_pattern", original: 1, set: 0, previous: 1))
        }
        #expect(!tree.exists(Self.compact))
    }

    @Test func aMalformedSysctlStateFileDoesNotBlockTheBackend() throws {
        let (tree, _) = Self.setup()
        tree.stateFile(Self.compact, "sysctl=/proc/sys/vm/compact_unevictable_allowed\noriginal=x\n")
        let report = try recoverAfterCrash(root: tree.root)
        guard case .setAside = report.compactUnevictable else { Issue.record("\(report)"); return }
        #expect(tree.read(Self.compactSetting) == "1\n")
        #expect(try LockedAnonymousBalloonMemory.recoverAfterCrash(root: tree.root) == .nothingToDo)
    }

    // MARK: the one entry point

    @Test func recoverAfterCrashRunsEveryRecovery() throws {
        let (tree, kernel) = Self.setup(poolSize: 3)
        tree.stateFile(Self.pool, Self.poolState(before: 1, set: 3, previous: 3))
        tree.file(Self.compactSetting, "0\n")
        tree.stateFile(Self.compact, "sysctl=\(Self.compactSetting)\noriginal=1\nset=0\nprevious=1\npid=999999\ncomm=balloond\n")
        tree.file(Self.overcommitSetting, "4\n")
        tree.stateFile(Self.overcommit, "sysctl=\(Self.overcommitSetting)\noriginal=0\nset=4\nprevious=0\npid=999999\ncomm=balloond\n")
        let report = try recoverAfterCrash(root: tree.root, poolControl: kernel)
        #expect(report.hugeTLBPool == .restored(from: 3, to: 1))
        #expect(report.compactUnevictable == .restored(sysctl: Self.compactSetting, from: 0, to: 1))
        #expect(report.hugeTLBOvercommit == .restored(sysctl: Self.overcommitSetting, from: 4, to: 0))
        #expect(report.failures.isEmpty)
        #expect(kernel.total == 1 && tree.read(Self.compactSetting) == "1\n" && tree.read(Self.overcommitSetting) == "0\n")
        let again = try recoverAfterCrash(root: tree.root, poolControl: kernel)
        #expect(!again.foundAnything)
    }

    @Test func aRecoveryThatFailsIsReportedWithItsErrno() throws {
        let (tree, kernel) = Self.setup()
        tree.remove(Self.compactSetting)
        try Sys.makeDirectories(tree.at(Self.compactSetting))  // read(2) on it fails with EISDIR
        tree.stateFile(Self.compact, "sysctl=\(Self.compactSetting)\noriginal=1\nset=0\nprevious=1\npid=999999\ncomm=balloond\n")
        let report = try recoverAfterCrash(root: tree.root, poolControl: kernel)
        let failure = try #require(report.failures.first)
        guard report.failures.count == 1, failure.what == "compact_unevictable_allowed",
              case .cannotRead(tree.at(Self.compactSetting), let call) = failure.error else {
            Issue.record("expected one failed read of \(Self.compactSetting), got \(report.failures)"); return
        }
        #expect(call.errno == .isDirectory)
        #expect(report.foundAnything && "\(report)".contains("failed: compact_unevictable_allowed: cannot read \(tree.at(Self.compactSetting)): "))
        #expect(tree.exists(Self.compact), "kept for the next start")
    }

    @Test func recoverAfterCrashWithoutAStateDirectoryDoesNothing() throws {
        let (tree, kernel) = Self.setup(poolSize: 3)
        let report = try recoverAfterCrash(root: tree.root, poolControl: kernel)
        #expect(!report.foundAnything && kernel.total == 3)
        #expect(!tree.exists("/run/balloond"))
    }
}

extension String {
    func replacingFirst(_ what: String, _ with: String) -> String {
        replacing(what, with: with, maxReplacements: 1)
    }
}
