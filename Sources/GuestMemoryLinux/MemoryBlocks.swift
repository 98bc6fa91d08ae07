import PlatformLinux
import VirtioCore

/// What asking the kernel to offline one memory block gave.
public enum MemoryBlockOfflineResult: Hashable, Sendable, CustomStringConvertible {
    /// The block is offline: no page of it is in use or free for allocation any more.
    case offlined
    /// EBUSY: a page could not be isolated or migrated (an unmovable page); nothing changed.
    case busy
    /// EINVAL: the block spans a hole or two zones, or is not online; nothing changed.
    case invalid
    /// The time bound ran out (EINTR): the kernel undid the isolation and the block is online.
    case timedOut(milliseconds: Int)
    /// Any other failure of the write.
    case failed(SystemCallError)

    public var description: String {
        switch self {
        case .offlined: return "offlined"
        case .busy: return "busy (an unmovable page)"
        case .invalid: return "refused (the block spans a hole or two zones)"
        case .timedOut(let ms): return "not offline within \(ms) ms (the kernel put it back online)"
        case .failed(let why): return "failed: \(why)"
        }
    }
}

/// The kernel's memory blocks (`/sys/devices/system/memory`, CONFIG_MEMORY_HOTREMOVE): block N
/// covers guest-physical `[N × blockBytes, (N + 1) × blockBytes)`.
public protocol MemoryBlockControl: AnyObject {
    /// The block size (`block_size_bytes`, 128 MiB on x86-64 guests below 64 GiB).
    var blockBytes: UInt64 { get }
    /// Blocks that are online and lie in one zone (offlining the others fails), ascending.
    func offlinableBlocks() throws(GuestMemoryError) -> [Int]
    /// Whether block `index` is offline now (nil: no such block, or unreadable).
    func isOffline(_ index: Int) -> Bool?
    /// Offlines block `index`, giving up after `timeoutMilliseconds` (the kernel retries page
    /// migration until a signal arrives, so an unbounded write could hang).
    func offline(_ index: Int, timeoutMilliseconds: Int) -> MemoryBlockOfflineResult
    /// Onlines block `index` into the zone it came from.
    func online(_ index: Int) throws(GuestMemoryError)
}

extension MemoryBlockControl {
    /// The guest-physical range of block `index`.
    public func range(of index: Int) -> GuestPhysicalRange {
        GuestPhysicalRange(start: UInt64(index) * blockBytes, length: blockBytes)
    }
}

/// `MemoryBlockControl` on `/sys/devices/system/memory` under `root`.
public final class LinuxMemoryBlocks: MemoryBlockControl {
    public let root: SysRoot
    public let blockBytes: UInt64
    private var directory: String { root.path("/sys/devices/system/memory") }

    /// Throws when the kernel has no memory hotplug interface (CONFIG_MEMORY_HOTPLUG off) or
    /// the block size does not parse.
    public init(root: SysRoot = .host) throws(GuestMemoryError) {
        self.root = root
        let path = root.path("/sys/devices/system/memory/block_size_bytes")
        let text: String
        do { text = try Sys.readAttribute(path) } catch {
            throw .noMemoryHotplug(path: path, error)
        }
        guard let size = UInt64(text, radix: 16), size >= 2 << 20, size & (size - 1) == 0 else {
            throw .malformedFile(path: path, reason: "\(String(text.prefix(40)).debugDescription) is not a power-of-two block size in hex")
        }
        blockBytes = size
    }

    private func attribute(_ index: Int, _ name: String) -> String? {
        try? Sys.readAttribute("\(directory)/memory\(index)/\(name)")
    }

    public func offlinableBlocks() throws(GuestMemoryError) -> [Int] {
        let names: [String]
        do { names = try Sys.listDirectory(directory) } catch { throw .cannotList(path: directory, error) }
        var out: [Int] = []
        for name in names where name.hasPrefix("memory") {
            guard let index = Int(name.dropFirst(6)), index >= 0 else { continue }
            guard attribute(index, "state") == "online" else { continue }
            // "none" (or several zones) means the block spans zones or holes: EINVAL.
            if let zones = attribute(index, "valid_zones"), zones == "none" || zones.contains(" ") { continue }
            out.append(index)
        }
        return out.sorted()
    }

    public func isOffline(_ index: Int) -> Bool? {
        guard let s = attribute(index, "state") else { return nil }
        return s == "offline"
    }

    public func offline(_ index: Int, timeoutMilliseconds: Int) -> MemoryBlockOfflineResult {
        let path = "\(directory)/memory\(index)/state"
        do {
            try Sys.writeAttribute(path, "offline", timeoutMilliseconds: timeoutMilliseconds)
            return .offlined
        } catch {
            switch error.errno {
            case .resourceBusy: return .busy
            case .invalidArgument: return .invalid
            case .interrupted: return .timedOut(milliseconds: timeoutMilliseconds)
            default: return .failed(error)
            }
        }
    }

    public func online(_ index: Int) throws(GuestMemoryError) {
        let path = "\(directory)/memory\(index)/state"
        do { try Sys.writeAttribute(path, "online") } catch {
            // Already online (someone else onlined it): nothing to do.
            if isOffline(index) == false { return }
            throw .cannotOnline(block: index, path: path, error)
        }
    }
}

extension MemoryBlockControl {
    /// Whether block `index` may be offlined without copying more than `movablePages` pages:
    /// every page a free buddy page, except at most `movablePages` in-use pages that are all
    /// movable LRU pages (`KPageFlags.isMovableLRU`: page cache or a process's unlocked memory,
    /// which offlining copies to a new frame). Pages balloond gave the device (its ring, balloon
    /// and report pages) are mlocked or hugetlb pages, so a block holding one never qualifies.
    /// A quick look at one page per 2 MiB first (most used blocks fail it), then every page.
    package func qualifiesForOffline(_ index: Int, kpageflags: KPageFile, movablePages: Int) throws(GuestMemoryError) -> Bool {
        let pages = blockBytes / balloonPageSize
        let first = UInt64(index) * pages
        var used = 0
        func acceptable(_ raw: UInt64) -> Bool {
            let f = KPageFlags(rawValue: raw)
            if f.isFreeBuddy { return true }
            guard movablePages > 0, f.isMovableLRU else { return false }
            used += 1
            return used <= movablePages
        }
        for pfn in stride(from: first, to: first + pages, by: 512) {
            guard let e = try kpageflags.entry(pfn: pfn), acceptable(e) else { return false }
        }
        used = 0
        var pfn = first
        while pfn < first + pages {
            let want = Int(min(UInt64(kpageflags.chunkEntries), first + pages - pfn))
            let (n, ok) = try kpageflags.read(startPFN: pfn, count: want) { entries in
                for i in entries.indices where !acceptable(UInt64(littleEndian: entries[i])) { return false }
                return true
            }
            if n == 0 || !ok { return false }
            pfn += UInt64(n)
        }
        return true
    }
}
