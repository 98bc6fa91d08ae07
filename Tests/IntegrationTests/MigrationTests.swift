// Live migration between two QEMUs on 127.0.0.1 with balloond hinting, through
// scripts/migrate.py (the same tool the demo and benchmark use). Each run dirties ~600 MiB
// of a 1 GiB TCG guest with a non-zero pattern, frees it, keeps a 16 MiB region with a known
// checksum, migrates, and verifies the region and the destination console.

import Foundation
import Testing

struct MigrationResult: Decodable {
    let mode: String
    let total_ms: Int
    let transferred_bytes: Int
    let kept_region_ok: Bool
    let dest_console_errors: [String]
    let hinted_mib: Int?
    let hint_rounds: Int?
    let hint_source: String?
    let balloond_log_tail: String?
    let dest_offline_blocks: Int?
    let first_hint_ms: Double?
    /// balloond's re-initialisations of the device during the run (a device error): 0.
    let device_resets: Int?
    /// `balloond:offline+reserve` only: the reserve before the migration, and what was still
    /// offline on the destination after balloond there exited.
    let reserve_mib: Int?
    let dest_offline_mib_after_stop: Int?
    let run_dir: String
}

/// A `--cancel` run: migrate_cancel during the first hint round.
struct CancelResult: Decodable {
    let mode: String
    let cancelled: Bool
    let held_at_cancel_mib: Int
    let hinted_mib: Int
    let released_ms: Int
    let balloond: String
    let pool_free_pages: Int?
    let pool_reserved_pages: Int?
}

/// Runs scripts/migrate.py for `modes` and returns its per-run results.
func migrate(modes: [String], extra: [String] = [], name: String) throws -> [MigrationResult] {
    try JSONDecoder().decode([MigrationResult].self, from: runMigrateScript(modes: modes, extra: extra, name: name))
}

/// Runs scripts/migrate.py and returns its JSON output.
/// Both guests run on `GuestPlatform.current` (migrate.py's --qemu-version/--guest-kernel).
func runMigrateScript(modes: [String], extra: [String], name: String) throws -> Data {
    let platform = GuestPlatform.current
    try platform.validate()
    try HarnessState.shared.prepare(guestKernel: platform.guestKernel)
    // migrate.py runs two guests; hold the harness's VM slot so no other VM test runs beside it.
    HarnessState.shared.slots.wait()
    defer { HarnessState.shared.slots.signal() }
    let out = migrateOutput(name: name, ext: "json")
    let log = migrateOutput(name: name, ext: "log")
    try? FileManager.default.createDirectory(at: HarnessPaths.runs, withIntermediateDirectories: true)
    let p = try ChildProcess(executable: "/usr/bin/env",
                             arguments: ["python3", HarnessPaths.packageRoot.appendingPathComponent("scripts/migrate.py").path,
                                         "--modes", modes.joined(separator: ","), "--json", out.path,
                                         "--qemu-version", platform.qemuVersion, "--guest-kernel", platform.guestKernel] + extra,
                             environment: ProcessInfo.processInfo.environment, outputPath: log.path)
    if !p.wait(timeout: 900) {
        p.signal(SIGKILL)
        throw HarnessError(.timeout, "scripts/migrate.py did not finish in 900 s; log \(log.path)")
    }
    let text = (try? String(contentsOf: log, encoding: .utf8)) ?? ""
    guard p.exitStatus == 0 else {
        throw HarnessError(.commandFailed, "scripts/migrate.py failed (exit \(p.exitStatus ?? -1)); log \(log.path):\n\(tail(text, lines: 30))")
    }
    print(tail(text, lines: 8))
    return try Data(contentsOf: out)
}

/// Where `runMigrateScript` keeps a run's JSON results and log (per platform).
func migrateOutput(name: String, ext: String) -> URL {
    let platform = GuestPlatform.current
    let tag = platform == .bookworm ? name : "\(name)-qemu\(platform.qemuVersion)-linux\(platform.guestKernel)"
    return HarnessPaths.runs.appendingPathComponent("migrate-\(tag).\(ext)")
}

