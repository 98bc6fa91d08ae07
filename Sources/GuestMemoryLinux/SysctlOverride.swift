import FreePages
import Logging
import PlatformLinux

/// A state file for one kernel setting balloond changes while it holds balloon memory
/// (`/run/balloond/balloon-hugetlb.state` for `nr_overcommit_hugepages`,
/// `/run/balloond/balloon-compact.state` for `compact_unevictable_allowed`): the setting,
/// its value before balloond touched it, the value balloond is setting now and the one it
/// set before that. Written (atomically, through `StateFile`) *before* each write to the
/// setting and removed once the original is back, so a balloond killed with SIGKILL leaves it
/// behind and the next start puts the original back (`SysctlOverride.recoverAfterCrash`).
///
/// Each file accepts only the settings it is for (`sysctls`): a file naming any other path is
/// malformed and never acted on.
///
/// Format (strict, see `StateRecord`): `sysctl=/proc/sys/…`, `original=N`, `set=N`,
/// `previous=N`, `pid=P`, `comm=NAME` lines.
public struct SysctlStateFile: Hashable, Sendable {
    public static let hugeTLBOvercommitPath = "/run/balloond/balloon-hugetlb.state"
    public static let compactUnevictablePath = "/run/balloond/balloon-compact.state"
    /// The settings each known state file may name.
    public static let expectedSysctls: [String: Set<String>] = [
        hugeTLBOvercommitPath: ["/sys/kernel/mm/hugepages/hugepages-2048kB/nr_overcommit_hugepages", "/proc/sys/vm/nr_overcommit_hugepages"],
        compactUnevictablePath: ["/proc/sys/vm/compact_unevictable_allowed"],
    ]
    public let file: StateFile
    /// The file (under the root).
    public var path: String { file.path }
    public let root: SysRoot
    /// The settings (absolute guest paths) this file may name.
    public let sysctls: Set<String>

    /// - Parameter sysctls: the settings the file may name; nil: `expectedSysctls[path]`
    ///   (none for an unknown path, so such a file can be neither written nor read).
    public init(root: SysRoot = .host, path: String, sysctls: Set<String>? = nil) {
        self.root = root
        self.file = StateFile(root: root, path: path)
        self.sysctls = sysctls ?? Self.expectedSysctls[path] ?? []
    }

    public struct Contents: Hashable, Sendable {
        /// The setting's absolute path on the guest (without the root prefix).
        public var sysctl: String
        public var original: UInt64
        /// What balloond is setting (written before the setting is).
        public var set: UInt64
        /// What balloond set before `set` (the setting holds this one if balloond died between
        /// writing this file and writing the setting).
        public var previous: UInt64
        public var pid: Int32
        public var comm: String?
        public init(sysctl: String, original: UInt64, set: UInt64, previous: UInt64, pid: Int32 = Sys.processID, comm: String? = nil) {
            self.sysctl = sysctl
            self.original = original
            self.set = set
            self.previous = previous
            self.pid = pid
            self.comm = comm
        }
    }

    package static let keys = ["sysctl", "original", "set", "previous", "pid", "comm"]

    private var unexpectedSysctl: String {
        sysctls.isEmpty ? "no setting (\(path) is not a known state file)" : "one of \(sysctls.sorted().joined(separator: ", "))"
    }

    public func write(_ c: Contents) throws(GuestMemoryError) {
        guard sysctls.contains(c.sysctl) else {
            throw .stateFile(.malformed(path: path, problem: .badValue(key: "sysctl", value: c.sysctl, expected: unexpectedSysctl)))
        }
        let comm = c.comm ?? processComm(root: root)
        let record = StateRecord(["sysctl": c.sysctl, "original": "\(c.original)", "set": "\(c.set)", "previous": "\(c.previous)",
                                  "pid": "\(c.pid)", "comm": comm])
        do { try file.write(try record.render(order: Self.keys)) } catch { throw .stateFile(error) }
    }

