#if canImport(Glibc)
import Glibc
#endif
import SystemPackage

/// One balloond per device: an exclusive `flock` on `/run/balloond/<BDF>.lock` that holds
/// our pid, kept until the object goes away (or the process dies: the kernel drops flock
/// locks with the last descriptor, so a crash never leaves a stale lock).
///
/// flock locks belong to the open file description, so two `DeviceLock`s on one path
/// conflict even inside one process.
public final class DeviceLock {
    public let path: String
    public let bdf: String
    private let file: OpenFile

    /// Locks `<directory>/<BDF>.lock` (directory created if needed, default `/run/balloond`
    /// under `root`).
    public convenience init(address: PCIAddress, root: SysRoot = .host, directory: String? = nil) throws(PlatformError) {
        let dir: String
        if let directory { dir = directory } else {
            // The state directory: root-only (0700), created so if missing (StateDirectory).
            let state = StateDirectory(root: root)
            do { try state.prepare() } catch { throw .stateFile(error) }
            dir = state.path
        }
        try self.init(path: "\(dir)/\(address.bdf).lock", bdf: address.bdf)
    }

    /// Locks an explicit lock file; `bdf` is only for the error message.
    public init(path: String, bdf: String) throws(PlatformError) {
        self.path = path
        self.bdf = bdf
        let dir = String(path[..<(path.lastIndex(of: "/") ?? path.startIndex)])
        do {
            if !dir.isEmpty { try Sys.makeDirectories(dir, mode: 0o700) }
            file = try OpenFile(path: path, flags: O_RDWR | O_CREAT, mode: 0o644)
        } catch { throw .system(error) }
        let fd = file.descriptor
        do { _ = try Sys.call("flock", path: path) { flock(fd, LOCK_EX | LOCK_NB) } } catch {
            if error.errno == .wouldBlock {
                throw .deviceBusy(bdf: bdf, lockPath: path, holderPID: Self.holder(of: file))
            }
            throw .system(error)
        }
        do {
            _ = try Sys.call("ftruncate", path: path) { ftruncate(fd, 0) }
            try file.pwrite(Array("\(getpid())\n".utf8), offset: 0)
        } catch { throw .system(error) }
    }

    /// The pid the holder wrote, if readable.
    private static func holder(of file: OpenFile) -> Int32? {
        guard let bytes = try? file.pread(count: 32, offset: 0) else { return nil }
        return Int32(trimmed(String(decoding: bytes, as: UTF8.self)))
    }

    /// The pid recorded in a lock file (nil if none or unreadable), for `balloond list`.
    /// A pid there does not mean the lock is held; only `DeviceLock.init` can tell.
    public static func recordedPID(at path: String) -> Int32? {
        guard let text = try? Sys.readAttribute(path) else { return nil }
        return Int32(text)
    }

    /// Releases the lock now (it is also released in deinit). The file stays: deleting a
    /// lock file races with a process that has just opened it.
    deinit { unlock() }

    /// Releases the lock explicitly before closing: a copy of the descriptor that a child
    /// holds between fork and exec (posix_spawn of the guardian) would otherwise keep the
    /// open file description, and with it the lock, alive a moment longer.
    public func unlock() {
        if file.descriptor >= 0 { _ = flock(file.descriptor, LOCK_UN) }
        file.close()
    }
}
