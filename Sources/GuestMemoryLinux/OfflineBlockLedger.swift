import Logging
import PlatformLinux

/// The memory blocks one owner (the `offline` hint source, or the balloon's offline memory)
/// has recorded in its `OfflineBlockStateFile`, and the only way that owner offlines, onlines
/// and adopts blocks, so that the file always lists every block the owner may have offlined.
///
/// Safety argument (a balloond killed with SIGKILL must not lose guest memory; the guardian or
/// the next start onlines what the file lists and is still offline):
/// - *Listed before offline.* A block is added to the file before `offline` is written to it:
///   a kill during or right after the write leaves it listed, so it is found and onlined.
///   If the listing cannot be written the block is not offlined at all.
/// - *Unlisted only once online.* A block leaves the file only after the kernel onlined it,
///   or the offline write failed (the kernel left it online). A block that fails to online
///   stays offline, so it stays listed: the next start tries again.
/// - A listed block that is online costs nothing: recovery onlines only listed blocks that
///   are still offline.
///
/// What to offline and when, budgets, backoffs and statistics are the owner's; this type
/// keeps only the list and the order of the writes.
package final class OfflineBlockLedger {
    package let stateFile: OfflineBlockStateFile
    /// The blocks recorded (ascending): offlined by this ledger and not onlined yet, plus
    /// adopted leftovers. The file lists these (or, for a moment, one more).
    package private(set) var blocks: [Int] = []
    /// Monotonic nanoseconds since this ledger was made: writing the state file around
    /// `offline` (the listing, and the unlisting after a failure, each counted once it
    /// succeeded) and the kernel's offline writes. Owners take differences for their figures.
    package private(set) var stateNanos: UInt64 = 0
    package private(set) var offlineNanos: UInt64 = 0
    private let control: MemoryBlockControl
    private let logger: Logger
    private var leftoversLookedAt = false

    /// - Parameter logger: the owner's (the ledger logs a block that stays offline, and a file
    ///   it cannot update, under the owner's label).
    package init(stateFile: OfflineBlockStateFile, control: MemoryBlockControl, logger: Logger) {
        self.stateFile = stateFile
        self.control = control
        self.logger = logger
    }

    /// Offlines block `b` (not recorded yet): writes the file listing the recorded blocks and
    /// `b`, then asks the kernel. Offlined: `b` is recorded. Otherwise the kernel left it online:
    /// `failed` runs (the owner's bookkeeping for a failed block) and the file is written again
    /// without `b`.
    ///
    /// Throws when either write fails: the listing (nothing was offlined) or the unlisting
    /// (`b` is online and no longer recorded; the file still lists it until the next write,
    /// which is harmless).
    package func offline(_ b: Int, timeoutMilliseconds: Int,
                         failed: (MemoryBlockOfflineResult) -> Void) throws(GuestMemoryError) -> MemoryBlockOfflineResult {
        let t0 = Sys.monotonicNanos()
        try stateFile.write(blocks: blocks + [b])
        let t1 = Sys.monotonicNanos()
        stateNanos += t1 - t0
        let result = control.offline(b, timeoutMilliseconds: timeoutMilliseconds)
        let t2 = Sys.monotonicNanos()
        offlineNanos += t2 - t1
        guard result == .offlined else {
            failed(result)
            try stateFile.write(blocks: blocks)
            stateNanos += Sys.monotonicNanos() - t2
            return result
        }
        blocks.append(b)
        blocks.sort()
        return result
    }

    /// Onlines `which` one by one, `onlined` after each success, then rewrites the file with
    /// what is still recorded (written even when `which` is empty). A block that fails to
    /// online is still offline, so it stays recorded and listed for the guardian or the next
    /// start; a file that cannot be updated is logged, not thrown (what it lists still covers
    /// every offline block).
    package func online(_ which: [Int], onlined: (Int) -> Void = { _ in }) {
        for b in which {
            do { try control.online(b) } catch {
                logger.error("\(error); it stays offline and listed in \(stateFile.path) for the next start")
                continue
            }
            blocks.removeAll { $0 == b }
            onlined(b)
        }
        record()
    }

    /// Blocks a killed balloond left listed in this file that are still offline (not
    /// recorded already), recorded from now on; nil when there are none, the file is this
    /// process's or a live balloond's, or it was looked at before (only the first call looks).
    /// The file is not written: it lists them already, under the dead writer's pid (`record`
    /// puts this process's on it).
    package func adoptLeftovers() -> (blocks: [Int], pid: Int32)? {
        guard !leftoversLookedAt else { return nil }
        leftoversLookedAt = true
        guard let c = try? stateFile.read(), c.pid != Sys.processID,
              !stateWriterIsAlive(root: stateFile.root, pid: c.pid, comm: c.comm) else { return nil }
        let adopted = c.blocks.filter { control.isOffline($0) == true && !blocks.contains($0) }
        guard !adopted.isEmpty else { return nil }
        blocks = (blocks + adopted).sorted()
        return (adopted, c.pid)
    }

    /// Writes the recorded blocks to the file, first dropping `gone` (blocks someone else
    /// onlined: nothing to recover); a failure is logged.
    package func record(forgetting gone: [Int] = []) {
        blocks.removeAll { gone.contains($0) }
        do { try stateFile.write(blocks: blocks) } catch { logger.error("cannot update \(stateFile.path): \(error)") }
    }
}
