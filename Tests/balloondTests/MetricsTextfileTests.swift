#if canImport(Glibc)
import Glibc
#endif
import ArgumentParser
import Balloon
import PlatformLinux
import Testing
@testable import balloond

/// `balloond run --metrics-textfile PATH` (node_exporter's textfile collector) and
/// `balloond status --format`.
@Suite("metrics textfile: atomic 0644 rewrites, paced by the run loop's wakeups")
struct MetricsTextfileTests {
    static func directory() -> String {
        var template = Array("/tmp/balloond-textfile-test-XXXXXX".utf8CString)
        let p = template.withUnsafeMutableBufferPointer { buf in mkdtemp(buf.baseAddress!) }
        return String(cString: p!)
    }

    static func state(hintRounds: Int = 5, stopMicros: Int64? = 2_500_000, updatedAt: Double = 1010) throws -> DaemonState {
        var json = MetricsTests.busyJSON
            .replacingOccurrences(of: #""hintRounds": 5"#, with: #""hintRounds": \#(hintRounds)"#)
            .replacingOccurrences(of: #""updatedAt": 1700000100.25"#, with: #""updatedAt": \#(updatedAt)"#)
        json = json.replacingOccurrences(of: #""lastRoundStopMicros": 2500000"#,
                                         with: stopMicros.map { #""lastRoundStopMicros": \#($0)"# } ?? #""lastRoundStopMicros": null"#)
        return try DaemonState.decode(json, path: "test")
    }

    @Test("the file is replaced through a hidden temporary in its directory, mode 0644 even under umask 077")
    func atomicReplaceWithReadableMode() throws {
        let dir = Self.directory()
        defer { _ = system("rm -rf '\(dir)'") }
        let path = dir + "/balloond.prom"
        #expect(MetricsTextfile.temporaryPath(for: path) == dir + "/.balloond.prom.tmp")
        // umask is process-wide: tightened only around the writes (no test relies on group or
        // other bits of a file it creates without chmod).
        let old = umask(0o077)
        let written = Result { () throws(SystemCallError) in
            try MetricsTextfile.write("a 1\n", to: path)
            try MetricsTextfile.write("b 2\n", to: path)
        }
        umask(old)
        try written.get()
        #expect(try Sys.readTextFile(path) == "b 2\n")
        let st = try #require(try Sys.lstatIfExists(path))
        #expect(st.st_mode & 0o7777 == 0o644)
        #expect(try Sys.listDirectory(dir) == ["balloond.prom"], "the temporary file is left behind")
    }

    @Test("a symbolic link planted at the temporary name is replaced, not followed")
    func plantedLinkIsNotFollowed() throws {
        let dir = Self.directory()
        defer { _ = system("rm -rf '\(dir)'") }
        let path = dir + "/balloond.prom", victim = dir + "/victim"
        try Sys.writeFile(victim, "keep\n")
        #expect(symlink(victim, MetricsTextfile.temporaryPath(for: path)) == 0)
        try MetricsTextfile.write("a 1\n", to: path)
        #expect(try Sys.readTextFile(victim) == "keep\n")
        #expect(try Sys.readTextFile(path) == "a 1\n")
        let st = try #require(try Sys.lstatIfExists(path))
        #expect(st.st_mode & S_IFMT == S_IFREG)
    }

    @Test("update writes at the first call, then only every interval, at a hint round's start or end, or when forced")
    func updatePacing() throws {
        let dir = Self.directory()
        defer { _ = system("rm -rf '\(dir)'") }
        let path = dir + "/balloond.prom"
        var file = MetricsTextfile(path: path)
        func update(_ s: DaemonState, _ now: Double, force: Bool = false) throws -> Bool {
            try file.update(s, now: now, force: force, version: "0.1.0")
        }
        #expect(try update(Self.state(), 100))
        // (swift-prometheus emits families in dictionary order: compare the samples.)
        #expect(MetricsTests.samples(try Sys.readTextFile(path)) == MetricsTests.samples(BalloondMetrics.render(try Self.state(), version: "0.1.0")))
        #expect(try !update(Self.state(), 101))
        #expect(try !update(Self.state(), 104.9))
        #expect(try update(Self.state(), 105), "the interval passed")
        #expect(try !update(Self.state(), 106))
        // A round starts (START counted, no STOP time yet) and ends (STOP time set).
        #expect(try update(Self.state(hintRounds: 6, stopMicros: 2_500_000), 106.5), "a round started")
        #expect(try !update(Self.state(hintRounds: 6, stopMicros: 2_500_000), 106.6))
        #expect(try update(Self.state(hintRounds: 6, stopMicros: 900_000), 106.7), "a round ended")
        #expect(try !update(Self.state(hintRounds: 6, stopMicros: 900_000), 107))
        #expect(try update(Self.state(hintRounds: 6, stopMicros: 900_000), 107.1, force: true), "forced")
        // A wall clock stepped back writes and paces from there, instead of stopping the
        // writes until it catches up.
        #expect(try update(Self.state(hintRounds: 6, stopMicros: 900_000), 50), "the clock stepped back")
        #expect(try !update(Self.state(hintRounds: 6, stopMicros: 900_000), 51))
        #expect(try Sys.readTextFile(path).contains("balloond_hint_rounds_total 6"))
    }

    @Test("a failed write throws a message naming the file, is not retried before the interval, and clears on success")
    func failedWritesArePaced() throws {
        let dir = Self.directory()
        defer { _ = system("rm -rf '\(dir)'") }
        var file = MetricsTextfile(path: dir + "/gone/balloond.prom")
        do {
            try file.update(Self.state(), now: 100, force: false, version: "0.1.0")
            Issue.record("writing into a missing directory succeeded")
        } catch {
            guard case MetricsTextfileError.write(let e) = error else {
                Issue.record("expected a write failure, got \(error)")
                return
            }
            #expect(e.path?.hasSuffix("gone/.balloond.prom.tmp") == true && e.errno == .noSuchFileOrDirectory)
            #expect("\(error)".contains("cannot write the metrics textfile"))
            #expect("\(error)".contains("gone/.balloond.prom.tmp"))
        }
        #expect(file.failing)
        #expect(!file.isDue(try Self.state().driver.counters, now: 101, force: false))
        #expect(file.isDue(try Self.state().driver.counters, now: 105, force: false))
        #expect(mkdir(dir + "/gone", 0o755) == 0)
        #expect(try file.update(Self.state(), now: 105, force: false, version: "0.1.0"))
        #expect(!file.failing)
        file.remove()
        #expect(!Sys.exists(dir + "/gone/balloond.prom"))
    }

    @Test("--metrics-textfile is checked before run changes anything", arguments: [
        ("", "needs a file path"),
        ("/tmp", "names a directory"),
        ("/tmp/", "names a directory"),
        ("/nonexistent-balloond-dir/balloond.prom", "/nonexistent-balloond-dir does not exist"),
    ])
    func textfileOptionIsValidated(path: String, mentions: String) {
        do {
            _ = try RunCommand.parse(["--metrics-textfile", path])
            Issue.record("--metrics-textfile \(path) was accepted")
        } catch {
            let message = RunCommand.message(for: error)
            #expect(message.contains(mentions), "message for \(path): \(message)")
        }
    }

    @Test("--metrics-textfile takes a file in an existing directory")
    func textfileOptionAccepted() throws {
        let command = try RunCommand.parse(["--metrics-textfile", "/tmp/balloond.prom"])
        #expect(command.metricsTextfile == "/tmp/balloond.prom")
    }

    @Test("status takes --format text|json|prometheus, and --json as --format json")
    func statusFormats() throws {
        #expect(try StatusCommand.parse([]).format == nil)
        #expect(try StatusCommand.parse(["--format", "prometheus"]).format == .prometheus)
        #expect(try StatusCommand.parse(["--format", "json", "--json"]).format == .json)
        for bad in [["--format", "xml"], ["--json", "--format", "prometheus"]] {
            do {
                _ = try StatusCommand.parse(bad)
                Issue.record("\(bad) was accepted")
            } catch {
                #expect(StatusCommand.message(for: error).contains("format"), "\(bad): \(StatusCommand.message(for: error))")
            }
        }
    }
}
