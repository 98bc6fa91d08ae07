import VirtioCore

/// How a source knows its pages are free, which decides where it is safe
/// (docs/virtio-balloon.md §9).
public enum FreePageOwnership: String, Sendable, Codable {
    /// balloond holds the pages (hugetlb pool pages, or anonymous memory it populated): nobody
    /// else can write them until balloond releases them, so a hint is safe on any host.
    case owned
    /// The pages were only observed free (a kpageflags scan): another task may allocate and
    /// write them at any time. Safe only where every such write is dirty-logged after the
    /// hint is applied (TCG), never on KVM with manual dirty-log protect.
    case observed
}

/// Why a source cannot supply pages. The driver only logs it; the platform's typed error
/// inside (on Linux a `GuestMemoryError`, a `HugeTLBRefusal` or a `LinuxHintSourceError`)
/// keeps what failed and its errno, and renders the message.
public enum FreePageSourceError: Error, Sendable, CustomStringConvertible {
    /// `nextBatch` was called outside a round.
    case outsideRound
    /// The source refused, or a kernel file or call it needs failed: the typed error says which
    /// (and is what `description` renders).
    case failed(any Error & CustomStringConvertible & Sendable)
    /// A source with a fallback (`RoundFallbackSource`): the primary refused and the fallback
    /// failed too.
    indirect case fallbackFailed(primary: String, refusal: FreePageSourceError, fallback: String, failure: FreePageSourceError)

    public var description: String {
        switch self {
        case .outsideRound: return "nextBatch outside a round"
        case .failed(let reason): return reason.description
        case .fallbackFailed(let primary, let refusal, let fallback, let failure):
            return "\(primary) refused (\(refusal)) and \(fallback) failed too: \(failure)"
        }
    }
}

/// Supplies free guest-physical memory to hint, one free page hint round at a time.
///
/// The driver calls, for each round: `beginRound` once the new cmd id has arrived (never
/// earlier: pages read before the round's bitmap sync may have been written since), then
/// `nextBatch` repeatedly while the round lasts, `hintsApplied` whenever the device has used
/// descriptors (QEMU applied those hints under its lock), `endRound` on STOP or a new id, and
/// `releaseAll` on DONE, reset and shutdown.
///
/// Ranges are 4 KiB-aligned in start and length, disjoint, and each lies in RAM.
public protocol FreePageSource: AnyObject {
    /// The `--hint-source` name.
    var name: String { get }
    var ownership: FreePageOwnership { get }
    /// Bytes currently held (owned sources), for status and memory-pressure policy.
    var heldBytes: UInt64 { get }
    /// Starts a round: free memory is read from now on.
    func beginRound(id: UInt32) throws(FreePageSourceError)
    /// Up to `maxRanges` ranges, each at most `maxRangeBytes` long; empty when the source has
    /// nothing more this round. Owned sources hold the pages until they are released.
    func nextBatch(maxRanges: Int, maxRangeBytes: UInt64) throws(FreePageSourceError) -> [GuestPhysicalRange]
    /// The device has used the descriptors for these ranges: their hints are applied, and
    /// owned memory behind them may be given back.
    func hintsApplied(_ ranges: [GuestPhysicalRange])
    /// The round is over (STOP, or a new id): no new hints will be posted for it. Hints
    /// already posted may still be applied until their descriptors come back through
    /// `hintsApplied` (or `releaseAll` after a device reset), so owned memory behind them
    /// must stay held until then.
    func endRound()
    /// DONE, device reset or shutdown: give back everything.
    func releaseAll()
    /// The guest is short of memory: give back held memory that no pending hint refers to,
    /// about `bytes` of it (as Linux's balloon shrinker gives back hinted pages before DONE).
    /// Returns the bytes given back. Sources that hold memory only during a round need not.
    func releaseUnderPressure(bytes: UInt64) -> UInt64
    /// Free page hinting is over for now (DONE): no descriptor can be applied any more. Gives
    /// back what the source does not keep as its reserve (`releaseAll` for a source without one).
    func hintingDone()
    /// Outside a round: takes owned memory ahead of the next round (the reserve), within the
    /// source's own limits and a bounded amount of work per call. Sources without a reserve
    /// return `.notWanted`.
    func replenishReserve() -> ReserveProgress
    /// How much the reserve holds when full (0: no reserve; the driver then never calls
    /// `replenishReserve`).
    var reserveTargetBytes: UInt64 { get }
    /// The longest range this source wants per descriptor when that is more than the driver's
    /// default (a source whose memory is taken and given back in larger units); nil: the
    /// driver's default.
    var preferredMaxRangeBytes: UInt64? { get }
}

/// What one `replenishReserve` call achieved: whether, and how soon, the driver should call again.
public enum ReserveProgress: Equatable, Sendable {
    /// The source keeps no reserve.
    case notWanted
    /// The reserve is at its target.
    case full
    /// It took memory and is still below its target (call again soon).
    case grew
    /// It could take nothing now (no wholly free memory, limits): try again much later.
    case stuck
}

extension FreePageSource {
    public func releaseUnderPressure(bytes: UInt64) -> UInt64 { 0 }
    public func hintingDone() { releaseAll() }
    public func replenishReserve() -> ReserveProgress { .notWanted }
    public var reserveTargetBytes: UInt64 { 0 }
    public var preferredMaxRangeBytes: UInt64? { nil }
}
