import TestSupport
import Testing
@testable import PlatformLinux

/// The thin reader behind init_on_free detection: /boot/config-*, /proc/config.gz, the
/// kernel log, and what happens when each is missing or corrupt.
@Suite struct KernelConfigFaultInjectionTests {
    static let configText = "CONFIG_PAGE_POISONING=y\nCONFIG_INIT_ON_FREE_DEFAULT_ON=y\n# CONFIG_INIT_ON_ALLOC_DEFAULT_ON is not set\n"
    /// `configText`, gzip-compressed (Python's gzip.compress with mtime 0).
    static let configGz: [UInt8] = [
        0x1f, 0x8b, 0x08, 0x00, 0x00, 0x00, 0x00, 0x00, 0x02, 0x03, 0x73, 0xf6, 0xf7, 0x73, 0xf3, 0x74, 0x8f, 0x0f, 0x70, 0x74, 0x77,
        0x8d, 0x0f, 0xf0, 0xf7, 0x0c, 0xf6, 0xf7, 0xf3, 0xf4, 0x73, 0xb7, 0xad, 0xe4, 0x72, 0x86, 0x88, 0x7b, 0xfa, 0x79, 0x86, 0xc4,
        0xfb, 0xfb, 0xc5, 0xbb, 0x05, 0xb9, 0xba, 0xc6, 0xbb, 0xb8, 0xba, 0x39, 0x86, 0xfa, 0x80, 0xf8, 0x40, 0x05, 0xca, 0x0a, 0x68,
        0x4a, 0x1c, 0x7d, 0x7c, 0xfc, 0x9d, 0x91, 0xd4, 0x28, 0x64, 0x16, 0x2b, 0xe4, 0xe5, 0x97, 0x28, 0x14, 0xa7, 0x96, 0x70, 0x01,
        0x00, 0xfa, 0x15, 0xec, 0xb1, 0x66, 0x00, 0x00, 0x00,
    ]

    @Test func gunzipDecompressesConfigGz() throws {
        #expect(String(decoding: try gunzip(Self.configGz, limit: 1 << 20), as: UTF8.self) == Self.configText)
    }

    @Test("corrupt, truncated or oversized gzip data is an error, never a crash", arguments: [0, 10, 50, 92])
    func truncatedGzipIsAnError(keep: Int) {
        #expect(throws: GzipError.self) { _ = try gunzip(Array(Self.configGz.prefix(keep)), limit: 1 << 20) }
    }

    @Test func gunzipRefusesOutputOverTheLimit() {
        #expect(throws: GzipError.tooLarge(limit: 10)) { _ = try gunzip(Self.configGz, limit: 10) }
        #expect(GzipError.tooLarge(limit: 10).description == "more than 10 bytes")
        var bad = Self.configGz
        bad[20] ^= 0xff
        #expect(throws: GzipError.self) { _ = try gunzip(bad, limit: 1 << 20) }
    }

    @Test func procConfigGzIsReadWhenBootConfigIsMissing() {
        let t = FakeTree()
        t.file("/proc/cmdline", "console=ttyS0\n")
        t.file("/proc/config.gz", bytes: Self.configGz)
        let s = KernelMemoryDebugSources.read(root: t.root, kernelRelease: "6.1.0-test")
        #expect(s.kernelConfig == Self.configText)
        #expect(s.kernelConfigSource == t.at("/proc/config.gz"))
        #expect(s.cmdline == "console=ttyS0\n")
    }

    @Test func bootConfigIsPreferred() {
        let t = FakeTree()
        t.file("/boot/config-6.1.0-test", "CONFIG_X=y\n")
        t.file("/proc/config.gz", bytes: Self.configGz)
        #expect(KernelMemoryDebugSources.read(root: t.root, kernelRelease: "6.1.0-test").kernelConfig == "CONFIG_X=y\n")
    }

    @Test func nothingReadableLeavesEverythingUnknown() {
        let t = FakeTree()
        t.file("/proc/config.gz", bytes: Array(Self.configGz.prefix(40)))   // corrupt
        let s = KernelMemoryDebugSources.read(root: t.root, kernelRelease: "6.1.0-test")
        #expect(s.kernelConfig == nil && s.memAutoInitLog == nil && s.cmdline == "")
    }

    @Test func theMemAutoInitRecordIsTakenFromKmsg() {
        let t = FakeTree()
        t.file("/dev/kmsg", "6,1,0,-;Linux version 6.1.0\n6,57,0,-;mem auto-init: stack:off, heap alloc:on, heap free:off\n6,58,0,-;other\n")
        #expect(KernelMemoryDebugSources.read(root: t.root, kernelRelease: "x").memAutoInitLog == "mem auto-init: stack:off, heap alloc:on, heap free:off")
    }
}
