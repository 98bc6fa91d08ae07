import PlatformLinux

/// `/run/balloond/hugetlb-pool`: the pool size from before balloond grew it, and the value
/// balloond is setting now, written (atomically, through `StateFile`) before the first
/// growth of a session and before every later write to `nr_hugepages`, and removed once the
/// pool is back. A balloond killed with SIGKILL leaves it behind; the next start's
/// `recoverAfterCrash` puts `nr_hugepages` back (the dead process's reservation died with it,
/// so the grown pages are free and the kernel frees them at once), but only if the pool is
/// still where balloond left it: a value an admin set since is theirs.
///
/// Format (strict, see `StateRecord`): `nr_hugepages_before=N`, `nr_hugepages_set=N`,
/// `nr_hugepages_previous=N`, `pid=P`, `comm=NAME` lines. Between writing the file and the
/// kernel applying a write, `nr_hugepages` lies between `previous` and `set`.
public struct HugeTLBPoolStateFile: Hashable, Sendable {
    public static let defaultPath = "/run/balloond/hugetlb-pool"
    public let file: StateFile
    public let root: SysRoot
    /// The file (under the root).
    public var path: String { file.path }

    public init(root: SysRoot = .host, path: String = HugeTLBPoolStateFile.defaultPath) {
        self.root = root
        self.file = StateFile(root: root, path: path)
    }

    public struct Contents: Hashable, Sendable {
        /// `nr_hugepages` before balloond's session.
        public var originalPoolSize: UInt64
        /// What balloond is setting (written before the setting is).
        public var set: UInt64
        /// What balloond set before `set`.
        public var previous: UInt64
        public var pid: Int32
        public var comm: String?
        public init(originalPoolSize: UInt64, set: UInt64, previous: UInt64, pid: Int32 = Sys.processID, comm: String? = nil) {
            self.originalPoolSize = originalPoolSize
            self.set = set
            self.previous = previous
            self.pid = pid
            self.comm = comm
        }

        /// Whether `value` is one balloond may have left `nr_hugepages` at.
        public func isBalloondsValue(_ value: UInt64) -> Bool {
            value >= min(set, previous) && value <= max(set, previous)
        }
    }

    package static let keys: [String] = ["nr_hugepages_before", "nr_hugepages_set", "nr_hugepages_previous", "pid", "comm"]

    /// Records the start of a session (nothing set yet).
    public func write(originalPoolSize: UInt64) throws(GuestMemoryError) {
        try write(Contents(originalPoolSize: originalPoolSize, set: originalPoolSize, previous: originalPoolSize))
    }

    /// Records that balloond is about to change `nr_hugepages` from `previous` to `setting`.
    public func write(originalPoolSize: UInt64, setting: UInt64, previous: UInt64) throws(GuestMemoryError) {
        try write(Contents(originalPoolSize: originalPoolSize, set: setting, previous: previous))
    }

    public func write(_ c: Contents) throws(GuestMemoryError) {
        let comm = c.comm ?? processComm(root: root)
        let record = StateRecord([
            "nr_hugepages_before": "\(c.originalPoolSize)", "nr_hugepages_set": "\(c.set)",
            "nr_hugepages_previous": "\(c.previous)", "pid": "\(c.pid)", "comm": comm,
        ])
        do { try file.write(try record.render(order: Self.keys)) } catch { throw .stateFile(error) }
    }

    /// The contents, nil when there is no file. A file that is not balloond's (link, owner,
    /// mode) or does not parse is an error; nothing of it is used.
    public func read() throws(StateFileError) -> Contents? {
        guard let r = try file.readRecord(keys: Set(Self.keys), required: Set(Self.keys).subtracting(["comm"])) else { return nil }
        do {
            return Contents(originalPoolSize: try r.uint64("nr_hugepages_before")!, set: try r.uint64("nr_hugepages_set")!,
                            previous: try r.uint64("nr_hugepages_previous")!, pid: try r.pid("pid")!,
                            comm: r["comm"].flatMap { $0.isEmpty ? nil : $0 })
        } catch { throw .malformed(path: path, problem: error) }
    }

    public func remove() {
        try? file.remove()
    }

    /// Whether the process that wrote `contents` is still running (and is not this one): its
    /// /proc/PID exists and, when both are known, has the same command name.
    package func writerIsAlive(_ contents: Contents) -> Bool {
        stateWriterIsAlive(root: root, pid: contents.pid, comm: contents.comm)
    }
}

/// This process's command name for state files (control characters dropped, so it stays one
/// line), or "" when unknown.
package func processComm(root: SysRoot) -> String {
    let comm = (try? Sys.readAttribute(root.path("/proc/self/comm"))) ?? ""
    return String(comm.unicodeScalars.filter { $0.value >= 0x20 && $0.value != 0x7f }.map(Character.init))
}

/// Whether the balloond that wrote a state file (pid, comm) is still running and is not this
/// process.
package func stateWriterIsAlive(root: SysRoot, pid: Int32, comm: String?) -> Bool {
    guard pid != Sys.processID else { return false }
    let procDir = root.path("/proc/\(pid)")
    // A balloond that is exiting or a zombie (killed, not yet reaped) holds nothing any more:
    // its state is what recovery is for (the guardian runs it right after a kill).
    guard Sys.processIsLive(pid, procRoot: root.path("/proc")) else { return false }
    if let want = comm, let have = try? Sys.readAttribute(procDir + "/comm") { return want == have }
    return true
}

/// What the start-up recovery did with a hugetlb pool state file.
public enum HugeTLBPoolRecovery: Hashable, Sendable, CustomStringConvertible {
    case nothingToDo
    case restored(from: UInt64, to: UInt64)
    case otherInstanceRunning(pid: Int32)
    /// The pool already had its original size.
    case alreadyOriginal(value: UInt64)
    /// Someone changed `nr_hugepages` since balloond did; left as it is.
    case changedByOthers(value: UInt64, original: UInt64, balloondSet: UInt64)
    /// The state file could not be trusted or parsed: moved to `to` and not acted on.
    case setAside(path: String, to: String, reason: StateFileError)
    public var description: String {
        switch self {
        case .nothingToDo: return "no hugetlb pool state left behind"
        case .restored(let from, let to): return "restored nr_hugepages from \(from) to \(to), as left by a balloond that did not exit cleanly"
        case .otherInstanceRunning(let pid): return "the hugetlb pool state file belongs to a running balloond (pid \(pid)); left alone"
        case .alreadyOriginal(let v): return "nr_hugepages already has its original value \(v)"
        case .changedByOthers(let v, let o, let set): return "nr_hugepages is \(v), which balloond never set (it set \(set); the original was \(o)): someone else changed it since; left alone"
        case .setAside(let path, let to, let reason): return "set \(path) aside as \(to) without acting on it: \(reason)"
        }
    }
}
