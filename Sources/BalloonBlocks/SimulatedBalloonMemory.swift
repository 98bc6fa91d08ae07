import VirtioCore

/// Balloon memory over simulated guest RAM, for unit tests and `balloond simulate`.
///
/// Hands out 2 MiB huge blocks from the top of its RAM downwards (like a hugetlb backend)
/// while at least 512 pages are asked for and `hugeBlocksAvailable` allows, and single 4 KiB
/// pages from the bottom upwards otherwise (like locked anonymous memory). `availablePages`
/// models how much the guest can spare; every take and release is logged in `events`.
public final class SimulatedBalloonMemory: BalloonMemory {
    public enum Event: Hashable, Sendable {
        case take(pages: Int, hugeBlocks: Int)
        case release([UInt64])
    }

    public let name = "simulated"
    public let base: UInt64
    public let pageCount: Int
    /// Pages the guest can still give up (nil: all of RAM).
    public var availablePages: Int?
    /// Huge blocks the backend can still produce (nil: as many as fit).
    public var hugeBlocksAvailable: Int?
    /// Handles whose frames "moved" (stillInPlace answers false).
    public var moved: Set<UInt64> = []
    public private(set) var events: [Event] = []
    public private(set) var held: [UInt64: BalloonBlock] = [:]
    private var nextHandle: UInt64 = 1
    private var freeHuge: [Int]   // block index (of 2 MiB), top first
    private var freeSmall: [Int]  // page index, bottom first, outside huge blocks in use
    private var usedPages = Set<Int>()

    public init(base: UInt64 = 0, bytes: UInt64) {
        precondition(bytes % balloonHugeBlockSize == 0)
        self.base = base
        pageCount = Int(bytes / balloonPageSize)
        freeHuge = Array((0..<(pageCount / balloonPagesPerHugeBlock)).reversed())
        freeSmall = Array(0..<pageCount)
    }

    public var heldBytes: UInt64 { held.values.reduce(0) { $0 + $1.byteCount } }

    public func take(maxPages: Int, hugeOnly: Bool) throws(BalloonMemoryError) -> BalloonTake {
        var left = maxPages
        var limit: String?
        if let a = availablePages, a < left {
            left = a
            limit = "the guest can spare only \(a) pages"
        }
        var blocks: [BalloonBlock] = []
        var huge = 0
        while left >= balloonPagesPerHugeBlock, hugeBlocksAvailable.map({ $0 > 0 }) ?? true {
            guard let i = freeHuge.firstIndex(where: { b in (b * 512..<(b + 1) * 512).allSatisfy { !usedPages.contains($0) } }) else { break }
            let b = freeHuge.remove(at: i)
            for p in b * 512..<(b + 1) * 512 { usedPages.insert(p) }
            blocks.append(record(ranges: [GuestPhysicalRange(start: base + UInt64(b) * balloonHugeBlockSize, length: balloonHugeBlockSize)]))
            left -= balloonPagesPerHugeBlock
            huge += 1
            if hugeBlocksAvailable != nil { hugeBlocksAvailable! -= 1 }
        }
        if hugeOnly {
            if left >= balloonPagesPerHugeBlock, limit == nil { limit = "no more 2 MiB blocks" }
        } else {
            var pages: [GuestPhysicalRange] = []
            while left > 0, let i = freeSmall.firstIndex(where: { !usedPages.contains($0) }) {
                let p = freeSmall.remove(at: i)
                usedPages.insert(p)
                pages.append(GuestPhysicalRange(start: base + UInt64(p) * balloonPageSize, length: balloonPageSize))
                left -= 1
                if pages.count == balloonPagesPerHugeBlock {
                    blocks.append(record(ranges: pages))
                    pages = []
                }
            }
            if !pages.isEmpty { blocks.append(record(ranges: pages)) }
            if left > 0, limit == nil { limit = "simulated RAM exhausted" }
        }
        if let a = availablePages { availablePages = a - blocks.reduce(0) { $0 + $1.pageCount } }
        events.append(.take(pages: blocks.reduce(0) { $0 + $1.pageCount }, hugeBlocks: huge))
        return BalloonTake(blocks: blocks, limitedBy: limit)
    }

    private func record(ranges: [GuestPhysicalRange]) -> BalloonBlock {
        let block = BalloonBlock(handle: nextHandle, ranges: ranges)
        nextHandle += 1
        held[block.handle] = block
        return block
    }

    public func stillInPlace(_ block: BalloonBlock) -> Bool { held[block.handle] != nil && !moved.contains(block.handle) }

    public func release(_ blocks: [BalloonBlock]) {
        guard !blocks.isEmpty else { return }
        for block in blocks {
            if let g = releaseGroup(of: block) { stranded.remove(g) }
            precondition(held.removeValue(forKey: block.handle) != nil, "released a block that is not held")
            for r in block.ranges {
                let first = Int((r.start.value - base) / balloonPageSize)
                for p in first..<(first + Int(r.length / balloonPageSize)) { usedPages.remove(p) }
                if block.isHuge {
                    freeHuge.append(first / 512)
                } else {
                    freeSmall.append(first)
                }
            }
            if availablePages != nil { availablePages! += block.pageCount }
        }
        freeSmall.sort()
        freeHuge.sort(by: >)
        events.append(.release(blocks.map(\.handle)))
    }

    public func releaseAll() { release(Array(held.values).sorted { $0.handle < $1.handle }) }

    /// Huge blocks in one `groupBytes`-aligned range form one release group, as an offline
    /// memory block's pieces do (nil: no groups).
    public var groupBytes: UInt64?
    /// Groups `strandedGroups` reports until a block of theirs is released.
    public var stranded: Set<UInt64> = []
    /// Every `planInflate` the driver made, in order.
    public private(set) var plans: [Int] = []

    public func planInflate(pages: Int) {
        if plans.last != pages { plans.append(pages) }
    }

    public func releaseGroup(of block: BalloonBlock) -> UInt64? {
        guard let g = groupBytes, block.isHuge, held[block.handle] != nil else { return nil }
        return (block.ranges[0].start.value - base) / g
    }

    public func strandedGroups() -> [UInt64] { stranded.sorted() }
}
