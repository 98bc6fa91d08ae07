import PlatformLinux

/// The memory operations the anonymous source needs, behind a protocol so its logic can be
/// tested with fake memory and a fake pagemap.
public protocol AnonymousMemoryBackend: AnyObject {
    /// Maps `bytes` (a multiple of 2 MiB) of anonymous 4 KiB pages (no THP), populates them
    /// for write and locks them, so that every page is present, private and not reclaimable.
    func mapPopulated(bytes: Int) throws(GuestMemoryError) -> AnonymousChunk
    /// The pagemap entries of every 4 KiB page of `chunk`, in order.
    func pagemap(of chunk: AnonymousChunk) throws(GuestMemoryError) -> [PagemapEntry]
}

/// One mapped chunk; `release()` (or deinit) unmaps it.
public final class AnonymousChunk {
    public let base: UInt
    public let bytes: Int
    /// How populating went (for statistics).
    public let usedPopulateWrite: Bool
    private var unmap: (() -> Void)?

    public init(base: UInt, bytes: Int, usedPopulateWrite: Bool, unmap: @escaping () -> Void) {
        self.base = base
        self.bytes = bytes
        self.usedPopulateWrite = usedPopulateWrite
        self.unmap = unmap
    }

    public func release() {
        unmap?()
        unmap = nil
    }

    deinit { release() }
}

/// The real thing: an `OwnedAnonymousMapping` of 4 KiB pages with `MADV_NOHUGEPAGE` (no THP:
/// a huge page can be split, migrated as a unit or collapsed into new frames),
/// `MADV_UNMERGEABLE`, `MADV_DONTFORK`, populated for write (`MADV_POPULATE_WRITE`, else one
/// write per page) and `mlock`ed; PFNs from `/proc/self/pagemap` through a `PagemapResolver`
/// opened while privileged. Compaction is kept off the locked pages by the source's
/// `CompactionHold`.
public final class LinuxAnonymousMemory: AnonymousMemoryBackend {
    public let pagemapResolver: PagemapResolver
    /// Where the chunks come from (shared shmem memfd memory the guardian also holds).
    public let arena: DeviceMemoryArena

    public init(pagemap: PagemapResolver, arena: DeviceMemoryArena) {
        pagemapResolver = pagemap
        self.arena = arena
    }

    public func mapPopulated(bytes: Int) throws(GuestMemoryError) -> AnonymousChunk {
        precondition(bytes > 0 && bytes % 4096 == 0)
        let mapping: OwnedAnonymousMapping
        do { mapping = try OwnedAnonymousMapping(length: bytes, kind: .small, arena: arena) } catch {
            throw .cannotMap(bytes: bytes, step: .mmap, error)
        }
        // EINVAL: no THP (or no KSM) in this kernel, so nothing to turn off.
        do { try mapping.advise(OwnedAnonymousMapping.adviceNoHugePage) } catch where error.errno == .invalidArgument {} catch {
            throw .cannotMap(bytes: bytes, step: .noHugePage, error)
        }
        do { try mapping.advise(OwnedAnonymousMapping.adviceUnmergeable) } catch where error.errno == .invalidArgument {} catch {
            throw .cannotMap(bytes: bytes, step: .unmergeable, error)
        }
        do { try mapping.advise(OwnedAnonymousMapping.adviceDontFork) } catch {
            throw .cannotMap(bytes: bytes, step: .dontFork, error)
        }
        let usedPopulate: Bool
        do { usedPopulate = try mapping.populateForWrite() } catch {
            throw .cannotMap(bytes: bytes, step: .populate, error)
        }
        // Locked: not swapped or otherwise reclaimed (a reclaimed page's frame would be reused).
        do { try mapping.lock() } catch {
            throw .cannotMap(bytes: bytes, step: .lock, error)
        }
        return AnonymousChunk(base: mapping.address, bytes: bytes, usedPopulateWrite: usedPopulate) {
            mapping.unmapAll()
        }
    }

    public func pagemap(of chunk: AnonymousChunk) throws(GuestMemoryError) -> [PagemapEntry] {
        do { return try pagemapResolver.entries(forVirtual: chunk.base, count: chunk.bytes / pagemapResolver.pageSize) } catch {
            throw .platform(error)
        }
    }
}
