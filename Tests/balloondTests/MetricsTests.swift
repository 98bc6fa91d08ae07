import Foundation
import Testing
@testable import balloond

/// `balloond status --format prometheus` and `run --metrics-textfile`: the metrics built from
/// one state snapshot (issue 10 item 4).
@Suite("metrics: Prometheus exposition built from the status snapshot")
struct MetricsTests {
    /// A snapshot where every value differs, so a metric fed from the wrong field shows.
    static let busyJSON = """
        {"pid": 1234, "device": "0000:00:03.0", "pciID": "1af4:1045", "previousDriver": "virtio-pci", "uioDevice": "/dev/uio0",
         "dmaMemory": "2 MiB hugepage", "hintSource": "hugetlb", "startedAt": 1700000000.5, "updatedAt": 1700000100.25, "restarts": 2,
         "driver": {"deviceStatus": "DRIVER_OK", "offeredFeatures": "STATS_VQ", "negotiatedFeatures": "STATS_VQ", "numPages": 51200,
                    "actual": 25600, "balloonBytes": 115343360, "reportedBytes": 8388608, "hintHeldBytes": 4194304,
                    "balloonMemory": "hugetlb", "hintCommand": "STOP",
                    "queues": [{"role": "inflate", "index": 0, "size": 256, "enabled": true, "availableIndex": 7, "usedIndex": 5, "inFlight": 2},
                               {"role": "stats", "index": 2, "size": 256, "enabled": true, "availableIndex": 9, "usedIndex": 8, "inFlight": 1}],
                    "counters": {"interrupts": 101, "configChanges": 11, "queueInterrupts": 90, "statsBuffersSent": 31, "deviceResets": 3,
                                 "errors": 4, "hintRounds": 5, "hintsSent": 600, "bytesHinted": 1288490188, "lastRoundBytes": 268435456,
                                 "lastRoundFirstHintMicros": 1500, "lastRoundStopMicros": 2500000,
                                 "hintRoundsTimedOut": 1, "inflateBuffers": 40, "deflateBuffers": 12, "pagesInflated": 30000,
                                 "pagesDeflated": 4400, "inflateShortfalls": 6, "balloonBlocksMoved": 7, "pressureDeflates": 8, "pressureHintReleases": 5, "inflateHintReserveReleases": 3,
                                 "reportsSent": 9, "bytesReported": 37748736, "takeMicroseconds": 2750000, "lastTargetMilliseconds": 1234,
                                 "hintCommandsDeferred": 0, "balloonBlocksUnaddressable": 0}}}
        """

    static func busy() throws -> DaemonState { try DaemonState.decode(busyJSON, path: "busy") }

    /// The samples of an exposition: "name{labels}" (as written) -> value.
    static func samples(_ text: String) -> [String: Double] {
        var out: [String: Double] = [:]
        for line in text.split(separator: "\n") where !line.hasPrefix("#") {
            guard let space = line.lastIndex(of: " "), let v = Double(line[line.index(after: space)...]) else { continue }
            out[String(line[..<space])] = v
        }
        return out
    }

