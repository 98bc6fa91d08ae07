#if canImport(Glibc)
import Glibc
#endif
import CBalloonShims
import SystemPackage

/// A system call that failed: which call, on which path, and the kernel's errno.
///
/// Syscalls whose failure balloond acts on go through `Sys.call` (or one of the helpers built
/// on it), which retries `EINTR` and produces one of these for any other failure. `mmap`
/// (`MappedMemory.map`, whose failure value is `MAP_FAILED`, not -1) builds one itself; a few
/// calls whose failure changes nothing (`munmap` on the way out, `madvise` hints, `poll` in
/// the event loop, `waitpid` after `posix_spawn`) still call Glibc directly.
public struct SystemCallError: Error, Hashable, Sendable, CustomStringConvertible {
    /// The C function, e.g. "open", "pread", "mmap".
    public let call: String
    /// The file the call was about, if any.
    public let path: String?
    /// The errno it returned.
    public let errno: Errno

    public init(call: String, path: String?, errno: Errno) {
        self.call = call
        self.path = path
        self.errno = errno
    }

    public var description: String {
        let target = path.map { "(\($0))" } ?? ""
        return "\(call)\(target) failed: \(errno.description) (errno \(errno.rawValue))"
    }
}

/// An open file descriptor that is closed exactly once, when the object goes away (or on
/// `close()`).
public final class OpenFile {
    /// The descriptor; -1 after `close()`.
    public private(set) var descriptor: Int32
    /// The path it was opened with (for error messages).
    public let path: String

    /// Opens `path` with `flags` (O_CLOEXEC is always added).
    public init(path: String, flags: Int32, mode: mode_t = 0o600) throws(SystemCallError) {
        self.path = path
        let fl = flags | O_CLOEXEC
        descriptor = try Sys.call("open", path: path) { unsafe open(path, fl, mode) }
    }

    /// Takes ownership of an open descriptor (e.g. a memfd, or one inherited from a parent);
    /// `path` names it in error messages.
    public init(adopting descriptor: Int32, path: String) {
        self.descriptor = descriptor
        self.path = path
    }

    deinit { if descriptor >= 0 { _ = Glibc.close(descriptor) } }

    /// Closes now. Never retried on EINTR: Linux releases the descriptor before it can return
    /// EINTR, so a retry could close a descriptor another thread just got.
    public func close() {
        if descriptor >= 0 { _ = Glibc.close(descriptor) }
        descriptor = -1
    }

    /// Reads up to `count` bytes at `offset` (one `pread`, EINTR retried). Fewer bytes mean
    /// end of file, or for sysfs `config` as non-root, the end of the readable header.
    public func pread(count: Int, offset: Int) throws(SystemCallError) -> [UInt8] {
        var buffer = [UInt8](repeating: 0, count: count)
        let fd = descriptor
        let n = try Sys.call("pread", path: path) {
            unsafe buffer.withUnsafeMutableBytes { raw in unsafe Glibc.pread(fd, raw.baseAddress, raw.count, off_t(offset)) }
        }
        buffer.removeLast(count - n)
        return buffer
    }

    /// Reads up to `buffer.count` bytes at `offset` into `buffer` (one `pread`, EINTR
    /// retried, no allocation): for scanning large binary files such as /proc/kpageflags
    /// chunk by chunk. Returns the bytes read (0 at end of file).
    public func pread(into buffer: UnsafeMutableRawBufferPointer, offset: Int) throws(SystemCallError) -> Int {
        let fd = descriptor
        return try Sys.call("pread", path: path) { unsafe Glibc.pread(fd, buffer.baseAddress, buffer.count, off_t(offset)) }
    }

    /// Reads up to `buffer.count` bytes at `offset` into `buffer` (one `pread`, EINTR
    /// retried, no allocation): for a file read again and again through one descriptor, such
    /// as /proc/meminfo (a procfs file regenerates its text on a read at offset 0).
    public func pread(into buffer: inout [UInt8], offset: Int) throws(SystemCallError) -> Int {
        let fd = descriptor
        return try Sys.call("pread", path: path) {
            unsafe buffer.withUnsafeMutableBytes { raw in unsafe Glibc.pread(fd, raw.baseAddress, raw.count, off_t(offset)) }
        }
    }