    /// The contents, nil when there is no file. A file that is not balloond's (link, owner,
    /// mode), does not parse, or names a setting this file is not for is an error; nothing of
    /// it is used.
    public func read() throws(StateFileError) -> Contents? {
        guard let r = try file.readRecord(keys: Set(Self.keys), required: Set(Self.keys).subtracting(["comm"])) else { return nil }
        let sysctl = r["sysctl"]!
        guard sysctls.contains(sysctl) else {
            throw .malformed(path: path, problem: .badValue(key: "sysctl", value: sysctl, expected: unexpectedSysctl))
        }
        do {
            return Contents(sysctl: sysctl, original: try r.uint64("original")!, set: try r.uint64("set")!, previous: try r.uint64("previous")!,
                            pid: try r.pid("pid")!, comm: r["comm"].flatMap { $0.isEmpty ? nil : $0 })
        } catch { throw .malformed(path: path, problem: error) }
    }

    public func remove() { try? file.remove() }

    /// Whether the process that wrote `contents` is still running and is not this one (its
    /// /proc/PID exists and, when both are known, has the same command name).
    package func writerIsAlive(_ contents: Contents) -> Bool {
        stateWriterIsAlive(root: root, pid: contents.pid, comm: contents.comm)
    }
}

/// What `recoverAfterCrash` found and did.
public enum SysctlRecovery: Hashable, Sendable, CustomStringConvertible {
    case nothingToDo
    case restored(sysctl: String, from: UInt64, to: UInt64)
    /// The setting already had its original value (balloond died before changing it).
    case alreadyOriginal(sysctl: String, value: UInt64)
    /// Someone else changed it since balloond did; left as it is.
    case changedByOthers(sysctl: String, value: UInt64, original: UInt64)
    case otherInstanceRunning(pid: Int32)
    /// The state file could not be trusted or parsed: moved to `to` and not acted on.
    case setAside(path: String, to: String, reason: StateFileError)

    public var description: String {
        switch self {
        case .nothingToDo: return "no state left behind"
        case .setAside(let path, let to, let reason): return "set \(path) aside as \(to) without acting on it: \(reason)"
        case .restored(let s, let from, let to): return "restored \(s) from \(from) to \(to), as left by a balloond that did not exit cleanly"
        case .alreadyOriginal(let s, let v): return "\(s) already has its original value \(v)"
        case .changedByOthers(let s, let v, let o): return "\(s) is \(v), which balloond never set (its original was \(o)): someone else changed it since; left alone"
        case .otherInstanceRunning(let pid): return "the state file belongs to a running balloond (pid \(pid)); left alone"
        }
    }
}

