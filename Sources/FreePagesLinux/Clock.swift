import PlatformLinux

/// CLOCK_MONOTONIC in nanoseconds (timing of hint-source phases; through the platform funnel).
func monotonicNanos() -> UInt64 { Sys.monotonicNanos() }

/// "ENOMEM: Cannot allocate memory"-style text for an errno value.
func errnoDescription(_ e: Int32) -> String { Sys.errnoDescription(e) }
