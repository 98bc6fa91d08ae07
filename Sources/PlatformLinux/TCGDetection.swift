import CBalloonShims

/// Which hypervisor the guest runs under, from the CPUID hypervisor leaf.
///
/// Matters for timing: under QEMU's TCG (software emulation) everything is 10–100× slower,
/// so timeouts and benchmarks must be scaled.
public enum Hypervisor: Hashable, Sendable, CustomStringConvertible {
    /// QEMU TCG: signature `TCGTCGTCGTCG` (QEMU `target/i386/cpu.c`).
    case tcg
    /// KVM: signature `KVMKVMKVM\0\0\0` (Linux `arch/x86/include/uapi/asm/kvm_para.h`).
    case kvm
    /// Another hypervisor (e.g. `Microsoft Hv`, `VMwareVMware`), by its signature.
    case other(String)
    /// No hypervisor bit, or not x86.
    case none

    public var description: String {
        switch self {
        case .tcg: return "QEMU TCG"
        case .kvm: return "KVM"
        case .other(let s): return "hypervisor '\(s)'"
        case .none: return "no hypervisor"
        }
    }
}

/// Classifies the 12-byte vendor signature of CPUID leaf 0x40000000 (ebx, ecx, edx, in that
/// order, each little-endian). Pure.
public func hypervisor(fromCPUIDSignature bytes: [UInt8]) -> Hypervisor {
    guard bytes.count == 12 else { return .none }
    if bytes == Array("TCGTCGTCGTCG".utf8) { return .tcg }
    if bytes == Array("KVMKVMKVM".utf8) + [0, 0, 0] { return .kvm }
    let text = String(decoding: bytes.prefix(while: { $0 != 0 }), as: UTF8.self)
    return text.isEmpty ? .none : .other(text)
}

/// The signature bytes from the three registers (pure).
public func cpuidSignatureBytes(ebx: UInt32, ecx: UInt32, edx: UInt32) -> [UInt8] {
    [ebx, ecx, edx].flatMap { r in (0..<4).map { UInt8(truncatingIfNeeded: r >> (8 * $0)) } }
}

/// Reads the hypervisor signature, or nil when CPUID is unavailable (not x86) or the
/// hypervisor-present bit (leaf 1, ECX bit 31) is clear — on bare metal leaf 0x40000000
/// returns unrelated data.
public func cpuidHypervisorSignature() -> [UInt8]? {
    var regs: [UInt32] = [0, 0, 0, 0]
    guard unsafe bs_cpuid(1, &regs) == 0, regs[2] & (1 << 31) != 0 else { return nil }
    guard unsafe bs_cpuid(0x4000_0000, &regs) == 0 else { return nil }
    return cpuidSignatureBytes(ebx: regs[1], ecx: regs[2], edx: regs[3])
}

/// The hypervisor this process runs under.
public func detectHypervisor() -> Hypervisor {
    guard let sig = cpuidHypervisorSignature() else { return .none }
    return hypervisor(fromCPUIDSignature: sig)
}

/// Whether this guest is emulated by QEMU TCG.
public func isRunningUnderTCG() -> Bool { detectHypervisor() == .tcg }

/// Whether this guest runs under KVM.
public func isRunningUnderKVM() -> Bool { detectHypervisor() == .kvm }
