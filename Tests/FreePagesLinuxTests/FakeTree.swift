#if canImport(Glibc)
import Glibc
#endif
import PlatformLinux

/// A temporary directory standing in for "/" (a `SysRoot`) with fake /proc and /sys files.
/// Removed in deinit.
final class FakeTree {
    let path: String
    var root: SysRoot { SysRoot(path) }

    init() {
        var template = Array("/tmp/balloond-fpl-test-XXXXXX".utf8CString)
        let p = template.withUnsafeMutableBufferPointer { buf in mkdtemp(buf.baseAddress!) }
        precondition(p != nil, "mkdtemp failed")
        path = String(cString: p!)
    }

    deinit { removeTree(path) }

    func at(_ relative: String) -> String { path + relative }

    func file(_ relative: String, _ contents: String) {
        let full = at(relative)
        try! Sys.makeDirectories(parent(full))
        try! Sys.writeFile(full, contents)
    }

    func file(_ relative: String, bytes: [UInt8]) {
        let full = at(relative)
        try! Sys.makeDirectories(parent(full))
        let f = try! OpenFile(path: full, flags: O_WRONLY | O_CREAT | O_TRUNC, mode: 0o644)
        if !bytes.isEmpty { try! f.writeAll(bytes) }
    }

    /// A /proc/kpageflags- or /proc/kpagecount-style file: one little-endian u64 per PFN.
    func u64File(_ relative: String, _ values: [UInt64]) {
        var bytes: [UInt8] = []
        bytes.reserveCapacity(values.count * 8)
        for v in values { for i in 0..<8 { bytes.append(UInt8(truncatingIfNeeded: v >> (8 * UInt64(i)))) } }
        file(relative, bytes: bytes)
    }

    /// A state file as balloond writes one: the directory mode 0700, the file 0600, both
    /// owned by the test user (the fake tree's `stateOwner`).
    func stateFile(_ relative: String, _ contents: String) {
        let full = at(relative)
        let dir = parent(full)
        try! Sys.makeDirectories(dir, mode: 0o700)
        precondition(chmod(dir, 0o700) == 0)
        try! Sys.writeFile(full, contents, mode: 0o600)
        precondition(chmod(full, 0o600) == 0)
    }

    func read(_ relative: String) -> String? { try? Sys.readTextFile(at(relative)) }
    func exists(_ relative: String) -> Bool { Sys.exists(at(relative)) }
    func remove(_ relative: String) { _ = unlink(at(relative)) }

    /// /proc/meminfo with the three fields the sources read (bytes, written in kB).
    func meminfo(total: UInt64, free: UInt64, available: UInt64) {
        file("/proc/meminfo", "MemTotal: \(total / 1024) kB\nMemFree: \(free / 1024) kB\nMemAvailable: \(available / 1024) kB\nHugepagesize: 2048 kB\n")
    }

    private func parent(_ p: String) -> String { String(p[..<(p.lastIndex(of: "/") ?? p.startIndex)]) }
}

func removeTree(_ path: String) {
    if let st = try? Sys.lstatIfExists(path), (st.st_mode & S_IFMT) == S_IFDIR {
        for name in (try? Sys.listDirectory(path)) ?? [] { removeTree(path + "/" + name) }
        _ = rmdir(path)
    } else {
        _ = unlink(path)
    }
}