/// `runMigrateScript`, except that a failure whose every failed run shows the guest kernel
/// turning the balloon's INTx line off after an interrupt storm ("irq N: nobody cared",
/// "Disabling IRQ #N" on a console) is recorded as that known, intermittent issue and returns
/// nil. With the uio backend on QEMU 7.2 this hit 2 of 6 kpageflags migrate_cancel runs in
/// session 13 (and once a QEMU 10.0 destination in session 12's bench): the line stays asserted
/// while the device's interrupt status is clear, and balloond then misses the device's DONE.
/// Open, with a suspected cause and a fix to try in session 13's note (QEMU's hint iothread
/// raises used-buffer interrupts outside the big lock; suppressing them during a round).
/// Any other failure still fails the test.
func runMigrateScriptKnowingINTxStorms(modes: [String], extra: [String], name: String) throws -> Data? {
    do {
        return try runMigrateScript(modes: modes, extra: extra, name: name)
    } catch let error as HarnessError {
        let out = migrateOutput(name: name, ext: "json")
        struct Run: Decodable { let error: String?; let irq_disabled: [String]? }
        let runs = (try? JSONDecoder().decode([Run].self, from: Data(contentsOf: out))) ?? []
        let failed = runs.filter { $0.error != nil }
        guard !failed.isEmpty, failed.allSatisfy({ !($0.irq_disabled ?? []).isEmpty }) else { throw error }
        withKnownIssue("the guest kernel disabled the balloon's INTx line after an interrupt storm: \(failed.flatMap { $0.irq_disabled ?? [] })",
                       isIntermittent: true) { throw error }
        return nil
    }
}

/// Every run's kept region verified on the destination, and its console is clean.
func expectDestinationsVerified(_ results: [MigrationResult]) {
    for r in results {
        #expect(r.kept_region_ok, "kept region corrupted after migration (\(r.mode)); see \(r.run_dir)")
        #expect(r.dest_console_errors.isEmpty, "destination console: \(r.dest_console_errors)")
        #expect((r.device_resets ?? 0) == 0, "balloond re-initialised the device \(r.device_resets ?? 0) times (a device error) during \(r.mode): \(r.balloond_log_tail ?? "")")
    }
}

@Suite("Live migration with free page hinting", .serialized)
struct MigrationTests {
    @Test("vfio behind a virtual IOMMU with ACCESS_PLATFORM, guest without transparent hugepages: anonymous hints through IOMMU mappings in 4 KiB pages, no element beyond QEMU's 1024 I/O vectors (no device error); the destination verifies",
          .enabled(if: GuestPlatform.current.qemuVersion == "10.0", "judged on QEMU 10.0 (7.2's TCG corrupts destinations under churn)"))
    func vfioHintsVerified() throws {
        // Without THP the hint chunks' pages are scattered, so the vIOMMU maps them one 4 KiB
        // page at a time and QEMU needs an I/O vector per page (ElementVectorBudget).
        let results = try migrate(modes: ["balloond"], extra: ["--viommu", "--kernel-args", "transparent_hugepage=never"], name: "vfio")
        let r = try #require(results.first)
        #expect(r.hint_source == "anonymous", "auto must pick the mapped source under ACCESS_PLATFORM: \(r.balloond_log_tail ?? "")")
        #expect((r.hinted_mib ?? 0) > 0, "no hints: \(r.balloond_log_tail ?? "")")
        expectDestinationsVerified(results)
    }