    @Test("each metric carries its snapshot field, in bytes and seconds")
    func valuesComeFromTheSnapshotInBaseUnits() throws {
        let s = Self.samples(BalloondMetrics.render(try Self.busy(), version: "9.8.7"))
        let expected: [String: Double] = [
            "balloond_up": 1,
            "balloond_start_time_seconds": 1700000000.5,
            "balloond_last_update_timestamp_seconds": 1700000100.25,
            "balloond_restarts_total": 2,
            "balloond_target_bytes": 51200 * 4096,
            "balloond_actual_bytes": 25600 * 4096,
            "balloond_balloon_bytes": 115343360,
            "balloond_shortfall": 0,
            "balloond_inflated_bytes_total": 30000 * 4096,
            "balloond_deflated_bytes_total": 4400 * 4096,
            "balloond_inflate_buffers_total": 40,
            "balloond_deflate_buffers_total": 12,
            "balloond_inflate_shortfalls_total": 6,
            "balloond_pressure_deflates_total": 8,
            "balloond_pressure_hint_releases_total": 5,
            "balloond_inflate_hint_reserve_releases_total": 3,
            "balloond_balloon_blocks_moved_total": 7,
            "balloond_take_memory_seconds_total": 2.75,
            "balloond_last_target_seconds": 1.234,
            "balloond_reported_bytes": 8388608,
            "balloond_reports_total": 9,
            "balloond_reported_bytes_total": 37748736,
            "balloond_hint_rounds_total": 5,
            "balloond_hints_total": 600,
            "balloond_hinted_bytes_total": 1288490188,
            "balloond_hint_rounds_timed_out_total": 1,
            "balloond_hint_held_bytes": 4194304,
            "balloond_hint_first_hint_seconds": 0.0015,
            "balloond_hint_round_seconds": 2.5,
            "balloond_hint_last_round_bytes": 268435456,
            "balloond_interrupts_total": 101,
            "balloond_config_changes_total": 11,
            "balloond_stats_updates_total": 31,
            "balloond_device_resets_total": 3,
            "balloond_errors_total": 4,
            #"balloond_queue_in_flight_buffers{queue="0",role="inflate"}"#: 2,
            #"balloond_queue_in_flight_buffers{queue="2",role="stats"}"#: 1,
            #"balloond_info{version="9.8.7",device="0000:00:03.0",pci_id="1af4:1045",uio_device="/dev/uio0",previous_driver="virtio-pci",hint_source="hugetlb",balloon_memory="hugetlb",device_status="DRIVER_OK"}"#: 1,
        ]
        for (name, value) in expected.sorted(by: { $0.key < $1.key }) {
            let got = try #require(s[name], "\(name) is missing")
            #expect(abs(got - value) <= 1e-9 * max(1, abs(value)), "\(name): \(got), expected \(value)")
        }
        #expect(Set(s.keys) == Set(expected.keys), "unexpected samples: \(Set(s.keys).subtracting(expected.keys).sorted())")
    }

    @Test("every metric has HELP and TYPE, counters end in _total and nothing else does")
    func helpTypeAndCounterNaming() throws {
        let text = BalloondMetrics.render(try Self.busy(), version: "0.1.0")
        var help: Set<String> = [], types: [String: String] = [:]
        for line in text.split(separator: "\n") {
            let f = line.split(separator: " ", maxSplits: 3).map(String.init)
            if f.first == "#", f.count >= 4, f[1] == "HELP" { help.insert(f[2]) }
            if f.first == "#", f.count == 4, f[1] == "TYPE" { types[f[2]] = f[3] }
        }
        let names = Set(Self.samples(text).keys.map { String($0.prefix { $0 != "{" }) })
        #expect(names == Set(types.keys))
        #expect(help == Set(types.keys))
        for (name, type) in types {
            #expect(name.hasPrefix("balloond_"), "\(name)")
            #expect((type == "counter") == name.hasSuffix("_total"), "\(name) is a \(type)")
        }
    }

