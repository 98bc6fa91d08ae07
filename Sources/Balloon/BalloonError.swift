import VirtioCore
import VirtioQueue

/// Why the balloon driver stopped or refused to start.
public enum BalloonError: Error, Equatable, CustomStringConvertible {
    case transport(TransportError)
    case queue(role: BalloonQueueRole, QueueError)
    case wrongDeviceType(UInt16)
    case queueMissing(role: BalloonQueueRole, index: UInt16, numQueues: UInt16)
    /// DMA memory for a buffer could not be had.
    case dma(DMAError)
    case notRunning

    public var description: String {
        switch self {
        case .transport(let e): return e.description
        case .queue(let role, let e): return "\(role) queue: \(e)"
        case .wrongDeviceType(let t): return "virtio device type \(t) is not a balloon (5)"
        case .queueMissing(let role, let index, let n): return "the \(role) queue should be index \(index), but the device has only \(n) queues"
        case .dma(let m): return "DMA memory: \(m)"
        case .notRunning: return "the device is not running (bring it up first)"
        }
    }
}
