#if canImport(Glibc)
import Glibc
#endif

/// Where the kernel's file systems (`/sys`, `/proc`, `/dev`, `/run`, `/lib/modules`) are
/// found.
///
/// Production code uses `.host` ("/"). Unit tests point it at a temporary directory that holds
/// a fake tree (`<tmp>/sys/bus/pci/devices/...`, `<tmp>/proc/meminfo`, ...), so every check
/// and every sysfs write can be exercised without root, a VM, or a virtio device.
public struct SysRoot: Hashable, Sendable, CustomStringConvertible {
    /// The directory that stands in for "/"; never ends in "/" except for the host root.
    public let prefix: String

    /// - Parameter prefix: "/" for the real system, or a directory holding a fake tree.
    public init(_ prefix: String = "/") {
        var p = prefix.isEmpty ? "/" : prefix
        while p.count > 1 && p.hasSuffix("/") { p.removeLast() }
        self.prefix = p
    }

    /// The uid that must own balloond's state directory and files (`StateDirectory`): root on
    /// the host; the user running the tests in a fake tree (whose files that user creates).
    public var stateOwner: UInt32 { isHost ? 0 : geteuid() }

    /// The real system.
    public static let host = SysRoot("/")

    /// Whether this is the real "/".
    public var isHost: Bool { prefix == "/" }

    /// The path of `absolute` (which starts with "/") under this root.
    public func path(_ absolute: String) -> String {
        precondition(absolute.hasPrefix("/"), "SysRoot.path wants an absolute path, got \(absolute)")
        return isHost ? absolute : prefix + absolute
    }

    public var description: String { prefix }
}
