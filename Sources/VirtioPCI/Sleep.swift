#if canImport(Glibc)
import Glibc
#elseif canImport(Darwin)
import Darwin
#endif

func platformSleepMicroseconds(_ us: Int) { _ = usleep(useconds_t(max(0, us))) }
