import PlatformLinux

/// Raises `/proc/self/oom_score_adj` while an owned source or the balloon holds memory, so
/// that under memory pressure the OOM killer picks balloond (freeing what it holds) rather
/// than a workload; restores the previous value when everything is released. Dies with the
/// process, so a crash needs no cleanup.
///
/// Several holders (the anonymous hint source, the balloon backends) each have one of these
/// on the same `GuestMemoryHoldings`, which counts them: the value is written by the first
/// `raise` and restored by the last `restore`, so one holder letting go does not lower the
/// score while another still holds memory.
package final class OOMScoreAdjustment {
    package let holdings: GuestMemoryHoldings
    package let raisedValue: Int
    private var holding = false

    package init(holdings: GuestMemoryHoldings, raisedValue: Int = 1000) {
        self.holdings = holdings
        self.raisedValue = raisedValue
    }

    deinit { _ = restore() }

    /// Whether this holder has raised it.
    package var isRaised: Bool { holding }

    /// Raises it (once per holder); returns an error text when the file cannot be written.
    package func raise() -> String? {
        guard !holding else { return nil }
        let problem = holdings.addOOMScoreHolder(raisingTo: raisedValue)
        if problem == nil { holding = true }
        return problem
    }

    /// Lets go; the last holder restores the value from before the first `raise`.
    package func restore() -> String? {
        guard holding else { return nil }
        holding = false
        return holdings.removeOOMScoreHolder(raisedTo: raisedValue)
    }
}
