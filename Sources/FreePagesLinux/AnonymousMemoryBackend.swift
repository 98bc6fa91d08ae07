#if canImport(Glibc)
import Glibc
#endif
import PlatformLinux

/// The memory operations the anonymous source needs, behind a protocol so its logic can be
/// tested with fake memory and a fake pagemap.
public protocol AnonymousMemoryBackend: AnyObject {
    /// Maps `bytes` (a multiple of 2 MiB) of private anonymous memory, 2 MiB aligned, asks for
    /// THP, populates it for write and locks it, so that every page is present, private and
    /// not reclaimable.
    func mapPopulated(bytes: Int) throws(FreePagesLinuxError) -> AnonymousChunk
    /// The pagemap entries of every 4 KiB page of `chunk`, in order.
    func pagemap(of chunk: AnonymousChunk) throws(FreePagesLinuxError) -> [PagemapEntry]
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

/// The real thing: mmap, `MADV_HUGEPAGE`, `MADV_POPULATE_WRITE` (Linux ≥ 5.14; else one
/// write per 4 KiB page), `mlock`, and `/proc/self/pagemap` through a `PagemapResolver`
/// opened while privileged.
public final class LinuxAnonymousMemory: AnonymousMemoryBackend {
    public let pagemapResolver: PagemapResolver
    /// Once MADV_POPULATE_WRITE failed with EINVAL, pages are touched instead.
    private var populateWriteSupported = true

    // uapi asm-generic/mman-common.h
    private static let madvDontFork: Int32 = 10
    private static let madvUnmergeable: Int32 = 13
    private static let madvHugePage: Int32 = 14
    private static let madvPopulateWrite: Int32 = 23
    private static let hugeBytes = 2 << 20

    public init(pagemap: PagemapResolver) { pagemapResolver = pagemap }

    public func mapPopulated(bytes: Int) throws(FreePagesLinuxError) -> AnonymousChunk {
        precondition(bytes > 0 && bytes % Self.hugeBytes == 0)
        // Over-map by 2 MiB and trim, so the chunk is 2 MiB aligned and THP can back it whole.
        let span = bytes + Self.hugeBytes
        let raw = unsafe mmap(nil, span, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0)
        guard let raw = unsafe raw, unsafe raw != MAP_FAILED else {
            throw .system("mmap of \(bytes >> 20) MiB of anonymous memory failed: \(errnoDescription(Glibc.errno))")
        }
        let rawAddress = UInt(bitPattern: raw)
        let base = (rawAddress + UInt(Self.hugeBytes - 1)) & ~UInt(Self.hugeBytes - 1)
        let head = Int(base - rawAddress)
        if head > 0 { _ = unsafe munmap(raw, head) }
        let tail = span - head - bytes
        if tail > 0 { _ = unsafe munmap(UnsafeMutableRawPointer(bitPattern: base + UInt(bytes)), tail) }
        let pointer = UnsafeMutableRawPointer(bitPattern: base)!
        let unmap: () -> Void = { _ = unsafe munmap(UnsafeMutableRawPointer(bitPattern: base), bytes) }

        // Advice only: failures cost speed (no THP) or nothing, never safety.
        _ = unsafe madvise(pointer, bytes, Self.madvHugePage)
        // Keep KSM (e.g. process-wide PR_SET_MEMORY_MERGE) from merging these zero pages,
        // which would move them.
        _ = unsafe madvise(pointer, bytes, Self.madvUnmergeable)
        // A forked child must not share them (copy-on-write would move the parent's pages).
        _ = unsafe madvise(pointer, bytes, Self.madvDontFork)

        var usedPopulate = false
        if populateWriteSupported {
            if unsafe madvise(pointer, bytes, Self.madvPopulateWrite) == 0 {
                usedPopulate = true
            } else {
                let e = Glibc.errno
                if e == EINVAL {
                    populateWriteSupported = false
                } else {
                    unmap()
                    throw .system("MADV_POPULATE_WRITE of \(bytes >> 20) MiB failed: \(errnoDescription(e))")
                }
            }
        }
        if !usedPopulate {
            var off = 0
            while off < bytes {
                unsafe (pointer + off).storeBytes(of: 0, as: UInt8.self)
                off += 4096
            }
        }
        // Locked: not swapped or otherwise reclaimed (a reclaimed page's frame would be reused).
        // mlock does not pin against migration; see AnonymousSource.
        if unsafe mlock(pointer, bytes) != 0 {
            let e = Glibc.errno
            unmap()
            throw .system("mlock of \(bytes >> 20) MiB failed: \(errnoDescription(e)); run balloond as root (CAP_IPC_LOCK) or raise RLIMIT_MEMLOCK")
        }
        return AnonymousChunk(base: base, bytes: bytes, usedPopulateWrite: usedPopulate, unmap: unmap)
    }

    public func pagemap(of chunk: AnonymousChunk) throws(FreePagesLinuxError) -> [PagemapEntry] {
        do { return try pagemapResolver.entries(forVirtual: chunk.base, count: chunk.bytes / pagemapResolver.pageSize) } catch {
            throw .system("\(error)")
        }
    }
}
