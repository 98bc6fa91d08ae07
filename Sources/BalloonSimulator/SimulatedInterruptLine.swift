import VirtioCore
import VirtioPCI

/// The simulated device's INTx line as uio_pci_generic presents it: `wait` reports an
/// interrupt when the line is asserted and masks it (sets INTx-Disable, as
/// `pci_check_and_mask_intx` does); `unmask` clears INTx-Disable through the Command register.
public final class SimulatedInterruptLine: InterruptLine {
    unowned let device: SimulatedBalloonDevice
    /// Interrupts reported so far (uio's event count).
    public private(set) var eventCount = 0
    /// Called when `wait` finds nothing pending, before returning false (tests use it to
    /// play the host: change the target, start a hint round...).
    public var onIdle: ((SimulatedBalloonDevice) -> Void)?

    init(device: SimulatedBalloonDevice) { self.device = device }

    public var pollDescriptor: Int32? { nil }

    public func wait(timeoutMilliseconds: Int) throws(TransportError) -> Bool {
        if !device.interruptAsserted, let onIdle { onIdle(device) }
        guard device.interruptAsserted else { return false }
        eventCount += 1
        let cmd = device.configSpace.command
        do { try device.configSpace.write16(cmd | PCIConfig.commandINTxDisable, at: PCIConfig.command) } catch { throw .pci(error) }
        return true
    }

    public func unmask() throws(TransportError) {
        let cmd = device.configSpace.command
        let want = (cmd & ~PCIConfig.commandINTxDisable) | PCIConfig.commandBusMaster
        do { try device.configSpace.write16(want, at: PCIConfig.command) } catch { throw .pci(error) }
    }
}
