import ArgumentParser
import FreePages
import GuestMemoryLinux
import HintSourcesLinux
import BalloonMemoryLinux
import Logging
import PlatformLinux
import Balloon

/// `balloond scan`: what one kpageflags hint round would find, and what the scan costs,
/// without a device (docs/virtio-balloon.md §9 budgets ~50 ms per GiB scanned).
struct ScanCommand: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "scan",
        abstract: "Measure the kpageflags free page scan: free memory found and milliseconds per GiB scanned.",
        discussion: """
        Needs root (/proc/kpageflags). Runs the kpageflags hint source's round --runs times exactly as \
        `run` does after a new cmd id (same batches and range limits), hints nothing, and prints \
        per run the free memory found, the ranges, the reads and the scan time per GiB of RAM.
        """
    )

    @Option(help: "How many scans (1-\(ScanCommand.maxRuns)).")
    var runs: Int = 5
    @OptionGroup var logging: LoggingOptions

    static let maxRuns = 1000

    func validate() throws {
        guard (1...Self.maxRuns).contains(runs) else { throw ValidationError("--runs must be 1-\(Self.maxRuns), got \(runs)") }
    }

    /// The cmd id of scan `run` (0-based): in the range the device uses for rounds
    /// (0x80000001 and up), wrapping instead of trapping.
    static func roundID(forRun run: Int) -> UInt32 {
        0x8000_0001 &+ UInt32(truncatingIfNeeded: run) % 0x7fff_fffe
    }

    func run() throws {
        let logger = try logging.makeLogger()
        try Preflight().checkRoot()
        let source = try KPageFlagsSource(root: .host, logger: logger)
        let hintOptions = HintOptions()
        let maxRangeBytes = hintOptions.maxRangeBytes(for: source)
        var perGiB: [Double] = []
        for i in 0..<max(1, min(runs, Self.maxRuns)) {
            try source.beginRound(id: Self.roundID(forRun: i))
            var ranges = 0
            var bytes: UInt64 = 0
            while true {
                let batch = try source.nextBatch(maxRanges: hintOptions.batchRanges, maxRangeBytes: maxRangeBytes)
                if batch.isEmpty { break }
                ranges += batch.count
                bytes += batch.reduce(0) { $0 + $1.length }
            }
            source.endRound()
            let s = source.lastScan
            perGiB.append(s.millisecondsPerGiB)
            print("scan \(i + 1): \(bytes >> 20) MiB free in \(ranges) ranges; \((s.framesScanned * 4096) >> 20) MiB scanned in \(s.reads) reads, \(oneDecimal(Double(s.scanNanos) / 1e6)) ms = \(oneDecimal(s.millisecondsPerGiB)) ms per GiB")
        }
        let sorted = perGiB.sorted()
        print("median \(oneDecimal(sorted[sorted.count / 2])) ms per GiB over \(sorted.count) scans")
    }
}

func oneDecimal(_ x: Double) -> String { "\((x * 10).rounded() / 10)" }
