import GuestMemoryLinux
import BalloonBlocks
import Logging
import VirtioCore

/// Huge blocks first, small ones for the rest (`hugetlb+anonymous`): for `take(maxPages:)`
/// it asks the huge backend (`HugeTLBBalloonMemory`) for the whole 2 MiB pages in
/// `maxPages`, then the small one (`LockedAnonymousBalloonMemory`) for the remainder, and
/// for everything the huge backend could not give. With `hugeOnly` it asks only the huge one.
///
/// Each block's handle says which backend owns it (bit 63 set: the small one), so `release`
/// and `stillInPlace` go to that backend with its own handle. Safety: it adds nothing of its
/// own; each backend keeps its own rules for its own blocks, and the two hold disjoint frames
/// (both own what they hold).
///
/// If the huge backend throws (it cannot work here: no root, no hugetlb, a broken pagemap),
/// the reason is logged once and only the small one is used from then on.
public final class TieredBalloonMemory: BalloonMemory {
    public let name = "hugetlb+anonymous"
    public let huge: BalloonMemory
    public let small: BalloonMemory
    private let logger: Logger
    /// Why the huge backend is no longer used, once it threw.
    public private(set) var hugeDisabledBecause: BalloonMemoryError?
    /// Why the huge backend gave fewer pages than asked in the last `take` (for status).
    public private(set) var lastHugeShortfall: String?

    static let smallTag: UInt64 = 1 << 63

    public init(huge: BalloonMemory, small: BalloonMemory, logger: Logger = Logger(label: "balloond.balloon")) {
        self.huge = huge
        self.small = small
        self.logger = logger
    }

    public var heldBytes: UInt64 { huge.heldBytes + small.heldBytes }

    public func take(maxPages: Int, hugeOnly: Bool) throws(BalloonMemoryError) -> BalloonTake {
        guard maxPages > 0 else { return BalloonTake(blocks: []) }
        var blocks: [BalloonBlock] = []
        var hugeLimitedBy: String?
        lastHugeShortfall = nil
        let hugeAsk = hugeOnly ? maxPages : maxPages / balloonPagesPerHugeBlock * balloonPagesPerHugeBlock
        if hugeAsk >= balloonPagesPerHugeBlock {
            if let why = hugeDisabledBecause {
                hugeLimitedBy = "hugetlb is not used: \(why)"
            } else {
                do {
                    let t = try huge.take(maxPages: hugeAsk, hugeOnly: true)
                    blocks += t.blocks.map(Self.tagHuge)
                    hugeLimitedBy = t.limitedBy
                } catch {
                    hugeDisabledBecause = error
                    hugeLimitedBy = "hugetlb is not used: \(error)"
                    logger.error("hugetlb balloon memory cannot be used, using locked anonymous memory only from now on: \(error)")
                }
            }
        } else if hugeOnly {
            hugeLimitedBy = "only whole 2 MiB blocks can be huge; \(maxPages) page(s) asked are less than one"
        }
        let hugeTaken = blocks.reduce(0) { $0 + $1.pageCount }
        if hugeTaken < hugeAsk / balloonPagesPerHugeBlock * balloonPagesPerHugeBlock { lastHugeShortfall = hugeLimitedBy }
        if hugeOnly {
            return BalloonTake(blocks: blocks, limitedBy: hugeTaken < maxPages ? hugeLimitedBy : nil)
        }
        let rest = maxPages - hugeTaken
        guard rest > 0 else { return BalloonTake(blocks: blocks) }
        let t: BalloonTake
        do { t = try small.take(maxPages: rest, hugeOnly: false) } catch {
            if blocks.isEmpty { throw error }
            logger.error("locked anonymous balloon memory failed after hugetlb gave \(hugeTaken) pages: \(error)")
            return BalloonTake(blocks: blocks, limitedBy: "anonymous: \(error)")
        }
        blocks += t.blocks.map(Self.tagSmall)
        var limitedBy: String?
        if let why = t.limitedBy, t.pageCount < rest {
            limitedBy = lastHugeShortfall.map { "hugetlb: \($0); anonymous: \(why)" } ?? why
        }
        return BalloonTake(blocks: blocks, limitedBy: limitedBy)
    }

    public func stillInPlace(_ block: BalloonBlock) -> Bool {
        let (owner, inner) = route(block)
        return owner.stillInPlace(inner)
    }

    public func release(_ blocks: [BalloonBlock]) {
        var hugeBlocks: [BalloonBlock] = []
        var smallBlocks: [BalloonBlock] = []
        for b in blocks {
            let inner = BalloonBlock(handle: b.handle & ~Self.smallTag, ranges: b.ranges)
            if b.handle & Self.smallTag != 0 { smallBlocks.append(inner) } else { hugeBlocks.append(inner) }
        }
        if !hugeBlocks.isEmpty { huge.release(hugeBlocks) }
        if !smallBlocks.isEmpty { small.release(smallBlocks) }
    }

    public func releaseAll() {
        huge.releaseAll()
        small.releaseAll()
    }

    // MARK: handles

    private func route(_ b: BalloonBlock) -> (BalloonMemory, BalloonBlock) {
        let inner = BalloonBlock(handle: b.handle & ~Self.smallTag, ranges: b.ranges)
        return b.handle & Self.smallTag != 0 ? (small, inner) : (huge, inner)
    }

    private static func tagHuge(_ b: BalloonBlock) -> BalloonBlock {
        precondition(b.handle & smallTag == 0, "backend handles must leave bit 63 clear")
        return b
    }

    private static func tagSmall(_ b: BalloonBlock) -> BalloonBlock {
        precondition(b.handle & smallTag == 0, "backend handles must leave bit 63 clear")
        return BalloonBlock(handle: b.handle | smallTag, ranges: b.ranges)
    }
}
