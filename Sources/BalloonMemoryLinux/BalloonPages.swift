import GuestMemoryLinux
import BalloonBlocks
import PlatformLinux

/// Balloon memory as a page provider mapped it: `slotCount` slots of up to 2 MiB at
/// `base + i × 2 MiB` (one balloon block each), each given back on its own. Slots still held
/// are given back in deinit.
public final class BalloonMapping {
    public static let slotBytes = 2 << 20
    public let base: UInt
    public let bytes: Int
    private let unmapSlot: (Int) -> Void
    private var live: Set<Int>

    /// - Parameter unmapSlot: gives slot `i` back (called at most once per slot).
    public init(base: UInt, bytes: Int, unmapSlot: @escaping (Int) -> Void) {
        precondition(bytes > 0 && bytes % 4096 == 0)
        self.base = base
        self.bytes = bytes
        self.unmapSlot = unmapSlot
        live = Set(0..<((bytes + Self.slotBytes - 1) / Self.slotBytes))
    }

    deinit {
        for i in live.sorted() { unmapSlot(i) }
    }

    public var slotCount: Int { (bytes + Self.slotBytes - 1) / Self.slotBytes }
    public var isEmpty: Bool { live.isEmpty }
    public func slotAddress(_ i: Int) -> UInt { base + UInt(i * Self.slotBytes) }
    public func slotPages(_ i: Int) -> Int { min(Self.slotBytes, bytes - i * Self.slotBytes) / 4096 }

    /// Gives slot `i` back (once).
    public func release(slot i: Int) {
        guard live.remove(i) != nil else { return }
        unmapSlot(i)
    }
}

/// Why a page provider could not map balloon memory: which step of mapping `count` pages of
/// `pages` failed, and the call's failure with its errno.
public struct BalloonMapFailure: Error, Hashable, Sendable, CustomStringConvertible {
    public enum Kind: Hashable, Sendable {
        /// The guest has no memory of that kind to spare now (ENOMEM, EAGAIN): take less.
        case noMemory
        /// Anything else (EPERM, EINVAL…): the backend cannot work here.
        case unusable
    }
    /// Hugetlb pages (2 MiB each) or locked anonymous 4 KiB pages.
    public var pages: BalloonPageKind
    public var count: Int
    public var step: MappingStep
    public var error: SystemCallError

    public init(_ pages: BalloonPageKind, count: Int, step: MappingStep, _ error: SystemCallError) {
        self.pages = pages
        self.count = count
        self.step = step
        self.error = error
    }

    /// `.noMemory` when mapping, populating or locking found no memory (ENOMEM; EAGAIN
    /// while populating or locking).
    public var kind: Kind {
        switch step {
        case .mmap: return error.errno == .noMemory ? .noMemory : .unusable
        case .populate, .lock:
            return error.errno == .noMemory || error.errno == .resourceTemporarilyUnavailable ? .noMemory : .unusable
        case .noHugePage, .unmergeable, .dontFork: return .unusable
        }
    }

    public var description: String {
        let what = pages == .hugeTLB ? "\(count) private 2 MiB hugetlb page(s)" : "\(count) locked anonymous 4 KiB page(s)"
        let failed = "\(step.describe(what)) failed"
        switch (pages, step, error.errno) {
        case (.hugeTLB, .mmap, .noMemory):
            return "\(failed) with ENOMEM: the kernel could not reserve them (no free 2 MiB block for a surplus page, nr_overcommit_hugepages reached, or a hugetlb cgroup limit)"
        case (.hugeTLB, .mmap, .invalidArgument):
            return "\(failed) with EINVAL: this kernel has no 2 MiB hugetlb pages (CONFIG_HUGETLBFS, hugepagesz=2M)"
        case (.lockedAnonymous, .mmap, .noMemory): return "\(failed) with ENOMEM (vm.overcommit_memory refuses it)"
        case (.lockedAnonymous, .lock, _):
            return kind == .noMemory ? "\(failed): \(error) (RLIMIT_MEMLOCK reached, or not enough memory)"
                : "\(failed): \(error); run balloond as root (CAP_IPC_LOCK)"
        default: return "\(failed): \(error)"
        }
    }
}

/// PFNs of mapped balloon memory.
public protocol BalloonPagemap: AnyObject {
    /// The pagemap entries of `pages` consecutive 4 KiB pages from `address`.
    func pagemap(at address: UInt, pages: Int) throws(GuestMemoryError) -> [PagemapEntry]
}

