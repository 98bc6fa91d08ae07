#if canImport(Glibc)
import Glibc
#endif
import PlatformLinux

/// `/run/balloond/hugetlb-pool`: the pool size from before balloond grew it, written before
/// the first growth of a session and removed once the pool is back. A balloond killed with
/// SIGKILL leaves it behind; the next start's `HugeTLBPoolSource.recoverAfterCrash` puts
/// `nr_hugepages` back (the dead process's reservation died with it, so the grown pages are
/// free and the kernel frees them at once).
///
/// Format: `nr_hugepages_before=N`, `pid=P`, `comm=NAME` lines.
public struct HugeTLBPoolStateFile: Hashable, Sendable {
    public static let defaultPath = "/run/balloond/hugetlb-pool"
    public let path: String
    public let root: SysRoot

    public init(root: SysRoot = .host, path: String = HugeTLBPoolStateFile.defaultPath) {
        self.root = root
        self.path = root.path(path)
    }

    public struct Contents: Hashable, Sendable {
        public var originalPoolSize: UInt64
        public var pid: Int32
        public var comm: String?
    }

    public func write(originalPoolSize: UInt64) throws(FreePagesLinuxError) {
        let dir = String(path[..<(path.lastIndex(of: "/") ?? path.startIndex)])
        let comm = (try? Sys.readAttribute(root.path("/proc/self/comm"))) ?? ""
        do {
            if !dir.isEmpty { try Sys.makeDirectories(dir) }
            try Sys.writeFile(path, "nr_hugepages_before=\(originalPoolSize)\npid=\(getpid())\ncomm=\(comm)\n")
        } catch { throw .system("cannot write the hugetlb pool state file \(path): \(error)") }
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
        guard let n = fields["nr_hugepages_before"].flatMap({ UInt64($0) }), let pid = fields["pid"].flatMap({ Int32($0) }) else {
            throw .malformedFile(path: path, reason: "expected nr_hugepages_before=N and pid=P lines, got \(text.debugDescription)")
        }
        let comm = fields["comm"].flatMap { $0.isEmpty ? nil : $0 }
        return Contents(originalPoolSize: n, pid: pid, comm: comm)
    }

    public func remove() {
        try? Sys.removeFile(path)
    }

    /// Whether the process that wrote `contents` is still running (and is not this one): its
    /// /proc/PID exists and, when both are known, has the same command name.
    func writerIsAlive(_ contents: Contents) -> Bool {
        guard contents.pid != getpid() else { return false }
        let procDir = root.path("/proc/\(contents.pid)")
        guard Sys.exists(procDir) else { return false }
        if let want = contents.comm, let have = try? Sys.readAttribute(procDir + "/comm") { return want == have }
        return true
    }
}
