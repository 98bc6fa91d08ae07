// The seam between a virtio driver and its transport (virtio 1.2 §4): what any virtio device
// needs from PCI, MMIO or a simulator, and the errors they report. The driver (Balloon) sees
// only this; VirtioPCI implements it for virtio-pci.

/// ISR status bits (virtio 1.2 §4.1.4.5). Reading the ISR clears it and deasserts INTx.
public struct ISRStatus: OptionSet, Hashable, Sendable {
    public let rawValue: UInt8
    public init(rawValue: UInt8) { self.rawValue = rawValue }
    /// A used buffer notification.
    public static let queue = ISRStatus(rawValue: 1)
    /// The device configuration changed.
    public static let configChange = ISRStatus(rawValue: 2)
}

/// Errors at the transport layer, named after spec conditions.
public enum TransportError: Error, Hashable, CustomStringConvertible {
    case pci(PCIError)
    case capabilities(VirtioCapabilityError)
    case notAVirtioDevice(vendor: UInt16, device: UInt16)
    case resetTimedOut(status: DeviceStatus, milliseconds: Int)
    case featuresNotAccepted(DeviceStatus)
    case featureNegotiation(FeatureNegotiationError)
    case queueIndexOutOfRange(queue: UInt16, numQueues: UInt16)
    case queueUnavailable(queue: UInt16)
    case queueSizeMismatch(queue: UInt16, expected: UInt16, found: UInt16)
    case queueEnableDidNotStick(queue: UInt16)
    case needsReset(DeviceStatus)
    case deviceConfigOutOfRange(offset: Int, length: Int)
    case notifyOutOfRange(queue: UInt16, offset: Int)
    /// `config_generation` changed across every one of `attempts` snapshot reads.
    case configGenerationUnstable(attempts: Int)
    /// Bus Master still reads set after the driver cleared it (the device may still DMA).
    case busMasterDidNotClear(command: UInt16)
    /// The device read back `got` (NO_VECTOR: it could not map it) after the driver wrote
    /// MSI-X vector `vector` for `source` ("config" or "queue N").
    case msixVectorRejected(source: String, vector: UInt16, got: UInt16)

    public var description: String {
        switch self {
        case .pci(let e): return e.description
        case .capabilities(let e): return "malformed virtio capabilities: \(e)"
        case .notAVirtioDevice(let v, let d):
            return "PCI function \(hex4(v)):\(hex4(d)) is not a virtio device (expected vendor 1af4, device 1000-107f)"
        case .resetTimedOut(let s, let ms): return "device did not complete reset within \(ms) ms (status still \(s))"
        case .featuresNotAccepted(let s): return "device did not accept the negotiated features (FEATURES_OK not set after write; status \(s))"
        case .featureNegotiation(let e): return e.description
        case .queueIndexOutOfRange(let q, let n): return "queue \(q) does not exist (device has \(n) queues)"
        case .queueUnavailable(let q): return "queue \(q) has size 0 on this device"
        case .queueSizeMismatch(let q, let e, let f): return "queue \(q) has size \(f), but QEMU's numbering says \(e) here: the device's queue layout is not the one balloond knows"
        case .queueEnableDidNotStick(let q): return "queue \(q) did not read back enabled after queue_enable=1"
        case .needsReset(let s): return "device set NEEDS_RESET (status \(s)): it found an error in what the driver sent; balloond will reset it"
        case .deviceConfigOutOfRange(let o, let l): return "device config access at \(o) (+\(l)) is outside the device config window"
        case .notifyOutOfRange(let q, let o): return "notify address for queue \(q) (offset 0x\(String(o, radix: 16))) is outside the notify structure"
        case .configGenerationUnstable(let n):
            return "device config_generation changed during each of \(n) reads of its config: the device is broken or hostile; balloond will reset it"
        case .msixVectorRejected(let source, let vector, let got):
            return "the device did not take MSI-X vector \(vector) for \(source) (read back 0x\(String(got, radix: 16))\(got == virtioNoVector ? ", NO_VECTOR" : "")): its MSI-X table has fewer vectors than vfio enabled"
        case .busMasterDidNotClear(let c):
            return "PCI Command still has Bus Master set after clearing it (Command 0x\(String(c, radix: 16))): the device may still access memory"
        }
    }
}

