#if canImport(Glibc)
import Glibc
#endif
import Balloon
import PlatformLinux
import Testing
@testable import balloond

/// status.json through the root-only state file, and `status`/`scan` arithmetic on hostile
/// values (L6).
@Suite struct DaemonStateFaultInjectionTests {
    static func tree() -> String {
        var template = Array("/tmp/balloond-cli-test-XXXXXX".utf8CString)
        let p = template.withUnsafeMutableBufferPointer { buf in mkdtemp(buf.baseAddress!) }
        return String(cString: p!)
    }

    static let sampleJSON = """
        {"pid": 1234, "device": "0000:00:03.0", "pciID": "1af4:1045", "previousDriver": "virtio-pci", "uioDevice": "/dev/uio0",
         "dmaMemory": "2 MiB hugepage", "hintSource": "hugetlb", "startedAt": 1000, "updatedAt": 1010, "restarts": 0,
         "driver": {"deviceStatus": "DRIVER_OK", "offeredFeatures": "", "negotiatedFeatures": "", "numPages": 0, "actual": 0,
                    "balloonBytes": 0, "reportedBytes": 0, "hintHeldBytes": 0, "hintCommand": "STOP", "queues": [],
                    "counters": {"interrupts": 0, "configChanges": 0, "queueInterrupts": 0, "statsBuffersSent": 0, "deviceResets": 0,
                                 "errors": 0, "hintRounds": 0, "hintsSent": 0, "bytesHinted": 0, "lastRoundBytes": 0,
                                 "hintRoundsTimedOut": 0, "inflateBuffers": 0, "deflateBuffers": 0, "pagesInflated": 0,
                                 "pagesDeflated": 0, "inflateShortfalls": 0, "balloonBlocksMoved": 0, "pressureDeflates": 0, "pressureHintReleases": 0, "inflateHintReserveReleases": 0,
                                 "reportsSent": 0, "bytesReported": 0, "takeMicroseconds": 0,
                                 "hintCommandsDeferred": 0, "balloonBlocksUnaddressable": 0}}}
        """

    static func sample() throws -> DaemonState { try DaemonState.decode(sampleJSON, path: "sample") }

    @Test func writeAndReadRoundTripThroughTheRootOnlyDirectory() throws {
        let root = SysRoot(Self.tree())
        defer { _ = system("rm -rf '\(root.prefix)'") }
        try Self.sample().write(to: DaemonState.defaultPath, root: root)
        let st = try #require(try Sys.lstatIfExists(root.path("/run/balloond")))
        #expect(st.st_mode & 0o777 == 0o700)
        let expected = try Self.sample()
        #expect(try DaemonState.read(from: DaemonState.defaultPath, root: root) == expected)
        DaemonState.remove(at: DaemonState.defaultPath, root: root)
        #expect { _ = try DaemonState.read(from: DaemonState.defaultPath, root: root) } throws: { error in
            guard case Failure.noState(let path) = error else { return false }
            return path == root.path(DaemonState.defaultPath)
        }
    }

    @Test func aSymlinkedStatusFileIsRefused() throws {
        let root = SysRoot(Self.tree())
        defer { _ = system("rm -rf '\(root.prefix)'") }
        try Self.sample().write(to: "/run/balloond/other.json", root: root)
        #expect(symlink(root.path("/run/balloond/other.json"), root.path("/run/balloond/status.json")) == 0)
        do {
            _ = try DaemonState.read(from: DaemonState.defaultPath, root: root)
            Issue.record("a link must be refused")
        } catch {
            guard case Failure.stateFile(.fileIsSymlink(let path)) = error else {
                Issue.record("expected a refused symbolic link, got \(error)")
                return
            }
            #expect(path == root.path(DaemonState.defaultPath))
            #expect("\(error)".contains("symbolic link"))
        }
    }

    static func json(_ edit: (inout String) -> Void) throws -> String {
        let root = SysRoot(Self.tree())
        defer { _ = system("rm -rf '\(root.prefix)'") }
        try Self.sample().write(to: DaemonState.defaultPath, root: root)
        var text = try #require(try StateFile(root: root, path: DaemonState.defaultPath).read())
        edit(&text)
        return text
    }

    @Test("hostile or malformed status.json is refused with a message", arguments: [
        ("\"pid\" : 1234", "\"pid\" : 0"),
        ("\"pid\" : 1234", "\"pid\" : -1"),
        ("\"pid\" : 1234", "\"pid\" : 99999999999"),
        ("\"startedAt\" : 1000", "\"startedAt\" : -5"),
        ("\"startedAt\" : 1000", "\"startedAt\" : 1e400"),
        ("\"restarts\" : 0", "\"restarts\" : -1"),
        ("\"pid\" : 1234", "\"pid\" : 1234, \"evil\" : 1"),
        ("\"pid\" : 1234", "\"pid\" : \"1234\""),
    ])
    func malformedStatus(replace: String, with: String) throws {
        let text = try Self.json { $0 = $0.replacing(replace, with: with) }
        #expect(text.contains(with))
        #expect { _ = try DaemonState.decode(text, path: "status.json") } throws: { error in
            guard case Failure.notAStateFile(path: "status.json", _) = error else { return false }
            return "\(error)".hasPrefix("status.json is not a balloond state file: ")
        }
    }

    @Test("elapsed seconds never trap", arguments: [
        (1000.0, 1010.5, "10"), (1010.0, 1000.0, "-10"), (-1e300, 1000.0, "?"), (Double.nan, 1000.0, "?"),
        (Double.infinity, 1000.0, "?"), (-Double.infinity, 1000.0, "?"), (1e19, 0, "?"), (0, 9.3e18, "?"),
    ])
    func elapsed(start: Double, now: Double, expected: String) {
        #expect(DaemonState.elapsedSeconds(from: start, to: now) == expected)
    }

    @Test func processExistsIgnoresProcessGroupPids() {
        #expect(!processExists(0) && !processExists(-1))
        #expect(processExists(getpid()))
    }

    @Test("scan round ids stay in the round range for any run", arguments: [0, 1, 5, 0x7fff_fffd, 0x7fff_fffe, Int(UInt32.max), Int.max, -1, Int.min])
    func scanRoundIDs(run: Int) {
        let id = ScanCommand.roundID(forRun: run)
        #expect(id >= 0x8000_0001 && id <= 0xffff_fffe)
        if run >= 0 && run < 10 { #expect(id == 0x8000_0001 + UInt32(run)) }
    }

    @Test("scan --runs is validated", arguments: ["-1", "0", "1001", "9223372036854775807"])
    func scanRunsValidated(runs: String) {
        #expect(throws: (any Error).self) { _ = try ScanCommand.parse(["--runs", runs]) }
    }
}
