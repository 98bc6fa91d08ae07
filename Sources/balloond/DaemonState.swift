import Balloon
import FoundationEssentials
#if canImport(Glibc)
import Glibc
#endif

/// What a running `balloond run` publishes for `balloond status`: a JSON state file, readable
/// by root only, rewritten atomically (write a temporary file, then rename) whenever the
/// driver's state changes and at least every few seconds while it runs.
struct DaemonState: Codable, Equatable {
    var pid: Int32
    var device: String
    var pciID: String
    var previousDriver: String?
    var uioDevice: String
    var dmaMemory: String
    var hintSource: String?
    var startedAt: Double
    var updatedAt: Double
    var restarts: Int
    var driver: BalloonDriverStatus

    static let defaultPath = "/run/balloond/status.json"

    func write(to path: String) throws {
        let encoder = JSONEncoder()
        encoder.outputFormatting = [.prettyPrinted, .sortedKeys]
        let data = try encoder.encode(self)
        let dir = String(path[..<(path.lastIndex(of: "/") ?? path.startIndex)])
        if !dir.isEmpty { _ = mkdir(dir, 0o700) }
        let tmp = path + ".tmp"
        let fd = open(tmp, O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0o600)
        guard fd >= 0 else { throw Failure("cannot write \(tmp): \(String(cString: strerror(errno)))") }
        let ok = data.withUnsafeBytes { buf -> Bool in
            var off = 0
            while off < buf.count {
                let n = unsafe Glibc.write(fd, buf.baseAddress! + off, buf.count - off)
                if n < 0 { if errno == EINTR { continue }; return false }
                off += n
            }
            return true
        }
        close(fd)
        guard ok, rename(tmp, path) == 0 else { throw Failure("cannot write \(path): \(String(cString: strerror(errno)))") }
    }

    static func read(from path: String) throws -> DaemonState {
        guard let text = readTextFile(path) else {
            throw Failure("no balloond state at \(path): is `balloond run` running? (the file is readable by root only)")
        }
        do { return try JSONDecoder().decode(DaemonState.self, from: Data(text.utf8)) } catch {
            throw Failure("\(path) is not a balloond state file: \(error)")
        }
    }

    static func remove(at path: String) { _ = unlink(path) }
}

/// Seconds since the epoch.
func wallClockSeconds() -> Double {
    var ts = timespec()
    clock_gettime(CLOCK_REALTIME, &ts)
    return Double(ts.tv_sec) + Double(ts.tv_nsec) / 1e9
}

/// Whether a process with this pid exists.
func processExists(_ pid: Int32) -> Bool { kill(pid, 0) == 0 || errno == EPERM }