    /// Writes `bytes` in one `write` at the current position (for files that cannot seek,
    /// such as a PSI trigger); returns how many were written.
    @discardableResult
    public func write(_ bytes: [UInt8]) throws(SystemCallError) -> Int {
        let fd = descriptor
        return try Sys.call("write", path: path) {
            unsafe bytes.withUnsafeBytes { raw in unsafe Glibc.write(fd, raw.baseAddress, raw.count) }
        }
    }

    /// Writes `bytes` at `offset` in one `pwrite`; returns how many were written.
    @discardableResult
    public func pwrite(_ bytes: [UInt8], offset: Int) throws(SystemCallError) -> Int {
        let fd = descriptor
        return try Sys.call("pwrite", path: path) {
            unsafe bytes.withUnsafeBytes { raw in unsafe Glibc.pwrite(fd, raw.baseAddress, raw.count, off_t(offset)) }
        }
    }

    /// Reads `count` bytes at the current position (one `read`).
    public func read(count: Int) throws(SystemCallError) -> [UInt8] {
        var buffer = [UInt8](repeating: 0, count: count)
        let fd = descriptor
        let n = try Sys.call("read", path: path) {
            unsafe buffer.withUnsafeMutableBytes { raw in unsafe Glibc.read(fd, raw.baseAddress, raw.count) }
        }
        buffer.removeLast(count - n)
        return buffer
    }

    /// Reads from the current position to end of file.
    public func readToEnd() throws(SystemCallError) -> [UInt8] {
        var all: [UInt8] = []
        while true {
            let chunk = try read(count: 4096)
            if chunk.isEmpty { return all }
            all += chunk
        }
    }

    /// Writes all of `bytes` at the current position in one `write`. sysfs attributes take a
    /// value in a single write, so a short write is reported as an error rather than retried.
    public func writeAll(_ bytes: [UInt8]) throws(SystemCallError) {
        let fd = descriptor
        let n = try Sys.call("write", path: path) {
            unsafe bytes.withUnsafeBytes { raw in unsafe Glibc.write(fd, raw.baseAddress, raw.count) }
        }
        if n != bytes.count { throw SystemCallError(call: "write (short: \(n) of \(bytes.count) bytes)", path: path, errno: .ioError) }
    }

    /// `fstat`.
    public func status() throws(SystemCallError) -> stat {
        var st = stat()
        let fd = descriptor
        _ = try Sys.call("fstat", path: path) { unsafe fstat(fd, &st) }
        return st
    }
}

/// memfd flags (uapi `linux/memfd.h`; glibc hides them without _GNU_SOURCE).
public enum MemfdFlags {
    public static let closeOnExec: UInt32 = 0x0001
    public static let hugeTLB: UInt32 = 0x0004
    /// MFD_HUGE_2MB: log2(2 MiB) << MFD_HUGE_SHIFT (26).
    public static let huge2MB: UInt32 = 21 << 26
}

/// The syscall funnel and small file helpers used throughout PlatformLinux.
public enum Sys {
    /// Runs `body` (a libc call returning -1 and setting errno on failure), retrying while it
    /// fails with EINTR, and throws `SystemCallError` for any other failure.
    @discardableResult
    public static func call<T: BinaryInteger>(_ name: String, path: String? = nil, _ body: () -> T) throws(SystemCallError) -> T {
        while true {
            let r = body()
            if r != -1 { return r }
            let e = Glibc.errno
            if e == EINTR { continue }
            throw SystemCallError(call: name, path: path, errno: Errno(rawValue: e))
        }
    }

    /// `epoll_create1(EPOLL_CLOEXEC)`.
    public static func epollCreate() throws(SystemCallError) -> OpenFile {
        let fd = try Sys.call("epoll_create1") { epoll_create1(Int32(EPOLL_CLOEXEC)) }
        return OpenFile(adopting: fd, path: "epoll")
    }

    /// Adds `descriptor` to the epoll set for input; `epollWait` reports it as `tag`.
    public static func epollAdd(_ epoll: OpenFile, descriptor: Int32, tag: UInt64) throws(SystemCallError) {
        var event = unsafe epoll_event(events: EPOLLIN.rawValue, data: epoll_data_t(u64: tag))
        let fd = epoll.descriptor
        try Sys.call("epoll_ctl") { unsafe epoll_ctl(fd, EPOLL_CTL_ADD, descriptor, &event) }
    }

