/// Why the hugetlb source will not (or can no longer) hint this round. Each says what was
/// seen and what happens instead; the caller (`RoundFallbackSource`) logs it and uses the
/// anonymous source for the round.
public enum HugeTLBRefusal: Error, Hashable, Sendable, CustomStringConvertible {
    /// This kernel has no 2 MiB hugetlb pool (CONFIG_HUGETLBFS).
    case noPool
    /// /proc/kpageflags or /proc/kpagecount cannot be read.
    case unavailable(GuestMemoryError)
    /// Another mapping holds reservations: it may fault any free pool page, including one
    /// balloond hinted.
    case reservedByOthers(reserved: UInt64)
    /// Surplus pages exist: someone uses overcommitted hugepages.
    case surplusPages(UInt64)
    /// `nr_overcommit_hugepages` > 0: others can get a reservation (and then any free pool
    /// page) without balloond's consent at any time.
    case overcommitEnabled(UInt64)
    /// Pool pages in use by others (mapped, or held by a hugetlbfs file): an unmapped
    /// in-use page looks exactly like a free one in /proc/kpagecount.
    case foreignPagesInUse(UInt64)
    /// Another running balloond is using the pool.
    case otherInstance(pid: Int32)
    /// The pool changed under balloond during a step (someone else grew, shrank or used it).
    case poolChanged(String)
    /// Reserving the free pool pages failed (someone else took some of them).
    case cannotReserve(pages: Int, GuestMemoryError)
    /// The PFN scan does not agree with the counters.
    case scanMismatch(String)
    /// A kernel file or call failed.
    case system(GuestMemoryError)

    public var description: String {
        let fallback = "; using anonymous memory for this round"
        switch self {
        case .noPool:
            return "the hugetlb pool cannot be used: this kernel has no 2 MiB hugetlb pool (CONFIG_HUGETLBFS)\(fallback)"
        case .unavailable(let why):
            return "the hugetlb pool cannot be used: \(why)\(fallback)"
        case .reservedByOthers(let n):
            return "another process has \(n) hugetlb page(s) reserved (HugePages_Rsvd = \(n)): it could fault any free pool page, including one balloond hints, so balloond cannot own the free pool\(fallback). Stop that user of hugetlb pages to allow the faster hugetlb source"
        case .surplusPages(let n):
            return "the hugetlb pool has \(n) surplus page(s) (HugePages_Surp): someone uses overcommitted hugepages\(fallback)"
        case .overcommitEnabled(let n):
            return "nr_overcommit_hugepages is \(n): any process can obtain hugetlb reservations (and then any free pool page) during the round\(fallback). Set /proc/sys/vm/nr_overcommit_hugepages to 0 to allow the hugetlb source"
        case .foreignPagesInUse(let n):
            return "\(n) hugetlb pool page(s) are in use by other processes or hugetlbfs files: an unmapped in-use page is indistinguishable from a free one in /proc/kpagecount\(fallback)"
        case .otherInstance(let pid):
            return "another balloond (pid \(pid)) is using the hugetlb pool\(fallback)"
        case .poolChanged(let what):
            return Self.poolChangedMessage(what) + fallback
        case .cannotReserve(let pages, let e):
            return Self.poolChangedMessage("reserving \(pages) free pool pages failed: \(e)") + fallback
        case .scanMismatch(let what):
            return "the PFN scan of the hugetlb pool disagrees with its counters (\(what)); balloond stops taking pool pages\(fallback)"
        case .system(let e):
            return "hugetlb source: \(e)\(fallback)"
        }
    }

    private static func poolChangedMessage(_ what: String) -> String {
        "the hugetlb pool changed during a step (\(what)): someone else is changing nr_hugepages or using the pool; balloond stops taking pool pages (those already hinted stay reserved until released)"
    }
}