/// The bus-independent operations a virtio driver needs (virtio 1.2 §3). Real conformance:
/// `ModernPCITransport` over a mapped BAR or the simulator's registers.
public protocol VirtioTransport: AnyObject {
    /// The virtio device type (5 for the balloon).
    var virtioDeviceType: UInt16 { get }
    func deviceFeatures() -> FeatureBits
    func setDriverFeatures(_ features: FeatureBits)
    /// Reads back what the driver wrote (QEMU returns the raw value, not the masked one).
    func driverFeatures() -> FeatureBits
    func status() -> DeviceStatus
    func setStatus(_ status: DeviceStatus)
    var numQueues: UInt16 { get }
    /// Selects `queue` and reads its size (0: absent).
    func queueSize(_ queue: UInt16) -> UInt16
    /// Programs and enables one queue: size, the three areas, then `queue_enable = 1`.
    func enableQueue(_ queue: UInt16, size: UInt16, descriptors: PhysicalAddress, driver: PhysicalAddress, device: PhysicalAddress) throws(TransportError)
    func queueEnabled(_ queue: UInt16) -> Bool
    /// Tells the device a queue has new buffers.
    func notify(queue: UInt16) throws(TransportError)
    /// Reads (and so clears) the ISR.
    func readISR() -> ISRStatus
    func configGeneration() -> UInt8
    /// Size of the device config window.
    var deviceConfigLength: Int { get }
    func readDeviceConfig32(at offset: Int) throws(TransportError) -> UInt32
    /// One aligned 32-bit store (the balloon's `actual` and `poison_val` need exactly that).
    func writeDeviceConfig32(_ value: UInt32, at offset: Int) throws(TransportError)
    /// Lets the device reach memory (PCI: sets Bus Master). Called before queues are used.
    func enableDMA() throws(TransportError)
    /// Stops the device from reaching memory (PCI: clears Bus Master, keeps memory decoding
    /// on so the registers stay reachable), and checks that it took. Used before a reset at
    /// bring-up, and at shutdown when a reset fails.
    func disableDMA() throws(TransportError)
    /// Waits a little between polls of a register (e.g. while a reset completes).
    func pause(microseconds: Int)
    /// Routes the device's interrupts where the platform listens (virtio-pci with MSI-X:
    /// writes `msix_config` and checks it read back). After FEATURES_OK, before the queues.
    func setUpInterrupts() throws(TransportError)
}

extension VirtioTransport {
    public func setUpInterrupts() throws(TransportError) {}
}

extension VirtioTransport {
    /// Resets the device: writes 0, then polls until status reads 0 (virtio 1.2 §2.4.1: "the
    /// driver MUST NOT assume reset is complete before it reads 0").
    public func reset(timeoutMilliseconds: Int = 1000) throws(TransportError) {
        try reset(timeoutMilliseconds: timeoutMilliseconds, sleep: { pause(microseconds: $0) })
    }

    /// `reset` with the wait between status reads injected (tests count it).
    public func reset(timeoutMilliseconds: Int, sleep: (Int) -> Void) throws(TransportError) {
        setStatus([])
        var waited = 0
        while status().rawValue != 0 {
            if waited >= timeoutMilliseconds * 1000 { throw .resetTimedOut(status: status(), milliseconds: timeoutMilliseconds) }
            sleep(100)
            waited += 100
        }
    }

    /// Adds bits to the status (read-modify-write).
    public func addStatus(_ bits: DeviceStatus) { setStatus(status().union(bits)) }

    /// Reads several device-config fields as one consistent snapshot: retries while
    /// `config_generation` changes across the reads (virtio 1.2 §4.1.4.3.1), at most
    /// `maxAttempts` times (Linux retries forever; a device whose generation never settles
    /// gets a typed error here instead of a hung driver).
    public func readConsistent<T>(maxAttempts: Int = configReadMaxAttempts, _ body: () throws(TransportError) -> T) throws(TransportError) -> T {
        let attempts = max(1, maxAttempts)
        for _ in 0..<attempts {
            let before = configGeneration()
            let value = try body()
            if configGeneration() == before { return value }
        }
        throw .configGenerationUnstable(attempts: attempts)
    }

    /// Negotiates features (steps 4–5 of §3.1.1): writes the accepted subset, sets
    /// FEATURES_OK, and re-reads status to check the device kept it.
    public func negotiate(wanted: FeatureBits) throws(TransportError) -> FeatureBits {
        let accepted: FeatureBits
        do { accepted = try negotiateFeatures(offered: deviceFeatures(), wanted: wanted) } catch { throw .featureNegotiation(error) }
        setDriverFeatures(accepted)
        addStatus(.featuresOK)
        let s = status()
        guard s.contains(.featuresOK) else { throw .featuresNotAccepted(s) }
        return accepted
    }
}

/// How many times `readConsistent` reads a snapshot before giving up. QEMU bumps the
/// generation once per config change, so a real device needs two at most in practice.
public let configReadMaxAttempts = 64

/// `1af4`-style four-digit lowercase hex.
public func hex4(_ v: UInt16) -> String {
    let s = String(v, radix: 16)
    return String(repeating: "0", count: max(0, 4 - s.count)) + s
}

