#if canImport(Glibc)
import Glibc
#endif

/// CLOCK_MONOTONIC in nanoseconds.
func monotonicNanos() -> UInt64 {
    var ts = timespec()
    clock_gettime(CLOCK_MONOTONIC, &ts)
    return UInt64(ts.tv_sec) * 1_000_000_000 + UInt64(ts.tv_nsec)
}

/// "ENOMEM: Cannot allocate memory"-style text for an errno value.
func errnoDescription(_ e: Int32) -> String {
    let name: String
    switch e {
    case ENOMEM: name = "ENOMEM"
    case EINVAL: name = "EINVAL"
    case EPERM: name = "EPERM"
    case EAGAIN: name = "EAGAIN"
    case EFAULT: name = "EFAULT"
    case EBUSY: name = "EBUSY"
    default: name = "errno \(e)"
    }
    return "\(name): " + String(cString: strerror(e))
}
