import VirtioCore

/// One piece of memory the balloon holds for the host (inflated, or held while reported).
///
/// A *huge* block is one 2 MiB-aligned, physically contiguous 2 MiB page: its 512 PFNs go
/// to the device in one buffer, so a host whose guest RAM is backed by 2 MiB pages can really
/// discard it (docs/virtio-balloon.md §4), and it can be reported (§8). Other blocks are up to 512
/// 4 KiB frames in any physical order.
public struct BalloonBlock: Hashable, Sendable {
    /// The backend's handle (for `release` and `stillInPlace`).
    public let handle: UInt64
    /// The frames, 4 KiB-aligned, ascending, disjoint.
    public let ranges: [GuestPhysicalRange]

    public init(handle: UInt64, ranges: [GuestPhysicalRange]) {
        self.handle = handle
        self.ranges = ranges
    }

    /// Number of 4 KiB pages.
    public var pageCount: Int { ranges.reduce(0) { $0 + Int($1.length / balloonPageSize) } }
    public var byteCount: UInt64 { ranges.reduce(0) { $0 + $1.length } }

    /// A single 2 MiB-aligned 2 MiB range.
    public var isHuge: Bool {
        ranges.count == 1 && ranges[0].length == balloonHugeBlockSize && ranges[0].start.value % balloonHugeBlockSize == 0
    }

    /// Whether every frame has a PFN the inflate and deflate queues can carry (le32: frames
    /// below 16 TiB). A block above that can never be sent: truncated, its PFN would name
    /// another frame, which the host would then discard.
    public var pfnsFitIn32Bits: Bool {
        ranges.allSatisfy { r in
            let (end, overflow) = r.start.value.addingReportingOverflow(r.length)
            return !overflow && end <= balloonPFNLimitBytes
        }
    }

    /// The PFNs (guest-physical address >> 12), in order, as the inflate and deflate queues
    /// carry them (le32 each), converted with a check: nil when a frame is at or above 16 TiB.
    public var checkedPFNs: [UInt32]? {
        guard pfnsFitIn32Bits else { return nil }
        var out: [UInt32] = []
        out.reserveCapacity(pageCount)
        for r in ranges {
            let first = r.start.value >> 12
            for pfn in first..<(first + r.length / balloonPageSize) {
                guard let p = UInt32(exactly: pfn) else { return nil }
                out.append(p)
            }
        }
        return out
    }

    /// `checkedPFNs`, or none at all for a block that does not fit (never truncated PFNs).
    public var pfns: [UInt32] { checkedPFNs ?? [] }
}

/// The first byte a 32-bit PFN cannot name: 2^32 frames of 4 KiB, 16 TiB.
public let balloonPFNLimitBytes: UInt64 = 1 << 44

/// 2 MiB: the block size QEMU needs to discard hugepage-backed RAM and Linux reports at.
public let balloonHugeBlockSize: UInt64 = 2 << 20
/// 4 KiB pages in a 2 MiB block.
public let balloonPagesPerHugeBlock = 512

/// Why balloon memory could not be taken or kept. The driver only logs it; the platform's
/// typed error inside (on Linux a `LinuxBalloonMemoryError` or a `GuestMemoryError`) keeps
/// what failed and its errno, and renders the message.
public enum BalloonMemoryError: Error, Sendable, CustomStringConvertible {
    /// The backend cannot take or keep memory: the typed error says why (and is what
    /// `description` renders).
    case failed(any Error & CustomStringConvertible & Sendable)

    public var description: String {
        switch self {
        case .failed(let reason): return reason.description
        }
    }
}

/// What `take` got, and, when it got less than asked, why.
public struct BalloonTake: Sendable {
    public var blocks: [BalloonBlock]
    /// Set when fewer pages than asked were taken (the guest cannot spare more now).
    public var limitedBy: String?

    public init(blocks: [BalloonBlock], limitedBy: String? = nil) {
        self.blocks = blocks
        self.limitedBy = limitedBy
    }

    public var pageCount: Int { blocks.reduce(0) { $0 + $1.pageCount } }
}

/// Where the balloon's memory comes from: memory the guest gives up for the host while
/// inflated (or while reported). Implementations must hold frames that cannot move while
/// held — QEMU discards a frame as soon as it sees its PFN, so a frame the kernel migrated
/// away and reused would lose its new owner's data (docs/virtio-balloon.md §4).
public protocol BalloonMemory: AnyObject {
    /// Short name for logs and status ("hugetlb", "locked-anonymous", "simulated").
    var name: String { get }
    /// Bytes currently held.
    var heldBytes: UInt64 { get }
    /// Takes up to `maxPages` 4 KiB pages from the guest. With `hugeOnly`, only huge blocks
    /// (free page reporting needs 2 MiB-aligned ranges). Returns fewer, or none, when the
    /// guest cannot spare more now (`limitedBy` says why); throws only when the backend is
    /// unusable.
    func take(maxPages: Int, hugeOnly: Bool) throws(BalloonMemoryError) -> BalloonTake
    /// Whether every frame of `block` is still where `take` found it (checked right before
    /// its PFNs are sent).
    func stillInPlace(_ block: BalloonBlock) -> Bool
    /// Gives blocks back to the guest.
    func release(_ blocks: [BalloonBlock])
    /// Gives everything back (shutdown).
    func releaseAll()
    /// Before the driver takes memory to inflate: how many more pages it wants now (the rest of
    /// the way to the target). A backend that takes memory in units larger than one `take`
    /// (whole memory blocks) takes a new unit only while the plan covers all of it, so nothing
    /// taken is left over once the target is reached.
    func planInflate(pages: Int)
    /// The group `block` belongs to, nil when it stands alone: blocks of one group go back to
    /// the guest only together (the pieces of one offline memory block), so the driver
    /// deflates all of a group's blocks once it deflates one.
    func releaseGroup(of block: BalloonBlock) -> UInt64?
    /// Groups some of whose blocks the driver holds while the rest were never handed out (an
    /// inflate that ended before it used a whole offline block): they cannot go back to the
    /// guest until the driver deflates the blocks it holds, which it does once the balloon is
    /// at its target (the difference is inflated again with smaller pages).
    func strandedGroups() -> [UInt64]
}

extension BalloonMemory {
    public func planInflate(pages: Int) {}
    public func releaseGroup(of block: BalloonBlock) -> UInt64? { nil }
    public func strandedGroups() -> [UInt64] { [] }
}
