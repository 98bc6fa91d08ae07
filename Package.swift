// swift-tools-version:6.2
import PackageDescription

let package = Package(
    name: "balloond",
    products: [
        .executable(name: "balloond", targets: ["balloond"]),
        .library(name: "BalloonSimulator", targets: ["BalloonSimulator"]),
    ],
    dependencies: [
        .package(url: "https://github.com/apple/swift-argument-parser", from: "1.5.0"),
        .package(url: "https://github.com/apple/swift-log", from: "1.6.0"),
        .package(url: "https://github.com/apple/swift-system", from: "1.4.0"),
        // Prometheus exposition (`balloond status --format prometheus`, `run --metrics-textfile`):
        // swift-prometheus's registry, a swift-metrics 2.x backend.
        .package(url: "https://github.com/apple/swift-metrics", from: "2.13.0"),
        .package(url: "https://github.com/swift-server/swift-prometheus", from: "2.4.1"),
    ],
    targets: [
        // C: exact-width volatile MMIO, ring fences, cpuid, signal pipe. The only place raw
        // device memory is touched with volatile semantics.
        .target(name: "CBalloonShims"),
        // libpci (Debian's libpci-dev) for PCI enumeration and config space.
        .systemLibrary(name: "CLibPCI", pkgConfig: "libpci", providers: [.apt(["libpci-dev"])]),
        // zlib (Debian's zlib1g-dev; libpci already links it) for /proc/config.gz.
        .systemLibrary(name: "CZlib", pkgConfig: "zlib", providers: [.apt(["zlib1g-dev"])]),
        // Pure spec types: feature bits, status, balloon config, queue numbering.
        .target(name: "VirtioCore"),
        // Driver-side split virtqueue over DMA regions.
        .target(name: "VirtioQueue", dependencies: ["VirtioCore", "CBalloonShims"]),
        // Modern virtio-pci: capability parsing, common config, notify, ISR, device config.
        .target(name: "VirtioPCI", dependencies: ["VirtioCore", "CBalloonShims"]),
        // Free-page sources behind one protocol (and a simulated buddy allocator).
        .target(name: "FreePages", dependencies: ["VirtioCore"]),
        // The memory the balloon holds, behind one protocol (and a simulated backend).
        .target(name: "BalloonBlocks", dependencies: ["VirtioCore"]),
        // The balloon driver, generic over transport, DMA, free-page source and balloon memory.
        .target(name: "Balloon", dependencies: [
            "VirtioCore", "VirtioQueue", "FreePages", "BalloonBlocks",
            .product(name: "Logging", package: "swift-log"),
        ]),
        // A software virtio-balloon PCI function with QEMU 7.2's behaviour.
        .target(name: "BalloonSimulator", dependencies: ["VirtioCore", "VirtioQueue", "VirtioPCI"]),
        // Linux: sysfs, libpci, uio, BAR mmap, hugepage DMA, pagemap, interrupts.
        .target(name: "PlatformLinux", dependencies: [
            "VirtioCore", "VirtioQueue", "VirtioPCI", "CBalloonShims", "CLibPCI", "CZlib",
            .product(name: "SystemPackage", package: "swift-system"),
            .product(name: "Logging", package: "swift-log"),
        ]),
        // What balloond knows and changes of the guest's memory: meminfo and PSI snapshots, the
        // owned-memory allowance, the OOM score, kpageflags, the hugetlb pool, sysctls, memory
        // blocks, the state files that record changes, and the recovery after a crash.
        .target(name: "GuestMemoryLinux", dependencies: ["PlatformLinux", "VirtioCore", .product(name: "Logging", package: "swift-log")]),
        // The Linux free-page hint sources: kpageflags, hugetlb pool, anonymous, offline blocks.
        .target(name: "HintSourcesLinux", dependencies: [
            "FreePages", "GuestMemoryLinux", "PlatformLinux", "VirtioCore", .product(name: "Logging", package: "swift-log"),
        ]),
        // The Linux balloon memory backends: surplus hugetlb pages, locked anonymous pages, tiered.
        .target(name: "BalloonMemoryLinux", dependencies: [
            "BalloonBlocks", "GuestMemoryLinux", "PlatformLinux", "VirtioCore", .product(name: "Logging", package: "swift-log"),
        ]),
        .executableTarget(name: "balloond", dependencies: [
            "Balloon", "BalloonSimulator", "PlatformLinux", "FreePages", "BalloonBlocks", "GuestMemoryLinux", "HintSourcesLinux",
            "BalloonMemoryLinux", "VirtioCore", "VirtioPCI", "VirtioQueue",
            .product(name: "ArgumentParser", package: "swift-argument-parser"),
            .product(name: "Logging", package: "swift-log"),
            .product(name: "CoreMetrics", package: "swift-metrics"),
            .product(name: "Prometheus", package: "swift-prometheus"),
        ]),
        // Fakes shared by the test targets (never linked into balloond).
        .target(name: "TestSupport", dependencies: ["VirtioCore", "VirtioPCI", "PlatformLinux", .product(name: "Logging", package: "swift-log")], path: "Tests/TestSupport"),
        .testTarget(name: "VirtioCoreTests", dependencies: ["VirtioCore"]),
        .testTarget(name: "VirtioQueueTests", dependencies: ["VirtioQueue", "BalloonSimulator"]),
        .testTarget(name: "VirtioPCITests", dependencies: ["VirtioPCI", "VirtioCore", "BalloonSimulator", "TestSupport"]),
        .testTarget(name: "BalloonTests", dependencies: ["Balloon", "BalloonSimulator", "FreePages", "BalloonBlocks", "TestSupport", .product(name: "Logging", package: "swift-log")]),
        .testTarget(name: "IntegrationTests", dependencies: []),
        .testTarget(name: "PlatformLinuxTests", dependencies: ["PlatformLinux", "VirtioPCI", "VirtioQueue", "VirtioCore", "TestSupport"]),
        .testTarget(name: "balloondTests", dependencies: ["balloond", "Balloon", "PlatformLinux"]),
        // The three Linux memory modules, tested together (their fakes are shared).
        .testTarget(name: "LinuxMemoryTests", dependencies: [
            "GuestMemoryLinux", "HintSourcesLinux", "BalloonMemoryLinux", "FreePages", "BalloonBlocks", "PlatformLinux", "VirtioCore", "TestSupport",
        ]),
    ]
)

// Strict memory safety in the product's code: every unsafe construct is marked `unsafe`
// where it is used, and the few types that hold raw memory are marked `@safe` (they check
// every access), so the places that touch raw memory stand out. Test code is exempt.
for target in package.targets where (target.type == .regular || target.type == .executable) && target.path?.hasPrefix("Tests/") != true {
    target.swiftSettings = (target.swiftSettings ?? []) + [.strictMemorySafety()]
}
