#if canImport(Glibc)
import Glibc
#endif
import VirtioCore

/// One 64-bit `/proc/PID/pagemap` entry (Documentation/admin-guide/mm/pagemap.rst).
public struct PagemapEntry: Hashable, Sendable, CustomStringConvertible {
    public let rawValue: UInt64
    public init(rawValue: UInt64) { self.rawValue = rawValue }

    /// Bits 0–54: page frame number when present (0 without CAP_SYS_ADMIN, since 4.2).
    public var pfn: UInt64 { rawValue & ((1 << 55) - 1) }
    /// Bit 55.
    public var softDirty: Bool { rawValue & (1 << 55) != 0 }
    /// Bit 56: mapped exclusively.
    public var exclusive: Bool { rawValue & (1 << 56) != 0 }
    /// Bit 57.
    public var uffdWriteProtected: Bool { rawValue & (1 << 57) != 0 }
    /// Bit 61: file page or shared anonymous.
    public var fileOrShared: Bool { rawValue & (1 << 61) != 0 }
    /// Bit 62.
    public var swapped: Bool { rawValue & (1 << 62) != 0 }
    /// Bit 63.
    public var present: Bool { rawValue & (1 << 63) != 0 }

    public var description: String {
        "pagemap 0x\(String(rawValue, radix: 16)) (present \(present), swapped \(swapped), pfn 0x\(String(pfn, radix: 16)))"
    }
}

/// Translates one entry (pure): the physical address of `virtualAddress`, whose page the
/// entry describes, or an error saying why there is none.
public func physicalAddress(from entry: PagemapEntry, virtualAddress: UInt, pageSize: Int = 4096) throws(PlatformError) -> PhysicalAddress {
    guard entry.present else {
        throw .pagemap(entry.swapped ? .swappedOut(virtualAddress: virtualAddress) : .notPresent(virtualAddress: virtualAddress))
    }
    guard entry.pfn != 0 else { throw .pagemap(.pfnHidden(virtualAddress: virtualAddress)) }
    return PhysicalAddress(entry.pfn * UInt64(pageSize) + UInt64(virtualAddress % UInt(pageSize)))
}

/// Reads pagemap entries (`PagemapResolver`; tests pass a fake that can move a page).
public protocol PagemapReading: AnyObject {
    var pageSize: Int { get }
    /// The raw entries for `count` consecutive pages starting at the page holding `virtualAddress`.
    func entries(forVirtual virtualAddress: UInt, count: Int) throws(PlatformError) -> [PagemapEntry]
}

/// Virtual → physical translation through `/proc/self/pagemap`.
///
/// The kernel checks CAP_SYS_ADMIN against the credentials of whoever *opened* the file
/// (docs/userspace-pci.md §5), so this opens it once, while privileged, and keeps the descriptor.
/// Only meaningful for locked, present pages; and mlock does not pin (§5.6): hugetlb pages
/// do not move in practice, 4 KiB pages can.
public final class PagemapResolver: PagemapReading {
    public let path: String
    public let pageSize: Int
    private let file: OpenFile

    /// Opens the pagemap (default: this process's, under `root`).
    public init(root: SysRoot = .host, path: String? = nil, pageSize: Int = Sys.pageSize) throws(PlatformError) {
        let p = path ?? root.path("/proc/self/pagemap")
        self.path = p
        self.pageSize = pageSize
        do { file = try OpenFile(path: p, flags: O_RDONLY) } catch { throw .pagemap(.cannotOpen(error)) }
    }

    /// The raw entry for the page holding `virtualAddress`.
    public func entry(forVirtual virtualAddress: UInt) throws(PlatformError) -> PagemapEntry {
        let offset = Int(virtualAddress / UInt(pageSize)) * 8
        let bytes: [UInt8]
        do { bytes = try file.pread(count: 8, offset: offset) } catch {
            throw .pagemap(.readFailed(path: path, offset: offset, error))
        }
        guard bytes.count == 8 else {
            throw .pagemap(.shortRead(path: path, offset: offset, entries: 1, bytes: bytes.count))
        }
        var raw: UInt64 = 0
        for (i, b) in bytes.enumerated() { raw |= UInt64(b) << (8 * UInt64(i)) }
        return PagemapEntry(rawValue: raw)
    }

    /// The raw entries for `count` consecutive pages starting at the page holding
    /// `virtualAddress`, in one `pread` (8 bytes per page).
    public func entries(forVirtual virtualAddress: UInt, count: Int) throws(PlatformError) -> [PagemapEntry] {
        guard count > 0 else { return [] }
        let offset = Int(virtualAddress / UInt(pageSize)) * 8
        let bytes: [UInt8]
        do { bytes = try file.pread(count: count * 8, offset: offset) } catch {
            throw .pagemap(.readFailed(path: path, offset: offset, error))
        }
        guard bytes.count == count * 8 else {
            throw .pagemap(.shortRead(path: path, offset: offset, entries: count, bytes: bytes.count))
        }
        return (0..<count).map { i in
            var raw: UInt64 = 0
            for b in 0..<8 { raw |= UInt64(bytes[i * 8 + b]) << (8 * UInt64(b)) }
            return PagemapEntry(rawValue: raw)
        }
    }

    /// The physical address of `virtualAddress` (its page must be present and locked).
    public func physicalAddress(ofVirtual virtualAddress: UInt) throws(PlatformError) -> PhysicalAddress {
        try PlatformLinux.physicalAddress(from: entry(forVirtual: virtualAddress), virtualAddress: virtualAddress, pageSize: pageSize)
    }
}
