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

    static let keys: [String] = ["nr_hugepages_before", "nr_hugepages_set", "nr_hugepages_previous", "pid", "comm"]

    /// Records the start of a session (nothing set yet).
    public func write(originalPoolSize: UInt64) throws(FreePagesLinuxError) {
        try write(Contents(originalPoolSize: originalPoolSize, set: originalPoolSize, previous: originalPoolSize))
    }

    /// Records that balloond is about to change `nr_hugepages` from `previous` to `setting`.
    public func write(originalPoolSize: UInt64, setting: UInt64, previous: UInt64) throws(FreePagesLinuxError) {
        try write(Contents(originalPoolSize: originalPoolSize, set: setting, previous: previous))
    }

    public func write(_ c: Contents) throws(FreePagesLinuxError) {
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
    func writerIsAlive(_ contents: Contents) -> Bool {
        stateWriterIsAlive(root: root, pid: contents.pid, comm: contents.comm)
    }
}

/// This process's command name for state files (control characters dropped, so it stays one
/// line), or "" when unknown.
func processComm(root: SysRoot) -> String {
    let comm = (try? Sys.readAttribute(root.path("/proc/self/comm"))) ?? ""
    return String(comm.unicodeScalars.filter { $0.value >= 0x20 && $0.value != 0x7f }.map(Character.init))
}

/// Whether the balloond that wrote a state file (pid, comm) is still running and is not this
/// process.
func stateWriterIsAlive(root: SysRoot, pid: Int32, comm: String?) -> Bool {
    guard pid != Sys.processID else { return false }
    let procDir = root.path("/proc/\(pid)")
    // A balloond that is exiting or a zombie (killed, not yet reaped) holds nothing any more:
    // its state is what recovery is for (the guardian runs it right after a kill).
    guard Sys.processIsLive(pid, procRoot: root.path("/proc")) else { return false }
    if let want = comm, let have = try? Sys.readAttribute(procDir + "/comm") { return want == have }
    return true
}
