import GuestMemoryLinux
import VirtioCore

/// Which handed-out hint ranges the device has not used yet, so an owned source never gives
/// memory back while a hint for it could still be applied (docs/virtio-balloon.md §9).
///
/// Why not just release at `endRound`: the driver also ends a round when *it* runs dry and
/// posts its STOP buffer, and the hint descriptors queued before that STOP are applied by
/// QEMU afterwards (it pops the ring in order, in START). Memory behind them must stay held
/// until their descriptors come back.
///
/// `Tag` says what a range belongs to (a chunk of memory, or nothing). Counts are per range
/// and per tag: the same range may be handed out twice (in two rounds) and is outstanding
/// until both descriptors are used.
///
/// After `retireAll` (DONE or device reset: nothing can be applied any more, memory was
/// released) descriptors of the old session may still come back — after DONE they do, after a
/// reset they never do. They become *ghosts*: the free-page queue is used in order, so a
/// returning range that matches a ghost is the older descriptor and is consumed as the ghost
/// first. The first returning range that matches no ghost proves every older descriptor has
/// come back (or never will) and clears the ghosts. A ghost wrongly matching a new descriptor
/// (only after a reset) delays that release to `releaseAll`: the safe direction.
public struct OutstandingHints<Tag: Hashable> {
    private var current: [GuestPhysicalRange: [Tag: Int]] = [:]
    private var perTag: [Tag: Int] = [:]
    private var ghosts: [GuestPhysicalRange: Int] = [:]
    public private(set) var total = 0

    public init() {}

    /// A range was handed to the driver.
    public mutating func handedOut(_ range: GuestPhysicalRange, tag: Tag) {
        current[range, default: [:]][tag, default: 0] += 1
        perTag[tag, default: 0] += 1
        total += 1
    }

    /// The device used a descriptor for `range`. Returns the tag it was counted against,
    /// or nil when it was a ghost or not ours.
    @discardableResult
    public mutating func applied(_ range: GuestPhysicalRange) -> Tag? {
        if let g = ghosts[range] {
            if g <= 1 { ghosts[range] = nil } else { ghosts[range] = g - 1 }
            return nil
        }
        guard var tags = current[range], let tag = tags.keys.first(where: { tags[$0]! > 0 }) else { return nil }
        ghosts.removeAll()
        tags[tag]! -= 1
        if tags[tag]! == 0 { tags[tag] = nil }
        current[range] = tags.isEmpty ? nil : tags
        perTag[tag]! -= 1
        if perTag[tag]! == 0 { perTag[tag] = nil }
        total -= 1
        return tag
    }

    /// Descriptors still out for `tag`.
    public func outstanding(_ tag: Tag) -> Int { perTag[tag] ?? 0 }

    /// Every memory behind the current ranges was released because no hint can be applied
    /// any more (DONE, reset): their descriptors become ghosts.
    public mutating func retireAll() {
        for (range, tags) in current { ghosts[range, default: 0] += tags.values.reduce(0, +) }
        current.removeAll()
        perTag.removeAll()
        total = 0
    }

    /// Descriptors of released sessions not yet seen back.
    public var ghostCount: Int { ghosts.values.reduce(0, +) }
}
