import BalloonBlocks
import FreePages

extension FreePageSourceError {
    /// The platform's typed error inside `.failed`, when it is an `E` (tests assert on its case).
    func reason<E: Error>(as type: E.Type) -> E? {
        guard case .failed(let e) = self else { return nil }
        return e as? E
    }
}

extension BalloonMemoryError {
    /// The platform's typed error inside `.failed`, when it is an `E` (tests assert on its case).
    func reason<E: Error>(as type: E.Type) -> E? {
        guard case .failed(let e) = self else { return nil }
        return e as? E
    }
}

/// The typed error a hint source or balloon backend threw, unwrapped from the driver-level error.
func reason<E: Error>(_ error: any Error, as type: E.Type) -> E? {
    (error as? FreePageSourceError)?.reason(as: type) ?? (error as? BalloonMemoryError)?.reason(as: type)
}

/// A scripted source's refusal (any typed error a platform source could throw).
struct ScriptedRefusal: Error, Hashable, Sendable, CustomStringConvertible {
    let description: String
    init(_ description: String) { self.description = description }
}
