// The test platform: which QEMU runs the guest and which Debian kernel it boots.
//
//   7.2/6.1    Debian bookworm's QEMU 7.2 and 6.1 kernel (the default)
//   10.0/6.12  QEMU 10.0 and the 6.12 kernel from bookworm-backports (scripts/setup.sh
//              unpacks both into .cache/)
//
// A test boots `GuestPlatform.current` unless its GuestVM.Options name a version:
// BALLOOND_QEMU_VERSION and BALLOOND_GUEST_KERNEL select it for a whole `swift test` run
// (scripts/test.sh runs the suites a second time that way).

import Foundation

struct GuestPlatform: Hashable, CustomStringConvertible {
    /// "7.2" or "10.0" (run-guest.sh's QEMU_VERSION).
    var qemuVersion: String
    /// "6.1" or "6.12" (run-guest.sh's GUEST_KERNEL).
    var guestKernel: String

    static let qemuVersions = ["7.2", "10.0"]
    static let guestKernels = ["6.1", "6.12"]
    static let bookworm = GuestPlatform(qemuVersion: "7.2", guestKernel: "6.1")
    static let backports = GuestPlatform(qemuVersion: "10.0", guestKernel: "6.12")

    var description: String { "QEMU \(qemuVersion) / Linux \(guestKernel)" }

    /// BALLOOND_QEMU_VERSION and BALLOOND_GUEST_KERNEL, each defaulting to 7.2 and 6.1.
    static var current: GuestPlatform {
        let env = ProcessInfo.processInfo.environment
        func value(_ name: String, _ fallback: String) -> String {
            guard let v = env[name], !v.isEmpty else { return fallback }
            return v
        }
        return GuestPlatform(qemuVersion: value("BALLOOND_QEMU_VERSION", "7.2"), guestKernel: value("BALLOOND_GUEST_KERNEL", "6.1"))
    }

    /// Checks both values against what the scripts know; a typo gets a setup error, not a
    /// confusing boot failure.
    func validate() throws {
        guard Self.qemuVersions.contains(qemuVersion) else {
            throw HarnessError(.setup, "unknown QEMU version '\(qemuVersion)' (BALLOOND_QEMU_VERSION or GuestVM.Options.qemuVersion): use one of \(Self.qemuVersions.joined(separator: ", "))")
        }
        guard Self.guestKernels.contains(guestKernel) else {
            throw HarnessError(.setup, "unknown guest kernel '\(guestKernel)' (BALLOOND_GUEST_KERNEL or GuestVM.Options.guestKernel): use one of \(Self.guestKernels.joined(separator: ", "))")
        }
    }

    /// QEMU ≥ 9.2 keeps the six stats tags Linux 6.12 added; 7.2 ignores tags ≥ 10.
    var qemuKnowsSixteenStats: Bool { qemuVersion != "7.2" }
    /// Linux 6.12 builds virtio_pci in: the balloon is bound to virtio-pci from boot.
    var virtioPCIBuiltIn: Bool { guestKernel != "6.1" }

    /// The environment scripts/run-guest.sh, build-guest.sh and migrate.py read.
    var scriptEnvironment: [String: String] { ["QEMU_VERSION": qemuVersion, "GUEST_KERNEL": guestKernel] }
}
