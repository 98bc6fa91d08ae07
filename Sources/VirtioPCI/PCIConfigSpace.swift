import VirtioCore
/// Access to a PCI function's configuration space (the first 256 bytes at least).
///
/// Real conformance: sysfs `/sys/bus/pci/devices/BDF/config` (PlatformLinux). Fakes: a byte
/// array (`FakePCIConfigSpace`, in the TestSupport test target), and the simulator's device.
public protocol PCIConfigSpace: AnyObject {
    func read8(at offset: Int) throws(PCIError) -> UInt8
    func read16(at offset: Int) throws(PCIError) -> UInt16
    func read32(at offset: Int) throws(PCIError) -> UInt32
    func write16(_ value: UInt16, at offset: Int) throws(PCIError)
}

/// Standard PCI config header offsets and bits used here.
public enum PCIConfig {
    public static let vendorID = 0x00
    public static let deviceID = 0x02
    public static let command = 0x04
    public static let status = 0x06
    public static let revision = 0x08
    public static let classCode = 0x09
    public static let subsystemVendorID = 0x2c
    public static let subsystemID = 0x2e
    public static let capabilitiesPointer = 0x34
    public static let interruptPin = 0x3d

    /// Command: memory space decode.
    public static let commandMemory: UInt16 = 1 << 1
    /// Command: bus master. QEMU clears DRIVER_OK on every Command write without it.
    public static let commandBusMaster: UInt16 = 1 << 2
    /// Command: INTx disable (uio_pci_generic sets it in its interrupt handler).
    public static let commandINTxDisable: UInt16 = 1 << 10
    /// Status: capability list present.
    public static let statusCapList: UInt16 = 1 << 4
    /// Status: INTx asserted.
    public static let statusInterrupt: UInt16 = 1 << 3

    /// Red Hat / virtio vendor.
    public static let virtioVendor: UInt16 = 0x1af4
    /// Transitional virtio-balloon.
    public static let balloonTransitionalID: UInt16 = 0x1002
    /// Modern virtio-balloon: 0x1040 + VIRTIO_ID_BALLOON (5).
    public static let balloonModernID: UInt16 = 0x1045
    /// VIRTIO_ID_BALLOON.
    public static let virtioBalloonDeviceType: UInt16 = 5
}