    @Test("kpageflags hints (the TCG default) send fewer bytes than no driver; the destination verifies",
          .enabled(if: GuestPlatform.current.qemuVersion == "10.0",
                   "judged on QEMU 10.0; on 7.2 hint rounds run in the migrate_cancel test and the page_poison migration verifies its destination"))
    func kpageflagsSavesBytes() throws {
        let results = try migrate(modes: ["none", "balloond:kpageflags"], name: "kpageflags")
        let none = try #require(results.first { $0.mode == "none" })
        let hinted = try #require(results.first { $0.mode == "balloond:kpageflags" })
        expectDestinationsVerified(results)
        #expect((hinted.hinted_mib ?? 0) > 400, "balloond hinted only \(hinted.hinted_mib ?? 0) MiB")
        #expect(hinted.transferred_bytes < none.transferred_bytes * 6 / 10,
                "hinting sent \(hinted.transferred_bytes) bytes vs \(none.transferred_bytes) without a driver")
        #expect(hinted.total_ms < none.total_ms)
    }

    @Test("offline hints (owned memory blocks, safe on any host): fewer bytes than no driver; the destination verifies and has every block online again",
          .enabled(if: GuestPlatform.current.qemuVersion == "10.0",
                   "judged on QEMU 10.0; on 7.2 the page_poison test migrates with the offline source"))
    func offlineSourceSavesBytes() throws {
        let results = try migrate(modes: ["none", "balloond:offline"], name: "offline")
        let none = try #require(results.first { $0.mode == "none" })
        let hinted = try #require(results.first { $0.mode == "balloond:offline" })
        expectDestinationsVerified(results)
        #expect(hinted.hint_source == "offline")
        #expect((hinted.hinted_mib ?? 0) >= 256, "balloond hinted only \(hinted.hinted_mib ?? 0) MiB")
        #expect(hinted.transferred_bytes < none.transferred_bytes * 7 / 10,
                "hinting sent \(hinted.transferred_bytes) bytes vs \(none.transferred_bytes) without a driver")
        #expect(hinted.dest_offline_blocks == 0, "memory blocks left offline on the destination after DONE; see \(hinted.run_dir)")
    }

    @Test("offline hints from a reserve (--hint-reserve-mib): the blocks it kept offline through a memory-hungry workload are hinted the moment the round starts; the destination verifies, keeps the reserve offline while balloond runs and gets it all back at SIGTERM",
          .enabled(if: GuestPlatform.current.qemuVersion == "10.0",
                   "judged on QEMU 10.0 (7.2's TCG corrupts destinations under churn)"))
    func offlineReserveHintsAtOnce() throws {
        let results = try migrate(modes: ["balloond:offline+reserve"], name: "reserve")
        let r = try #require(results.first)
        expectDestinationsVerified(results)
        #expect(r.hint_source == "offline")
        let reserve = try #require(r.reserve_mib)
        #expect(reserve >= 256, "the reserve held only \(reserve) MiB after the workload; see \(r.run_dir)")
        #expect((r.hinted_mib ?? 0) >= reserve, "hinted \(r.hinted_mib ?? 0) MiB of a \(reserve) MiB reserve")
        // The reserve's hints need no offlining: the first leaves at once (offlining one block
        // under TCG takes 30-90 ms, and a round without a reserve sent its first after 280-400 ms).
        #expect((r.first_hint_ms ?? .infinity) < 150, "first hint after \(r.first_hint_ms ?? -1) ms")
        #expect((r.dest_offline_blocks ?? 0) > 0, "the destination's balloond should keep its reserve offline")
        #expect(r.dest_offline_mib_after_stop == 0, "memory still offline after balloond exited on the destination; see \(r.run_dir)")
    }

    @Test("postcopy-ram capability on: QEMU asks for no hints, balloond sends none, the migration completes")
    func postcopyNoHints() throws {
        let results = try migrate(modes: ["balloond"], extra: ["--postcopy"], name: "postcopy")
        let r = try #require(results.first)
        #expect(r.kept_region_ok)
        #expect((r.hint_rounds ?? -1) == 0 && (r.hinted_mib ?? -1) == 0)
    }

    @Test("migrate_cancel during a hint round (kpageflags, and the owned hugetlb source): QEMU sends DONE, balloond holds nothing afterwards (no free or reserved hugetlb pool page left) and keeps running")
    func cancelReleases() throws {
        // Slow link, so the round is still on when the test cancels. (With the owned
        // anonymous source the source guest stopped answering under TCG; open in #4.)
        guard let data = try runMigrateScriptKnowingINTxStorms(modes: ["balloond:kpageflags", "balloond:hugetlb"], extra: ["--cancel", "--bandwidth-mib", "16"], name: "cancel") else { return }
        let results = try JSONDecoder().decode([CancelResult].self, from: data)
        #expect(results.count == 2)
        for r in results {
            #expect(r.cancelled, "\(r.mode): the migration was not cancelled")
            #expect(r.hinted_mib > 0, "\(r.mode): no hint was sent before the cancel")
            #expect(r.released_ms < 30_000, "\(r.mode): released only after \(r.released_ms) ms")
            #expect(r.balloond == "running", "\(r.mode): balloond \(r.balloond)")
            // The pool source's reservations were never faulted: they must be dropped, not
            // only unmapped (a punch hole leaves them reserved and the pool cannot shrink).
            #expect(r.pool_free_pages == 0 && r.pool_reserved_pages == 0,
                    "\(r.mode): the hugetlb pool still holds \(r.pool_free_pages ?? -1) free page(s), \(r.pool_reserved_pages ?? -1) reserved")
        }
    }

    /// Issue 9 H2 with a real destination: the guardian must stop the device before the killed
    /// worker's memory is reused, or a hint applied late drops a page the memhog rewrote from
    /// the migration. Only on QEMU 10.0: 7.2's TCG corrupts destinations under this churn even
    /// with no driver (docs/virtio-balloon.md §9), so 7.2 cannot tell a lost page from its bug.
    @Test("kill -9 during a hint round of a real migration (owned sources): the guardian stops the device and onlines offlined blocks; a memhog in the freed memory and the kept region verify on the destination",
          .enabled(if: GuestPlatform.current.qemuVersion == "10.0", "judged on QEMU 10.0 (7.2's TCG corrupts destinations under churn)"))
    func killDuringRound() throws {
        struct KillResult: Decodable {
            let mode: String
            let kept_region_ok: Bool
            let dest_console_errors: [String]
            let killed: Bool?
            let hog_ok: Bool?
            let dest_offline_blocks: Int?
            let run_dir: String
        }
        let data = try runMigrateScript(modes: ["balloond:hugetlb", "balloond:anonymous", "balloond:offline"],
                                        extra: ["--kill-during-round", "--bandwidth-mib", "32"], name: "kill")
        let results = try JSONDecoder().decode([KillResult].self, from: data)
        #expect(results.count == 3)
        for r in results {
            // The offline source holds its blocks offline until DONE: after the kill the
            // guardian onlines them (crash recovery from /run/balloond/offline-blocks).
            #expect(r.dest_offline_blocks == 0, "\(r.mode): memory blocks still offline after the kill; see \(r.run_dir)")
            #expect(r.killed == true, "\(r.mode): the migration ended before the kill; see \(r.run_dir)")
            #expect(r.hog_ok == true, "\(r.mode): the memhog started after the kill did not verify on the destination; see \(r.run_dir)")
            #expect(r.kept_region_ok, "\(r.mode): kept region or memhog failed on the destination; see \(r.run_dir)")
            #expect(r.dest_console_errors.isEmpty, "\(r.mode): destination console: \(r.dest_console_errors)")
        }
    }

    @Test("a page_poison=1 guest: auto refuses kpageflags (and, under TCG, hugetlb and anonymous), hints offlined blocks, and the destination has no pagealloc errors and every block online")
    func pagePoisonGuest() throws {
        let results = try migrate(modes: ["balloond"], extra: ["--kernel-args", "page_poison=1"], name: "poison")
        let r = try #require(results.first)
        expectDestinationsVerified(results)
        #expect(r.hint_source == "offline", "auto should pick offline on a TCG poisoning guest; balloond log: \(r.balloond_log_tail ?? "-")")
        #expect((r.hinted_mib ?? 0) > 0, "no hint sent; balloond log: \(r.balloond_log_tail ?? "-")")
        #expect(r.dest_offline_blocks == 0, "memory blocks left offline on the destination; see \(r.run_dir)")
    }
}
