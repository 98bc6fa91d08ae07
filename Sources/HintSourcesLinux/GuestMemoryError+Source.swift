import FreePages
import GuestMemoryLinux

extension GuestMemoryError {
    /// The failure as the driver sees it from a hint source.
    var sourceError: FreePageSourceError { FreePageSourceError(description) }
}
