/// The kernel's pool of 2 MiB hugetlb pages (Documentation/admin-guide/mm/hugetlbpage.rst).
///
/// Uses the per-size files `/sys/kernel/mm/hugepages/hugepages-2048kB/{nr,free,resv}_hugepages`
/// when present, else `/proc/sys/vm/nr_hugepages` with `/proc/meminfo` (valid only when the
/// default hugepage size is 2 MiB).
public struct HugePagePool: Sendable {
    public static let pageSize = 2 << 20
    public let root: SysRoot

    public init(root: SysRoot = .host) { self.root = root }

    private var sysfsDirectory: String { root.path("/sys/kernel/mm/hugepages/hugepages-2048kB") }
    private var usesSysfs: Bool { Sys.isDirectory(sysfsDirectory) }

    /// The file that sets the pool size.
    public var countPath: String {
        usesSysfs ? sysfsDirectory + "/nr_hugepages" : root.path("/proc/sys/vm/nr_hugepages")
    }

    /// Whether this kernel has 2 MiB hugetlb pages at all.
    public func isSupported() -> Bool {
        if usesSysfs { return true }
        guard Sys.exists(root.path("/proc/sys/vm/nr_hugepages")), let info = try? MemInfo.read(root: root) else { return false }
        return info.hugePageSize == UInt64(Self.pageSize)
    }

    /// Pages in the pool (`nr_hugepages`).
    public func count() throws(PlatformError) -> UInt64 { try readNumber(countPath) }

    /// Free pages not reserved by another mapping.
    public func available() throws(PlatformError) -> UInt64 {
        if usesSysfs {
            let free = try readNumber(sysfsDirectory + "/free_hugepages")
            let reserved = try readNumber(sysfsDirectory + "/resv_hugepages")
            return free - min(free, reserved)
        }
        let info = try MemInfo.read(root: root)
        guard info.hugePageSize == UInt64(Self.pageSize) else {
            throw .malformedFile(path: root.path("/proc/meminfo"), reason: .defaultHugePageSizeNot2MiB(bytes: info.hugePageSize ?? 0, missingSysfsDirectory: sysfsDirectory))
        }
        guard let a = info.hugePagesAvailable else {
            throw .malformedFile(path: root.path("/proc/meminfo"), reason: .noHugePagesFree)
        }
        return a
    }

    /// All of the 2 MiB pool's counters at once (the per-size sysfs files, else
    /// `/proc/meminfo` and `/proc/sys/vm/nr_overcommit_hugepages` when the default size is
    /// 2 MiB). Each is one read; they are not one atomic snapshot.
    public func counters() throws(PlatformError) -> HugePageCounters {
        if usesSysfs {
            let d = sysfsDirectory
            let overcommitPath = d + "/nr_overcommit_hugepages"
            return HugePageCounters(total: try readNumber(d + "/nr_hugepages"),
                                    free: try readNumber(d + "/free_hugepages"),
                                    reserved: try readNumber(d + "/resv_hugepages"),
                                    surplus: Sys.exists(d + "/surplus_hugepages") ? try readNumber(d + "/surplus_hugepages") : 0,
                                    overcommit: Sys.exists(overcommitPath) ? try readNumber(overcommitPath) : 0)
        }
        let info = try MemInfo.read(root: root)
        guard info.hugePageSize == UInt64(Self.pageSize) else {
            throw .malformedFile(path: root.path("/proc/meminfo"), reason: .defaultHugePageSizeNot2MiB(bytes: info.hugePageSize ?? 0, missingSysfsDirectory: sysfsDirectory))
        }
        guard let total = info.hugePagesTotal, let free = info.hugePagesFree, let reserved = info.hugePagesReserved else {
            throw .malformedFile(path: root.path("/proc/meminfo"), reason: .noHugePageCounters)
        }
        let overcommitPath = root.path("/proc/sys/vm/nr_overcommit_hugepages")
        return HugePageCounters(total: total, free: free, reserved: reserved, surplus: info.hugePagesSurplus ?? 0,
                                overcommit: Sys.exists(overcommitPath) ? try readNumber(overcommitPath) : 0)
    }

    /// Sets `nr_hugepages`.
    public func setCount(_ n: UInt64) throws(PlatformError) {
        do { try Sys.writeAttribute(countPath, "\(n)\n") } catch { throw .system(error) }
    }

    /// Makes sure one page is available, growing the pool by one if needed. Returns true
    /// when it grew the pool (the caller must `giveBackOne()` when done). On failure the
    /// pool is left as it was.
    public func reserveOne() throws(PlatformError) -> Bool {
        if try available() > 0 { return false }
        let before = try count()
        try setCount(before + 1)
        if try available() > 0 { return true }
        // The kernel could not find 2 MiB of contiguous free memory.
        try? setCount(before)
        throw .hugePages(.poolDidNotGrow(countPath: countPath, before: before))
    }

    /// Shrinks the pool by one (after our page was unmapped).
    public func giveBackOne() throws(PlatformError) {
        let n = try count()
        if n > 0 { try setCount(n - 1) }
    }

    private func readNumber(_ path: String) throws(PlatformError) -> UInt64 {
        let text: String
        do { text = try Sys.readAttribute(path) } catch { throw .system(error) }
        guard let v = UInt64(text) else { throw .malformedFile(path: path, reason: .notANumber(text)) }
        return v
    }
}

/// The 2 MiB hugetlb pool's counters (Documentation/admin-guide/mm/hugetlbpage.rst).
public struct HugePageCounters: Hashable, Sendable, CustomStringConvertible {
    /// `nr_hugepages`: persistent pages in the pool (in use or free).
    public var total: UInt64
    /// `free_hugepages`: pool pages not allocated to anyone (reserved ones included).
    public var free: UInt64
    /// `resv_hugepages`: free pages promised to a mapping that has not faulted them yet.
    public var reserved: UInt64
    /// `surplus_hugepages`: pages allocated beyond `nr_hugepages` through overcommit.
    public var surplus: UInt64
    /// `nr_overcommit_hugepages`: how many surplus pages the kernel may create on demand.
    public var overcommit: UInt64

    public init(total: UInt64, free: UInt64, reserved: UInt64, surplus: UInt64 = 0, overcommit: UInt64 = 0) {
        self.total = total
        self.free = free
        self.reserved = reserved
        self.surplus = surplus
        self.overcommit = overcommit
    }

    /// Pages in use (allocated to a mapping or a hugetlbfs file).
    public var inUse: UInt64 { total - min(total, free) }

    public var description: String {
        "HugePages total \(total), free \(free), reserved \(reserved), surplus \(surplus), overcommit \(overcommit)"
    }
}
