#if canImport(Glibc)
import Glibc
#endif
import PlatformLinux

/// A temporary directory that stands in for "/" (a `SysRoot`), with helpers to lay out fake
/// `/sys`, `/proc`, `/dev` and `/lib/modules` files. Removed in deinit.
public final class FakeTree {
    public let path: String
    public var root: SysRoot { SysRoot(path) }

    public init() {
        var template = Array("/tmp/balloond-test-XXXXXX".utf8CString)
        let p = template.withUnsafeMutableBufferPointer { buf in mkdtemp(buf.baseAddress!) }
        precondition(p != nil, "mkdtemp failed")
        path = String(cString: p!)
    }

    deinit { removeTree(path) }

    /// Absolute path of `relative` ("/sys/...") inside the tree.
    public func at(_ relative: String) -> String { path + relative }

    /// Writes a file, creating parent directories.
    public func file(_ relative: String, _ contents: String) {
        let full = at(relative)
        try! Sys.makeDirectories(parent(full))
        try! Sys.writeFile(full, contents)
    }

    /// Writes binary contents (an empty array leaves an empty file).
    public func file(_ relative: String, bytes: [UInt8]) {
        let full = at(relative)
        try! Sys.makeDirectories(parent(full))
        let f = try! OpenFile(path: full, flags: O_WRONLY | O_CREAT | O_TRUNC, mode: 0o644)
        if !bytes.isEmpty { try! f.writeAll(bytes) }
    }

    /// A /proc/kpageflags- or /proc/kpagecount-style file: one little-endian u64 per PFN.
    public func u64File(_ relative: String, _ values: [UInt64]) {
        var bytes: [UInt8] = []
        bytes.reserveCapacity(values.count * 8)
        for v in values { for i in 0..<8 { bytes.append(UInt8(truncatingIfNeeded: v >> (8 * UInt64(i)))) } }
        file(relative, bytes: bytes)
    }

    public func directory(_ relative: String) { try! Sys.makeDirectories(at(relative)) }

    /// A state file as balloond writes one: the directory mode 0700, the file 0600, both
    /// owned by the test user (the fake tree's `stateOwner`).
    public func stateFile(_ relative: String, _ contents: String) {
        let full = at(relative)
        let dir = parent(full)
        try! Sys.makeDirectories(dir, mode: 0o700)
        precondition(chmod(dir, 0o700) == 0)
        try! Sys.writeFile(full, contents, mode: 0o600)
        precondition(chmod(full, 0o600) == 0)
    }

    /// Creates a symbolic link at `relative` pointing at `target` (used verbatim).
    public func symlink(_ relative: String, to target: String) {
        let full = at(relative)
        try! Sys.makeDirectories(parent(full))
        _ = unlink(full)
        precondition(Glibc.symlink(target, full) == 0, "symlink \(full) failed")
    }

    public func remove(_ relative: String) { _ = unlink(at(relative)) }

    public func read(_ relative: String) -> String? { try? Sys.readTextFile(at(relative)) }

    public func exists(_ relative: String) -> Bool { Sys.exists(at(relative)) }

    /// /proc/meminfo with the three fields the sources read (bytes, written in kB).
    public func meminfo(total: UInt64, free: UInt64, available: UInt64) {
        file("/proc/meminfo", "MemTotal: \(total / 1024) kB\nMemFree: \(free / 1024) kB\nMemAvailable: \(available / 1024) kB\nHugepagesize: 2048 kB\n")
    }

    /// A PCI function directory as sysfs shows it.
    public func pciDevice(_ bdf: String, vendor: UInt16, device: UInt16, classCode: UInt32 = 0x00ff00, revision: UInt8 = 1,
                          subsystemVendor: UInt16 = 0x1af4, subsystem: UInt16 = 0x1100, driver: String? = nil,
                          resources: [String]? = nil, config: [UInt8]? = nil) {
        let d = "/sys/bus/pci/devices/\(bdf)"
        func h(_ v: UInt64, _ n: Int) -> String {
            let s = String(v, radix: 16)
            return "0x" + String(repeating: "0", count: max(0, n - s.count)) + s
        }
        file(d + "/vendor", h(UInt64(vendor), 4) + "\n")
        file(d + "/device", h(UInt64(device), 4) + "\n")
        file(d + "/class", h(UInt64(classCode), 6) + "\n")
        file(d + "/revision", h(UInt64(revision), 2) + "\n")
        file(d + "/subsystem_vendor", h(UInt64(subsystemVendor), 4) + "\n")
        file(d + "/subsystem_device", h(UInt64(subsystem), 4) + "\n")
        file(d + "/irq", "11\n")
        file(d + "/driver_override", "(null)\n")
        let lines = resources ?? Array(repeating: zeroResourceLine, count: 13)
        file(d + "/resource", lines.joined(separator: "\n") + "\n")
        var cfg = config ?? [UInt8](repeating: 0, count: 256)
        if config == nil {
            cfg[0] = UInt8(vendor & 0xff); cfg[1] = UInt8(vendor >> 8)
            cfg[2] = UInt8(device & 0xff); cfg[3] = UInt8(device >> 8)
            cfg[8] = revision
            cfg[9] = UInt8(classCode & 0xff); cfg[10] = UInt8((classCode >> 8) & 0xff); cfg[11] = UInt8(classCode >> 16)
            cfg[0x2c] = UInt8(subsystemVendor & 0xff); cfg[0x2d] = UInt8(subsystemVendor >> 8)
            cfg[0x2e] = UInt8(subsystem & 0xff); cfg[0x2f] = UInt8(subsystem >> 8)
        }
        file(d + "/config", bytes: cfg)
        if let driver { bindLink(bdf, driver) }
    }

    /// Points `devices/BDF/driver` at `drivers/NAME` the way sysfs does (relative link) and
    /// makes sure the driver directory with bind/unbind exists.
    public func bindLink(_ bdf: String, _ driver: String) {
        pciDriver(driver)
        symlink("/sys/bus/pci/devices/\(bdf)/driver", to: "../../../../bus/pci/drivers/\(driver)")
    }

    public func pciDriver(_ name: String) {
        let d = "/sys/bus/pci/drivers/\(name)"
        if !exists(d + "/bind") { file(d + "/bind", "") }
        if !exists(d + "/unbind") { file(d + "/unbind", "") }
    }

    private func parent(_ p: String) -> String {
        String(p[..<(p.lastIndex(of: "/") ?? p.startIndex)])
    }
}

/// `rm -rf` without following links.
public func removeTree(_ path: String) {
    if let st = try? Sys.lstatIfExists(path), (st.st_mode & S_IFMT) == S_IFDIR {
        for name in (try? Sys.listDirectory(path)) ?? [] { removeTree(path + "/" + name) }
        _ = rmdir(path)
    } else {
        _ = unlink(path)
    }
}

/// One line of a sysfs `resource` file for an absent BAR.
private let zeroResourceLine = "0x0000000000000000 0x0000000000000000 0x0000000000000000"

/// The standard 13-line resource file of a modern virtio-balloon: only BAR4 (16 KiB,
/// 64-bit prefetchable, flags 0x14220c as measured under QEMU 7.2).
public let balloonResources: [String] = {
    var lines = Array(repeating: zeroResourceLine, count: 13)
    lines[4] = "0x00000000fe000000 0x00000000fe003fff 0x000000000014220c"
    return lines
}()
