/// `/proc/meminfo` (Documentation/filesystems/proc.rst): `Key:   value [kB]` lines.
///
/// Values with a `kB` unit are stored in bytes; unitless ones (`HugePages_Total`,
/// `HugePages_Free`, ...) are counts.
public struct MemInfo: Hashable, Sendable {
    /// Every field, by its name without the colon.
    public let fields: [String: UInt64]

    public init(fields: [String: UInt64]) { self.fields = fields }

    /// Parses the file's text (pure). Lines that do not fit the format are an error, so a
    /// changed format is noticed rather than read as zeroes.
    public init(parsing text: String, path: String = "/proc/meminfo") throws(PlatformError) {
        var f: [String: UInt64] = [:]
        for (n, line) in text.split(separator: "\n", omittingEmptySubsequences: true).enumerated() {
            guard let colon = line.firstIndex(of: ":") else {
                throw .malformedFile(path: path, reason: .noColon(line: n + 1, text: String(line)))
            }
            let key = String(line[..<colon])
            let rest = line[line.index(after: colon)...].split(separator: " ", omittingEmptySubsequences: true)
            guard !key.isEmpty, let first = rest.first, let value = UInt64(first), rest.count <= 2 else {
                throw .malformedFile(path: path, reason: .notKeyNumber(line: n + 1, text: String(line)))
            }
            if rest.count == 2 {
                guard rest[1] == "kB" else { throw .malformedFile(path: path, reason: .unitNotKB(line: n + 1, unit: String(rest[1]))) }
                f[key] = value * 1024
            } else {
                f[key] = value
            }
        }
        fields = f
    }

    /// Reads `/proc/meminfo` under `root`.
    public static func read(root: SysRoot = .host) throws(PlatformError) -> MemInfo {
        let path = root.path("/proc/meminfo")
        let text: String
        do { text = try Sys.readTextFile(path) } catch { throw .system(error) }
        return try MemInfo(parsing: text, path: path)
    }

    public subscript(_ key: String) -> UInt64? { fields[key] }

    /// `MemTotal` in bytes.
    public var memTotal: UInt64? { fields["MemTotal"] }
    /// `MemFree` in bytes.
    public var memFree: UInt64? { fields["MemFree"] }
    /// `MemAvailable` in bytes.
    public var memAvailable: UInt64? { fields["MemAvailable"] }
    /// Default hugepage size in bytes (`Hugepagesize`).
    public var hugePageSize: UInt64? { fields["Hugepagesize"] }
    public var hugePagesTotal: UInt64? { fields["HugePages_Total"] }
    public var hugePagesFree: UInt64? { fields["HugePages_Free"] }
    /// Reserved (promised to a mapping but not yet faulted) pages, included in Free.
    public var hugePagesReserved: UInt64? { fields["HugePages_Rsvd"] }
    /// Surplus (overcommitted) default-size hugepages.
    public var hugePagesSurplus: UInt64? { fields["HugePages_Surp"] }
    /// Free default-size hugepages nobody has reserved: what a new mapping can get.
    public var hugePagesAvailable: UInt64? {
        guard let free = hugePagesFree else { return nil }
        return free - min(free, hugePagesReserved ?? 0)
    }
}
