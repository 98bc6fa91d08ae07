import FreePages
import GuestMemoryLinux

extension GuestMemoryError {
    /// The failure as the driver sees it from a hint source.
    var sourceError: FreePageSourceError { .failed(self) }
}

extension HugeTLBRefusal {
    /// The refusal as the driver sees it from the hugetlb source.
    var sourceError: FreePageSourceError { .failed(self) }
}

/// Why a Linux hint source cannot be built as asked. The driver sees it inside a
/// `FreePageSourceError`.
public enum LinuxHintSourceError: Error, Hashable, Sendable, CustomStringConvertible {
    /// The anonymous source was asked for without /proc/self/pagemap.
    case noPagemap
    /// `source` was asked for without the device memory arena its memory comes from.
    case noArena(source: HintSource)
    /// `auto` and `simulated` are not Linux sources.
    case notALinuxSource(HintSource)
    /// The memory block size is not a multiple of 2 MiB (the offline source hints 2 MiB ranges).
    case blockSizeNotHugeMultiple(UInt64)

    public var description: String {
        switch self {
        case .noPagemap: return "the anonymous source needs /proc/self/pagemap opened while privileged"
        case .noArena(let source): return "the \(source.rawValue) source needs the device memory arena"
        case .notALinuxSource(let source):
            return "no Linux free page source '\(source.rawValue)' (auto is resolved by chooseHintSource; simulated is built with SimulatedBuddyAllocator)"
        case .blockSizeNotHugeMultiple(let bytes): return "memory block size \(bytes) is not a multiple of 2 MiB"
        }
    }
}
