import PlatformLinux

/// Failures reading or changing the guest's memory state (kernel files, sysctls, the hugetlb
/// pool, memory blocks, state files). The hint sources report them to the driver as a
/// `FreePageSourceError`, the balloon backends as a `BalloonMemoryError`.
public enum GuestMemoryError: Error, Hashable, Sendable, CustomStringConvertible {
    /// A kernel file did not have the expected format.
    case malformedFile(path: String, reason: String)
    /// A kernel file or call failed.
    case system(String)
    /// A state file under /run/balloond could not be written or trusted.
    case stateFile(StateFileError)

    public var description: String {
        switch self {
        case .malformedFile(let path, let reason): return "unexpected contents in \(path): \(reason)"
        case .system(let m): return m
        case .stateFile(let e): return e.description
        }
    }
}
