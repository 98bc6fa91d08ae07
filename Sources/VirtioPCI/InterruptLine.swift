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
}
