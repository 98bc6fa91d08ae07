import ArgumentParser
import Balloon
import PlatformLinux

struct StatusCommand: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "status",
        abstract: "Show the running balloond's device, negotiated features, queue states and counters.",
        discussion: "Reads the state file `balloond run` keeps (default \(DaemonState.defaultPath), root only). Exits 1 if no balloond is running."
    )

    @Option(help: "State file written by `balloond run`.") var stateFile: String = DaemonState.defaultPath
    @Option(help: "Output: text (for people), json (the state file as written) or prometheus (the text exposition format).")
    var format: StatusFormat?
    @Flag(help: "Same as --format json.") var json = false

    func validate() throws {
        if json, let format, format != .json {
            throw ValidationError("--json and --format \(format.rawValue) ask for different outputs; use one of them")
        }
    }

    func run() throws {
        let s = try DaemonState.read(from: stateFile)
        guard processExists(s.pid) else {
            throw Failure.notRunning(pid: s.pid, stateFile: stateFile)
        }
        switch format ?? (json ? .json : .text) {
        case .json:
            print((try? StateFile(path: stateFile).read()) ?? "")
        case .prometheus:
            print(BalloondMetrics.render(s, version: Balloond.configuration.version), terminator: "")
        case .text:
            printText(s)
        }
    }

    private func printText(_ s: DaemonState) {
        let d = s.driver
        let now = wallClockSeconds()
        print("balloond pid \(s.pid), up \(DaemonState.elapsedSeconds(from: s.startedAt, to: now)) s, state updated \(DaemonState.elapsedSeconds(from: s.updatedAt, to: now)) s ago")
        print("device       \(s.device) [\(s.pciID)] via \(s.uioDevice) (previous driver: \(s.previousDriver ?? "none"))")
        print("status       \(d.deviceStatus)")
        print("offered      \(d.offeredFeatures)")
        print("negotiated   \(d.negotiatedFeatures)")
        print("poison_val   \(d.poisonValue.map { "0x" + String($0, radix: 16) } ?? "not negotiated")")
        print("dma          \(s.dmaMemory)")
        print("balloon      num_pages \(d.numPages) (\(d.numPages >> 8) MiB), actual \(d.actual) (\(d.actual >> 8) MiB), held \(d.balloonBytes >> 20) MiB from \(d.balloonMemory ?? "no backend")")
        if let why = d.shortfall { print("shortfall    \(why)") }
        print("reporting    holding \(d.reportedBytes >> 20) MiB reported")
        print("hint cmd     \(d.hintCommand)\(s.hintSource.map { ", source \($0)" } ?? ""), holding \(d.hintHeldBytes >> 20) MiB")
        for q in d.queues {
            print("queue \(q.index)      \(q.role.padding(16)) size \(q.size) enabled \(q.enabled) avail \(q.availableIndex) used \(q.usedIndex) in-flight \(q.inFlight)")
        }
        let c = d.counters
        print("counters     interrupts \(c.interrupts), config changes \(c.configChanges), stats sent \(c.statsBuffersSent), device resets \(c.deviceResets), restarts \(s.restarts), errors \(c.errors)")
        print("sizing       inflated \(c.pagesInflated >> 8) MiB in \(c.inflateBuffers) buffers, deflated \(c.pagesDeflated >> 8) MiB in \(c.deflateBuffers), taking memory \(c.takeMicroseconds / 1000) ms, last target reached in \(c.lastTargetMilliseconds.map { "\($0) ms" } ?? "-"), shortfalls \(c.inflateShortfalls), pressure deflates \(c.pressureDeflates), hint memory given back under pressure \(c.pressureHintReleases)x and to inflates \(c.inflateHintReserveReleases)x, moved blocks \(c.balloonBlocksMoved)")
        print("hinting      rounds \(c.hintRounds), hinted \(c.bytesHinted >> 20) MiB in \(c.hintsSent) hints; reports \(c.reportsSent), reported \(c.bytesReported >> 20) MiB")
    }
}

/// `balloond status --format`.
enum StatusFormat: String, ExpressibleByArgument, CaseIterable {
    case text, json, prometheus
}

extension String {
    func padding(_ n: Int) -> String { count >= n ? self : self + String(repeating: " ", count: n - count) }
}
