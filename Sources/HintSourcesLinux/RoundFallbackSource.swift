import GuestMemoryLinux
import FreePages
import Logging
import VirtioCore

/// A source that falls back to another for the rest of a round when the first refuses
/// (`--hint-source hugetlb`: hugetlb, else anonymous for that round). The driver sees one
/// source; the refusal is logged with its reason each time.
///
/// Safety: it adds nothing of its own. Each inner source keeps its own pages until its own
/// descriptors come back; `hintsApplied`, `endRound` and `releaseAll` go to both, and each
/// ignores ranges it did not hand out. While both hold memory, their pages are disjoint
/// (both own what they hold), so a range can only be one source's.
public final class RoundFallbackSource: FreePageSource {
    public let primary: FreePageSource
    public let fallback: FreePageSource
    private let logger: Logger
    private var roundID: UInt32?
    /// The source serving the current round.
    public private(set) var active: FreePageSource?
    /// The primary's refusal this round, if it refused.
    public private(set) var lastFallbackReason: FreePageSourceError?

    public init(primary: FreePageSource, fallback: FreePageSource, logger: Logger = Logger(label: "balloond.hint")) {
        self.primary = primary
        self.fallback = fallback
        self.logger = logger
    }

    public var name: String { primary.name }
    /// The weaker of the two.
    public var ownership: FreePageOwnership {
        primary.ownership == .observed || fallback.ownership == .observed ? .observed : .owned
    }
    public var heldBytes: UInt64 { primary.heldBytes + fallback.heldBytes }
    /// The name of the source serving this round (for status).
    public var activeName: String { active?.name ?? primary.name }

    public func beginRound(id: UInt32) throws(FreePageSourceError) {
        roundID = id
        lastFallbackReason = nil
        do {
            try primary.beginRound(id: id)
            active = primary
        } catch {
            try switchToFallback(id: id, because: error)
        }
    }

    public func nextBatch(maxRanges: Int, maxRangeBytes: UInt64) throws(FreePageSourceError) -> [GuestPhysicalRange] {
        guard let source = active, let id = roundID else { return [] }
        do {
            return try source.nextBatch(maxRanges: maxRanges, maxRangeBytes: maxRangeBytes)
        } catch {
            guard source === primary else { throw error }
            // The primary's pages handed out so far stay held by it until their descriptors
            // come back; the rest of the round comes from the fallback.
            primary.endRound()
            try switchToFallback(id: id, because: error)
            return try fallback.nextBatch(maxRanges: maxRanges, maxRangeBytes: maxRangeBytes)
        }
    }

    private func switchToFallback(id: UInt32, because refusal: FreePageSourceError) throws(FreePageSourceError) {
        lastFallbackReason = refusal
        logger.warning("\(primary.name) free page source unavailable for round 0x\(String(id, radix: 16)); using \(fallback.name): \(refusal)")
        active = nil
        do { try fallback.beginRound(id: id) } catch {
            throw .fallbackFailed(primary: primary.name, refusal: refusal, fallback: fallback.name, failure: error)
        }
        active = fallback
    }

    public func hintsApplied(_ ranges: [GuestPhysicalRange]) {
        primary.hintsApplied(ranges)
        fallback.hintsApplied(ranges)
    }

    public func endRound() {
        active = nil
        primary.endRound()
        fallback.endRound()
    }

    public func releaseAll() {
        active = nil
        primary.releaseAll()
        fallback.releaseAll()
    }
}
