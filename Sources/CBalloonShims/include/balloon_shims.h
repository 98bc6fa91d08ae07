// balloon_shims.h: the only C in balloond.
//
// Exact-width volatile loads and stores for device (MMIO) memory, and the memory-ordering
// primitives the split virtqueue needs. Swift has no volatile; these are `static inline` so
// the optimiser sees exactly one access of the stated width per call (a release -emit-ir
// shows `load volatile i32` / `store volatile i32`).
#ifndef BALLOON_SHIMS_H
#define BALLOON_SHIMS_H

#include <stdint.h>

// MARK: MMIO (uncached device memory, e.g. BAR4 mapped from sysfs resource4)

static inline uint8_t bs_mmio_read8(const void *p) { return *(const volatile uint8_t *)p; }
static inline uint16_t bs_mmio_read16(const void *p) { return *(const volatile uint16_t *)p; }
static inline uint32_t bs_mmio_read32(const void *p) { return *(const volatile uint32_t *)p; }
static inline void bs_mmio_write8(void *p, uint8_t v) { *(volatile uint8_t *)p = v; }
static inline void bs_mmio_write16(void *p, uint16_t v) { *(volatile uint16_t *)p = v; }
static inline void bs_mmio_write32(void *p, uint32_t v) { *(volatile uint32_t *)p = v; }

// MARK: Shared ring memory (cacheable RAM the device reads and writes concurrently)

// Ring fields are read and written with single, untorn accesses of their own width.
static inline uint16_t bs_ring_load16(const void *p) { return __atomic_load_n((const uint16_t *)p, __ATOMIC_RELAXED); }
static inline uint32_t bs_ring_load32(const void *p) { return __atomic_load_n((const uint32_t *)p, __ATOMIC_RELAXED); }
static inline uint64_t bs_ring_load64(const void *p) { return __atomic_load_n((const uint64_t *)p, __ATOMIC_RELAXED); }
static inline void bs_ring_store16(void *p, uint16_t v) { __atomic_store_n((uint16_t *)p, v, __ATOMIC_RELAXED); }
static inline void bs_ring_store32(void *p, uint32_t v) { __atomic_store_n((uint32_t *)p, v, __ATOMIC_RELAXED); }
static inline void bs_ring_store64(void *p, uint64_t v) { __atomic_store_n((uint64_t *)p, v, __ATOMIC_RELAXED); }

// Publishing avail->idx: every descriptor and ring-slot store must be visible first.
static inline void bs_ring_store16_release(void *p, uint16_t v) { __atomic_store_n((uint16_t *)p, v, __ATOMIC_RELEASE); }
// Consuming used->idx: ring entries must not be read before the index that covers them.
static inline uint16_t bs_ring_load16_acquire(const void *p) { return __atomic_load_n((const uint16_t *)p, __ATOMIC_ACQUIRE); }
// Between publishing avail->idx and reading used->flags / avail_event to decide on a kick.
static inline void bs_fence_seq_cst(void) { __atomic_thread_fence(__ATOMIC_SEQ_CST); }

// MARK: CPU identification (is this guest running under TCG?)

/// Executes CPUID with `leaf` and writes eax, ebx, ecx, edx to `out[0..3]`. Returns 0 on
/// x86-64, -1 elsewhere (out untouched).
int bs_cpuid(uint32_t leaf, uint32_t out[4]);

// MARK: Signals

/// Installs handlers for SIGTERM, SIGINT and SIGHUP that write the signal number as one byte
/// to `fd` (the write end of a non-blocking pipe) and set a flag read by
/// `bs_signal_received`, and ignores SIGPIPE. Returns 0 or -1 with errno set.
int bs_install_signal_pipe(int fd);
/// Stops the handler writing to `fd` (if it is the installed one); call before closing it.
/// The handlers stay installed and keep recording the signal.
void bs_uninstall_signal_pipe(int fd);
/// The last signal delivered through the pipe handler, or 0.
int bs_signal_received(void);

// MARK: Bounded writes

/// write(fd, buf, len), interrupted after `timeout_ms` milliseconds: a CLOCK_MONOTONIC timer
/// sends SIGALRM (and again every 20 ms until the write returns) (whose handler does nothing and is installed without SA_RESTART) to the
/// calling thread only, so a kernel operation that waits until a signal arrives (memory
/// offlining retries migration until then) returns EINTR instead of hanging. SIGALRM is
/// unblocked in the calling thread for the call. Returns write's result (-1 and errno, EINTR
/// when the timer fired), or -1 with errno from timer_create/sigaction.
long bs_write_with_timeout(int fd, const void *buf, unsigned long len, int timeout_ms);

// MARK: memfd (glibc declares memfd_create and fallocate only under _GNU_SOURCE)

/// memfd_create(2); -1 and errno on failure.
int bs_memfd_create(const char *name, unsigned int flags);
/// fallocate(fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, offset, length); -1 and errno.
int bs_punch_hole(int fd, int64_t offset, int64_t length);

// MARK: vfio (the Linux uapi header; its ioctl numbers are macros Swift cannot import)

#include <linux/vfio.h>
// eventfd and epoll, for vfio's interrupt eventfds (Swift's Glibc module leaves them out).
#include <sys/eventfd.h>
#include <sys/epoll.h>

static inline unsigned long bs_vfio_get_api_version(void) { return VFIO_GET_API_VERSION; }
static inline unsigned long bs_vfio_check_extension(void) { return VFIO_CHECK_EXTENSION; }
static inline unsigned long bs_vfio_set_iommu(void) { return VFIO_SET_IOMMU; }
static inline unsigned long bs_vfio_group_get_status(void) { return VFIO_GROUP_GET_STATUS; }
static inline unsigned long bs_vfio_group_set_container(void) { return VFIO_GROUP_SET_CONTAINER; }
static inline unsigned long bs_vfio_group_get_device_fd(void) { return VFIO_GROUP_GET_DEVICE_FD; }
static inline unsigned long bs_vfio_device_get_info(void) { return VFIO_DEVICE_GET_INFO; }
static inline unsigned long bs_vfio_device_get_region_info(void) { return VFIO_DEVICE_GET_REGION_INFO; }
static inline unsigned long bs_vfio_device_get_irq_info(void) { return VFIO_DEVICE_GET_IRQ_INFO; }
static inline unsigned long bs_vfio_device_set_irqs(void) { return VFIO_DEVICE_SET_IRQS; }
static inline unsigned long bs_vfio_device_reset(void) { return VFIO_DEVICE_RESET; }
static inline unsigned long bs_vfio_iommu_get_info(void) { return VFIO_IOMMU_GET_INFO; }
static inline unsigned long bs_vfio_iommu_map_dma(void) { return VFIO_IOMMU_MAP_DMA; }
static inline unsigned long bs_vfio_iommu_unmap_dma(void) { return VFIO_IOMMU_UNMAP_DMA; }

/// ioctl(fd, request, arg) with a pointer argument; -1 and errno on failure.
int bs_ioctl_pointer(int fd, unsigned long request, void *arg);
/// ioctl(fd, request, value) with an integer argument (VFIO_CHECK_EXTENSION, VFIO_SET_IOMMU);
/// -1 and errno on failure.
int bs_ioctl_value(int fd, unsigned long request, unsigned long value);

#endif