/// The kernel side of `HugeTLBBalloonMemory`, behind a protocol so its rules can be tested
/// against a fake kernel without root.
public protocol HugeTLBBalloonPages: BalloonPagemap {
    /// Maps `count` private 2 MiB hugetlb pages and faults them in. The kernel reserves them
    /// at mmap time (surplus pages within `nr_overcommit_hugepages` when the pool has no
    /// free ones), so when it cannot get them the mmap fails with ENOMEM (`.noMemory`)
    /// instead of a later fault raising SIGBUS.
    func mapHugePages(count: Int) throws(BalloonMapFailure) -> BalloonMapping
}

/// The kernel side of `LockedAnonymousBalloonMemory`.
public protocol LockedAnonymousPages: BalloonPagemap {
    /// Maps `pages` 4 KiB pages of private anonymous memory with `MADV_NOHUGEPAGE`,
    /// `MADV_UNMERGEABLE` and `MADV_DONTFORK`, populates them for write and `mlock`s them.
    func mapLocked(pages: Int) throws(BalloonMapFailure) -> BalloonMapping
}

/// The real page provider for both balloon backends: `OwnedAnonymousMapping` (shared memfd
/// memory from the `DeviceMemoryArena`) for the memory,
/// and `/proc/self/pagemap` through a `PagemapResolver` opened while privileged.
public final class LinuxBalloonPages: HugeTLBBalloonPages, LockedAnonymousPages {
    public let pagemapResolver: PagemapResolver
    /// Where the pages come from: the memfds the guardian also holds.
    public let arena: DeviceMemoryArena

    public init(pagemap: PagemapResolver, arena: DeviceMemoryArena) {
        pagemapResolver = pagemap
        self.arena = arena
    }

    public func pagemap(at address: UInt, pages: Int) throws(GuestMemoryError) -> [PagemapEntry] {
        do { return try pagemapResolver.entries(forVirtual: address, count: pages) } catch { throw .platform(error) }
    }

    public func mapHugePages(count: Int) throws(BalloonMapFailure) -> BalloonMapping {
        let mapping: OwnedAnonymousMapping
        do { mapping = try OwnedAnonymousMapping(length: count * OwnedAnonymousMapping.slotBytes, kind: .hugeTLB2MiB, arena: arena) } catch {
            throw BalloonMapFailure(.hugeTLB, count: count, step: .mmap, error)
        }
        // A forked child sharing these pages would make the next write copy them: new frames
        // behind the balloon's back.
        do { try mapping.advise(OwnedAnonymousMapping.adviceDontFork) } catch {
            throw BalloonMapFailure(.hugeTLB, count: count, step: .dontFork, error)
        }
        return BalloonMapping(base: mapping.address, bytes: mapping.length) { mapping.unmapSlot($0) }
    }

    public func mapLocked(pages: Int) throws(BalloonMapFailure) -> BalloonMapping {
        func failure(_ step: MappingStep, _ error: SystemCallError) -> BalloonMapFailure {
            BalloonMapFailure(.lockedAnonymous, count: pages, step: step, error)
        }
        let mapping: OwnedAnonymousMapping
        do { mapping = try OwnedAnonymousMapping(length: pages * 4096, kind: .small, arena: arena) } catch {
            throw failure(.mmap, error)
        }
        // No THP (shmem huge pages with shmem_enabled): a collapse would the pages into a new huge page (new frames). EINVAL
        // means a kernel without THP, where nothing collapses.
        do { try mapping.advise(OwnedAnonymousMapping.adviceNoHugePage) } catch where error.errno == .invalidArgument {} catch {
            throw failure(.noHugePage, error)
        }
        // No KSM merging (it would move them to a shared frame); EINVAL: no KSM in this kernel.
        do { try mapping.advise(OwnedAnonymousMapping.adviceUnmergeable) } catch where error.errno == .invalidArgument {} catch {
            throw failure(.unmergeable, error)
        }
        do { try mapping.advise(OwnedAnonymousMapping.adviceDontFork) } catch {
            throw failure(.dontFork, error)
        }
        do { try mapping.populateForWrite() } catch { throw failure(.populate, error) }
        do { try mapping.lock() } catch { throw failure(.lock, error) }
        return BalloonMapping(base: mapping.address, bytes: mapping.length) { mapping.unmapSlot($0) }
    }
}
