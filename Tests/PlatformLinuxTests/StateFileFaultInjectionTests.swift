#if canImport(Glibc)
import Glibc
#endif
import TestSupport
import Testing
@testable import PlatformLinux

/// The state directory and files against tampering: links, foreign owners, open modes,
/// FIFOs, malformed records, hostile driver names, and a device that belongs to another
/// driver.
@Suite struct StateFileFaultInjectionTests {
    static func mode(_ path: String) -> UInt32 { UInt32((try! Sys.lstatIfExists(path))!.st_mode & 0o7777) }

    // MARK: the directory

    @Test func aMissingDirectoryIsCreatedRootOnly() throws {
        let t = FakeTree()
        let file = StateDirectory(root: t.root).file("x")
        try file.write("a=1\n")
        #expect(Self.mode(t.at("/run/balloond")) == 0o700)
        #expect(Self.mode(t.at("/run/balloond/x")) == 0o600)
        #expect(try file.read() == "a=1\n")
        #expect(!t.exists("/run/balloond/x.tmp"), "the temporary file was renamed")
    }

    @Test func aDirectoryAccessibleToOthersIsRefusedWithTheFix() throws {
        let t = FakeTree()
        t.directory("/run/balloond")
        #expect(chmod(t.at("/run/balloond"), 0o755) == 0)
        let dir = StateDirectory(root: t.root)
        #expect(throws: StateFileError.directoryTooOpen(path: t.at("/run/balloond"), mode: UInt32(S_IFDIR) | 0o755)) { try dir.prepare() }
        #expect(throws: StateFileError.self) { try dir.file("x").write("a=1\n") }
        #expect(!t.exists("/run/balloond/x"), "nothing is written into it")
        #expect(StateFileError.directoryTooOpen(path: "/run/balloond", mode: 0o40755).description.contains("chmod 0700 /run/balloond"))
    }

    @Test func aSymlinkedDirectoryIsRefused() throws {
        let t = FakeTree()
        t.directory("/elsewhere")
        #expect(chmod(t.at("/elsewhere"), 0o700) == 0)
        t.symlink("/run/balloond", to: t.at("/elsewhere"))
        let dir = StateDirectory(root: t.root)
        #expect(throws: StateFileError.directoryIsSymlink(path: t.at("/run/balloond"))) { try dir.prepare() }
        #expect(throws: StateFileError.directoryIsSymlink(path: t.at("/run/balloond"))) { _ = try dir.file("x").read() }
    }

