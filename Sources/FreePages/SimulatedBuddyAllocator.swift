import VirtioCore

/// A deterministic, seedable buddy allocator over simulated guest RAM, used as a free page
/// source in unit tests and by `balloond simulate`.
///
/// It behaves like the in-kernel driver's source: each hint is a free block the allocator
/// *allocates* (so it is owned: nobody else can be handed it) and keeps until it is released.
/// Blocks of order 0 (4 KiB) to `maxOrder` (default 10, 4 MiB) are managed as Linux's buddy
/// allocator does: split on allocation, merged with their buddy on free.
public final class SimulatedBuddyAllocator: FreePageSource {
    public let name = "simulated"
    public let ownership = FreePageOwnership.owned
    public let base: UInt64
    public let pageCount: Int
    public let maxOrder: Int
    /// Free blocks by order: page index of each block's first page.
    private var freeLists: [Set<Int>]
    /// Blocks allocated by "the guest" (tests' workload), page index → order.
    private var guestBlocks: [Int: Int] = [:]
    /// Blocks held for hints, page index → order.
    private var heldBlocks: [Int: Int] = [:]
    private var rng: SplitMix64
    /// Rounds begun, and the id of the current one.
    public private(set) var rounds: [UInt32] = []
    public private(set) var roundOpen = false
    /// Ranges released, in order (tests check release order and timing).
    public private(set) var released: [GuestPhysicalRange] = []
    /// When set, nextBatch hands out at most this many bytes per round (a guest with little free memory).
    public var limitPerRound: UInt64?
    private var handedOutThisRound: UInt64 = 0

    /// - Parameters:
    ///   - base: guest-physical address of the first page.
    ///   - bytes: size of the simulated RAM (a multiple of the largest block).
    ///   - usedFraction: share of RAM the simulated guest allocates at start, in random blocks.
    ///   - seed: makes the layout reproducible.
    public init(base: UInt64 = 0, bytes: UInt64, usedFraction: Double = 0.3, seed: UInt64 = 1, maxOrder: Int = 10) {
        precondition(bytes % (balloonPageSize << UInt64(maxOrder)) == 0, "RAM must be a multiple of the largest block")
        self.base = base
        self.pageCount = Int(bytes / balloonPageSize)
        self.maxOrder = maxOrder
        self.rng = SplitMix64(seed: seed)
        freeLists = Array(repeating: [], count: maxOrder + 1)
        for block in stride(from: 0, to: pageCount, by: 1 << maxOrder) { freeLists[maxOrder].insert(block) }
        let target = Int(Double(pageCount) * usedFraction)
        var used = 0
        while used < target {
            let order = Int(rng.next() % UInt64(maxOrder + 1))
            guard let block = allocate(order: order) else { break }
            guestBlocks[block] = order
            used += 1 << order
        }
    }

    // MARK: the buddy allocator

    /// Free pages now.
    public var freePages: Int { freeLists.enumerated().reduce(0) { $0 + $1.element.count << $1.offset } }
    public var heldBytes: UInt64 { UInt64(heldBlocks.values.reduce(0) { $0 + (1 << $1) }) * balloonPageSize }

    /// Allocates one block of `order` (splitting larger ones), lowest address first.
    public func allocate(order: Int) -> Int? {
        var o = order
        while o <= maxOrder && freeLists[o].isEmpty { o += 1 }
        guard o <= maxOrder, let block = freeLists[o].min() else { return nil }
        freeLists[o].remove(block)
        while o > order {
            o -= 1
            freeLists[o].insert(block + (1 << o))
        }
        return block
    }

    /// Frees a block, merging with free buddies.
    public func free(block: Int, order: Int) {
        var b = block
        var o = order
        while o < maxOrder {
            let buddy = b ^ (1 << o)
            guard freeLists[o].contains(buddy) else { break }
            freeLists[o].remove(buddy)
            b = min(b, buddy)
            o += 1
        }
        freeLists[o].insert(b)
    }

    /// Simulates guest activity: allocates `count` random blocks for the guest, or frees
    /// random guest blocks when `count` is negative.
    public func churn(count: Int) {
        if count >= 0 {
            for _ in 0..<count {
                let order = Int(rng.next() % UInt64(maxOrder + 1))
                if let b = allocate(order: order) { guestBlocks[b] = order }
            }
        } else {
            for _ in 0..<(-count) {
                guard !guestBlocks.isEmpty else { return }
                let keys = guestBlocks.keys.sorted()
                let k = keys[Int(rng.next() % UInt64(keys.count))]
                free(block: k, order: guestBlocks.removeValue(forKey: k)!)
            }
        }
    }

    /// Whether a guest-physical range overlaps a block the guest itself holds.
    public func overlapsGuestMemory(_ r: GuestPhysicalRange) -> Bool {
        let first = Int((r.start.value - base) / balloonPageSize)
        let last = Int((r.end - base - 1) / balloonPageSize)
        return guestBlocks.contains { $0.key <= last && $0.key + (1 << $0.value) - 1 >= first }
    }

    private func range(_ block: Int, _ order: Int) -> GuestPhysicalRange {
        GuestPhysicalRange(start: base + UInt64(block) * balloonPageSize, length: balloonPageSize << UInt64(order))
    }

    // MARK: FreePageSource

    public func beginRound(id: UInt32) throws(FreePageSourceError) {
        rounds.append(id)
        roundOpen = true
        handedOutThisRound = 0
    }

    /// Allocates free blocks, largest first (as Linux allocates order-10 blocks), and hands
    /// them out coalesced.
    public func nextBatch(maxRanges: Int, maxRangeBytes: UInt64) throws(FreePageSourceError) -> [GuestPhysicalRange] {
        guard roundOpen else { throw .outsideRound }
        var out: [GuestPhysicalRange] = []
        let maxOrderForRange = min(maxOrder, Int((maxRangeBytes / balloonPageSize).trailingZeroBitCount))
        for order in stride(from: maxOrderForRange, through: 0, by: -1) {
            while out.count < maxRanges, freeLists[order...].contains(where: { !$0.isEmpty }) {
                if let limit = limitPerRound, handedOutThisRound + (balloonPageSize << UInt64(order)) > limit { return out }
                guard let b = allocate(order: order) else { break }
                heldBlocks[b] = order
                handedOutThisRound += balloonPageSize << UInt64(order)
                out.append(range(b, order))
            }
            if out.count >= maxRanges { break }
        }
        return out
    }

    public func hintsApplied(_ ranges: [GuestPhysicalRange]) {}

    public func endRound() { roundOpen = false }

    /// Frees every held block, in ascending address order.
    public func releaseAll() {
        roundOpen = false
        for (b, o) in heldBlocks.sorted(by: { $0.key < $1.key }) {
            released.append(range(b, o))
            free(block: b, order: o)
        }
        heldBlocks.removeAll()
    }
}

/// SplitMix64: a tiny, well-mixed, seedable PRNG (deterministic across platforms).
public struct SplitMix64: RandomNumberGenerator, Sendable {
    private var state: UInt64
    public init(seed: UInt64) { state = seed }
    public mutating func next() -> UInt64 {
        state &+= 0x9E37_79B9_7F4A_7C15
        var z = state
        z = (z ^ (z >> 30)) &* 0xBF58_476D_1CE4_E5B9
        z = (z ^ (z >> 27)) &* 0x94D0_49BB_1331_11EB
        return z ^ (z >> 31)
    }
}
