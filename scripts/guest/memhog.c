/*
 * memhog: a guest memory hog for the balloon tests and benchmark.
 *
 *   memhog [-s STEP_MIB] [-H HOLD_SECONDS] [-p PROGRESS_MIB] [-q] MIB
 *
 * Allocates MIB MiB of private anonymous memory in steps of STEP_MIB (default 16), one mmap
 * per step, and writes every byte of every page with a pattern that depends on the page's
 * index (so no page is zero and no two neighbours are equal). After the last step it holds
 * the memory for HOLD_SECONDS (default 0), then verifies one 64-bit word per 64-byte line of
 * every page, unmaps everything and prints the final line
 *
 *   memhog: ok MIB MiB
 *
 * Progress goes to stdout, line-buffered: "memhog: N/MIB MiB" every PROGRESS_MIB (default
 * 64), "memhog: holding MIB MiB for S s" before the hold (a test can wait for that line
 * to read memory numbers while the memory is in use), "memhog: verified MIB MiB".
 *
 * Exit status: 0 ok; 1 mmap failed ("memhog: mmap of ... failed after N MiB: ..."), 2 bad
 * usage, 3 the pattern did not verify (a page lost its contents: a balloon driver gave
 * the host a page that was in use). A guest without enough memory may instead OOM-kill it
 * while it writes (exit status 137 from the shell); that is what the deflate-on-pressure
 * test checks does not happen.
 *
 * Built statically by scripts/build-guest.sh (gcc -static -O2), installed as /bin/memhog.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <signal.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <time.h>
#include <unistd.h>

#define MIB (1024UL * 1024UL)

static void usage(void)
{
	fprintf(stderr, "usage: memhog [-s STEP_MIB] [-H HOLD_SECONDS] [-p PROGRESS_MIB] [-q] MIB\n");
	exit(2);
}

static unsigned long parse_num(const char *s, const char *what)
{
	char *end;
	errno = 0;
	unsigned long v = strtoul(s, &end, 10);
	if (errno || end == s || *end || s[0] == '-') {
		fprintf(stderr, "memhog: %s must be a non-negative integer, not '%s'\n", what, s);
		exit(2);
	}
	return v;
}

static double now(void)
{
	struct timespec ts;
	clock_gettime(CLOCK_MONOTONIC, &ts);
	return ts.tv_sec + ts.tv_nsec / 1e9;
}

/* The value of every 64-bit word of global page number `page`. */
static inline uint64_t pattern(uint64_t page)
{
	return 0x6d656d686f670000ULL ^ (page * 0x9e3779b97f4a7c15ULL) ^ 0x5a5a5a5a5a5a5a5aULL;
}

int main(int argc, char **argv)
{
	unsigned long step_mib = 16, hold = 0, progress_mib = 64;
	int quiet = 0, opt;
	while ((opt = getopt(argc, argv, "s:H:p:qh")) != -1) {
		switch (opt) {
		case 's': step_mib = parse_num(optarg, "STEP_MIB"); break;
		case 'H': hold = parse_num(optarg, "HOLD_SECONDS"); break;
		case 'p': progress_mib = parse_num(optarg, "PROGRESS_MIB"); break;
		case 'q': quiet = 1; break;
		default: usage();
		}
	}
	if (optind != argc - 1)
		usage();
	unsigned long total_mib = parse_num(argv[optind], "MIB");
	if (total_mib == 0 || step_mib == 0) {
		fprintf(stderr, "memhog: MIB and STEP_MIB must be positive\n");
		return 2;
	}
	setvbuf(stdout, NULL, _IOLBF, 0);

	long page_size = sysconf(_SC_PAGESIZE);
	unsigned long nsteps = (total_mib + step_mib - 1) / step_mib;
	char **region = calloc(nsteps, sizeof *region);
	size_t *length = calloc(nsteps, sizeof *length);
	if (!region || !length) {
		fprintf(stderr, "memhog: out of memory for bookkeeping\n");
		return 1;
	}

	double t0 = now();
	unsigned long done_mib = 0, next_progress = progress_mib;
	uint64_t page = 0;
	for (unsigned long i = 0; i < nsteps; i++) {
		unsigned long mib = total_mib - done_mib < step_mib ? total_mib - done_mib : step_mib;
		size_t len = mib * MIB;
		char *p = mmap(NULL, len, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
		if (p == MAP_FAILED) {
			fprintf(stderr, "memhog: mmap of %lu MiB failed after %lu MiB: %s\n", mib, done_mib, strerror(errno));
			printf("memhog: FAILED after %lu MiB\n", done_mib);
			return 1;
		}
		region[i] = p;
		length[i] = len;
		for (size_t off = 0; off < len; off += page_size, page++) {
			uint64_t v = pattern(page);
			uint64_t *w = (uint64_t *)(p + off);
			for (size_t k = 0; k < page_size / sizeof *w; k++)
				w[k] = v;
		}
		done_mib += mib;
		if (!quiet && progress_mib && (done_mib >= next_progress || done_mib == total_mib)) {
			printf("memhog: %lu/%lu MiB\n", done_mib, total_mib);
			while (next_progress <= done_mib)
				next_progress += progress_mib;
		}
	}
	double t1 = now();
	if (!quiet)
		printf("memhog: wrote %lu MiB in %.2f s (%.0f MiB/s)\n", total_mib, t1 - t0,
		       t1 > t0 ? total_mib / (t1 - t0) : 0.0);

	if (hold) {
		printf("memhog: holding %lu MiB for %lu s\n", total_mib, hold);
		sleep(hold);
	}

	page = 0;
	unsigned long bad = 0;
	for (unsigned long i = 0; i < nsteps; i++) {
		for (size_t off = 0; off < length[i]; off += page_size, page++) {
			uint64_t v = pattern(page);
			for (size_t k = 0; k < (size_t)page_size; k += 64) {
				uint64_t got = *(uint64_t *)(region[i] + off + k);
				if (got != v) {
					if (bad < 5)
						fprintf(stderr, "memhog: page %llu offset %zu: got %016llx, want %016llx\n",
							(unsigned long long)page, k, (unsigned long long)got,
							(unsigned long long)v);
					bad++;
					break;
				}
			}
		}
		munmap(region[i], length[i]);
	}
	if (bad) {
		printf("memhog: FAILED: %lu of %llu pages lost their contents\n", bad, (unsigned long long)page);
		return 3;
	}
	if (!quiet)
		printf("memhog: verified %lu MiB\n", total_mib);
	printf("memhog: ok %lu MiB\n", total_mib);
	return 0;
}