/// A device's interrupt, as the driver's event loop sees it.
///
/// Real conformance: `/dev/uioN` with uio_pci_generic (PlatformLinux): `wait` polls the fd
/// and reads the event count; `unmask` clears INTx-Disable in the PCI Command register.
/// Fake: the simulator's interrupt line.
public protocol InterruptLine: AnyObject {
    /// Blocks until an interrupt arrives or `timeoutMilliseconds` pass (0: just check;
    /// negative: wait forever). Returns whether an interrupt arrived.
    func wait(timeoutMilliseconds: Int) throws(TransportError) -> Bool
    /// Re-enables the interrupt after the driver has read the ISR and handled the cause.
    func unmask() throws(TransportError)
    /// A file descriptor that becomes readable when an interrupt arrives, if there is one
    /// (lets the event loop poll it together with the signal pipe).
    var pollDescriptor: Int32? { get }
    /// What the interrupts taken by `wait` since the last call said by themselves: with
    /// MSI-X the vector tells a config change from a queue notification (the ISR is for
    /// INTx). Empty for a single line, whose causes are in the ISR.
    func takeCauses() -> ISRStatus
}

extension InterruptLine {
    public func takeCauses() -> ISRStatus { [] }
}

/// `VIRTIO_MSI_NO_VECTOR`: no vector for this source (virtio 1.2 §4.1.5.1.2.1); also what the
/// device reads back when it could not map a vector.
public let virtioNoVector: UInt16 = 0xffff

/// Which MSI-X vector each virtio interrupt source uses: vector 0 for config changes, then
/// one per queue when the table has room for all, else one vector shared by every queue
/// (and with a single vector, everything on vector 0).
public struct MSIXVectorPlan: Hashable, Sendable {
    /// Vectors to enable (table entries 0..<vectorCount).
    public let vectorCount: Int
    /// The config-change vector.
    public let configVector: UInt16 = 0
    private let perQueue: Bool

    public init(tableSize: Int, queueCount: Int) {
        if tableSize >= 1 + queueCount {
            vectorCount = 1 + queueCount
            perQueue = true
        } else {
            vectorCount = min(2, max(1, tableSize))
            perQueue = false
        }
    }

    /// The vector of queue `index`.
    public func vector(forQueue index: UInt16) -> UInt16 {
        if perQueue { return 1 + index }
        return vectorCount >= 2 ? 1 : 0
    }
}

/// An error another layer keeps as the reason for its own (`PCIError`, `DMAError`,
/// `PollerError`): the platform's typed error, with its errno, compared by value.
public typealias ErrorReason = Error & Hashable & CustomStringConvertible

/// Errors from PCI config space and BAR access.
public enum PCIError: Error, Hashable, Sendable, CustomStringConvertible {
    /// Reading or writing config space failed (I/O error, device gone, out of range); the
    /// reason is `PCIAccessProblem` or the platform's (PlatformLinux: `ConfigSpaceProblem`).
    case configAccess(offset: Int, reason: any ErrorReason)
    /// A BAR could not be mapped or is not what a virtio device should have; the reason is
    /// `PCIAccessProblem` or the platform's (PlatformLinux: `BARProblem`).
    case bar(index: Int, reason: any ErrorReason)

    public var description: String {
        switch self {
        case .configAccess(let o, let r): return "PCI config space access at 0x\(String(o, radix: 16)) failed: \(r)"
        case .bar(let i, let r): return "BAR\(i): \(r)"
        }
    }

    public static func == (a: PCIError, b: PCIError) -> Bool {
        switch (a, b) {
        case let (.configAccess(o1, r1), .configAccess(o2, r2)): return o1 == o2 && AnyHashable(r1) == AnyHashable(r2)
        case let (.bar(i1, r1), .bar(i2, r2)): return i1 == i2 && AnyHashable(r1) == AnyHashable(r2)
        default: return false
        }
    }

    public func hash(into hasher: inout Hasher) {
        switch self {
        case let .configAccess(o, r): hasher.combine(0); hasher.combine(o); hasher.combine(AnyHashable(r))
        case let .bar(i, r): hasher.combine(1); hasher.combine(i); hasher.combine(AnyHashable(r))
        }
    }
}

/// Reasons for a `PCIError` that do not depend on the platform.
public enum PCIAccessProblem: Error, Hashable, Sendable, CustomStringConvertible {
    /// A `width`-byte access that is misaligned or outside the `size`-byte config space.
    case outsideConfigSpace(width: Int, size: Int)
    /// The BAR is not mapped here (e.g. the simulator has only BAR4).
    case notMapped
    /// The BAR's mapping is `mapped` bytes, but a virtio structure in it ends at `structureEnd`.
    case shorterThanStructure(mapped: Int, structureEnd: Int)

