// Where the harness finds the package, its cache, the guest kernels and images, QEMU 10.0
// and the scripts; and small helpers for environment knobs and shell quoting.

import Foundation
#if canImport(Glibc)
import Glibc
#endif

enum HarnessPaths {
    /// The package root: BALLOOND_ROOT, else derived from this file's path
    /// (<root>/Tests/IntegrationTests/Harness/HarnessPaths.swift).
    static let packageRoot: URL = {
        if let root = ProcessInfo.processInfo.environment["BALLOOND_ROOT"], !root.isEmpty {
            return URL(fileURLWithPath: root)
        }
        return URL(fileURLWithPath: #filePath)
            .deletingLastPathComponent()  // Harness
            .deletingLastPathComponent()  // IntegrationTests
            .deletingLastPathComponent()  // Tests
            .deletingLastPathComponent()
    }()

    /// BALLOOND_CACHE (as the scripts use it), else <root>/.cache.
    static var cache: URL {
        if let cache = ProcessInfo.processInfo.environment["BALLOOND_CACHE"], !cache.isEmpty {
            return URL(fileURLWithPath: cache)
        }
        return packageRoot.appendingPathComponent(".cache")
    }

    /// The default platform's kernel and image (GuestPlatform.current).
    static var kernel: URL { kernel(GuestPlatform.current.guestKernel) }
    static var initramfs: URL { initramfs(GuestPlatform.current.guestKernel) }
    /// Where scripts/setup.sh unpacks the guest kernel `version` (6.1: .cache/kernel, 6.12:
    /// .cache/kernel-6.12) and where build-guest.sh puts its image (.cache/guest, .cache/guest-6.12).
    static func kernel(_ version: String) -> URL {
        cache.appendingPathComponent(version == "6.1" ? "kernel/vmlinuz" : "kernel-\(version)/vmlinuz")
    }
    static func initramfs(_ version: String) -> URL {
        cache.appendingPathComponent(version == "6.1" ? "guest/initramfs.cpio.gz" : "guest-\(version)/initramfs.cpio.gz")
    }
    /// QEMU 10.0's wrapper from scripts/setup.sh (7.2 is the system's qemu-system-x86_64).
    static var qemu10: URL { cache.appendingPathComponent("qemu-10.0/qemu-system-x86_64") }
    static var runs: URL { cache.appendingPathComponent("runs") }
    static var runGuest: URL { packageRoot.appendingPathComponent("scripts/run-guest.sh") }
    static var buildGuest: URL { packageRoot.appendingPathComponent("scripts/build-guest.sh") }
    /// The balloond binary build-guest.sh puts into the image by default.
    static var releaseBalloond: URL { packageRoot.appendingPathComponent(".build/release/balloond") }
}

func environmentNumber(_ name: String) -> Double? {
    ProcessInfo.processInfo.environment[name].flatMap { Double($0) }
}

/// Quotes `s` for the guest's `sh`.
func shellQuote(_ s: String) -> String {
    if !s.isEmpty, s.allSatisfy({ $0.isASCII && ($0.isLetter || $0.isNumber || "-_./=:,+@%".contains($0)) }) {
        return s
    }
    return "'" + s.replacingOccurrences(of: "'", with: "'\\''") + "'"
}