    /// Waits up to `timeoutMilliseconds` (negative: forever) for at most `maxEvents` ready
    /// descriptors and returns their tags; an interrupted wait (EINTR) returns none.
    public static func epollWait(_ epoll: OpenFile, maxEvents: Int, timeoutMilliseconds: Int) throws(SystemCallError) -> [UInt64] {
        var ready = unsafe [epoll_event](repeating: epoll_event(), count: max(1, maxEvents))
        let fd = epoll.descriptor
        let capacity = unsafe Int32(ready.count)
        let n = unsafe epoll_wait(fd, &ready, capacity, Int32(clamping: timeoutMilliseconds < 0 ? -1 : timeoutMilliseconds))
        if n < 0 {
            if Glibc.errno == EINTR { return [] }
            throw SystemCallError(call: "epoll_wait", path: nil, errno: Errno(rawValue: Glibc.errno))
        }
        return unsafe ready.prefix(Int(n)).map { unsafe $0.data.u64 }
    }

    /// `memfd_create`: an anonymous file (shmem, or hugetlbfs with `MemfdFlags.hugeTLB`).
    public static func memfdCreate(name: String, flags: UInt32) throws(SystemCallError) -> OpenFile {
        let fd = try Sys.call("memfd_create", path: name) { unsafe bs_memfd_create(name, flags) }
        return OpenFile(adopting: fd, path: "memfd:\(name)")
    }

    /// `ftruncate`.
    public static func truncate(_ file: OpenFile, length: Int) throws(SystemCallError) {
        let fd = file.descriptor
        _ = try Sys.call("ftruncate", path: file.path) { ftruncate(fd, off_t(length)) }
    }

    /// Frees `[offset, offset + length)` of a file's pages (`fallocate` PUNCH_HOLE | KEEP_SIZE):
    /// for a memfd, the pages go back to the kernel for everyone, however many mappings or
    /// descriptors still refer to the file.
    public static func punchHole(_ file: OpenFile, offset: Int, length: Int) throws(SystemCallError) {
        let fd = file.descriptor
        _ = try Sys.call("fallocate(PUNCH_HOLE)", path: file.path) { bs_punch_hole(fd, Int64(offset), Int64(length)) }
    }

    /// Whether SIGTERM, SIGINT or SIGHUP has arrived through the daemon's signal handlers
    /// (long kernel work checks this between steps).
    public static var terminationSignalReceived: Bool { bs_signal_received() != 0 }

    /// CLOCK_MONOTONIC in nanoseconds.
    public static func monotonicNanos() -> UInt64 {
        var ts = timespec()
        unsafe clock_gettime(CLOCK_MONOTONIC, &ts)
        return UInt64(ts.tv_sec) * 1_000_000_000 + UInt64(ts.tv_nsec)
    }

    /// Seconds since the epoch (CLOCK_REALTIME).
    public static func wallClockSeconds() -> Double {
        var ts = timespec()
        unsafe clock_gettime(CLOCK_REALTIME, &ts)
        return Double(ts.tv_sec) + Double(ts.tv_nsec) / 1e9
    }

    /// This process's pid, and its parent's.
    public static var processID: Int32 { getpid() }
    public static var parentProcessID: Int32 { getppid() }

    /// Whether `/proc/<pid>` under `root` names a process that has not exited: false when it
    /// is gone, a zombie (killed, not yet reaped) or dead ("Z", "X", "x" in /proc/<pid>/stat).
    public static func processIsLive(_ pid: Int32, procRoot: String) -> Bool {
        guard pid > 0, exists(procRoot + "/\(pid)") else { return false }
        guard let stat = try? readAttribute(procRoot + "/\(pid)/stat"), let close = stat.lastIndex(of: ")") else { return true }
        let state = stat[stat.index(after: close)...].drop(while: { $0 == " " }).first
        return !(state == "Z" || state == "X" || state == "x")
    }

    /// This process's effective uid.
    public static var effectiveUserID: UInt32 { geteuid() }

    /// mmap protections and open flags for callers above the funnel.
    public static let protectionNone = PROT_NONE
    public static let openReadOnly = O_RDONLY

    /// Whether a process with this pid exists (only positive pids: 0 and negative ones name
    /// process groups, which `kill` would signal).
    public static func processExists(_ pid: Int32) -> Bool { pid > 0 && (kill(pid, 0) == 0 || errno == EPERM) }

    /// "ENOMEM: Cannot allocate memory"-style text for an errno value.
    public static func errnoDescription(_ e: Int32) -> String {
        let name: String
        switch e {
        case ENOMEM: name = "ENOMEM"
        case EINVAL: name = "EINVAL"
        case EPERM: name = "EPERM"
        case EAGAIN: name = "EAGAIN"
        case EFAULT: name = "EFAULT"
        case EBUSY: name = "EBUSY"
        default: name = "errno \(e)"
        }
        return unsafe "\(name): " + String(cString: strerror(e))
    }

