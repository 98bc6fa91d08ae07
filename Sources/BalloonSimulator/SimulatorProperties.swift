import VirtioCore

/// The `-device virtio-balloon-pci,...` properties the simulator models.
public struct BalloonDeviceProperties: Hashable, Sendable {
    /// `free-page-hint=on` (QEMU also needs `iothread=`; the simulator does not).
    public var freePageHint = false
    /// `free-page-reporting=on`.
    public var freePageReporting = false
    /// `deflate-on-oom=on`.
    public var deflateOnOOM = false
    /// `page-poison` (QEMU's default is on).
    public var pagePoison = true
    /// `disable-legacy=on` behind a PCIe port, or `virtio-balloon-pci-non-transitional`:
    /// device id 0x1045, revision 1, no BAR0, PCIe and PM capabilities.
    public var modernOnly = false
    /// `-m`: RAM size in bytes (`vm_ram_size` for targets).
    public var ramSize: UInt64 = 1 << 30
    /// The QEMU release modelled where releases differ (SimulatedQEMUVersion.swift).
    public var qemuVersion: SimulatedQEMUVersion = .v7_2
    /// `iommu_platform=on` behind a vIOMMU: ACCESS_PLATFORM is offered, and once it is
    /// negotiated the device maps a descriptor one IOMMU page at a time, one I/O vector per
    /// page unless the memory behind is contiguous (`SimulatedBalloonDevice.iommuContiguous`),
    /// and refuses an element that needs more than QEMU's 1024 (`VIRTQUEUE_MAX_SIZE`).
    /// Addresses are taken as identity-mapped (the simulator does not model the IOMMU's tables).
    public var iommuPlatform = false

    public init(freePageHint: Bool = false, freePageReporting: Bool = false, deflateOnOOM: Bool = false,
                pagePoison: Bool = true, modernOnly: Bool = false, ramSize: UInt64 = 1 << 30) {
        self.freePageHint = freePageHint
        self.freePageReporting = freePageReporting
        self.deflateOnOOM = deflateOnOOM
        self.pagePoison = pagePoison
        self.modernOnly = modernOnly
        self.ramSize = ramSize
    }

    /// Every combination of the four feature properties (for table-driven tests).
    public static var allFeatureCombinations: [BalloonDeviceProperties] {
        var out: [BalloonDeviceProperties] = []
        for mask in 0..<16 {
            out.append(BalloonDeviceProperties(freePageHint: mask & 1 != 0, freePageReporting: mask & 2 != 0,
                                               deflateOnOOM: mask & 4 != 0, pagePoison: mask & 8 != 0))
        }
        return out
    }

    /// The features QEMU 7.2 offers on the modern interface for these properties
    /// (docs/virtio-balloon.md §1.5, §3.1).
    public var offeredFeatures: FeatureBits {
        var f: FeatureBits = [.statsVQ, .indirectDesc, .eventIdx, .version1, .ringReset]
        if deflateOnOOM { f.insert(.deflateOnOOM) }
        if freePageHint { f.insert(.freePageHint) }
        if pagePoison { f.insert(.pagePoison) }
        if freePageReporting { f.insert(.reporting) }
        if iommuPlatform { f.insert(.accessPlatform) }
        return f
    }

    /// `virtio_balloon_config_size`.
    public var configSize: Int { pagePoison ? 16 : (freePageHint ? 12 : 8) }
}

/// Faults a test can inject into the simulated device.
public struct BalloonDeviceFaults: Sendable {
    /// The device never completes a reset (status keeps its old value).
    public var neverResets = false
    /// FEATURES_OK does not stick when written.
    public var rejectFeaturesOK = false
    /// Queues that report size 0.
    public var zeroSizedQueues: Set<UInt16> = []
    /// The device ignores every notification (it never answers).
    public var ignoreNotifications = false
    /// The next used entry on this queue carries this id instead of the real head.
    public var corruptNextUsedID: [UInt16: UInt32] = [:]
    /// The next push on this queue advances `used->idx` by this much extra.
    public var jumpNextUsedIndex: [UInt16: UInt16] = [:]
    /// The next push on this queue reports this used length.
    public var corruptNextUsedLength: [UInt16: UInt32] = [:]
    /// Device-config reads of the cmd id return this instead of the real value.
    public var forcedCmdID: UInt32? = nil
    /// Marks itself NEEDS_RESET (with a config interrupt) the moment the driver sets DRIVER_OK.
    public var needsResetAfterDriverOK = false
    /// `config_generation` changes on each of the next this many reads (a config that never
    /// settles; `Int.max` for ever). A finite count lets a test of an unbounded retry loop
    /// fail instead of hang.
    public var unstableGenerationReads = 0
    /// A host that answers each config interrupt the driver takes (an ISR read with the
    /// config bit) with a new hint round: a new cmd id and another config interrupt. Counts
    /// down; 0 is off (a finite count lets a test without the bound fail instead of hang).
    public var newHintRoundOnConfigInterrupt = 0
    /// Command writes that clear Bus Master fail (the config-space write returns an error).
    public var busMasterClearFails = false
    /// Command writes that clear Bus Master are ignored for that bit (it reads back set).
    public var busMasterStuckOn = false

    public init() {}
}
