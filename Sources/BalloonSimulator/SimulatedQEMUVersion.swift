import VirtioCore

/// The QEMU release whose virtio-balloon the simulator models, where releases differ
/// (docs/virtio-balloon.md §11). Set it with `BalloonDeviceProperties.qemuVersion`.
public enum SimulatedQEMUVersion: String, Hashable, Sendable, CaseIterable, CustomStringConvertible {
    /// Debian bookworm's QEMU 7.2: ten stats tags.
    case v7_2 = "7.2"
    /// QEMU 10.0 (bookworm-backports, trixie): sixteen stats tags (since 9.2).
    case v10_0 = "10.0"

    public var description: String { rawValue }

    /// `VIRTIO_BALLOON_S_NR` as this QEMU was built with: `virtio_balloon_receive_stats`
    /// keeps an entry only if `tag < VIRTIO_BALLOON_S_NR` and silently skips the rest.
    public var statTagCount: UInt16 {
        switch self {
        case .v7_2: return 10
        case .v10_0: return 16
        }
    }

    /// The tags this QEMU keeps, and so the keys `qom-get guest-stats` shows.
    public var knownStatTags: [BalloonStatTag] { BalloonStatTag.allCases.filter { $0.rawValue < statTagCount } }
}

extension SimulatedBalloonDevice {
    /// What `qom-get <balloon> guest-stats` shows under `stats`: one key per tag this QEMU
    /// version knows (`balloon_stat_names`), UInt64.max for a tag the last buffer did not
    /// carry (QEMU's `reset_stats` before every parse).
    public var guestStats: [String: UInt64] {
        var out: [String: UInt64] = [:]
        for tag in properties.qemuVersion.knownStatTags {
            out[tag.qemuName] = stats[tag.rawValue] ?? UInt64.max
        }
        return out
    }
}
