#if canImport(Glibc)
import Glibc
#endif
import CBalloonShims
import SystemPackage
import VirtioCore
import VirtioPCI

/// A non-blocking eventfd: vfio signals an interrupt by adding 1 to it.
public final class EventFD {
    public let file: OpenFile

    public init() throws(SystemCallError) {
        let fd = try Sys.call("eventfd") { eventfd(0, Int32(EFD_CLOEXEC | EFD_NONBLOCK)) }
        file = OpenFile(adopting: fd, path: "eventfd")
    }

    public var descriptor: Int32 { file.descriptor }

    /// Takes the count (how many signals since the last take); 0 when none is pending.
    public func take() throws(SystemCallError) -> UInt64 {
        do {
            let bytes = try file.read(count: 8)
            guard bytes.count == 8 else { return 0 }
            return bytes.enumerated().reduce(0) { $0 | UInt64($1.element) << (8 * UInt64($1.offset)) }
        } catch {
            if error.errno == .resourceTemporarilyUnavailable || error.errno == .wouldBlock { return 0 }
            throw error
        }
    }

    /// Adds `value` (tests, standing in for the kernel).
    public func signal(_ value: UInt64 = 1) throws(SystemCallError) {
        let bytes = (0..<8).map { UInt8(truncatingIfNeeded: value >> (8 * UInt64($0))) }
        try file.writeAll(bytes)
    }

    /// Polls for up to `timeoutMilliseconds` (negative: forever) and takes the count; false on
    /// a timeout or a signal.
    func wait(timeoutMilliseconds: Int) throws(SystemCallError) -> Bool {
        var pfd = pollfd(fd: descriptor, events: Int16(POLLIN), revents: 0)
        let r = unsafe poll(&pfd, 1, Int32(clamping: timeoutMilliseconds < 0 ? -1 : timeoutMilliseconds))
        if r < 0 {
            if Glibc.errno == EINTR { return false }
            throw SystemCallError(call: "poll", path: "eventfd", errno: Errno(rawValue: Glibc.errno))
        }
        guard r > 0 else { return false }
        return try take() > 0
    }
}

/// The balloon's INTx line through vfio (docs/vfio.md §1 step 9): vfio-pci's handler masks
/// the line and signals an eventfd; after the driver read the ISR (which deasserts the
/// line), `unmask` is `VFIO_DEVICE_SET_IRQS` ACTION_UNMASK (uio_pci_generic's config-space
/// unmask has no place under vfio, which virtualises INTx-Disable).
public final class VFIOINTxLine: InterruptLine {
    private let device: VFIODevice
    private let event: EventFD

    public init(device: VFIODevice) throws(VFIOError) {
        self.device = device
        let info: VFIOIRQInfo
        do { info = try device.kernel.irqInfo(device: device.descriptor, index: VFIOPCIIRQ.intx) } catch {
            throw .interrupts(index: VFIOPCIIRQ.intx, reason: "VFIO_DEVICE_GET_IRQ_INFO failed", error)
        }
        guard info.count >= 1, info.signalsEventFD else {
            throw .interrupts(index: VFIOPCIIRQ.intx, reason: "the function has no INTx pin (and no MSI-X vectors balloond could use)", nil)
        }
        do { event = try EventFD() } catch { throw .interrupts(index: VFIOPCIIRQ.intx, reason: "eventfd failed", error) }
        do { try device.kernel.setIRQs(device: device.descriptor, index: VFIOPCIIRQ.intx, .trigger(eventfds: [event.descriptor])) } catch {
            throw .interrupts(index: VFIOPCIIRQ.intx, reason: "VFIO_DEVICE_SET_IRQS (eventfd trigger) failed", error)
        }
    }

    deinit { try? device.kernel.setIRQs(device: device.descriptor, index: VFIOPCIIRQ.intx, .disable) }

    public var pollDescriptor: Int32? { event.descriptor }

    public func wait(timeoutMilliseconds: Int) throws(TransportError) -> Bool {
        do { return try event.wait(timeoutMilliseconds: timeoutMilliseconds) } catch {
            throw .pci(.configAccess(offset: PCIConfig.status, reason: VFIOInterruptProblem.eventFD(error)))
        }
    }

