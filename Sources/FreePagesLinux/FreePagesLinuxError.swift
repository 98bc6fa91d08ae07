import FreePages
import PlatformLinux

/// Failures inside the Linux free-page sources, before they are reported to the driver as a
/// `FreePageSourceError` (whose description is this one's).
public enum FreePagesLinuxError: Error, Hashable, Sendable, CustomStringConvertible {
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

    var sourceError: FreePageSourceError { FreePageSourceError(description) }
}