    @Test("round times are left out until a hint round ran, and a shortfall shows")
    func absentValuesAreLeftOut() throws {
        let json = Self.busyJSON.replacingOccurrences(of: #""lastRoundFirstHintMicros": 1500, "lastRoundStopMicros": 2500000,"#, with: "")
            .replacingOccurrences(of: #""lastTargetMilliseconds": 1234,"#, with: "")
            .replacingOccurrences(of: #""hintCommand": "STOP","#, with: #""hintCommand": "STOP", "shortfall": "no memory","#)
        let state = try DaemonState.decode(json, path: "idle")
        let s = Self.samples(BalloondMetrics.render(state, version: "0.1.0"))
        #expect(s["balloond_hint_first_hint_seconds"] == nil)
        #expect(s["balloond_hint_round_seconds"] == nil)
        #expect(s["balloond_last_target_seconds"] == nil)
        #expect(s["balloond_shortfall"] == 1)
        #expect(s["balloond_hint_rounds_total"] == 5)
    }

    /// The state file is root-only and checked, but its counters are not range-checked: a
    /// corrupt one must still give valid metrics, not a trap in swift-prometheus (whose
    /// counters precondition on negative increments).
    static let hostileJSON = busyJSON
        .replacingOccurrences(of: #""interrupts": 101"#, with: #""interrupts": -5"#)
        .replacingOccurrences(of: #""pagesInflated": 30000"#, with: #""pagesInflated": 18446744073709551615"#)
        .replacingOccurrences(of: #""bytesHinted": 1288490188"#, with: #""bytesHinted": 18446744073709551615"#)
        .replacingOccurrences(of: #""restarts": 2"#, with: #""restarts": 0"#)
        .replacingOccurrences(of: #""lastRoundFirstHintMicros": 1500"#, with: #""lastRoundFirstHintMicros": -9223372036854775808"#)
        .replacingOccurrences(of: #""device": "0000:00:03.0""#, with: #""device": "a\"b\\c\nd""#)

    @Test("hostile snapshot values give clamped, escaped metrics instead of a trap")
    func hostileValuesAreClampedAndEscaped() throws {
        let text = BalloondMetrics.render(try DaemonState.decode(Self.hostileJSON, path: "hostile"), version: "0.1.0")
        let s = Self.samples(text)
        #expect(s["balloond_interrupts_total"] == 0)
        #expect(s["balloond_inflated_bytes_total"] == Double(Int64.max))
        #expect(s["balloond_hinted_bytes_total"] == Double(Int64.max))
        #expect(s["balloond_hint_first_hint_seconds"] == Double(Int64.min) / 1e6)
        #expect(text.contains(#"device="a\"b\\c\nd""#))
        #expect(!text.contains("\nd\""))
    }

    // MARK: promtool

    /// promtool: $PROMTOOL, else the one scripts/setup.sh unpacks into .cache/prometheus/
    /// ($BALLOOND_CACHE), else one on PATH.
    static let promtool: String? = {
        let env = ProcessInfo.processInfo.environment
        let root = URL(fileURLWithPath: #filePath).deletingLastPathComponent().deletingLastPathComponent().deletingLastPathComponent().path
        var candidates = [env["PROMTOOL"], (env["BALLOOND_CACHE"] ?? root + "/.cache") + "/prometheus/promtool"].compactMap { $0 }
        candidates += (env["PATH"] ?? "/usr/bin:/bin").split(separator: ":").map { "\($0)/promtool" }
        return candidates.first { FileManager.default.isExecutableFile(atPath: $0) }
    }()
    /// scripts/test.sh (and so CI) sets BALLOOND_REQUIRE_PROMTOOL=1: there a missing promtool
    /// fails the test instead of skipping it.
    static let promtoolRequired = ProcessInfo.processInfo.environment["BALLOOND_REQUIRE_PROMTOOL"] == "1"

    /// Runs `promtool check metrics` on `text`; returns its exit status and output.
    static func promtoolCheck(_ text: String) throws -> (status: Int32, output: String) {
        let promtool = try #require(promtool, "promtool not found: run scripts/setup.sh (it unpacks Debian's promtool into .cache/prometheus/) or set PROMTOOL")
        let input = FileManager.default.temporaryDirectory.appendingPathComponent("balloond-metrics-\(getpid())-\(UInt64.random(in: 0...UInt64.max)).prom")
        try text.write(to: input, atomically: false, encoding: .utf8)
        defer { try? FileManager.default.removeItem(at: input) }
        let p = Process()
        p.executableURL = URL(fileURLWithPath: promtool)
        p.arguments = ["check", "metrics"]
        p.standardInput = try FileHandle(forReadingFrom: input)
        let out = Pipe()
        p.standardOutput = out
        p.standardError = out
        try p.run()
        let data = out.fileHandleForReading.readDataToEndOfFile()
        p.waitUntilExit()
        return (p.terminationStatus, String(decoding: data, as: UTF8.self))
    }

    @Test("promtool check metrics accepts balloond's metrics", .enabled(if: promtool != nil || promtoolRequired,
          "promtool is absent: run scripts/setup.sh (scripts/test.sh and CI always run this test)"))
    func promtoolAcceptsTheMetrics() throws {
        for (name, json) in [("busy", Self.busyJSON), ("hostile", Self.hostileJSON)] {
            let text = BalloondMetrics.render(try DaemonState.decode(json, path: name), version: "0.1.0")
            let (status, output) = try Self.promtoolCheck(text)
            #expect(status == 0 && output.isEmpty, "promtool on the \(name) snapshot (exit \(status)): \(output)\n\(text)")
        }
    }

    @Test("the promtool check can fail: it rejects a counter without _total and a metric without HELP",
          .enabled(if: promtool != nil || promtoolRequired, "promtool is absent: run scripts/setup.sh"))
    func promtoolRejectsBadMetrics() throws {
        let bad = "# TYPE balloond_hinted_bytes counter\nballoond_hinted_bytes 1\n"
        let (status, output) = try Self.promtoolCheck(bad)
        #expect(status != 0 || !output.isEmpty, "promtool accepted \(bad)")
    }
}