    @Test func aDirectoryOwnedBySomeoneElseIsRefused() throws {
        let t = FakeTree()
        t.directory("/run/balloond")
        #expect(chmod(t.at("/run/balloond"), 0o700) == 0)
        // The fake tree's owner is the test user; a directory this user owns is "foreign"
        // to a state directory that expects another uid.
        let dir = StateDirectory(fullPath: t.at("/run/balloond"), owner: geteuid() &+ 1)
        #expect(throws: StateFileError.directoryWrongOwner(path: t.at("/run/balloond"), owner: geteuid(), expected: geteuid() &+ 1)) {
            try dir.prepare()
        }
        #expect(StateFileError.directoryWrongOwner(path: "/run/balloond", owner: 1000, expected: 0).description.contains("chown root:root /run/balloond"))
    }

    @Test func theHostStateDirectoryBelongsToRoot() {
        #expect(SysRoot.host.stateOwner == 0)
        #expect(StateDirectory().owner == 0 && StateDirectory().path == "/run/balloond")
    }

    // MARK: the files

    @Test func aSymlinkedFileIsNotFollowed() throws {
        let t = FakeTree()
        t.stateFile("/run/balloond/placeholder", "")
        t.file("/secret", "a=1\n")
        t.symlink("/run/balloond/x", to: t.at("/secret"))
        let file = StateDirectory(root: t.root).file("x")
        #expect(throws: StateFileError.fileIsSymlink(path: t.at("/run/balloond/x"))) { _ = try file.read() }
        let moved = try file.setAside()
        #expect(moved == t.at("/run/balloond/x.bad") && !t.exists("/run/balloond/x") && t.read("/secret") == "a=1\n")
    }

    @Test func writingReplacesALinkInsteadOfWritingThroughIt() throws {
        let t = FakeTree()
        t.stateFile("/run/balloond/placeholder", "")
        t.file("/secret", "untouched\n")
        t.symlink("/run/balloond/x", to: t.at("/secret"))
        t.symlink("/run/balloond/x.tmp", to: t.at("/secret"))
        try StateDirectory(root: t.root).file("x").write("a=1\n")
        #expect(t.read("/secret") == "untouched\n")
        #expect(try StateDirectory(root: t.root).file("x").read() == "a=1\n")
    }

    @Test func aFileWritableByOthersIsRefused() throws {
        let t = FakeTree()
        t.stateFile("/run/balloond/x", "a=1\n")
        #expect(chmod(t.at("/run/balloond/x"), 0o622) == 0)
        #expect(throws: StateFileError.fileWritableByOthers(path: t.at("/run/balloond/x"), mode: UInt32(S_IFREG) | 0o622)) {
            _ = try StateDirectory(root: t.root).file("x").read()
        }
    }

    @Test func aFileOwnedBySomeoneElseIsRefused() throws {
        let t = FakeTree()
        t.stateFile("/run/balloond/x", "a=1\n")
        // Only root can give a file away; without root, the same check is made from the other
        // side: a directory expecting another owner (its own check is what fails first, so the
        // file check is exercised when running as root).
        if geteuid() == 0 {
            #expect(chown(t.at("/run/balloond/x"), 1234, 1234) == 0)
            #expect(throws: StateFileError.fileWrongOwner(path: t.at("/run/balloond/x"), owner: 1234, expected: 0)) {
                _ = try StateDirectory(root: t.root).file("x").read()
            }
        }
    }

    @Test func aFIFOIsRefusedWithoutBlocking() throws {
        let t = FakeTree()
        t.stateFile("/run/balloond/placeholder", "")
        #expect(mkfifo(t.at("/run/balloond/x"), 0o600) == 0)
        #expect(throws: StateFileError.fileNotRegular(path: t.at("/run/balloond/x"))) { _ = try StateDirectory(root: t.root).file("x").read() }
    }

    @Test func aHugeFileIsRefused() throws {
        let t = FakeTree()
        t.stateFile("/run/balloond/x", String(repeating: "a", count: StateFile.maxBytes + 1))
        #expect(throws: StateFileError.fileTooLarge(path: t.at("/run/balloond/x"), limit: StateFile.maxBytes)) {
            _ = try StateDirectory(root: t.root).file("x").read()
        }
    }

    // MARK: strict records

    static let keys: Set<String> = ["a", "b"]

    @Test("strict key=value parsing", arguments: [
        ("a=1\nb=2\n", nil),
        ("a=1\n", StateRecordProblem.missingKey("b")),
        ("a=1\nb=2\nc=3\n", .unknownKey("c")),
        ("a=1\nb=2\na=3\n", .duplicateKey("a")),
        ("a=1\n\nb=2\n", .notKeyValue(line: 2)),
        ("a=1\nb\n", .notKeyValue(line: 2)),
        ("=1\na=1\nb=2\n", .notKeyValue(line: 1)),
    ] as [(String, StateRecordProblem?)])
    func strictRecords(text: String, problem: StateRecordProblem?) {
        do {
            _ = try StateRecord.parse(text, keys: Self.keys, required: Self.keys)
            #expect(problem == nil)
        } catch {
            #expect(error == problem)
        }
    }

    @Test("numbers are plain decimal and in range", arguments: ["-1", "+1", " 1", "1 ", "0x10", "1e3", "", "18446744073709551616", "١"])
    func badNumbers(value: String) throws {
        let r = try StateRecord.parse("a=\(value)\n", keys: ["a"], required: ["a"])
        #expect(throws: StateRecordProblem.badNumber(key: "a", value: value)) { _ = try r.uint64("a") }
    }

    @Test func goodNumbersParse() throws {
        let r = try StateRecord.parse("a=18446744073709551615\nb=42\n", keys: Self.keys, required: Self.keys)
        #expect(try r.uint64("a") == UInt64.max && r.pid("b") == 42)
        #expect(throws: StateRecordProblem.badNumber(key: "a", value: "18446744073709551615")) { _ = try r.pid("a") }
    }

    @Test func valuesWithNewlinesAreNotWritten() {
        #expect(throws: StateFileError.unwritableValue(key: "comm")) { _ = try StateRecord(["comm": "x\nsysctl=/etc/shadow"]).render() }
    }

    // MARK: the driver state file (<BDF>.driver)

    let bdf = PCIAddress("0000:00:03.0")!

    func binder(driver: String? = "virtio-pci") -> (FakeTree, FakeKernel, DriverBinder) {
        fakeBalloonBinder(bdf, driver: driver)
    }

    @Test("driver names that could escape the sysfs path are refused", arguments: [
        "../../../../devices/0000:00:03.0/remove", "virtio-pci/../../x", "/virtio-pci", "..", ".", "virtio pci", "a\tb",
        String(repeating: "a", count: 65),
    ])
    func hostileSavedDriverIsNeverUsed(name: String) throws {
        let (t, k, b) = binder(driver: nil)
        t.bindLink(bdf.bdf, "uio_pci_generic")
        t.stateFile("/run/balloond/0000:00:03.0.driver", name + "\n")
        #expect(throws: PlatformError.self) { _ = try b.savedPreviousDriver(for: bdf) }
        let now = try b.restore(bdf)
        #expect(now == "virtio-pci", "the kernel probes instead")
        #expect(k.writes.map(\.path) == [
            "/sys/bus/pci/drivers/uio_pci_generic/unbind",
            "/sys/bus/pci/devices/0000:00:03.0/driver_override",
            "/sys/bus/pci/drivers_probe",
        ], "no sysfs path is built from the file")
        #expect(t.read("/run/balloond/0000:00:03.0.driver.bad") == name + "\n", "set aside for the admin")
    }

    @Test("a malformed or tampered driver file does not block bind", arguments: ["virtio-pci\nvfio-pci\n", "virtio-pci", "../x\n"])
    func malformedDriverFileIsSetAsideAtBind(contents: String) throws {
        let (t, _, b) = binder(driver: nil)
        t.stateFile("/run/balloond/0000:00:03.0.driver", contents)
        let binding = try b.bind(bdf)
        #expect(binding.previousDriver == nil)
        #expect(t.read("/run/balloond/0000:00:03.0.driver") == "\n")
        #expect(t.exists("/run/balloond/0000:00:03.0.driver.bad"))
    }

    @Test func aDriverFileWritableByOthersIsNotTrusted() throws {
        let (t, k, b) = binder(driver: nil)
        t.bindLink(bdf.bdf, "uio_pci_generic")
        t.pciDriver("evil")
        t.stateFile("/run/balloond/0000:00:03.0.driver", "evil\n")
        #expect(chmod(t.at("/run/balloond/0000:00:03.0.driver"), 0o666) == 0)
        _ = try b.restore(bdf)
        #expect(!k.writes.contains { $0.path.contains("evil") })
    }

    // MARK: M6: only none, virtio-pci or uio_pci_generic without --force

    @Test func bindRefusesADeviceOfAnotherDriverBeforeChangingAnything() {
        let (t, k, b) = binder(driver: "vfio-pci")
        do {
            _ = try b.bind(bdf)
            Issue.record("bind must refuse a vfio-pci device")
        } catch {
            #expect(error == .foreignDriver(bdf: bdf.bdf, driver: "vfio-pci"))
            #expect(error.description.contains("vfio-pci") && error.description.contains("--force"))
        }
        #expect(k.writes.isEmpty && k.commands.isEmpty, "nothing unbound, no module loaded")
        #expect(!t.exists("/run/balloond/0000:00:03.0.driver"))
    }

    @Test func bindWithForceTakesADeviceFromAnotherDriver() throws {
        let (t, _, b) = binder(driver: "vfio-pci")
        let binding = try b.bind(bdf, force: true)
        #expect(binding.previousDriver == "vfio-pci")
        #expect(t.read("/run/balloond/0000:00:03.0.driver") == "vfio-pci\n")
    }

    @Test("bind accepts none, virtio-pci and uio_pci_generic", arguments: [nil, "virtio-pci", "uio_pci_generic"] as [String?])
    func acceptedDrivers(driver: String?) throws {
        let (t, _, b) = binder(driver: driver)
        if driver == uioPCIGenericDriver {
            // Already bound: the binding is looked up (the fake has no uio/uio0 for it).
            t.pciDriver(uioPCIGenericDriver)
            t.file("/sys/bus/pci/devices/0000:00:03.0/uio/uio0/dev", "243:0\n")
            t.file("/dev/uio0", "")
        }
        _ = try b.bind(bdf)
        #expect(try b.currentDriver(of: bdf) == "uio_pci_generic")
    }

    // MARK: the device lock shares the root-only directory

    @Test func theDeviceLockCreatesTheStateDirectoryRootOnly() throws {
        let t = FakeTree()
        let lock = try DeviceLock(address: bdf, root: t.root)
        defer { lock.unlock() }
        #expect(Self.mode(t.at("/run/balloond")) == 0o700)
        #expect(try StateDirectory(root: t.root).check())
    }
}