    public func unmask() throws(TransportError) {
        do { try device.kernel.setIRQs(device: device.descriptor, index: VFIOPCIIRQ.intx, .unmask) } catch {
            throw .pci(.configAccess(offset: PCIConfig.status, reason: VFIOInterruptProblem.unmask(error)))
        }
    }
}

/// The balloon's MSI-X vectors through vfio: one eventfd per vector, all in one epoll set
/// whose descriptor is what the event loop polls. Vector 0 is the config-change vector; the
/// queues use the others (`plan`). MSI-X is edge-like: nothing to unmask.
public final class VFIOMSIXLine: InterruptLine {
    private let device: VFIODevice
    private let events: [EventFD]
    private let epoll: OpenFile
    public let plan: MSIXVectorPlan
    /// Vectors that fired since the last `takeCauses`.
    private var fired: Set<Int> = []

    /// Enables MSI-X with enough vectors for `queueCount` queues and the config vector: one
    /// per queue when the table has room, else one shared by all queues.
    public init(device: VFIODevice, queueCount: Int) throws(VFIOError) {
        self.device = device
        let info: VFIOIRQInfo
        do { info = try device.kernel.irqInfo(device: device.descriptor, index: VFIOPCIIRQ.msix) } catch {
            throw .interrupts(index: VFIOPCIIRQ.msix, reason: "VFIO_DEVICE_GET_IRQ_INFO failed", error)
        }
        guard info.count >= 1, info.signalsEventFD else {
            throw .interrupts(index: VFIOPCIIRQ.msix, reason: "the function has no MSI-X table", nil)
        }
        plan = MSIXVectorPlan(tableSize: Int(info.count), queueCount: queueCount)
        var made: [EventFD] = []
        do {
            for _ in 0..<plan.vectorCount { made.append(try EventFD()) }
            epoll = try Sys.epollCreate()
            for (i, e) in made.enumerated() { try Sys.epollAdd(epoll, descriptor: e.descriptor, tag: UInt64(i)) }
        } catch { throw .interrupts(index: VFIOPCIIRQ.msix, reason: "eventfd/epoll setup failed", error) }
        events = made
        do { try device.kernel.setIRQs(device: device.descriptor, index: VFIOPCIIRQ.msix, .trigger(eventfds: made.map(\.descriptor))) } catch {
            throw .interrupts(index: VFIOPCIIRQ.msix, reason: "VFIO_DEVICE_SET_IRQS (enable \(plan.vectorCount) vectors) failed", error)
        }
    }

    deinit { try? device.kernel.setIRQs(device: device.descriptor, index: VFIOPCIIRQ.msix, .disable) }

    public var pollDescriptor: Int32? { epoll.descriptor }

    /// Waits on the epoll set and takes the count of every vector that fired.
    public func wait(timeoutMilliseconds: Int) throws(TransportError) -> Bool {
        let tags: [UInt64]
        do { tags = try Sys.epollWait(epoll, maxEvents: events.count, timeoutMilliseconds: timeoutMilliseconds) } catch {
            throw .pci(.configAccess(offset: PCIConfig.status, reason: VFIOInterruptProblem.eventFD(error)))
        }
        var any = false
        for tag in tags {
            let i = Int(tag)
            guard i < events.count else { continue }
            let count: UInt64
            do { count = try events[i].take() } catch { throw .pci(.configAccess(offset: PCIConfig.status, reason: VFIOInterruptProblem.eventFD(error))) }
            if count > 0 {
                fired.insert(i)
                any = true
            }
        }
        return any
    }

    public func unmask() throws(TransportError) {}

    /// A config change when the config vector fired, a queue notification for any other.
    public func takeCauses() -> ISRStatus {
        var causes: ISRStatus = []
        for v in fired {
            // With a single vector, vector 0 serves the config change and every queue.
            if plan.vectorCount == 1 { causes.formUnion([.configChange, .queue]); continue }
            causes.insert(v == plan.configVector ? .configChange : .queue)
        }
        fired.removeAll()
        return causes
    }
}

/// Why waiting for or re-arming a vfio interrupt failed.
public enum VFIOInterruptProblem: Error, Hashable, Sendable, CustomStringConvertible {
    case eventFD(SystemCallError)
    case unmask(SystemCallError)

    public var description: String {
        switch self {
        case .eventFD(let e): return "waiting for the vfio interrupt eventfd failed: \(e)"
        case .unmask(let e): return "unmasking INTx through vfio failed: \(e)"
        }
    }
}
