/// A doubling wait: `first` after the first failure, twice the last wait after each further
/// one, never more than `cap`, and `first` again once `reset` says things went well. The
/// daemon's device re-initialisation, the driver's inflate retries, reporting passes,
/// pressure checks and hint reserve passes, and the offline balloon memory's block and
/// search retries all back off with it.
public struct Backoff: Equatable, Sendable {
    /// The wait after the first failure (and after each `reset`).
    public let first: Duration
    /// The longest wait; never below `first` (a smaller cap given to `init` means `first`).
    public let cap: Duration
    /// The wait `next()` last returned (or `restart(from:)` set); nil before the first
    /// failure and after `reset()`.
    public private(set) var current: Duration?

    public init(first: Duration, cap: Duration) {
        self.first = first
        self.cap = max(first, cap)
    }

    /// The wait the next `next()` returns: `first` when nothing failed since the last
    /// reset, else twice `current`, at most `cap`.
    public var upcoming: Duration { current.map { min($0 * 2, cap) } ?? first }

    /// Another failure: returns the wait to use now (`upcoming`), which becomes `current`.
    public mutating func next() -> Duration {
        let wait = upcoming
        current = wait
        return wait
    }

    /// Things went well: the next failure waits `first` again.
    public mutating func reset() { current = nil }

    /// Makes `wait` the current wait, as if `next()` had just returned it (it may exceed the
    /// cap): the next failure waits twice as long, at most `cap`. For a caller that waits a
    /// set time for a while and backs off from there.
    public mutating func restart(from wait: Duration) { current = wait }
}
