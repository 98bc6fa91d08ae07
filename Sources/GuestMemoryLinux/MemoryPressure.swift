/// `/proc/pressure/memory` (Documentation/accounting/psi.rst):
/// `some avg10=0.00 avg60=0.00 avg300=0.00 total=0` and the same for `full`.
public struct MemoryPressure: Hashable, Sendable {
    public struct Line: Hashable, Sendable {
        /// Share of wall time (percent) some (or all, for `full`) tasks stalled on memory,
        /// averaged over 10, 60 and 300 seconds.
        public var avg10: Double
        public var avg60: Double
        public var avg300: Double
        /// Total stall time in microseconds since boot (monotonic: deltas give the stall
        /// over any interval, without the averages' lag).
        public var totalMicroseconds: UInt64
        public init(avg10: Double, avg60: Double, avg300: Double, totalMicroseconds: UInt64) {
            self.avg10 = avg10
            self.avg60 = avg60
            self.avg300 = avg300
            self.totalMicroseconds = totalMicroseconds
        }
    }

    public var some: Line
    /// Absent on kernels before 5.x for some resources; the memory file has it.
    public var full: Line?

    public init(some: Line, full: Line?) {
        self.some = some
        self.full = full
    }

    /// Parses the file's text (pure).
    public init(parsing text: String) throws(GuestMemoryError) {
        var some: Line?
        var full: Line?
        for line in text.split(separator: "\n", omittingEmptySubsequences: true) {
            let words = line.split(separator: " ", omittingEmptySubsequences: true)
            guard let kind = words.first else { continue }
            var values: [String: Substring] = [:]
            for w in words.dropFirst() {
                let kv = w.split(separator: "=", maxSplits: 1)
                if kv.count == 2 { values[String(kv[0])] = kv[1] }
            }
            guard let a10 = values["avg10"].flatMap({ Double($0) }), let a60 = values["avg60"].flatMap({ Double($0) }),
                  let a300 = values["avg300"].flatMap({ Double($0) }), let total = values["total"].flatMap({ UInt64($0) }) else {
                throw .malformedFile(path: "/proc/pressure/memory", reason: "line is not 'some|full avg10=… avg60=… avg300=… total=…': \(line)")
            }
            let parsed = Line(avg10: a10, avg60: a60, avg300: a300, totalMicroseconds: total)
            if kind == "some" { some = parsed } else if kind == "full" { full = parsed }
        }
        guard let some else { throw .malformedFile(path: "/proc/pressure/memory", reason: "no 'some' line") }
        self.some = some
        self.full = full
    }
}