/// One kernel setting (a number in a /proc/sys or sysfs file) that balloond changes while it
/// holds balloon memory, and puts back afterwards, with a `SysctlStateFile` so that a
/// restart after SIGKILL puts it back too.
///
/// Restoring writes the original only if the setting still holds what balloond last set:
/// a value someone else wrote in the meantime is theirs and is left alone (logged).
package final class SysctlOverride {
    /// The setting's absolute path on the guest (without the root prefix).
    package let sysctl: String
    package let root: SysRoot
    package let stateFile: SysctlStateFile
    private let logger: Logger
    /// The value before balloond changed it; nil while not overridden.
    package private(set) var original: UInt64?
    package private(set) var lastSet: UInt64?

    package init(root: SysRoot, sysctl: String, stateFile: SysctlStateFile, logger: Logger) {
        self.root = root
        self.sysctl = sysctl
        self.stateFile = stateFile
        self.logger = logger
    }

    package var isActive: Bool { original != nil }
    package var exists: Bool { Sys.exists(root.path(sysctl)) }

    package func read() throws(GuestMemoryError) -> UInt64 {
        try Self.readValue(root.path(sysctl))
    }

    /// The value to restore: the recorded original while overridden, else the setting's
    /// value now, after putting back whatever a dead balloond left behind (so a restart after
    /// SIGKILL starts from the true original, not from the dead process's raised value).
    package func baseline() throws(GuestMemoryError) -> UInt64 {
        if let original { return original }
        if stateFile.file.exists {
            logger.warning("found \(stateFile.path) from a balloond that did not exit cleanly; restoring its setting first")
            let outcome = try Self.recoverAfterCrash(root: root, stateFile: stateFile, logger: logger)
            if case .otherInstanceRunning(let pid) = outcome {
                throw .otherInstanceChanged(sysctl: sysctl, pid: pid, stateFile: stateFile.path)
            }
            logger.notice("\(outcome)")
        }
        return try read()
    }

    /// Sets the value, recording the original first (see `baseline`).
    package func set(_ value: UInt64) throws(GuestMemoryError) {
        let contents: SysctlStateFile.Contents
        if let original, let lastSet {
            contents = SysctlStateFile.Contents(sysctl: sysctl, original: original, set: value, previous: lastSet)
        } else {
            let now = try baseline()
            contents = SysctlStateFile.Contents(sysctl: sysctl, original: now, set: value, previous: now)
        }
        try stateFile.write(contents)
        original = contents.original
        lastSet = contents.previous
        do { try Sys.writeAttribute(root.path(sysctl), "\(value)\n") } catch {
            throw .cannotSet(path: root.path(sysctl), value: value, error)
        }
        lastSet = value
    }

    /// Puts the original back (if the setting still holds balloond's value) and removes the
    /// state file. Returns a problem text for the log, nil when all went well.
    package func restore() -> String? {
        guard let original, let lastSet else { return nil }
        self.original = nil
        self.lastSet = nil
        let path = root.path(sysctl)
        let current: UInt64
        do { current = try read() } catch {
            return "cannot read \(path) to restore it to \(original): \(error); \(stateFile.path) is kept so the next start restores it"
        }
        if current == lastSet, current != original {
            do { try Sys.writeAttribute(path, "\(original)\n") } catch {
                return "cannot restore \(path) to \(original): \(error); \(stateFile.path) is kept so the next start restores it"
            }
        }
        stateFile.remove()
        if current != lastSet && current != original {
            return "\(path) is \(current), not \(lastSet) as balloond set it: someone else changed it, so it is left as it is (it was \(original) before balloond)"
        }
        return nil
    }

    /// Puts a setting back to what a balloond that was killed found, if it left a state file
    /// (and the setting still holds a value that balloond wrote).
    @discardableResult
    package static func recoverAfterCrash(root: SysRoot, stateFile: SysctlStateFile, logger: Logger) throws(GuestMemoryError) -> SysctlRecovery {
        let c: SysctlStateFile.Contents
        switch try readStateFileOrSetAside(stateFile.file, logger: logger, { () throws(StateFileError) in try stateFile.read() }) {
        case .absent: return .nothingToDo
        case .setAside(let to, let reason): return .setAside(path: stateFile.path, to: to, reason: reason)
        case .contents(let contents): c = contents
        }
        if stateFile.writerIsAlive(c) { return .otherInstanceRunning(pid: c.pid) }
        let path = root.path(c.sysctl)
        let current = try readValue(path)
        let outcome: SysctlRecovery
        if current == c.original {
            outcome = .alreadyOriginal(sysctl: c.sysctl, value: current)
        } else if current == c.set || current == c.previous {
            do { try Sys.writeAttribute(path, "\(c.original)\n") } catch {
                throw .cannotRestore(path: path, value: c.original, stateFile: stateFile.path, error)
            }
            outcome = .restored(sysctl: c.sysctl, from: current, to: c.original)
        } else {
            outcome = .changedByOthers(sysctl: c.sysctl, value: current, original: c.original)
            logger.warning("\(outcome)")
        }
        stateFile.remove()
        return outcome
    }

    package static func readValue(_ path: String) throws(GuestMemoryError) -> UInt64 {
        let text: String
        do { text = try Sys.readAttribute(path) } catch { throw .cannotRead(path: path, error) }
        guard let v = UInt64(text) else { throw .malformedFile(path: path, reason: "'\(text)' is not a number") }
        return v
    }
}