    /// A whole text file, or nil when it cannot be read (proc and sysfs report size 0, so
    /// this reads until EOF).
    public static func readTextFileIfPresent(_ path: String) -> String? { try? readTextFile(path) }

    /// Sleeps for about `microseconds` (register polling; a signal ends it early).
    /// SCHED_FIFO at the lowest real-time priority (`on`), or back to SCHED_OTHER: for the
    /// guardian, which sleeps until the worker dies and must then run before anything else.
    public static func setRealtimePriority(_ on: Bool) throws(SystemCallError) {
        var param = sched_param()
        param.sched_priority = on ? 1 : 0
        _ = try Sys.call("sched_setscheduler") { unsafe sched_setscheduler(0, on ? SCHED_FIFO : SCHED_OTHER, &param) }
    }

    public static func sleep(microseconds: Int) { _ = usleep(useconds_t(max(0, microseconds))) }

    /// Reads a whole (small) text file, e.g. a sysfs attribute or a /proc file.
    public static func readTextFile(_ path: String) throws(SystemCallError) -> String {
        let f = try OpenFile(path: path, flags: O_RDONLY)
        let bytes = try f.readToEnd()
        return String(decoding: bytes, as: UTF8.self)
    }

    /// Reads a text file and trims surrounding whitespace (a sysfs attribute's value).
    public static func readAttribute(_ path: String) throws(SystemCallError) -> String {
        trimmed(try readTextFile(path))
    }

    /// Writes `value` to a sysfs attribute in a single `write` (what the kernel's store
    /// functions expect). The file must exist; it is not created.
    public static func writeAttribute(_ path: String, _ value: String) throws(SystemCallError) {
        let f = try OpenFile(path: path, flags: O_WRONLY | O_TRUNC)
        try f.writeAll(Array(value.utf8))
    }

    /// Writes a sysfs attribute, giving up after `timeoutMilliseconds`: for attributes whose
    /// kernel side waits until a signal arrives (a memory block's `state`: offlining retries
    /// page migration until then). The write is interrupted by a timer signal to this thread;
    /// the error then has errno EINTR. Not retried on EINTR (unlike `call`).
    public static func writeAttribute(_ path: String, _ value: String, timeoutMilliseconds: Int) throws(SystemCallError) {
        let f = try OpenFile(path: path, flags: O_WRONLY | O_TRUNC)
        let bytes = Array(value.utf8)
        let fd = f.descriptor
        // `f` must stay open until the write returns (its deinit closes the descriptor).
        let n = withExtendedLifetime(f) {
            unsafe bytes.withUnsafeBytes { buf in
                unsafe bs_write_with_timeout(fd, buf.baseAddress, UInt(buf.count), Int32(clamping: max(1, timeoutMilliseconds)))
            }
        }
        if n < 0 { throw SystemCallError(call: "write", path: path, errno: Errno(rawValue: Glibc.errno)) }
        if n != bytes.count { throw SystemCallError(call: "write (short)", path: path, errno: Errno(rawValue: EIO)) }
    }

    /// Writes a regular file (creating or truncating it), e.g. a state file under /run.
    public static func writeFile(_ path: String, _ contents: String, mode: mode_t = 0o644) throws(SystemCallError) {
        let f = try OpenFile(path: path, flags: O_WRONLY | O_CREAT | O_TRUNC, mode: mode)
        try f.writeAll(Array(contents.utf8))
    }

    /// Replaces a regular file's contents atomically: writes `path.tmp`, then renames it over
    /// `path`, so a reader (or a restart after SIGKILL) sees the old contents or the new ones,
    /// never an empty or half-written file.
    public static func replaceFile(_ path: String, _ contents: String, mode: mode_t = 0o644) throws(SystemCallError) {
        let temporary = path + ".tmp"
        try writeFile(temporary, contents, mode: mode)
        _ = try Sys.call("rename", path: path) { unsafe rename(temporary, path) }
    }

    /// The target of a symbolic link.
    public static func readlink(_ path: String) throws(SystemCallError) -> String {
        var buffer = [CChar](repeating: 0, count: Int(PATH_MAX) + 1)
        let n = try Sys.call("readlink", path: path) {
            unsafe buffer.withUnsafeMutableBufferPointer { p in unsafe Glibc.readlink(path, p.baseAddress!, p.count - 1) }
        }
        return String(decoding: buffer[0..<n].map { UInt8(bitPattern: $0) }, as: UTF8.self)
    }