    public var description: String {
        switch self {
        case .outsideConfigSpace(let width, let size): return "\(width)-byte access is misaligned or outside the \(size)-byte config space"
        case .notMapped: return "not mapped"
        case .shorterThanStructure(let mapped, let end): return "mapped \(mapped) bytes, but a virtio structure ends at \(end)"
        }
    }
}

/// `cfg_type` of a virtio vendor capability (virtio 1.2 §4.1.4).
public enum VirtioCapabilityType: UInt8, Sendable {
    case common = 1, notify = 2, isr = 3, device = 4, pciConfig = 5, sharedMemory = 8, vendor = 9
}

/// A capability list that balloond refuses, naming the problem.
public enum VirtioCapabilityError: Error, Hashable, Sendable, CustomStringConvertible {
    case noCapabilityList
    case pointerBelowHeader(at: Int, pointer: Int)
    case pointerMisaligned(at: Int, pointer: Int)
    case loop(at: Int)
    case lengthTooSmall(at: Int, type: UInt8, length: Int, minimum: Int)
    case capabilityOutsideConfigSpace(at: Int, length: Int)
    case barOutOfRange(at: Int, bar: Int)
    case offsetOverflow(at: Int, offset: UInt32, length: UInt32)
    case outsideBAR(at: Int, bar: Int, end: UInt64, barSize: UInt64)
    case barMissing(at: Int, bar: Int)
    case notifyMultiplierInvalid(at: Int, multiplier: UInt32)
    case missing(VirtioCapabilityType)
    case configSpace(PCIError)
    /// The structure's window is shorter than its registers (e.g. an ISR of length 0).
    case windowTooSmall(at: Int, type: VirtioCapabilityType, length: UInt32, minimum: UInt32)
    /// The structure's offset in its BAR breaks the alignment its registers need.
    case offsetMisaligned(at: Int, type: VirtioCapabilityType, offset: UInt32, alignment: UInt32)
    /// Two structures share bytes of the same BAR (a write to one would change the other).
    case overlapping(at: Int, other: Int, bar: Int)

    public var description: String {
        func h(_ v: Int) -> String { "0x" + String(v, radix: 16) }
        switch self {
        case .noCapabilityList: return "the function has no PCI capability list (status bit 4 clear or pointer 0): not a modern virtio device"
        case .pointerBelowHeader(let at, let p): return "capability pointer \(h(p)) at \(h(at)) points into the standard header (below 0x40)"
        case .pointerMisaligned(let at, let p): return "capability pointer \(h(p)) at \(h(at)) is not 4-byte aligned"
        case .loop(let at): return "capability list loops back to \(h(at))"
        case .lengthTooSmall(let at, let t, let l, let m): return "virtio capability at \(h(at)) (cfg_type \(t)) has cap_len \(l), less than \(m)"
        case .capabilityOutsideConfigSpace(let at, let l): return "capability at \(h(at)) with length \(l) runs past the 256-byte config space"
        case .barOutOfRange(let at, let b): return "virtio capability at \(h(at)) names BAR \(b); only 0-5 exist"
        case .offsetOverflow(let at, let o, let l): return "virtio capability at \(h(at)): offset 0x\(String(o, radix: 16)) + length 0x\(String(l, radix: 16)) overflows 32 bits"
        case .outsideBAR(let at, let b, let e, let s): return "virtio capability at \(h(at)) ends at 0x\(String(e, radix: 16)), past BAR\(b)'s 0x\(String(s, radix: 16)) bytes"
        case .barMissing(let at, let b): return "virtio capability at \(h(at)) names BAR\(b), which is not implemented"
        case .notifyMultiplierInvalid(let at, let m): return "notify capability at \(h(at)) has notify_off_multiplier \(m), not a multiple of 2"
        case .missing(let t): return "required virtio capability \(t) is missing"
        case .configSpace(let e): return e.description
        case .windowTooSmall(let at, let t, let l, let m):
            return "virtio capability at \(h(at)) (\(t)) describes a window of \(l) bytes, less than the \(m) its registers need: the device is broken or hostile; do not use it"
        case .offsetMisaligned(let at, let t, let o, let a):
            return "virtio capability at \(h(at)) (\(t)) puts its structure at BAR offset 0x\(String(o, radix: 16)), not \(a)-byte aligned: the device is broken or hostile; do not use it"
        case .overlapping(let at, let other, let bar):
            return "virtio capabilities at \(h(at)) and \(h(other)) describe overlapping windows in BAR\(bar): the device is broken or hostile; do not use it"
        }
    }
}
