import Balloon
import PlatformLinux

/// Why `--metrics-textfile` cannot be used; each message says what to do.
enum MetricsTextfileError: Error, Equatable, CustomStringConvertible {
    case emptyPath
    case isDirectoryName(String)
    case noDirectory(String)
    case write(SystemCallError)

    var description: String {
        switch self {
        case .emptyPath:
            return "--metrics-textfile needs a file path, e.g. /var/lib/prometheus/node-exporter/balloond.prom"
        case .isDirectoryName(let p):
            return "--metrics-textfile \(p) names a directory; give a file in it, e.g. \(p.hasSuffix("/") ? p : p + "/")balloond.prom"
        case .noDirectory(let d):
            return "--metrics-textfile: the directory \(d) does not exist; create it (node_exporter's --collector.textfile.directory) or choose another path"
        case .write(let e):
            return "cannot write the metrics textfile: \(e)"
        }
    }
}

/// `balloond run --metrics-textfile PATH`: node_exporter's textfile-collector convention.
/// PATH is replaced atomically (a temporary file in the same directory, then `rename`), mode
/// 0644 so node_exporter can read it, so a scrape sees the old metrics or the new ones, never
/// a partial file. The temporary name starts with a dot and does not end in `.prom`, so the
/// collector never reads it.
///
/// It is driven from the daemon's iteration hook and adds no wakeups of its own: it writes when
/// at least `interval` passed since the last write, when a hint round started or ended, and on
/// forced iterations (bring-up, device errors).
struct MetricsTextfile {
    let path: String
    var interval: Duration = .seconds(5)
    private(set) var lastWrite: Double?
    private var lastRound: RoundMark?
    /// Whether the last write failed (a failure is logged once until a write succeeds).
    private(set) var failing = false

    /// What identifies the latest hint round: a START counts a round, a STOP sets its time.
    struct RoundMark: Equatable {
        var rounds: Int
        var stopMicros: Int64?
        init(_ c: BalloonCounters) { rounds = c.hintRounds; stopMicros = c.lastRoundStopMicros }
    }

    init(path: String) { self.path = path }

    /// Checks the option before `run` changes anything: a file path whose directory exists.
    static func validate(path: String) throws(MetricsTextfileError) {
        guard !path.isEmpty else { throw .emptyPath }
        if path.hasSuffix("/") || path.hasSuffix("/.") || path.hasSuffix("/..") || path == "." || path == ".." || Sys.isDirectory(path) {
            throw .isDirectoryName(path)
        }
        let dir = directory(of: path)
        guard Sys.isDirectory(dir) else { throw .noDirectory(dir) }
    }

    /// The directory holding `path` ("." for a bare name).
    static func directory(of path: String) -> String {
        guard let slash = path.lastIndex(of: "/") else { return "." }
        return slash == path.startIndex ? "/" : String(path[..<slash])
    }

    /// The temporary file `write` renames over `path`: same directory, hidden, not `*.prom`.
    static func temporaryPath(for path: String) -> String {
        guard let slash = path.lastIndex(of: "/") else { return ".\(path).tmp" }
        return String(path[...slash]) + "." + String(path[path.index(after: slash)...]) + ".tmp"
    }

    /// Whether `update` writes now. A wall clock stepped back counts as due, so the writes
    /// do not stop until it catches up.
    func isDue(_ counters: BalloonCounters, now: Double, force: Bool) -> Bool {
        guard let lastWrite else { return true }
        return force || RoundMark(counters) != lastRound || !(now - lastWrite < interval / .seconds(1)) || now < lastWrite
    }

    /// Writes the metrics for `state` when due (see the type). Returns whether it wrote.
    @discardableResult
    mutating func update(_ state: DaemonState, now: Double, force: Bool, version: String) throws(MetricsTextfileError) -> Bool {
        guard isDue(state.driver.counters, now: now, force: force) else { return false }
        // Marked written even when it fails: a broken path is retried at the normal pace,
        // not on every wakeup.
        lastWrite = now
        lastRound = RoundMark(state.driver.counters)
        do {
            try Self.write(BalloondMetrics.render(state, version: version), to: path)
            failing = false
        } catch {
            failing = true
            throw .write(error)
        }
        return true
    }

    /// Replaces `path` atomically with `text`, mode 0644 whatever the umask.
    static func write(_ text: String, to path: String) throws(SystemCallError) {
        try Sys.replaceFile(path, with: Array(text.utf8), mode: 0o644, temporary: temporaryPath(for: path), durable: false)
    }

    /// Removes the file (at exit: metrics of a stopped balloond would look current).
    func remove() {
        try? Sys.removeFile(path)
        try? Sys.removeFile(Self.temporaryPath(for: path))
    }
}
