#if canImport(Glibc)
import Glibc
#endif
import FreePages
import Logging
import PlatformLinux

/// A state file for one kernel setting balloond changes while it holds balloon memory
/// (`/run/balloond/balloon-hugetlb.state` for `nr_overcommit_hugepages`,
/// `/run/balloond/balloon-compact.state` for `compact_unevictable_allowed`): the setting,
/// its value before balloond touched it, the value balloond is setting now and the one it
/// set before that. Written (atomically, by rename) *before* each write to the setting and
/// removed once the original is back, so a balloond killed with SIGKILL leaves it behind and
/// the next start puts the original back (`SysctlOverride.recoverAfterCrash`).
///
/// Format: `sysctl=/proc/sys/…`, `original=N`, `set=N`, `previous=N`, `pid=P`, `comm=NAME` lines.
public struct SysctlStateFile: Hashable, Sendable {
    public static let hugeTLBOvercommitPath = "/run/balloond/balloon-hugetlb.state"
    public static let compactUnevictablePath = "/run/balloond/balloon-compact.state"
    /// The file (under the root).
    public let path: String
    public let root: SysRoot

    public init(root: SysRoot = .host, path: String) {
        self.root = root
        self.path = root.path(path)
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
        public init(sysctl: String, original: UInt64, set: UInt64, previous: UInt64, pid: Int32 = getpid(), comm: String? = nil) {
            self.sysctl = sysctl
            self.original = original
            self.set = set
            self.previous = previous
            self.pid = pid
            self.comm = comm
        }
    }

    public func write(_ c: Contents) throws(FreePagesLinuxError) {
        let dir = String(path[..<(path.lastIndex(of: "/") ?? path.startIndex)])
        let comm = c.comm ?? (try? Sys.readAttribute(root.path("/proc/self/comm"))) ?? ""
        do {
            if !dir.isEmpty { try Sys.makeDirectories(dir) }
            try Sys.replaceFile(path, "sysctl=\(c.sysctl)\noriginal=\(c.original)\nset=\(c.set)\nprevious=\(c.previous)\npid=\(c.pid)\ncomm=\(comm)\n")
        } catch { throw .system("cannot write the state file \(path): \(error)") }
    }

    /// The contents, nil when there is no file; an unreadable file is an error.
    public func read() throws(FreePagesLinuxError) -> Contents? {
        guard Sys.exists(path) else { return nil }
        let text: String
        do { text = try Sys.readTextFile(path) } catch { throw .system("cannot read \(path): \(error)") }
        var fields: [String: String] = [:]
        for line in text.split(separator: "\n") {
            let kv = line.split(separator: "=", maxSplits: 1, omittingEmptySubsequences: false)
            if kv.count == 2 { fields[String(kv[0])] = String(kv[1]) }
        }
        guard let sysctl = fields["sysctl"], sysctl.hasPrefix("/"),
              let original = fields["original"].flatMap({ UInt64($0) }), let set = fields["set"].flatMap({ UInt64($0) }),
              let pid = fields["pid"].flatMap({ Int32($0) }) else {
            throw .malformedFile(path: path, reason: "expected sysctl=/path, original=N, set=N and pid=P lines, got \(text.debugDescription); restore the setting by hand and delete the file")
        }
        let previous = fields["previous"].flatMap { UInt64($0) } ?? original
        let comm = fields["comm"].flatMap { $0.isEmpty ? nil : $0 }
        return Contents(sysctl: sysctl, original: original, set: set, previous: previous, pid: pid, comm: comm)
    }

    public func remove() { try? Sys.removeFile(path) }

    /// Whether the process that wrote `contents` is still running and is not this one (its
    /// /proc/PID exists and, when both are known, has the same command name).
    func writerIsAlive(_ contents: Contents) -> Bool {
        guard contents.pid != getpid() else { return false }
        let procDir = root.path("/proc/\(contents.pid)")
        guard Sys.exists(procDir) else { return false }
        if let want = contents.comm, let have = try? Sys.readAttribute(procDir + "/comm") { return want == have }
        return true
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

    public var description: String {
        switch self {
        case .nothingToDo: return "no state left behind"
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
final class SysctlOverride {
    /// The setting's absolute path on the guest (without the root prefix).
    let sysctl: String
    let root: SysRoot
    let stateFile: SysctlStateFile
    private let logger: Logger
    /// The value before balloond changed it; nil while not overridden.
    private(set) var original: UInt64?
    private(set) var lastSet: UInt64?

    init(root: SysRoot, sysctl: String, stateFile: SysctlStateFile, logger: Logger) {
        self.root = root
        self.sysctl = sysctl
        self.stateFile = stateFile
        self.logger = logger
    }

    var isActive: Bool { original != nil }
    var exists: Bool { Sys.exists(root.path(sysctl)) }

    func read() throws(FreePagesLinuxError) -> UInt64 {
        try Self.readValue(root.path(sysctl))
    }

    /// The value to restore: the recorded original while overridden, else the setting's
    /// value now, after putting back whatever a dead balloond left behind (so a restart after
    /// SIGKILL starts from the true original, not from the dead process's raised value).
    func baseline() throws(FreePagesLinuxError) -> UInt64 {
        if let original { return original }
        if let left = try stateFile.read() {
            if stateFile.writerIsAlive(left) {
                throw .system("another balloond (pid \(left.pid)) has changed \(left.sysctl) (see \(stateFile.path)); stop it first")
            }
            logger.warning("found \(stateFile.path) from a balloond that did not exit cleanly; restoring \(left.sysctl) first")
            let outcome = try Self.recoverAfterCrash(root: root, stateFile: stateFile, logger: logger)
            logger.notice("\(outcome)")
        }
        return try read()
    }

    /// Sets the value, recording the original first (see `baseline`).
    func set(_ value: UInt64) throws(FreePagesLinuxError) {
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
            throw .system("cannot set \(root.path(sysctl)) to \(value): \(error); balloond must run as root")
        }
        lastSet = value
    }

    /// Puts the original back (if the setting still holds balloond's value) and removes the
    /// state file. Returns a problem text for the log, nil when all went well.
    func restore() -> String? {
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
    static func recoverAfterCrash(root: SysRoot, stateFile: SysctlStateFile, logger: Logger) throws(FreePagesLinuxError) -> SysctlRecovery {
        guard let c = try stateFile.read() else { return .nothingToDo }
        if stateFile.writerIsAlive(c) { return .otherInstanceRunning(pid: c.pid) }
        let path = root.path(c.sysctl)
        let current = try readValue(path)
        let outcome: SysctlRecovery
        if current == c.original {
            outcome = .alreadyOriginal(sysctl: c.sysctl, value: current)
        } else if current == c.set || current == c.previous {
            do { try Sys.writeAttribute(path, "\(c.original)\n") } catch {
                throw .system("restoring \(path) to \(c.original) from \(stateFile.path) failed: \(error)")
            }
            outcome = .restored(sysctl: c.sysctl, from: current, to: c.original)
        } else {
            outcome = .changedByOthers(sysctl: c.sysctl, value: current, original: c.original)
            logger.warning("\(outcome)")
        }
        stateFile.remove()
        return outcome
    }

    static func readValue(_ path: String) throws(FreePagesLinuxError) -> UInt64 {
        let text: String
        do { text = try Sys.readAttribute(path) } catch { throw .system("cannot read \(path): \(error)") }
        guard let v = UInt64(text) else { throw .malformedFile(path: path, reason: "'\(text)' is not a number") }
        return v
    }
}
