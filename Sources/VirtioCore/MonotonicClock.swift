/// The one clock of every timed decision in the driver and the daemon: the time since an
/// arbitrary fixed point, as a `Duration`; deadlines are points on it (also `Duration`s).
/// `balloond run` injects the platform's CLOCK_MONOTONIC, tests a virtual clock they move by
/// hand (the daemon's loop runs in virtual time).
public struct MonotonicClock: Sendable {
    /// The time now since the clock's fixed point; never goes back.
    public let now: @Sendable () -> Duration

    public init(now: @escaping @Sendable () -> Duration) { self.now = now }

    /// The standard library's `ContinuousClock`, measured from the first reading through
    /// this clock (the default until a caller injects another).
    public static let system: MonotonicClock = {
        let origin = ContinuousClock.now
        return MonotonicClock { ContinuousClock.now - origin }
    }()
}

extension Duration {
    /// Whole `unit`s in this duration, rounded toward zero (what integer nanoseconds divided
    /// by a unit gave before durations): for counters, status fields and log text.
    package func whole(_ unit: Duration) -> Int64 {
        Int64(clamping: attoseconds / unit.attoseconds)
    }

    /// Whole `unit`s in this duration, rounded up (a wait of 0.3 ms is not one of 0 ms, which
    /// would spin); negative durations count as zero.
    package func roundedUp(to unit: Duration) -> Int64 {
        guard self > .zero else { return 0 }
        let (q, r) = attoseconds.quotientAndRemainder(dividingBy: unit.attoseconds)
        return Int64(clamping: r == 0 ? q : q + 1)
    }
}