    /// `lstat`, or nil when the path does not exist (ENOENT/ENOTDIR).
    public static func lstatIfExists(_ path: String) throws(SystemCallError) -> stat? {
        var st = stat()
        let r = unsafe lstat(path, &st)
        if r == 0 { return st }
        let e = Glibc.errno
        if e == ENOENT || e == ENOTDIR { return nil }
        throw SystemCallError(call: "lstat", path: path, errno: Errno(rawValue: e))
    }

    /// `stat` (following links), or nil when the path does not exist.
    public static func statIfExists(_ path: String) throws(SystemCallError) -> stat? {
        var st = stat()
        let r = unsafe stat(path, &st)
        if r == 0 { return st }
        let e = Glibc.errno
        if e == ENOENT || e == ENOTDIR { return nil }
        throw SystemCallError(call: "stat", path: path, errno: Errno(rawValue: e))
    }

    /// Whether something (a file, directory or link) exists at `path`.
    public static func exists(_ path: String) -> Bool {
        (try? lstatIfExists(path)) != nil
    }

    /// Whether `path` is a directory (following links).
    public static func isDirectory(_ path: String) -> Bool {
        guard let st = try? statIfExists(path) else { return false }
        return (st.st_mode & S_IFMT) == S_IFDIR
    }

    /// The entries of a directory, without "." and "..", sorted.
    public static func listDirectory(_ path: String) throws(SystemCallError) -> [String] {
        guard let dir = unsafe opendir(path) else {
            throw SystemCallError(call: "opendir", path: path, errno: Errno(rawValue: Glibc.errno))
        }
        defer { unsafe _ = closedir(dir) }
        var names: [String] = []
        while let entry = unsafe readdir(dir) {
            let name = unsafe withUnsafeBytes(of: entry.pointee.d_name) { raw in
                unsafe String(decoding: raw.prefix(while: { $0 != 0 }), as: UTF8.self)
            }
            if name != "." && name != ".." { names.append(name) }
        }
        return names.sorted()
    }

    /// `mkdir -p`.
    public static func makeDirectories(_ path: String, mode: mode_t = 0o755) throws(SystemCallError) {
        var current = path.hasPrefix("/") ? "" : "."
        for part in path.split(separator: "/") {
            current += "/" + part
            if unsafe mkdir(current, mode) != 0 {
                let e = Glibc.errno
                if e == EEXIST, isDirectory(current) { continue }
                throw SystemCallError(call: "mkdir", path: current, errno: Errno(rawValue: e))
            }
        }
    }

    /// Removes a file; a missing file is not an error.
    public static func removeFile(_ path: String) throws(SystemCallError) {
        if unsafe unlink(path) != 0 {
            let e = Glibc.errno
            if e == ENOENT { return }
            throw SystemCallError(call: "unlink", path: path, errno: Errno(rawValue: e))
        }
    }

    /// The running kernel's release (`uname -r`).
    public static func kernelRelease() -> String {
        var u = utsname()
        guard unsafe uname(&u) == 0 else { return "" }
        return unsafe withUnsafeBytes(of: u.release) { raw in
            unsafe String(decoding: raw.prefix(while: { $0 != 0 }), as: UTF8.self)
        }
    }

    /// The system page size (4096 on x86-64).
    public static var pageSize: Int { Int(sysconf(Int32(_SC_PAGESIZE))) }
}

/// Trims ASCII whitespace (sysfs values end in "\n").
func trimmed(_ s: String) -> String {
    let ws: (Character) -> Bool = { $0 == " " || $0 == "\n" || $0 == "\t" || $0 == "\r" }
    var sub = Substring(s)
    while let f = sub.first, ws(f) { sub.removeFirst() }
    while let l = sub.last, ws(l) { sub.removeLast() }
    return String(sub)
}

/// Parses "0x1af4", "1af4" or "4660" style sysfs numbers: hex with or without "0x"
/// when `hex`, else decimal.
func parseNumber(_ text: String, hex: Bool) -> UInt64? {
    var t = trimmed(text)
    if t.hasPrefix("0x") || t.hasPrefix("0X") { t.removeFirst(2); return UInt64(t, radix: 16) }
    return UInt64(t, radix: hex ? 16 : 10)
}
