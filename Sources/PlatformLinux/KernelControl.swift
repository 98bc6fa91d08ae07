#if canImport(Glibc)
import Glibc
#endif
import SystemPackage

/// What a helper program printed and how it ended.
public struct CommandResult: Hashable, Sendable, CustomStringConvertible {
    /// Exit status (0 success), or 128+signal when killed by a signal, or 127 when the
    /// program could not be started.
    public var status: Int32
    /// stdout and stderr together, trimmed, at most 4 KiB.
    public var output: String

    public init(status: Int32, output: String) {
        self.status = status
        self.output = output
    }

    public var succeeded: Bool { status == 0 }

    public var description: String {
        let what = status == 0 ? "ok" : "exit \(status)"
        return output.isEmpty ? what : "\(what): \(output)"
    }
}

/// The operations that change kernel state, behind one protocol so the driver-binding logic
/// can be unit-tested against a fake sysfs tree with a fake kernel (which records each write
/// and simulates what the kernel would do).
///
/// Paths are absolute and already include the `SysRoot` prefix.
public protocol KernelControl: AnyObject {
    /// Writes `value` to a sysfs attribute (one write).
    func writeAttribute(_ path: String, _ value: String) throws(PlatformError)
    /// Runs a helper program (`modprobe`, `insmod`) by name from a fixed root PATH
    /// (/usr/sbin:/usr/bin:/sbin:/bin), with no stdin, and collects its output.
    func runCommand(_ program: String, _ arguments: [String]) -> CommandResult
    /// Creates a character device node (for /dev/uioN when devtmpfs did not).
    func makeCharacterDevice(_ path: String, major: UInt32, minor: UInt32) throws(PlatformError)
}

/// The real kernel: sysfs writes, posix_spawn, mknod.
public final class LinuxKernelControl: KernelControl {
    /// Directories searched for helper programs (root's usual PATH; not the caller's $PATH,
    /// since balloond runs as root).
    public static let searchPath = ["/usr/sbin", "/usr/bin", "/sbin", "/bin"]

    public init() {}

    public func writeAttribute(_ path: String, _ value: String) throws(PlatformError) {
        do { try Sys.writeAttribute(path, value) } catch { throw .system(error) }
    }

    public func runCommand(_ program: String, _ arguments: [String]) -> CommandResult {
        guard let executable = Self.searchPath.map({ $0 + "/" + program }).first(where: { unsafe access($0, X_OK) == 0 }) else {
            return CommandResult(status: 127, output: "\(program) not found in \(Self.searchPath.joined(separator: ":"))")
        }
        return spawnAndWait(executable, [program] + arguments)
    }

    public func makeCharacterDevice(_ path: String, major: UInt32, minor: UInt32) throws(PlatformError) {
        let dev = linuxDeviceNumber(major: major, minor: minor)
        do { _ = try Sys.call("mknod", path: path) { unsafe mknod(path, S_IFCHR | 0o600, dev_t(dev)) } } catch {
            throw .system(error)
        }
    }
}

/// The Linux `dev_t` encoding of major:minor (glibc `gnu_dev_makedev`): 12 bits of major
/// and 20 of minor in the low 32 bits, the rest above.
public func linuxDeviceNumber(major: UInt32, minor: UInt32) -> UInt64 {
    let ma = UInt64(major), mi = UInt64(minor)
    return ((ma & 0xffff_f000) << 32) | ((ma & 0x0000_0fff) << 8) | ((mi & 0xffff_ff00) << 12) | (mi & 0x0000_00ff)
}

/// Runs `path` with `argv` (argv[0] included), stdin from /dev/null, stdout and stderr into
/// one pipe, and a minimal environment; waits for it.
func spawnAndWait(_ path: String, _ argv: [String]) -> CommandResult {
    var fds: [Int32] = [-1, -1]
    // pipe2 is not imported (it needs _GNU_SOURCE); the child closes both ends itself.
    guard unsafe pipe(&fds) == 0 else {
        return CommandResult(status: 127, output: "pipe: \(Errno(rawValue: Glibc.errno))")
    }
    var actions = unsafe posix_spawn_file_actions_t()
    unsafe posix_spawn_file_actions_init(&actions)
    defer { unsafe posix_spawn_file_actions_destroy(&actions) }
    unsafe posix_spawn_file_actions_addopen(&actions, 0, "/dev/null", O_RDONLY, 0)
    unsafe posix_spawn_file_actions_adddup2(&actions, fds[1], 1)
    unsafe posix_spawn_file_actions_adddup2(&actions, fds[1], 2)
    unsafe posix_spawn_file_actions_addclose(&actions, fds[0])
    unsafe posix_spawn_file_actions_addclose(&actions, fds[1])

    let cArgs: [UnsafeMutablePointer<CChar>?] = unsafe argv.map { unsafe strdup($0) } + [nil]
    let cEnv: [UnsafeMutablePointer<CChar>?] = unsafe [strdup("PATH=" + LinuxKernelControl.searchPath.joined(separator: ":")), nil]
    defer { for unsafe p in unsafe cArgs + cEnv { unsafe free(p) } }

    var pid: pid_t = 0
    let rc = unsafe posix_spawn(&pid, path, &actions, nil, cArgs, cEnv)
    _ = Glibc.close(fds[1])
    guard rc == 0 else {
        _ = Glibc.close(fds[0])
        return CommandResult(status: 127, output: "posix_spawn \(path): \(Errno(rawValue: rc))")
    }
    var output: [UInt8] = []
    var chunk = [UInt8](repeating: 0, count: 4096)
    while true {
        let n = unsafe chunk.withUnsafeMutableBytes { raw in unsafe Glibc.read(fds[0], raw.baseAddress, raw.count) }
        if n > 0 {
            if output.count < 4096 { output += chunk[0..<min(n, 4096 - output.count)] }
            continue
        }
        if n < 0 && Glibc.errno == EINTR { continue }
        break
    }
    _ = Glibc.close(fds[0])
    var status: Int32 = 0
    while unsafe waitpid(pid, &status, 0) < 0 && Glibc.errno == EINTR {}
    // WIFEXITED / WEXITSTATUS / WTERMSIG, which Swift does not import (they are macros).
    let code: Int32 = (status & 0x7f) == 0 ? (status >> 8) & 0xff : 128 + (status & 0x7f)
    return CommandResult(status: code, output: trimmed(String(decoding: output, as: UTF8.self)))
}
